"""The hash-chained audit log: append-only JSON lines with group commit. Implements AuditSink.

Layout under `<state_dir>/audit/` (directory 0700, files 0600):

    audit-000001.jsonl, audit-000002.jsonl, ...   the records, one canonical JSON object a line
    HEAD                                          seq and hash of the newest durable record
    salt                                          32 random bytes for salted_hash() (findings)
    lock                                          flock: one writer at a time

Every record has: seq, ts (RFC 3339 UTC), sandbox, token (a token *id*), uid, action,
resource, details, permission, outcome, duration_ms, prev (the previous record's hash; 64
zeros for the very first) and hash = sha256 of the canonical JSON (sorted keys, no spaces)
of the record without `hash`. Removing, reordering or editing a record breaks the chain
(sandbox/audit/verify.py names the first bad record).

Every file starts with a header record (action "audit_file", details.index = the file's
number, details.previous = the previous file's name) chained to the last record of the
previous file, so rotation keeps one chain and verify knows the order of the files and
notices a missing one. HEAD is rewritten after every commit (not fsynced: it may lag the
log after a power cut, never lead it, because it is written after the log's fdatasync); it
lets verify notice records cut off the *end* of the log, which a chain alone cannot show.

Durability: `record()` returns only after the record is written and fdatasync'd; for async
callers `await record_async()` does the same without blocking the event loop. One writer
thread commits whatever has queued up since its last fdatasync in one write and one
fdatasync (group commit): under load many records share one disk flush, and a caller is
acknowledged only once its own record is durable. If a write or fdatasync fails, the log
stops accepting records (AuditError): after a failed fsync the kernel may have dropped the
dirty pages (see fsync(2), "fsyncgate"), so retrying could acknowledge lost records; the
daemon must stop acknowledging actions instead (fail closed).

Batched durability for records nobody waits on (`submit_lazy()`): the daemon's engine steps,
escalation triggers and its own records are acknowledged to a client only by the reply that
follows them, which waits for `flush_future()` (or an ordinary record). Such a record is
written to the file at once (a crash of the daemon process keeps it: the kernel has it), but
it does not make the writer fdatasync on its own: the next fdatasync covers it, the one of an
eager record or a flush, or at the latest `lazy_delay` seconds (default 50 ms) after it was
written. Its Future resolves only then, exactly like submit()'s. One reply thus costs one
fdatasync instead of one per record made while serving it (~15 per sandbox created), and HEAD
still never names a record that is not durable (it is rewritten after each fdatasync only).

A crash can leave a torn last line (a write cut short). On open the log never rewrites or
truncates what is on disk (it is evidence, and the torn record was never acknowledged to
anyone, because acknowledgement waits for fdatasync). Instead it leaves the damaged file as
it is, starts a new file, and writes an "audit_recovery" record naming the file, the offset,
the length and the sha256 of the torn bytes, chained to the last intact record. verify
accepts a torn tail only when such a record acknowledges exactly those bytes.
"""
from __future__ import annotations

import asyncio
import fcntl
import hashlib
import json
import os
import re
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from sandbox.audit.guard import Guard, salted_hash
from sandbox.errors import AuditError
from sandbox.runtime.intent import atomic_write_bytes, fsync_dir

GENESIS = "0" * 64
FILE_RE = re.compile(r"audit-(\d{6,})\.jsonl")
HEADER_ACTION = "audit_file"
RECOVERY_ACTION = "audit_recovery"
DEFAULT_MAX_BYTES = 64 * 1024**2
_HEAD_SIZE = 256          # HEAD is rewritten in place, padded to a fixed size
_TAIL_WINDOW = 1024**2    # how much of the newest file is read on open to find the last record
FIELDS = ("seq", "ts", "sandbox", "token", "uid", "action", "resource", "details", "permission",
          "outcome", "duration_ms", "prev", "hash")


def canonical(obj: Any) -> bytes:
    """The one serialisation that is hashed and written: sorted keys, no spaces, UTF-8."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False).encode("utf-8", "surrogatepass")


def record_hash(rec: dict) -> str:
    return hashlib.sha256(canonical({k: v for k, v in rec.items() if k != "hash"})).hexdigest()


def rfc3339_now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def audit_dir_of(path: Path) -> Path:
    """`path` may be the daemon's state dir or its audit dir itself."""
    path = Path(path)
    return path if path.name == "audit" or any(path.glob("audit-*.jsonl")) else path / "audit"


def file_name(index: int) -> str:
    return f"audit-{index:06d}.jsonl"


def file_index(path: Path) -> int | None:
    m = FILE_RE.fullmatch(Path(path).name)
    return int(m.group(1)) if m else None


