"""sandboxctl inspect: one sandbox's state, policy, limits, usage and network counters."""
HELP = "show one sandbox in detail (JSON)"


def add_arguments(parser):
    from sandbox.cli.commands._daemon import add_common
    add_common(parser, json_flag=False)
    parser.add_argument("id")


def run(args):
    from sandbox.cli.commands._daemon import call, client, emit
    with client(args) as c:
        emit(args, call(c.inspect, args.id))
    return 0
