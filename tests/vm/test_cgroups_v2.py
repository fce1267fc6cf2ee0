"""The cgroup-v2 driver on a pure v2 kernel: run by scripts/vm-test inside a VM booted with
cgroup_no_v1=all (as root). The same checks as tests/integration/test_cgroups.py (hybrid),
from tests/helpers/limits.py. On a host that is not pure v2 these fail loudly, never skip:
scripts/test runs them only in the VM."""
import pytest

from sandbox.kernel import cgroups
from tests.helpers import limits as L
# The driver-independent checks, collected again here with this module's v2 `made` fixture.
from tests.integration.test_cgroups import (  # noqa: F401
    test_cpu_spinner_gets_half_a_cpu, test_double_fork_and_detach_is_killed_on_remove,
    test_fork_bomb_stops_at_pids_limit, test_freeze_stops_and_thaw_resumes,
    test_memory_bomb_is_oom_killed_and_reported, test_per_command_figures)


def _v2_layout():
    layout = cgroups.host_layout()
    if layout.kind != "v2":
        pytest.fail(f"tests/vm needs a cgroup-v2 host (this one is {layout.kind}); "
                    "run them with scripts/vm-test")
    return layout


@pytest.fixture
def made():
    m = L.Made(cgroups.V2Driver(_v2_layout(), parent=L.parent_name()))
    try:
        yield m
    finally:
        m.close()


def test_layout_is_v2():
    info = cgroups.describe(_v2_layout())
    assert info["layout"] == "v2" and info["driver"] == "V2Driver"
    assert all(info["enforceable"][k] for k in ("memory", "pids", "cpus", "freeze", "kill"))


def test_limits_are_written(made):
    cg = made.create("written")
    d = cg.v2_dir
    assert int((d / "memory.max").read_text()) == L.SMALL.memory
    assert (d / "memory.oom.group").read_text().strip() == "1"
    assert (d / "pids.max").read_text().strip() == str(L.SMALL.pids)
    assert (d / "cpu.max").read_text().split() == ["50000", "100000"]
    if (d / "memory.swap.max").exists():
        assert (d / "memory.swap.max").read_text().strip() == "0"
    assert cg.v1_tasks() == [] and isinstance(cg.open_fd(), int)


@pytest.mark.parametrize("missing", ["pids", "memory", "cpu"])
def test_policy_needing_a_missing_controller_is_refused(missing):
    L.check_missing_controller_refused(_v2_layout(), cgroups.V2Driver, missing)
