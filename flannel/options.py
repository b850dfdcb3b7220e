"""Every flag of flanneld in one declarative table, read from the command line, FLANNELD_*
environment variables and an options.env file (precedence in that order, then the default).

Go flanneld's flag syntax is accepted as well as GNU style: `-etcd-endpoints=URL`,
`--etcd-endpoints URL`, `-ip-masq`, `--ip-masq=false`. configargparse does the layering; this
module adds what it cannot do: Go's single-dash long flags, the `FLANNELD_X=value` file format,
and errors that name the offending key and where it came from (raised as OptionsError; the
caller exits with status 2).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from dataclasses import dataclass
from ipaddress import IPv4Address
from typing import Any, Callable, Mapping, Optional, Sequence
from urllib.parse import urlsplit

import configargparse

from flannel import __version__
from flannel.errors import OptionsError
from flannel.remote.listen import listen_address
from flannel.subnet.keys import is_valid_network_name

ENV_PREFIX = "FLANNELD_"
DEFAULT_CONFIG_FILE = "/etc/flannel/options.env"
CONFIG_FILE_ENV = "FLANNELD_CONFIG_FILE"
MIN_RENEW_MARGIN, MAX_RENEW_MARGIN = 1, 24 * 60 - 1


# ---------------------------------------------------------------------------
# value parsers: each raises ValueError with a message saying what is expected


def parse_bool(text: str) -> bool:
    """Go's strconv.ParseBool, plus yes/no/on/off."""
    value = str(text).strip()
    if value in ("1", "t", "T", "true", "TRUE", "True", "yes", "on"):
        return True
    if value in ("0", "f", "F", "false", "FALSE", "False", "no", "off"):
        return False
    raise ValueError(f"expected true or false, got {text!r}")


def parse_margin(text: str) -> int:
    try:
        minutes = int(str(text).strip())
    except ValueError:
        raise ValueError(f"expected a whole number of minutes, got {text!r}") from None
    if not MIN_RENEW_MARGIN <= minutes <= MAX_RENEW_MARGIN:
        raise ValueError(
            f"must be from {MIN_RENEW_MARGIN} to {MAX_RENEW_MARGIN} minutes (less than the "
            f"24 h lease TTL), got {minutes}"
        )
    return minutes


def parse_endpoints(text: str) -> list:
    urls = [u.strip() for u in str(text).split(",") if u.strip()]
    if not urls:
        raise ValueError("expected at least one URL like http://127.0.0.1:2379")
    for url in urls:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"{url!r} is not an http:// or https:// URL with a host")
        try:
            parts.port
        except ValueError:
            raise ValueError(f"{url!r} has an invalid port") from None
    return urls


def parse_networks(text: str) -> list:
    names = [n.strip() for n in str(text).split(",") if n.strip()]
    for name in names:
        if not is_valid_network_name(name):
            raise ValueError(f"{name!r} is not a valid network name (letters, digits, . _ -)")
    return names


def parse_ipv4(text: str) -> str:
    try:
        return str(IPv4Address(str(text).strip()))
    except ValueError:
        raise ValueError(f"expected an IPv4 address, got {text!r}") from None


def parse_hostport(text: str) -> str:
    host, sep, port = str(text).rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"expected HOST:PORT (e.g. 10.0.0.3:8888), got {text!r}")
    return str(text)


def parse_listen(text: str) -> str:
    listen_address(str(text))  # the server's own reading: what passes here also binds there
    return str(text)


def parse_file(text: str) -> str:
    path = str(text)
    if not os.path.isfile(path) or not os.access(path, os.R_OK):
        raise ValueError(f"{path!r} is not a readable file")
    return path


def parse_verbosity(text: str) -> int:
    """`-v` (1), `-vv` (2), `-v=3`, `--verbose=3`: Go's glog level."""
    value = str(text).strip()
    if value and set(value) == {"v"}:
        return len(value) + 1
    if value.isdigit():
        return int(value)
    raise ValueError(f"expected a log level number, got {text!r}")


# ---------------------------------------------------------------------------
# the table


@dataclass(frozen=True)
class Flag:
    name: str  # long name without dashes, as Go spells it
    help: str
    default: Any = None
    parse: Optional[Callable[[str], Any]] = None  # None: a plain string
    boolean: bool = False
    metavar: Optional[str] = None
    short: Optional[str] = None


