#!/usr/bin/env python3
"""Benchmark: the added cost per sandbox of the limits (cgroup create + limits + remove) and
of the bounded disk (image copy + loop attach + mount, and teardown), median of N runs.

Usage (root): .venv/bin/python scripts/bench_cgroups.py [-n 50] [--disk-size 10GiB] [--json]
Uses its own cgroup parent (sbxb-<pid>) and image directory under /var/tmp, removed at the end.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sandbox.kernel import cgroups, disk  # noqa: E402
from sandbox.policy.schema import LimitsPolicy  # noqa: E402
from sandbox.policy.units import parse_size  # noqa: E402


def _ms(samples):
    return {"median_ms": round(statistics.median(samples) * 1000, 3),
            "p90_ms": round(sorted(samples)[int(len(samples) * 0.9) - 1] * 1000, 3),
            "runs": len(samples)}


def bench_cgroups(n: int, limits) -> dict:
    driver = cgroups.driver_for(parent=f"sbxb-{os.getpid()}")
    setup, teardown, with_proc = [], [], []
    try:
        for i in range(n):
            t0 = time.perf_counter()
            cg = driver.create(f"b{i}", limits)
            cg.open_fd()
            t1 = time.perf_counter()
            cg.remove()
            t2 = time.perf_counter()
            setup.append(t1 - t0)
            teardown.append(t2 - t1)
        for i in range(max(5, n // 5)):      # teardown with a live process to kill
            cg = driver.create(f"p{i}", limits)
            p = subprocess.Popen(["sleep", "100"])
            cg.add(p.pid)
            t0 = time.perf_counter()
            cg.remove()
            with_proc.append(time.perf_counter() - t0)
            p.wait()
    finally:
        driver.remove_parent()
    return {"layout": driver.layout.kind, "setup": _ms(setup), "teardown_empty": _ms(teardown),
            "teardown_with_process": _ms(with_proc),
            "total_median_ms": round((statistics.median(setup) + statistics.median(teardown)) * 1000, 3)}


def bench_disk(n: int, size: int) -> dict:
    base = Path(f"/var/tmp/sbxb-{os.getpid()}-disk")
    setup, teardown = [], []
    try:
        t0 = time.perf_counter()
        disk._template(base, size)
        first = time.perf_counter() - t0
        for i in range(n):
            t0 = time.perf_counter()
            d = disk.create(f"d{i}", size, base=base)
            t1 = time.perf_counter()
            d.remove()
            teardown.append(time.perf_counter() - t1)
            setup.append(t1 - t0)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return {"size_bytes": size, "template_mkfs_ms": round(first * 1000, 3), "setup": _ms(setup),
            "teardown": _ms(teardown),
            "total_median_ms": round((statistics.median(setup) + statistics.median(teardown)) * 1000, 3)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", type=int, default=50)
    ap.add_argument("--disk-size", default="10GiB")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench_cgroups: needs root")
    limits = LimitsPolicy()
    out = {"cgroups": bench_cgroups(a.n, limits),
           "disk": bench_disk(max(5, a.n // 5), parse_size(a.disk_size))}
    if a.json:
        print(json.dumps(out, indent=2))
        return
    c, d = out["cgroups"], out["disk"]
    print(f"cgroups ({c['layout']}): setup {c['setup']['median_ms']} ms, teardown "
          f"{c['teardown_empty']['median_ms']} ms (with a process to kill "
          f"{c['teardown_with_process']['median_ms']} ms); added per sandbox "
          f"{c['total_median_ms']} ms median over {c['setup']['runs']} runs")
    print(f"disk ({d['size_bytes'] >> 20} MiB ext4 image): template mkfs once "
          f"{d['template_mkfs_ms']} ms; setup {d['setup']['median_ms']} ms, teardown "
          f"{d['teardown']['median_ms']} ms; added per sandbox {d['total_median_ms']} ms "
          f"median over {d['setup']['runs']} runs")


if __name__ == "__main__":
    main()
