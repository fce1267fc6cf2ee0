"""sandboxctl escalations: list open escalations; acknowledge one.

While the daemon runs (its socket answers: --socket or $SANDBOXD_SOCKET) this goes through
its API (GET /v1/escalations, POST /v1/escalations/ID/ack; admins only): the daemon holds
the audit log the acknowledgement is recorded in. Without a daemon it reads and acknowledges
through the state dir (/var/lib/sandboxd unless --state-dir or $SANDBOXD_STATE_DIR).
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

HELP = "list open escalations (--all: also acknowledged ones); 'ack ID' acknowledges one"
DEFAULT_STATE_DIR = "/var/lib/sandboxd"


def add_arguments(parser):
    parser.add_argument("--state-dir", type=Path,
                        default=Path(os.environ.get("SANDBOXD_STATE_DIR", DEFAULT_STATE_DIR)))
    parser.add_argument("op", nargs="?", choices=("list", "ack"), default="list")
    parser.add_argument("id", nargs="?", help="the escalation to acknowledge")
    parser.add_argument("--all", action="store_true", help="include acknowledged escalations")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--socket", default=None, help="sandboxd's socket (default: "
                        "$SANDBOXD_SOCKET or /run/sandboxd/sandboxd.sock)")


def _fmt(e: dict) -> str:
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(e["opened_at"]))
    state = e["status"] + (f" by {e['acked_by']}" if e.get("acked_by") else "")
    frozen = " FROZEN" if e.get("frozen") else ""
    detail = json.dumps(e.get("detail") or {}, sort_keys=True, separators=(",", ":"))
    return (f"{e['id']}  {when}Z  {e['severity']:<8} {e['kind']:<17} sandbox={e['sandbox']} "
            f"x{e['count']} {state}{frozen} {detail}")


def _via_daemon(args):
    """A Client when a daemon answers on the socket, else None (fall back to the state dir)."""
    from sandbox.client import DEFAULT_SOCKET, Client, NotRunning
    sock = args.socket or DEFAULT_SOCKET
    if not os.path.exists(sock):
        return None
    c = Client(sock)
    try:
        c.health()
    except NotRunning:
        c.close()
        return None
    return c


def run(args) -> int:
    from sandbox.audit.escalation import Escalations
    from sandbox.errors import SandboxError
    if args.op == "ack" and not args.id:
        raise SandboxError("escalations ack: which escalation? give its ID", step="usage")
    c = _via_daemon(args)
    if c is not None:
        from sandbox.cli.commands._daemon import call
        from urllib.parse import quote
        with c:
            if args.op == "ack":
                esc = call(c.request, "POST", f"/v1/escalations/{quote(args.id, safe='')}/ack")
            else:
                items = call(c.request, "GET", "/v1/escalations" + ("?all=1" if args.all else ""))
                items = items["escalations"]
    if args.op == "ack":
        if c is None:
            from sandbox.audit.log import AuditLog
            with AuditLog(args.state_dir) as log:
                esc = Escalations(args.state_dir, log).ack(args.id, os.getuid())
        print(json.dumps(esc) if args.json else f"acknowledged {_fmt(esc)}")
        return 0
    if c is None:
        items = Escalations(args.state_dir).list(all=args.all)
    if args.json:
        print(json.dumps(items, indent=1))
    elif not items:
        print("no open escalations" if not args.all else "no escalations")
    else:
        for e in items:
            print(_fmt(e))
    return 0
