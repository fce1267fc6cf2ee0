"""The daemon's side of the audit trail: records queue, acknowledgements wait for disk.

The engine and the escalation triggers record through `QueuedSink`: record() hands the
entry to the log's group-commit writer (AuditLog.submit) and returns at once, so no
lifecycle step and no event-loop callback waits for an fdatasync. Before the daemon
acknowledges anything to a client it awaits `durable()`: the future of the newest record
submitted so far. The log chains records in submission order and resolves futures in that
order, so once the newest is durable every earlier one is too (one fsync covers a whole
batch: ~1 per request instead of ~10 per create).

With the hash-chained log, records go in through `submit_lazy`: written at once but not
fdatasync'd on their own (AuditLog's batched durability); durable() then asks for the one
fdatasync that covers everything submitted so far (`flush_future`), so a reply costs one
disk flush however many records its work produced. A record no reply waits for is made
durable by the log within its lazy_delay (50 ms).
"""
from __future__ import annotations

import asyncio
import hashlib
import logging
import threading

log = logging.getLogger("sandboxd.audit")


class QueuedSink:
    def __init__(self, inner):
        self.inner = inner
        self._submit = getattr(inner, "submit_lazy", None) or getattr(inner, "submit", None)
        self._flush = getattr(inner, "flush_future", None) if hasattr(inner, "submit_lazy") else None
        self._lock = threading.Lock()
        self.last = None            # concurrent.futures.Future of the newest submitted record

    def record(self, action, **kw):
        if self._submit is None:            # NULL_SINK / MemorySink: already synchronous
            return self.inner.record(action, **kw)
        # Submit and remember under one lock: `last` is always the newest in chain order,
        # even with engine threads recording side by side.
        with self._lock:
            fut = self._submit(action, **kw)
            self.last = fut
        fut.add_done_callback(_report_failure(action))
        return None

    async def durable(self):
        """Return once every record submitted so far is on disk (raises if the log failed:
        the caller's request then fails instead of acknowledging an unrecorded action)."""
        fut = self.last
        if fut is not None and not (fut.done() and fut.exception() is None):
            if self._flush is not None and not fut.done():
                # Lazy records wait for a flush: ask for it now (it raises at once if the
                # log has failed, and resolves after everything before it is on disk).
                await asyncio.wrap_future(self._flush())
            await asyncio.wrap_future(fut)

    def finding_hash(self, data) -> str:
        fh = getattr(self.inner, "finding_hash", None)
        if fh is not None:
            return fh(data)
        return hashlib.sha256(data if isinstance(data, bytes) else str(data).encode()).hexdigest()

    def __getattr__(self, name):
        return getattr(self.inner, name)


def _report_failure(action):
    def done(f):
        if f.exception() is not None:
            log.error("audit record %s failed: %s", action, f.exception())
    return done
