"""Warm sandboxes through a real daemon (sandboxd --warm-pool): handed out only for the
default policy unchanged, to one token, never twice; drained by the kill switch; nothing
left when the daemon stops."""

import time

from sandbox.client import Client
from sandbox.runtime.recovery import find_leftovers
from tests.helpers.daemon import DaemonProc, alive, wait_until


def _warm_creates(admin) -> dict[str, bool]:
    return {r["sandbox"]: r["details"]["warm"] for r in admin.audit(action="daemon_create")}


def test_warm_sandboxes_are_handed_out_once_and_refilled():
    d = DaemonProc(extra_args=("--warm-pool", "2"))
    with d:
        with d.admin() as admin:
            assert wait_until(lambda: admin.health()["warm"] == 2), d.log.read_text()[-2000:]
            time.sleep(3.0)                   # the warm ones are at least this old now
            a = admin.grant_token(name="a", max_sandboxes=4)
            b = admin.grant_token(name="b", max_sandboxes=4)
            with Client(d.socket, token=a["token"]) as ca, Client(d.socket, token=b["token"]) as cb:
                first = ca.create("default")["id"]
                second = cb.create("default")["id"]
                custom = ca.create("default", overrides={"limits": {"memory": "512MiB"}})["id"]
                warm = _warm_creates(admin)
                assert warm[first] and warm[second] and not warm[custom]
                assert len({first, second, custom}) == 3
                # each token sees only its own, warm or not
                assert {s["id"] for s in ca.list()} == {first, custom}
                assert {s["id"] for s in cb.list()} == {second}
                res = ca.exec(first, ["sh", "-c", "ls -A /home/agent/workspace | wc -l; id -u"])
                assert res.exit_code == 0 and res.stdout.split() == [b"0", b"1000"]
                age = ca.inspect(first)["age"]
                assert age < 2.5                      # lifetime counted from hand-out
                assert wait_until(lambda: admin.health()["warm"] == 2)   # rebuilt
                for c, sid in ((ca, first), (cb, second), (ca, custom)):
                    c.destroy(sid)
                    assert find_leftovers(d.run, id_prefix=sid) == [], sid
    # DaemonProc's exit asserted that the stopped daemon left no intent record: the warm
    # sandboxes it still held were destroyed with it


def test_kill_switch_takes_the_warm_sandboxes_too():
    d = DaemonProc(extra_args=("--warm-pool", "1"))
    with d:
        with d.admin() as admin:
            assert wait_until(lambda: admin.health()["warm"] == 1), d.log.read_text()[-2000:]
            before = {p.name for p in (d.run / "sandboxes").iterdir()}
            assert len(before) == 1                   # the warm one, recorded for recovery
            pid = _init_pid_of(d.run / "sandboxes" / next(iter(before)))
            assert alive(pid)
            admin.kill_all()
            assert not alive(pid)                     # gone when the kill switch answers
            assert wait_until(lambda: {p.name for p in (d.run / "sandboxes").iterdir()}
                         .isdisjoint(before))         # destroyed, and a new one is built
            assert wait_until(lambda: admin.health()["warm"] == 1)


def _init_pid_of(intent_path) -> int:
    """The init pid an intent record names (sandbox/runtime/intent.py)."""
    from sandbox.runtime.intent import Intent
    return next(r["pid"] for r in Intent.load(intent_path).resources if r["kind"] == "process")


def test_a_warm_sandbox_that_died_in_the_pool_is_never_handed_out():
    """A warm sandbox can stop running while it waits (its lifetime counts from when it was
    built until hand-out, or its init is killed): a create must get a running sandbox, and
    the dead one is destroyed, not left behind."""
    import os
    import signal
    from pathlib import Path

    from sandbox.runtime.intent import Intent
    d = DaemonProc(extra_args=("--warm-pool", "1"))
    with d:
        with d.admin() as admin:
            assert wait_until(lambda: admin.health()["warm"] == 1), d.log.read_text()[-2000:]
            records = list(Path(d.run, "sandboxes").iterdir())
            assert len(records) == 1
            dead_id = Intent.load(records[0]).data["sandbox"]
            inits = [r["pid"] for r in Intent.load(records[0]).data["resources"]
                     if r["kind"] == "process"]
            assert len(inits) == 1
            os.kill(inits[0], signal.SIGKILL)   # the warm sandbox's init (this test's daemon made it)
            assert wait_until(lambda: not alive(inits[0]))
            sid = admin.create("default")["id"]
            assert sid != dead_id
            assert admin.exec(sid, ["true"]).exit_code == 0
            assert find_leftovers(d.run, id_prefix=dead_id) == []
            assert "was no longer running" in d.log.read_text()
            admin.destroy(sid)
