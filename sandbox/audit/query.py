"""Reading the audit log: filtered queries and tail (with follow across rotation).

Read-only and lock-free: the writer only appends whole lines (one write per group commit)
and a reader ignores a trailing piece without its newline until it is complete, so these
are safe while the daemon writes. The daemon's API serves `query()`; `sandboxctl audit tail`
uses `tail()`.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable, Iterator

from sandbox.audit.log import audit_dir_of, audit_files


def _match(rec: dict, sandbox: str | None, action: str | None, since_seq: int) -> bool:
    return ((sandbox is None or rec.get("sandbox") == sandbox)
            and (action is None or rec.get("action") == action)
            and rec.get("seq", 0) > since_seq)


def _read_lines(path: Path, offset: int) -> tuple[list[dict], int]:
    """Whole records in `path` from byte `offset`; the offset after the last whole line."""
    with open(path, "rb") as f:
        f.seek(offset)
        data = f.read()
    end = data.rfind(b"\n") + 1
    out = []
    for line in data[:end].splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue  # a damaged line: verify reports it; a reader skips it
        if isinstance(rec, dict):
            out.append(rec)
    return out, offset + end


def iter_records(state_dir: Path, *, sandbox: str | None = None, action: str | None = None,
                 since_seq: int = 0) -> Iterator[dict]:
    """Every record (oldest first) matching the filters."""
    for path in audit_files(audit_dir_of(Path(state_dir))):
        recs, _ = _read_lines(path, 0)
        for rec in recs:
            if _match(rec, sandbox, action, since_seq):
                yield rec


def query(state_dir: Path, *, sandbox: str | None = None, action: str | None = None,
          since_seq: int = 0, limit: int = 1000) -> list[dict]:
    """For the daemon's API: up to `limit` matching records after `since_seq`, oldest first.
    Page on by passing the last returned seq as `since_seq`."""
    out = []
    for rec in iter_records(state_dir, sandbox=sandbox, action=action, since_seq=since_seq):
        out.append(rec)
        if len(out) >= limit:
            break
    return out


def tail(state_dir: Path, *, n: int = 20, follow: bool = False, sandbox: str | None = None,
         action: str | None = None, stop: Callable[[], bool] | None = None,
         poll: float = 0.25) -> Iterator[dict]:
    """The last `n` matching records; with `follow`, then every new one as it is committed,
    moving on to the next file when the log rotates. Ends when `stop()` returns true."""
    adir = audit_dir_of(Path(state_dir))
    last: list[dict] = []
    files = audit_files(adir)
    pos = {}
    for path in files:
        recs, pos[path] = _read_lines(path, 0)
        last.extend(r for r in recs if _match(r, sandbox, action, 0))
        last = last[-n:] if n > 0 else []
    yield from last
    if not follow:
        return
    current = files[-1] if files else None
    offset = pos.get(current, 0)
    while not (stop and stop()):
        progressed = False
        if current is not None:
            recs, offset = _read_lines(current, offset)
            for rec in recs:
                progressed = True
                if _match(rec, sandbox, action, 0):
                    yield rec
        newer = [p for p in audit_files(adir) if current is None or p.name > current.name]
        if newer and not progressed:
            # The writer finished `current` (it fsyncs a file's last records before creating
            # the next), so whatever was in it has been read: move on.
            recs, offset = _read_lines(current, offset) if current is not None else ([], 0)
            for rec in recs:
                if _match(rec, sandbox, action, 0):
                    yield rec
            current, offset = newer[0], 0
            continue
        if not progressed:
            time.sleep(poll)


def format_record(rec: dict) -> str:
    parts = [str(rec.get("ts", "")), f"#{rec.get('seq')}", str(rec.get("action")),
             str(rec.get("outcome"))]
    for key in ("sandbox", "token", "uid", "resource"):
        if rec.get(key) is not None:
            parts.append(f"{key}={rec[key]}")
    if rec.get("duration_ms") is not None:
        parts.append(f"{rec['duration_ms']}ms")
    if rec.get("details"):
        parts.append(json.dumps(rec["details"], sort_keys=True, separators=(",", ":")))
    return " ".join(parts)
