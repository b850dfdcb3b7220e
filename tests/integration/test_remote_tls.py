"""HTTPS between RemoteManager and the server, with certificates made by trustme: the client
verifies the server (CA and IP SAN), the server demands client certificates from its CA, and a
client may only act for the PublicIP its certificate names. Bad files fail at start."""

import socket
import ssl

import pytest
import trustme

from flannel.errors import (
    LeaseError, LeaseTakenError, OptionsError, PermissionDenied, RegistryError, RemoteError,
)
from flannel.remote.client import RemoteManager
from flannel.remote.server import Server
from flannel.subnet.models import Lease
from tests.support.remote import CountingManager, attrs, local_manager, put_config, running_server

pytestmark = pytest.mark.needs_etcd


class Files:
    """PEM files of a CA, a server certificate for 127.0.0.1, client certificates whose IP SAN
    is a host's PublicIP, and the same from a second, untrusted CA."""

    def __init__(self, tmp):
        self.tmp = tmp
        ca, other = trustme.CA(), trustme.CA()
        self.ca = self._write("ca.pem", ca.cert_pem)
        self.other_ca = self._write("other-ca.pem", other.cert_pem)
        self.server = self._pair("server", ca.issue_cert("127.0.0.1"))
        self.wrong_name = self._pair("wrong-name", ca.issue_cert("flannel.example.org"))
        self.host1 = self._pair("host1", ca.issue_cert("192.168.77.1"))
        self.host2 = self._pair("host2", ca.issue_cert("192.168.77.2"))
        self.stranger = self._pair("stranger", other.issue_cert("192.168.77.1"))

    def _write(self, name, blob):
        path = self.tmp / name
        blob.write_to_path(str(path))
        return str(path)

    def _pair(self, name, cert):
        certfile = self.tmp / f"{name}.crt"
        for pem in cert.cert_chain_pems:
            pem.write_to_path(str(certfile), append=True)
        return str(certfile), self._write(f"{name}.key", cert.private_key_pem)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return Files(tmp_path_factory.mktemp("tls"))


@pytest.fixture
def manager(etcd, prefix):
    put_config(etcd, prefix)
    return local_manager(etcd, prefix)


def client_for(server, files, pair=None, cafile=None):
    certfile, keyfile = pair or (None, None)
    return RemoteManager(f"127.0.0.1:{server.port}", cafile=cafile or files.ca,
                         certfile=certfile, keyfile=keyfile)


def test_https_and_server_verification(manager, files):
    cert, key = files.server
    with running_server(manager, certfile=cert, keyfile=key) as srv:
        assert srv.url.startswith("https://")
        lease = client_for(srv, files).acquire_lease("", attrs(1))
        assert str(lease.attrs.public_ip) == "192.168.77.1"
        with pytest.raises(RemoteError, match="TLS"):
            client_for(srv, files, cafile=files.other_ca).get_network_config("")
        # plain HTTP to HTTPS: retried like an unreachable server, with a hint at the cause
        with pytest.raises(RegistryError, match="serves HTTPS, give --remote-cafile"):
            RemoteManager(f"127.0.0.1:{srv.port}").get_network_config("")


def test_server_name_is_checked(manager, files):
    cert, key = files.wrong_name
    with running_server(manager, certfile=cert, keyfile=key) as srv:
        with pytest.raises(RemoteError, match="127.0.0.1"):
            client_for(srv, files).get_network_config("")


def _handshake(srv, files, pair):
    """A raw TLS handshake plus one request; returns the answer's status line or raises."""
    ctx = ssl.create_default_context(cafile=files.ca)
    if pair:
        ctx.load_cert_chain(*pair)
    with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as raw:
        with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            tls.sendall(b"GET /v1/_/config HTTP/1.1\r\nHost: x\r\n\r\n")
            data = tls.recv(100)
            if not data:
                raise ConnectionResetError("closed without an answer")
            return data.split(b"\r\n", 1)[0]


def test_client_certificates_are_required_and_must_come_from_the_ca(manager, files):
    cert, key = files.server
    with running_server(manager, certfile=cert, keyfile=key, cafile=files.ca) as srv:
        assert _handshake(srv, files, files.host1) == b"HTTP/1.1 200 OK"
        for pair in (None, files.stranger):
            with pytest.raises((ssl.SSLError, ConnectionError)):
                _handshake(srv, files, pair)
            with pytest.raises((RemoteError, RegistryError)) as refused:
                client_for(srv, files, pair).get_network_config("")
            # a client that sent no certificate is told what the server may want
            hint = "give --remote-certfile and --remote-keyfile"
            assert (hint in str(refused.value)) is (pair is None)
        # the refused handshakes did not hurt the server
        assert client_for(srv, files, files.host1).get_network_config("").subnet_len == 24


