"""Warm sandboxes: a few built ahead of demand for one policy, handed out whole.

Building a sandbox (cgroups, disk, rootfs, spawn) is most of what a create costs; a caller
asking for the pool's exact policy with no host directories gets a ready one at once and a
background thread builds its replacement. Nothing about a pooled sandbox differs from one
made on demand: the same steps, its own uid range, cgroup, disk and namespaces, no command
ever run in it, its intent record naming everything (so crash recovery removes pooled ones
like any other), its lifetime counted from the moment it is handed out. It is handed out
once and never comes back: destroy is destroy.

Who may take one, and which policy matches, is the caller's business (the daemon checks the
token's bounds first and asks only for the policy it built the pool for).
"""
from __future__ import annotations

import logging
import threading
import time
from collections import deque
from typing import Callable

log = logging.getLogger("sandbox.pool")

RETRY_MIN, RETRY_MAX = 0.5, 30.0     # seconds between attempts after a failed build


class SandboxPool:
    """Keeps up to `size` sandboxes made by `build()` ready; `take()` returns one or None.

    build() -> a Sandbox-like object with destroy(); it runs on the pool's own thread.
    """

    def __init__(self, build: Callable[[], object], size: int, *, name: str = "pool",
                 refill_delay: float = 0.0):
        if size < 0 or refill_delay < 0:
            raise ValueError("pool size and refill delay must be 0 or more")
        self._build = build
        self.size = size
        self.name = name
        # While a sandbox is still ready, a replacement is built once none was taken for
        # this long: the requests that follow a take (the new sandbox's first commands) then
        # do not share the CPU (and the GIL) with a build. An empty pool refills at once.
        self.refill_delay = refill_delay
        self._last_take = float("-inf")
        self._ready: deque = deque()
        self._cond = threading.Condition()
        self._closed = False
        self.built = self.taken = self.failures = 0
        self.last_error: str | None = None
        self._thread = threading.Thread(target=self._fill, name=f"sandbox-{name}", daemon=True)
        if size:
            self._thread.start()

    # ---- the caller's side --------------------------------------------------------------
    def take(self):
        """A ready sandbox (now the caller's), or None when none is ready."""
        with self._cond:
            if self._closed or not self._ready:
                return None
            sb = self._ready.popleft()
            self.taken += 1
            self._last_take = time.monotonic()
            self._cond.notify_all()          # the filler builds the replacement
        return sb

    def ready(self) -> int:
        with self._cond:
            return len(self._ready)

    def wait_ready(self, count: int, timeout: float) -> bool:
        """Block until `count` sandboxes are ready (tests, start-up); False on timeout."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while len(self._ready) < count and not self._closed:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
            return len(self._ready) >= count

    def drain(self) -> list[str]:
        """Destroy every ready sandbox now (the kill switch; the filler builds again)."""
        with self._cond:
            items = list(self._ready)
            self._ready.clear()
            self._cond.notify_all()          # the filler builds anew
        return self._destroy_all(items)

    def close(self, timeout: float = 60.0) -> list[str]:
        """Stop building, wait for a build in progress, destroy what is ready. Returns the
        teardown failures (empty when everything is gone)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        stuck = []
        if self._thread.is_alive():
            self._thread.join(timeout)
            if self._thread.is_alive():      # its build is left to it (and to recovery)
                stuck = [f"{self.name}: builder thread did not stop within {timeout:g} s"]
        with self._cond:
            items = list(self._ready)
            self._ready.clear()
        return stuck + self._destroy_all(items)

    # ---- the filler ---------------------------------------------------------------------
    def _fill(self):
        delay = RETRY_MIN
        while True:
            with self._cond:
                while not self._closed:
                    if len(self._ready) >= self.size:
                        self._cond.wait()
                        continue
                    quiet = self._last_take + self.refill_delay - time.monotonic()
                    if quiet <= 0 or not self._ready:   # empty: the next take needs one now
                        break
                    self._cond.wait(quiet)      # a take meanwhile pushes the build out
                if self._closed:
                    return
            try:
                sb = self._build()
            except Exception as e:  # noqa: BLE001 - the pool must outlive a failed build
                self.failures += 1
                self.last_error = str(e)[:300]
                log.warning("%s: building a warm sandbox failed (retry in %.1f s): %s",
                            self.name, delay, self.last_error)
                with self._cond:
                    self._cond.wait(delay)   # close() wakes us at once
                delay = min(delay * 2, RETRY_MAX)
                continue
            delay = RETRY_MIN
            with self._cond:
                if not self._closed:
                    self._ready.append(sb)
                    self.built += 1
                    self._cond.notify_all()
                    continue
            self._destroy_all([sb])          # closed while it was being built
            return

    def _destroy_all(self, items) -> list[str]:
        failures = []
        for sb in items:
            try:
                sb.destroy()
            except Exception as e:  # noqa: BLE001 - destroy the others, report this one
                failures.append(f"{getattr(sb, 'id', '?')}: {e}")
        return failures
