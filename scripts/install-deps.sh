#!/usr/bin/env bash
# Install the Debian packages flanneld's build, demo and tests need, only those missing.
# With --packaging also the tools to build and check the .deb and .rpm (make test, deb, rpm).
set -euo pipefail
packaging=false
[ "${1:-}" = "--packaging" ] && packaging=true

need=()
have_cmd() { command -v "$1" >/dev/null 2>&1; }
have_cmd etcd     || need+=(etcd-server)
have_cmd ip       || need+=(iproute2)
have_cmd iptables || need+=(iptables)
have_cmd iperf3   || need+=(iperf3)
have_cmd ping     || need+=(iputils-ping)
have_cmd cc       || need+=(gcc libc6-dev)
have_cmd make     || need+=(make)
python=${PYTHON:-python3}
"$python" -c 'import venv, ensurepip' 2>/dev/null || need+=(python3-venv)
"$python" - <<'PY' 2>/dev/null || need+=(python3-dev)
import os, sysconfig, sys
sys.exit(0 if os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")) else 1)
PY

# Packaging (make deb, make rpm, tests/packaging): build tools, lintian, rpmbuild, shellcheck,
# systemd-analyze, and the Debian packages of the runtime dependencies the .deb depends on.
have_pkg() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "ok installed"; }
if $packaging; then
    for pkg in debhelper dh-python pybuild-plugin-pyproject python3-all-dev python3-setuptools \
               python3-wheel python3-cffi python3-build python3-installer lintian rpm shellcheck \
               systemd python3-etcd python3-pyroute2 python3-werkzeug python3-requests \
               python3-configargparse; do
        have_pkg "$pkg" || need+=("$pkg")
    done
fi

if [ ${#need[@]} -eq 0 ]; then
    exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "missing Debian packages: ${need[*]} (run as root, or install them: apt-get install ${need[*]})" >&2
    exit 1
fi
echo "installing Debian packages: ${need[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -q >/dev/null
apt-get install -y -q --no-install-recommends "${need[@]}" >/dev/null
