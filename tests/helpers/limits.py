"""Helpers for the resource-limit tests: small limits, a per-test cgroup parent, and
processes started in a cgroup before they run anything (they wait on stdin, get moved
in, then exec)."""
from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import replace

from sandbox.policy.schema import LimitsPolicy

MiB = 1024**2
SMALL = LimitsPolicy(cpus=0.5, memory=64 * MiB, swap=0, disk=64 * MiB, pids=32)

# Programs the tests run: an attacker's view of resource exhaustion.
MEMORY_BOMB = ("import sys\nchunks = []\n"
               "for _ in range(4096):\n    chunks.append(bytearray(1024 * 1024))\n"
               "print('survived', flush=True)\n")
FORK_BOMB = "bomb() { bomb | bomb & }; bomb; sleep 30"
SPINNER = "import time\nend = time.monotonic() + 30\nwhile time.monotonic() < end: pass\n"
DOUBLE_FORK = "(setsid sleep 1000 >/dev/null 2>&1 &); echo started"


def small_limits(**kw) -> LimitsPolicy:
    return replace(SMALL, **kw)


def parent_name(tag: str = "") -> str:
    return f"sbxt-{os.getpid()}{tag}"


def start_in(cg, argv, **kw) -> subprocess.Popen:
    """Start argv inside cgroup `cg`: the shell waits for a line, is moved in, then execs."""
    p = subprocess.Popen(["/bin/sh", "-c", 'read _ ; exec "$@"', "sh", *argv],
                         stdin=subprocess.PIPE, **kw)
    try:
        cg.add(p.pid)
        p.stdin.write(b"go\n")
        p.stdin.close()
        p.stdin = None
    except BaseException:
        p.kill()
        p.wait()
        raise
    return p


