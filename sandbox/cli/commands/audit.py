"""sandboxctl audit: verify the chain, replay a sandbox's timeline, tail the log.

These read the log files directly (read-only, safe while the daemon writes), so they work
when the daemon is down, which is when an investigation most often starts. The state dir
defaults to the daemon's (/var/lib/sandboxd) and can be set with --state-dir or
$SANDBOXD_STATE_DIR.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

HELP = "verify the audit chain, replay a sandbox, tail the audit log"
DEFAULT_STATE_DIR = "/var/lib/sandboxd"


def add_arguments(parser):
    parser.add_argument("--state-dir", type=Path,
                        default=Path(os.environ.get("SANDBOXD_STATE_DIR", DEFAULT_STATE_DIR)),
                        help="the daemon's state directory (holds audit/)")
    sub = parser.add_subparsers(dest="what", required=True)
    v = sub.add_parser("verify", help="check the hash chain; exit 0 intact, 1 bad")
    v.add_argument("files", nargs="*", type=Path,
                   help="audit files or directories (default: the state dir's whole log)")
    v.add_argument("--json", action="store_true")
    r = sub.add_parser("replay", help="a sandbox's timeline: what ran, printed, was denied, ended")
    r.add_argument("sandbox")
    r.add_argument("--json", action="store_true")
    t = sub.add_parser("tail", help="the newest records; -f follows (across rotation)")
    t.add_argument("-n", type=int, default=20, help="records to show first")
    t.add_argument("-f", "--follow", action="store_true")
    t.add_argument("--sandbox")
    t.add_argument("--action")
    t.add_argument("--json", action="store_true", help="raw records, one a line")


def run(args) -> int:
    return {"verify": _verify, "replay": _replay, "tail": _tail}[args.what](args)


def _verify(args) -> int:
    from sandbox.audit.verify import verify
    if len(args.files) == 1 and args.files[0].is_dir():
        target = args.files[0]
    else:
        target = args.files or args.state_dir
    report = verify(target)
    if args.json:
        print(json.dumps(report.to_dict(), indent=1))
    else:
        for note in report.notes:
            print(f"note: {note}")
        if report.ok:
            print(f"ok: {report.records} records in {len(report.files)} files, "
                  f"chain intact up to seq {report.last_seq}")
        else:
            print(f"BAD: {report.problem}")
    return 0 if report.ok else 1


def _replay(args) -> int:
    from sandbox.audit.replay import format_timeline, replay
    timeline = replay(args.state_dir, args.sandbox)
    if args.json:
        print(json.dumps(timeline, indent=1))
    else:
        sys.stdout.write(format_timeline(timeline))
    return 0 if timeline["events"] else 1


def _tail(args) -> int:
    from sandbox.audit.query import format_record, tail
    for rec in tail(args.state_dir, n=args.n, follow=args.follow, sandbox=args.sandbox,
                    action=args.action):
        print(json.dumps(rec, sort_keys=True) if args.json else format_record(rec), flush=True)
    return 0
