"""Tests that run only inside the cgroup-v2 VM (scripts/vm-test boots it with cgroup_no_v1=all).

Every test here first asserts that the machine really is pure cgroup v2: /sys/fs/cgroup is a
cgroup2 mount offering the memory, pids and cpu controllers, and no v1 hierarchy exists. On the
hybrid host (or a VM booted wrongly) every test fails with the reason, so a v2 test can never
pass on the wrong layout.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.helpers.cgroup2 import (CGROUP_ROOT, NEEDED_CONTROLLERS, cgroup_layout_problems,
                                  remove_cgroup)


@pytest.fixture(scope="session", autouse=True)
def pure_cgroup_v2():
    problems = cgroup_layout_problems()
    if problems:
        pytest.fail("tests/vm needs a pure cgroup-v2 machine (run them with scripts/vm-test): "
                    + "; ".join(problems), pytrace=False)
    return CGROUP_ROOT


@pytest.fixture
def make_cgroup(pure_cgroup_v2):
    """make_cgroup(name) -> a fresh child cgroup of the root, sbxt-<pid>-<name>, with the
    memory, pids and cpu controllers enabled for it; removed (processes killed) afterwards."""
    made = []

    def make(name: str) -> Path:
        subtree = pure_cgroup_v2 / "cgroup.subtree_control"
        subtree.write_text(" ".join("+" + c for c in NEEDED_CONTROLLERS))
        cg = pure_cgroup_v2 / f"sbxt-{os.getpid()}-{name}"
        cg.mkdir()
        made.append(cg)
        return cg

    try:
        yield make
    finally:
        for cg in reversed(made):
            remove_cgroup(cg)
