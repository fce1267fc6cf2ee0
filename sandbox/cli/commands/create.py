"""sandboxctl create: a sandbox under a policy; prints its id (use it with exec, cp, destroy)."""
HELP = "create a sandbox through the daemon and print its id"


def add_arguments(parser):
    from sandbox.cli.commands._daemon import add_common
    add_common(parser)
    parser.add_argument("--policy", default="default")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a field, e.g. limits.memory=1GiB or timeout=10m "
                             "(JSON values accepted: network.allow='[\"a.org:443\"]')")
    parser.add_argument("--workspace", help="host directory to mount as the workspace")


def overrides_from(pairs: list[str]) -> dict:
    import json
    from sandbox.errors import PolicyError
    out: dict = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise PolicyError(f"--set {pair!r}: expected KEY=VALUE")
        try:
            parsed = json.loads(value)
        except ValueError:
            parsed = value
        node = out
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = parsed
    return out


def run(args):
    from sandbox.cli.commands._daemon import call, client, emit
    with client(args) as c:
        sb = call(c.create, args.policy, overrides_from(args.set) or None, args.workspace)
    emit(args, sb, sb["id"])
    return 0
