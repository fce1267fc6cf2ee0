"""sandboxctl cp: copy files into a sandbox's workspace or out of it (scanned on the way out).

    sandboxctl cp ./src sb-123abc:src        # in (a directory is copied file by file)
    sandboxctl cp sb-123abc:report.txt .     # out
"""
HELP = "copy files into (HOST ID:PATH) or out of (ID:PATH HOST) a sandbox workspace"


def add_arguments(parser):
    from sandbox.cli.commands._daemon import add_common
    add_common(parser)
    parser.add_argument("src")
    parser.add_argument("dst")


def _remote(spec: str):
    sid, sep, path = spec.partition(":")
    return (sid, path) if sep and sid.startswith("sb-") else None


def run(args):
    import os
    from pathlib import Path
    from sandbox.cli.commands._daemon import call, client, emit
    from sandbox.errors import PolicyError
    src, dst = _remote(args.src), _remote(args.dst)
    if bool(src) == bool(dst):
        raise PolicyError("cp: exactly one of SRC and DST must be ID:PATH")
    done = []
    with client(args) as c:
        if dst:
            sid, base = dst
            local = Path(args.src)
            items = ([(p, p.relative_to(local)) for p in sorted(local.rglob("*")) if p.is_file()]
                     if local.is_dir() else [(local, Path(local.name))])
            for path, rel in items:
                target = (base.rstrip("/") + "/" + str(rel)) if (local.is_dir() or base.endswith("/")
                                                                 or not base) else base
                call(c.put_file, sid, target, path.read_bytes(), mode=path.stat().st_mode & 0o777)
                done.append(target)
        else:
            sid, path = src
            data = call(c.get_file, sid, path)
            target = Path(args.dst)
            if target.is_dir():
                target = target / os.path.basename(path.rstrip("/"))
            target.write_bytes(data)
            done.append(str(target))
    emit(args, {"copied": done}, "\n".join(done))
    return 0
