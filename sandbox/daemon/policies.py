"""Policies as the daemon loads them for each create: parsed once, reused while unchanged.

Loading a policy (TOML parse, schema build, seccomp group resolution) took ~2.3 ms, twice per
create (the base policy and the one with the request's overrides), on the event loop: the
largest share of the daemon's own time per sandbox. A loaded `Policy` is immutable (frozen
dataclasses of tuples), so one object can serve every create that asks for the same name and
overrides, as long as nothing it was read from changed. Before each reuse the cache checks,
with stat calls only:

- the candidate file of that name in every policy directory, in lookup order (a file that
  appears in a directory searched earlier shadows the one loaded before);
- every seccomp group file (`seccomp/*.toml` under each policy directory), which the
  policy's `seccomp.groups` are resolved from at load time;
- the `$SANDBOXD_POLICY_DIR` in force (part of the key);

and it re-runs the read-only-bind symlink check, which reads the host's paths (a bind that
became a symlink is refused as it would be on a fresh load). Any difference loads afresh; a
policy that fails to load is never cached, so its error is the loader's, every time.
"""
from __future__ import annotations

import json
import os
import threading
from collections import OrderedDict


def _stat(path: str):
    try:
        st = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _dir_files(d: str):
    try:
        entries = list(os.scandir(d))
    except (FileNotFoundError, NotADirectoryError):
        return None
    return tuple(sorted((e.name, _stat(e.path)) for e in entries if e.name.endswith(".toml")))


def fingerprint(name: str) -> tuple:
    """What a load of policy `name` depends on, as stat results (see the module docstring)."""
    from sandbox.kernel.seccomp import group_dirs
    from sandbox.policy.load import policy_dirs
    return (tuple(_stat(f"{d}/{name}.toml") for d in policy_dirs()),
            tuple(_dir_files(str(d)) for d in group_dirs()))


class PolicyCache:
    def __init__(self, maxsize: int = 64):
        self.maxsize = maxsize
        self._entries: OrderedDict = OrderedDict()
        self._lock = threading.Lock()
        self._memo: dict = {}            # (id(policy), what) -> (policy, value)
        self.hits = 0
        self.loads = 0

    def load_pair(self, name: str, overrides: dict | None):
        """(the policy as its file says, the policy with the overrides): one freshness check."""
        fp = fingerprint(name)
        checked: set = set()
        base = self.load(name, None, _fp=fp, _checked=checked)
        return base, (self.load(name, overrides, _fp=fp, _checked=checked) if overrides
                      else base)

    def load(self, name: str, overrides: dict | None = None, *, _fp=None, _checked=None):
        """sandbox.policy.load_policy(name, overrides), reused while unchanged."""
        from sandbox.policy import load_policy
        from sandbox.policy.load import _check_ro_bind_symlinks
        key = (name, json.dumps(overrides or {}, sort_keys=True, separators=(",", ":")),
               os.environ.get("SANDBOXD_POLICY_DIR"))
        fp = fingerprint(name) if _fp is None else _fp
        with self._lock:
            hit = self._entries.get(key)
            if hit is not None and hit[0] == fp:
                self._entries.move_to_end(key)
                policy = hit[1]
            else:
                policy = None
        if policy is not None:
            binds = policy.filesystem.ro_binds
            if _checked is None or binds not in _checked:
                _check_ro_bind_symlinks(binds, f"policy {name}")
                if _checked is not None:
                    _checked.add(binds)
            self.hits += 1
            return policy
        policy = load_policy(name, overrides)
        self.loads += 1
        with self._lock:
            self._entries[key] = (fp, policy)
            self._entries.move_to_end(key)
            while len(self._entries) > self.maxsize:
                self._entries.popitem(last=False)
        return policy

    def memo(self, policy, what: str, make):
        """make(), once per loaded policy object and `what` (the daemon's scanner lookup,
        whose key hashes the whole policy). A changed file loads a new object: a new value.
        The memo holds the policy it is for, so an id is never reused while it is in there."""
        with self._lock:
            held = self._memo.get((id(policy), what))
            if held is not None and held[0] is policy:
                return held[1]
        value = make()
        with self._lock:
            self._memo[(id(policy), what)] = (policy, value)
            if len(self._memo) > 2 * self.maxsize:      # keep those of cached policies
                live = {id(e[1]) for e in self._entries.values()}
                for k in [k for k in self._memo if k[0] not in live]:
                    del self._memo[k]
        return value
