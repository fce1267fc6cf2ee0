"""sandboxctl run: run one command in a fresh sandbox and exit with its status."""
from __future__ import annotations

import asyncio
import os
import sys
import threading
from pathlib import Path

HELP = "run a command in a fresh, ephemeral sandbox (in-process engine, as root)"


def add_arguments(parser):
    parser.add_argument("--policy", default="default", help="policy name or path (default: default)")
    parser.add_argument("--workspace", help="host directory mounted rw at /home/agent/workspace")
    parser.add_argument("--context", help="host directory mounted ro at /home/agent/context")
    parser.add_argument("--timeout", type=float, help="wall-clock limit of the command, seconds")
    parser.add_argument("--env", action="append", default=[], metavar="K=V",
                        help="set a variable the policy allows (repeatable)")
    parser.add_argument("--keep-workspace", action="store_true",
                        help="keep the sandbox-made workspace after the run")
    parser.add_argument("--state-dir", default=os.environ.get("SANDBOXD_STATE_DIR", "/run/sandboxd"),
                        help="where sandboxes keep their state (default: /run/sandboxd)")
    parser.add_argument("command", nargs="+", help="the command and its arguments (after --)")


def _parse_env(items: list[str]) -> dict:
    from sandbox.errors import PolicyError
    env = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise PolicyError(f"--env wants NAME=value, got {name or item!r}")
        env[name] = value
    return env


def _via_daemon(args):
    """DAEMON HOOK (owned by the daemon engineer): when a daemon is running, send the run to
    it and return the exit status; None means "no daemon: use the in-process engine"."""
    from sandbox.cli.commands._daemon import run_via_daemon
    return run_via_daemon(args, _parse_env)


def _tty_stdin():
    """The caller's terminal is never handed to the sandbox (a tty fd inside would allow
    terminal ioctls on the caller's tty): its bytes are relayed through a pipe instead."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()

    def reader():
        while True:
            try:
                data = os.read(0, 65536)
            except OSError:
                data = b""
            loop.call_soon_threadsafe(queue.put_nowait, data)
            if not data:
                return

    threading.Thread(target=reader, daemon=True).start()

    async def chunks():
        while data := await queue.get():
            yield data
    return chunks()


def _exit_on_signals():
    """SIGTERM/SIGHUP end the run like Ctrl-C: through the finally that destroys the sandbox."""
    import signal

    def stop(sig, _frame):
        raise SystemExit(128 + sig)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, stop)


def _write(stream: str, data: bytes):
    out = sys.stdout.buffer if stream == "stdout" else sys.stderr.buffer
    out.write(data)
    out.flush()


async def _run(sb, args, env):
    stdin = _tty_stdin() if os.isatty(0) else 0
    return await sb.exec(args.command, env=env, stdin=stdin, timeout=args.timeout, on_output=_write)


def run(args):
    status = _via_daemon(args)
    if status is not None:
        return status
    from sandbox.errors import UnsupportedError
    from sandbox.policy import load_policy
    from sandbox.runtime.sandbox import Sandbox
    if os.geteuid() != 0:
        raise UnsupportedError("the in-process engine needs root (namespaces, id maps, "
                               "idmapped mounts); run it with sudo, or through the daemon")
    policy = load_policy(args.policy)
    env = _parse_env(args.env)
    _exit_on_signals()
    sb = Sandbox.create(policy, workspace=args.workspace, context=args.context,
                        keep_workspace=args.keep_workspace or None, state_dir=Path(args.state_dir))
    try:
        res = asyncio.run(_run(sb, args, env))
    finally:
        sb.destroy()
    if res.reason not in ("exited", "signaled"):
        print(f"sandboxctl run: {res.text}", file=sys.stderr)
    return res.status
