"""One-id commands (freeze, resume, destroy) are the same shape: written once here."""


def make(method: str, verb: str):
    def add_arguments(parser):
        from sandbox.cli.commands._daemon import add_common
        add_common(parser)
        parser.add_argument("ids", nargs="+", metavar="ID")

    def run(args):
        from sandbox.cli.commands._daemon import call, client, emit
        out = []
        with client(args) as c:
            for sid in args.ids:
                out.append(call(getattr(c, method), sid))
        emit(args, out, "\n".join(f"{verb} {sid}" for sid in args.ids))
        return 0
    return add_arguments, run
