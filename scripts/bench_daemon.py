#!/usr/bin/env python3
"""Benchmark: create + exec /bin/true + destroy through sandboxd's socket API.

Measured in the same run, as references:
  - bwrap --unshare-all (no network, no limits configured) running /bin/true;
  - the in-process engine (Sandbox.create / exec / destroy, no daemon, no HTTP);
  - the daemon API, 200 times sequentially and with 8 concurrent clients.

Prints medians, p95 and sandboxes per second, plus where the API time goes (create, exec,
destroy, as seen by the client). Needs root. Usage: scripts/bench_daemon.py [-n 200] [-c 8]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Full isolation (cgroup limits, bounded disk, seccomp, no network) with a small disk so
# 8 concurrent sandboxes fit the host's disk budget; the default 10 GiB image changes the
# size of the ext4 image only.
OVERRIDES = {"limits": {"memory": "512MiB", "disk": "64MiB"}}
# The same without the bounded disk (no ext4 image, no loop device): shows that step's share.
NO_DISK = {"limits": {"memory": "512MiB", "disk": 0}}
ERRORS: list[str] = []
sys.path.insert(0, str(REPO))

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


def bench_engine(n: int, run_dir: Path, overrides: dict, label: str) -> list[dict]:
    from sandbox.policy import load_policy
    from sandbox.runtime.sandbox import Sandbox
    policy = load_policy("default", overrides)
    loop = asyncio.new_event_loop()

    def one(_):
        sb = Sandbox.create(policy, state_dir=run_dir)
        try:
            res = loop.run_until_complete(sb.exec(["/bin/true"]))
            assert res.exit_code == 0, res
        finally:
            sb.destroy()
    try:
        times, wall = concurrently(n, 1, one)
    finally:
        loop.close()
    return [stats(f"in-process engine, sequential{label}", times, wall)]


def bench_api(n: int, clients: int, sock: str, overrides: dict = OVERRIDES,
              label: str = "") -> tuple[list[dict], dict]:
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
        c.destroy(sid)
        t3 = time.perf_counter()
        assert res.exit_code == 0, res
        with lock:
            parts["create"].append(t1 - t0)
            parts["exec"].append(t2 - t1)
            parts["destroy"].append(t3 - t2)
    def med(v):
        return round(statistics.median(v) * 1000, 2) if v else None
    seq, wall = concurrently(n, 1, one)
    breakdown = {k: med(v) for k, v in parts.items()}
    for v in parts.values():
        v.clear()
    par, pwall = concurrently(n, clients, one)
    breakdown_par = {k: med(v) for k, v in parts.items()}
    for c in conns:
        c.close()
    return ([stats(f"sandboxd API, sequential{label}", seq, wall),
             stats(f"sandboxd API, {clients} concurrent clients{label}", par, pwall)],
            {f"sequential_median_ms{label}": breakdown, f"concurrent_median_ms{label}": breakdown_par})


def bench_roundtrip(n: int, clients: int, sock: str) -> list[dict]:
    """The daemon's own overhead: one authenticated HTTP round trip (GET /v1/health)."""
    conns = [Client(sock) for _ in range(clients)]
    seq, wall = concurrently(n, 1, lambda i: conns[i].health())
    par, pwall = concurrently(n, clients, lambda i: conns[i].health())
    for c in conns:
        c.close()
    return [stats("API round trip GET /v1/health, sequential", seq, wall),
            stats(f"API round trip GET /v1/health, {clients} concurrent", par, pwall)]


def bench_revoke(sock: str, rounds: int, per_token: int = 2) -> list[dict]:
    """Revocation: request -> every process of the token's sandboxes gone. The daemon
    reports kill_ms (cgroup.kill of each sandbox until its cgroup.events says empty); the
    client-side time adds the HTTP round trip."""
    admin = Client(sock)
    server, client = [], []
    for _ in range(rounds):
        tok = admin.grant_token(name="bench-revoke", ceiling={"memory": "1GiB"})
        with Client(sock, token=tok["token"]) as c:
            for _ in range(per_token):
                c.create("default", OVERRIDES)
        t0 = time.perf_counter()
        out = admin.revoke_token(tok["id"])
        client.append(time.perf_counter() - t0)
        server.append(out["kill_ms"] / 1000)
        for _ in range(200):                 # wait for the background destroys
            if not admin.list():
                break
            time.sleep(0.05)
    admin.close()
    return [stats(f"revoke, {per_token} sandboxes: kill until empty (daemon)", server, sum(server)),
            stats(f"revoke, {per_token} sandboxes: request to response (client)", client,
                  sum(client))]


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
                print(f"{r['name']:<58} {r['n']:>5} {r['median_ms']:>10} {r['p95_ms']:>8} "
                      f"{r['per_s']:>7}", flush=True)
    if not args.json:
        print(f"{'what':<58} {'n':>5} {'median ms':>10} {'p95 ms':>8} {'per s':>7}", flush=True)
    show(bench_bwrap(args.n, args.clients))
    with tempfile.TemporaryDirectory(prefix=f"sbxt-{os.getpid()}-bench-") as tmp:
        show(bench_engine(args.n, Path(tmp), OVERRIDES, ""))
        show(bench_engine(args.n, Path(tmp), NO_DISK, " (no disk image)"))
    d = DaemonProc().start()
    try:
        show(bench_roundtrip(10 * args.n, args.clients, d.socket))
        more, breakdown = bench_api(args.n, args.clients, d.socket)
        show(more)
        more, b2 = bench_api(args.n, args.clients, d.socket, NO_DISK, " (no disk image)")
        show(more)
        breakdown.update(b2)
        show(bench_revoke(d.socket, max(5, args.n // 10)))
        metrics = Client(d.socket).metrics()
    finally:
        left = d.stop()
        d.cleanup()
        if left:
            print(f"daemon left after SIGTERM: {left}", flush=True)
    if args.json:
        print(json.dumps({"rows": rows, "api_breakdown": breakdown, "errors": ERRORS}, indent=1))
        return 0
    print("API time by call (client-side medians, ms):", json.dumps(breakdown))
    hist = [ln for ln in metrics.splitlines() if ln.startswith("sandboxd_create_seconds_")
            and ("_sum" in ln or "_count" in ln)]
    print("daemon-side create:", ", ".join(hist))
    if ERRORS:
        print(f"{len(ERRORS)} failed iterations (not counted above); first: {ERRORS[:3]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
