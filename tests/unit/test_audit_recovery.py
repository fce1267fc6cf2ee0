"""Intent records are atomic and durable; recovery removes what they name (never a recycled
pid), is idempotent, audits everything, skips a live daemon's sandboxes, sweeps orphans."""
import json
import os
import subprocess

import pytest

from sandbox.audit.log import AuditLog
from sandbox.audit.query import query
from sandbox.audit.verify import verify
from sandbox.errors import SandboxError
from sandbox.runtime import recovery
from sandbox.runtime.intent import Intent, list_intents, proc_starttime
from sandbox.runtime.recovery import cleanup_function, recover


def _orphan(intent: Intent):
    """Make the intent look left behind by a daemon that died."""
    intent.data["owner"] = {"pid": os.getpid(), "starttime": -1}
    intent._write()


@pytest.fixture
def sleeper():
    p = subprocess.Popen(["sleep", "60"])
    try:
        yield p
    finally:
        p.kill()
        p.wait()


def test_intent_write_is_atomic_and_lists_resources(tmp_path):
    it = Intent.create(tmp_path, "sb1", {"policy": "default"})
    it.add("cgroup", path="/sys/fs/cgroup/x/sb1")
    it.add("dir", path=str(tmp_path / "ws"))
    lines = [json.loads(l) for l in (tmp_path / "sandboxes/sb1.intent").read_text().splitlines()]
    assert [l["add"]["kind"] for l in lines[1:]] == ["cgroup", "dir"]   # one line per add
    assert lines[0]["owner"]["pid"] == os.getpid()
    assert [p.name for p in (tmp_path / "sandboxes").iterdir()] == ["sb1.intent"]
    assert it.remove("cgroup") == 1
    assert [r["kind"] for r in Intent.load(it.path).resources] == ["dir"]
    with pytest.raises(SandboxError, match="already has an intent"):
        Intent.create(tmp_path, "sb1")
    with pytest.raises(SandboxError, match="unknown intent kind"):
        it.add("bogus")
    with pytest.raises(SandboxError, match="invalid sandbox id"):
        Intent.create(tmp_path, "../escape")
    it.close()
    assert list_intents(tmp_path) == [] and not list((tmp_path / "sandboxes").iterdir())


def test_recover_kills_processes_removes_dirs_and_audits(tmp_path, sleeper):
    ws = tmp_path / "workspaces" / "sb1"
    (ws / "deep").mkdir(parents=True)
    it = Intent.create(tmp_path, "sb1")
    it.add("process", pid=sleeper.pid, starttime=proc_starttime(sleeper.pid))
    it.add("dir", path=str(ws))
    _orphan(it)
    with AuditLog(tmp_path / "state", mirror=None) as log:
        rep = recover(tmp_path, log)
    assert rep.ok and [s.sandbox for s in rep.sandboxes] == ["sb1"]
    assert len(rep.sandboxes[0].removed) == 2
    sleeper.wait(5)
    assert sleeper.returncode == -9
    assert not ws.exists() and not list((tmp_path / "sandboxes").iterdir())
    actions = [r["action"] for r in query(tmp_path / "state") if r.get("sandbox") == "sb1"]
    assert actions == ["recovery_found", "recovery_removed", "recovery_removed"]
    assert query(tmp_path / "state", action="recovery")[0]["outcome"] == "ok"
    assert verify(tmp_path / "state").ok
    # Idempotent: a second run finds nothing to do.
    again = recover(tmp_path)
    assert again.ok and again.sandboxes == [] and again.orphans == []


def test_a_recycled_pid_is_never_signalled(tmp_path, sleeper):
    it = Intent.create(tmp_path, "sb1")
    it.add("process", pid=sleeper.pid, starttime=proc_starttime(sleeper.pid) - 1)  # another process
    _orphan(it)
    assert recover(tmp_path).ok
    assert sleeper.poll() is None                # still running
    with pytest.raises(SandboxError, match="start time"):
        recovery.kill_process({"pid": sleeper.pid})


def test_live_daemons_sandboxes_are_left_alone(tmp_path, sleeper):
    it = Intent.create(tmp_path, "sb1")              # owner: this (live) process
    it.add("process", pid=sleeper.pid, starttime=proc_starttime(sleeper.pid))
    rep = recover(tmp_path)
    assert rep.skipped_live == ["sb1"] and sleeper.poll() is None
    assert list_intents(tmp_path) == [it.path]


def test_failed_cleanup_keeps_the_intent_and_escalates(tmp_path, monkeypatch):
    from sandbox.audit.escalation import Escalations
    it = Intent.create(tmp_path, "sb1")
    it.add("netns", name="sbxt-nope")
    _orphan(it)

    def boom(fields):
        raise OSError("EBUSY")
    monkeypatch.setattr(recovery, "cleanup_function", lambda kind: boom)
    esc = Escalations(tmp_path / "esc")
    rep = recover(tmp_path, escalations=esc)
    assert not rep.ok and "EBUSY" in rep.leftovers[0]
    assert list_intents(tmp_path) == [it.path]       # retried on the next start
    assert [e["kind"] for e in esc.list()] == ["teardown_failed"]


def test_orphan_sandbox_dirs_without_intent_are_swept(tmp_path):
    (tmp_path / "sandboxes" / "sb9" / "root").mkdir(parents=True)
    rep = recover(tmp_path)
    assert rep.orphans == [f"dir({tmp_path / 'sandboxes' / 'sb9'})"]
    assert not (tmp_path / "sandboxes" / "sb9").exists()


def test_every_kind_has_a_cleanup_function():
    for kind in recovery.ORDER:
        assert callable(cleanup_function(kind))
    assert set(recovery.ORDER) == set(recovery.CLEANUP)


def test_remove_dir_refuses_top_level_paths():
    with pytest.raises(SandboxError, match="top-level"):
        recovery.remove_dir({"path": "/usr"})
    recovery.remove_dir({"path": "/nonexistent/kept", "keep": True})
