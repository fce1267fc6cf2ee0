"""Escalations: suspicious behaviour raised to humans, kept until an operator acknowledges it.

Triggers (the security design's table; thresholds and severities are the policy's
[escalation] section, sandbox/policy/schema.py):

| kind | raised when | default severity |
| --- | --- | --- |
| boundary_probing | `denials` denials (seccomp, network, DNS, auth, limits) in one sandbox | warning |
| secret_in_output | the scanner found secret-like content in output | critical |
| resource_limit | memory or pids at or above `memory_pct` / `pids_pct` % of the limit | warning |
| error_spike | `error_rate` failed commands in a row | warning |
| output_volume | a command printed more than the scanner's expected_output | warning |
| teardown_failed | destroy or recovery could not remove something | critical |

Each raises one audit record (action "escalation") and one entry in the open-escalations
store `<state_dir>/escalations.json` (written atomically, so it survives restarts). While an
escalation of a kind is open for a sandbox, repeats only count up (no flood of records).
A critical escalation calls `freeze_cb(sandbox_id)` when the policy says freeze_on_critical:
the sandbox stays frozen until an operator resumes or destroys it. Operators list open ones
(`sandboxctl escalations`) and acknowledge them (`sandboxctl escalations ack ID`), which is
audited too (action "escalation_ack").
"""
from __future__ import annotations

import secrets
import threading
import time
from pathlib import Path
from typing import Any, Callable

from sandbox.audit.sink import NULL_SINK
from sandbox.errors import NotFoundError
from sandbox.policy.schema import ESCALATION_KINDS, EscalationPolicy
from sandbox.runtime.intent import atomic_write_json

STORE = "escalations.json"


