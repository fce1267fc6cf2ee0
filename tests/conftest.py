"""Shared test setup. Integration, escape and VM tests need root and the real kernel:
without root they fail loudly (never skip), so CI can never pass by not testing."""
import os
import shutil
import tempfile
from pathlib import Path

import pytest

# Every sandbox a test run makes, in-process or through a daemon it starts (subprocesses
# inherit the environment), puts its cgroups under a parent of this run's own and its disk
# images in a directory of this run's own. At the end both must be empty: anything left is
# a leak, reported and failing the run (pytest_sessionfinish below). Set before any sandbox
# module is imported, since they read these at import.
_RUN = f"sbxt-{os.getpid()}-run"
os.environ.setdefault("SANDBOXD_CGROUP_PARENT", _RUN)
os.environ.setdefault("SANDBOXD_DISK_BASE", tempfile.mkdtemp(prefix=f"{_RUN}-disks-"))

ROOT_DIRS = ("integration", "escape", "vm")


def pytest_collection_modifyitems(config, items):
    for item in items:
        parts = Path(str(item.fspath)).parts
        if any(d in parts for d in ROOT_DIRS):
            item.add_marker(pytest.mark.root)


@pytest.fixture(autouse=True)
def _require_root(request):
    if request.node.get_closest_marker("root") and os.geteuid() != 0:
        pytest.fail("this test needs root and the real kernel; run it as root (CI does)")


def _cgroup_parents() -> list[Path]:
    """This run's parent in every cgroup hierarchy: /sys/fs/cgroup itself on a v2 host,
    each mounted hierarchy under it (cpu, memory, ..., unified) on a hybrid one."""
    parent = os.environ["SANDBOXD_CGROUP_PARENT"]
    root = Path("/sys/fs/cgroup")
    hierarchies = ([root] if (root / "cgroup.procs").exists()
                   else [h for h in root.iterdir() if (h / "cgroup.procs").exists()])
    return [h / parent for h in hierarchies if (h / parent).is_dir()]


def _leftovers() -> list[str]:
    left = []
    for d in _cgroup_parents():
        left += [f"cgroup {c}" for c in sorted(d.iterdir()) if c.is_dir()]
    base = Path(os.environ["SANDBOXD_DISK_BASE"])
    for sub in ("images", "mnt"):
        if (base / sub).is_dir():
            left += [f"disk {p}" for p in sorted((base / sub).iterdir())]
    return left


def pytest_sessionfinish(session, exitstatus):
    """Nothing lost, nothing leaked: this run's cgroup parent and disk base must be empty.
    Empty parents are removed; a leak fails the run and is left for inspection."""
    if os.environ.get("SANDBOXD_CGROUP_PARENT") != _RUN:
        return                      # the caller chose its own parent and base: theirs to check
    if os.geteuid() != 0:           # no sandbox can have been made: just drop the empty base
        shutil.rmtree(os.environ["SANDBOXD_DISK_BASE"], ignore_errors=True)
        return
    left = _leftovers()
    if left:
        print("\nLEAKED by this test run (sandboxes not fully destroyed):\n  " + "\n  ".join(left))
        session.exitstatus = 1
        return
    for d in _cgroup_parents():
        try:
            d.rmdir()
        except FileNotFoundError:
            pass
    shutil.rmtree(os.environ["SANDBOXD_DISK_BASE"], ignore_errors=True)