def test_a_client_acts_only_for_its_own_public_ip(manager, files):
    cert, key = files.server
    with running_server(manager, certfile=cert, keyfile=key, cafile=files.ca) as srv:
        host1 = client_for(srv, files, files.host1)
        host2 = client_for(srv, files, files.host2)
        lease1 = host1.acquire_lease("", attrs(1))
        lease2 = host2.acquire_lease("", attrs(2))
        with pytest.raises(PermissionDenied, match="192.168.77.2"):
            host1.acquire_lease("", attrs(2))
        with pytest.raises(PermissionDenied, match="renew"):
            host1.renew_lease("", lease2)
        # claiming host2's subnet as its own: refused as any host is whose lease was taken
        # over (409, nothing written), not as if host1's certificate were wrong
        with pytest.raises(LeaseTakenError, match="held by 192.168.77.2, not by 192.168.77.1"):
            host1.renew_lease("", Lease(lease2.subnet, attrs(1), lease2.expiration))
        with pytest.raises(PermissionDenied, match="revoke"):
            host1.revoke_lease("", lease2.subnet)
        assert host2.renew_lease("", lease2).subnet == lease2.subnet
        assert host1.renew_lease("", lease1).subnet == lease1.subnet
        host1.revoke_lease("", lease1.subnet)
        # watching is open to every authenticated host
        assert [l.subnet for l in host1.watch_leases("", None, 5).snapshot] == [lease2.subnet]


class HandOverBeforeRevoke(CountingManager):
    """Another host takes the lease over between the server's holder check and its delete."""

    def __init__(self, inner, etcd, prefix):
        super().__init__(inner)
        self.etcd, self.prefix = etcd, prefix

    def revoke_lease(self, network, subnet, holder=None):
        key = f"{self.prefix}/subnets/{subnet.network_address}-{subnet.prefixlen}"
        self.etcd.client().write(key, '{"PublicIP":"192.168.77.2"}', ttl=600)
        return self.inner.revoke_lease(network, subnet, holder)


def test_a_revoke_racing_a_takeover_deletes_nothing(manager, files, etcd, prefix):
    cert, key = files.server
    racing = HandOverBeforeRevoke(manager, etcd, prefix)
    with running_server(racing, certfile=cert, keyfile=key, cafile=files.ca) as srv:
        host1 = client_for(srv, files, files.host1)
        lease1 = host1.acquire_lease("", attrs(1))
        with pytest.raises(LeaseError, match="held by 192.168.77.2"):
            host1.revoke_lease("", lease1.subnet)
        # host2's lease, written after host1's check, is still there
        snapshot = host1.watch_leases("", None, 5).snapshot
        assert [(l.subnet, str(l.attrs.public_ip)) for l in snapshot] == [(lease1.subnet, "192.168.77.2")]


def test_bad_files_fail_at_start_naming_the_file(manager, files, tmp_path):
    cert, key = files.server
    missing = str(tmp_path / "missing.pem")
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    cases = [
        (lambda: Server("127.0.0.1:0", manager, certfile=missing, keyfile=key), missing),
        (lambda: Server("127.0.0.1:0", manager, certfile=cert, keyfile=files.host1[1]), "does not match"),
        (lambda: Server("127.0.0.1:0", manager, certfile=cert, keyfile=key, cafile=str(garbage)), "garbage.pem"),
        (lambda: Server("127.0.0.1:0", manager, certfile=cert), "--remote-keyfile"),
        (lambda: Server("127.0.0.1:0", manager, cafile=files.ca), "--remote-certfile"),
        (lambda: RemoteManager("127.0.0.1:1", cafile=missing), missing),
        (lambda: RemoteManager("127.0.0.1:1", cafile=str(garbage)), "garbage.pem"),
        (lambda: RemoteManager("127.0.0.1:1", certfile=files.host1[0], keyfile=files.host2[1]), "does not match"),
        (lambda: RemoteManager("127.0.0.1:1", certfile=files.host1[0]), "--remote-keyfile"),
    ]
    for make, text in cases:
        with pytest.raises(OptionsError, match=text.replace(".", r"\.")):
            make()
