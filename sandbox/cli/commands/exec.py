"""sandboxctl exec: run a command in a sandbox; its scanned output streams back.

Exit status: the command's own; 124 on timeout, 137 when killed, 125 when held.
"""
HELP = "run a command in a sandbox; output is scanned before it is shown"


def add_arguments(parser):
    from sandbox.cli.commands._daemon import add_common
    add_common(parser)
    parser.add_argument("--env", action="append", default=[], metavar="NAME=VALUE")
    parser.add_argument("--cwd")
    parser.add_argument("--timeout", type=float)
    parser.add_argument("id")
    import argparse
    parser.add_argument("argv", nargs=argparse.REMAINDER, help="the command (options after ID "
                        "belong to it)")


def exit_status(ev: dict) -> int:
    if ev.get("reason") == "held":
        return 125
    if ev.get("reason") == "timeout":
        return 124
    if ev.get("exit_code") is not None:
        return int(ev["exit_code"])
    return 128 + int(ev.get("signal") or 9)


def stream_events(events, as_json: bool) -> int:
    """Print events as they come: output to stdout/stderr, the rest as notes on stderr."""
    import json
    import sys
    from sandbox.client import event_bytes
    status = 1
    for ev in events:
        kind = ev.get("event")
        if as_json:
            print(json.dumps(ev), flush=True)
        elif kind in ("stdout", "stderr"):
            out = sys.stdout if kind == "stdout" else sys.stderr
            out.buffer.write(event_bytes(ev))
            out.flush()
        elif kind == "finding":
            f = ev.get("finding") or {}
            print(f"sandboxctl: scanner {f.get('action', '?')}: rule {f.get('rule', '?')} "
                  f"in {ev.get('stream')}", file=sys.stderr)
        elif kind == "held":
            print(f"sandboxctl: output withheld and sandbox held: {ev.get('reason')}",
                  file=sys.stderr)
        elif kind == "limit":
            print(f"sandboxctl: limit reached: {ev.get('limit')}: {ev.get('text')}", file=sys.stderr)
        elif kind == "error":
            from sandbox.errors import SandboxError
            raise SandboxError(ev.get("message", "exec failed"), step="daemon")
        if kind == "exit":
            status = exit_status(ev)
    return status


def run(args):
    from sandbox.cli.commands._daemon import call, client
    from sandbox.errors import PolicyError
    if not args.argv:
        raise PolicyError("exec: name a command to run after the sandbox id")
    env = {}
    for pair in args.env:
        name, sep, value = pair.partition("=")
        if not sep:
            raise PolicyError(f"--env {pair!r}: expected NAME=VALUE")
        env[name] = value
    with client(args) as c:
        events = call(c.exec_events, args.id, args.argv, env=env or None, cwd=args.cwd,
                      timeout=args.timeout)
        return call(stream_events, events, args.json)