_TLS = "TLS; with the other two"
FLAGS: tuple = (
    Flag("etcd-endpoints", "comma-separated list of etcd endpoints; tried in turn, failing over "
         "when one is unreachable", "http://127.0.0.1:4001,http://127.0.0.1:2379",
         parse_endpoints, metavar="URLS"),
    Flag("etcd-prefix", "etcd key prefix under which the network config (<prefix>/config) and "
         "subnet leases (<prefix>/subnets/) live", "/coreos.com/network", metavar="PATH"),
    Flag("etcd-keyfile", f"private key file of the etcd client certificate ({_TLS})", None,
         parse_file, metavar="FILE"),
    Flag("etcd-certfile", f"etcd client certificate file ({_TLS})", None, parse_file, metavar="FILE"),
    Flag("etcd-cafile", "CA certificate file that etcd's server certificate is verified against",
         None, parse_file, metavar="FILE"),
    Flag("etcd-username", "user name for etcd basic authentication", None, metavar="NAME"),
    Flag("etcd-password", "password for etcd basic authentication (never logged)", None,
         metavar="PASSWORD"),
    Flag("listen", "run as the client/server mode's server on this address (HOST:PORT, :PORT, "
         "tcp://HOST:PORT, fd:// for the first socket passed by systemd, fd://N for descriptor "
         "N); the server is the only etcd client and joins no network itself", None,
         parse_listen, metavar="ADDR"),
    Flag("remote", "run as a client of the flanneld server at HOST:PORT instead of talking to etcd",
         None, parse_hostport, metavar="HOST:PORT"),
    Flag("remote-keyfile", "private key of the client certificate presented to the server "
         "(client) or of the server certificate (server)", None, parse_file, metavar="FILE"),
    Flag("remote-certfile", "client certificate presented to the server (client), or the "
         "server's certificate, which turns on HTTPS (server)", None, parse_file, metavar="FILE"),
    Flag("remote-cafile", "CA certificate that verifies the server (client), or that client "
         "certificates must be signed by, making them mandatory (server)", None, parse_file,
         metavar="FILE"),
    Flag("public-ip", "IPv4 address other hosts reach this host at (default: the address of "
         "the external interface); published in the lease", None, parse_ipv4, metavar="IP"),
    Flag("iface", "external interface (name or IPv4 address) that carries traffic between "
         "hosts (default: the interface of the default route)", None, metavar="IFACE"),
    Flag("subnet-file", "file that the lease's FLANNEL_NETWORK, FLANNEL_SUBNET, FLANNEL_MTU and "
         "FLANNEL_IPMASQ are written to (single-network mode)", "/run/flannel/subnet.env",
         metavar="FILE"),
    Flag("subnet-dir", "directory of the <network>.env files written in multi-network mode",
         "/run/flannel/networks", metavar="DIR"),
    Flag("networks", "multi-network mode: serve these networks (comma-separated names, each "
         "configured at <prefix>/<name>/config)", "", parse_networks, metavar="NAMES"),
    Flag("watch-networks", "multi-network mode: follow networks as they appear and disappear "
         "under the prefix (all of them, or those of --networks)", False, parse_bool, True),
    Flag("subnet-lease-renew-margin", "renew the 24 h subnet lease this many minutes before it "
         f"expires ({MIN_RENEW_MARGIN} to {MAX_RENEW_MARGIN})", 60, parse_margin, metavar="MINUTES"),
    Flag("ip-masq", "masquerade (iptables nat POSTROUTING) traffic leaving the overlay network; "
         "overlay-to-overlay traffic is left alone", False, parse_bool, True),
    Flag("kube-subnet-mgr", "use the Kubernetes API instead of etcd for subnets (not supported "
         "by this implementation: refused)", False, parse_bool, True),
    Flag("verbose", "log level: 0 logs info and above, 1 or more (-v, -vv, -v=2) adds debug, "
         "5 or more also the libraries' debug (pyroute2, urllib3, werkzeug)",
         0, parse_verbosity, metavar="LEVEL", short="v"),
    # Go's glog flags, accepted so that existing unit files keep working; logs go to stderr
    Flag("logtostderr", "accepted for compatibility with Go flanneld (logs always go to stderr)",
         False, parse_bool, True),
    Flag("alsologtostderr", "accepted for compatibility with Go flanneld; ignored", False,
         parse_bool, True),
    Flag("log_dir", "accepted for compatibility with Go flanneld; ignored", None, metavar="DIR"),
    Flag("stderrthreshold", "accepted for compatibility with Go flanneld; ignored", None,
         metavar="LEVEL"),
    Flag("vmodule", "accepted for compatibility with Go flanneld; ignored", None, metavar="SPEC"),
    Flag("log_backtrace_at", "accepted for compatibility with Go flanneld; ignored", None,
         metavar="FILE:N"),
)
_BY_NAME = {f.name: f for f in FLAGS}
_BY_ENV = {ENV_PREFIX + f.name.upper().replace("-", "_"): f for f in FLAGS}

