"""The error tree shared by every layer; a leaf module that imports nothing of flannel.

Errors are raised with a message that names what was wrong, and wrapped once at a
boundary as "failed to X: cause" (see `wrap`).
"""


class FlannelError(Exception):
    """Base of every error flanneld raises on purpose."""


class ConfigError(FlannelError):
    """A network config (etcd `config` key) or backend option is missing or invalid."""


class OptionsError(FlannelError):
    """A command-line flag, FLANNELD_* variable or options.env line is invalid."""


class LeaseError(FlannelError):
    """A lease could not be acquired or kept (out of subnets, taken by another host...)."""


class LeaseTakenError(LeaseError):
    """Our lease was lost and another host now holds the subnet: the daemon must exit."""


class RegistryError(FlannelError):
    """The lease store (etcd, or the remote server) failed or is unreachable; retryable."""


class NotFoundError(FlannelError):
    """A network, lease or reservation does not exist."""


class BackendError(FlannelError):
    """A data-path backend could not set up or change the kernel state it needs."""


class RemoteError(FlannelError):
    """The client/server protocol was violated or a request was refused."""


class PermissionDenied(RemoteError):
    """An authenticated client asked to change a lease that is not its own."""


def wrap(action: str, exc: BaseException, kind: type = FlannelError) -> FlannelError:
    """Return `kind("failed to <action>: <exc>")`, chaining `exc`, for a boundary to raise."""
    err = kind(f"failed to {action}: {exc}")
    err.__cause__ = exc
    return err
