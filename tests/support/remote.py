"""Test helpers for the client/server mode: a real API server in this process in front of a
LocalManager on a real etcd, and a SubnetManager wrapper that counts upstream watches."""

from __future__ import annotations

import contextlib
import json
import threading
from ipaddress import IPv4Address

from flannel.remote.server import Server
from flannel.subnet.etcd_registry import EtcdRegistry
from flannel.subnet.local_manager import LocalManager
from flannel.subnet.manager import SubnetManager
from flannel.subnet.models import LeaseAttrs

CONFIG = {"Network": "10.10.0.0/16"}


def put_config(etcd, prefix: str, doc=CONFIG, network: str = "") -> None:
    key = f"{prefix}/{network}/config" if network else f"{prefix}/config"
    etcd.client().write(key, json.dumps(doc))


def attrs(n: int, backend: str = "") -> LeaseAttrs:
    return LeaseAttrs(IPv4Address(f"192.168.77.{n}"), backend)


def local_manager(etcd, prefix: str) -> LocalManager:
    return LocalManager(EtcdRegistry([etcd.endpoint], prefix))


@contextlib.contextmanager
def running_server(manager: SubnetManager, listen: str = "127.0.0.1:0", **kwargs):
    """A started Server; stopped (polls ended, connections closed) on exit."""
    server = Server(listen, manager, **kwargs).start()
    try:
        yield server
    finally:
        server.stop()


class CountingManager(SubnetManager):
    """Delegates to `inner`, counting watch_leases calls in total and at once."""

    def __init__(self, inner: SubnetManager):
        self.inner = inner
        self.lock = threading.Lock()
        self.total = 0
        self.current = 0
        self.peak = 0

    def watch_leases(self, network, cursor, timeout):
        with self.lock:
            self.total += 1
            self.current += 1
            self.peak = max(self.peak, self.current)
        try:
            return self.inner.watch_leases(network, cursor, timeout)
        finally:
            with self.lock:
                self.current -= 1

    def get_network_config(self, network):
        return self.inner.get_network_config(network)

    def acquire_lease(self, network, attrs, prefer=None):
        return self.inner.acquire_lease(network, attrs, prefer)

    def renew_lease(self, network, lease):
        return self.inner.renew_lease(network, lease)

    def revoke_lease(self, network, subnet, holder=None):
        return self.inner.revoke_lease(network, subnet, holder)

    def watch_lease(self, network, subnet, cursor, timeout):
        return self.inner.watch_lease(network, subnet, cursor, timeout)

    def watch_networks(self, cursor, timeout):
        return self.inner.watch_networks(cursor, timeout)

    def add_reservation(self, network, reservation):
        return self.inner.add_reservation(network, reservation)

    def remove_reservation(self, network, subnet, holder=None):
        return self.inner.remove_reservation(network, subnet, holder)

    def list_reservations(self, network):
        return self.inner.list_reservations(network)
