"""Load a policy from TOML into frozen dataclasses; every error names the file and the field.

Nothing is created while loading: an invalid policy changes nothing on the host.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
import tomllib
import typing
from pathlib import Path

from sandbox.errors import PolicyError
from sandbox.policy.schema import Policy, _str_map

REPO_POLICY_DIR = Path(__file__).resolve().parents[2] / "policies"
SYSTEM_POLICY_DIR = Path("/etc/sandboxd/policies")


def policy_dirs() -> list[Path]:
    """Where policy names are looked up, first match wins: $SANDBOXD_POLICY_DIR, /etc, the repo."""
    dirs = []
    if env := os.environ.get("SANDBOXD_POLICY_DIR"):
        dirs.append(Path(env))
    dirs += [SYSTEM_POLICY_DIR, REPO_POLICY_DIR]
    return dirs


def find_policy(name_or_path: str) -> Path:
    if "/" in name_or_path or name_or_path.endswith(".toml"):
        path = Path(name_or_path)
        if not path.is_file():
            raise PolicyError(f"no such policy file: {name_or_path}")
        return path
    if not name_or_path or not all(c.isalnum() or c in "-_" for c in name_or_path):
        raise PolicyError(f"not a policy name: {name_or_path!r} (letters, digits, - and _)")
    for d in policy_dirs():
        candidate = d / f"{name_or_path}.toml"
        if candidate.is_file():
            return candidate
    raise PolicyError(f"no policy named {name_or_path!r} in " + ", ".join(str(d) for d in policy_dirs()))


def read_policy_toml(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise PolicyError(f"not valid TOML: {e}", source=str(path)) from None
    except UnicodeDecodeError as e:
        raise PolicyError(f"not valid UTF-8 (byte {e.start}), TOML files are UTF-8",
                          source=str(path)) from None
    except OSError as e:
        raise PolicyError(f"cannot read: {e.strerror}", source=str(path)) from None


def load_policy(name_or_path: str, overrides: dict | None = None) -> Policy:
    """The policy NAME (from the policy dirs) or the file PATH, with optional overrides applied."""
    path = find_policy(name_or_path)
    data = read_policy_toml(path)
    data.setdefault("name", path.stem)
    source = str(path)
    if overrides:
        data = merge_overrides(data, overrides)
        source += " (with overrides)"   # the bad value may come from the request, not the file
    return policy_from_dict(data, source=source)


def merge_overrides(data: dict, overrides: dict) -> dict:
    """Deep-merge overrides (same shape as the TOML) over data; tables merge, values replace."""
    out = copy.deepcopy(data)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge_overrides(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def policy_from_dict(data: dict, source: str = "<policy>") -> Policy:
    if not isinstance(data, dict):
        raise PolicyError("a policy must be a table", source=source)
    policy = _build(Policy, data, "", source)
    _check_ro_bind_symlinks(policy.filesystem.ro_binds, source)
    return policy


def _check_ro_bind_symlinks(binds: tuple, source: str) -> None:
    """A read-only bind follows symlinks (mount(2) resolves its source), so a bind path that
    is or goes through a symlink exposes whatever it points to: a link to / would show the
    whole host. Such a path is accepted only when its real path lies inside another bind of
    the policy that is itself free of symlinks (Debian's merged /usr: /lib -> usr/lib, under
    /usr). Reads the host's paths, changes nothing; missing paths are the engine's (skipped)."""
    plain = [os.path.normpath(b) for b in binds if os.path.realpath(b) == os.path.normpath(b)]
    for b in binds:
        real = os.path.realpath(b)
        if real == os.path.normpath(b):
            continue
        if any(real == q or real.startswith(q.rstrip("/") + "/") for q in plain):
            continue
        raise PolicyError(f"{b} goes through a symlink (resolves to {real}), outside the "
                          "policy's other read-only binds; give the real path",
                          field="filesystem.ro_binds", source=source)


def _build(cls, data: dict, prefix: str, source: str):
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in known:
            raise PolicyError(f"unknown key (known: {', '.join(sorted(known))})",
                              field=prefix + key, source=source)
    kwargs = {}
    for name, f in known.items():
        if name not in data:
            continue
        raw, dotted, typ = data[name], prefix + name, hints[name]
        if dataclasses.is_dataclass(typ):
            if not isinstance(raw, dict):
                raise PolicyError("must be a table", field=dotted, source=source)
            kwargs[name] = _build(typ, raw, dotted + ".", source)
            continue
        conv = f.metadata.get("conv")
        try:
            kwargs[name] = conv(raw) if conv else _check_type(raw, typ)
        except ValueError as e:
            raise PolicyError(str(e), field=dotted, source=source) from None
    obj = cls(**kwargs)
    try:
        obj.check()
    except ValueError as e:
        # check() says "field: why"; put the section in front of the field.
        text = str(e)
        fieldname, _, why = text.partition(": ")
        if why and fieldname in known:
            raise PolicyError(why, field=prefix + fieldname, source=source) from None
        raise PolicyError(text, field=prefix.rstrip(".") or None, source=source) from None
    return obj


def _check_type(raw, typ):
    if typ is float and isinstance(raw, int) and not isinstance(raw, bool):
        return float(raw)
    if typ is int and isinstance(raw, bool):
        raise ValueError("expected an integer, got a boolean")
    if not isinstance(raw, typ):
        raise ValueError(f"expected {typ.__name__}, got {type(raw).__name__}")
    return raw


def policy_to_dict(policy: Policy) -> dict:
    """A JSON-able dict of the effective policy, in the TOML's shape: tuples become lists,
    name = value fields (environment.set, ...) tables, even when empty, so that
    policy_from_dict(policy_to_dict(p)) == p."""
    def conv(obj, f=None):
        if dataclasses.is_dataclass(obj):
            return {g.name: conv(getattr(obj, g.name), g) for g in dataclasses.fields(obj)}
        if f is not None and f.metadata.get("conv") is _str_map:
            return dict(obj)
        if isinstance(obj, tuple):
            return [conv(x) for x in obj]
        return obj
    return conv(policy)


def policy_hash(policy: Policy) -> str:
    """A stable digest of the effective policy (caches, audit records)."""
    blob = json.dumps(policy_to_dict(policy), sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()