def python(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def alive(pid: int) -> bool:
    """True while pid exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


# ---------------------------------------------------------------- checks shared by v1 and v2 tests
# tests/integration (hybrid host) and tests/vm (cgroup v2 VM) run the same checks on a driver.

import time  # noqa: E402

from sandbox.kernel import cgroups  # noqa: E402


class Made:
    """Cgroups a test made, removed (and verified gone) at the end, also on failure."""

    def __init__(self, driver):
        self.driver = driver
        self.cgs = []
        self.procs = []

    def create(self, name, limits=SMALL):
        cg = self.driver.create(f"{name}", limits)
        self.cgs.append(cg)
        return cg

    def start(self, cg, argv, **kw):
        p = start_in(cg, argv, **kw)
        self.procs.append(p)
        return p

    def close(self):
        errors = []
        for cg in self.cgs:
            try:
                cg.remove()
            except Exception as e:  # noqa: BLE001 - report every leftover
                errors.append(str(e))
        for p in self.procs:
            if p.poll() is None:
                p.kill()
            p.wait(timeout=10)
        try:
            self.driver.remove_parent()
        except Exception as e:  # noqa: BLE001
            errors.append(str(e))
        assert not errors, errors


def check_fork_bomb(made: Made):
    cg = made.create("forkbomb")
    p = made.start(cg, ["/bin/bash", "-c", FORK_BOMB], stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    for _ in range(200):   # bounded: up to ~10 s for the bomb to hit the wall
        if cg.events()["pids_max_hits"]:
            break
        time.sleep(0.05)
    ev, use = cg.events(), cg.usage()
    assert ev["pids_max_hits"] > 0, "the fork bomb never hit pids.max"
    assert use["pids_current"] <= SMALL.pids and use["pids_peak"] <= SMALL.pids
    # The host stays responsive: it can still start a process of its own.
    assert subprocess.run(["/bin/true"], timeout=10).returncode == 0
    assert cg.reason() == ("pids", f"stopped: process limit {SMALL.pids} reached")
    cg.kill()
    assert cg.pids() == []
    p.wait(timeout=10)


def check_memory_bomb(made: Made):
    cg = made.create("membomb")
    p = made.start(cg, python(MEMORY_BOMB), stdout=subprocess.PIPE)
    out, _ = p.communicate(timeout=60)
    assert b"survived" not in out
    assert p.returncode == -9, f"memory bomb ended with {p.returncode}, not SIGKILL"
    ev = cg.events()
    assert ev["oom_kills"] >= 1
    assert cg.usage()["memory_peak"] <= SMALL.memory
    assert cg.reason() == ("oom", "killed: memory limit 64 MiB reached")


def favour_cpu(cg):
    """Give the cgroup and its parent the highest CPU weight, so that on a host loaded by
    other tests the spinner still finds the half CPU its quota allows: the quota is the
    ceiling under test, not the scheduler's fairness (v1 cpu.shares, v2 cpu.weight)."""
    if "cpu" in cg.v1_dirs:
        for d in (cg.v1_dirs["cpu"].parent, cg.v1_dirs["cpu"]):
            (d / "cpu.shares").write_text("262144")
    else:
        for d in (cg.v2_dir.parent, cg.v2_dir):
            (d / "cpu.weight").write_text("10000")


def check_cpu_quota(made: Made):
    cg = made.create("spinner")
    favour_cpu(cg)
    made.start(cg, python(SPINNER))
    time.sleep(0.3)                       # let it start
    c0, t0 = cg.usage()["cpu_seconds"], time.monotonic()
    time.sleep(2.0)
    share = (cg.usage()["cpu_seconds"] - c0) / (time.monotonic() - t0)
    assert 0.35 <= share <= 0.65, f"spinner under a 0.5-CPU quota got {share:.2f} CPU"
    cg.kill()


def check_double_fork_killed(made: Made):
    cg = made.create("detach")
    p = made.start(cg, ["/bin/sh", "-c", DOUBLE_FORK], stdout=subprocess.PIPE)
    assert p.communicate(timeout=10)[0].strip() == b"started"
    orphans = cg.pids()
    assert orphans, "the detached grandchild should still be in the cgroup"
    assert all(alive(pid) for pid in orphans)
    cg.remove()
    made.cgs.remove(cg)
    for _ in range(200):
        if not any(alive(pid) for pid in orphans):
            break
        time.sleep(0.01)
    assert not any(alive(pid) for pid in orphans), "a detached process survived destroy"
    assert not any(path.exists() for path in cg.paths())


def check_freeze_thaw(made: Made):
    cg = made.create("freeze")
    made.start(cg, python(SPINNER))
    time.sleep(0.2)
    cg.freeze()
    c0 = cg.usage()["cpu_seconds"]
    time.sleep(0.3)
    assert cg.usage()["cpu_seconds"] - c0 < 0.05, "a frozen cgroup kept running"
    cg.thaw()
    cg.kill()
    assert cg.pids() == []


def without_controller(layout, missing: str):
    """The host's layout as if `missing` were not there (a host that lacks it or does not
    delegate it)."""
    if layout.kind == "v2":
        return cgroups.Layout("v2", layout.unified, layout.v2_controllers - {missing}, {},
                              layout.swap_bytes)
    v1 = {k: v for k, v in layout.v1.items() if k != missing}
    return cgroups.Layout(layout.kind, layout.unified, layout.v2_controllers, v1, layout.swap_bytes)


def cgroup_roots(layout) -> list:
    """Every hierarchy root a sandbox cgroup is made under."""
    return [layout.unified] + ([] if layout.kind == "v2" else list(layout.v1.values()))


def check_missing_controller_refused(layout, driver_cls, missing: str):
    """A layout without `missing` must refuse a policy needing it, naming the controller."""
    import pytest
    from sandbox.errors import CgroupError
    drv = driver_cls(without_controller(layout, missing), parent=parent_name("-refused"))
    with pytest.raises(CgroupError, match=f"'{missing}'"):
        drv.create("refused", SMALL)
