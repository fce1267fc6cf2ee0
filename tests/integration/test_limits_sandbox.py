"""Resource limits from inside a real sandbox (Sandbox API; the hybrid host here, and the
same tests on cgroup v2 in the VM through tests/vm/test_cgroups_v2_sandbox.py): the agent runs a
fork bomb, a memory bomb, a disk filler, a CPU spinner, a sleeper past its timeout and a
double-forking daemon; the kernel stops each, the result says why, the audit log has it,
and destroy leaves nothing."""
import asyncio
import errno
import os
import shutil
import time
import subprocess
import tempfile
from pathlib import Path

import pytest

from sandbox.audit.sink import MemorySink
from sandbox.errors import CgroupError
from sandbox.kernel import cgroups
from sandbox.policy import load_policy
from tests.helpers.engine import PY, make_sandbox, py, sh, state_dir  # noqa: F401 - fixtures
from tests.helpers.limits import (FORK_BOMB, SMALL, alive, cgroup_roots, favour_cpu, parent_name,
                                  without_controller)

LIMITS = {"cpus": SMALL.cpus, "memory": "64MiB", "pids": SMALL.pids, "disk": "64MiB", "swap": "0"}


@pytest.fixture
def lim_env():
    """(cgroup parent, disk image dir) of this test; removed after its sandboxes."""
    # Images live in the temp dir: on the host an ext4 disk, in the VM a tmpfs (its root is
    # read-only); either way the image bounds the sandbox, not the directory.
    parent = parent_name("-lim")
    disk_base = Path(tempfile.gettempdir()) / f"sbxt-{os.getpid()}-limdisk"
    try:
        yield parent, disk_base
    finally:
        shutil.rmtree(disk_base, ignore_errors=True)
        cgroups.driver_for(parent=parent).remove_parent()


@pytest.fixture
def box(lim_env, make_sandbox):  # noqa: F811 - make_sandbox destroys them before lim_env
    """box(**policy overrides) -> (sandbox, audit sink) under the test's small limits."""
    parent, disk_base = lim_env

    def make(**policy_overrides):
        sink = MemorySink()
        pol = load_policy("default", {"limits": LIMITS, **policy_overrides})
        return make_sandbox(pol, audit=sink, cgroup_parent=parent, disk_base=str(disk_base)), sink

    return make


def _exec_records(sink, outcome):
    return [r for r in sink.records if r["action"] == "exec" and r["outcome"] == outcome]


# Forks until the kernel refuses, children parked (stdout closed so the command can end),
# then reports how far it got and fails, as a real fork bomb's top process would.
FORKER = """
import os, sys, time
n = 0
while n < 10000:
    try:
        pid = os.fork()
    except OSError as e:
        print("forks", n, "errno", e.errno, flush=True)
        sys.exit(1)
    if pid == 0:
        os.close(1)
        os.close(2)
        time.sleep(60)
        os._exit(0)
    n += 1
"""


def test_fork_bomb_stops_at_the_pids_limit_and_host_stays_responsive(box):
    sb, sink = box()
    res = py(sb, FORKER, timeout=30)
    forks, err = int(res.stdout.split()[1]), int(res.stdout.split()[3])
    assert err == errno.EAGAIN and forks < SMALL.pids, res.stdout
    assert res.reason == "pids"
    assert res.text == f"stopped: process limit {SMALL.pids} reached (exited with status 1)"
    assert res.usage["pids_max_hits"] > 0 and res.usage["pids_peak"] <= SMALL.pids
    assert subprocess.run(["/bin/true"], timeout=10).returncode == 0   # the host still forks
    assert _exec_records(sink, "pids"), "the pids limit is not in the audit log"
    # A shell fork bomb too: its top shell fails to fork (pids) or the timeout kills the
    # whole sandbox; either way the bomb stayed under the limit and destroy ends it all.
    res = sh(sb, FORK_BOMB, timeout=3)
    assert res.reason in ("pids", "timeout") and res.usage["pids_max_hits"] > 0
    assert res.usage["pids_peak"] <= SMALL.pids
    sb.destroy()
    assert not any(p.exists() for p in sb.ctx.cgroup.paths())


