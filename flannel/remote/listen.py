"""The forms of --listen, read as Go's server reads them; no more than parsing, so that the
options module can check a value without loading the server (werkzeug)."""

from __future__ import annotations

LISTEN_FORMS = "HOST:PORT, tcp://HOST:PORT, fd:// or fd://N"


def listen_address(listen: str):
    """--listen as Go's server reads it: an optional scheme before the address, none or tcp://
    for TCP, fd:// for a socket passed by systemd. ("tcp", (host, port)) or ("fd", N or None);
    ValueError naming the value for anything else."""
    scheme, sep, rest = listen.partition("://")
    if not sep:
        scheme, rest = "tcp", listen
    if scheme == "fd":
        if rest and not rest.isdigit():
            raise ValueError(f"expected fd:// or fd://N with a descriptor number, got {listen!r}")
        return "fd", int(rest) if rest else None
    if scheme != "tcp":
        raise ValueError(f"bad listener scheme {scheme}:// in {listen!r}: expected {LISTEN_FORMS}")
    host, sep, port = rest.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"expected {LISTEN_FORMS}, got {listen!r}")
    return "tcp", (host.strip("[]") or "0.0.0.0", int(port))
