"""HTTP status for each error the daemon answers with; bodies are one clear JSON line."""
from __future__ import annotations

from sandbox.errors import (AuthError, LimitError, NotFoundError, PolicyError, SandboxError,
                            UnsupportedError)


class Forbidden(AuthError):
    """The caller is known but may not do this (403), as opposed to not authenticated (401)."""


class TooMany(LimitError):
    """A count ceiling (sandboxes at once) is reached: 429."""


class StateError(SandboxError):
    """The sandbox is not in a state that allows this (frozen, held, being destroyed): 409."""

    step = "state"


class BadRequest(PolicyError):
    """Malformed request: bad JSON, unknown or mistyped fields (400)."""


def status_of(e: SandboxError) -> int:
    for cls, code in ((Forbidden, 403), (AuthError, 401), (NotFoundError, 404),
                      (TooMany, 429), (LimitError, 403), (StateError, 409),
                      (PolicyError, 400), (UnsupportedError, 503)):
        if isinstance(e, cls):
            return code
    return 500
