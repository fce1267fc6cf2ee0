"""What a token may ask for when it creates a sandbox.

A token client names a policy it is allowed and may override only a few fields: the
lifetimes, four limits and the network. Each final value must stay within the token's
ceiling, or, where the token sets none, within the policy's own value (a token may always
ask for less, never for more than an admin granted). Everything else (filesystem, seccomp,
scanner, user, escalation) is the policy's: a token cannot switch a control off.
"""
from __future__ import annotations

import math
import os

from sandbox.errors import AuthError, LimitError, PolicyError

TOKEN_OVERRIDABLE = {
    "timeout": None, "command_timeout": None,
    "limits": {"memory", "cpus", "pids", "disk"},
    "network": {"mode", "allow"},
}


def check_override_keys(overrides: dict):
    if not isinstance(overrides, dict):
        raise PolicyError("overrides: expected an object shaped like the policy TOML")
    for key, value in overrides.items():
        if key not in TOKEN_OVERRIDABLE:
            raise AuthError(f"overrides.{key}: a token may not override this (allowed: "
                            f"{', '.join(sorted(TOKEN_OVERRIDABLE))})")
        allowed = TOKEN_OVERRIDABLE[key]
        if allowed is not None:
            if not isinstance(value, dict):
                raise PolicyError(f"overrides.{key}: expected a table")
            for sub in value:
                if sub not in allowed:
                    raise AuthError(f"overrides.{key}.{sub}: a token may not override this "
                                    f"(allowed: {', '.join(sorted(allowed))})")


def _ceiling_values(policy) -> dict:
    lim = policy.limits
    return {"memory": lim.memory, "cpus": lim.cpus or math.inf, "pids": lim.pids,
            "disk": lim.disk or math.inf, "timeout": policy.timeout}


def check_policy_allowed(scope, name: str):
    if "*" not in scope.policies and name not in scope.policies:
        raise AuthError(f"policy {name!r} is not allowed by this token "
                        f"(allowed: {', '.join(scope.policies) or 'none'})")


def check_within(scope, base, final):
    """Raise LimitError naming the field when `final` asks for more than the token may."""
    mine, theirs = _ceiling_values(final), _ceiling_values(base)
    for name, value in mine.items():
        bound = scope.ceiling.get(name, theirs[name])
        if name in ("cpus", "disk") and bound == 0:
            bound = math.inf
        if value > bound:
            where = "limits." + name if name != "timeout" else name
            shown = "unlimited" if value == math.inf else value
            raise LimitError(f"{where}: {shown} exceeds what this token may ask for ({bound})")
    if final.command_timeout > min(final.timeout, scope.ceiling.get("timeout", math.inf)):
        raise LimitError("command_timeout: exceeds the sandbox's timeout")
    base_allow = set(base.network.allow)
    for entry in final.network.allow:
        if entry not in base_allow and entry not in scope.network:
            raise LimitError(f"network.allow: {entry!r} is not an entry this token may add")


def check_workspace(scope, path: str | None) -> str | None:
    """A host workspace the token may mount: under one of its roots after resolving links."""
    if path is None:
        return None
    if not isinstance(path, str) or not path.startswith("/") or "\0" in path:
        raise PolicyError("workspace: must be an absolute host path")
    real = os.path.realpath(path)
    for root in scope.workspace_roots:
        r = os.path.realpath(root)
        if real == r or real.startswith(r.rstrip("/") + "/"):
            if not os.path.isdir(real):
                raise PolicyError(f"workspace: {path} is not a directory")
            return real
    raise AuthError(f"workspace: {path} is not under a root this token may mount")
