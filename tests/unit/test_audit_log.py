"""The hash-chained audit log: chain under concurrency, group commit, rotation, restart,
torn tails, fail-closed writes, and that no secret ever reaches the files."""
import asyncio
import json
import os
import threading

import pytest

from sandbox.audit.guard import Guard, salted_hash
from sandbox.audit.log import AuditLog, audit_files
from sandbox.audit.verify import verify
from sandbox.errors import AuditError
from tests.helpers import fakes


def _records(state_dir):
    out = []
    for f in audit_files(state_dir / "audit"):
        out += [json.loads(line) for line in f.read_text().splitlines()]
    return out


def test_busy_concurrent_run_verifies_and_rotates(tmp_path):
    log = AuditLog(tmp_path, max_bytes=8192, mirror=None)
    threads = [threading.Thread(target=lambda i=i: [
        log.record("exec", sandbox=f"sb{i}", details={"argv": ["echo", str(j)]}, uid=1000)
        for j in range(60)]) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    log.close()
    report = verify(tmp_path)
    assert report.ok, report.problem
    recs = _records(tmp_path)
    assert [r["seq"] for r in recs] == list(range(1, len(recs) + 1))
    assert sum(r["action"] == "exec" for r in recs) == 480
    assert len(audit_files(tmp_path / "audit")) > 3          # rotation happened ...
    headers = [r for r in recs if r["action"] == "audit_file"]
    assert len(headers) == len(audit_files(tmp_path / "audit"))  # ... and each file chains on
    # Per-sandbox order is the order each thread recorded in.
    for i in range(8):
        seen = [int(r["details"]["argv"][1]) for r in recs if r["sandbox"] == f"sb{i}"]
        assert seen == list(range(60))


def _wait_for(pred):
    for _ in range(1000):            # bounded: 10 s at most
        if pred():
            return True
        threading.Event().wait(0.01)
    return pred()


def test_group_commit_shares_one_fdatasync_among_waiting_callers(tmp_path):
    n = 40
    release = threading.Event()
    calls = []

    def counting_fsync(fd):
        calls.append(fd)
        if len(calls) == 2:          # the first record's flush: hold it until all others queue
            assert release.wait(10)
        os.fdatasync(fd)

    log = AuditLog(tmp_path, mirror=None, fsync=counting_fsync)   # call 1: the file header
    threads = [threading.Thread(target=log.record, args=("exec",), kwargs={"resource": str(i)})
               for i in range(n)]
    threads[0].start()
    assert _wait_for(lambda: log.records == 1)       # the writer is inside flush #2
    for t in threads[1:]:
        t.start()
    assert _wait_for(lambda: log.pending() == n - 1)  # everyone else waits for their record
    release.set()
    for t in threads:
        t.join()
    log.close()
    assert log.records == n
    assert len(calls) == 3           # header, the first record, then all 39 others in one flush
    assert verify(tmp_path).ok


def test_record_returns_only_after_fdatasync(tmp_path):
    synced = []
    log = AuditLog(tmp_path, mirror=None, fsync=lambda fd: (os.fdatasync(fd), synced.append(1)))
    before = len(synced)
    rec = log.record("sandbox_create", sandbox="sb1")
    assert len(synced) == before + 1
    assert rec["seq"] == 2 and rec["hash"] and rec["prev"]
    log.close()


def test_restart_continues_the_chain(tmp_path):
    with AuditLog(tmp_path, mirror=None) as log:
        log.record("daemon_start")
        last_seq, last_hash = log.last
    with AuditLog(tmp_path, mirror=None) as log:
        rec = log.record("daemon_start")
    assert rec["seq"] == last_seq + 1 and rec["prev"] == last_hash
    assert len(audit_files(tmp_path / "audit")) == 1
    assert verify(tmp_path).ok


def test_torn_tail_is_kept_and_acknowledged_on_open(tmp_path):
    with AuditLog(tmp_path, mirror=None) as log:
        log.record("exec", sandbox="sb1")
    first = audit_files(tmp_path / "audit")[0]
    original = first.read_bytes()
    with open(first, "ab") as f:
        f.write(b'{"action":"exec","seq":3,"det')          # a crash mid-write
    bad = verify(tmp_path)
    assert not bad.ok and "truncated" in bad.problem.why and bad.problem.file == first.name
    with AuditLog(tmp_path, mirror=None) as log:
        rec = log.record("daemon_start")
    assert first.read_bytes().startswith(original)          # history is not rewritten
    assert rec["seq"] == 5                                  # 3 header, 4 recovery, 5 this
    report = verify(tmp_path)
    assert report.ok, report.problem
    assert any("torn tail" in n for n in report.notes)
    recovery = [r for r in _records_tolerant(tmp_path) if r["action"] == "audit_recovery"]
    assert recovery[0]["details"]["file"] == first.name


def test_crash_right_after_creating_a_file_is_harmless(tmp_path):
    with AuditLog(tmp_path, mirror=None) as log:
        log.record("exec")
    (tmp_path / "audit" / "audit-000002.jsonl").touch()     # created, header never written
    with AuditLog(tmp_path, mirror=None, max_bytes=10) as log:
        rec = log.record("exec")                             # rotates into file 2 again
    assert rec["seq"] == 4 and verify(tmp_path).ok
    assert len(audit_files(tmp_path / "audit")) == 2


def _records_tolerant(state_dir):
    out = []
    for f in audit_files(state_dir / "audit"):
        for line in f.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
    return out


def test_records_cut_off_the_end_are_noted_on_open_and_by_verify(tmp_path):
    with AuditLog(tmp_path, mirror=None) as log:
        for i in range(5):
            log.record("exec", resource=str(i))
    f = audit_files(tmp_path / "audit")[0]
    lines = f.read_bytes().splitlines(keepends=True)
    f.write_bytes(b"".join(lines[:-2]))
    report = verify(tmp_path)
    assert not report.ok and "HEAD" in report.problem.why
    with AuditLog(tmp_path, mirror=None) as log:
        rec = log.record("daemon_start")
    assert [r for r in _records(tmp_path) if r["action"] == "audit_recovery"][0]["details"]["head_seq"] == 6
    assert rec["seq"] == 6


def test_failed_fdatasync_fails_closed(tmp_path):
    state = {"fail": False}

    def flaky(fd):
        if state["fail"]:
            raise OSError(5, "Input/output error")
        os.fdatasync(fd)

    log = AuditLog(tmp_path, mirror=None, fsync=flaky)
    log.record("ok")
    state["fail"] = True
    with pytest.raises(AuditError, match="write failed"):
        log.record("lost")
    state["fail"] = False
    with pytest.raises(AuditError, match="accepts no records"):
        log.record("after")
    log.close()


def test_second_writer_is_refused(tmp_path):
    with AuditLog(tmp_path, mirror=None):
        with pytest.raises(AuditError, match="another process"):
            AuditLog(tmp_path, mirror=None)


def test_record_async_is_durable_and_ordered(tmp_path):
    async def main(log):
        recs = await asyncio.gather(*(log.record_async("exec", resource=str(i)) for i in range(50)))
        await log.flush_async()
        return recs

    with AuditLog(tmp_path, mirror=None) as log:
        recs = asyncio.run(main(log))
        assert log.fsyncs < 50
    assert [r["resource"] for r in recs] == [str(i) for i in range(50)]
    assert verify(tmp_path).ok


def test_no_test_secret_reaches_the_audit_files(tmp_path, monkeypatch):
    env_secret = fakes.password()
    monkeypatch.setenv("SBXT_API_TOKEN", env_secret)
    token, aws, gh, key = (fakes.daemon_token(), fakes.aws_access_key_id(), fakes.github_token(),
                           fakes.private_key_block())
    with AuditLog(tmp_path, mirror=None) as log:
        log.record("exec", sandbox="sb1", token=token[:17],
                   details={"argv": ["curl", "-H", f"Authorization: Bearer {gh}", "x"],
                            "note": f"used {token}", "env": {"AWS": aws}, "key": key,
                            "stdin": env_secret.encode(), "nested": [[f"x{env_secret}y"]]})
        log.record("auth", outcome="denied", resource=token, details={token: "as key"})
        log.record("output", details={"text": "A" * 20000})
    data = b"".join(f.read_bytes() for f in audit_files(tmp_path / "audit"))
    for secret in fakes.emitted:
        assert secret.encode() not in data
    assert b"sbxd_" + token[5:17].encode() in data            # the token id is kept
    assert b"Authorization: Bearer [masked]" in data
    assert b'"masked":"too long"' in data
    assert verify(tmp_path).ok


def test_salted_hash_fingerprints_without_revealing():
    secret = fakes.password()
    a, b = os.urandom(32), os.urandom(32)
    assert salted_hash(secret, a) == salted_hash(secret.encode(), a)
    assert salted_hash(secret, a) != salted_hash(secret, b)
    assert secret not in salted_hash(secret, a)


def test_guard_leaves_ordinary_values_alone():
    g = Guard()
    value = {"argv": ["python3", "-c", "print(1)"], "cwd": "/home/agent/workspace",
             "sha256": "ab" * 32, "exit": 0, "usage": {"memory_peak": 123}}
    assert g.clean(value) == value and g.masked == 0


# The shortest string each credential shape of the guard matches (fake values, built here).
_SHAPE_MINIMA = [
    "sbxd_" + "a" * 12 + "_" + "B" * 16,
    "-----BEGIN PRIVATE KEY-----",
    "AKIA" + "Q" * 16,
    "ghp_" + "x" * 36,
    "github_pat_" + "y" * 40,
    "xoxb-" + "z" * 10,
    "sk-" + "w" * 20,
    "authorization:bearer " + "t" * 8,
    "eyJ" + "a" * 8 + "." + "b" * 8 + "." + "c" * 8,
]


def test_guard_prefilter_finds_every_shape():
    """The one-search prefilter (_ANY_SHAPE, _MIN_SHAPE) must let every shape through to
    the masking: each shape's shortest match, alone and inside other text, is masked."""
    from sandbox.audit import guard as G
    shapes = [G._TOKEN, *G._CREDENTIAL_SHAPES]
    assert len(_SHAPE_MINIMA) == len(shapes)
    for rx, example in zip(shapes, _SHAPE_MINIMA):
        assert rx.search(example), (rx.pattern, example)
        assert len(example) >= G._MIN_SHAPE
        for s in (example, f"argv: run {example} now"):
            assert G._ANY_SHAPE.search(s), (rx.pattern, s)
            g = Guard()
            assert g.clean(s) != s and g.masked == 1, (rx.pattern, s)
