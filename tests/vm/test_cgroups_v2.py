"""The cgroup-v2 driver on a pure v2 kernel: run by scripts/vm-test inside a VM booted with
cgroup_no_v1=all (as root). The same checks as tests/integration/test_cgroups.py (hybrid),
from tests/helpers/limits.py. On a host that is not pure v2 these fail loudly, never skip:
scripts/test runs them only in the VM."""
import pytest

from sandbox.kernel import cgroups
from tests.helpers import limits as L


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
    assert cg.v1_procs() == [] and isinstance(cg.open_fd(), int)


def test_fork_bomb_stops_at_pids_limit(made):
    L.check_fork_bomb(made)


def test_memory_bomb_is_oom_killed_and_reported(made):
    L.check_memory_bomb(made)


def test_cpu_spinner_gets_half_a_cpu(made):
    L.check_cpu_quota(made)


def test_double_fork_and_detach_is_killed_on_remove(made):
    L.check_double_fork_killed(made)


def test_freeze_stops_and_thaw_resumes(made):
    L.check_freeze_thaw(made)


@pytest.mark.parametrize("missing", ["pids", "memory", "cpu"])
def test_policy_needing_a_missing_controller_is_refused(missing):
    L.check_missing_controller_refused(_v2_layout(), cgroups.V2Driver, missing)


def test_per_command_figures(made):
    cg = made.create("percmd")
    mark = cg.mark()
    p = made.start(cg, L.python("x = bytearray(16 * 1024 * 1024)"))
    p.wait(timeout=30)
    fig = cg.since(mark)
    assert fig["oom_kills"] == 0 and fig["pids_max_hits"] == 0
    assert fig["memory_peak"] >= 16 * L.MiB and fig["cpu_seconds"] > 0
