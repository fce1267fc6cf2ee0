"""sandboxctl token grant|list|revoke: capability tokens (admin).

`grant` prints the token once (store it in a file readable only by the orchestrator);
the daemon keeps only its hash. Revoking kills every sandbox created with it.
"""
HELP = "grant, list or revoke capability tokens (admin)"


def add_arguments(parser):
    from sandbox.cli.commands._daemon import add_common
    add_common(parser)
    sub = parser.add_subparsers(dest="action", required=True)
    g = sub.add_parser("grant", help="grant a token; prints it once")
    g.add_argument("--name", default="")
    g.add_argument("--policy", action="append", dest="policies", help="allowed policy (repeat; * = any)")
    g.add_argument("--memory", help="ceiling, e.g. 8GiB")
    g.add_argument("--cpus", type=float)
    g.add_argument("--pids", type=int)
    g.add_argument("--disk", help="ceiling, e.g. 20GiB")
    g.add_argument("--timeout", help="ceiling of a sandbox's lifetime, e.g. 4h")
    g.add_argument("--network", action="append", default=[], help="network entry it may add")
    g.add_argument("--workspace-root", action="append", default=[], dest="workspace_roots")
    g.add_argument("--max-sandboxes", type=int)
    g.add_argument("--ttl", type=float, help="seconds until the token expires (default 4h)")
    g.add_argument("--out", help="write the token to this file (mode 0600) instead of stdout")
    sub.add_parser("list", help="list tokens (never their values)")
    r = sub.add_parser("revoke", help="revoke a token and kill its sandboxes")
    r.add_argument("id")


def run(args):
    import os
    from sandbox.cli.commands._daemon import call, client, emit
    with client(args) as c:
        if args.action == "grant":
            ceiling = {k: getattr(args, k) for k in ("memory", "cpus", "pids", "disk", "timeout")
                       if getattr(args, k) is not None}
            t = call(c.grant_token, name=args.name, policies=args.policies, ceiling=ceiling or None,
                     network=args.network or None, workspace_roots=args.workspace_roots or None,
                     max_sandboxes=args.max_sandboxes, ttl=args.ttl)
            if args.out:
                fd = os.open(args.out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                with os.fdopen(fd, "w") as f:
                    f.write(t["token"] + "\n")
                t = {k: v for k, v in t.items() if k != "token"}
                emit(args, t, f"token {t['id']} written to {args.out}")
            else:
                emit(args, t, t["token"])
        elif args.action == "list":
            toks = call(c.list_tokens)
            lines = [f"{'ID':<13} {'NAME':<16} {'ACTIVE':<6} {'SANDBOXES':<9} POLICIES"]
            lines += [f"{t['id']:<13} {t['name'][:16]:<16} {str(t['active']).lower():<6} "
                      f"{t.get('sandboxes', 0):<9} {','.join(t['scope']['policies'])}" for t in toks]
            emit(args, toks, "\n".join(lines))
        else:
            out = call(c.revoke_token, args.id)
            emit(args, out, f"revoked {out['id']}: killed {out['killed']} sandboxes "
                            f"in {out['kill_ms']} ms")
    return 0
