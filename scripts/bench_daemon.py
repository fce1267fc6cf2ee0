#!/usr/bin/env python3
"""Benchmark: create + exec /bin/true + destroy through sandboxd's socket API.

Measured in the same run, as references:
  - bwrap --unshare-all (no network, no limits configured) running /bin/true;
  - the in-process engine (Sandbox.create / exec / destroy, no daemon, no HTTP), sequential
    and in 8 threads (the engine's own ceiling in one process);
  - the daemon API, 200 times sequentially and with 8 concurrent clients, also with
    `destroy(wait=False)` (the answer comes once the processes are gone; the teardown runs
    in the background and still costs the daemon's CPU, so throughput shows it);
  - revocation of a token with 1 and 8 sandboxes running `sleep`: request to the last
    process gone, seen from outside (scripts/bench_revoke.py has the full table).

Prints medians, p95 and sandboxes per second, where the API time goes (create, exec,
destroy, as seen by the client) and the daemon's CPU per sandbox (all its threads; the
engine runs inside it). Needs root. Usage: scripts/bench_daemon.py [-n 200] [-c 8]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
# Full isolation (cgroup limits, bounded disk, seccomp, no network) with a small disk so
# 8 concurrent sandboxes fit the host's disk budget; the default 10 GiB image changes the
# size of the ext4 image only.
OVERRIDES = {"limits": {"memory": "512MiB", "disk": "64MiB"}}
# The same without the bounded disk (no ext4 image, no loop device): shows that step's share.
NO_DISK = {"limits": {"memory": "512MiB", "disk": 0}}
ERRORS: list[str] = []
sys.path.insert(0, str(REPO))
from tests.helpers import isolation  # noqa: E402

# own cgroup parent and disk base, claimed before any sandbox module reads them at import
ISOLATED = isolation.claim("sbxbench")

from sandbox.client import Client  # noqa: E402
from tests.helpers.daemon import DaemonProc  # noqa: E402

BWRAP = ["bwrap", "--unshare-all", "--die-with-parent", "--ro-bind", "/usr", "/usr",
         "--symlink", "usr/bin", "/bin", "--symlink", "usr/lib", "/lib",
         "--symlink", "usr/lib64", "/lib64", "--proc", "/proc", "--dev", "/dev",
         "--tmpfs", "/tmp", "/bin/true"]


def stats(name: str, times: list[float], wall: float) -> dict:
    times = sorted(times)
    p95 = times[min(len(times) - 1, int(len(times) * 0.95))]
    return {"name": name, "n": len(times), "median_ms": round(statistics.median(times) * 1000, 2),
            "p95_ms": round(p95 * 1000, 2), "per_s": round(len(times) / wall, 1)}


def concurrently(n: int, clients: int, one) -> tuple[list[float], float]:
    """Run `one(worker_index)` n times spread over `clients` threads; (latencies, wall)."""
    times: list[float] = []
    lock = threading.Lock()
    counter = iter(range(n))

    def worker(i):
        while True:
            with lock:
                if next(counter, None) is None:
                    return
            t0 = time.perf_counter()
            try:
                one(i)
            except Exception as e:  # noqa: BLE001 - count it, report it, keep measuring
                with lock:
                    ERRORS.append(f"{type(e).__name__}: {str(e)[:160]}")
                continue
            dt = time.perf_counter() - t0
            with lock:
                times.append(dt)
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return times, time.perf_counter() - t0


def bench_bwrap(n: int, clients: int) -> list[dict]:
    def one(_):
        subprocess.run(BWRAP, check=True)
    seq, wall = concurrently(n, 1, one)
    par, pwall = concurrently(n, clients, one)
    return [stats("bwrap --unshare-all, sequential", seq, wall),
            stats(f"bwrap --unshare-all, {clients} concurrent", par, pwall)]


def bench_engine(n: int, run_dir: Path, overrides: dict, label: str,
                 threads: int = 1) -> list[dict]:
    from sandbox.policy import load_policy
    from sandbox.runtime.sandbox import Sandbox
    policy = load_policy("default", overrides)
    loops = [asyncio.new_event_loop() for _ in range(threads)]

    def one(i):
        sb = Sandbox.create(policy, state_dir=run_dir)
        try:
            res = loops[i].run_until_complete(sb.exec(["/bin/true"]))
            assert res.exit_code == 0, res
        finally:
            sb.destroy()
    try:
        times, wall = concurrently(n, threads, one)
    finally:
        for loop in loops:
            loop.close()
    how = "sequential" if threads == 1 else f"{threads} threads"
    return [stats(f"in-process engine, {how}{label}", times, wall)]


def _cpu_seconds(pid: int) -> float:
    """utime + stime of a process, all its threads (proc(5): fields 14 and 15)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def bench_api(n: int, clients: int, sock: str, overrides: dict = OVERRIDES,
              label: str = "", wait: bool = True,
              pid: int | None = None) -> tuple[list[dict], dict]:
    conns = [Client(sock) for _ in range(clients)]
    parts: dict[str, list[float]] = {"create": [], "exec": [], "destroy": []}
    lock = threading.Lock()

    def one(i):
        c = conns[i]
        t0 = time.perf_counter()
        sid = c.create("default", overrides)["id"]
        t1 = time.perf_counter()
        res = c.exec(sid, ["/bin/true"])
        t2 = time.perf_counter()
        c.destroy(sid, wait=wait)
        t3 = time.perf_counter()
        assert res.exit_code == 0, res
        with lock:
            parts["create"].append(t1 - t0)
            parts["exec"].append(t2 - t1)
            parts["destroy"].append(t3 - t2)
    def med(v):
        return round(statistics.median(v) * 1000, 2) if v else None

    def settled():
        """No sandbox left (background teardowns of wait=False included)."""
        for _ in range(600):
            if not conns[0].list():
                return
            time.sleep(0.05)
    cpu = {}
    c0 = _cpu_seconds(pid) if pid else 0.0
    m0 = time.process_time()     # this process: the clients' own HTTP and JSON work
    seq, wall = concurrently(n, 1, one)
    settled()
    c1 = _cpu_seconds(pid) if pid else 0.0
    m1 = time.process_time()
    breakdown = {k: med(v) for k, v in parts.items()}
    for v in parts.values():
        v.clear()
    par, pwall = concurrently(n, clients, one)
    settled()
    c2 = _cpu_seconds(pid) if pid else 0.0
    m2 = time.process_time()
    breakdown_par = {k: med(v) for k, v in parts.items()}
    for c in conns:
        c.close()
    if pid:
        cpu = {f"daemon_cpu_ms_per_sandbox{label}": {
            "sequential": round((c1 - c0) * 1000 / max(1, len(seq)), 2),
            "concurrent": round((c2 - c1) * 1000 / max(1, len(par)), 2)},
            # the clients share the machine with the daemon (bwrap's rows have no client)
            f"client_cpu_ms_per_sandbox{label}": {
            "sequential": round((m1 - m0) * 1000 / max(1, len(seq)), 2),
            "concurrent": round((m2 - m1) * 1000 / max(1, len(par)), 2)}}
    return ([stats(f"sandboxd API, sequential{label}", seq, wall),
             stats(f"sandboxd API, {clients} concurrent clients{label}", par, pwall)],
            {f"sequential_median_ms{label}": breakdown, f"concurrent_median_ms{label}": breakdown_par,
             **cpu})


