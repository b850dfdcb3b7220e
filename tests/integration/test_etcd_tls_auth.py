"""EtcdRegistry against etcd with TLS (client certificates), with v2 basic auth, and with a
dead first endpoint (failover)."""

import json
import logging
import re
from ipaddress import IPv4Address

import pytest

from flannel.errors import ConfigError, RegistryError
from flannel.subnet.etcd_registry import EtcdRegistry
from flannel.subnet.local_manager import LocalManager
from flannel.subnet.models import LeaseAttrs
from tests.support.etcd import EtcdServer, etcd_available, free_port

pytestmark = pytest.mark.needs_etcd

PASSWORD = "s3cret-Pa55word"
CONFIG = json.dumps({"Network": "10.10.0.0/16"})


def _require_etcd():
    if not etcd_available():
        pytest.skip("needs the etcd binary /usr/bin/etcd (Debian package etcd-server)")


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    trustme = pytest.importorskip("trustme")
    d = tmp_path_factory.mktemp("pki")
    ca, other_ca = trustme.CA(), trustme.CA()
    files = {}
    for name, blob in [
        ("ca", ca.cert_pem),
        ("other_ca", other_ca.cert_pem),
    ]:
        files[name] = str(d / f"{name}.pem")
        blob.write_to_path(files[name])
    for name, issuer, ident in [("server", ca, "127.0.0.1"), ("client", ca, "flanneld"),
                                ("stranger", other_ca, "flanneld")]:
        leaf = issuer.issue_cert(ident)
        files[name + "_cert"] = str(d / f"{name}.crt")
        files[name + "_key"] = str(d / f"{name}.key")
        leaf.cert_chain_pems[0].write_to_path(files[name + "_cert"])
        leaf.private_key_pem.write_to_path(files[name + "_key"])
    return files


@pytest.fixture(scope="module")
def tls_etcd(tmp_path_factory, pki):
    _require_etcd()
    tls = {"cert": pki["server_cert"], "key": pki["server_key"], "ca": pki["ca"], "client_cert_auth": True,
           "client_cert": pki["client_cert"], "client_key": pki["client_key"]}
    server = EtcdServer(tmp_path_factory.mktemp("etcd-tls"), tls=tls).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def auth_etcd(tmp_path_factory):
    _require_etcd()
    server = EtcdServer(tmp_path_factory.mktemp("etcd-auth")).start()
    try:
        server.enable_v2_auth(PASSWORD)
        yield server
    finally:
        server.stop()


def acquire(registry):
    return LocalManager(registry).acquire_lease("", LeaseAttrs(IPv4Address("192.168.77.1")))


def test_tls_with_client_certificate(tls_etcd, pki, prefix):
    tls_etcd.client().write(prefix + "/config", CONFIG)
    registry = EtcdRegistry([tls_etcd.endpoint], prefix, cafile=pki["ca"],
                            certfile=pki["client_cert"], keyfile=pki["client_key"])
    lease = acquire(registry)
    assert registry.get_subnet("", lease.subnet).lease.attrs.public_ip == IPv4Address("192.168.77.1")


@pytest.mark.parametrize("case", ["no client certificate", "certificate from another CA", "server not trusted"])
def test_tls_refusals_are_registry_errors(tls_etcd, pki, prefix, case):
    tls_etcd.client().write(prefix + "/config", CONFIG)
    kwargs = {
        "no client certificate": dict(cafile=pki["ca"]),
        "certificate from another CA": dict(cafile=pki["ca"], certfile=pki["stranger_cert"],
                                            keyfile=pki["stranger_key"]),
        "server not trusted": dict(cafile=pki["other_ca"], certfile=pki["client_cert"],
                                   keyfile=pki["client_key"]),
    }[case]
    with pytest.raises(RegistryError, match="failed to read network config"):
        acquire(EtcdRegistry([tls_etcd.endpoint], prefix, **kwargs))


def test_basic_auth_good_credentials(auth_etcd, prefix, caplog):
    caplog.set_level(logging.DEBUG)
    auth_etcd.client(username="root", password=PASSWORD).write(prefix + "/config", CONFIG)
    registry = EtcdRegistry([auth_etcd.endpoint], prefix, username="root", password=PASSWORD)
    lease = acquire(registry)
    assert lease.subnet.prefixlen == 24
    assert PASSWORD not in caplog.text and PASSWORD not in repr(registry)


@pytest.mark.parametrize("username,password", [("root", "wrong"), (None, None)])
def test_basic_auth_bad_or_missing_credentials(auth_etcd, prefix, caplog, username, password):
    caplog.set_level(logging.DEBUG)
    registry = EtcdRegistry([auth_etcd.endpoint], prefix, username=username, password=password)
    with pytest.raises(RegistryError, match="etcd refused the request") as info:
        acquire(registry)
    assert PASSWORD not in str(info.value) and "wrong" not in caplog.text


def test_failover_to_the_second_endpoint(etcd, prefix):
    etcd.client().write(prefix + "/config", CONFIG)
    dead = f"http://127.0.0.1:{free_port()}"
    registry = EtcdRegistry([dead, etcd.endpoint], prefix)
    lease = acquire(registry)
    assert registry.get_subnet("", lease.subnet).lease.subnet == lease.subnet
    # the working endpoint stays current
    assert registry.get_subnets("")[0][0].lease.subnet == lease.subnet


def test_all_endpoints_dead(prefix):
    endpoints = [f"http://127.0.0.1:{free_port()}", f"http://127.0.0.1:{free_port()}"]
    with pytest.raises(RegistryError, match="cannot reach etcd at " + endpoints[0]):
        acquire(EtcdRegistry(endpoints, prefix))


@pytest.mark.parametrize("endpoints,message", [
    ([], "at least one endpoint"),
    (["127.0.0.1:2379"], "is not an http(s)://host:port URL"),
    (["http://127.0.0.1:notaport"], "has an invalid port"),
])
def test_bad_endpoints_are_config_errors(endpoints, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        EtcdRegistry(endpoints)


def test_endpoints_may_be_one_comma_separated_string(etcd, prefix):
    etcd.client().write(prefix + "/config", CONFIG)
    registry = EtcdRegistry(f"http://127.0.0.1:{free_port()},{etcd.endpoint}", prefix)
    assert registry.endpoints[1] == etcd.endpoint
    assert registry.get_network_config("").subnet_len == 24
    registry.close()
