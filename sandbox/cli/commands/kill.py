"""sandboxctl kill --all: the kill switch. Every sandbox is killed at once (cgroup.kill)."""
HELP = "kill switch: --all kills and destroys every sandbox (admin)"


def add_arguments(parser):
    from sandbox.cli.commands._daemon import add_common
    add_common(parser)
    parser.add_argument("--all", action="store_true", required=True,
                        help="kill every sandbox (required: there is no partial kill switch)")


def run(args):
    from sandbox.cli.commands._daemon import call, client, emit
    with client(args) as c:
        out = call(c.kill_all)
    emit(args, out, f"killed {out['killed']} sandboxes in {out['kill_ms']} ms")
    return 0
