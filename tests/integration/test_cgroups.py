"""The v1/hybrid cgroup driver on this host's real kernel, with processes the test starts
and moves in before they run anything (the engine clones straight into the cgroups; the
tests through the Sandbox API live in test_limits_sandbox.py)."""
import pytest

from sandbox.errors import CgroupError
from sandbox.kernel import cgroups
from tests.helpers import limits as L


@pytest.fixture
def made():
    layout = cgroups.host_layout()
    assert layout.kind in ("hybrid", "v1"), f"this suite expects the hybrid host, got {layout.kind}"
    m = L.Made(cgroups.V1HybridDriver(layout, parent=L.parent_name()))
    try:
        yield m
    finally:
        m.close()


def test_layout_is_detected_as_hybrid():
    info = cgroups.describe()
    assert info["layout"] == "hybrid" and info["driver"] == "V1HybridDriver"
    assert all(info["enforceable"][k] for k in ("memory", "pids", "cpus", "freeze", "kill"))
    rows = cgroups.probe()
    assert all(ok for _, ok, _ in rows), rows


def test_limits_are_written(made):
    cg = made.create("written")
    v1 = cg.v1_dirs
    assert int((v1["memory"] / "memory.limit_in_bytes").read_text()) == L.SMALL.memory
    assert int((v1["memory"] / "memory.memsw.limit_in_bytes").read_text()) == L.SMALL.memory
    assert (v1["pids"] / "pids.max").read_text().strip() == str(L.SMALL.pids)
    assert (v1["cpu"] / "cpu.cfs_quota_us").read_text().strip() == "50000"
    assert cg.v2_dir is not None and (cg.v2_dir / "cgroup.kill").exists()
    assert len(cg.v1_tasks()) == len(v1) and all(p.endswith("/tasks") for p in cg.v1_tasks())


def test_hybrid_leaves_freezer_and_cpuacct_to_cgroup2(made):
    """cgroup2's core files freeze, kill and count CPU time: the v1 freezer and cpuacct
    hierarchies are not used when a cgroup2 directory exists, and those controls work."""
    cg = made.create("corev2")
    assert set(cg.v1_dirs) == {"memory", "pids", "cpu"}
    layout = cgroups.host_layout()
    parent = L.parent_name()
    for ctrl in ("freezer", "cpuacct"):
        assert not (layout.v1[ctrl] / parent / "corev2").exists()
    p = made.start(cg, L.python("sum(range(3 * 10**6))"))
    p.wait(timeout=30)
    assert cg.usage()["cpu_seconds"] > 0


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
    L.check_missing_controller_refused(cgroups.host_layout(), cgroups.V1HybridDriver, missing)


def test_pure_v1_kill_uses_the_freezer(made):
    """Without cgroup2 (pure v1) kill is freeze + SIGKILL + thaw until empty."""
    layout = cgroups.host_layout()
    v1_only = cgroups.Layout("v1", None, frozenset(), dict(layout.v1), 0)
    made.driver = cgroups.V1HybridDriver(v1_only, parent=L.parent_name())
    cg = made.create("purev1")
    assert cg.v2_dir is None and "freezer" in cg.v1_dirs
    made.start(cg, ["/bin/bash", "-c", L.FORK_BOMB])
    cg.kill()
    assert cg.pids() == []


def test_reused_name_is_refused(made):
    made.create("twice")
    with pytest.raises(CgroupError, match="already exists"):
        made.driver.create("twice", L.SMALL)


def test_per_command_figures(made):
    cg = made.create("percmd")
    mark = cg.mark()
    p = made.start(cg, L.python("x = bytearray(16 * 1024 * 1024)"))
    p.wait(timeout=30)
    fig = cg.since(mark)
    assert fig["oom_kills"] == 0 and fig["pids_max_hits"] == 0
    assert fig["memory_peak"] >= 16 * L.MiB and fig["cpu_seconds"] > 0
    # the next command's peak starts afresh where the kernel can reset it (v1 always, v2
    # from Linux 6.12: the VM's 6.1 cannot); the sandbox's own peak keeps the 16 MiB
    mark = cg.mark()
    made.start(cg, ["/bin/true"]).wait(timeout=30)
    if cg.kind == "v1" or mark["peak"] is not None:
        assert mark["peak"] is not None and cg.since(mark)["memory_peak"] < 8 * L.MiB
    assert cg.usage()["memory_peak"] >= 16 * L.MiB


def test_kept_files_closed_at_teardown_are_never_used_after(made, tmp_path, monkeypatch):
    """The handle keeps its figures files open (read fds, and since the per-command peak
    reset a WRITE fd). Teardown (close_files, on the destroy thread) may run while a command's
    mark() uses them on the event loop: a number closed under a user and reused meanwhile by
    another open() must never get that user's write ("0" at offset 0 of someone's file)."""
    import os
    import threading
    cg = made.create("closing")
    cg.mark()                                  # the kept fds are open now
    kept = list(cg._fds.values())
    victims = []

    def teardown_and_reuse():                  # another thread: close, then the numbers go
        cg.close_files()                       # to whatever opens next
        for i in range(len(kept) + 4):
            victims.append(os.open(tmp_path / f"victim{i}", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC))

    real = os.pwrite
    raced = []

    def pwrite(fd, data, offset):
        if not raced:                          # between taking the fd and writing through it
            raced.append(threading.Thread(target=teardown_and_reuse))
            raced[0].start()
            raced[0].join(1.0)                 # (blocks if teardown waits for this user)
        return real(fd, data, offset)
    monkeypatch.setattr(os, "pwrite", pwrite)
    try:
        cg.mark()
    except CgroupError:
        pass                                   # (failing is fine; writing elsewhere is not)
    monkeypatch.undo()
    raced[0].join(10)
    try:
        assert victims and all(os.pread(fd, 16, 0) == b"" for fd in victims)
    finally:
        for fd in victims:
            os.close(fd)
