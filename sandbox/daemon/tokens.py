"""Capability tokens: random secrets an admin grants to an orchestrator, stored hashed.

A token reads `sbxd_<id>_<secret>`: the `sbxd_` prefix lets the scanner and the audit guard
recognise one anywhere; `<id>` is the public name used in `ps`, audit records and revocation;
`<secret>` is 256 random bits (secrets.token_urlsafe(32)). Only sha256(secret) is stored: with
256 bits of entropy no slow hash is needed, and a leaked tokens.json grants nothing. Lookups
go by id, then compare digests in constant time (hmac.compare_digest), so a forged token
learns nothing from timing.

The file is `<state_dir>/tokens.json`, mode 0600, replaced atomically (write a temp file,
fsync, rename, fsync the directory) so a crash never leaves half a file.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import secrets
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from sandbox.errors import AuthError, PolicyError

PREFIX = "sbxd_"
_TOKEN_RE = re.compile(r"sbxd_([0-9a-f]{12})_([A-Za-z0-9_-]{43})")
_ID_RE = re.compile(r"[0-9a-f]{12}")

# Fields of the ceiling a token may set, with how a policy value is read for each.
CEILING_FIELDS = ("memory", "cpus", "pids", "disk", "timeout")


@dataclass
class TokenScope:
    """What a token allows. Empty `policies` means none; "*" means any installed policy."""

    policies: list[str] = field(default_factory=lambda: ["default"])
    ceiling: dict = field(default_factory=dict)       # memory/cpus/pids/disk/timeout upper bounds
    network: list[str] = field(default_factory=list)  # network.allow entries it may add
    workspace_roots: list[str] = field(default_factory=list)  # host dirs it may mount (and below)
    max_sandboxes: int = 8

    def check(self):
        if not isinstance(self.policies, list) or not all(isinstance(p, str) for p in self.policies):
            raise PolicyError("policies: expected a list of policy names")
        if not isinstance(self.network, list) or not all(isinstance(p, str) for p in self.network):
            raise PolicyError("network: expected a list of entries like host:port")
        if not isinstance(self.workspace_roots, list) or not all(
                isinstance(p, str) and p.startswith("/") and ".." not in p.split("/")
                for p in self.workspace_roots):
            raise PolicyError("workspace_roots: expected a list of absolute paths without '..'")
        if not isinstance(self.max_sandboxes, int) or not 0 < self.max_sandboxes <= 10000:
            raise PolicyError("max_sandboxes: must be between 1 and 10000")
        if not isinstance(self.ceiling, dict):
            raise PolicyError("ceiling: expected a table")
        for k, v in self.ceiling.items():
            if k not in CEILING_FIELDS:
                raise PolicyError(f"ceiling: unknown field {k!r} (known: {', '.join(CEILING_FIELDS)})")
            if not isinstance(v, (int, float)) or isinstance(v, bool) or v <= 0:
                raise PolicyError(f"ceiling.{k}: must be a positive number")


@dataclass
class Token:
    id: str
    digest: str                 # sha256 hex of the secret part
    scope: TokenScope
    created: float
    expires: float
    granted_by: int             # uid of the admin who granted it
    name: str = ""              # a label for humans ("ci-runner-3")
    revoked: float | None = None

    def public(self) -> dict:
        """What `token list` shows: never the digest, never the secret."""
        return {"id": self.id, "name": self.name, "scope": asdict(self.scope),
                "created": self.created, "expires": self.expires, "granted_by": self.granted_by,
                "revoked": self.revoked, "active": self.active()}

    def active(self, now: float | None = None) -> bool:
        return self.revoked is None and (now or time.time()) < self.expires


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def token_id_of(value: str) -> str | None:
    """The id part of something that looks like a token, else None (for log-safe messages)."""
    m = _TOKEN_RE.fullmatch(value.strip())
    return m.group(1) if m else None


class TokenStore:
    """Grant, verify, revoke and persist tokens. Thread-safe; every change is written at once."""

    def __init__(self, path: Path, default_ttl: float = 4 * 3600.0):
        self.path = Path(path)
        self.default_ttl = default_ttl
        self._lock = threading.Lock()
        self._tokens: dict[str, Token] = {}
        self._unsaved: set[str] = set()    # revoked in memory, not yet in a successful save
        self._load()

    # -- persistence -------------------------------------------------------------------------
    def _load(self):
        try:
            raw = self.path.read_text()
        except FileNotFoundError:
            return
        try:
            data = json.loads(raw)
            for t in data.get("tokens", []):
                scope = TokenScope(**t.pop("scope"))
                tok = Token(scope=scope, **t)
                self._tokens[tok.id] = tok
        except (ValueError, TypeError, KeyError) as e:
            # Fail closed: a damaged token file grants nothing and says so.
            raise AuthError(f"{self.path}: token file is damaged ({type(e).__name__}); "
                            "fix or remove it") from None

    def _save(self):
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        data = {"version": 1, "tokens": [asdict(t) for t in self._tokens.values()]}
        fd, tmp = tempfile.mkstemp(prefix=".tokens.", dir=self.path.parent)
        try:
            os.fchmod(fd, 0o600)
            with os.fdopen(fd, "w") as f:
                json.dump(data, f, indent=1, sort_keys=True)
                f.flush()
                os.fsync(f.fileno())
            os.rename(tmp, self.path)
            self._unsaved.clear()          # the file now holds every revocation made so far
        except BaseException:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            raise
        dfd = os.open(self.path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)

    # -- operations --------------------------------------------------------------------------
    def grant(self, scope: TokenScope, *, granted_by: int, ttl: float | None = None,
              name: str = "") -> tuple[Token, str]:
        """A new token and its secret value; the value is shown once and never stored."""
        scope.check()
        ttl = self.default_ttl if ttl is None else ttl
        if not 0 < ttl <= 30 * 86400:
            raise PolicyError("ttl: must be more than 0 seconds and at most 30 days")
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.@:-]{0,64}", name):
            raise PolicyError("name: letters, digits and _.@:- only, at most 64")
        secret = secrets.token_urlsafe(32)
        now = time.time()
        with self._lock:
            tid = secrets.token_hex(6)
            while tid in self._tokens:
                tid = secrets.token_hex(6)
            tok = Token(id=tid, digest=_digest(secret), scope=scope, created=now,
                        expires=now + ttl, granted_by=granted_by, name=name)
            self._tokens[tid] = tok
            self._save()
        return tok, f"{PREFIX}{tid}_{secret}"

    def verify(self, value: str) -> Token:
        """The active token for a presented value, else AuthError (never echoing the value)."""
        m = _TOKEN_RE.fullmatch(value.strip()) if isinstance(value, str) else None
        if not m:
            raise AuthError("malformed token (expected sbxd_<id>_<secret>)")
        tid, secret = m.groups()
        tok = self._tokens.get(tid)
        # Compare against a dummy digest when the id is unknown: same work either way.
        expected = tok.digest if tok else "0" * 64
        if not hmac.compare_digest(expected, _digest(secret)) or tok is None:
            raise AuthError("invalid token")
        if tok.revoked is not None:
            raise AuthError(f"token {tid} was revoked")
        if time.time() >= tok.expires:
            raise AuthError(f"token {tid} has expired")
        return tok

    def get(self, tid: str) -> Token | None:
        return self._tokens.get(tid) if isinstance(tid, str) and _ID_RE.fullmatch(tid) else None

    def revoke(self, tid: str) -> Token:
        """Revoke and persist (fsynced) before returning."""
        tok, unsaved = self.mark_revoked(tid)
        if unsaved:
            self.save()
        return tok

    def mark_revoked(self, tid: str) -> tuple[Token, bool]:
        """Revoke in memory only: from this call on verify() refuses the token. The caller
        makes it durable with save() (the daemon does so while it kills the token's
        sandboxes, and answers only once both are done). (token, whether the revocation
        still has to be saved): true again on a retry after a failed save, so the retry
        saves instead of acknowledging a revocation a restart would forget."""
        with self._lock:
            tok = self.get(tid)
            if tok is None:
                raise KeyError(tid)
            if tok.revoked is None:
                tok.revoked = time.time()
                self._unsaved.add(tok.id)
            return tok, tok.id in self._unsaved

    def save(self):
        """Persist the current state (atomically, fsynced); safe from any thread."""
        with self._lock:
            self._save()

    def list(self) -> list[Token]:
        return sorted(self._tokens.values(), key=lambda t: t.created)

    def prune(self, older_than: float = 7 * 86400):
        """Forget tokens revoked or expired more than `older_than` seconds ago."""
        now = time.time()
        with self._lock:
            gone = [t.id for t in self._tokens.values()
                    if min(t.revoked or t.expires, t.expires) < now - older_than]
            for tid in gone:
                del self._tokens[tid]
            if gone:
                self._save()
