"""Host uid/gid ranges, one per live sandbox, never shared.

Slot n owns host ids BASE + n*SIZE .. + SIZE-1. A slot is held by an exclusive flock on
state_dir/uidranges/<n>.lock for the sandbox's life: locks are per open file and vanish
with the holder, so concurrent processes never share a range and a crashed holder never
leaks one. Ids start at 2^20, far above any host account (login.defs UID_MAX 60000).
"""
from __future__ import annotations

import fcntl
import os
from dataclasses import dataclass
from pathlib import Path

from sandbox.errors import NamespaceError

BASE = 1 << 20
SIZE = 65536
SLOTS = 4096  # BASE + SLOTS*SIZE = 2^28 + 2^20, well inside the 32-bit id space


@dataclass
class UidRange:
    slot: int
    base: int
    size: int
    fd: int  # holds the flock

    def host_uid(self, inside: int) -> int:
        return self.base + inside

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # drops the lock; the lock file stays (reused, holds nothing)
            self.fd = -1


_made: set[str] = set()     # lock directories made (or found) by this process


def _dir(state_dir: Path) -> Path:
    d = Path(state_dir) / "uidranges"
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    return d


def _open_lock(state_dir: Path, slot: int) -> int:
    d = os.path.join(state_dir, "uidranges")
    if d not in _made:
        _dir(state_dir)
        _made.add(d)
    path = os.path.join(d, f"{slot}.lock")
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except FileNotFoundError:   # the directory went (a removed state dir): make it again
        _made.discard(d)
        _dir(state_dir)
        return os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)


def allocate(state_dir: Path, start: int = 0) -> UidRange:
    """Lock the first free slot at or after `start` (wrapping)."""
    for i in range(SLOTS):
        slot = (start + i) % SLOTS
        fd = _open_lock(state_dir, slot)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        return UidRange(slot, BASE + slot * SIZE, SIZE, fd)
    raise NamespaceError(f"all {SLOTS} host uid ranges are in use")


def in_use(state_dir: Path, base: int) -> bool:
    """True when a live holder has the range starting at `base` locked."""
    slot = (base - BASE) // SIZE
    path = _dir(state_dir) / f"{slot}.lock"
    if not path.exists():
        return False
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def cleanup(fields: dict) -> None:
    """Recovery of an intent record `uidrange`: nothing to do, the lock died with its holder."""
    return None