def bench_roundtrip(n: int, clients: int, sock: str) -> list[dict]:
    """The daemon's own overhead: one authenticated HTTP round trip (GET /v1/health)."""
    conns = [Client(sock) for _ in range(clients)]
    seq, wall = concurrently(n, 1, lambda i: conns[i].health())
    par, pwall = concurrently(n, clients, lambda i: conns[i].health())
    for c in conns:
        c.close()
    return [stats("API round trip GET /v1/health, sequential", seq, wall),
            stats(f"API round trip GET /v1/health, {clients} concurrent", par, pwall)]


def bench_revoke(sock: str, rounds: int, sizes=(1, 8)) -> list[dict]:
    """Revocation with `sleep` running in each sandbox: request to the last process gone,
    observed from outside through pidfds (scripts/bench_revoke.py), and to the response."""
    import bench_revoke
    out = []
    with Client(sock) as admin:
        for k in sizes:
            res = [bench_revoke.one_round(admin, sock, k) for _ in range(rounds)]
            for key, label in (("gone", "last process gone"), ("response", "response")):
                v = [r[key] for r in res]
                out.append(stats(f"revoke, {k} sandboxes running sleep: request -> {label}",
                                 v, sum(v)))
    return out


def _default_policy_with_disk(pdir: Path, disk: str):
    """The default policy as an operator's own copy with a smaller disk (the host's disk
    budget cannot promise 10 GiB to 8 clients + warm sandboxes + teardowns in flight)."""
    text = (REPO / "policies" / "default.toml").read_text()
    text, k = re.subn(r'(?m)^disk = "[^"]*"', f'disk = "{disk}"', text)
    assert k == 1, "policies/default.toml changed shape"
    (pdir / "default.toml").write_text(text)


def bench_paced(n: int, sock: str, pause: float) -> list[dict]:
    """create + exec + destroy one at a time with `pause` s between them (not timed): creates
    that arrive slower than the pool refills, the case a warm pool is for."""
    times = []
    with Client(sock) as c:
        for _ in range(n):
            time.sleep(pause)
            t0 = time.perf_counter()
            sid = c.create("default")["id"]
            t1 = time.perf_counter()
            assert c.exec(sid, ["/bin/true"]).exit_code == 0
            c.destroy(sid, wait=False)
            times.append((t1 - t0, time.perf_counter() - t0))
    return [stats(f"sandboxd API, one every {pause * 1000:.0f} ms (warm pool): create only",
                  [a for a, _ in times], sum(a for a, _ in times)),
            stats(f"sandboxd API, one every {pause * 1000:.0f} ms (warm pool): create+exec+destroy",
                  [b for _, b in times], sum(b for _, b in times))]


