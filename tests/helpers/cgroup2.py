"""cgroup v2 helpers for the tests that run in the VM (tests/vm/): what the layout lacks, and
how to empty and remove a test's cgroup. Plain file operations on the cgroup2 interface
(Documentation/admin-guide/cgroup-v2.rst); the driver under test is never used here."""
from __future__ import annotations

import time
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
NEEDED_CONTROLLERS = ("memory", "pids", "cpu")


def _mounts() -> list[tuple[str, str]]:
    """(mount point, fs type) of every mount, from /proc/self/mountinfo (proc(5))."""
    out = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, _, right = line.partition(" - ")
        out.append((left.split()[4], right.split()[0]))
    return out


def cgroup_layout_problems() -> list[str]:
    """Why this machine is not a pure cgroup-v2 host with the controllers the tests need."""
    problems = []
    mounts = _mounts()
    fstypes = [t for m, t in mounts if m == str(CGROUP_ROOT)]
    if not fstypes or fstypes[-1] != "cgroup2":
        problems.append(f"{CGROUP_ROOT} is {fstypes[-1] if fstypes else 'not mounted'}, not cgroup2")
    v1 = sorted(m for m, t in mounts if t == "cgroup")
    if v1:
        problems.append("cgroup v1 hierarchies are mounted: " + ", ".join(v1))
    # /proc/cgroups: a non-zero hierarchy id means the controller is bound to a v1 hierarchy
    # (cgroups(7)); cgroup_no_v1=all keeps them all at 0.
    for line in Path("/proc/cgroups").read_text().splitlines()[1:]:
        name, hierarchy = line.split()[:2]
        if hierarchy != "0":
            problems.append(f"controller {name} is bound to v1 hierarchy {hierarchy}")
    try:
        have = (CGROUP_ROOT / "cgroup.controllers").read_text().split()
    except OSError as e:
        have = []
        problems.append(f"cannot read {CGROUP_ROOT}/cgroup.controllers: {e.strerror}")
    missing = [c for c in NEEDED_CONTROLLERS if c not in have]
    if missing:
        problems.append("controllers missing from the cgroup2 root: " + ", ".join(missing))
    return problems


def wait_until_empty(cg: Path, deadline_s: float = 10.0) -> bool:
    """Poll cgroup.events until 'populated 0' (cgroup-v2.rst); bounded."""
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if "populated 0" in (cg / "cgroup.events").read_text():
            return True
        time.sleep(0.02)
    return False


def remove_cgroup(cg: Path) -> None:
    """Kill everything in cg and below, then remove the tree bottom-up."""
    if not cg.exists():
        return
    for child in [p for p in cg.iterdir() if p.is_dir()]:
        remove_cgroup(child)
    (cg / "cgroup.kill").write_text("1")
    wait_until_empty(cg)
    cg.rmdir()
