"""The error types of sandboxd: one base, one subclass per facility.

Every error names what failed in words an operator can act on. The C side reports
(step, errno, syscall) through one protocol; sandbox/_native.py turns that into
SpawnError here, at one point. Nothing here ever carries a secret: callers pass
names, paths and numbers, never values from the environment or the agent's output.
"""
from __future__ import annotations

import errno as _errno
import os


class SandboxError(Exception):
    """Base of every error sandboxd raises on purpose. str() is one clear line."""

    step: str = "sandbox"

    def __init__(self, message: str, *, step: str | None = None, errno: int | None = None,
                 syscall: str | None = None):
        self.message = message
        if step is not None:
            self.step = step
        self.errno = errno
        self.syscall = syscall
        super().__init__(self.__str__())

    def __str__(self) -> str:
        text = self.message
        if self.syscall:
            text += f" ({self.syscall}"
            if self.errno:
                text += f": {_errno.errorcode.get(self.errno, self.errno)} {os.strerror(self.errno)}"
            text += ")"
        elif self.errno:
            text += f" ({_errno.errorcode.get(self.errno, self.errno)}: {os.strerror(self.errno)})"
        return text

    def to_dict(self) -> dict:
        return {"error": type(self).__name__, "step": self.step, "message": str(self),
                "errno": self.errno, "syscall": self.syscall}


class PolicyError(SandboxError):
    """A policy file or request is invalid. Names the file and the field."""

    step = "policy"

    def __init__(self, message: str, *, field: str | None = None, source: str | None = None):
        self.field = field
        self.source = source
        where = ""
        if source:
            where += f"{source}: "
        if field:
            where += f"{field}: "
        super().__init__(where + message)


class UnsupportedError(SandboxError):
    """The host cannot enforce a control the policy asks for (fail closed)."""

    step = "host"


class SpawnError(SandboxError):
    step = "spawn"


class NamespaceError(SandboxError):
    step = "namespaces"


class MountError(SandboxError):
    step = "mounts"


class CgroupError(SandboxError):
    step = "cgroups"


class SeccompError(SandboxError):
    step = "seccomp"


class NetworkError(SandboxError):
    step = "network"


class ScanError(SandboxError):
    step = "scan"


class AuditError(SandboxError):
    step = "audit"


class TeardownError(SandboxError):
    """Destroy could not remove something. Lists what is left."""

    step = "teardown"

    def __init__(self, message: str, *, leftovers: list[str] | None = None):
        self.leftovers = list(leftovers or [])
        super().__init__(message + (": " + ", ".join(self.leftovers) if self.leftovers else ""))


class NotFoundError(SandboxError):
    step = "lookup"


class AuthError(SandboxError):
    step = "auth"


class LimitError(SandboxError):
    """A request exceeds a ceiling (token bounds, concurrent sandboxes, body size...)."""

    step = "limits"
