"""Killing through the daemon, seen from outside: when revoke (or destroy ?wait=false)
answers, every process of the sandboxes is really gone; a destroy that answers before its
teardown is done shows "destroying" and counts until nothing is left, and a daemon killed in
between leaves nothing after its restart.

"Gone" is checked with pidfds the test opens on every process of a sandbox (its init and all
below it) before the kill: a pidfd polls readable once its process exited (pidfd_open(2)),
and unlike a pid it cannot be reused by another process. No timing is asserted.
"""
import os
import select
import signal
import threading
from pathlib import Path

import pytest

from sandbox.audit.query import query
from sandbox.audit.verify import verify
from sandbox.client import Client, DaemonError
from sandbox.runtime.recovery import find_leftovers
from tests.helpers.daemon import TEST_POLICY, DaemonProc, alive, process_tree, wait_until

SMALL = {"limits": {"memory": "256MiB"}}


def _exited(fd: int) -> bool:
    p = select.poll()
    p.register(fd, select.POLLIN)
    return bool(p.poll(0))


def _run_in_background(sock, token, sid, argv) -> threading.Thread:
    def run():
        try:
            with Client(sock, token=token) as c:
                c.exec(sid, argv)
        except DaemonError:
            pass                     # the kill ends the command (or its token): expected
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def _start_busy(d, admin, token, sid, nprocs: int) -> list[int]:
    """Run `nprocs` sleeps in the sandbox; return the pids of all its processes once they run."""
    init = admin.inspect(sid)["info"]["init_pid"]
    _run_in_background(d.socket, token, sid,
                       ["sh", "-c", " ".join(["sleep 300 &"] * (nprocs - 1)) + " sleep 300"])
    assert wait_until(lambda: len(process_tree(init)) >= nprocs + 1), \
        f"the sleeps of {sid} did not start"
    return process_tree(init)


def _one_sandbox_token(admin, name: str) -> str:
    """A token for one sandbox of the test policy (the maximum matters to these tests)."""
    return admin.grant_token(name=name, policies=[TEST_POLICY], max_sandboxes=1,
                             ceiling={"memory": "1GiB"})["token"]


@pytest.fixture(scope="module")
def daemon():
    with DaemonProc() as d:
        yield d


def test_revoke_answers_only_when_every_process_of_every_sandbox_is_gone(daemon):
    with daemon.admin() as admin:
        a = admin.grant_token(name="a", policies=[TEST_POLICY], ceiling={"memory": "1GiB"})
        b = admin.grant_token(name="b", policies=[TEST_POLICY], ceiling={"memory": "1GiB"})
        with Client(daemon.socket, token=a["token"]) as ca, \
                Client(daemon.socket, token=b["token"]) as cb:
            sids = [ca.create(TEST_POLICY, SMALL)["id"] for _ in range(3)]
            other = cb.create(TEST_POLICY, SMALL)["id"]
            pids = [p for s in sids for p in _start_busy(daemon, admin, a["token"], s, 3)]
            others = _start_busy(daemon, admin, b["token"], other, 1)
            fds = [os.pidfd_open(p) for p in pids]
            try:
                out = admin.revoke_token(a["id"])
                gone = [_exited(fd) for fd in fds]          # right at the answer
            finally:
                for fd in fds:
                    os.close(fd)
            assert out["killed"] == 3 and out["revoked"] is not None
            assert len(pids) >= 3 * 4 and all(gone), f"alive at the answer: {gone}"
            assert all(alive(p) for p in others)            # another token's: untouched
            with pytest.raises(DaemonError) as e:
                ca.list()
            assert e.value.status == 401 and a["token"] not in str(e.value)
            # Teardown goes on in the background; meanwhile they show as destroying.
            states = {s["id"]: s["state"] for s in admin.list() if s["id"] in sids}
            assert set(states.values()) <= {"destroying"}
            assert wait_until(lambda: not any(s["id"] in sids for s in admin.list()))
            for sid in sids:
                assert find_leftovers(daemon.run, id_prefix=sid) == [], sid
            # The revocation is on disk: the token file says so.
            assert '"revoked": null' not in _token_entry(daemon, a["id"])
            assert cb.exec(other, ["echo", "still here"]).stdout == b"still here\n"
            cb.destroy(other)


