"""Intent records: what a sandbox holds, on disk before it holds it, for crash recovery.

`<state_dir>/sandboxes/<id>/intent.json` is written before the sandbox's first kernel object
exists and rewritten before every further one (`add`), so after a crash at any point the
record names a superset of what exists: recovery (sandbox/runtime/recovery.py) removes each
named object and verifies it is gone. Every write is atomic: a temp file in the same
directory renamed over the old one (rename(2) is atomic), so a reader sees either the old or
the new record, never a mix.

The record is not fsynced, on purpose. What it guards against is the daemon dying (a crash,
kill -9, OOM): the page cache outlives the process, so a record written before the crash is
there for the next start. A power cut or reboot ends every kernel object a record can name
(processes, cgroups, network namespaces, veths, nft tables, loop devices, mounts); the only
things that outlive it are files on disk (disk images, sandbox directories), and the
recovery sweep removes those by name when no record claims them (recovery._sweep,
_sweep_disks). An fsync per record cost ~0.7 ms on this host's ext4 and a sandbox writes
about ten records (measured: 22 fsyncs per create+destroy, ~8 ms of ~60). On a systemd host
the state dir is /run (tmpfs), where fsync is a no-op anyway.

Kinds and their fields are in docs/internals.md ("Intent records and crash recovery").
The record also names its owner (daemon pid and that pid's start time) so that recovery in
one daemon never tears down sandboxes a still-running daemon owns.
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
INTENT_FILE = "intent.json"
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
        data = Path(f"/proc/{pid}/stat").read_bytes()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # comm (field 2) may contain spaces and parentheses: split after the last ')'.
    return int(data[data.rindex(b")") + 2:].split()[19])


def sandbox_dir(state_dir: Path, sandbox_id: str) -> Path:
    if not _ID_OK.fullmatch(sandbox_id):
        raise SandboxError(f"invalid sandbox id {sandbox_id!r}", step="intent")
    return Path(state_dir) / "sandboxes" / sandbox_id


class Intent:
    """The on-disk intent record of one sandbox. Thread-safe."""

    def __init__(self, path: Path, data: dict):
        self.path = Path(path)
        self.data = data
        self._lock = threading.Lock()

    @classmethod
    def create(cls, state_dir: Path, sandbox_id: str, meta: dict | None = None) -> "Intent":
        """Write a new intent record; fails if the sandbox id already has one."""
        d = sandbox_dir(state_dir, sandbox_id)
        d.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        try:
            d.mkdir(mode=0o700)
        except FileExistsError:
            if (d / INTENT_FILE).exists():
                raise SandboxError(f"sandbox {sandbox_id} already has an intent record at {d}",
                                   step="intent") from None
        data = {"version": 1, "sandbox": sandbox_id, "created": time.time(),
                "owner": {"pid": os.getpid(), "starttime": proc_starttime(os.getpid())},
                "meta": dict(meta or {}), "resources": []}
        intent = cls(d / INTENT_FILE, data)
        intent._write()
        return intent

    @classmethod
    def load(cls, path: Path) -> "Intent":
        path = Path(path)
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
        return self.path.parent

    @property
    def resources(self) -> list[dict]:
        with self._lock:
            return [dict(r) for r in self.data["resources"]]

    def add(self, kind: str, **fields) -> None:
        """Record a resource *before* making it (durable when this returns)."""
        if kind not in KINDS:
            raise SandboxError(f"unknown intent kind {kind!r} (known: {', '.join(KINDS)})",
                               step="intent")
        with self._lock:
            self.data["resources"].append({"kind": kind, **fields})
            self._write()

    def remove(self, kind: str, **match) -> int:
        """Forget resources of `kind` whose fields match (after they were removed)."""
        with self._lock:
            before = len(self.data["resources"])
            self.data["resources"] = [
                r for r in self.data["resources"]
                if not (r["kind"] == kind and all(r.get(k) == v for k, v in match.items()))]
            removed = before - len(self.data["resources"])
            if removed:
                self._write()
            return removed

    def update_meta(self, **meta) -> None:
        with self._lock:
            self.data["meta"].update(meta)
            self._write()

    def close(self) -> None:
        """Delete the record after a verified destroy; removes the sandbox dir if empty."""
        with self._lock:
            self.path.unlink(missing_ok=True)
            try:
                self.dir.rmdir()
            except OSError:
                pass  # not empty: the engine's own files; its dir cleanup removes them

    def _write(self) -> None:
        # Not durable (module docstring): a daemon crash keeps the page cache.
        atomic_write_json(self.path, self.data, durable=False)


def list_intents(state_dir: Path) -> list[Path]:
    """Every intent record under `state_dir`, oldest sandbox id first."""
    base = Path(state_dir) / "sandboxes"
    if not base.is_dir():
        return []
    return sorted(p for p in base.glob(f"*/{INTENT_FILE}") if p.is_file())
