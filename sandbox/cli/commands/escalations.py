"""sandboxctl escalations: list open escalations; acknowledge one.

Reads and acknowledges through the state dir (the daemon's, /var/lib/sandboxd unless
--state-dir or $SANDBOXD_STATE_DIR). An acknowledgement is audited, so it needs the audit
log: while the daemon runs it holds the log, and this command says to go through it.
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


def _fmt(e: dict) -> str:
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(e["opened_at"]))
    state = e["status"] + (f" by {e['acked_by']}" if e.get("acked_by") else "")
    frozen = " FROZEN" if e.get("frozen") else ""
    detail = json.dumps(e.get("detail") or {}, sort_keys=True, separators=(",", ":"))
    return (f"{e['id']}  {when}Z  {e['severity']:<8} {e['kind']:<17} sandbox={e['sandbox']} "
            f"x{e['count']} {state}{frozen} {detail}")


def run(args) -> int:
    from sandbox.audit.escalation import Escalations
    from sandbox.errors import SandboxError
    if args.op == "ack":
        if not args.id:
            raise SandboxError("escalations ack: which escalation? give its ID", step="usage")
        from sandbox.audit.log import AuditLog
        with AuditLog(args.state_dir) as log:
            esc = Escalations(args.state_dir, log).ack(args.id, os.getuid())
        print(json.dumps(esc) if args.json else f"acknowledged {_fmt(esc)}")
        return 0
    items = Escalations(args.state_dir).list(all=args.all)
    if args.json:
        print(json.dumps(items, indent=1))
    elif not items:
        print("no open escalations" if not args.all else "no escalations")
    else:
        for e in items:
            print(_fmt(e))
    return 0
