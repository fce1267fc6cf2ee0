#!/usr/bin/env python3
"""Benchmark: network setup + teardown per sandbox (median), in-process, as root.

The host side runs in a namespace this script creates (`sbxb-<pid>-host`), never in the
real root netns; everything is removed at the end, also on failure.
    .venv/bin/python scripts/bench_network.py [-n 30]
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sandbox.audit.sink import NULL_SINK  # noqa: E402
from sandbox.kernel import network  # noqa: E402
from sandbox.policy.schema import NetworkPolicy, Policy  # noqa: E402


def run(*argv):
    subprocess.run(argv, check=True, capture_output=True, timeout=30)


def bench(n: int, mode: str, **pol) -> tuple[list[float], list[float]]:
    policy = Policy(network=NetworkPolicy(mode=mode, **pol))
    setups, teardowns = [], []
    for i in range(n):
        ctx = SimpleNamespace(id=f"b{os.getpid()}{mode[0]}{i}", policy=policy,
                              plan=SimpleNamespace(netns_fd=None), audit=NULL_SINK,
                              intent=None, extra={})
        t0 = time.perf_counter()
        h = network.setup(ctx)
        t1 = time.perf_counter()
        network.teardown(h)
        t2 = time.perf_counter()
        setups.append(t1 - t0)
        teardowns.append(t2 - t1)
    return setups, teardowns


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("-n", type=int, default=30)
    args = ap.parse_args()
    host = f"sbxb-{os.getpid()}-host"
    nsdir = f"/run/sbxb-{os.getpid()}-netns"
    run("ip", "netns", "add", host)
    try:
        run("ip", "netns", "exec", host, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        network.configure(host_netns=f"/run/netns/{host}", netns_dir=nsdir)
        network.HostSide.get()  # the worker thread starts once per daemon: not per sandbox
        cases = [("loopback", {}),
                 ("egress", {"allow": ("api.example.test", "*.pypi.org", "192.0.2.1:8443"),
                             "dns_upstream": ("127.0.0.1",)}),
                 ("egress", {"allow": ("api.example.test",), "rate": "10mbit",
                             "dns_upstream": ("127.0.0.1",)})]
        print(f"network setup + teardown per sandbox, median of {args.n} (ms)")
        for mode, pol in cases:
            if "rate" in pol:
                from sandbox.policy.units import parse_rate
                pol = {**pol, "rate": parse_rate(pol["rate"])}
            bench(2, mode, **pol)  # warm up imports and caches
            s, t = bench(args.n, mode, **pol)
            label = mode + (" +rate" if "rate" in pol else "")
            print(f"  {label:16s} setup {statistics.median(s) * 1000:7.2f}  "
                  f"teardown {statistics.median(t) * 1000:7.2f}  "
                  f"total {statistics.median([a + b for a, b in zip(s, t)]) * 1000:7.2f}")
    finally:
        subprocess.run(["ip", "netns", "del", host], capture_output=True)
        if os.path.isdir(nsdir):
            for name in os.listdir(nsdir):
                subprocess.run(["umount", "-l", f"{nsdir}/{name}"], capture_output=True)
                os.unlink(f"{nsdir}/{name}")
            os.rmdir(nsdir)


if __name__ == "__main__":
    main()
