"""Client/server mode end to end: host h1 runs `flanneld --listen` (the only etcd client), h2
and h3 run `flanneld --remote` with the udp backend and exchange traffic; the server restarts
and the clients carry on with their leases; h4 joins afterwards and everyone reaches it.
"""

from __future__ import annotations

import ipaddress

import pytest

from tests.support.netns import Cluster, Host, wait_for

pytestmark = [pytest.mark.needs_root, pytest.mark.needs_etcd]

PORT = 8888


def flannel0_addr(host: Host) -> str:
    return str(ipaddress.ip_interface(host.read_subnet_env()["FLANNEL_SUBNET"]).network.network_address)


def start_server(server: Host) -> None:
    proc = server.start_flanneld(f"--listen=0.0.0.0:{PORT}")

    def listening():
        if not proc.alive:
            raise AssertionError(f"server exited with {proc.popen.returncode}:\n{proc.tail()}")
        return f":{PORT}" in server.exec("ss", "-Hltn", f"sport = :{PORT}").stdout

    wait_for(listening, 30, f"the server on {server.name}:{PORT} to listen")


def start_client(client: Host, server: Host, newer_than=None) -> dict:
    client.start_flanneld(f"--remote={server.ip}:{PORT}", etcd=False)
    return client.wait_subnet_env(timeout=60, newer_than=newer_than)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with Cluster(tmp_path_factory.mktemp("e2e-remote"), hosts=4, tag="r") as c:
        c.set_network_config("udp")
        server, a, b, _late = c.hosts
        start_server(server)
        start_client(a, server)
        start_client(b, server)
        yield c


def test_clients_get_leases_through_the_server(cluster):
    server, a, b, _late = cluster.hosts
    subnets = {h.name: h.lease_subnet() for h in (a, b)}
    assert subnets["h2"] != subnets["h3"]
    leases = cluster.leases()
    assert leases[subnets["h2"]]["PublicIP"] == a.ip
    assert leases[subnets["h3"]]["PublicIP"] == b.ip
    # the server joins no network: no lease, no subnet file, no device
    assert all(lease["PublicIP"] != server.ip for lease in leases.values()), leases
    assert not server.subnet_file.exists()
    assert server.exec("ip", "link", "show", "flannel0").returncode != 0


def test_clients_exchange_traffic(cluster):
    _server, a, b, _late = cluster.hosts
    out = a.wait_ping(flannel0_addr(b)).stdout
    assert "ttl=62" in out, out
    b.wait_ping(flannel0_addr(a))
    proc = b.iperf3_server(flannel0_addr(b))
    result = a.iperf3_client(flannel0_addr(b), seconds=2, bind=flannel0_addr(a))
    assert result["end"]["sum_received"]["bytes"] > 1_000_000
    proc.popen.wait(10)


def test_server_restart_clients_recover(cluster):
    server, a, b, late = cluster.hosts
    before = {h.name: (h.lease_subnet(), h.read_subnet_env()) for h in (a, b)}
    assert server.stop_flanneld() == 0, server.log_tail()
    # the data path does not need the server
    a.wait_ping(flannel0_addr(b))
    start_server(server)

    # a client restarted now gets its lease back through the new server
    stamp = b.subnet_stamp()
    assert b.stop_flanneld() == 0, b.log_tail()
    start_client(b, server, newer_than=stamp)
    # a host joining after the restart is learned by the clients that kept running
    start_client(late, server)
    for h in (a, b):
        assert (h.lease_subnet(), h.read_subnet_env()) == before[h.name]
        assert h.flanneld.alive, h.log_tail()
    for x, y in ((a, late), (late, a), (b, late), (a, b), (b, a)):
        x.wait_ping(flannel0_addr(y), timeout=60)
    leases = cluster.leases()
    assert {leases[before[h.name][0]]["PublicIP"] for h in (a, b)} == {a.ip, b.ip}
    assert leases[late.lease_subnet()]["PublicIP"] == late.ip
