"""Files in and out of a workspace, confined to it even though the agent controls its symlinks.

Paths come from the client and the tree from the agent, so both are hostile. Every open goes
through openat2(2) with RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS | RESOLVE_NO_XDEV relative to
a directory fd of the workspace: the kernel refuses '..' above it, absolute symlinks, /proc
magic links and mount crossings atomically, so a symlink swapped in between check and use
cannot win (openat2(2), "RESOLVE_BENEATH"). Reads open with O_NONBLOCK and accept regular
files only, so a FIFO or device planted by the agent cannot hang or poke the daemon.
"""
from __future__ import annotations

import ctypes
import errno as _errno
import os
import stat

from sandbox.errors import NotFoundError, PolicyError, SandboxError

_SYS_openat2 = 437                  # same number on every architecture (asm-generic/unistd.h)
RESOLVE_NO_XDEV = 0x01
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_BENEATH = 0x08
_RESOLVE = RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS | RESOLVE_NO_XDEV

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


class PathError(PolicyError):
    def __init__(self, message: str):
        super().__init__(message, field="path")


def openat2(dirfd: int, path: str, flags: int, mode: int = 0, resolve: int = _RESOLVE) -> int:
    how = _OpenHow(flags | os.O_CLOEXEC, mode if flags & os.O_CREAT else 0, resolve)
    fd = _libc.syscall(_SYS_openat2, dirfd, os.fsencode(path), ctypes.byref(how),
                       ctypes.sizeof(how))
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), path)
    return fd


def check_relpath(path: str) -> list[str]:
    """The components of a client path, refusing absolute paths, '..', NUL and empties."""
    if not isinstance(path, str) or not path or len(path) > 4096:
        raise PathError("must be a non-empty relative path of at most 4096 bytes")
    if path.startswith("/"):
        raise PathError("must be relative to the workspace, not absolute")
    if "\0" in path:
        raise PathError("must not contain NUL")
    parts = [p for p in path.split("/") if p not in ("", ".")]
    if any(p == ".." for p in parts):
        raise PathError("must not contain '..'")
    if not parts:
        raise PathError("names the workspace itself, not a file")
    return parts


def _explain(e: OSError, rel: str) -> SandboxError:
    if e.errno == _errno.ENOENT:
        return NotFoundError(f"no such file in the workspace: {rel}")
    if e.errno in (_errno.EXDEV, _errno.ELOOP):
        return PathError(f"{rel}: leaves the workspace (symlink or mount escape refused)")
    if e.errno == _errno.ENOTDIR:
        return PathError(f"{rel}: a parent is not a directory")
    if e.errno == _errno.EISDIR:
        return PathError(f"{rel}: is a directory")
    return SandboxError(f"{rel}: {e.strerror}", errno=e.errno, step="files")


def _open_root(root: str) -> int:
    return os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)


def write_file(root: str, rel: str, data: bytes, *, mode: int = 0o644,
               owner: tuple[int, int] | None = None) -> int:
    """Write data to root/rel, making parent directories; returns bytes written."""
    parts = check_relpath(rel)
    if not 0 <= mode <= 0o777:
        raise PolicyError("mode: must be between 0 and 0777 (no setuid, setgid or sticky bits)")
    rootfd = _open_root(root)
    fds = [rootfd]
    try:
        dirfd = rootfd
        for comp in parts[:-1]:
            try:
                os.mkdir(comp, 0o755, dir_fd=dirfd)
                if owner:
                    os.chown(comp, *owner, dir_fd=dirfd, follow_symlinks=False)
            except FileExistsError:
                pass
            except OSError as e:
                raise _explain(e, rel) from None
            try:
                dirfd = openat2(dirfd, comp, os.O_PATH | os.O_DIRECTORY)
            except OSError as e:
                raise _explain(e, rel) from None
            fds.append(dirfd)
        try:
            # O_NOFOLLOW: never write through a final symlink, even one inside the workspace.
            fd = openat2(dirfd, parts[-1], os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW
                         | os.O_NONBLOCK, mode)
        except OSError as e:
            raise _explain(e, rel) from None
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise PathError(f"{rel}: not a regular file")
            if owner:
                os.fchown(fd, *owner)
            os.fchmod(fd, mode)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        finally:
            os.close(fd)
        return len(data)
    finally:
        for fd in fds:
            os.close(fd)


def read_file(root: str, rel: str, *, max_bytes: int) -> bytes:
    """The content of the regular file root/rel (at most max_bytes, else an error)."""
    parts = check_relpath(rel)
    rootfd = _open_root(root)
    try:
        try:
            fd = openat2(rootfd, "/".join(parts), os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY)
        except OSError as e:
            raise _explain(e, rel) from None
    finally:
        os.close(rootfd)
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise PathError(f"{rel}: is a directory (list it instead)")
        if not stat.S_ISREG(st.st_mode):
            raise PathError(f"{rel}: not a regular file")
        if st.st_size > max_bytes:
            raise PolicyError(f"{rel}: {st.st_size} bytes is more than the {max_bytes} a read may return",
                              field="path")
        chunks, total = [], 0
        while chunk := os.read(fd, 1 << 20):
            total += len(chunk)
            if total > max_bytes:   # the agent may still be growing it
                raise PolicyError(f"{rel}: grew past {max_bytes} bytes while being read", field="path")
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def list_dir(root: str, rel: str = "") -> list[dict]:
    """Entries of a workspace directory (name, type, size); never follows a symlink."""
    rootfd = _open_root(root)
    try:
        if rel and rel not in (".", "/"):
            parts = check_relpath(rel)
            try:
                fd = openat2(rootfd, "/".join(parts), os.O_RDONLY | os.O_DIRECTORY)
            except OSError as e:
                raise _explain(e, rel) from None
        else:
            fd = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=rootfd)
    finally:
        os.close(rootfd)
    try:
        out = []
        for name in sorted(os.listdir(fd))[:10000]:
            st = os.stat(name, dir_fd=fd, follow_symlinks=False)
            kind = ("dir" if stat.S_ISDIR(st.st_mode) else "file" if stat.S_ISREG(st.st_mode)
                    else "symlink" if stat.S_ISLNK(st.st_mode) else "other")
            out.append({"name": name, "type": kind, "size": st.st_size})
        return out
    finally:
        os.close(fd)
