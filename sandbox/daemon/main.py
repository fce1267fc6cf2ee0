"""`sandboxd`: the daemon's entry point (systemd runs it; `--foreground` for development).

Logs are one JSON object per line on stderr, which journald stores as-is: time, level,
logger, message. Never a token value, never a host environment value.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path

from sandbox.daemon.config import DaemonConfig

log = logging.getLogger("sandboxd")


class _JsonFormatter(logging.Formatter):
    def format(self, record):
        out = {"ts": round(record.created, 3), "level": record.levelname.lower(),
               "logger": record.name, "msg": record.getMessage()}
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)[-4000:]
        return json.dumps(out)


def setup_logging(level: str = "info"):
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("aiohttp").setLevel(logging.WARNING)


def parse_args(argv=None) -> argparse.Namespace:
    d = DaemonConfig()
    ap = argparse.ArgumentParser(prog="sandboxd", description="the sandbox daemon")
    ap.add_argument("--foreground", action="store_true",
                    help="run in the foreground for development (systemd runs it this way too)")
    ap.add_argument("--socket", type=Path, default=d.socket_path, help="Unix socket to listen on")
    ap.add_argument("--state-dir", type=Path, default=d.state_dir,
                    help="persistent state: tokens.json, audit log")
    ap.add_argument("--run-dir", type=Path, default=d.run_dir,
                    help="runtime state of live sandboxes (intent records)")
    ap.add_argument("--policy-dir", type=Path, default=None,
                    help="extra policy directory, searched before /etc/sandboxd/policies")
    ap.add_argument("--client-group", default=d.client_group)
    ap.add_argument("--admin-group", default=d.admin_group)
    ap.add_argument("--max-connections", type=int, default=d.max_connections)
    ap.add_argument("--idle-timeout", type=float, default=d.idle_timeout)
    ap.add_argument("--header-timeout", type=float, default=d.header_timeout)
    ap.add_argument("--net-host-netns", default=None,
                    help="path of the netns that plays the host side of sandbox networks "
                    "(default: the daemon's own)")
    ap.add_argument("--net-pool", default=None, help="IPv4 pool split into /30s per sandbox")
    ap.add_argument("--net-nflog-group", type=int, default=None,
                    help="NFLOG group for dropped packets (one per daemon on a host)")
    ap.add_argument("--warm-pool", type=int, default=DaemonConfig.warm_pool, metavar="N",
                    help="warm sandboxes of the default policy kept ready for creates that ask "
                         "for it unchanged (0: none; default %(default)s)")
    ap.add_argument("--no-network-sweep", action="store_true",
                    help="recovery: do not sweep leftover netns/veth/nft names at start")
    ap.add_argument("--log-level", default=os.environ.get("SANDBOXD_LOG_LEVEL", "info"))
    return ap.parse_args(argv)


def config_from(args) -> DaemonConfig:
    return DaemonConfig(socket_path=args.socket, state_dir=args.state_dir, run_dir=args.run_dir,
                        policy_dir=args.policy_dir, client_group=args.client_group,
                        admin_group=args.admin_group, max_connections=args.max_connections,
                        idle_timeout=args.idle_timeout, header_timeout=args.header_timeout,
                        net={k: v for k, v in (("host_netns", args.net_host_netns),
                                               ("pool", args.net_pool),
                                               ("nflog_group", args.net_nflog_group))
                             if v is not None},
                        network_sweep=not args.no_network_sweep,
                        warm_pool=max(0, args.warm_pool))


def open_audit(config: DaemonConfig):
    """The hash-chained audit log under the state dir (sandbox/audit/log.py)."""
    from sandbox.audit.log import AuditLog
    return AuditLog(config.state_dir)


async def assemble(config: DaemonConfig, audit, engine):
    """Wire the parts: network config, the queued audit sink, escalations, crash recovery,
    the server. (serve() runs it; tests build an in-process daemon with it.)"""
    from sandbox.daemon.server import Daemon
    if config.net:
        from sandbox.kernel import network
        try:
            network.configure(**config.net)
        except (ValueError, TypeError) as e:
            from sandbox.errors import SandboxError
            raise SandboxError(f"network configuration: {e}") from None
    from sandbox.audit.escalation import Escalations
    from sandbox.daemon.auditing import QueuedSink
    sink = QueuedSink(audit)
    # freeze_cb is the daemon's (set by Daemon below); recovery only raises teardown
    # escalations for sandboxes no longer running, which have nothing to freeze.
    esc = Escalations(config.state_dir, sink)
    t0 = time.perf_counter()
    recovered = engine.recover(sink, escalations=esc, network_sweep=config.network_sweep)
    await sink.durable()
    log.info("recovery done in %.1f ms: %s", (time.perf_counter() - t0) * 1000,
             _short(getattr(recovered, "to_dict", lambda: recovered)()))
    return Daemon(config, engine, audit=sink, escalations=esc)


async def serve(config: DaemonConfig) -> int:
    from sandbox.daemon.engine import RealEngine
    from sandbox.daemon.notify import Notifier

    if config.policy_dir:
        os.environ["SANDBOXD_POLICY_DIR"] = str(config.policy_dir)
    for d in (config.state_dir, config.run_dir):
        d.mkdir(parents=True, exist_ok=True, mode=0o700)
    audit = open_audit(config)
    daemon = await assemble(config, audit, RealEngine(config.run_dir))
    notifier = Notifier()
    daemon.notifier = notifier
    await daemon.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    notifier.ready(f"serving on {config.socket_path}")
    watchdog = None
    if notifier.watchdog_interval:
        async def pet():
            while True:
                notifier.watchdog()
                await asyncio.sleep(notifier.watchdog_interval)
        watchdog = loop.create_task(pet())
    await stop.wait()
    log.info("stopping")
    notifier.stopping()
    if watchdog:
        watchdog.cancel()
    await daemon.stop()
    close = getattr(audit, "close", None)
    if close:
        close()
    return 0


def _short(obj) -> str:
    text = json.dumps(obj, default=str) if obj is not None else "nothing to recover"
    return text[:500]


def main(argv=None) -> int:
    args = parse_args(argv)
    setup_logging(args.log_level)
    if os.geteuid() != 0:
        log.error("sandboxd must run as root (it builds namespaces, cgroups and nftables)")
        return 2
    try:
        code = asyncio.run(_bounded(serve(config_from(args))))
    except Exception as e:  # noqa: BLE001 - one clear line, then exit non-zero
        from sandbox.errors import SandboxError
        if isinstance(e, SandboxError):
            log.error("cannot start: %s", e)
            return 2
        log.exception("sandboxd failed")
        return 1
    return code


async def _bounded(coro):
    """Run serve(); then leave without waiting for engine calls still stuck in worker threads
    (a teardown waiting on the kernel): asyncio.run would join them with no bound and
    systemd would SIGKILL us at TimeoutStopSec. Their intent records stay for recovery.
    With no engine call left, the interpreter exits normally: idle worker threads join at
    once, and atexit removes what this process made (its shared /etc views)."""
    code = await coro
    from sandbox.daemon.engine import calls_in_flight
    stuck = calls_in_flight()
    if stuck:
        log.info("leaving without waiting for %d engine call(s) still in worker threads "
                 "(waiting on the kernel; recovery cleans up after them)", stuck)
        from sandbox.kernel.mounts import clear_etc_cache
        clear_etc_cache()          # what atexit would do; os._exit skips it
        logging.shutdown()
        sys.stderr.flush()
        os._exit(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
