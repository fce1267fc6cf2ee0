"""sandboxctl top: a live view of the sandboxes (refreshes until interrupted)."""
HELP = "live view of sandboxes and their usage"


def add_arguments(parser):
    from sandbox.cli.commands._daemon import add_common
    add_common(parser)
    parser.add_argument("--interval", type=float, default=2.0)
    parser.add_argument("--iterations", type=int, default=0, help="stop after N refreshes (0: never)")


def run(args):
    import sys
    import time
    from sandbox.cli.commands._daemon import call, client, emit, ps_table
    n = 0
    with client(args) as c:
        while True:
            boxes = call(c.list)
            if args.json:
                emit(args, {"ts": time.time(), "sandboxes": boxes})
            else:
                if sys.stdout.isatty():
                    sys.stdout.write("\x1b[H\x1b[2J")
                states: dict = {}
                for b in boxes:
                    states[b["state"]] = states.get(b["state"], 0) + 1
                print(f"sandboxd  {time.strftime('%H:%M:%S')}  {len(boxes)} sandboxes  "
                      + "  ".join(f"{k}={v}" for k, v in sorted(states.items())))
                print(ps_table(boxes), flush=True)
            n += 1
            if args.iterations and n >= args.iterations:
                return 0
            time.sleep(args.interval)
