"""A cgroup parent and a disk base of one run's own (a test session, a benchmark, the soak).

Every sandbox the run makes, in-process or through a daemon it starts (subprocesses inherit
the environment), puts its cgroups under SANDBOXD_CGROUP_PARENT and its disk images under
SANDBOXD_DISK_BASE. At the end both must be empty: anything left is a leak, reported, and
left for inspection; empty ones are removed. claim() must run before any sandbox module is
imported: they read these variables at import.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path


def claim(tag: str) -> bool:
    """Give this run its own parent and base unless the caller already chose them; True
    when they are ours (then release() checks and removes them)."""
    run = f"{tag}-{os.getpid()}-run"
    if os.environ.get("SANDBOXD_CGROUP_PARENT"):
        return False
    os.environ["SANDBOXD_CGROUP_PARENT"] = run
    os.environ["SANDBOXD_DISK_BASE"] = tempfile.mkdtemp(prefix=f"{run}-disks-")
    return True


def finish(ours: bool) -> int:
    """For scripts: release what claim() gave this run; 1 (and what leaked, printed) when
    something was left, else 0."""
    if not ours:
        return 0
    left = release()
    if left:
        print("LEAKED by this run (left for inspection):\n  " + "\n  ".join(left), flush=True)
        return 1
    return 0


def cgroup_parents() -> list[Path]:
    """The run's parent in every cgroup hierarchy: /sys/fs/cgroup itself on a v2 host,
    each mounted hierarchy under it (cpu, memory, ..., unified) on a hybrid one."""
    parent = os.environ["SANDBOXD_CGROUP_PARENT"]
    root = Path("/sys/fs/cgroup")
    hierarchies = ([root] if (root / "cgroup.procs").exists()
                   else [h for h in root.iterdir() if (h / "cgroup.procs").exists()])
    return [h / parent for h in hierarchies if (h / parent).is_dir()]


def leftovers() -> list[str]:
    left = []
    for d in cgroup_parents():
        left += [f"cgroup {c}" for c in sorted(d.iterdir()) if c.is_dir()]
    base = Path(os.environ["SANDBOXD_DISK_BASE"])
    for sub in ("images", "mnt"):
        if (base / sub).is_dir():
            left += [f"disk {p}" for p in sorted((base / sub).iterdir())]
    return left


def release() -> list[str]:
    """Check and remove the run's parent and base; returns what was leaked (then nothing is
    removed, so it can be inspected)."""
    if os.geteuid() != 0:           # no sandbox can have been made: just drop the empty base
        shutil.rmtree(os.environ["SANDBOXD_DISK_BASE"], ignore_errors=True)
        return []
    left = leftovers()
    if left:
        return left
    for d in cgroup_parents():
        try:
            d.rmdir()
        except FileNotFoundError:
            pass
    shutil.rmtree(os.environ["SANDBOXD_DISK_BASE"], ignore_errors=True)
    return []