def _token_entry(d, tid: str) -> str:
    import json
    data = json.loads((d.state / "tokens.json").read_text())
    return json.dumps(next(t for t in data["tokens"] if t["id"] == tid))


def test_destroy_without_waiting_answers_when_processes_are_gone_and_leaves_nothing(daemon):
    with daemon.admin() as admin:
        tok = _one_sandbox_token(admin, "nowait")
        with Client(daemon.socket, token=tok) as c:
            sid = c.create(TEST_POLICY, SMALL)["id"]
            pids = _start_busy(daemon, admin, tok, sid, 2)
            fds = [os.pidfd_open(p) for p in pids]
            try:
                out = c.destroy(sid, wait=False)
                gone = [_exited(fd) for fd in fds]
            finally:
                for fd in fds:
                    os.close(fd)
            assert out["id"] == sid and out["state"] == "destroying" and all(gone), gone
            assert wait_until(lambda: c.list() == [])
            assert find_leftovers(daemon.run, id_prefix=sid) == []
            # The next sandbox fits the token's maximum again, and a plain destroy still
            # answers only when the teardown is verified.
            sid2 = c.create(TEST_POLICY, SMALL)["id"]
            out = c.destroy(sid2)
            assert out["state"] == "destroyed" and out["report"]["leftovers"] == []
            assert find_leftovers(daemon.run, id_prefix=sid2) == []
    pending = query(daemon.state, action="daemon_destroy_pending", sandbox=sid)
    done = query(daemon.state, action="daemon_destroy", sandbox=sid)
    assert pending and done and pending[0]["seq"] < done[-1]["seq"]


def test_a_pending_teardown_is_shown_counted_and_finished_by_recovery_after_a_crash():
    d = DaemonProc(env={"SANDBOXD_TEST_TEARDOWN_DELAY": "120"})
    try:
        d.start()
        with d.admin() as admin:
            tok = _one_sandbox_token(admin, "crash")
            with Client(d.socket, token=tok) as c:
                sid = c.create(TEST_POLICY, SMALL)["id"]
                pids = _start_busy(d, admin, tok, sid, 1)
                out = c.destroy(sid, wait=False)
                assert out["state"] == "destroying"
                assert not any(alive(p) for p in pids)
                # Honest until it is really gone: listed, inspected and counted.
                assert [(s["id"], s["state"]) for s in c.list()] == [(sid, "destroying")]
                assert c.inspect(sid)["state"] == "destroying"
                with pytest.raises(DaemonError) as e:
                    c.create(TEST_POLICY, SMALL)
                assert e.value.status == 429
                for op in (lambda: c.exec(sid, ["true"]), lambda: c.destroy(sid)):
                    with pytest.raises(DaemonError) as e:
                        op()
                    assert e.value.status == 409
        assert find_leftovers(d.run, id_prefix=sid) != []     # the teardown has not run
        d.proc.send_signal(signal.SIGKILL)                      # our own child, by pid
        d.proc.wait()
        d._logf.close()
        assert find_leftovers(d.run, id_prefix=sid) != []       # the crash left it behind

        d.extra_env = {}
        d.start()                                               # same state and run dirs
        with d.admin() as admin:
            assert admin.list() == []
            assert find_leftovers(d.run, id_prefix=sid) == []
        assert any(r["sandbox"] == sid for r in query(d.state, action="recovery_found"))
        assert query(d.state, action="daemon_destroy_pending", sandbox=sid)
        report = verify(d.state)
        assert report.ok, report.problem
    finally:
        try:
            d.stop()
        finally:
            d.cleanup()
