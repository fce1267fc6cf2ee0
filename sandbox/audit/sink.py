"""The interface every part of sandboxd records audit events through.

The engine, the seccomp supervisor, the network resolver and the daemon all take an
AuditSink. The daemon passes the hash-chained log (sandbox/audit/log.py); the
in-process `sandboxctl run` and unit tests may pass NULL_SINK or a MemorySink.
Callers pass names, numbers, hashes and offsets only: never a secret, a token,
or a host environment value.
"""
from __future__ import annotations

import threading
import time
from typing import Any, Protocol


class AuditSink(Protocol):
    def record(self, action: str, *, sandbox: str | None = None, outcome: str = "ok",
               resource: str | None = None, details: dict[str, Any] | None = None,
               token: str | None = None, uid: int | None = None,
               duration_ms: float | None = None) -> dict | None:
        """Append one record. `token` is a token *id*, never the secret."""


class NullSink:
    def record(self, action, **kw):
        return None


class MemorySink:
    """Keeps records in a list: for tests and for the in-process CLI's summaries."""

    def __init__(self):
        self.records: list[dict] = []
        self._lock = threading.Lock()

    def record(self, action, *, sandbox=None, outcome="ok", resource=None, details=None,
               token=None, uid=None, duration_ms=None):
        rec = {"ts": time.time(), "action": action, "sandbox": sandbox, "outcome": outcome,
               "resource": resource, "details": details or {}, "token": token, "uid": uid,
               "duration_ms": duration_ms}
        with self._lock:
            self.records.append(rec)
        return rec

    def find(self, action: str, **match) -> list[dict]:
        with self._lock:
            return [r for r in self.records if r["action"] == action
                    and all(r.get(k) == v or r["details"].get(k) == v for k, v in match.items())]


NULL_SINK = NullSink()
