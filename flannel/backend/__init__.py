"""Data-path backends behind a small registry: `create_backend(type, ext_iface, config)`.

Backend modules are imported only when a network config asks for them, so that importing
this package pulls in neither cffi (udp) nor pyroute2 (vxlan, host-gw).
"""

from __future__ import annotations

import importlib

from flannel.errors import BackendError, ConfigError

# Backend.Type -> (module, class); its keys equal flannel.subnet.config.BACKEND_TYPES
REGISTRY = {
    "udp": ("flannel.backend.udp", "UdpBackend"),
    "vxlan": ("flannel.backend.vxlan", "VxlanBackend"),
    "host-gw": ("flannel.backend.hostgw", "HostGwBackend"),
    "alloc": ("flannel.backend.alloc", "AllocBackend"),
}


def backend_class(type_name: str) -> type:
    """The Backend subclass for `type_name`; ConfigError for an unknown type."""
    try:
        module_name, class_name = REGISTRY[type_name]
    except KeyError:
        raise ConfigError(
            f"Backend Type {type_name!r} is unknown: expected one of {', '.join(REGISTRY)}"
        ) from None
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise BackendError(f"backend {type_name} is not available: {exc}") from exc
    return getattr(module, class_name)


def create_backend(type_name, ext_iface, config):
    """A new, not yet started backend of `type_name` for `config` on `ext_iface`.
    Raises ConfigError for bad Backend options, BackendError when it cannot be loaded."""
    return backend_class(type_name)(ext_iface, config)
