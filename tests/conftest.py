"""Shared test setup. Integration, escape and VM tests need root and the real kernel:
without root they fail loudly (never skip), so CI can never pass by not testing."""
import os
from pathlib import Path

import pytest

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