def audit_files(audit_dir: Path) -> list[Path]:
    """The log's files, oldest first."""
    found = [(file_index(p), p) for p in Path(audit_dir).glob("audit-*.jsonl")]
    return [p for i, p in sorted((i, p) for i, p in found if i is not None)]


def read_head(audit_dir: Path) -> dict | None:
    try:
        return json.loads((Path(audit_dir) / "HEAD").read_bytes().strip() or b"null")
    except (FileNotFoundError, ValueError):
        return None


def parse_line(line: bytes) -> dict | None:
    """A record if `line` is a JSON object whose hash is right, else None."""
    try:
        rec = json.loads(line)
    except ValueError:
        return None
    if not isinstance(rec, dict) or rec.get("hash") != record_hash(rec):
        return None
    return rec


@dataclass
class _Tail:
    """Where the newest file's intact records end, and what follows them (if anything)."""
    last: dict | None
    good_end: int
    damaged: bytes


def _read_tail(path: Path) -> _Tail:
    size = path.stat().st_size
    with open(path, "rb") as f:
        start = max(0, size - _TAIL_WINDOW)
        f.seek(start)
        data = f.read()
    if start:  # drop the partial first line of the window
        cut = data.find(b"\n") + 1
        data, start = data[cut:], start + cut
    lines = data.split(b"\n")
    end = len(data)
    # Walk back from the end to the last line that is a whole, valid record.
    for i in range(len(lines) - 1, -1, -1):
        if i == len(lines) - 1:   # the piece after the last newline: torn if non-empty
            end -= len(lines[i])
            continue
        rec = parse_line(lines[i])
        if rec is not None:
            return _Tail(rec, start + end, data[end:])
        end -= len(lines[i]) + 1
    return _Tail(None, start, data)


