"""One thread for every sandbox's lifetime deadline.

A threading.Timer per sandbox kept a thread alive for each live sandbox (policy lifetimes
are hours: a thousand sandboxes, a thousand threads), and starting one waits until the new
thread has run, which under load (other threads holding the interpreter lock) cost the
daemon's event loop about a millisecond per create, measured with py-spy. Here a heap of
deadlines is served by one thread started on first use.

Callbacks run on that thread, one after the other: they must be short (the engine's is a
kill, bounded by the cgroup module's waits).
"""
from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from typing import Callable

log = logging.getLogger("sandbox.deadlines")


class Deadline:
    """A scheduled call; cancel() makes sure it never runs (if it has not started)."""

    __slots__ = ("when", "seq", "fn", "cancelled", "owner")

    def __init__(self, when: float, seq: int, fn: Callable[[], None], owner: "Deadlines"):
        self.when, self.seq, self.fn, self.cancelled, self.owner = when, seq, fn, False, owner

    def __lt__(self, other: "Deadline") -> bool:
        return (self.when, self.seq) < (other.when, other.seq)

    def cancel(self):
        self.owner._cancel(self)


class Deadlines:
    def __init__(self):
        self._heap: list[Deadline] = []
        self._cond = threading.Condition()
        self._seq = itertools.count()
        self._cancelled = 0
        self._thread: threading.Thread | None = None

    def schedule(self, delay: float, fn: Callable[[], None]) -> Deadline:
        d = Deadline(time.monotonic() + max(0.0, delay), next(self._seq), fn, self)
        with self._cond:
            heapq.heappush(self._heap, d)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="sandbox-deadlines",
                                                daemon=True)
                self._thread.start()
            self._cond.notify()
        return d

    def pending(self) -> int:
        with self._cond:
            return len(self._heap) - self._cancelled

    def _cancel(self, d: Deadline):
        with self._cond:
            if d.cancelled or d.fn is None:
                return
            d.cancelled, d.fn = True, None
            self._cancelled += 1
            # Cancelled entries would otherwise stay until their time comes (hours): drop
            # them once they are half the heap, so memory follows the live sandboxes.
            if self._cancelled > 64 and self._cancelled * 2 > len(self._heap):
                self._heap = [e for e in self._heap if not e.cancelled]
                heapq.heapify(self._heap)
                self._cancelled = 0

    def _next_due(self) -> Deadline:
        with self._cond:
            while True:
                while self._heap and self._heap[0].cancelled:
                    heapq.heappop(self._heap)
                    self._cancelled -= 1
                if not self._heap:
                    self._cond.wait()
                    continue
                wait = self._heap[0].when - time.monotonic()
                if wait <= 0:
                    d = heapq.heappop(self._heap)
                    d.cancelled = True          # due: a cancel() from now on is too late
                    return d
                self._cond.wait(wait)

    def _run(self):
        while True:
            d = self._next_due()
            fn, d.fn = d.fn, None
            try:
                fn()
            except Exception:  # noqa: BLE001 - one failing callback must not stop the others
                log.exception("a sandbox deadline callback failed")


DEADLINES = Deadlines()
