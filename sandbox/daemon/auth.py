"""Who is on the other end of the socket, and what they may do.

The kernel tells us: SO_PEERCRED gives the peer's pid/uid/gid at connect() time and
SO_PEERGROUPS (Linux 4.13, socket(7)) its supplementary groups at the same moment, so a
process cannot change its identity after connecting, and no /proc race is involved.
root and members of the admin group administer; members of the client group must present
a capability token (Authorization: Bearer) for every sandbox operation; nobody else gets in.
"""
from __future__ import annotations

import grp
import logging
import socket
import struct
from dataclasses import dataclass

from sandbox.errors import AuthError

log = logging.getLogger("sandboxd.auth")

SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)  # asm-generic/socket.h


@dataclass(frozen=True)
class Peer:
    pid: int
    uid: int
    gid: int
    groups: tuple[int, ...]


@dataclass
class Principal:
    """An authenticated caller: an admin, or a client holding a token."""

    peer: Peer
    admin: bool
    token: object | None = None     # tokens.Token for clients

    @property
    def token_id(self) -> str | None:
        return self.token.id if self.token is not None else None


# Python's getsockopt takes at most 1024 bytes: 256 supplementary groups of 4 bytes
_GROUPS_BUF = 1024


def peer_of(sock: socket.socket) -> Peer:
    """The peer's identity as the kernel recorded it at connect() time. Supplementary groups
    come from SO_PEERGROUPS only: reading /proc/<pid>/status instead would see whatever
    process holds that pid now, with the groups it has now. A peer in more groups than fit
    (ERANGE) is taken with none: it may be refused, never let in on a guess."""
    pid, uid, gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                        struct.calcsize("3i")))
    groups: tuple[int, ...] = ()
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, _GROUPS_BUF)
        groups = struct.unpack(f"{len(raw) // 4}I", raw)
    except OSError as e:
        log.warning("supplementary groups of peer pid %d unavailable (%s): only its uid and "
                    "gid count", pid, e.strerror or e)
    return Peer(pid, uid, gid, tuple(groups))


def group_id(name: str) -> int | None:
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        return None


class Authorizer:
    def __init__(self, tokens, *, admin_group: str, client_group: str):
        self.tokens = tokens
        self.admin_gid = group_id(admin_group)
        self.client_gid = group_id(client_group)
        self.admin_group = admin_group
        self.client_group = client_group

    def _in(self, peer: Peer, gid: int | None) -> bool:
        return gid is not None and (peer.gid == gid or gid in peer.groups)

    def is_admin(self, peer: Peer) -> bool:
        return peer.uid == 0 or self._in(peer, self.admin_gid)

    def is_client(self, peer: Peer) -> bool:
        return self._in(peer, self.client_gid)

    def authenticate(self, peer: Peer, authorization: str | None) -> Principal:
        """The caller's Principal, or AuthError. Admins may also present a token to act as it."""
        admin = self.is_admin(peer)
        if not admin and not self.is_client(peer):
            raise AuthError(f"uid {peer.uid} is neither root nor in group {self.admin_group!r} "
                            f"or {self.client_group!r}")
        token = None
        if authorization:
            scheme, _, value = authorization.partition(" ")
            if scheme.lower() != "bearer" or not value:
                raise AuthError("Authorization must be 'Bearer <token>'")
            token = self.tokens.verify(value)
        return Principal(peer=peer, admin=admin and token is None, token=token)