class AuditLog:
    """The daemon's AuditSink. Thread-safe; see the module docstring for the guarantees."""

    def __init__(self, state_dir: Path, *, max_bytes: int = DEFAULT_MAX_BYTES,
                 fsync: Callable[[int], None] = os.fdatasync, mirror: Any = "auto",
                 guard: Guard | None = None, lazy_delay: float = 0.05):
        self.dir = audit_dir_of(Path(state_dir))
        self.lazy_delay = lazy_delay
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.max_bytes = max_bytes
        self._fsync = fsync
        self.guard = guard or Guard()
        if mirror == "auto":
            from sandbox.audit.journal import JournalMirror
            mirror = JournalMirror()
        self.mirror = mirror
        self._lock_fd = self._take_lock()
        self.salt = self._load_salt()
        self._cond = threading.Condition()
        self._queue: list[tuple[dict | None, Future, bool]] = []   # (entry, future, lazy)
        self._unsynced: list[tuple[dict | None, Future]] = []      # written, not yet fdatasync'd
        self._unsynced_since = 0.0       # monotonic time the oldest of them was written
        self._dirty = False              # bytes written to the current file since its fdatasync
        self._closed = False
        self._failed: str | None = None
        self.fsyncs = 0
        self.batches = 0
        self.records = 0
        self._fd = -1
        self._to_mirror: list[dict] = []   # sealed records, sent to journald once durable
        self._head_fd = os.open(self.dir / "HEAD", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        self._open_newest()
        self._mirror_out()
        self._writer = threading.Thread(target=self._run, name="audit-writer", daemon=True)
        self._writer.start()

    # -- the AuditSink interface --------------------------------------------------------------

    def record(self, action: str, *, sandbox: str | None = None, outcome: str = "ok",
               resource: str | None = None, details: dict[str, Any] | None = None,
               token: str | None = None, uid: int | None = None,
               duration_ms: float | None = None, permission: str | None = None) -> dict:
        """Append one record; returns it once it is durable on disk."""
        return self.submit(action, sandbox=sandbox, outcome=outcome, resource=resource,
                           details=details, token=token, uid=uid, duration_ms=duration_ms,
                           permission=permission).result()

    async def record_async(self, action: str, **kw) -> dict:
        """record() for the event loop: awaits durability without blocking the loop."""
        return await asyncio.wrap_future(self.submit(action, **kw))

    def submit(self, action: str, *, sandbox=None, outcome="ok", resource=None, details=None,
               token=None, uid=None, duration_ms=None, permission=None) -> Future:
        """Queue one record; the Future resolves to the record once it is durable."""
        return self._enqueue(self._entry(action, sandbox, outcome, resource, details, token,
                                         uid, duration_ms, permission))

    def submit_lazy(self, action: str, *, sandbox=None, outcome="ok", resource=None,
                    details=None, token=None, uid=None, duration_ms=None,
                    permission=None) -> Future:
        """submit() for a record nobody waits on yet: written at once, made durable by the
        next fdatasync (an eager record's, flush_future()'s, or lazy_delay later); the
        Future resolves then. See the module docstring."""
        return self._enqueue(self._entry(action, sandbox, outcome, resource, details, token,
                                         uid, duration_ms, permission), lazy=True)

    def _entry(self, action, sandbox, outcome, resource, details, token, uid, duration_ms,
               permission) -> dict:
        g = self.guard.clean
        return {"ts": rfc3339_now(), "sandbox": g(sandbox), "token": g(token),
                "uid": uid if uid is None else int(uid), "action": g(str(action)),
                "resource": g(resource), "details": g(dict(details or {})),
                "permission": g(permission), "outcome": g(str(outcome)),
                "duration_ms": None if duration_ms is None else round(float(duration_ms), 3)}

    def flush(self) -> None:
        """Wait until everything submitted so far is durable."""
        self._enqueue(None).result()

    def flush_future(self) -> Future:
        """A Future that resolves once everything submitted so far is durable (one
        fdatasync now, shared with whatever else is queued)."""
        return self._enqueue(None)

    async def flush_async(self) -> None:
        await asyncio.wrap_future(self._enqueue(None))

    def finding_hash(self, data: bytes | str) -> str:
        """Salted fingerprint of a scanner finding (never the finding itself)."""
        return salted_hash(data, self.salt)

    def pending(self) -> int:
        with self._cond:
            return len(self._queue)

    def close(self) -> None:
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._cond.notify_all()
        self._writer.join()
        for fd in (self._fd, self._head_fd, self._lock_fd):
            if fd >= 0:
                os.close(fd)
        self._fd = self._head_fd = self._lock_fd = -1
        if self.mirror is not None:
            self.mirror.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    @property
    def current_file(self) -> Path:
        return self.dir / file_name(self._index)

    @property
    def last(self) -> tuple[int, str]:
        """(seq, hash) of the newest durable record."""
        return self._seq, self._prev

    # -- opening ------------------------------------------------------------------------------

    def _take_lock(self) -> int:
        fd = os.open(self.dir / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise AuditError(f"{self.dir}: the audit log is open in another process "
                             "(the daemon?); go through it, two writers would break the chain")
        return fd

    def _load_salt(self) -> bytes:
        path = self.dir / "salt"
        try:
            salt = path.read_bytes()
            if len(salt) == 32:
                return salt
        except FileNotFoundError:
            pass
        salt = os.urandom(32)
        atomic_write_bytes(path, salt)
        return salt

    def _open_newest(self) -> None:
        files = audit_files(self.dir)
        while files and files[-1].stat().st_size == 0:
            # A crash between creating a file and writing its header leaves it empty: it holds
            # nothing, so it goes (no record is lost or rewritten) and the previous file
            # continues; the next rotation makes it again, with its header.
            files.pop().unlink()
            fsync_dir(self.dir)
        self._seq, self._prev, self._index = 0, GENESIS, 0
        if not files:
            self._commit(self._start_file(None))
            return
        newest = files[-1]
        tail = _read_tail(newest)
        if tail.last is None:
            raise AuditError(f"{newest}: no intact record in its last {_TAIL_WINDOW} bytes; "
                             "run 'sandboxctl audit verify' and move the damaged file aside")
        self._seq, self._prev = tail.last["seq"], tail.last["hash"]
        self._index = file_index(newest)
        notes = []
        if tail.damaged:
            notes.append({"file": newest.name, "offset": tail.good_end, "bytes": len(tail.damaged),
                          "sha256": hashlib.sha256(tail.damaged).hexdigest(),
                          "why": "torn tail (crash mid-write); left in place, never acknowledged"})
        head = read_head(self.dir)
        if head and head.get("seq", 0) > self._seq:
            notes.append({"missing_after_seq": self._seq, "head_seq": head["seq"],
                          "why": "HEAD names records that are not in the log (cut off the end)"})
        if tail.damaged:
            # Never append after a torn line: start a new file, keep the damaged one as is.
            lines = self._start_file(newest.name)
        else:
            self._fd = os.open(newest, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
            self._size = os.fstat(self._fd).st_size
            lines = []
        for note in notes:
            lines.append(self._seal({"ts": rfc3339_now(), "sandbox": None, "token": None, "uid": None,
                                     "action": RECOVERY_ACTION, "resource": note.get("file"),
                                     "details": note, "permission": None, "outcome": "warning",
                                     "duration_ms": None}))
        if lines:
            self._commit(lines)

    def _start_file(self, previous: str | None) -> list[bytes]:
        """Close the current file, create the next one; returns its header line (unwritten)."""
        if self._fd >= 0:
            os.close(self._fd)
        self._index += 1
        path = self.dir / file_name(self._index)
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,
                           0o600)
        fsync_dir(self.dir)  # the new name must survive a crash before records go in it
        self._size = 0
        return [self._seal({"ts": rfc3339_now(), "sandbox": None, "token": None, "uid": None,
                            "action": HEADER_ACTION, "resource": path.name,
                            "details": {"index": self._index, "previous": previous},
                            "permission": None, "outcome": "ok", "duration_ms": None})]

    # -- the writer ---------------------------------------------------------------------------

    def _enqueue(self, entry: dict | None, lazy: bool = False) -> Future:
        fut: Future = Future()
        with self._cond:
            if self._closed:
                raise AuditError("the audit log is closed")
            if self._failed:
                raise AuditError(f"the audit log failed and accepts no records: {self._failed}")
            self._queue.append((entry, fut, lazy))
            self._cond.notify()
        return fut

    def _seal(self, entry: dict) -> bytes:
        """Give `entry` its seq, prev and hash (in place); its line, ready to write."""
        self._seq += 1
        entry["seq"] = self._seq
        entry["prev"] = self._prev
        entry["hash"] = record_hash(entry)
        self._prev = entry["hash"]
        self._to_mirror.append(entry)
        return canonical(entry) + b"\n"

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closed:
                    if not self._unsynced:
                        self._cond.wait()
                        continue
                    left = self._unsynced_since + self.lazy_delay - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(left)
                batch, self._queue = self._queue, []
                closing = self._closed
                if not batch and not self._unsynced and closing:
                    return
            try:
                self._write_batch(batch)
                due = (closing or any(not lazy for _, _, lazy in batch) or
                       time.monotonic() - self._unsynced_since >= self.lazy_delay)
                if due:
                    self._sync()
            except Exception as e:  # noqa: BLE001 - fail closed: no record is acknowledged
                err = AuditError(f"audit log write failed: {e}")
                with self._cond:
                    self._failed = str(e)
                    self._to_mirror = []
                    rest, self._queue = self._queue, []
                    unsynced, self._unsynced = self._unsynced, []
                for _, fut in unsynced + [(x, f) for x, f, _ in batch + rest]:
                    if not fut.done():
                        fut.set_exception(err)
                continue
            if due:
                with self._cond:
                    done, self._unsynced = self._unsynced, []
                for entry, fut in done:
                    fut.set_result(entry)
                self._mirror_out()

    def _mirror_out(self) -> None:
        sent, self._to_mirror = self._to_mirror, []
        if self.mirror is not None:
            for entry in sent:
                self.mirror.send(entry)

    def _write_batch(self, batch) -> None:
        """Seal and write a batch (rotating as needed); it joins the unsynced records."""
        lines: list[bytes] = []
        size = self._size
        for entry, _, _ in batch:
            if entry is None:      # a flush() marker
                continue
            seq, prev = self._seq, self._prev
            line = self._seal(entry)
            if size + len(line) > self.max_bytes and size > 0:
                # Rotate: unseal, make the old file's share durable (with whatever was
                # written to it unsynced), start the next file with its header, and chain
                # the record after that header.
                self._seq, self._prev = seq, prev
                del entry["hash"]
                self._to_mirror.pop()
                self._commit(lines)
                lines = self._start_file(self.current_file.name)
                size = len(lines[0])
                line = self._seal(entry)
            lines.append(line)
            size += len(line)
            self.records += 1
        self._write(lines)
        with self._cond:
            if not self._unsynced:
                self._unsynced_since = time.monotonic()
            self._unsynced += [(entry, fut) for entry, fut, _ in batch]
        self.batches += 1

    def _write(self, lines: list[bytes]) -> None:
        if not lines:
            return
        data = b"".join(lines)
        view = memoryview(data)
        while view:
            n = os.write(self._fd, view)
            view = view[n:]
        self._size += len(data)
        self._dirty = True

    def _sync(self) -> None:
        """fdatasync what was written to the current file, then update HEAD."""
        if not self._dirty:
            return
        self._fsync(self._fd)
        self.fsyncs += 1
        self._dirty = False
        head = json.dumps({"seq": self._seq, "hash": self._prev, "file": file_name(self._index)})
        os.pwrite(self._head_fd, head.encode().ljust(_HEAD_SIZE - 1) + b"\n", 0)

    def _commit(self, lines: list[bytes]) -> None:
        """Write `lines` to the current file, fdatasync, then update HEAD."""
        self._write(lines)
        self._sync()
