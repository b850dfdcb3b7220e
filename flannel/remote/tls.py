"""TLS for the client/server mode: checked loading of the certificate files on both sides and
the identity (IP SANs) of a client certificate.

Every file problem is found at start and named (flag and path), rather than surfacing as a
handshake failure on the first request.
"""

from __future__ import annotations

import os
import ssl
from ipaddress import IPv4Address, ip_address
from typing import FrozenSet, Optional

from flannel.errors import OptionsError


def check_file(path: str, flag: str) -> str:
    """`path` must be a readable regular file; OptionsError naming `flag` and `path` if not."""
    if not os.path.exists(path):
        raise OptionsError(f"{flag} {path}: no such file")
    if not os.path.isfile(path):
        raise OptionsError(f"{flag} {path}: not a regular file")
    if not os.access(path, os.R_OK):
        raise OptionsError(f"{flag} {path}: not readable by this process")
    return path


def _load_chain(ctx: ssl.SSLContext, certfile: str, keyfile: str) -> None:
    check_file(certfile, "--remote-certfile")
    check_file(keyfile, "--remote-keyfile")
    try:
        ctx.load_cert_chain(certfile, keyfile)
    except ssl.SSLError as exc:
        why = "the key does not match the certificate" if "KEY_VALUES_MISMATCH" in str(exc) else exc
        raise OptionsError(
            f"--remote-certfile {certfile} / --remote-keyfile {keyfile}: cannot load: {why}"
        ) from None


def _load_ca(ctx: ssl.SSLContext, cafile: str) -> None:
    check_file(cafile, "--remote-cafile")
    try:
        ctx.load_verify_locations(cafile=cafile)
    except (ssl.SSLError, ValueError) as exc:
        raise OptionsError(f"--remote-cafile {cafile}: not a PEM CA certificate: {exc}") from None


def _require_pair(certfile: Optional[str], keyfile: Optional[str]) -> None:
    if bool(certfile) != bool(keyfile):
        given, missing = (
            ("--remote-certfile", "--remote-keyfile") if certfile else ("--remote-keyfile", "--remote-certfile")
        )
        raise OptionsError(f"{given} needs {missing} as well")


def server_context(
    certfile: Optional[str], keyfile: Optional[str], cafile: Optional[str]
) -> Optional[ssl.SSLContext]:
    """None for plain HTTP; else a server context, demanding a client certificate signed by
    `cafile` when one is given."""
    _require_pair(certfile, keyfile)
    if not certfile:
        if cafile:
            raise OptionsError(
                "--remote-cafile on the server needs --remote-certfile and --remote-keyfile "
                "(client certificates are only checked over HTTPS)"
            )
        return None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    _load_chain(ctx, certfile, keyfile)
    if cafile:
        _load_ca(ctx, cafile)
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def check_client_files(
    cafile: Optional[str], certfile: Optional[str], keyfile: Optional[str]
) -> None:
    """Load the client's files once into a throw-away context, so that a missing, unreadable
    or mismatched file is an error at start rather than at the first request."""
    _require_pair(certfile, keyfile)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if cafile:
        _load_ca(ctx, cafile)
    if certfile:
        _load_chain(ctx, certfile, keyfile)


def peer_ips(sock) -> Optional[FrozenSet[IPv4Address]]:
    """The IPv4 SANs of the client certificate on `sock`; None when the connection carries
    no verified client certificate (plain HTTP, or HTTPS without --remote-cafile)."""
    getpeercert = getattr(sock, "getpeercert", None)
    if getpeercert is None:
        return None
    try:
        cert = getpeercert()
    except ValueError:  # handshake not done
        return None
    if not cert:
        return None
    ips = set()
    for kind, value in cert.get("subjectAltName", ()):
        if kind == "IP Address":
            try:
                addr = ip_address(value.strip())
            except ValueError:
                continue
            if isinstance(addr, IPv4Address):
                ips.add(addr)
    return frozenset(ips)