class Escalations:
    def __init__(self, state_dir: Path, audit=NULL_SINK,
                 freeze_cb: Callable[[str], Any] | None = None):
        self.path = Path(state_dir) / STORE
        self.audit = audit
        self.freeze_cb = freeze_cb
        self._lock = threading.RLock()
        self._policies: dict[str, EscalationPolicy] = {}
        self._denials: dict[str, int] = {}
        self._failures: dict[str, int] = {}
        self._items: list[dict] = self._load()

    # -- per-sandbox settings --------------------------------------------------------------

    def set_policy(self, sandbox_id: str, policy) -> None:
        """Thresholds for a sandbox: a Policy or its EscalationPolicy (default otherwise)."""
        with self._lock:
            self._policies[sandbox_id] = getattr(policy, "escalation", policy)

    def forget(self, sandbox_id: str) -> None:
        """The sandbox is gone: drop its counters (its open escalations stay until acked)."""
        with self._lock:
            for d in (self._policies, self._denials, self._failures):
                d.pop(sandbox_id, None)

    def _policy(self, sandbox_id: str) -> EscalationPolicy:
        return self._policies.get(sandbox_id) or EscalationPolicy()

    # -- triggers --------------------------------------------------------------------------

    def observe_denial(self, sandbox_id: str, kind: str, detail: dict | None = None) -> dict | None:
        """A denial of `kind` (seccomp, network, dns, auth, limit) in the sandbox."""
        with self._lock:
            n = self._denials[sandbox_id] = self._denials.get(sandbox_id, 0) + 1
            if n < self._policy(sandbox_id).denials:
                return None
            self._denials[sandbox_id] = 0
            return self._raise(sandbox_id, "boundary_probing",
                               {"denials": n, "last": kind, **_small(detail)})

    def observe_finding(self, sandbox_id: str, rule: str, detail: dict | None = None) -> dict:
        """The scanner found secret-like content (rule id; offsets and salted hash only)."""
        with self._lock:
            return self._raise(sandbox_id, "secret_in_output", {"rule": rule, **_small(detail)})

    def observe_usage(self, sandbox_id: str, usage: dict, limits) -> list[dict]:
        """Memory or pids at or above the policy's percentage of the limit."""
        pol = self._policy(sandbox_id)
        raised = []
        for res, pct in (("memory", pol.memory_pct), ("pids", pol.pids_pct)):
            limit = limits.get(res) if isinstance(limits, dict) else getattr(limits, res, None)
            used = next((usage[k] for k in (f"{res}_current", f"{res}_peak", res)
                         if usage.get(k) is not None), None)
            if limit and used is not None and used * 100 >= pct * limit:
                with self._lock:
                    raised.append(self._raise(sandbox_id, "resource_limit",
                                              {"resource": res, "used": used, "limit": limit,
                                               "percent": round(used * 100 / limit, 1)}))
        return raised

    def observe_exit(self, sandbox_id: str, exit_code: int | None) -> dict | None:
        """A command ended; `error_rate` failures in a row raise an error spike."""
        with self._lock:
            if exit_code == 0:
                self._failures[sandbox_id] = 0
                return None
            n = self._failures[sandbox_id] = self._failures.get(sandbox_id, 0) + 1
            if n < self._policy(sandbox_id).error_rate:
                return None
            self._failures[sandbox_id] = 0
            return self._raise(sandbox_id, "error_spike", {"failed_in_a_row": n})

    def observe_output_volume(self, sandbox_id: str, nbytes: int, expected: int) -> dict | None:
        """A command's output size against the scanner's expected_output."""
        if expected <= 0 or nbytes <= expected:
            return None
        with self._lock:
            return self._raise(sandbox_id, "output_volume", {"bytes": nbytes, "expected": expected})

    def observe_teardown_failure(self, sandbox_id: str, leftovers: list[str]) -> dict:
        with self._lock:
            return self._raise(sandbox_id, "teardown_failed", {"leftovers": list(leftovers)[:20]})

    def watch(self, sink) -> "WatchingSink":
        """A sink that passes every record to `sink` and feeds the triggers it implies:
        a record with outcome "denied" is a denial, an "exec" record with an exit_code is a
        command's end. Give it to the engine as its audit sink and denials from the seccomp
        supervisor, the network and DNS reach the boundary-probing trigger on their own."""
        return WatchingSink(sink, self)

    # -- operators -------------------------------------------------------------------------

    def list(self, all: bool = False, sandbox: str | None = None) -> list[dict]:  # noqa: A002
        with self._lock:
            return [dict(e) for e in self._items
                    if (all or e["status"] == "open") and (sandbox is None or e["sandbox"] == sandbox)]

    def ack(self, esc_id: str, operator: str | int) -> dict:
        with self._lock:
            esc = next((e for e in self._items if e["id"] == esc_id), None)
            if esc is None:
                raise NotFoundError(f"no escalation {esc_id!r}")
            if esc["status"] == "open":
                esc.update(status="acked", acked_by=str(operator), acked_at=time.time())
                self._save()
                self.audit.record("escalation_ack", sandbox=esc["sandbox"], resource=esc["kind"],
                                  uid=operator if isinstance(operator, int) else None,
                                  details={"id": esc_id, "kind": esc["kind"],
                                           "operator": str(operator)})
            return dict(esc)

    # -- internals -------------------------------------------------------------------------

    def _raise(self, sandbox_id: str, kind: str, detail: dict) -> dict:
        pol = self._policy(sandbox_id)
        severity = dict(pol.severity).get(kind, ESCALATION_KINDS[kind])
        esc = next((e for e in self._items if e["status"] == "open"
                    and e["sandbox"] == sandbox_id and e["kind"] == kind), None)
        if esc is not None:   # already open: count, do not flood the log
            esc["count"] += 1
            esc["last_at"] = time.time()
            esc["detail"] = detail
            self._save()
            return dict(esc)
        esc = {"id": "esc-" + secrets.token_hex(4), "sandbox": sandbox_id, "kind": kind,
               "severity": severity, "status": "open", "count": 1, "opened_at": time.time(),
               "last_at": time.time(), "detail": detail, "frozen": False,
               "acked_by": None, "acked_at": None}
        self._items.append(esc)
        if severity == "critical" and pol.freeze_on_critical and self.freeze_cb is not None:
            try:
                self.freeze_cb(sandbox_id)
                esc["frozen"] = True
            except Exception as e:  # noqa: BLE001 - the escalation stands; the failure is in it
                esc["freeze_error"] = str(e)
        self._save()
        self.audit.record("escalation", sandbox=sandbox_id, resource=kind,
                          outcome="critical" if severity == "critical" else "warning",
                          details={"id": esc["id"], "kind": kind, "severity": severity,
                                   "frozen": esc["frozen"], **({"freeze_error": esc["freeze_error"]}
                                                              if "freeze_error" in esc else {}),
                                   "detail": detail})
        return dict(esc)

    def _load(self) -> list[dict]:
        import json
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return []
        except ValueError as e:
            from sandbox.errors import AuditError
            raise AuditError(f"{self.path}: damaged escalation store ({e})") from None
        return list(data.get("escalations", []))

    def _save(self) -> None:
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        atomic_write_json(self.path, {"version": 1, "escalations": self._items})


class WatchingSink:
    """See Escalations.watch(). Everything else (record_async, flush...) is the inner sink's."""

    def __init__(self, inner, escalations: Escalations):
        self.inner = inner
        self.escalations = escalations

    def record(self, action, **kw):
        rec = self.inner.record(action, **kw)
        sid, details = kw.get("sandbox"), kw.get("details") or {}
        if sid and kw.get("outcome") == "denied":
            self.escalations.observe_denial(sid, action, {"resource": kw.get("resource")})
        elif sid and action == "exec" and "exit_code" in details:
            self.escalations.observe_exit(sid, details["exit_code"])
        return rec

    def __getattr__(self, name):
        return getattr(self.inner, name)


def _small(detail: dict | None) -> dict:
    """Only short scalar details go into an escalation (names, numbers; never content)."""
    return {k: v for k, v in (detail or {}).items()
            if isinstance(v, (int, float, bool)) or (isinstance(v, str) and len(v) <= 200)}
