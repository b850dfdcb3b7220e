"""flanneld's entry point: options -> logging -> signals -> one stop Event -> server mode
(--listen) or network mode (etcd directly, or a flanneld server with --remote).

Exit status: 0 after a clean stop, 2 for invalid options, 1 for a fatal error.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from typing import Optional, Sequence

from flannel.errors import FlannelError, OptionsError
from flannel.options import help_text, parse_options, version_text

log = logging.getLogger("flannel")

EXIT_OK, EXIT_FATAL, EXIT_USAGE = 0, 1, 2
STOP_DEADLINE = 4.5  # seconds from a stop request to a forced exit
LIBRARY_DEBUG = 5    # the -v level from which the libraries' debug messages are logged too


LIBRARIES = ("urllib3", "etcd", "pyroute2", "werkzeug", "asyncio")


def setup_logging(verbosity: int) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbosity > 0 else logging.INFO,
        format="%(asctime)s %(levelname).1s [%(threadName)s] %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # the libraries' own debug output (pyroute2 alone writes hundreds of lines at start)
    # only from LIBRARY_DEBUG on: -v and -v=2 are for flanneld's own debug messages. A
    # filter on the handler, since pyroute2 resets its loggers' level when it is imported
    if verbosity < LIBRARY_DEBUG:
        for handler in logging.getLogger().handlers:
            handler.addFilter(_quiet_libraries)


def _quiet_libraries(record: logging.LogRecord) -> bool:
    return record.levelno >= logging.WARNING or record.name.split(".", 1)[0] not in LIBRARIES


def install_signals(stop: threading.Event, status: list) -> None:
    """SIGTERM/SIGINT stop the daemon. The handler only writes a byte to a pipe: setting an
    Event or starting a thread inside a handler can deadlock on a lock the interrupted main
    thread holds. A named thread turns the byte into the stop request. A watchdog forces the
    exit if the orderly stop overruns, whatever began it (a signal or a fatal error), so the
    daemon always stops within 5 s. Further signals change nothing: a Ctrl-C often reaches
    flanneld twice (from the terminal and from a wrapper that forwards it), and cutting the
    stop short would leave the masquerade rules behind."""
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    asked = threading.Event()  # a signal began the stop (else a fatal error did)

    def handler(signum, _frame):
        try:
            os.write(write_fd, bytes([signum]))
        except OSError:
            pass  # pipe full: a stop is already pending

    def relay() -> None:
        while True:
            name = signal.Signals(os.read(read_fd, 1)[0]).name
            if stop.is_set():
                log.info("received %s while stopping; the stop goes on (at most %.1f s)",
                         name, STOP_DEADLINE)
                continue
            log.info("received %s, stopping", name)
            asked.set()
            stop.set()

    threading.Thread(target=relay, name="signals", daemon=True).start()
    threading.Thread(target=_watchdog, args=(stop, asked, status), name="stop-watchdog",
                     daemon=True).start()
    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


def _watchdog(stop: threading.Event, asked: threading.Event, status: list) -> None:
    stop.wait()
    time.sleep(STOP_DEADLINE)
    if not status[0] and not asked.is_set():
        status[0] = EXIT_FATAL  # nobody asked for this stop: a fatal error began it
    _force_exit(status, f"stopping took longer than {STOP_DEADLINE:.1f} s")


def _force_exit(status: list, why: str) -> None:
    log.warning("%s; exiting now", why)
    logging.shutdown()
    os._exit(status[0])


def etcd_manager(opts):
    from flannel.subnet.etcd_registry import EtcdRegistry
    from flannel.subnet.local_manager import LocalManager

    registry = EtcdRegistry(
        opts.etcd_endpoints,
        opts.etcd_prefix,
        keyfile=opts.etcd_keyfile,
        certfile=opts.etcd_certfile,
        cafile=opts.etcd_cafile,
        username=opts.etcd_username,
        password=opts.etcd_password,
    )
    return LocalManager(registry)


def run_server(opts, stop: threading.Event) -> int:
    from flannel.remote.server import serve

    manager = etcd_manager(opts)
    errors: list = []

    def target() -> None:
        try:
            serve(opts.listen, manager, stop, certfile=opts.remote_certfile,
                  keyfile=opts.remote_keyfile, cafile=opts.remote_cafile)
        except Exception as exc:  # the server thread says why and stops the daemon
            errors.append(exc)
            stop.set()

    thread = threading.Thread(target=target, name="server", daemon=True)
    thread.start()
    while not stop.wait(0.2):
        pass
    thread.join(3.0)
    manager.close()
    if errors:
        raise errors[0]
    return EXIT_OK


def run_networks(opts, stop: threading.Event) -> int:
    from flannel.dataplane.netlink import lookup_external_interface
    from flannel.network.multi import Supervisor

    ext = lookup_external_interface(opts.iface, opts.public_ip)
    log.info("using interface %s (index %d), address %s, public address %s, MTU %d",
             ext.name, ext.index, ext.iface_addr, ext.ext_addr, ext.mtu)
    if opts.remote:
        from flannel.remote.client import RemoteManager

        manager = RemoteManager(opts.remote, cafile=opts.remote_cafile,
                                certfile=opts.remote_certfile, keyfile=opts.remote_keyfile)
    else:
        manager = etcd_manager(opts)
    try:
        return Supervisor(manager, ext, opts, stop).run()
    finally:
        manager.close()


def main(argv: Optional[Sequence[str]] = None) -> int:
    try:
        opts = parse_options(argv)
    except OptionsError as exc:
        print(f"flanneld: {exc}\n(see flanneld --help)", file=sys.stderr)
        return EXIT_USAGE
    if opts.help:
        print(help_text())
        return EXIT_OK
    if opts.version:
        print(version_text())
        return EXIT_OK
    setup_logging(opts.verbose)
    for warning in opts.warnings:
        log.warning("%s", warning)
    stop = threading.Event()
    status = [EXIT_OK]  # what the watchdog exits with
    install_signals(stop, status)
    log.info("%s starting", version_text())
    try:
        status[0] = run_server(opts, stop) if opts.listen else run_networks(opts, stop)
    except OptionsError as exc:
        log.error("%s", exc)
        status[0] = EXIT_USAGE
    except FlannelError as exc:
        log.error("%s", exc)
        status[0] = EXIT_FATAL
    log.info("flanneld stopped (exit status %d)", status[0])
    return status[0]


if __name__ == "__main__":
    sys.exit(main())