DESCRIPTION = """\
flanneld gives this host a subnet of an overlay network: it reads the network config from
etcd (or from a flanneld server with --remote), acquires a subnet lease, renews it, follows
the other hosts' leases, programs the data path of the configured backend (udp, vxlan,
host-gw, alloc) and writes the lease to the subnet file for docker and friends. With
--listen it is instead the client/server mode's server."""

EPILOG = f"""\
Every flag can also be set as an environment variable FLANNELD_<NAME> (upper case, '-' -> '_',
e.g. FLANNELD_ETCD_ENDPOINTS) or as a FLANNELD_<NAME>=value line of the options file
({DEFAULT_CONFIG_FILE}, or --config-file). The command line wins over the environment, which
wins over the file. Go flanneld's syntax works too: -etcd-endpoints=URL, -ip-masq,
--ip-masq=false.

Exit status: 0 after a clean stop (SIGTERM, SIGINT), 2 for invalid options, 1 for a fatal
error (e.g. the lease was lost and another host now holds the subnet)."""


class _Parser(configargparse.ArgParser):
    """Raises instead of printing and exiting, so that main() decides the exit status."""

    def error(self, message):
        raise OptionsError(f"command line: {message}")


class EnvFileParser(configargparse.ConfigFileParser):
    """options.env: `FLANNELD_NAME=value` lines, `#` comments, blank lines, optional quotes
    and `export `. Unknown keys and bad values are errors naming the file and line."""

    def get_syntax_description(self):
        return "FLANNELD_<NAME>=value lines; # comments"

    def parse(self, stream):
        source = getattr(stream, "name", "options file")
        items: dict = {}
        for number, raw in enumerate(stream, 1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            where = f"{source}:{number}"
            if line.startswith("export "):
                line = line[len("export "):].lstrip()
            key, sep, value = line.partition("=")
            key, value = key.strip(), _unquote(value.strip())
            if not sep:
                raise OptionsError(f"{where}: expected FLANNELD_<NAME>=value, got {raw.strip()!r}")
            flag = _BY_ENV.get(key)
            if flag is None:
                raise OptionsError(f"{where}: unknown key {key} (not a flanneld option)")
            _check(flag, value, f"{key} in {where}")
            items[flag.name] = value
        return items


def _unquote(value: str) -> str:
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
        return value[1:-1]
    return value


def _check(flag: Flag, value: str, source: str) -> None:
    if flag.parse is None or (flag.boolean and value == ""):
        return
    try:
        flag.parse(value)
    except ValueError as exc:
        raise OptionsError(f"{source}: invalid value for --{flag.name}: {exc}") from None


def _argparse_type(flag: Flag) -> Callable[[str], Any]:
    def convert(text: str) -> Any:
        try:
            return flag.parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    convert.__name__ = flag.name  # argparse names the type in some messages
    return convert


def build_parser(config_files: Sequence[str]) -> configargparse.ArgParser:
    parser = _Parser(
        prog="flanneld",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        default_config_files=list(config_files),
        config_file_parser_class=EnvFileParser,
        auto_env_var_prefix=ENV_PREFIX,
        add_help=False,
        allow_abbrev=False,
    )
    for flag in FLAGS:
        # Go's flag package takes --v=2 as readily as -v=2
        names = [f"--{flag.name}"] + ([f"-{flag.short}", f"--{flag.short}"] if flag.short else [])
        shown = flag.default if flag.default not in (None, "", False, 0) else None
        text = flag.help + (f" (default {shown})" if shown is not None else "")
        kwargs: dict = {"help": text, "default": flag.default}
        if flag.parse is not None:
            kwargs["type"] = _argparse_type(flag)
        if flag.boolean:
            kwargs.update(nargs="?", const=True, metavar="BOOL")
        elif flag.short:
            kwargs.update(nargs="?", const=1, metavar=flag.metavar)
        else:
            kwargs["metavar"] = flag.metavar
        parser.add_argument(*names, **kwargs)
    parser.add_argument(
        "--config-file", metavar="FILE", default=None,
        help=f"options file of FLANNELD_<NAME>=value lines (default {DEFAULT_CONFIG_FILE}, "
        f"which may be absent; a file named here or in {CONFIG_FILE_ENV} must exist; "
        "/dev/null reads none)",
    )
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    parser.add_argument("-h", "--help", action="store_true", help="print this help and exit")
    return parser


def go_to_gnu(argv: Sequence[str]) -> list:
    """`-etcd-endpoints=URL` -> `--etcd-endpoints=URL` for every known long flag."""
    long_names = set(_BY_NAME) | {"config-file", "version", "help"}
    out = []
    for i, arg in enumerate(argv):
        if arg == "--":
            return out + list(argv[i:])
        if arg.startswith("-") and not arg.startswith("--") and arg[1:].split("=", 1)[0] in long_names:
            arg = "-" + arg
        out.append(arg)
    return out


def _config_files(argv: list, env: Mapping[str, str], default: str) -> list:
    """The options file to read: the one named by --config-file, else by
    FLANNELD_CONFIG_FILE (either must be readable; /dev/null says "none"), else the default
    (which may be absent)."""
    explicit, source = None, None
    for i, arg in enumerate(argv):
        if arg == "--":
            break
        if arg.startswith("--config-file="):
            explicit, source = arg.split("=", 1)[1], "command line: --config-file"
        elif arg == "--config-file" and i + 1 < len(argv):
            explicit, source = argv[i + 1], "command line: --config-file"
    if explicit is None and env.get(CONFIG_FILE_ENV):
        explicit, source = env[CONFIG_FILE_ENV], f"environment variable {CONFIG_FILE_ENV}:"
    if explicit is None:
        return [default]
    if os.path.isdir(explicit):
        raise OptionsError(f"{source} {explicit}: is a directory, not an options file")
    try:
        with open(explicit, "rb"):
            pass
    except OSError as exc:
        raise OptionsError(f"{source} {explicit}: {exc.strerror.lower()}") from None
    return [explicit]


def _unknown_env(env: Mapping[str, str]) -> list:
    """FLANNELD_* variables that name no option: ignored (as Go does), but worth a warning."""
    known = set(_BY_ENV) | {CONFIG_FILE_ENV}
    return [
        f"environment variable {key} is not a flanneld option; ignored"
        for key in sorted(env) if key.startswith(ENV_PREFIX) and key not in known
    ]


def _check_env(env: Mapping[str, str]) -> None:
    for key, flag in _BY_ENV.items():
        if key in env:
            _check(flag, env[key], f"environment variable {key}")


def _check_combinations(opts: argparse.Namespace) -> None:
    if opts.kube_subnet_mgr:
        raise OptionsError("--kube-subnet-mgr is not supported by this flanneld (use etcd)")
    if opts.listen and opts.remote:
        raise OptionsError(
            "--listen and --remote cannot be combined: a server does not join a network; "
            "run two instances if this host needs both"
        )
    for side in ("etcd", "remote"):
        key, cert = getattr(opts, f"{side}_keyfile"), getattr(opts, f"{side}_certfile")
        if bool(key) != bool(cert):
            raise OptionsError(f"--{side}-keyfile and --{side}-certfile must be given together")


def parse_options(
    argv: Optional[Sequence[str]] = None,
    env: Optional[Mapping[str, str]] = None,
    default_config_file: str = DEFAULT_CONFIG_FILE,
) -> argparse.Namespace:
    """Parse flags; raises OptionsError naming the key and its source. `--help` and
    `--version` come back as `opts.help` / `opts.version` for the caller to act on."""
    argv = go_to_gnu(sys.argv[1:] if argv is None else argv)
    env = os.environ if env is None else env
    _check_env(env)
    parser = build_parser(_config_files(argv, env, default_config_file))
    try:
        opts = parser.parse_args(argv, env_vars=env)
    except configargparse.ConfigFileParserException as exc:
        raise OptionsError(str(exc)) from None
    if opts.help or opts.version:
        return opts
    for name in ("watch_networks", "ip_masq", "kube_subnet_mgr", "logtostderr", "alsologtostderr"):
        setattr(opts, name, bool(getattr(opts, name)))
    _check_combinations(opts)
    opts.warnings = _unknown_env(env)  # logged by the caller once logging is set up
    return opts


def help_text() -> str:
    return build_parser([]).format_help()


def version_text() -> str:
    return f"flanneld {__version__} (Python, compatible with Go flanneld v0.7)"
