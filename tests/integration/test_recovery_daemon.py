"""kill -9 a real sandboxd with 10 live sandboxes (limits, disks, commands running, a create
and a destroy in flight), restart it, and check that its start-up recovery left nothing of
them on the host and recorded the recovery in an intact audit chain.

Networks: the daemon has no option yet to put its host side in a test-made namespace, so
these sandboxes have none (egress networks are covered by test_recovery_crash.py, which
drives the engine with its host side in a namespace it makes)."""
import signal
import threading
import time
from pathlib import Path

import pytest

from sandbox.audit.query import query
from sandbox.audit.verify import verify
from sandbox.client import Client, DaemonError
from sandbox.runtime.recovery import find_leftovers
from tests.helpers.daemon import DaemonProc, alive

LIMITS = {"limits": {"memory": "256MiB", "disk": "64MiB", "pids": 64}}


def _bg(fn, *args):
    """Run a client call that the crash will cut off; its error is expected."""
    def run():
        try:
            fn(*args)
        except (DaemonError, OSError):
            pass
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def _children(pid: int) -> list[int]:
    """The children of a process (its sandbox's commands, for a sandbox's init)."""
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        out += [int(c) for c in (task / "children").read_text().split()]
    return out


def _wait(pred) -> bool:
    for _ in range(500):          # bounded: 10 s
        if pred():
            return True
        time.sleep(0.02)
    return False


@pytest.fixture
def daemon():
    d = DaemonProc()
    try:
        yield d.start()
    finally:
        try:
            d.stop()
        finally:
            d.cleanup()


def test_kill_9_daemon_then_restart_recovers_everything(daemon):
    with daemon.admin() as admin:
        sids = [admin.create("default", overrides=LIMITS)["id"] for _ in range(10)]
        pids = {sid: admin.inspect(sid)["info"]["init_pid"] for sid in sids}
    threads = []
    for sid in sids[:4]:                                   # commands running (mid-exec)
        c = Client(daemon.socket)
        threads.append((c, _bg(c.exec, sid, ["sh", "-c", "sleep 300 & sleep 300"])))
    c = Client(daemon.socket)
    threads.append((c, _bg(c.destroy, sids[-1])))           # a destroy in flight
    c = Client(daemon.socket)
    threads.append((c, _bg(c.create, "default", LIMITS)))   # a create in flight
    for sid in sids[:4]:                                   # wait: the commands are running
        assert _wait(lambda: _children(pids[sid])), f"no command started in {sid}"
    daemon.proc.send_signal(signal.SIGKILL)                # our own child, by pid
    daemon.proc.wait()
    daemon._logf.close()
    for c, t in threads:
        t.join(30)
        c.close()
    assert list((daemon.run / "sandboxes").iterdir())      # the crash left sandboxes behind

    daemon.start()                                         # same state and run dirs
    with daemon.admin() as admin:
        assert admin.list() == []
        for sid in sids:
            assert find_leftovers(daemon.run, id_prefix=sid) == [], sid
        assert not any(alive(p) for p in pids.values())
        assert not list((daemon.run / "sandboxes").iterdir())
    report = verify(daemon.state)
    assert report.ok, report.problem
    rec = query(daemon.state, action="recovery")
    assert rec[-1]["outcome"] == "ok" and rec[-1]["details"]["removed"] > 0
    recovered = set(rec[-1]["details"]["sandboxes"])
    assert set(sids[:-1]) <= recovered                       # (the last may have been destroyed)
    assert {r["sandbox"] for r in query(daemon.state, action="recovery_found")} == recovered
