"""The VM itself: pure cgroup v2, and a child cgroup limits, holds and kills a real process."""
import errno
import signal
import subprocess
import sys

from tests.helpers.cgroup2 import cgroup_layout_problems, wait_until_empty

# A process that, once told, forks until the kernel refuses, reports "<forks> <errno>", and
# waits; its children wait too. pids.max must stop it.
FORKER = r"""
import os, signal, sys
sys.stdin.readline()
n, err = 0, 0
for _ in range(8):
    try:
        pid = os.fork()
    except OSError as e:
        err = e.errno
        break
    if pid == 0:
        signal.pause()
        os._exit(0)
    n += 1
print(n, err, flush=True)
signal.pause()
"""


def test_machine_is_pure_cgroup_v2():
    assert cgroup_layout_problems() == []


def test_child_cgroup_limits_and_kills_a_process(make_cgroup):
    cg = make_cgroup("smoke")
    assert set(("memory", "pids", "cpu")) <= set((cg / "cgroup.controllers").read_text().split())
    (cg / "memory.max").write_text(str(64 * 1024**2))
    (cg / "memory.swap.max").write_text("0")
    (cg / "pids.max").write_text("3")
    (cg / "cpu.max").write_text("50000 100000")
    assert (cg / "memory.max").read_text().strip() == str(64 * 1024**2)
    assert (cg / "pids.max").read_text().strip() == "3"
    assert (cg / "cpu.max").read_text().split() == ["50000", "100000"]

    proc = subprocess.Popen([sys.executable, "-c", FORKER], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    try:
        (cg / "cgroup.procs").write_text(str(proc.pid))
        assert open(f"/proc/{proc.pid}/cgroup").read() == f"0::/{cg.name}\n"
        proc.stdin.write("go\n")
        proc.stdin.flush()
        forks, err = map(int, proc.stdout.readline().split())
        # pids.max = 3 counts the forker itself: two children, then fork fails with EAGAIN.
        assert (forks, err) == (2, errno.EAGAIN)
        assert (cg / "pids.current").read_text().strip() == "3"
        assert "max 1" in (cg / "pids.events").read_text()

        (cg / "cgroup.kill").write_text("1")
        assert proc.wait(timeout=30) == -signal.SIGKILL
        assert wait_until_empty(cg), "cgroup.kill left processes behind"
        assert (cg / "cgroup.procs").read_text() == ""
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
