"""The only importer of the cffi library; C return codes become exceptions here.

`SpawnPlan` -> `struct sbx_plan`, and `struct sbx_error` -> SpawnError: the single
translation point of the C error protocol (step, errno, syscall, detail).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from sandbox._native_lib import ffi, lib  # noqa: F401
from sandbox.errors import SpawnError
from sandbox.runtime.plan import SpawnPlan

ABI_VERSION = 7
if lib.sbx_abi_version() != ABI_VERSION:  # a stale build would misread the plan struct
    raise ImportError("sandbox._native_lib is stale: rebuild with setup.py build_ext --inplace")
# init, pid 1 of every sandbox: a static executable built with the extension
# (csrc/build_native.py says why it is not code in the extension).
INIT_EXE = Path(__file__).with_name("sbx-init")


@dataclass
class Child:
    pid: int
    pidfd: int
    ctl_fd: int


def _raise(err, what: str):
    step = ffi.string(err.step).decode() or "spawn"
    syscall = ffi.string(err.syscall).decode() or None
    detail = ffi.string(err.detail).decode()
    msg = f"{what}: step {step}" + (f" ({detail})" if detail else "")
    raise SpawnError(msg, step=step, errno=err.err or None, syscall=syscall)


def _cstr(keep: list, s: str | None):
    if s is None:
        return ffi.NULL
    b = ffi.new("char[]", s.encode())
    keep.append(b)
    return b


# Mount lists by content, fds aside: every sandbox of a policy has the same ~70 operations,
# and building their C strings one ffi.new at a time was ~0.8 ms of Python per spawn.
_MOUNT_TEMPLATES: dict = {}
_MOUNT_TEMPLATES_MAX = 64


def _signature(mounts) -> tuple:
    """What the C template of a mount list is made of: every field but the fds. A list
    from mounts.build_rootfs that still is its cached template with fds put in (checked:
    the same op objects, frozen, and the fd ops equal to the template's but for the fd) is
    keyed by that template alone, without reading its ~70 ops."""
    tmpl = getattr(mounts, "template", None)
    if tmpl is not None and len(tmpl) == len(mounts) and all(
            m is t or (m.fd != -1 and m.key() == t.key()) for m, t in zip(mounts, tmpl)):
        return ("rootfs", id(tmpl))   # (the cache entry keeps tmpl alive: the id stays its)
    return tuple((m.kind, m.optional, m.src, m.dst, m.data, m.flags, m.attr_set, m.mode, m.uid,
                  m.gid) for m in mounts)


def _c_mounts(mounts, keep: list):
    """A fresh struct sbx_mount[] for this spawn (the child reads it while the caller may
    spawn again), copied from a cached template, with this spawn's mount fds filled in."""
    n = max(1, len(mounts))
    sig = _signature(mounts)
    tmpl = _MOUNT_TEMPLATES.get(sig)
    if tmpl is None:
        strings: list = []
        arr = ffi.new("struct sbx_mount[]", n)
        for i, m in enumerate(mounts):
            c = arr[i]
            c.kind, c.opts = m.kind, lib.SBX_M_OPTIONAL if m.optional else 0
            c.src, c.dst = _cstr(strings, m.src), _cstr(strings, m.dst)
            c.data = _cstr(strings, m.data or None)
            c.flags, c.attr_set, c.fd, c.mode, c.uid, c.gid = (m.flags, m.attr_set, -1, m.mode,
                                                               m.uid, m.gid)
        if len(_MOUNT_TEMPLATES) >= _MOUNT_TEMPLATES_MAX:
            _MOUNT_TEMPLATES.clear()
        tmpl = _MOUNT_TEMPLATES[sig] = (arr, strings, getattr(mounts, "template", None))
    arr = ffi.new("struct sbx_mount[]", n)
    ffi.memmove(arr, tmpl[0], ffi.sizeof("struct sbx_mount") * n)
    keep += (arr, tmpl)       # the template's strings live as long as this spawn needs them
    for i, m in enumerate(mounts):
        if m.fd != -1:
            arr[i].fd = m.fd
    return arr


def _c_plan(plan: SpawnPlan, keep: list):
    p = ffi.new("struct sbx_plan *")
    keep.append(p)
    p.uid_base, p.gid_base, p.range = plan.uid_base, plan.gid_base, plan.range
    p.uid, p.gid = plan.uid, plan.gid
    p.hostname = _cstr(keep, plan.hostname)
    p.root = _cstr(keep, plan.root)
    p.mounts, p.n_mounts = _c_mounts(plan.mounts, keep), len(plan.mounts)
    p.rlim_nofile, p.rlim_core, p.rlim_fsize = plan.rlim_nofile, plan.rlim_core, plan.rlim_fsize
    p.netns_fd = -1 if plan.netns_fd is None else plan.netns_fd
    p.cgroup2_fd = -1 if plan.cgroup2_fd is None else plan.cgroup2_fd
    tasks = [_cstr(keep, s) for s in plan.cgroup_v1_tasks]
    arr = ffi.new("const char *[]", tasks or [ffi.NULL])
    keep.append(arr)
    p.cgroup_v1_tasks, p.n_cgroup_v1 = arr, len(tasks)
    if plan.seccomp_bpf:
        if len(plan.seccomp_bpf) % 8:
            raise SpawnError("seccomp program is not a whole number of struct sock_filter",
                             step="seccomp")
        bpf = ffi.new("char[]", plan.seccomp_bpf)
        keep.append(bpf)
        p.seccomp_bpf, p.seccomp_bpf_len = bpf, len(plan.seccomp_bpf)
    p.seccomp_notify = int(plan.seccomp_notify)
    p.init_fd = -1
    p.test_fail_step = plan.test_fail_step
    return p


def _open_init() -> int:
    try:
        return os.open(INIT_EXE, os.O_PATH | os.O_CLOEXEC)
    except OSError as e:
        raise SpawnError(f"cannot start the sandbox: the init program {INIT_EXE} is missing "
                         "(run scripts/setup)", step="init", errno=e.errno, syscall="open") from None


def spawn(plan: SpawnPlan) -> Child:
    """clone3 the sandbox's init with the plan; returns once init is confined and serving."""
    keep: list = []
    cplan = _c_plan(plan, keep)
    out = ffi.new("struct sbx_child *")
    err = ffi.new("struct sbx_error *")
    cplan.init_fd = _open_init()
    try:
        if lib.sbx_spawn(cplan, out, err) < 0:
            _raise(err, "cannot start the sandbox")
    finally:
        os.close(cplan.init_fd)
    return Child(out.pid, out.pidfd, out.ctl_fd)


def make_userns(uid_map: str, gid_map: str) -> int:
    """An fd of a fresh user namespace with exactly these maps (for idmapped mounts)."""
    err = ffi.new("struct sbx_error *")
    fd = lib.sbx_make_userns(uid_map.encode(), gid_map.encode(), err)
    if fd < 0:
        _raise(err, "cannot make the id-mapping user namespace")
    return fd


def idmapped_tree(path: str, userns_fd: int, recursive: bool = True) -> int:
    """A detached mount of `path` seen through `userns_fd`'s maps (open_tree + mount_setattr)."""
    err = ffi.new("struct sbx_error *")
    fd = lib.sbx_idmapped_tree(path.encode(), userns_fd, int(recursive), err)
    if fd < 0:
        _raise(err, f"cannot make an idmapped mount of {path}")
    return fd


def make_netns() -> int:
    """An fd of a new, empty network namespace (lo down) owned by the caller's user
    namespace; it lives as long as an fd or a process holds it."""
    err = ffi.new("struct sbx_error *")
    fd = lib.sbx_make_netns(err)
    if fd < 0:
        _raise(err, "cannot make a network namespace")
    return fd


def open_tree(path: str) -> int:
    """A detached recursive copy of a host directory (open_tree(OPEN_TREE_CLONE)), for the
    child to attach: it cannot walk host paths under root-only directories."""
    return idmapped_tree(path, -1, True)
