"""Namespaces of a sandbox and what the host offers (for `sandboxctl doctor`).

The C spawn path (csrc/spawn.c) creates them all in one clone3(2): user, mount, pid,
uts, ipc, cgroup, and network unless it is given a netns fd: the network step's, or else
an empty one made ahead (NetnsPool). This module names them and checks the host can make
them.
"""
from __future__ import annotations

import ctypes
import errno
import os
import threading
import weakref

# sched.h
CLONE_NEWNS, CLONE_NEWCGROUP, CLONE_NEWUTS, CLONE_NEWIPC = 0x20000, 0x2000000, 0x4000000, 0x8000000
CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x10000000, 0x20000000, 0x40000000
SANDBOX_NAMESPACES = ("user", "mnt", "pid", "uts", "ipc", "cgroup", "net")
SYS_CLONE3 = 435  # x86_64


def ns_id(pid: int | str, kind: str) -> str | None:
    """'pid:[4026531836]' for a process's namespace, or None if it is gone."""
    try:
        return os.readlink(f"/proc/{pid}/ns/{kind}")
    except OSError:
        return None


def shared_namespaces(pid_a, pid_b) -> list[str]:
    """The sandbox namespaces two processes share (a sandbox shares none with the host)."""
    return [k for k in SANDBOX_NAMESPACES if ns_id(pid_a, k) and ns_id(pid_a, k) == ns_id(pid_b, k)]


def _read_int(path: str) -> int | None:
    try:
        return int(open(path).read().strip())
    except (OSError, ValueError):
        return None


def have_clone3() -> bool:
    """clone3(NULL, 0) fails with EINVAL where the syscall exists, ENOSYS where not."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall(SYS_CLONE3, None, 0)
    return ctypes.get_errno() != errno.ENOSYS


def probe() -> list[tuple[str, bool, str]]:
    out = []
    n = _read_int("/proc/sys/user/max_user_namespaces")
    out.append(("user namespaces", bool(n), f"max_user_namespaces={n}"))
    out.append(("clone3", have_clone3(), "clone3(2) with CLONE_PIDFD"))
    try:
        os.close(os.pidfd_open(os.getpid()))
        out.append(("pidfd", True, "pidfd_open, pidfd_send_signal, waitid(P_PIDFD)"))
    except OSError as e:
        out.append(("pidfd", False, os.strerror(e.errno)))
    have_v2 = any(line.split()[2] == "cgroup2" for line in open("/proc/self/mounts"))
    rel = tuple(int(x) for x in os.uname().release.split("-")[0].split(".")[:2])
    out.append(("CLONE_INTO_CGROUP", have_v2 and rel >= (5, 7),
                "cgroup2 mounted, kernel >= 5.7" if have_v2 else "no cgroup2 mount"))
    return out


# ---- empty network namespaces, made ahead ----------------------------------------------

class NetnsPool:
    """A few empty network namespaces (lo down), made ahead by a background thread, for
    sandboxes whose policy gives them no network (mode "none"): a new netns is ~1 ms of
    kernel work, a third of a spawn when clone3 makes it (CLONE_NEWNET), and none of it
    needs the sandbox. take() hands one out, or None when none is ready (the spawn then
    makes its own with CLONE_NEWNET, as without a pool). The pool fills on demand: from the
    second namespace asked for on, it keeps one fewer ready than were asked for so far, up
    to `size`, so a process that makes one sandbox (sandboxctl run) makes none ahead.

    What such a sandbox gets is the same either way: a namespace with nothing but a down
    loopback, shared with no other process. One difference: a namespace made here is owned
    by the host's user namespace (like the network step's), not the sandbox's, so not even
    root of the sandbox's user namespace can administer it (the agent never holds a
    capability anyway); the sandbox mounts no sysfs, which would need it to own its netns.

    Each namespace exists only as an fd: never named or mounted, never entered by anything
    before its sandbox (sbx_make_netns enters it only to open it, on the pool's own
    thread). take() removes it from the pool, so it is handed out once; the taker closes
    its fd once the sandbox's init is in it (or failed to start), so it ends with that
    sandbox; what the pool still holds ends with the process. A forked child drops the fds
    it inherited without using them: the parent may hand the same namespaces out."""

    def __init__(self, size: int = 4):
        self.size = size
        self._asked = 0                    # take() calls so far
        self._want = 0                     # namespaces to keep ready (grows with demand)
        self._fds: list[int] = []
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._pid = os.getpid()
        self.error: str | None = None      # the last failure to make one (doctor, tests)
        me = weakref.ref(self)
        os.register_at_fork(after_in_child=lambda: (p := me()) is not None and p._forked())

    def take(self) -> int | None:
        """An fd of an unused empty netns, now the caller's to close; or None."""
        if self.size <= 0:
            return None
        with self._cond:
            self._asked += 1
            self._want = min(self.size, self._asked - 1)
            if self._want and (self._thread is None or not self._thread.is_alive()):
                # started before an fd leaves the pool: a failing start (no threads left)
                # raises with every namespace still held, none lost
                self._thread = threading.Thread(target=self._fill, name="sandboxd-netns",
                                                daemon=True)
                self._thread.start()
            fd = self._fds.pop() if self._fds else None
            self._cond.notify_all()
            return fd

    def held(self) -> int:
        with self._cond:
            return len(self._fds)

    def wait_full(self, timeout: float = 5.0) -> bool:
        """(tests, benchmarks) wait until the pool holds what it wants (True), or has
        stopped trying (False: see `error`)."""
        with self._cond:
            return self._cond.wait_for(lambda: self._full() or not self._filling(),
                                       timeout) and self._full()

    def clear(self) -> None:
        """Close every namespace the pool holds (they were never used)."""
        with self._cond:
            fds, self._fds = self._fds, []
            self._asked = self._want = 0
            self._cond.notify_all()
        for fd in fds:
            os.close(fd)

    def _full(self) -> bool:
        return len(self._fds) >= min(self.size, self._want)

    def _filling(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _fill(self) -> None:
        from sandbox import _native
        from sandbox.errors import SandboxError
        cond = self._cond
        while True:
            with cond:
                cond.wait_for(lambda: not self._full())
                if self._pid != os.getpid() or cond is not self._cond:
                    return
            try:
                fd = _native.make_netns()
            except SandboxError as e:
                with cond:
                    self.error = str(e)   # the next take() tries again; the spawn meanwhile
                    cond.notify_all()     # makes its own netns (and fails if it cannot)
                return
            with cond:
                self._fds.append(fd)
                cond.notify_all()

    def _forked(self) -> None:
        # In the child after fork(2): another thread may have held the lock at the fork,
        # so never take it; the fds are the parent's namespaces, never to be used here.
        for fd in self._fds:
            try:
                os.close(fd)
            except OSError:
                pass
        self._fds = []
        self._asked = self._want = 0
        self._cond = threading.Condition()
        self._thread = None
        self._pid = os.getpid()


NETNS_POOL = NetnsPool()
