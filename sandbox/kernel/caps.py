"""Capabilities: what the C child drops, and how to read what a process holds.

The child (csrc/child.c drop_privileges) empties every set: bounding (PR_CAPBSET_DROP for
0..cap_last_cap of the *running* kernel), ambient (PR_CAP_AMBIENT_CLEAR_ALL), permitted
and effective (the uid change from the namespace's root to the agent, capabilities(7)
"Effect of user ID changes"), inheritable (capset with zeros); securebits NOROOT locked,
no_new_privs set. This module reads the result back, for tests and doctor.
"""
from __future__ import annotations

CAP_SETS = ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")


def cap_last_cap() -> int:
    with open("/proc/sys/kernel/cap_last_cap") as f:
        return int(f.read())


def parse_status(text: str) -> dict[str, int]:
    """The capability sets (as ints) and NoNewPrivs from a /proc/<pid>/status text."""
    out = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key in CAP_SETS:
            out[key] = int(value.strip(), 16)
        elif key == "NoNewPrivs":
            out[key] = int(value.strip())
    return out


def process_caps(pid: int | str) -> dict[str, int]:
    with open(f"/proc/{pid}/status") as f:
        return parse_status(f.read())


def is_unprivileged(pid: int | str) -> bool:
    caps = process_caps(pid)
    return all(caps.get(k) == 0 for k in CAP_SETS) and caps.get("NoNewPrivs") == 1


def probe() -> list[tuple[str, bool, str]]:
    n = cap_last_cap()
    return [("capabilities", n > 0, f"cap_last_cap={n}: every set emptied up to it")]
