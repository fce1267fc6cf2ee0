"""Setup as a flat ordered list of named steps, each with its undo.

`Lifecycle.run(step)` performs a step and pushes its undo; when any step fails,
`unwind()` undoes what was done, newest first, and every undo runs even if an
earlier one failed (failures are collected, never hidden). Each step and each undo
is reported to the audit sink, so the audit log shows exactly how far a sandbox got.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

from sandbox.audit.sink import NULL_SINK, AuditSink
from sandbox.errors import SandboxError, TeardownError


@dataclass
class Step:
    name: str
    do: Callable[[], Any]
    undo: Callable[[Any], None] | None = None  # gets what do() returned
    describe: str = ""
    # Undo only when every later undo succeeded: the intent record must outlive anything
    # left behind, so that crash recovery can still find and remove it.
    only_if_clean: bool = False


@dataclass
class _Done:
    step: Step
    result: Any
    seconds: float


@dataclass
class Lifecycle:
    sandbox_id: str
    audit: AuditSink = NULL_SINK
    done: list[_Done] = field(default_factory=list)
    undone: dict[str, float] = field(default_factory=dict)   # step -> seconds its undo took

    def run(self, step: Step) -> Any:
        t0 = time.perf_counter()
        try:
            result = step.do()
        except SandboxError as e:
            self.audit.record("setup_step", sandbox=self.sandbox_id, resource=step.name,
                              outcome="error", details={"error": str(e)})
            raise
        except OSError as e:
            self.audit.record("setup_step", sandbox=self.sandbox_id, resource=step.name,
                              outcome="error", details={"error": str(e)})
            raise SandboxError(f"{step.name} failed: {e.strerror or e}", step=step.name,
                               errno=e.errno) from e
        dt = time.perf_counter() - t0
        self.done.append(_Done(step, result, dt))
        self.audit.record("setup_step", sandbox=self.sandbox_id, resource=step.name,
                          outcome="ok", duration_ms=round(dt * 1000, 3))
        return result

    def unwind(self) -> list[str]:
        """Undo every done step, newest first. Returns the failures (empty when clean)."""
        failures = []
        while self.done:
            d = self.done.pop()
            if d.step.undo is None:
                continue
            if d.step.only_if_clean and failures:
                failures.append(f"{d.step.name}: kept for recovery (earlier teardown failed)")
                self.audit.record("teardown_step", sandbox=self.sandbox_id, resource=d.step.name,
                                  outcome="skipped", details={"reason": "earlier teardown failed"})
                continue
            t0 = time.perf_counter()
            try:
                d.step.undo(d.result)
                self.undone[d.step.name] = time.perf_counter() - t0
                self.audit.record("teardown_step", sandbox=self.sandbox_id, resource=d.step.name,
                                  outcome="ok")
            except Exception as e:  # noqa: BLE001 - every undo must run; failures are reported
                failures.append(f"{d.step.name}: {e}")
                self.audit.record("teardown_step", sandbox=self.sandbox_id, resource=d.step.name,
                                  outcome="error", details={"error": str(e)})
        return failures

    def unwind_or_raise(self):
        failures = self.unwind()
        if failures:
            raise TeardownError("teardown left things behind", leftovers=failures)

    def timings(self) -> dict[str, float]:
        return {d.step.name: d.seconds for d in self.done}

    def undo_timings(self) -> dict[str, float]:
        """Seconds each successful undo took (after unwind)."""
        return dict(self.undone)
