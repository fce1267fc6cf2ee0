"""Idmapped mounts: a host directory that stays owned by its host owner while the agent
sees it as its own (mount_setattr(2) MOUNT_ATTR_IDMAP, kernel >= 5.12).

An idmapped mount translates an on-disk id k through the mount's user namespace: k is
taken as an id *inside* that namespace and mapped out to the host id the process sees.
So a namespace mapping "<owner> <sandbox host uid of the agent> 1" shows the owner's files
as the agent's (the agent's host uid is then seen as its uid inside the sandbox), and the
agent's writes land on disk as the owner. Nothing else of the directory maps: other
owners show as nobody. The mount is made detached by the parent (only the initial user
namespace may idmap) and its fd handed to the child, which move_mount()s it into place.
"""
from __future__ import annotations

import os

from sandbox import _native
from sandbox.errors import PolicyError


def idmapped_dir(path: str, *, host_uid: int, host_gid: int, recursive: bool = True) -> int:
    """A detached mount fd of `path` on which its owner (uid and gid) appears as
    host_uid/host_gid. The caller owns the fd (close it after spawn)."""
    st = os.stat(path)
    if st.st_uid == 0 or st.st_gid == 0:
        # The agent would own it as host root: a file it makes setuid (chmod u+s by the
        # owner needs no capability) would be a setuid-root program on the host.
        raise PolicyError(f"{path} is owned by root (uid {st.st_uid}, gid {st.st_gid}): what "
                          "the agent makes there would be root's on the host; give a directory "
                          "owned by an unprivileged user")
    userns = _native.make_userns(f"{st.st_uid} {host_uid} 1\n", f"{st.st_gid} {host_gid} 1\n")
    try:
        return _native.idmapped_tree(path, userns, recursive)
    finally:
        os.close(userns)


def probe() -> list[tuple[str, bool, str]]:
    """Can this host make idmapped mounts (of a tmp dir)?"""
    import tempfile
    d = tempfile.mkdtemp(prefix="sbx-probe-")
    try:
        os.chown(d, 65534, 65534)
        fd = idmapped_dir(d, host_uid=(1 << 20) + 1000, host_gid=(1 << 20) + 1000)
        os.close(fd)
        return [("idmapped mounts", True, "open_tree + mount_setattr(MOUNT_ATTR_IDMAP)")]
    except Exception as e:  # noqa: BLE001 - the probe reports, never raises
        return [("idmapped mounts", False, str(e))]
    finally:
        os.rmdir(d)
