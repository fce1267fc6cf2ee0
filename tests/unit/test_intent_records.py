"""Intent records as append-only JSON lines (sandbox/runtime/intent.py): one file and one inode
per sandbox for its whole life, a torn last line (a writer that died mid-write) is ignored by
the reader and by recovery and cut off before the next append, a failed append leaves no
partial line, anything else damaged fails the load, and records of the previous format
(`sandboxes/<id>/intent.json`) are still recovered."""
import errno
import json
import os
import threading

import pytest

from sandbox.errors import SandboxError
from sandbox.runtime import intent as intent_mod
from sandbox.runtime import recovery
from sandbox.runtime.intent import Intent, list_intents, proc_starttime


def _dead_owner(it: Intent):
    it.data["owner"] = {"pid": os.getpid(), "starttime": -1}   # a daemon that died
    it._write()


def test_one_inode_for_the_records_whole_life(tmp_path):
    it = Intent.create(tmp_path, "sb1", {"policy": "default"})
    ino = it.path.stat().st_ino
    it.add("cgroup", path="/sys/fs/cgroup/x/sb1")
    it.add("dir", path="/w/sb1", keep=False)
    it.update_meta(note="hello")
    assert it.remove("cgroup") == 1
    assert it.remove("netns") == 0                          # nothing matched: nothing written
    assert it.path.stat().st_ino == ino                      # appended, never replaced
    assert sorted(os.listdir(tmp_path / "sandboxes")) == ["sb1.intent"]
    lines = it.path.read_bytes().split(b"\n")
    assert lines[-1] == b"" and len(lines) == 6              # header + 4 updates, each one line
    back = Intent.load(it.path)
    assert back.resources == [{"kind": "dir", "path": "/w/sb1", "keep": False}]
    assert back.data["meta"] == {"policy": "default", "note": "hello"}
    assert back.data["owner"]["pid"] == os.getpid() and back.sandbox_id == "sb1"
    it.close()
    assert list_intents(tmp_path) == [] and os.listdir(tmp_path / "sandboxes") == []


def test_a_torn_last_line_is_ignored_then_cut_off(tmp_path):
    it = Intent.create(tmp_path, "sb1")
    it.add("dir", path=str(tmp_path / "ws"))
    whole = it.path.read_bytes()
    with open(it.path, "ab") as f:                           # the writer died mid-line
        f.write(b'{"add":{"kind":"netns","name":"sbx-hal')
    back = Intent.load(it.path)
    assert [r["kind"] for r in back.resources] == ["dir"]
    back.add("cgroup", path="/x")                            # cuts the torn tail off first
    assert it.path.read_bytes().startswith(whole)
    assert b"sbx-hal" not in it.path.read_bytes()
    assert [r["kind"] for r in Intent.load(it.path).resources] == ["dir", "cgroup"]


def test_recovery_ignores_a_torn_line_and_removes_the_rest(tmp_path):
    ws = tmp_path / "workspaces" / "sb1"
    ws.mkdir(parents=True)
    it = Intent.create(tmp_path, "sb1")
    it.add("dir", path=str(ws))
    _dead_owner(it)
    with open(it.path, "ab") as f:                           # an add that never finished:
        f.write(b'{"add":{"kind":"process","pid":1,"startti')  # its object was never made
    rep = recovery.recover(tmp_path)
    assert rep.ok, rep.leftovers
    assert [s.removed for s in rep.sandboxes] == [[f"dir(path={ws})"]]   # not the torn one
    assert not ws.exists() and list_intents(tmp_path) == []


def test_a_record_without_a_complete_header_names_nothing(tmp_path):
    (tmp_path / "sandboxes").mkdir()
    (tmp_path / "sandboxes" / "sb2.intent").write_bytes(b'{"created":17')   # died in create
    rep = recovery.recover(tmp_path)
    assert rep.ok and [s.sandbox for s in rep.sandboxes] == ["sb2"]
    assert rep.sandboxes[0].found == [] and list_intents(tmp_path) == []


def test_a_damaged_complete_line_fails_the_load_and_recovery_keeps_it(tmp_path):
    it = Intent.create(tmp_path, "sb1")
    it.add("dir", path="/nonexistent/x")
    with open(it.path, "ab") as f:
        f.write(b"garbage\n")
        f.write(b'{"add":{"kind":"dir","path":"/nonexistent/y"}}\n')
    with pytest.raises(SandboxError, match="damaged intent record"):
        Intent.load(it.path)
    rep = recovery.recover(tmp_path)
    assert not rep.ok and "damaged" in rep.leftovers[0]
    assert list_intents(tmp_path) == [it.path]               # kept for an operator: fail closed


def test_a_failed_append_leaves_no_partial_line(tmp_path, monkeypatch):
    it = Intent.create(tmp_path, "sb1")
    it.add("dir", path="/a")
    before = it.path.read_bytes()
    real_write = os.write

    def half_then_enospc(fd, data):
        if fd == it._fd and len(data) > 10:
            real_write(fd, bytes(data[:10]))
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)
    monkeypatch.setattr(intent_mod.os, "write", half_then_enospc)
    with pytest.raises(SandboxError, match="No space left"):
        it.add("cgroup", path="/b")
    monkeypatch.undo()
    assert it.path.read_bytes() == before                    # cut back to the last full line
    assert [r["kind"] for r in it.resources] == ["dir"]      # and not recorded in memory
    it.add("netns", name="n")
    assert [r["kind"] for r in Intent.load(it.path).resources] == ["dir", "netns"]


def test_concurrent_appends_stay_whole_lines(tmp_path):
    it = Intent.create(tmp_path, "sb1")

    def worker(i):
        for j in range(50):
            it.add("dir", path=f"/t{i}/{j}" + "x" * 300)
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    paths = {r["path"] for r in Intent.load(it.path).resources}
    assert len(paths) == 200
    for line in it.path.read_bytes().splitlines():
        json.loads(line)


def test_an_id_that_has_a_record_cannot_be_created_again(tmp_path):
    it = Intent.create(tmp_path, "sb1")
    with pytest.raises(SandboxError, match="already has an intent"):
        Intent.create(tmp_path, "sb1")
    legacy = tmp_path / "sandboxes" / "old1"
    legacy.mkdir()
    (legacy / "intent.json").write_text(json.dumps({"sandbox": "old1", "resources": []}))
    with pytest.raises(SandboxError, match="already has an intent"):
        Intent.create(tmp_path, "old1")
    assert sorted(os.listdir(tmp_path / "sandboxes")) == ["old1", "sb1.intent"]
    it.close()


def test_previous_format_records_are_still_recovered(tmp_path):
    ws = tmp_path / "workspaces" / "old1"
    ws.mkdir(parents=True)
    d = tmp_path / "sandboxes" / "old1"
    (d / "root").mkdir(parents=True)
    (d / "intent.json").write_text(json.dumps({
        "version": 1, "sandbox": "old1", "created": 0.0, "meta": {},
        "owner": {"pid": os.getpid(), "starttime": -1},
        "resources": [{"kind": "dir", "path": str(ws)}]}))
    assert list_intents(tmp_path) == [d / "intent.json"]
    rep = recovery.recover(tmp_path)
    assert rep.ok and [s.sandbox for s in rep.sandboxes] == ["old1"]
    assert not ws.exists() and not d.exists() and list_intents(tmp_path) == []


def test_the_owner_is_this_process():
    me = intent_mod.current_owner()
    assert me == {"pid": os.getpid(), "starttime": proc_starttime(os.getpid())}
