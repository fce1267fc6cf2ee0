"""Verify the audit chain across all its files; name the first bad record and why.

Checks, in order, for every line of every file (oldest file first):
- the line is a whole JSON object (a piece without a final newline is a torn/truncated line);
- its hash is sha256 of its canonical JSON without `hash` (an edited record fails here);
- its seq is one more than the previous record's (a gap means records were deleted; a seq
  that shows up later in the file means records were reordered);
- its prev is the previous record's hash (a record replaced with a self-consistent forgery
  is caught here, at the record after it);
- each file starts with its header (action audit_file, the file's own index), so a missing
  or renamed file is named;
- a torn tail is accepted only when the next file's audit_recovery record acknowledges
  exactly those bytes (offset, length, sha256): the log never hides its own damage;
- at the end, the log must reach the seq in HEAD (records cut off the end are noticed).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from sandbox.audit.log import (GENESIS, HEADER_ACTION, RECOVERY_ACTION, audit_dir_of,
                               audit_files, file_index, read_head, record_hash)


@dataclass
class Problem:
    file: str
    line: int
    seq: int | None
    why: str

    def __str__(self):
        seq = f" (seq {self.seq})" if self.seq is not None else ""
        return f"{self.file}:{self.line}{seq}: {self.why}"


@dataclass
class VerifyReport:
    ok: bool = True
    files: list[str] = field(default_factory=list)
    records: int = 0
    last_seq: int = 0
    last_hash: str = GENESIS
    problem: Problem | None = None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["problem"] = str(self.problem) if self.problem else None
        return d


class _Bad(Exception):
    def __init__(self, problem: Problem):
        self.problem = problem


def verify(paths: Path | list[Path]) -> VerifyReport:
    """Verify a state dir, an audit dir, or an explicit list of audit files."""
    if isinstance(paths, (str, Path)) and Path(paths).is_dir():
        audit_dir = audit_dir_of(Path(paths))
        files, whole = audit_files(audit_dir), True
    else:
        files = sorted((Path(p) for p in ([paths] if isinstance(paths, (str, Path)) else paths)),
                       key=lambda p: (file_index(p) is None, file_index(p) or 0, str(p)))
        audit_dir = files[0].parent if files else Path(".")
        newest = audit_files(audit_dir)
        whole = bool(newest) and files == newest
    report = VerifyReport(files=[str(p) for p in files])
    # HEAD first: it is written after the log, so read before the files it can only lag them.
    head = read_head(audit_dir) if whole else None
    try:
        _verify_files(files, whole, report)
        if whole:
            _check_head(head, files, report)
    except _Bad as bad:
        report.ok = False
        report.problem = bad.problem
    if not files:
        report.ok = False
        report.problem = Problem(str(audit_dir), 0, None, "no audit files found")
    return report


def _verify_files(files: list[Path], whole: bool, report: VerifyReport) -> None:
    expect_seq, expect_prev = (1, GENESIS) if whole else (None, None)
    torn: dict | None = None       # an unacknowledged torn tail of the previous file
    prev_index = None
    for path in files:
        idx = file_index(path)
        data = path.read_bytes()
        lines = data.split(b"\n")
        tail = lines.pop()          # b"" when the file ends with a newline
        seqs = _seqs(lines)
        for n, raw in enumerate(lines, start=1):
            where = (path.name, n)
            rec = _parse(raw, where)
            seq = rec.get("seq")
            if n == 1:
                _check_header(rec, idx, prev_index, whole, where)
            if expect_seq is not None and seq != expect_seq:
                raise _Bad(Problem(*where, seq, _seq_problem(seq, expect_seq, seqs[n:])))
            if expect_prev is not None and rec.get("prev") != expect_prev:
                raise _Bad(Problem(*where, seq, "prev mismatch: does not chain to the record before "
                                                "it (that record was altered, removed or replaced)"))
            if torn is not None and n <= 2 and rec.get("action") == RECOVERY_ACTION:
                if all(rec["details"].get(k) == torn[k] for k in ("file", "offset", "bytes", "sha256")):
                    report.notes.append(f"{torn['file']}: torn tail of {torn['bytes']} bytes at "
                                        f"offset {torn['offset']}, acknowledged by seq {seq}")
                    torn = None
            if torn is not None and n >= 2:
                raise _Bad(Problem(torn["file"], torn["line"], None,
                                   "truncated: torn last line not acknowledged by a recovery record"))
            expect_seq, expect_prev = seq + 1, rec["hash"]
            report.records += 1
            report.last_seq, report.last_hash = seq, rec["hash"]
        if torn is not None:
            raise _Bad(Problem(torn["file"], torn["line"], None, "truncated: torn last line"))
        if tail:
            torn = {"file": path.name, "offset": len(data) - len(tail), "bytes": len(tail),
                    "sha256": hashlib.sha256(tail).hexdigest(), "line": len(lines) + 1}
        prev_index = idx
    if torn is not None:
        raise _Bad(Problem(torn["file"], torn["line"], None,
                           "truncated: the last line is incomplete (crash mid-write, or cut)"))


def _seqs(lines: list[bytes]) -> list[int | None]:
    out = []
    for raw in lines:
        try:
            out.append(json.loads(raw).get("seq"))
        except (ValueError, AttributeError):
            out.append(None)
    return out


def _parse(raw: bytes, where) -> dict:
    try:
        rec = json.loads(raw)
    except ValueError:
        raise _Bad(Problem(*where, None, "corrupt: not a JSON record")) from None
    if not isinstance(rec, dict) or not isinstance(rec.get("seq"), int) or "hash" not in rec:
        raise _Bad(Problem(*where, None, "malformed: not an audit record"))
    if rec["hash"] != record_hash(rec):
        raise _Bad(Problem(*where, rec["seq"], "hash mismatch: the record was edited"))
    return rec


def _check_header(rec: dict, idx: int | None, prev_index: int | None, whole: bool, where) -> None:
    if rec.get("action") != HEADER_ACTION:
        raise _Bad(Problem(*where, rec["seq"], "missing file header (file start was cut or replaced)"))
    if idx is not None and rec["details"].get("index") != idx:
        raise _Bad(Problem(*where, rec["seq"], f"file header says index {rec['details'].get('index')}, "
                                               f"but the file is number {idx} (renamed or reordered)"))
    if whole and idx is not None and idx != (prev_index or 0) + 1:
        raise _Bad(Problem(*where, rec["seq"], f"file number {(prev_index or 0) + 1} is missing"))


def _seq_problem(seq, expected: int, later: list) -> str:
    if isinstance(seq, int) and seq < expected:
        return f"reordered: seq {seq} comes after seq {expected - 1}"
    if expected in later:
        return f"reordered: expected seq {expected} here, it appears later"
    return f"seq gap: expected seq {expected}, found {seq} (records deleted)"


def _check_head(head: dict | None, files: list[Path], report: VerifyReport) -> None:
    if not head:
        report.notes.append("no HEAD file: cannot check the end of the log")
        return
    if head.get("seq", 0) > report.last_seq:
        raise _Bad(Problem(files[-1].name, 0, report.last_seq,
                           f"truncated: the log ends at seq {report.last_seq} but HEAD records "
                           f"seq {head['seq']} (records cut off the end)"))
    if head.get("seq") == report.last_seq and head.get("hash") != report.last_hash:
        raise _Bad(Problem(files[-1].name, 0, report.last_seq,
                           "the last record differs from the one HEAD records (replaced)"))
