"""Intent records: what a sandbox holds, on disk before it holds it, for crash recovery.

`<state_dir>/sandboxes/<id>.intent` is created before the sandbox's first kernel object
exists, and every further object is recorded (`add`) before it is made, so after a crash at
any point the record names a superset of what exists: recovery (sandbox/runtime/recovery.py)
removes each named object and verifies it is gone.

The record is an append-only file of JSON lines, one file (one inode) per sandbox for its
whole life: the first line is the header (format version, sandbox id, owner, meta), each
`add`, `remove` and `update_meta` appends one line with one write(2) on an O_APPEND fd.
Rewriting the record as a temp file renamed over the old one, as before, made and freed an
inode per update (~2 ms of ext4 inode work per sandbox on this host, measured; append: 0.2).
Reading replays the lines in order. A write is atomic with respect to readers only up to
its last byte landing, so the reader ignores a last line without its newline (a writer died
mid-write: what it was recording was never made, because a record is written *before* its
object). A writer that finds such a torn tail cuts it off before appending (`_append`), and
a failed write is cut back off too, so a torn line is only ever the last one; any other line
that does not parse means the file was damaged and the load fails (recovery keeps and
reports it; fail closed). A file without a complete header line names nothing (its maker
died before its first object) and recovery just removes it.

The record is not fsynced, on purpose. What it guards against is the daemon dying (a crash,
kill -9, OOM): the page cache outlives the process, so a record written before the crash is
there for the next start. A power cut or reboot ends every kernel object a record can name
(processes, cgroups, network namespaces, veths, nft tables, loop devices, mounts); the only
things that outlive it are files on disk (disk images, sandbox directories), and the
recovery sweep removes those by name when no record claims them (recovery._sweep,
_sweep_disks). An fsync per record cost ~0.7 ms on this host's ext4 and a sandbox writes
about ten records (measured: 22 fsyncs per create+destroy, ~8 ms of ~60). On a systemd host
the state dir is /run (tmpfs), where fsync is a no-op anyway.

Records of the previous format (`<state_dir>/sandboxes/<id>/intent.json`, one JSON
document) are still read, so recovery after an upgrade finds them.

Kinds and their fields are in docs/internals.md ("Intent records and crash recovery"),
which also documents the line format. The record also names its owner (daemon pid and that
pid's start time) so that recovery in one daemon never tears down sandboxes a still-running
daemon owns.
"""
from __future__ import annotations

import json
import os
import re
import threading
import time
from pathlib import Path
from typing import Any

from sandbox.errors import SandboxError

KINDS = ("process", "cgroup", "disk", "netns", "veth", "nft", "qdisc", "mount", "dir", "uidrange")
INTENT_SUFFIX = ".intent"         # <state_dir>/sandboxes/<id>.intent (JSON lines)
INTENT_FILE = "intent.json"       # the previous format: <state_dir>/sandboxes/<id>/intent.json
VERSION = 2
_ID_OK = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")


def atomic_write_bytes(path: Path, data: bytes, mode: int = 0o600, *, durable: bool = True) -> None:
    """Replace `path` with `data`: temp file, rename. durable: fsync the file before the
    rename and the directory after it, so the new content also survives a power cut."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        if durable:
            os.fsync(fd)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    os.replace(tmp, path)
    if durable:
        fsync_dir(path.parent)


def atomic_write_json(path: Path, data: Any, mode: int = 0o600, *, durable: bool = True) -> None:
    atomic_write_bytes(path, json.dumps(data, indent=1, sort_keys=True).encode(), mode,
                       durable=durable)


def fsync_dir(path: Path) -> None:
    """Make a directory's entries (a create, a rename) durable: fsync(2) on the directory."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def proc_starttime(pid: int) -> int | None:
    """Field 22 of /proc/<pid>/stat (start time in clock ticks since boot), None if no such pid.

    (pid, starttime) names one process for the life of the system: a recycled pid gets a
    later start time, so recovery never signals a stranger that reused the number (proc(5))."""
    try:
        fd = os.open(f"/proc/{pid}/stat", os.O_RDONLY | os.O_CLOEXEC)
    except (FileNotFoundError, ProcessLookupError):
        return None
    try:
        data = os.read(fd, 4096)     # one read: proc makes the whole line at once
    except ProcessLookupError:
        return None
    finally:
        os.close(fd)
    if not data:
        return None
    # comm (field 2) may contain spaces and parentheses: split after the last ')'.
    return int(data[data.rindex(b")") + 2:].split()[19])


_OWNER: dict | None = None


def current_owner() -> dict:
    """This process as an owner: pid and start time (fixed for its life; fork resets it)."""
    global _OWNER
    pid = os.getpid()
    if _OWNER is None or _OWNER["pid"] != pid:
        _OWNER = {"pid": pid, "starttime": proc_starttime(pid)}
    return dict(_OWNER)


def _check_id(sandbox_id: str) -> None:
    if not _ID_OK.fullmatch(sandbox_id):
        raise SandboxError(f"invalid sandbox id {sandbox_id!r}", step="intent")


