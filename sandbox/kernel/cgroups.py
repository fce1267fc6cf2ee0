"""Resource limits through cgroups: one interface, two drivers, fail closed.

Layouts (detected from /proc/self/mountinfo at start, see `detect_layout`):

- **v2** (unified): cgroup2 at /sys/fs/cgroup with controllers. One cgroup per sandbox under
  the daemon's subtree; limits in memory.max / memory.swap.max / memory.oom.group / pids.max /
  cpu.max; membership by CLONE_INTO_CGROUP, kill with cgroup.kill, freeze with cgroup.freeze
  (Documentation/admin-guide/cgroup-v2.rst).
- **hybrid**: v1 controllers under /sys/fs/cgroup/<ctrl> plus a cgroup2 mount with no
  controllers (/sys/fs/cgroup/unified). The limits live in the v1 controllers (the C parent
  writes the child's pid into each `cgroup.procs` before the child runs anything); membership,
  kill and freeze live in the controller-less cgroup2 directory, where cgroup.kill and
  cgroup.freeze are core files that need no controller.
- **v1** (no cgroup2 at all): as hybrid, but kill is freezer FROZEN + SIGKILL every task +
  THAWED until empty (Documentation/admin-guide/cgroup-v1/freezer-subsystem.rst), in a
  bounded loop.

A limit the policy asks for whose controller is missing or not delegated makes creation fail
with a CgroupError naming the controller: a sandbox never runs silently without a limit.

The handle (`SandboxCgroup`, set as `ctx.cgroup` by the step) gives the engine kill(),
freeze(), thaw(), pids(), usage(), events(), mark()/since() for per-command figures,
reason() / reason_text() for "killed: memory limit 64 MiB reached", and remove(), which
verifies every directory is gone.
"""
from __future__ import annotations

import errno
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from sandbox.errors import CgroupError, TeardownError

CGROUP_MOUNT = Path("/sys/fs/cgroup")
# The subtree sandboxes go in when not delegated by systemd. SANDBOXD_CGROUP_PARENT lets a
# test run (or a second daemon) keep its cgroups apart from the host's real daemon.
DEFAULT_PARENT = os.environ.get("SANDBOXD_CGROUP_PARENT", "sandboxd").strip("/") or "sandboxd"
CFS_PERIOD_US = 100_000          # the kernel's default period; quota = cpus * period
_V1_CONTROLLERS = ("memory", "pids", "cpu", "cpuacct", "freezer", "blkio", "cpuset", "devices",
                   "hugetlb", "net_cls", "net_prio", "perf_event", "rdma", "misc")
_WAIT_STEPS = 400                # bounded waits: 400 x 5 ms = 2 s
_WAIT_SLEEP = 0.005
_KILL_ROUNDS = 100               # v1 freeze+kill rounds before giving up loudly


# ---------------------------------------------------------------------------- small helpers

