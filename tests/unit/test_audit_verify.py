"""verify names the first bad record after deletion, edits, forgery, reordering, truncation."""
import json

import pytest

from sandbox.audit.log import AuditLog, audit_files, record_hash
from sandbox.audit.verify import verify
from sandbox.cli.main import main


@pytest.fixture
def log_dir(tmp_path):
    with AuditLog(tmp_path, max_bytes=2048, mirror=None) as log:
        for i in range(40):
            log.record("exec", sandbox=f"sb{i % 3}", details={"argv": ["true", str(i)]})
    files = audit_files(tmp_path / "audit")
    assert len(files) >= 3
    return tmp_path


def _lines(path):
    return path.read_bytes().splitlines(keepends=True)


def _middle(log_dir):
    f = audit_files(log_dir / "audit")[1]
    return f, _lines(f)


def test_intact_log_verifies(log_dir, capsys):
    report = verify(log_dir)
    assert report.ok and report.records == 40 + len(report.files)
    assert main(["audit", "verify", str(log_dir)]) == 0
    assert main(["audit", "verify", *map(str, audit_files(log_dir / "audit"))]) == 0


def test_deleted_record_is_a_seq_gap(log_dir):
    f, lines = _middle(log_dir)
    seq = json.loads(lines[3])["seq"]
    f.write_bytes(b"".join(lines[:3] + lines[4:]))
    p = verify(log_dir).problem
    assert (p.file, p.line, p.seq) == (f.name, 4, seq + 1) and "seq gap" in p.why


def test_edited_record_is_a_hash_mismatch(log_dir, capsys):
    f, lines = _middle(log_dir)
    rec = json.loads(lines[2])
    rec["details"]["argv"] = ["rm", "-rf", "/"]
    lines[2] = json.dumps(rec).encode() + b"\n"
    f.write_bytes(b"".join(lines))
    p = verify(log_dir).problem
    assert (p.file, p.line, p.seq) == (f.name, 3, rec["seq"]) and "hash mismatch" in p.why
    assert main(["audit", "verify", str(log_dir)]) == 1
    assert f"{f.name}:3" in capsys.readouterr().out


def test_forged_record_with_recomputed_hash_breaks_the_next_link(log_dir):
    f, lines = _middle(log_dir)
    rec = json.loads(lines[2])
    rec["outcome"] = "denied"
    rec["hash"] = record_hash(rec)
    lines[2] = json.dumps(rec).encode() + b"\n"
    f.write_bytes(b"".join(lines))
    p = verify(log_dir).problem
    assert (p.file, p.line) == (f.name, 4) and "prev mismatch" in p.why


def test_reordered_records_are_named(log_dir):
    f, lines = _middle(log_dir)
    lines[2], lines[3] = lines[3], lines[2]
    f.write_bytes(b"".join(lines))
    p = verify(log_dir).problem
    assert (p.file, p.line) == (f.name, 3) and "reordered" in p.why


def test_truncated_line_is_named(log_dir):
    f = audit_files(log_dir / "audit")[-1]
    data = f.read_bytes()
    f.write_bytes(data[:-30])
    p = verify(log_dir).problem
    assert p.file == f.name and "truncated" in p.why


def test_records_cut_off_the_end_are_detected(log_dir):
    f = audit_files(log_dir / "audit")[-1]
    f.write_bytes(b"".join(_lines(f)[:-1]))
    p = verify(log_dir).problem
    assert "truncated" in p.why and "HEAD" in p.why


def test_missing_middle_file_is_named(log_dir):
    files = audit_files(log_dir / "audit")
    files[1].unlink()
    p = verify(log_dir).problem
    assert p.file == files[2].name and p.line == 1
    assert "missing" in p.why or "prev mismatch" in p.why


def test_header_cut_from_a_file_is_named(log_dir):
    f, lines = _middle(log_dir)
    f.write_bytes(b"".join(lines[1:]))
    p = verify(log_dir).problem
    assert (p.file, p.line) == (f.name, 1) and "header" in p.why
