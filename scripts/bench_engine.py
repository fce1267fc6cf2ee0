#!/usr/bin/env python3
"""Benchmark the engine against bwrap: /bin/true through `sandboxctl run` (a process per
run), through the engine API (create + exec + exit + destroy, in process), through the
engine API with only the engine's own steps (no cgroup/disk/network/seccomp/supervisor:
the engine's own cost), and through `bwrap --unshare-all ...`, N times each, in one run.
Prints median, p95 and the ratio to bwrap, and the median time of each lifecycle step.

The sandboxes' state dir (intent records, uid range locks, /etc views, workspaces) is on a
tmpfs, as the daemon's is (--run-dir /run/sandboxd, a systemd RuntimeDirectory): /run if
it is a tmpfs here, else /dev/shm; --state-base picks another place.

The rows take turns (one run of each per round, in a new random order each round), so a
change in the machine's load during the run (other work on a shared host) reaches every
row alike instead of one, and so does what a run leaves the kernel to finish after it
(the all-steps row's disk and cgroup teardown, any row's network namespace). The engine
rows run in one asyncio event loop, as in the daemon (one loop for its whole life): a
fresh loop per command (asyncio.run) would add ~0.5 ms that no caller of the engine pays.

    sudo .venv/bin/python scripts/bench_engine.py [-n 200]
"""
from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.helpers import isolation  # noqa: E402

# own cgroup parent and disk base, claimed before any sandbox module reads them at import
ISOLATED = isolation.claim("sbxbench")

from sandbox.policy import load_policy  # noqa: E402
from sandbox.runtime import sandbox as sbmod  # noqa: E402

BWRAP = ["bwrap", "--unshare-all", "--ro-bind", "/", "/", "--proc", "/proc", "--dev", "/dev",
         "--tmpfs", "/tmp", "/bin/true"]
SANDBOXCTL = str(Path(__file__).resolve().parents[1] / ".venv" / "bin" / "sandboxctl")


def fstype(path: str) -> str:
    """The type of the filesystem `path` is on (the longest mount point above it)."""
    best, kind = "", "?"
    with open("/proc/self/mounts") as f:
        for line in f:
            mp, t = line.split()[1:3]
            mp = mp.replace("\\040", " ")
            if (path == mp or path.startswith(mp.rstrip("/") + "/")) and len(mp) >= len(best):
                best, kind = mp, t
    return kind


def state_base(arg: str | None) -> str | None:
    if arg:
        return arg
    for cand in ("/run", "/dev/shm"):
        if os.path.isdir(cand) and fstype(cand) == "tmpfs":
            return cand
    return None


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


FAILURES: dict[str, list[str]] = defaultdict(list)


def timed_once(fn, label, out: list):
    """Time one run; a failure is counted and shown, not hidden."""
    t0 = time.perf_counter()
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - a failed run is reported, the bench goes on
        FAILURES[label].append(str(e).splitlines()[-1][:200])
        return
    out.append(time.perf_counter() - t0)


async def atimed_once(coro_fn, label, out: list):
    t0 = time.perf_counter()
    try:
        await coro_fn()
    except Exception as e:  # noqa: BLE001 - as timed_once
        FAILURES[label].append(str(e).splitlines()[-1][:200])
        return
    out.append(time.perf_counter() - t0)


async def engine_once(policy, state_dir, steps: dict, destroy_t: list):
    sb = sbmod.Sandbox.create(policy, state_dir=state_dir)
    t0 = time.perf_counter()
    res = await sb.exec(["/bin/true"])
    exec_t = time.perf_counter() - t0
    assert res.exit_code == 0, res.text
    for name, sec in sb.lifecycle.timings().items():
        steps[name].append(sec)
    steps["exec /bin/true"].append(exec_t)
    t0 = time.perf_counter()
    sb.destroy()
    destroy_t.append(time.perf_counter() - t0)
    for name, sec in sb.lifecycle.undo_timings().items():
        steps["undo " + name].append(sec)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("-n", type=int, default=200)
    ap.add_argument("--no-cli", action="store_true", help="leave out the sandboxctl run row")
    ap.add_argument("--state-base", help="where the run's state dir goes (default: a tmpfs)")
    ap.add_argument("--seed", type=int, default=1, help="of the rows' order in each round")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench_engine: run as root")
    policy = load_policy("default")
    results, step_times, destroy_times = {}, {}, {}
    print(f"load average before: {os.getloadavg()}")
    with tempfile.TemporaryDirectory(prefix="sbx-bench-", dir=state_base(args.state_base)) as d:
        state = Path(d)
        print(f"state dir: {state} ({fstype(str(state))})")

        def run_cli():
            r = subprocess.run([SANDBOXCTL, "run", "--state-dir", str(state), "--", "/bin/true"],
                               stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            if r.returncode:
                raise RuntimeError(r.stderr.strip() or f"exit {r.returncode}")

        def run_bwrap():
            subprocess.run(BWRAP, check=True)

        import sandbox.runtime.supervisor as supervisor
        # Facilities are mandatory in the product; the engine-only row measures the
        # engine's own steps by leaving the facility list empty, for comparison only.
        engine_rows = (("engine API (all steps)", sbmod.FACILITY_MODULES, supervisor.make_step),
                       ("engine API (engine steps only)", (), lambda ctx: None))
        labels = ["bwrap"] + ([] if args.no_cli else ["sandboxctl run"]) + \
            [label for label, _, _ in engine_rows]
        results = {label: [] for label in labels}
        for label, _, _ in engine_rows:
            step_times[label], destroy_times[label] = defaultdict(list), []

        async def engine_row(label, modules, sup):
            saved = sbmod.FACILITY_MODULES, supervisor.make_step
            sbmod.FACILITY_MODULES, supervisor.make_step = modules, sup
            try:
                await atimed_once(lambda: engine_once(policy, state, step_times[label],
                                                      destroy_times[label]),
                                  label, results[label])
            finally:
                sbmod.FACILITY_MODULES, supervisor.make_step = saved

        async def rounds():
            order = labels[:]
            rows = {label: (modules, sup) for label, modules, sup in engine_rows}
            rng = random.Random(args.seed)
            for _ in range(args.n):
                rng.shuffle(order)
                for label in order:
                    if label == "bwrap":
                        timed_once(run_bwrap, label, results[label])
                    elif label == "sandboxctl run":
                        timed_once(run_cli, label, results[label])
                    else:
                        await engine_row(label, *rows[label])

        asyncio.run(rounds())
    base = statistics.median(results["bwrap"])
    print(f"/bin/true, {args.n} runs each (milliseconds)")
    print(f"{'':34} {'median':>8} {'p95':>8} {'vs bwrap':>9}")
    for label, xs in results.items():
        if not xs:
            print(f"{label:34} every run failed")
            continue
        med = statistics.median(xs)
        print(f"{label:34} {med*1000:8.2f} {pct(xs, 95)*1000:8.2f} {med/base:8.2f}x")
    for label, errs in FAILURES.items():
        print(f"{label}: {len(errs)} of {args.n} runs failed, e.g.: {errs[0]}")
    for label, steps in step_times.items():
        print(f"\nlifecycle steps, median ms: {label}")
        for name, xs in steps.items():
            print(f"  {name:14} {statistics.median(xs)*1000:8.2f}")
        if destroy_times[label]:
            print(f"  {'destroy':14} {statistics.median(destroy_times[label])*1000:8.2f}")


if __name__ == "__main__":
    main()
    sys.exit(isolation.finish(ISOLATED))
