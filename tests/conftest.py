"""Shared test setup. Integration, escape and VM tests need root and the real kernel:
without root they fail loudly (never skip), so CI can never pass by not testing."""
import os
from pathlib import Path

import pytest

# Every sandbox a test run makes puts its cgroups under a parent of this run's own and its
# disk images in a directory of this run's own (tests/helpers/isolation.py); at the end both
# must be empty (pytest_sessionfinish below). Claimed before any sandbox module is imported.
from tests.helpers import isolation  # noqa: E402

_OURS = isolation.claim("sbxt")

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


def pytest_sessionfinish(session, exitstatus):
    """Nothing lost, nothing leaked: this run's cgroup parent and disk base must be empty.
    Empty parents are removed; a leak fails the run and is left for inspection."""
    if not _OURS:
        return                      # the caller chose its own parent and base: theirs to check
    left = isolation.release()
    if left:
        print("\nLEAKED by this test run (sandboxes not fully destroyed):\n  " + "\n  ".join(left))
        session.exitstatus = 1