def sandbox_dir(state_dir: Path, sandbox_id: str) -> Path:
    """`<state_dir>/sandboxes/<id>`: the previous format's per-sandbox directory. The engine
    no longer makes it; recovery still removes one left by an older daemon."""
    _check_id(sandbox_id)
    return Path(state_dir) / "sandboxes" / sandbox_id


def intent_path(state_dir: Path, sandbox_id: str) -> Path:
    _check_id(sandbox_id)
    return Path(state_dir) / "sandboxes" / f"{sandbox_id}{INTENT_SUFFIX}"


def intent_id(path: Path) -> str:
    """The sandbox id an intent record's path names (either format)."""
    path = Path(path)
    return path.parent.name if path.name == INTENT_FILE else path.name[:-len(INTENT_SUFFIX)]


def _line(obj: dict) -> bytes:
    return json.dumps(obj, separators=(",", ":"), sort_keys=True).encode() + b"\n"


def _matches(res: dict, kind: str, match: dict) -> bool:
    return res["kind"] == kind and all(res.get(k) == v for k, v in match.items())


class Intent:
    """The on-disk intent record of one sandbox. Thread-safe."""

    def __init__(self, path: Path, data: dict, *, valid_len: int | None = None):
        self.path = Path(path)
        self.data = data
        self._lock = threading.Lock()
        self._fd = -1
        self._broken = False          # a failed append could not be cut back off
        # Bytes of complete lines in the file, when a torn tail follows them (cut off before
        # the next append); None when the file ends with a complete line.
        self._valid_len = valid_len

    @classmethod
    def create(cls, state_dir: Path, sandbox_id: str, meta: dict | None = None) -> "Intent":
        """Write a new intent record; fails if the sandbox id already has one."""
        path = intent_path(state_dir, sandbox_id)
        data = {"version": VERSION, "sandbox": sandbox_id, "created": time.time(),
                "owner": current_owner(), "meta": dict(meta or {}), "resources": []}
        header = _line({k: v for k, v in data.items() if k != "resources"})
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC
        try:
            fd = os.open(path, flags, 0o600)
        except FileNotFoundError:
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd = os.open(path, flags, 0o600)
        except FileExistsError:
            raise SandboxError(f"sandbox {sandbox_id} already has an intent record at {path}",
                               step="intent") from None
        if (path.parent / sandbox_id / INTENT_FILE).exists():   # an older daemon's record
            os.close(fd)
            path.unlink()
            raise SandboxError(f"sandbox {sandbox_id} already has an intent record at "
                               f"{path.parent / sandbox_id / INTENT_FILE}", step="intent")
        intent = cls(path, data)
        intent._fd = fd
        try:
            intent._write_line(header)
        except BaseException:
            intent._close_fd()
            path.unlink(missing_ok=True)
            raise
        return intent

    @classmethod
    def load(cls, path: Path) -> "Intent":
        path = Path(path)
        if path.name == INTENT_FILE:
            return cls._load_v1(path)
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            raise SandboxError(f"{path}: intent record vanished", step="intent") from None
        end = raw.rfind(b"\n") + 1          # complete lines end here; the rest is torn
        data = {"version": VERSION, "sandbox": intent_id(path), "created": None, "owner": {},
                "meta": {}, "resources": []}
        for n, line in enumerate(raw[:end].splitlines()):
            try:
                rec = json.loads(line)
                if not isinstance(rec, dict):
                    raise ValueError("not an object")
                if n == 0:
                    if rec.get("version") != VERSION or not isinstance(rec.get("meta"), dict):
                        raise ValueError("bad header")
                    data.update({k: v for k, v in rec.items() if k != "resources"})
                elif "add" in rec:
                    res = rec["add"]
                    if not isinstance(res, dict) or res.get("kind") not in KINDS:
                        raise ValueError("bad resource")
                    data["resources"].append(res)
                elif "remove" in rec:
                    kind, match = rec["remove"], rec.get("match") or {}
                    data["resources"] = [r for r in data["resources"]
                                         if not _matches(r, kind, match)]
                elif "meta" in rec:
                    data["meta"].update(rec["meta"])
                else:
                    raise ValueError("unknown line")
            except (ValueError, TypeError, AttributeError) as e:
                raise SandboxError(f"{path}: damaged intent record (line {n + 1}: {e})",
                                   step="intent") from None
        return cls(path, data, valid_len=end if end != len(raw) else None)

    @classmethod
    def _load_v1(cls, path: Path) -> "Intent":
        try:
            data = json.loads(path.read_text())
            if not isinstance(data, dict) or not isinstance(data.get("resources"), list):
                raise ValueError("no resource list")
        except ValueError as e:
            raise SandboxError(f"{path}: damaged intent record ({e})", step="intent") from None
        return cls(path, data)

    @property
    def sandbox_id(self) -> str:
        return self.data["sandbox"]

    @property
    def dir(self) -> Path:
        """The sandbox's directory in the previous format (`sandboxes/<id>`); now only a name
        (recovery removes one an older daemon left)."""
        return self.path.parent if self.path.name == INTENT_FILE else \
            self.path.parent / intent_id(self.path)

    @property
    def resources(self) -> list[dict]:
        with self._lock:
            return [dict(r) for r in self.data["resources"]]

    def add(self, kind: str, **fields) -> None:
        """Record a resource *before* making it (on disk when this returns)."""
        if kind not in KINDS:
            raise SandboxError(f"unknown intent kind {kind!r} (known: {', '.join(KINDS)})",
                               step="intent")
        res = {"kind": kind, **fields}
        with self._lock:
            self._append({"add": res})
            self.data["resources"].append(res)

    def remove(self, kind: str, **match) -> int:
        """Forget resources of `kind` whose fields match (after they were removed)."""
        with self._lock:
            keep = [r for r in self.data["resources"] if not _matches(r, kind, match)]
            removed = len(self.data["resources"]) - len(keep)
            if removed:
                self._append({"remove": kind, "match": match})
                self.data["resources"] = keep
            return removed

    def update_meta(self, **meta) -> None:
        with self._lock:
            self._append({"meta": meta})
            self.data["meta"].update(meta)

    def close(self) -> None:
        """Delete the record after a verified destroy (and an older daemon's directory of
        it, if empty)."""
        with self._lock:
            self._close_fd()
            self.path.unlink(missing_ok=True)
            if self.path.name == INTENT_FILE:
                try:
                    self.path.parent.rmdir()
                except OSError:
                    pass  # not empty: recovery's remove_dir removes the rest

    def _write(self) -> None:
        """Rewrite the whole record from `data` (temp file + rename: a new inode; only for
        rare changes such as a new owner, never on the sandbox's hot path)."""
        with self._lock:
            self._close_fd()
            if self.path.name == INTENT_FILE:
                atomic_write_json(self.path, self.data, durable=False)
                return
            head = {k: v for k, v in self.data.items() if k != "resources"}
            head["version"] = VERSION
            body = _line(head) + b"".join(_line({"add": r}) for r in self.data["resources"])
            atomic_write_bytes(self.path, body, durable=False)
            self._valid_len = None

    # ---- appending -------------------------------------------------------------------
    def _append(self, rec: dict) -> None:
        if self.path.name == INTENT_FILE:       # an older daemon's record: rewrite it whole
            data = json.loads(json.dumps(self.data))
            if "add" in rec:
                data["resources"].append(rec["add"])
            elif "remove" in rec:
                data["resources"] = [r for r in data["resources"]
                                     if not _matches(r, rec["remove"], rec["match"])]
            else:
                data["meta"].update(rec["meta"])
            atomic_write_json(self.path, data, durable=False)
            return
        if self._broken:
            raise SandboxError(f"the intent record {self.path} is damaged by an earlier failed "
                               "write: refusing to record more", step="intent")
        if self._fd < 0:
            try:
                self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
            except OSError as e:
                raise SandboxError(f"cannot write the intent record {self.path}: {e.strerror}",
                                   step="intent", errno=e.errno, syscall="open") from None
            if self._valid_len is not None:          # a torn tail from a dead writer
                os.ftruncate(self._fd, self._valid_len)
                self._valid_len = None
        self._write_line(_line(rec))

    def _write_line(self, line: bytes) -> None:
        """One append of one complete line; on failure the file is cut back to where it
        was, so a partial line never stays in front of a later one."""
        fd = self._fd
        try:
            start = os.fstat(fd).st_size
        except OSError as e:
            raise SandboxError(f"cannot write the intent record {self.path}: {e.strerror}",
                               step="intent", errno=e.errno, syscall="fstat") from None
        try:
            n = os.write(fd, line)
            while n < len(line):                 # a short write (e.g. the disk filled up)
                n += os.write(fd, line[n:])
        except OSError as e:
            try:
                os.ftruncate(fd, start)
            except OSError:
                self._broken = True              # cannot repair: refuse further records
            raise SandboxError(f"cannot write the intent record {self.path}: {e.strerror}",
                               step="intent", errno=e.errno, syscall="write") from None

    def _close_fd(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __del__(self):
        fd = getattr(self, "_fd", -1)
        if fd >= 0:
            try:
                os.close(fd)
            except OSError:
                pass


def list_intents(state_dir: Path) -> list[Path]:
    """Every intent record under `state_dir` (both formats), by sandbox id."""
    base = Path(state_dir) / "sandboxes"
    try:
        names = os.listdir(base)
    except (FileNotFoundError, NotADirectoryError):
        return []
    found = []
    for name in names:
        if name.endswith(INTENT_SUFFIX) and not name.startswith("."):
            found.append(base / name)
        elif os.path.isfile(base / name / INTENT_FILE):
            found.append(base / name / INTENT_FILE)
    return sorted(found, key=lambda p: (intent_id(p), p.name))
