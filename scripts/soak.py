#!/usr/bin/env python3
"""Soak: N create/exec/destroy cycles through a real sandboxd; are fds, RSS and objects flat?

    sudo .venv/bin/python scripts/soak.py [-n 1000] [--engine]

Starts its own daemon (temp socket, state and run dirs named sbxt-<pid>-...; tests/helpers/
daemon.py), warms up, prints the daemon's open fds and RSS, runs N cycles of create ->
exec `echo` -> destroy, prints both again, then lists every leaked object (intent records,
directories, disk images, loop devices, mounts, cgroups, processes) and verifies the audit
chain. --engine drives the engine in this process instead of a daemon. Exit 1 on a leak.
Not a CI test: it is a measurement; run it and report the figures.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.helpers import isolation  # noqa: E402

# own cgroup parent and disk base, claimed before any sandbox module reads them at import
ISOLATED = isolation.claim("sbxbench")

from sandbox.audit.verify import verify  # noqa: E402
from sandbox.runtime.recovery import find_leftovers  # noqa: E402

POLICY = {"limits": {"memory": "256MiB", "disk": "64MiB", "pids": 64}}
failures: list[str] = []    # destroys that reported leftovers: counted, the soak goes on
made: set[str] = set()      # ids of the sandboxes this soak made (other daemons may run too)


def fds_rss(pid: int) -> tuple[int, int]:
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    rss = next(int(line.split()[1]) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
               if line.startswith("VmRSS:"))
    return fds, rss


def _warm_default_policy(pdir: Path):
    """The default policy with the soak's limits, as the daemon's own `default`: the warm
    pool builds only the default policy, and creates must ask for it unchanged."""
    import re
    text = (Path(__file__).resolve().parents[1] / "policies" / "default.toml").read_text()
    lim = POLICY["limits"]
    for key, value in (("memory", f'"{lim["memory"]}"'), ("pids", str(lim["pids"])),
                       ("disk", f'"{lim["disk"]}"' if lim["disk"] else "0")):
        text, k = re.subn(rf'(?m)^{key} = [^#\n]*', f"{key} = {value}  ", text, count=1)
        assert k == 1, f"policies/default.toml: no {key} line"
    (pdir / "default.toml").write_text(text)


def soak_daemon(n: int, warmup: int, warm: int = 0) -> int:
    from sandbox.client import DaemonError
    from tests.helpers.daemon import DaemonProc
    d = DaemonProc(extra_args=("--warm-pool", str(warm)))
    if warm:
        _warm_default_policy(d.tmp / "policies")
    d.start()
    try:
        with d.admin() as c:
            def cycle():
                sid = (c.create("default") if warm else
                       c.create("default", overrides=POLICY))["id"]
                made.add(sid)
                res = c.exec(sid, ["echo", "soak"])
                assert res.exit_code == 0 and res.stdout == b"soak\n", res
                try:
                    c.destroy(sid)
                except DaemonError as e:
                    failures.append(f"{sid}: {e}")
            return _run(n, warmup, cycle, d.proc.pid, d.run, d.state, "sb-")
    finally:
        left = d.stop()
        d.cleanup()
        if left:
            print(f"daemon stop left: {left}")


def soak_engine(n: int, warmup: int) -> int:
    from sandbox.audit.log import AuditLog
    from sandbox.errors import SandboxError
    from sandbox.policy import load_policy
    from sandbox.runtime.sandbox import Sandbox
    tmp = Path(tempfile.mkdtemp(prefix=f"sbxt-{os.getpid()}-soak-"))
    policy = load_policy("default", overrides=POLICY)
    prefix, parent = f"sbxt-{os.getpid()}-s", f"sbxt-{os.getpid()}-soak"
    log = AuditLog(tmp / "state", mirror=None)
    count = iter(range(10**9))

    def cycle():
        sb = Sandbox.create(policy, audit=log, state_dir=tmp / "run", cgroup_parent=parent,
                            sandbox_id=f"{prefix}{next(count)}", disk_base=tmp / "run" / "disks")
        made.add(sb.id)
        res = asyncio.run(sb.exec(["echo", "soak"]))
        assert res.exit_code == 0 and res.stdout == b"soak\n", res
        try:
            sb.destroy()
        except SandboxError as e:
            failures.append(f"{sb.id}: {e}")
    rc = 1
    try:
        rc = _run(n, warmup, cycle, os.getpid(), tmp / "run", tmp / "state", prefix, parent)
        return rc
    finally:
        log.close()
        for hier in Path("/sys/fs/cgroup").iterdir():
            try:
                (hier / parent).rmdir()       # empty unless a cgroup leaked (then reported)
            except (FileNotFoundError, NotADirectoryError):
                pass
            except OSError as e:
                rc = 1
                print(f"cgroup parent {hier / parent} not removed: {e.strerror}")
        if rc == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            print(f"left for inspection: {tmp}")


def _run(n, warmup, cycle, pid, run_dir, state_dir, prefix, cgroup_parent=None) -> int:
    for _ in range(warmup):
        cycle()
    fds0, rss0 = fds_rss(pid)
    print(f"start (after {warmup} warm-up cycles): fds={fds0} rss={rss0} KiB", flush=True)
    t0 = time.monotonic()
    for i in range(1, n + 1):
        cycle()
        if i % max(1, n // 10) == 0:
            fds, rss = fds_rss(pid)
            print(f"  {i:>5} cycles  {time.monotonic() - t0:7.1f} s  fds={fds} rss={rss} KiB", flush=True)
    fds1, rss1 = fds_rss(pid)
    print(f"end   ({n} cycles in {time.monotonic() - t0:.1f} s): fds={fds1} rss={rss1} KiB "
          f"(fds {fds1 - fds0:+d}, rss {rss1 - rss0:+d} KiB)")
    print(f"destroys that reported leftovers: {len(failures)}"
          + "".join(f"\n  {x}" for x in failures[:5]))
    # Only what this soak made: the daemon's id prefix is shared with any other sandboxd here.
    left = [x for x in find_leftovers(run_dir, id_prefix=prefix, cgroup_parent=cgroup_parent)
            if any(sid in x for sid in made)]
    print(f"leaked objects: {len(left)}" + "".join(f"\n  {x}" for x in left[:50]))
    report = verify(state_dir)
    print(f"audit chain: {'intact' if report.ok else report.problem}, {report.records} records "
          f"in {len(report.files)} files")
    return 0 if not left and not failures and report.ok else 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", type=int, default=1000)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--engine", action="store_true", help="drive the engine, no daemon")
    ap.add_argument("--no-disk", action="store_true", help="limits.disk = 0 (no loop-device disk)")
    ap.add_argument("--warm", type=int, default=0, metavar="N",
                    help="daemon keeps N warm sandboxes (--warm-pool); creates take them")
    args = ap.parse_args()
    if args.no_disk:
        POLICY["limits"]["disk"] = 0
    if os.geteuid() != 0:
        print("soak.py: run as root (it builds real sandboxes)", file=sys.stderr)
        return 2
    if args.engine:
        return soak_engine(args.n, args.warmup)
    return soak_daemon(args.n, args.warmup, args.warm)


if __name__ == "__main__":
    code = main()
    sys.exit(isolation.finish(ISOLATED) or code)
