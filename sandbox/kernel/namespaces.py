"""Namespaces of a sandbox and what the host offers (for `sandboxctl doctor`).

The C spawn path (csrc/spawn.c) creates them all in one clone3(2): user, mount, pid,
uts, ipc, cgroup, and network unless the network step passes a netns fd. This module
names them and checks the host can make them.
"""
from __future__ import annotations

import ctypes
import errno
import os

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
