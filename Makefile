# The two commands of the README: `make demo` and `make test`. Both install what is missing.
PYTHON ?= $(shell command -v python3.11 2>/dev/null || command -v python3)
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
SOURCES := setup.py pyproject.toml requirements.txt build_ext.py $(wildcard csrc/*.c csrc/*.h)
BACKEND ?= udp

.PHONY: all deps packaging-deps venv test unit demo bench deb rpm clean

all: venv

deps:
	@PYTHON=$(PYTHON) scripts/install-deps.sh

packaging-deps:
	@PYTHON=$(PYTHON) scripts/install-deps.sh --packaging

$(STAMP): $(SOURCES)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-build-isolation -e .
	touch $@

venv: deps $(STAMP)

test: packaging-deps venv
	$(PY) -m pytest tests/unit tests/integration tests/e2e tests/packaging

unit: venv
	$(PY) -m pytest tests/unit

demo: venv
	BACKEND=$(BACKEND) PYTHON=$(PY) scripts/demo.sh

bench: venv
	$(PY) -m pytest -s -m bench tests/bench

# Distro packages, built into dist/.
deb: packaging-deps
	scripts/build-deb.sh

rpm: packaging-deps
	scripts/build-rpm.sh

clean:
	rm -rf $(VENV) build dist *.egg-info flannel/_proxy*.so flannel/_proxy.c
