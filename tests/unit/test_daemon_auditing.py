"""QueuedSink: record() never waits for the disk; durable() waits for the newest record
(with the real log: one fdatasync per reply, however many records its work produced)."""
import asyncio
import json
import os
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


# -- with the real hash-chained log: batched durability (AuditLog.submit_lazy) ----------------
def _log(tmp_path, calls, *, fail=False, **kw):
    from sandbox.audit.log import AuditLog

    def fsync(fd):
        calls.append(fd)
        if fail and len(calls) > 1:            # the header's flush passes, then the disk fails
            raise OSError(5, "Input/output error")
        os.fdatasync(fd)
    return AuditLog(tmp_path, mirror=None, fsync=fsync, **kw)


def _lines(tmp_path):
    from sandbox.audit.log import audit_files
    return [json.loads(x) for f in audit_files(tmp_path / "audit")
            for x in f.read_text().splitlines()]


def test_lazy_records_are_written_at_once_and_made_durable_by_one_flush(tmp_path):
    from sandbox.audit.log import read_head
    calls = []
    log = _log(tmp_path, calls, lazy_delay=3600)
    base = len(calls)
    futs = [log.submit_lazy("setup_step", sandbox="sb-1", resource=str(i)) for i in range(20)]
    assert _until(lambda: sum(r["action"] == "setup_step" for r in _lines(tmp_path)) == 20)
    assert len(calls) == base and not any(f.done() for f in futs)     # written, not synced
    assert read_head(tmp_path / "audit")["seq"] < 21                  # HEAD never leads
    log.flush_future().result(10)
    assert len(calls) == base + 1 and all(f.done() for f in futs)
    assert read_head(tmp_path / "audit")["seq"] == 21
    log.close()


def test_a_lazy_record_nobody_waits_for_is_made_durable_within_the_delay(tmp_path):
    calls = []
    log = _log(tmp_path, calls, lazy_delay=0.05)
    fut = log.submit_lazy("teardown_step", sandbox="sb-1")
    assert fut.result(10)["action"] == "teardown_step"      # bounded: no flush was asked for
    assert len(calls) >= 2
    log.close()


def test_queued_sink_over_the_log_costs_one_fdatasync_per_reply(tmp_path):
    from sandbox.audit.verify import verify
    calls = []
    log = _log(tmp_path, calls, lazy_delay=3600)
    sink = QueuedSink(log)
    base = len(calls)
    for i in range(30):
        sink.record("setup_step", sandbox="sb-1", resource=str(i))
    asyncio.run(sink.durable())
    assert len(calls) == base + 1 and sink.last.done()
    asyncio.run(sink.durable())                     # nothing new: no flush at all
    assert len(calls) == base + 1
    log.close()
    assert verify(tmp_path).ok


def test_lazy_records_fail_closed_when_the_disk_fails(tmp_path):
    from sandbox.errors import AuditError
    calls = []
    log = _log(tmp_path, calls, fail=True, lazy_delay=3600)
    sink = QueuedSink(log)
    sink.record("setup_step", sandbox="sb-1")
    first = sink.last
    with pytest.raises(AuditError):
        asyncio.run(sink.durable())
    assert isinstance(first.exception(10), AuditError)
    with pytest.raises(AuditError):
        sink.record("another")                      # the log refuses everything after
    log.close()


def test_lazy_records_across_a_rotation_and_at_close_keep_the_chain(tmp_path):
    from sandbox.audit.log import audit_files, read_head
    from sandbox.audit.verify import verify
    calls = []
    log = _log(tmp_path, calls, lazy_delay=3600, max_bytes=4096)
    futs = [log.submit_lazy("exec", sandbox="sb-1", details={"argv": ["echo", str(i)]})
            for i in range(100)]
    log.close()                                     # close makes them durable
    assert all(f.done() and f.exception() is None for f in futs)
    assert len(audit_files(tmp_path / "audit")) > 2
    assert verify(tmp_path).ok
    recs = _lines(tmp_path)
    assert [int(r["details"]["argv"][1]) for r in recs if r["action"] == "exec"] == list(range(100))
    assert read_head(tmp_path / "audit")["seq"] == recs[-1]["seq"]


def _until(pred, seconds=10.0):
    import time
    for _ in range(int(seconds / 0.01)):
        if pred():
            return True
        time.sleep(0.01)
    return pred()
