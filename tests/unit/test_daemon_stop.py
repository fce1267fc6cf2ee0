"""How sandboxd leaves (sandbox/daemon/main.py _bounded, engine.call_blocking): it waits for
no engine call stuck in a worker thread, and with none left it exits normally, so atexit
removes what the process made."""
import asyncio
import threading

import pytest

from sandbox.daemon import engine, main


def test_a_call_counts_until_it_returns_in_its_thread_even_when_its_awaiter_gives_up():
    release = threading.Event()

    async def go():
        task = asyncio.ensure_future(engine.call_blocking(release.wait, 10))
        for _ in range(200):
            if engine.calls_in_flight():
                break
            await asyncio.sleep(0.01)
        assert engine.calls_in_flight() == 1
        task.cancel()                                  # a client gone: the call goes on
        with pytest.raises(asyncio.CancelledError):
            await task
        assert engine.calls_in_flight() == 1
        release.set()
        for _ in range(200):
            if not engine.calls_in_flight():
                break
            await asyncio.sleep(0.01)
        assert engine.calls_in_flight() == 0
        assert await engine.call_blocking(lambda: 42) == 42
        assert engine.calls_in_flight() == 0

    asyncio.run(go())


class Exited(Exception):
    pass


def _leave(monkeypatch, in_flight):
    """Run _bounded with `in_flight` engine calls; what it did: (returned code or 'exit N',
    whether it cleared this process's /etc views itself)."""
    cleared = []
    monkeypatch.setattr(engine, "calls_in_flight", lambda: in_flight)
    monkeypatch.setattr("sandbox.kernel.mounts.clear_etc_cache", lambda: cleared.append(1))

    def fake_exit(code):
        raise Exited(code)
    monkeypatch.setattr(main.os, "_exit", fake_exit)
    monkeypatch.setattr(main.logging, "shutdown", lambda: None)   # pytest's handlers stay

    async def serve():
        return 3
    try:
        out = asyncio.run(main._bounded(serve()))
    except Exited as e:
        out = f"exit {e.args[0]}"
    return out, bool(cleared)


def test_with_no_engine_call_left_the_interpreter_exits_normally(monkeypatch):
    assert _leave(monkeypatch, 0) == (3, False)       # atexit does the clean-up


def test_a_stuck_engine_call_is_not_waited_for_and_the_views_still_go(monkeypatch):
    assert _leave(monkeypatch, 1) == ("exit 3", True)