def test_memory_bomb_is_oom_killed_and_reported(box):
    sb, sink = box()
    res = py(sb, "b = [bytearray(1 << 20) for _ in range(1024)]\nprint('survived')", timeout=60)
    assert b"survived" not in res.stdout
    assert res.reason == "oom" and res.signal == 9
    assert res.text == "killed: memory limit 64 MiB reached"
    assert res.usage["memory_peak"] <= SMALL.memory
    assert _exec_records(sink, "oom"), "the OOM kill is not in the audit log"


@pytest.mark.parametrize("where", ["/tmp", "/home/agent/workspace"])
def test_disk_filler_gets_enospc_at_the_limit(box, where):
    sb, _ = box()
    res = sh(sb, f"dd if=/dev/zero of={where}/fill bs=1M count=1000 2>&1; echo rc=$?", timeout=60)
    assert b"No space left on device" in res.stdout and b"rc=1" in res.stdout
    image = sb.ctx.disk.image
    assert image.stat().st_blocks * 512 <= SMALL.disk      # the host held no more than the limit
    res = sh(sb, f"stat -c %s {where}/fill")
    assert int(res.stdout) <= SMALL.disk


def test_cpu_spinner_gets_about_half_a_cpu(box):
    """Sampled over 2 s while the spinner runs (not its start-up)."""
    sb, _ = box()
    favour_cpu(sb.ctx.cgroup)
    spin = "import time\nend = time.monotonic() + 4\nwhile time.monotonic() < end: pass\n"

    async def measure():
        run = asyncio.ensure_future(sb.exec([PY, "-c", spin], timeout=30))
        await asyncio.sleep(1.0)
        c0, t0 = sb.usage()["cpu_seconds"], time.monotonic()
        await asyncio.sleep(2.0)
        share = (sb.usage()["cpu_seconds"] - c0) / (time.monotonic() - t0)
        return share, await run

    share, res = asyncio.run(measure())
    assert res.reason == "exited"
    assert 0.35 <= share <= 0.65, f"spinner under a 0.5-CPU quota got {share:.2f} CPU"


def test_sleeper_is_killed_at_its_timeout_with_the_reason(box):
    sb, sink = box()
    res = sh(sb, "sleep 300", timeout=1)
    assert res.reason == "timeout" and "time limit" in res.text
    assert sb.ctx.cgroup.pids() == [], "processes survived the timeout"
    assert _exec_records(sink, "timeout")


def test_double_fork_and_detach_is_killed_on_destroy(box):
    sb, _ = box()
    res = sh(sb, "(setsid sleep 1000 >/dev/null 2>&1 &); echo started")
    assert res.stdout.strip() == b"started"
    inside = [p for p in sb.ctx.cgroup.pids() if p != sb.init_pid]
    assert inside and all(alive(p) for p in inside), "the detached sleeper should be running"
    sb.destroy()
    assert not any(alive(p) for p in inside), "a detached process survived destroy"
    assert not any(p.exists() for p in sb.ctx.cgroup.paths())
    assert not sb.ctx.disk.image.exists()


@pytest.mark.parametrize("missing", ["pids", "memory"])
def test_policy_asking_for_a_missing_controller_is_refused(box, lim_env, state_dir, monkeypatch,  # noqa: F811
                                                           missing):
    real = cgroups.host_layout()
    monkeypatch.setattr(cgroups, "host_layout", lambda: without_controller(real, missing))
    with pytest.raises(CgroupError, match=f"controller '{missing}'"):
        box()
    assert not list(state_dir.glob("sandboxes/*")), "the refused sandbox left its state"
    for root in cgroup_roots(real):
        d = root / lim_env[0]
        assert not d.exists() or not [c for c in d.iterdir() if c.is_dir()], f"cgroup left in {d}"


def test_per_command_usage_is_reported(box):
    sb, _ = box()
    res = py(sb, "x = bytearray(16 * 1024 * 1024)")
    assert res.reason == "exited"
    assert res.usage["memory_peak"] >= 16 * 1024**2 and res.usage["cpu_seconds"] > 0
    assert res.usage["pids_peak"] >= 1
