"""The daemon's registry of live sandboxes: who owns each, what state it is in.

States: creating → running ⇄ frozen; running/frozen → held (a `block` finding withheld
output; only an operator resumes it) → running; running → dead (a command's timeout or the
sandbox's lifetime killed it: only destroy is left); any → destroying → gone (removed).
"""
from __future__ import annotations

import secrets
import time
from dataclasses import dataclass, field

STATES = ("creating", "running", "frozen", "held", "dead", "destroying")


def new_sandbox_id() -> str:
    return "sb-" + secrets.token_hex(6)


def valid_sandbox_id(value: str) -> bool:
    return (isinstance(value, str) and len(value) == 15 and value.startswith("sb-")
            and all(c in "0123456789abcdef" for c in value[3:]))


@dataclass
class SandboxRecord:
    id: str
    policy: object                      # sandbox.policy.Policy
    token_id: str | None                # None: created by an admin without a token
    uid: int                            # uid of the client that created it
    handle: object = None               # engine Handle
    state: str = "creating"
    created: float = field(default_factory=time.time)
    held_reason: str | None = None
    execs: int = 0
    running_execs: int = 0
    findings: int = 0
    expiry_timer: object = None         # asyncio.TimerHandle for policy.timeout
    teardown: object = None             # asyncio.Task of the one destroy in flight (shared)
    scanner: object = None              # the policy's scanner, looked up at the first use
    salt: str = field(default_factory=lambda: secrets.token_hex(16))

    def summary(self) -> dict:
        return {"id": self.id, "token": self.token_id, "policy": self.policy.name,
                "state": self.state, "created": self.created,
                "age": round(time.time() - self.created, 3), "uid": self.uid,
                "execs": self.execs, "findings": self.findings, "held_reason": self.held_reason}


class Registry:
    def __init__(self):
        self._by_id: dict[str, SandboxRecord] = {}

    def add(self, rec: SandboxRecord):
        self._by_id[rec.id] = rec

    def remove(self, sid: str):
        self._by_id.pop(sid, None)

    def get(self, sid: str) -> SandboxRecord | None:
        return self._by_id.get(sid)

    def all(self) -> list[SandboxRecord]:
        return sorted(self._by_id.values(), key=lambda r: r.created)

    def of_token(self, tid: str) -> list[SandboxRecord]:
        return [r for r in self._by_id.values() if r.token_id == tid]

    def count_token(self, tid: str) -> int:
        return sum(1 for r in self._by_id.values() if r.token_id == tid)

    def by_state(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for r in self._by_id.values():
            out[r.state] = out.get(r.state, 0) + 1
        return out