def human_size(n: int) -> str:
    """1073741824 -> '1 GiB', 67108864 -> '64 MiB' (for reason texts and doctor)."""
    for unit, size in (("TiB", 1024**4), ("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= size and n % size == 0:
            return f"{n // size} {unit}"
    for unit, size in (("TiB", 1024**4), ("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def _write(path: Path, value: str):
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.write(fd, value.encode())
        finally:
            os.close(fd)
    except OSError as e:
        raise CgroupError(f"cannot write {value.strip()!r} to {path}", errno=e.errno,
                          syscall="write") from e


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError as e:
        raise CgroupError(f"cannot read {path}", errno=e.errno, syscall="read") from e


class KeptFiles(dict):
    """A handle's cgroup files kept open: (path or (path, "w")) -> fd. Each fd is used only
    under `lock`, and close() takes it too, so no number is closed while a reader or writer
    (the event loop's mark(), a thread's usage()) is between looking it up and using it: a
    number closed under it and reused by another open() meanwhile would have it read, or
    WRITE, someone else's file. Once closed, files are opened per use, never kept again."""

    def __init__(self):
        super().__init__()
        self.lock = threading.Lock()
        self.closed = False

    def use(self, path, key, flags: int, op):
        """op(fd) on the kept fd of `key` (opened on first use)."""
        with self.lock:
            if not self.closed:
                fd = self.get(key)
                if fd is None:
                    fd = self[key] = os.open(path, flags | os.O_CLOEXEC)
                return op(fd)
        fd = os.open(path, flags | os.O_CLOEXEC)
        try:
            return op(fd)
        finally:
            os.close(fd)

    def close(self) -> None:
        with self.lock:
            self.closed = True
            while self:
                os.close(self.popitem()[1])


def _read_text(path: Path, fds: KeptFiles | None = None) -> str:
    """A cgroup file's text. With `fds` (a handle's cache) through an fd kept open for the
    cgroup's life and pread at offset 0, which regenerates a kernfs file: every command
    reads ~20 of these files (its figures before and after), and an open + close each was
    about 1 ms of a command's 4.6 ms. Raises like open(): FileNotFoundError, OSError."""
    if fds is None:
        return path.read_text()
    return fds.use(path, path, os.O_RDONLY, lambda fd: os.pread(fd, 65536, 0)).decode()


def _write_kept(path: Path, value: str, fds: KeptFiles):
    """Write a cgroup file through a write fd kept open for the cgroup's life (the handle's
    fd cache, keyed apart from the read fds): memory.max_usage_in_bytes is reset before every
    command, and an open + close per reset is most of its cost."""
    data = value.encode()
    try:
        fds.use(path, (path, "w"), os.O_WRONLY, lambda fd: os.pwrite(fd, data, 0))
    except OSError as e:
        raise CgroupError(f"cannot write {value.strip()!r} to {path}", errno=e.errno,
                          syscall="write") from e


def _gone(e: OSError) -> bool:
    """The file is not there (any more): ENOENT, or ENODEV from a kept fd of a removed cgroup."""
    return isinstance(e, FileNotFoundError) or e.errno == errno.ENODEV


def _read_int(path: Path, default: int = 0, fds: KeptFiles | None = None) -> int:
    """An integer file; 'max' and a missing file give `default`."""
    try:
        text = _read_text(path, fds).strip()
    except OSError as e:
        if _gone(e):
            return default
        raise CgroupError(f"cannot read {path}", errno=e.errno, syscall="read") from e
    return default if text == "max" else int(text.split()[0])


def _read_keyed(path: Path, fds: KeptFiles | None = None) -> dict[str, int]:
    """'key value' lines (cpu.stat, memory.events, pids.events, memory.oom_control)."""
    try:
        text = _read_text(path, fds)
    except OSError as e:
        if _gone(e):
            return {}
        raise
    out = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].lstrip("-").isdigit():
            out[parts[0]] = int(parts[1])
    return out


def _read_pids(path: Path) -> list[int]:
    try:
        return [int(x) for x in path.read_text().split()]
    except FileNotFoundError:
        return []


def _mkdir(path: Path) -> bool:
    """mkdir that says whether it made the directory (for intent and undo)."""
    try:
        path.mkdir()
        return True
    except FileExistsError:
        return False
    except OSError as e:
        raise CgroupError(f"cannot create cgroup {path}", errno=e.errno, syscall="mkdir") from e


def _mkdir_leaf(path: Path) -> bool:
    """_mkdir for a sandbox's directory under the run's parent: the parent levels are made
    only when the first mkdir finds them missing, instead of one mkdir per level per
    sandbox."""
    try:
        return _mkdir(path)
    except CgroupError as e:
        if e.errno != errno.ENOENT:
            raise
    missing = []
    for p in path.parents:
        if p.exists():
            break
        missing.append(p)
    for p in reversed(missing):
        _mkdir(p)
    return _mkdir(path)


def _rmdir_verified(path: Path) -> str | None:
    """rmdir a cgroup directory, retrying while the last tasks finish exiting (EBUSY).
    Returns None when it is gone, else a description of what is left."""
    last = None
    for _ in range(_WAIT_STEPS):
        try:
            os.rmdir(path)
        except FileNotFoundError:
            return None
        except OSError as e:
            last = e
            if e.errno not in (errno.EBUSY, errno.EAGAIN):
                break
            time.sleep(_WAIT_SLEEP)
            continue
        return None if not path.exists() else f"{path} (still exists)"
    return f"{path} ({os.strerror(last.errno) if last else 'still exists'})"


def _wait_until(predicate) -> bool:
    """Poll predicate for up to _WAIT_STEPS * _WAIT_SLEEP seconds. The first checks come
    fast (a kill or freeze usually completes within a millisecond, and a flat 5 ms sleep
    was most of a kill's time), then back off to _WAIT_SLEEP."""
    deadline = time.monotonic() + _WAIT_STEPS * _WAIT_SLEEP
    pause = 0.0002
    while not predicate():
        if time.monotonic() >= deadline:
            return predicate()
        time.sleep(pause)
        pause = min(pause * 2, _WAIT_SLEEP)
    return True


def _sigkill(pids):
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _kill_until_empty(list_pids):
    """SIGKILL whatever list_pids() returns until it returns nothing (bounded rounds)."""
    for _ in range(_KILL_ROUNDS):
        tasks = list_pids()
        if not tasks:
            return
        _sigkill(tasks)
        _wait_until(lambda: not list_pids())


def host_swap_bytes() -> int:
    """Total swap on the host (/proc/meminfo SwapTotal), in bytes."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("SwapTotal:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


# ---------------------------------------------------------------------------- layout detection

@dataclass(frozen=True)
class Layout:
    kind: str                                   # "v2", "hybrid", "v1" or "none"
    unified: Path | None = None                 # the cgroup2 mount point
    v2_controllers: frozenset = frozenset()     # controllers the cgroup2 root offers
    v1: dict = field(default_factory=dict)      # v1 controller -> its mount point
    swap_bytes: int = 0                         # host swap (decides whether swap=0 needs memsw)

    def controllers(self) -> set[str]:
        return set(self.v2_controllers) if self.kind == "v2" else set(self.v1)


def parse_mountinfo(text: str) -> tuple[Path | None, dict[str, Path]]:
    """(cgroup2 mount point, {v1 controller: mount point}) from /proc/self/mountinfo text.
    Named v1 hierarchies (name=systemd) carry no controller and are ignored."""
    unified, v1 = None, {}
    for line in text.splitlines():
        left, _, right = line.partition(" - ")
        fields_l, fields_r = left.split(), right.split()
        if len(fields_l) < 5 or len(fields_r) < 3:
            continue
        mountpoint = Path(fields_l[4].replace("\\040", " "))
        fstype, super_opts = fields_r[0], fields_r[2].split(",")
        if fstype == "cgroup2" and unified is None:
            unified = mountpoint
        elif fstype == "cgroup":
            for opt in super_opts:
                if opt in _V1_CONTROLLERS and opt not in v1:
                    v1[opt] = mountpoint
    return unified, v1


def detect_layout(mountinfo: str | None = None) -> Layout:
    if mountinfo is None:
        mountinfo = Path("/proc/self/mountinfo").read_text()
    unified, v1 = parse_mountinfo(mountinfo)
    v2c = frozenset()
    if unified is not None:
        try:
            v2c = frozenset((unified / "cgroup.controllers").read_text().split())
        except OSError:
            v2c = frozenset()
    # A cgroup2 root offering memory, or the only cgroup filesystem, is v2. A cgroup2 root
    # beside v1 controllers is hybrid even when it offers a stray controller (hugetlb here).
    if unified is not None and ("memory" in v2c or not v1):
        kind = "v2"
    elif v1:
        kind = "hybrid" if unified is not None else "v1"
    else:
        kind = "none"
    return Layout(kind, unified, v2c, dict(v1), host_swap_bytes())


_LAYOUT: Layout | None = None


def host_layout() -> Layout:
    """The host's layout, detected once per process (tests may monkeypatch this)."""
    global _LAYOUT
    if _LAYOUT is None:
        _LAYOUT = detect_layout()
    return _LAYOUT


# ---------------------------------------------------------------------------- what a policy needs

def required_controllers(limits, layout: Layout) -> dict[str, str]:
    """{controller: why} for the policy's limits on this layout."""
    need = {"memory": f"memory limit {human_size(limits.memory)}",
            "pids": f"process limit {limits.pids}"}
    if limits.cpus:
        need["cpu"] = f"CPU limit {limits.cpus:g} cores"
    if layout.kind == "v1":
        need["freezer"] = "freeze and kill of the whole sandbox (no cgroup2 mount)"
    return need


def check_enforceable(limits, layout: Layout):
    """Raise CgroupError naming each missing controller the policy needs (fail closed)."""
    if layout.kind == "none":
        raise CgroupError("no cgroup filesystem is mounted: no limit can be enforced")
    have = layout.controllers()
    missing = {c: why for c, why in required_controllers(limits, layout).items() if c not in have}
    if missing:
        what = "; ".join(f"controller '{c}' (for the {why})" for c, why in sorted(missing.items()))
        raise CgroupError(f"cannot enforce the policy's limits on this {layout.kind} cgroup host: "
                          f"missing {what}")


# ---------------------------------------------------------------------------- the handle

class SandboxCgroup:
    """One sandbox's cgroup(s). Subclasses say where each figure lives."""

    kind = "?"

    def __init__(self, name: str, limits, v2_dir: Path | None, v1_dirs: dict[str, Path]):
        self.name = name
        self.limits = limits
        self.v2_dir = v2_dir
        self.v1_dirs = dict(v1_dirs)
        self._fd: int | None = None
        self._marks: list = []
        self._fds = KeptFiles()  # figures files kept open (_read_text, _write_kept)

    # membership ------------------------------------------------------------
    def paths(self) -> list[Path]:
        return ([self.v2_dir] if self.v2_dir else []) + list(self.v1_dirs.values())

    def open_fd(self) -> int | None:
        """An O_DIRECTORY fd of the cgroup2 directory for clone3(CLONE_INTO_CGROUP).
        Owned by this handle (closed by remove()); the engine must not close it."""
        if self.v2_dir is None:
            return None
        if self._fd is None:
            try:
                self._fd = os.open(self.v2_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            except OSError as e:
                raise CgroupError(f"cannot open cgroup {self.v2_dir}", errno=e.errno,
                                  syscall="open") from e
        return self._fd

    def v1_tasks(self) -> list[str]:
        """The v1 `tasks` files the spawned child joins itself through (csrc/spawn.c)."""
        return [str(d / "tasks") for d in self.v1_dirs.values()]

    def add(self, pid: int):
        """Move a running process in (tests, benchmarks; the engine clones straight in)."""
        for p in self.paths():
            _write(p / "cgroup.procs", str(pid))

    def pids(self) -> list[int]:
        seen = set()
        for p in self.paths():
            seen.update(_read_pids(p / "cgroup.procs"))
        return sorted(seen)

    # control ---------------------------------------------------------------
    def kill(self):
        raise NotImplementedError

    def freeze(self):
        raise NotImplementedError

    def thaw(self):
        raise NotImplementedError

    def _kill_by_freezing(self, freezer: Path):
        """v1: freeze, SIGKILL every task, thaw, until the cgroup is empty. Freezing first
        means a fork bomb cannot make new tasks between our read of the list and the kill."""
        for _ in range(_KILL_ROUNDS):
            tasks = self.pids()
            if not tasks:
                return
            _write(freezer / "freezer.state", "FROZEN")
            _wait_until(lambda: _read(freezer / "freezer.state").strip() != "FREEZING")
            _sigkill(self.pids())
            _write(freezer / "freezer.state", "THAWED")
            _wait_until(lambda: not self.pids())
        if self.pids():
            raise CgroupError(f"cgroup {self.name} still has processes after {_KILL_ROUNDS} "
                              f"kill rounds: {self.pids()[:10]}")

    def _kill_by_signal(self):
        """Last resort for tasks outside the cgroup2 directory (should never happen)."""
        _kill_until_empty(self.pids)

    # reporting -------------------------------------------------------------
    def usage(self) -> dict:
        raise NotImplementedError

    def events(self) -> dict:
        raise NotImplementedError

    def mark(self) -> dict:
        """Start of a command: remember counters so since() gives that command's figures."""
        return {"usage": self.usage(), "events": self.events(), "peak": self._start_peak()}

    def since(self, mark: dict) -> dict:
        """Figures of one command: cpu time and events since mark(), its memory peak where
        the kernel can reset one (else the sandbox's), and the oom/pids event counts, which
        reason() turns into the command's reason."""
        now, ev = self.usage(), self.events()
        out = dict(now)
        out["cpu_seconds"] = round(now["cpu_seconds"] - mark["usage"]["cpu_seconds"], 6)
        out.update({k: ev[k] - mark["events"].get(k, 0) for k in ev})
        peak = self._end_peak(mark.get("peak"))
        if peak is not None:
            out["memory_peak"] = peak
        return out

    def _start_peak(self):
        return None

    def _end_peak(self, token) -> int | None:
        return None

    def _pids_figures(self, d: Path) -> dict:
        """pids.current and pids.peak; where the kernel has no pids.peak (before 6.13 on
        v2) the peak is the highest pids.current this handle has sampled."""
        cur = _read_int(d / "pids.current", fds=self._fds)
        self._pids_seen = max(getattr(self, "_pids_seen", 0), cur)
        peak = _read_int(d / "pids.peak", default=-1, fds=self._fds)
        return {"pids_current": cur, "pids_peak": peak if peak >= 0 else self._pids_seen}

    def reason(self, events: dict | None = None) -> tuple[str | None, str]:
        """(code, text) for what the limits did: code 'oom', 'pids' or None."""
        ev = self.events() if events is None else events
        if ev.get("oom_kills"):
            return "oom", f"killed: memory limit {human_size(self.limits.memory)} reached"
        if ev.get("pids_max_hits"):
            return "pids", f"stopped: process limit {self.limits.pids} reached"
        return None, ""

    def reason_text(self, events: dict | None = None) -> str:
        return self.reason(events)[1]

    # teardown --------------------------------------------------------------
    def close_files(self):
        self._fds.close()

    def remove(self):
        """Kill everything, remove every directory, verify. Raises TeardownError naming leftovers."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self.close_files()
        try:
            self.kill()
        except CgroupError as e:
            raise TeardownError(f"cgroup {self.name}: {e}", leftovers=[str(p) for p in self.paths()])
        left = [r for r in (_rmdir_verified(p) for p in self.paths()) if r]
        if left:
            raise TeardownError(f"cgroup {self.name} not removed", leftovers=left)


def _populated(v2_dir: Path) -> bool:
    """Does the cgroup2 directory still hold a live task? A destroy usually finds it empty
    (init has exited and its pid namespace with it), and a write to cgroup.kill waits for
    cgroup_mutex, which the kernel's asynchronous teardown of earlier cgroups holds for
    milliseconds at a time (measured 4.6-7.5 ms per write here). Nothing can enter an empty
    sandbox cgroup (only its own processes could move or fork into it), so empty stays empty."""
    try:
        return _read_keyed(v2_dir / "cgroup.events").get("populated", 1) != 0
    except OSError:
        return True   # cannot tell: kill anyway


def _lift_cpu_quota(path: Path, unlimited: str):
    """Killed tasks still need CPU time to exit (and to drop their mounts and files); in a
    cgroup throttled by its CFS quota they can take seconds to die (sched-bwc.rst). The
    sandbox is being killed, so its quota no longer matters: lift it first."""
    try:
        _write(path, unlimited)
    except CgroupError:
        pass  # the directory may already be gone; the kill below reports what matters


class V2Cgroup(SandboxCgroup):
    kind = "v2"

    def kill(self):
        # cgroup.kill (5.14+) SIGKILLs every task in the subtree atomically w.r.t. forks.
        if not self.v2_dir.exists() or not _populated(self.v2_dir):
            return
        _lift_cpu_quota(self.v2_dir / "cpu.max", "max")
        _write(self.v2_dir / "cgroup.kill", "1")
        if not _wait_until(lambda: _read_keyed(self.v2_dir / "cgroup.events").get("populated") == 0):
            raise CgroupError(f"cgroup {self.name} still populated after cgroup.kill: "
                              f"{self.pids()[:10]}")

    def freeze(self):
        _write(self.v2_dir / "cgroup.freeze", "1")
        if not _wait_until(lambda: _read_keyed(self.v2_dir / "cgroup.events").get("frozen") == 1):
            raise CgroupError(f"cgroup {self.name} did not freeze")

    def thaw(self):
        _write(self.v2_dir / "cgroup.freeze", "0")

    def _start_peak(self):
        # Since 6.12 writing to memory.peak resets it for that open file only
        # (cgroup-v2.rst "memory.peak"): a per-command peak without touching the sandbox's.
        try:
            fd = os.open(self.v2_dir / "memory.peak", os.O_RDWR | os.O_CLOEXEC)
        except OSError:
            return None
        try:
            os.write(fd, b"reset\n")
            return fd
        except OSError:
            os.close(fd)
            return None

    def _end_peak(self, fd) -> int | None:
        if fd is None:
            return None
        try:
            return int(os.pread(fd, 64, 0).split()[0])
        except (OSError, ValueError, IndexError):
            return None
        finally:
            os.close(fd)

    def usage(self) -> dict:
        d = self.v2_dir
        cpu = _read_keyed(d / "cpu.stat", fds=self._fds).get("usage_usec", 0)
        return {"cpu_seconds": cpu / 1e6,
                "memory_current": _read_int(d / "memory.current", fds=self._fds),
                "memory_peak": _read_int(d / "memory.peak", fds=self._fds),
                **self._pids_figures(d)}

    def events(self) -> dict:
        mem = _read_keyed(self.v2_dir / "memory.events", fds=self._fds)
        return {"oom_kills": mem.get("oom_kill", 0) + mem.get("oom_group_kill", 0),
                "pids_max_hits": _read_keyed(self.v2_dir / "pids.events",
                                             fds=self._fds).get("max", 0)}


class V1Cgroup(SandboxCgroup):
    """Limits in v1 controllers; membership, kill and freeze in cgroup2 when mounted (hybrid)."""

    kind = "v1"

    def kill(self):
        if self.v2_dir is not None and self.v2_dir.exists():
            if _populated(self.v2_dir):
                if "cpu" in self.v1_dirs:
                    _lift_cpu_quota(self.v1_dirs["cpu"] / "cpu.cfs_quota_us", "-1")
                _write(self.v2_dir / "cgroup.kill", "1")
                _wait_until(lambda: not _populated(self.v2_dir))
            if not _populated(self.v2_dir):
                # Every process of the sandbox is in its cgroup2 directory (cloned into it,
                # and nothing inside can move itself out): empty there is empty in v1 too,
                # without reading each v1 hierarchy's cgroup.procs (~1 ms per destroy).
                return
        if "cpu" in self.v1_dirs:
            _lift_cpu_quota(self.v1_dirs["cpu"] / "cpu.cfs_quota_us", "-1")
        if "freezer" in self.v1_dirs and self.v1_dirs["freezer"].exists():
            self._kill_by_freezing(self.v1_dirs["freezer"])
        else:
            self._kill_by_signal()
        if self.pids():
            raise CgroupError(f"cgroup {self.name} still has processes: {self.pids()[:10]}")

    def freeze(self):
        if self.v2_dir is not None:
            _write(self.v2_dir / "cgroup.freeze", "1")
            ok = _wait_until(lambda: _read_keyed(self.v2_dir / "cgroup.events").get("frozen") == 1)
        else:
            fz = self.v1_dirs["freezer"] / "freezer.state"
            _write(fz, "FROZEN")
            ok = _wait_until(lambda: _read(fz).strip() == "FROZEN")
        if not ok:
            raise CgroupError(f"cgroup {self.name} did not freeze")

    def thaw(self):
        if self.v2_dir is not None:
            _write(self.v2_dir / "cgroup.freeze", "0")
        else:
            _write(self.v1_dirs["freezer"] / "freezer.state", "THAWED")

    def _cpu_seconds(self) -> float:
        if "cpuacct" in self.v1_dirs:
            return _read_int(self.v1_dirs["cpuacct"] / "cpuacct.usage", fds=self._fds) / 1e9
        if self.v2_dir is not None:     # core cpu.stat exists in cgroup2 even without controllers
            return _read_keyed(self.v2_dir / "cpu.stat", fds=self._fds).get("usage_usec", 0) / 1e6
        return 0.0

    def _raw_peak(self) -> int:
        return _read_int(self.v1_dirs["memory"] / "memory.max_usage_in_bytes", fds=self._fds)

    def usage(self) -> dict:
        """Sandbox figures. memory_peak is over the sandbox's life: mark() resets the
        kernel's counter per command, so the highest value seen is kept here."""
        mem, pids = self.v1_dirs["memory"], self.v1_dirs["pids"]
        self._peak_seen = max(getattr(self, "_peak_seen", 0), self._raw_peak())
        return {"cpu_seconds": self._cpu_seconds(),
                "memory_current": _read_int(mem / "memory.usage_in_bytes", fds=self._fds),
                "memory_peak": self._peak_seen,
                **self._pids_figures(pids)}

    def _start_peak(self):
        # memory.max_usage_in_bytes is reset by writing 0 (cgroup-v1/memory.rst 5.4); the
        # sandbox-wide peak keeps what the counter held until now
        self._peak_seen = max(getattr(self, "_peak_seen", 0), self._raw_peak())
        try:
            _write_kept(self.v1_dirs["memory"] / "memory.max_usage_in_bytes", "0", self._fds)
            return "reset"
        except CgroupError:
            return None

    def _end_peak(self, token) -> int | None:
        return self._raw_peak() if token else None

    def events(self) -> dict:
        oom = _read_keyed(self.v1_dirs["memory"] / "memory.oom_control", fds=self._fds)
        return {"oom_kills": oom.get("oom_kill", 0),
                "pids_max_hits": _read_keyed(self.v1_dirs["pids"] / "pids.events",
                                             fds=self._fds).get("max", 0)}


# ---------------------------------------------------------------------------- drivers

class Driver:
    """Makes sandbox cgroups under `parent` (a path relative to each hierarchy's root)."""

    def __init__(self, layout: Layout, parent: str | None = None):
        self.layout = layout
        self.parent = (parent or DEFAULT_PARENT).strip("/")

    def create(self, name: str, limits, intent=None) -> SandboxCgroup:
        raise NotImplementedError

    def remove_parent(self):
        """Remove the (empty) parent directories; tests call this for their own parent."""
        raise NotImplementedError

    @staticmethod
    def _record(intent, path: Path):
        if intent is not None:
            intent.add("cgroup", path=str(path))


def _check_name(name: str):
    if not name or "/" in name or name in (".", "..") or "\0" in name:
        raise CgroupError(f"not a valid cgroup name: {name!r}")


class V2Driver(Driver):
    """cgroup v2. Parent: the daemon's delegated cgroup (systemd Delegate=yes) or a subtree it
    makes. Controllers must be enabled top-down in cgroup.subtree_control of every ancestor;
    the "no internal processes" rule means the parent itself must hold no process."""

    def __init__(self, layout: Layout, parent: str | None = None):
        super().__init__(layout, parent if parent is not None else delegated_parent(layout))
        self.root = layout.unified

    def _enable(self, limits):
        wanted = ["memory", "pids"] + (["cpu"] if limits.cpus else [])
        cur = self.root
        for part in self.parent.split("/"):
            self._enable_in(cur, wanted)
            cur = cur / part
            _mkdir(cur)
        self._enable_in(cur, wanted)
        return cur

    @staticmethod
    def _enable_in(cg: Path, wanted: list[str]):
        have = set(_read(cg / "cgroup.controllers").split())
        missing = [c for c in wanted if c not in have]
        if missing:
            raise CgroupError(f"controller(s) {', '.join(missing)} not available in {cg} "
                              f"(not enabled or not delegated): cannot enforce the limits")
        enabled = set(_read(cg / "cgroup.subtree_control").split())
        todo = [c for c in wanted if c not in enabled]
        if todo:
            _write(cg / "cgroup.subtree_control", " ".join("+" + c for c in todo))

    def create(self, name, limits, intent=None) -> V2Cgroup:
        _check_name(name)
        check_enforceable(limits, self.layout)
        parent = self._enable(limits)
        d = parent / name
        self._record(intent, d)
        if not _mkdir(d):
            raise CgroupError(f"cgroup {d} already exists (sandbox id reused?)")
        cg = V2Cgroup(name, limits, d, {})
        try:
            self._apply(d, limits)
        except BaseException:
            cg.remove()
            raise
        return cg

    def _apply(self, d: Path, limits):
        _write(d / "memory.max", str(limits.memory))
        swap_file = d / "memory.swap.max"
        if swap_file.exists():
            _write(swap_file, str(limits.swap))
        elif self.layout.swap_bytes:
            raise CgroupError("memory.swap.max is missing (swap accounting off) and the host has "
                              f"swap: the swap limit {human_size(limits.swap)} cannot be enforced")
        _write(d / "memory.oom.group", "1")     # an OOM kills the whole sandbox, not one victim
        _write(d / "pids.max", str(limits.pids))
        if limits.cpus:
            _write(d / "cpu.max", f"{int(limits.cpus * CFS_PERIOD_US)} {CFS_PERIOD_US}")

    def remove_parent(self):
        parts = self.parent.split("/")
        for i in range(len(parts), 0, -1):
            r = _rmdir_verified(self.root.joinpath(*parts[:i]))
            if r:
                raise TeardownError("cgroup parent not removed", leftovers=[r])


def delegated_parent(layout: Layout) -> str:
    """Under systemd with Delegate=yes the daemon's own cgroup is ours to manage: move the
    daemon into a leaf ("no internal processes") and make sandboxes beside it. Otherwise
    a subtree we create (/sys/fs/cgroup/sandboxd)."""
    if layout.kind != "v2" or not os.environ.get("INVOCATION_ID"):
        return DEFAULT_PARENT
    own = ""
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        if line.startswith("0::"):
            own = line[3:].strip("/")
    if not own.endswith(".service"):
        return DEFAULT_PARENT
    leaf = layout.unified / own / "daemon"
    _mkdir(leaf)
    _write(leaf / "cgroup.procs", str(os.getpid()))
    return own


class V1HybridDriver(Driver):
    """v1 controllers (memory, pids, cpu, cpuacct, freezer) plus a cgroup2 directory for
    membership, kill and freeze when a cgroup2 mount exists (hybrid)."""

    CONTROLLERS = ("memory", "pids", "cpu", "cpuacct", "freezer")

    def create(self, name, limits, intent=None) -> V1Cgroup:
        _check_name(name)
        check_enforceable(limits, self.layout)
        made: dict[str, Path] = {}
        v2_dir = None
        cg = None
        try:
            core_v2 = self._core_v2()
            for ctrl in self.CONTROLLERS:
                if ctrl not in self.layout.v1 or (ctrl == "cpu" and not limits.cpus):
                    continue
                if ctrl in self.REPLACED_BY_CORE_V2 and core_v2:
                    continue
                d = self._dir(self.layout.v1[ctrl], name)
                self._record(intent, d)
                if not _mkdir_leaf(d):
                    raise CgroupError(f"cgroup {d} already exists (sandbox id reused?)")
                made[ctrl] = d
            if self.layout.unified is not None:
                v2_dir = self._dir(self.layout.unified, name)
                self._record(intent, v2_dir)
                if not _mkdir_leaf(v2_dir):
                    raise CgroupError(f"cgroup {v2_dir} already exists (sandbox id reused?)")
            cg = V1Cgroup(name, limits, v2_dir, made)
            self._apply(made, limits)
        except BaseException:
            (cg or V1Cgroup(name, limits, v2_dir, made)).remove()
            raise
        return cg

    # With a cgroup2 directory next to the v1 ones, cgroup2's core files do these v1
    # controllers' work without any controller enabled (cgroup-v2.rst "Core Interface
    # Files"): cgroup.kill and cgroup.freeze (5.14) for freezer, cpu.stat usage_usec for
    # cpuacct. Each v1 hierarchy left out is one mkdir, intent record, migration and rmdir
    # less per sandbox.
    REPLACED_BY_CORE_V2 = ("freezer", "cpuacct")

    def _core_v2(self) -> bool:
        return self.layout.unified is not None and kernel_at_least(5, 14)

    def _dir(self, root: Path, name: str) -> Path:
        return root.joinpath(*self.parent.split("/"), name)

    def _apply(self, dirs: dict[str, Path], limits):
        mem = dirs["memory"]
        # limit_in_bytes first: memsw.limit_in_bytes must never be below it (cgroup-v1/memory.rst).
        _write(mem / "memory.limit_in_bytes", str(limits.memory))
        memsw = mem / "memory.memsw.limit_in_bytes"
        if memsw.exists():
            _write(memsw, str(limits.memory + limits.swap))
        elif self.layout.swap_bytes:
            raise CgroupError("memory.memsw.limit_in_bytes is missing (swapaccount off) and the "
                              f"host has swap: the swap limit {human_size(limits.swap)} cannot be "
                              "enforced")
        # oom_kill_disable stays 0: the kernel OOM-kills inside the cgroup at the limit
        # instead of pausing it; memory.oom_control counts the kills for the report.
        _write(mem / "memory.oom_control", "0")
        _write(dirs["pids"] / "pids.max", str(limits.pids))
        if limits.cpus:
            _write(dirs["cpu"] / "cpu.cfs_period_us", str(CFS_PERIOD_US))
            _write(dirs["cpu"] / "cpu.cfs_quota_us", str(int(limits.cpus * CFS_PERIOD_US)))

    def remove_parent(self):
        roots = [self.layout.v1[c] for c in self.CONTROLLERS if c in self.layout.v1]
        roots += [self.layout.unified] if self.layout.unified else []
        parts = self.parent.split("/")
        left = []
        for root in roots:
            for i in range(len(parts), 0, -1):
                r = _rmdir_verified(root.joinpath(*parts[:i]))
                if r:
                    left.append(r)
        if left:
            raise TeardownError("cgroup parent not removed", leftovers=left)


def driver_for(layout: Layout | None = None, parent: str | None = None) -> Driver:
    layout = layout or host_layout()
    if layout.kind == "v2":
        return V2Driver(layout, parent)
    if layout.kind in ("hybrid", "v1"):
        return V1HybridDriver(layout, parent)
    raise CgroupError("no cgroup filesystem is mounted: no limit can be enforced")


# ---------------------------------------------------------------------------- engine, recovery, doctor

def make_step(ctx):
    """The 'cgroup' setup step: create the sandbox's cgroup with its limits, fill
    plan.cgroup2_fd / plan.cgroup_v1_tasks, and set ctx.cgroup to the handle.
    The parent is `ctx.cgroup_parent` when the caller sets it (tests), else the default."""
    from sandbox.runtime.lifecycle import Step

    def do():
        driver = driver_for(parent=getattr(ctx, "cgroup_parent", None))
        cg = driver.create(ctx.id, ctx.policy.limits, intent=getattr(ctx, "intent", None))
        ctx.cgroup = cg
        ctx.plan.cgroup2_fd = cg.open_fd()
        ctx.plan.cgroup_v1_tasks = cg.v1_tasks()
        return cg

    def undo(cg):
        cg.remove()

    return Step("cgroup", do, undo, describe="cgroup with the policy's limits")


def cleanup(fields: dict):
    """Crash recovery for an intent record {kind: cgroup, path}: kill what is inside, remove
    the directory, verify. Idempotent."""
    path = Path(fields["path"])
    if not path.exists():
        return
    if (path / "cgroup.kill").exists():
        _write(path / "cgroup.kill", "1")
    _kill_until_empty(lambda: _read_pids(path / "cgroup.procs"))
    left = _rmdir_verified(path)
    if left:
        raise TeardownError("cgroup not removed", leftovers=[left])


def kernel_at_least(major: int, minor: int, release: str | None = None) -> bool:
    release = release or os.uname().release
    nums = [int(x) for x in release.split("-")[0].split(".")[:2] if x.isdigit()]
    return tuple(nums) >= (major, minor)


def probe(layout: Layout | None = None) -> list[tuple[str, bool, str]]:
    """Rows (feature, ok, detail) for `sandboxctl doctor`: layout, controllers, limits."""
    d = describe(layout)
    en = d["enforceable"]
    where = {"v2": f"cgroup2 at {d['unified_mount']}",
             "hybrid": f"v1 controllers + controller-less cgroup2 at {d['unified_mount']}",
             "v1": "v1 controllers only (no cgroup2)", "none": "no cgroup filesystem"}[d["layout"]]
    ctrls = d["v2_controllers"] if d["layout"] == "v2" else d["v1_controllers"]
    swap = ("host has no swap" if not d["host_swap_bytes"] else
            "swap accounting present" if en["swap"] else "host has swap but no swap accounting")
    return [
        ("cgroup layout", d["layout"] != "none", f"{d['layout']}: {where}; driver {d['driver']}"),
        ("cgroup controllers", en["memory"] and en["pids"], " ".join(ctrls) or "none"),
        ("limit memory", en["memory"], "memory controller" if en["memory"] else "no memory controller"),
        ("limit swap", en["swap"], swap),
        ("limit pids", en["pids"], "pids controller" if en["pids"] else "no pids controller"),
        ("limit cpus", en["cpus"], "CFS bandwidth (cpu controller)" if en["cpus"] else
         "no cpu controller: policies with cpus > 0 are refused"),
        ("freeze + kill", en["freeze"] and en["kill"], f"kill by {d['kill_method']}"),
    ]


def describe(layout: Layout | None = None) -> dict:
    """The layout, the controllers, and which limits are enforceable, as a dict."""
    layout = layout or host_layout()
    have = layout.controllers()
    if layout.unified is not None and kernel_at_least(5, 14):
        kill_via = "cgroup.kill"
    elif "freezer" in have:
        kill_via = "freezer + SIGKILL"
    else:
        kill_via = None
    if layout.kind == "v2":
        swap_ok = not layout.swap_bytes or any(
            (d / "memory.swap.max").exists() for d in layout.unified.iterdir() if d.is_dir())
    else:
        mem = layout.v1.get("memory")
        swap_ok = not layout.swap_bytes or bool(mem and (mem / "memory.memsw.usage_in_bytes").exists())
    return {
        "layout": layout.kind,
        "unified_mount": str(layout.unified) if layout.unified else None,
        "v2_controllers": sorted(layout.v2_controllers),
        "v1_controllers": sorted(layout.v1),
        "host_swap_bytes": layout.swap_bytes,
        "enforceable": {
            "memory": "memory" in have,
            "swap": "memory" in have and swap_ok,
            "pids": "pids" in have,
            "cpus": "cpu" in have,
            "freeze": layout.unified is not None or "freezer" in have,
            "kill": kill_via is not None,
        },
        "kill_method": kill_via,
        "driver": {"v2": "V2Driver", "hybrid": "V1HybridDriver", "v1": "V1HybridDriver"}.get(
            layout.kind),
    }
