"""What the daemon-facing sandboxctl commands share: socket/token options, the client, output.

Kept light (http.client only, via sandbox.client's sync part) so `sandboxctl ps` starts fast.
The token comes from --token-file, $SANDBOXD_TOKEN or stdin (--token-stdin), never argv:
argv is visible to every user in ps(1).
"""
from __future__ import annotations

import json
import sys
import time

from sandbox.errors import SandboxError

# sandbox.client.DEFAULT_SOCKET without importing the client (tests/unit/test_cli_startup.py
# checks they agree)
DEFAULT_SOCKET = "/run/sandboxd/sandboxd.sock"


def add_common(parser, *, json_flag: bool = True):
    from sandbox.client import DEFAULT_SOCKET
    parser.add_argument("--socket", default=DEFAULT_SOCKET, help="sandboxd's socket")
    parser.add_argument("--token-file", help="read the capability token from this file "
                        "(else $SANDBOXD_TOKEN; never pass a token on the command line)")
    parser.add_argument("--token-stdin", action="store_true", help="read the token from stdin")
    if json_flag:
        parser.add_argument("--json", action="store_true", help="machine-readable output")


def client(args):
    from sandbox.client import Client, token_from_env
    token = sys.stdin.readline().strip() if getattr(args, "token_stdin", False) else \
        token_from_env(args.token_file)
    return Client(args.socket, token=token or None)


def call(fn, *a, **kw):
    """Run a client call; daemon errors become SandboxError (one line from cli/main.py)."""
    from sandbox.client import DaemonError
    try:
        return fn(*a, **kw)
    except DaemonError as e:
        raise SandboxError(e.message or e.kind, step="daemon") from None


def emit(args, data, text: str | None = None):
    if getattr(args, "json", False) or text is None:
        print(json.dumps(data, indent=1, default=str))
    else:
        print(text)


def human_bytes(n) -> str:
    if not isinstance(n, (int, float)):
        return "-"
    for unit in ("B", "K", "M", "G", "T"):
        if abs(n) < 1024 or unit == "T":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024
    return "-"


def human_age(seconds) -> str:
    s = int(seconds or 0)
    if s < 120:
        return f"{s}s"
    if s < 7200:
        return f"{s // 60}m"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


def ps_table(sandboxes: list[dict]) -> str:
    cols = ("ID", "TOKEN", "POLICY", "STATE", "AGE", "CPU", "MEMORY", "PIDS", "NET", "ESC")
    rows = [cols]
    for s in sandboxes:
        u = s.get("usage") or {}
        net = (u.get("net_rx_bytes") or 0) + (u.get("net_tx_bytes") or 0)
        rows.append((s["id"], s.get("token") or "(admin)", s.get("policy", "?"), s["state"],
                     human_age(s.get("age")),
                     f"{u['cpu_seconds']:.2f}s" if isinstance(u.get("cpu_seconds"), (int, float)) else "-",
                     human_bytes(u.get("memory_current", u.get("memory"))),
                     str(u.get("pids_current", u.get("pids", "-"))), human_bytes(net),
                     str(s.get("escalations", "-"))))
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(cols))]
    return "\n".join("  ".join(str(v).ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows)


def now() -> float:
    return time.time()


def run_via_daemon(args, parse_env) -> int | None:
    """`sandboxctl run` through a running daemon: create, exec (scanned), destroy.

    None when there is no daemon to talk to (or the run needs something only the in-process
    engine offers: --context, --keep-workspace, a policy file path), so the caller falls back
    to the in-process engine. SANDBOXD_NO_DAEMON=1 forces the fallback.
    """
    import os
    import stat
    # Decide before importing the client (http.client, email: ~15 ms of a run's start-up).
    sock = os.environ.get("SANDBOXD_SOCKET", DEFAULT_SOCKET)
    if (os.environ.get("SANDBOXD_NO_DAEMON") == "1" or not os.path.exists(sock)
            or args.context or args.keep_workspace or "/" in args.policy
            or args.policy.endswith(".toml")):
        return None
    from sandbox.client import Client, NotRunning, token_from_env
    from sandbox.cli.commands.exec import stream_events
    env = parse_env(args.env)
    stdin = None
    mode = os.fstat(0).st_mode
    if stat.S_ISREG(mode) or stat.S_ISFIFO(mode):     # piped input; a terminal is never relayed
        stdin = sys.stdin.buffer.read().decode("utf-8", "surrogateescape")
    with Client(sock, token=token_from_env()) as c:
        try:
            c.health()
        except NotRunning:
            return None
        sb = call(c.create, args.policy, None, args.workspace)
        try:
            return call(stream_events, c.exec_events(sb["id"], args.command, env=env or None,
                                                     stdin=stdin, timeout=args.timeout), False)
        finally:
            call(c.destroy, sb["id"])
