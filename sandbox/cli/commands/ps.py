"""sandboxctl ps: the sandboxes the daemon runs (yours with a token; all for an admin)."""
HELP = "list sandboxes: id, token, policy, state, age, CPU, memory, pids, net bytes"


def add_arguments(parser):
    from sandbox.cli.commands._daemon import add_common
    add_common(parser)


def run(args):
    from sandbox.cli.commands._daemon import call, client, emit, ps_table
    with client(args) as c:
        boxes = call(c.list)
    emit(args, boxes, ps_table(boxes))
    return 0