def bench_warm(n: int, clients: int) -> tuple[list[dict], dict, str]:
    """The default policy unchanged (every limit; its disk 1 GiB here) through a daemon
    keeping `clients` warm sandboxes (sandboxd --warm-pool): creates that find one ready
    take it, the others build as usual; says how many were warm (the pool refills in the
    background while the clients run, so a back-to-back loop drains it)."""
    d = DaemonProc(extra_args=("--warm-pool", str(clients)))
    _default_policy_with_disk(d.tmp / "policies", "1GiB")
    d.start()

    def fill():
        with Client(d.socket) as admin:
            for _ in range(1200):             # bounded: 60 s for the pool to fill
                if admin.health()["warm"] >= clients:
                    return
                time.sleep(0.05)
    try:
        fill()
        rows = bench_paced(max(10, n // 4), d.socket, 0.1)
        fill()
        more, breakdown = bench_api(n, clients, d.socket, None, " (warm pool, wait=false)",
                                    wait=False, pid=d.proc.pid)
        rows += more
        with Client(d.socket) as admin:
            recs = admin.audit(action="daemon_create", limit=10000)
        warm = sum(1 for r in recs if r["details"].get("warm"))
        note = (f"warm pool of {clients}: {warm} of {len(recs)} creates got a warm sandbox "
                "(the others were built on demand while the pool refilled)")
    finally:
        left = d.stop()
        d.cleanup()
        if left:
            print(f"daemon left after SIGTERM: {left}", flush=True)
    return rows, breakdown, note


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", type=int, default=200)
    ap.add_argument("-c", "--clients", type=int, default=8)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("bench_daemon: needs root", file=sys.stderr)
        return 2
    rows: list[dict] = []

    def show(new_rows):
        """Print rows as they are measured (a long run keeps what it got)."""
        rows.extend(new_rows)
        if not args.json:
            for r in new_rows:
                print(f"{r['name']:<68} {r['n']:>5} {r['median_ms']:>10} {r['p95_ms']:>8} "
                      f"{r['per_s']:>7}", flush=True)
    if not args.json:
        print(f"{'what':<68} {'n':>5} {'median ms':>10} {'p95 ms':>8} {'per s':>7}", flush=True)
    show(bench_bwrap(args.n, args.clients))
    with tempfile.TemporaryDirectory(prefix=f"sbxt-{os.getpid()}-bench-") as tmp:
        show(bench_engine(args.n, Path(tmp), OVERRIDES, ""))
        show(bench_engine(args.n, Path(tmp), NO_DISK, " (no disk image)"))
        show(bench_engine(args.n, Path(tmp), NO_DISK, " (no disk image)", args.clients))
    d = DaemonProc().start()
    try:
        pid = d.proc.pid                      # unshare execs the daemon: same process
        show(bench_roundtrip(10 * args.n, args.clients, d.socket))
        more, breakdown = bench_api(args.n, args.clients, d.socket, pid=pid)
        show(more)
        more, b2 = bench_api(args.n, args.clients, d.socket, NO_DISK, " (no disk image)",
                             pid=pid)
        show(more)
        breakdown.update(b2)
        more, b3 = bench_api(args.n, args.clients, d.socket, OVERRIDES,
                             " (destroy wait=false)", wait=False, pid=pid)
        show(more)
        breakdown.update(b3)
        show(bench_revoke(d.socket, max(5, args.n // 20)))
        metrics = Client(d.socket).metrics()
    finally:
        left = d.stop()
        d.cleanup()
        if left:
            print(f"daemon left after SIGTERM: {left}", flush=True)
    more, b4, warm_note = bench_warm(args.n, args.clients)
    show(more)
    breakdown.update(b4)
    if args.json:
        print(json.dumps({"rows": rows, "api_breakdown": breakdown, "errors": ERRORS}, indent=1))
        return 0
    print("API time by call (client-side medians, ms) and daemon CPU per sandbox:",
          json.dumps(breakdown))
    hist = [ln for ln in metrics.splitlines() if ln.startswith("sandboxd_create_seconds_")
            and ("_sum" in ln or "_count" in ln)]
    print("daemon-side create:", ", ".join(hist))
    print(warm_note)
    if ERRORS:
        print(f"{len(ERRORS)} failed iterations (not counted above); first: {ERRORS[:3]}")
    return 0


if __name__ == "__main__":
    code = main()
    sys.exit(isolation.finish(ISOLATED) or code)
