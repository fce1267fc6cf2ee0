"""The spawn plan: everything the C child needs, filled in by the setup steps.

Each facility's step fills its own fields (see docs/internals.md); sandbox/_native.py
turns the plan into `struct sbx_plan` for `sbx_spawn()`. The C side never calls back
into Python, so everything is decided here, before clone3.
"""
from __future__ import annotations

from dataclasses import dataclass, field

# Kinds of mount operation (csrc/native.h enum sbx_mount_kind).
TMPFS, BIND, BIND_FD, PROC, DEVPTS, MKDIR, SYMLINK, MASK, SETATTR, PIVOT, CHOWN = range(1, 12)

# MOUNT_ATTR_* of mount_setattr(2)
ATTR_RDONLY, ATTR_NOSUID, ATTR_NODEV, ATTR_NOEXEC = 0x1, 0x2, 0x4, 0x8
ATTR_LOCKDOWN = ATTR_RDONLY | ATTR_NOSUID | ATTR_NODEV

# MS_* of mount(2), for tmpfs
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 0x1, 0x2, 0x4, 0x8


@dataclass(frozen=True)
class MountOp:
    """One operation of the rootfs plan. Frozen: the plans of a policy share their
    operations (sandbox/kernel/mounts.py, build_rootfs), so none may change in place."""
    kind: int
    dst: str
    src: str = ""
    data: str = ""
    flags: int = 0          # MS_* for tmpfs; 1 = recursive for SETATTR
    attr_set: int = 0       # MOUNT_ATTR_* applied after a bind
    fd: int = -1            # BIND_FD: a detached mount (open_tree) made by the parent
    mode: int = 0o755
    uid: int = 0
    gid: int = 0
    optional: bool = False  # skip when the source does not exist

    def key(self) -> tuple:
        """Every field but the fd (what a plan's cached templates are keyed and checked by;
        dataclasses.replace was ~7 us a call)."""
        return (self.kind, self.dst, self.src, self.data, self.flags, self.attr_set, self.mode,
                self.uid, self.gid, self.optional)

    def with_fd(self, fd: int) -> "MountOp":
        return MountOp(self.kind, self.dst, self.src, self.data, self.flags, self.attr_set, fd,
                       self.mode, self.uid, self.gid, self.optional)


@dataclass
class SpawnPlan:
    uid_base: int = 0
    gid_base: int = 0
    range: int = 65536
    uid: int = 1000
    gid: int = 1000
    hostname: str = "sandbox"
    root: str = ""                       # host dir the child attaches its root tmpfs on
    mounts: list[MountOp] = field(default_factory=list)
    rlim_nofile: int = 1024
    rlim_core: int = 0
    rlim_fsize: int = 0                  # 0: unlimited
    netns_fd: int | None = None          # network step: join this netns (None: a new empty one)
    cgroup2_fd: int | None = None        # cgroup step: CLONE_INTO_CGROUP
    cgroup_v1_tasks: list[str] = field(default_factory=list)  # cgroup step: v1 `tasks` files
    seccomp_bpf: bytes = b""             # seccomp step: struct sock_filter[]
    seccomp_notify: bool = False         # SECCOMP_FILTER_FLAG_NEW_LISTENER
    test_fail_step: int = 0              # tests only: make the C child fail on purpose
