"""QueuedSink: record() never waits for the disk; durable() waits for the newest record."""
import asyncio
import threading
from concurrent.futures import Future

import pytest

from sandbox.audit.sink import MemorySink
from sandbox.daemon.auditing import QueuedSink


class _Log:
    """A log whose records become durable only when the test says so (in order)."""

    def __init__(self):
        self.futures: list[Future] = []

    def submit(self, action, **kw):
        f = Future()
        self.futures.append(f)
        return f

    def commit(self, n):
        for f in self.futures[:n]:
            if not f.done():
                f.set_result({})


def test_record_returns_without_waiting_and_durable_waits_for_the_newest():
    log = _Log()
    sink = QueuedSink(log)
    assert sink.record("a") is None and sink.record("b") is None   # neither blocked

    async def scenario():
        waiter = asyncio.ensure_future(sink.durable())
        await asyncio.sleep(0)
        log.commit(1)                    # only "a" durable: the reply must still wait
        await asyncio.sleep(0.01)
        assert not waiter.done()
        log.commit(2)
        await asyncio.wait_for(waiter, 5)
    asyncio.run(scenario())


def test_a_failed_write_fails_durable():
    log = _Log()
    sink = QueuedSink(log)
    sink.record("a")
    log.futures[0].set_exception(OSError("disk gone"))
    with pytest.raises(OSError):
        asyncio.run(sink.durable())


def test_concurrent_recorders_leave_the_newest_submitted_as_last():
    log = _Log()
    sink = QueuedSink(log)
    threads = [threading.Thread(target=lambda: [sink.record("x") for _ in range(200)])
               for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sink.last is log.futures[-1]


def test_a_synchronous_sink_records_in_place():
    mem = MemorySink()
    sink = QueuedSink(mem)
    sink.record("a", sandbox="sb-1")
    asyncio.run(sink.durable())
    assert mem.find("a")
