"""Replay reproduces a sandbox's commands, outputs and denials in order; tail follows
across rotation; the journald mirror speaks the native protocol."""
import json
import socket
import struct
import threading

from sandbox.audit.journal import JournalMirror, encode
from sandbox.audit.log import AuditLog
from sandbox.audit.query import query, tail
from sandbox.audit.replay import replay
from sandbox.cli.main import main
from tests.helpers import fakes


def _session(log, sb, secret):
    log.record("sandbox_create", sandbox=sb, details={"policy": "default"})
    log.record("exec_start", sandbox=sb, details={"exec_id": 1, "argv": ["ls", "-l"], "cwd": "/w"})
    log.record("output", sandbox=sb, details={"exec_id": 1, "stream": "stdout", "bytes": 6,
                                                "sha256": "0" * 64, "text": "a.txt\n"})
    log.record("exec_end", sandbox=sb, details={"exec_id": 1, "exit_code": 0, "reason": "exited"})
    log.record("exec_start", sandbox=sb, details={"exec_id": 2, "argv": ["cat", "key"], "cwd": "/w"})
    log.record("scan_finding", sandbox=sb, details={"rule": "github-token", "offset": 0,
                                                      "hash": log.finding_hash(secret)})
    log.record("output", sandbox=sb, details={"exec_id": 2, "stream": "stdout", "bytes": 40,
                                                "verdict": "redact", "text": "[REDACTED:github-token]"})
    log.record("seccomp_deny", sandbox=sb, outcome="denied", resource="ptrace")
    log.record("net_drop", sandbox=sb, outcome="denied", details={"dest": "192.0.2.1:443"})
    log.record("exec_end", sandbox=sb, details={"exec_id": 2, "exit_code": 1, "reason": "exited"})
    log.record("sandbox_destroy", sandbox=sb)


def test_replay_reproduces_commands_outputs_denials_in_order(tmp_path, capsys):
    secret = fakes.github_token()
    with AuditLog(tmp_path, mirror=None, max_bytes=1500) as log:
        _session(log, "sb-a", secret)
        _session(log, "sb-b", secret)     # interleaving from another sandbox must not show
    tl = replay(tmp_path, "sb-a")
    kinds = [e["kind"] for e in tl["events"]]
    assert kinds == ["lifecycle", "command", "output", "exit", "command", "finding", "output",
                     "denied", "denied", "exit", "lifecycle"]
    assert [c["argv"] for c in tl["commands"]] == [["ls", "-l"], ["cat", "key"]]
    assert [d["action"] for d in tl["denials"]] == ["seccomp_deny", "net_drop"]
    assert tl["ended"]["action"] == "sandbox_destroy"
    seqs = [e["seq"] for e in tl["events"]]
    assert seqs == sorted(seqs)
    assert main(["audit", "--state-dir", str(tmp_path), "replay", "sb-a"]) == 0
    out = capsys.readouterr().out
    assert "$ ls -l" in out and "| a.txt" in out and "DENIED seccomp_deny ptrace" in out
    assert secret not in out
    assert main(["audit", "--state-dir", str(tmp_path), "replay", "sb-a", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["commands"][1]["argv"] == ["cat", "key"]
    assert main(["audit", "--state-dir", str(tmp_path), "replay", "nope"]) == 1


def test_query_filters_and_pages(tmp_path):
    with AuditLog(tmp_path, mirror=None) as log:
        _session(log, "sb-a", "x")
        _session(log, "sb-b", "x")
    first = query(tmp_path, sandbox="sb-b", limit=3)
    assert len(first) == 3 and all(r["sandbox"] == "sb-b" for r in first)
    rest = query(tmp_path, sandbox="sb-b", since_seq=first[-1]["seq"])
    assert len(first) + len(rest) == 11
    assert [r["action"] for r in query(tmp_path, action="net_drop")] == ["net_drop", "net_drop"]


def test_tail_follows_across_rotation(tmp_path):
    log = AuditLog(tmp_path, mirror=None, max_bytes=1024)
    log.record("exec_start", sandbox="old")
    got, done = [], threading.Event()

    def reader():
        for rec in tail(tmp_path, n=5, follow=True, sandbox="sb", stop=done.is_set, poll=0.01):
            got.append(rec["resource"])
            if len(got) == 30:
                done.set()

    t = threading.Thread(target=reader)
    t.start()
    for i in range(30):
        log.record("exec_start", sandbox="sb", resource=str(i), details={"pad": "x" * 100})
    t.join(20)
    done.set()
    t.join()
    log.close()
    assert got == [str(i) for i in range(30)]


def test_tail_cli_filters(tmp_path, capsys):
    with AuditLog(tmp_path, mirror=None) as log:
        _session(log, "sb-a", "x")
    assert main(["audit", "--state-dir", str(tmp_path), "tail", "-n", "2", "--action", "exec_end"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 2 and all("exec_end" in ln for ln in out)


def _parse_journal(data: bytes) -> dict:
    fields, i = {}, 0
    while i < len(data):
        nl = data.index(b"\n", i)
        line = data[i:nl]
        if b"=" in line:
            k, v = line.split(b"=", 1)
            i = nl + 1
        else:
            k = line
            (n,) = struct.unpack("<Q", data[nl + 1:nl + 9])
            v = data[nl + 9:nl + 9 + n]
            assert data[nl + 9 + n:nl + 10 + n] == b"\n"
            i = nl + 10 + n
        fields[k.decode()] = v.decode()
    return fields


def test_journal_mirror_sends_native_protocol_to_a_fake_socket(tmp_path):
    path = str(tmp_path / "journal.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind(path)
    try:
        with AuditLog(tmp_path, mirror=JournalMirror(path)) as log:
            log.record("net_drop", sandbox="sb1", outcome="denied", uid=1000,
                       details={"note": "two\nlines"})
        server.settimeout(5)
        got = [_parse_journal(server.recv(65536)) for _ in range(2)]   # header, then ours
    finally:
        server.close()
    f = got[1]
    assert f["SANDBOXD_ACTION"] == "net_drop" and f["SANDBOXD_SANDBOX"] == "sb1"
    assert f["SANDBOXD_UID"] == "1000" and f["PRIORITY"] == "5" and f["SYSLOG_IDENTIFIER"] == "sandboxd"
    rec = json.loads(f["SANDBOXD_RECORD"])
    assert rec["details"]["note"] == "two\nlines" and f["SANDBOXD_AUDIT_HASH"] == rec["hash"]


def test_journal_field_with_newline_uses_length_form():
    data = encode({"action": "x\ny", "outcome": "ok", "seq": 1, "hash": "h"})
    assert b"SANDBOXD_ACTION\n" + struct.pack("<Q", 3) + b"x\ny\n" in data


def test_journal_mirror_is_a_no_op_without_journald(tmp_path):
    m = JournalMirror(str(tmp_path / "absent.sock"))
    m.send({"action": "x"})
    assert not m.active and m.sent == 0
