"""The shared deadline thread behind every sandbox's lifetime (sandbox/runtime/deadlines.py)."""
import threading
import time

from sandbox.runtime.deadlines import Deadlines


def test_deadlines_fire_in_order_and_cancelled_ones_never():
    dl = Deadlines()
    fired, done = [], threading.Event()

    def mark(name):
        def fn():
            fired.append(name)
            if name == "last":
                done.set()
        return fn
    dl.schedule(0.15, mark("last"))
    dl.schedule(0.05, mark("first"))
    dl.schedule(0.10, mark("second"))
    dl.schedule(0.08, mark("cancelled")).cancel()
    assert done.wait(5)
    assert fired == ["first", "second", "last"]
    assert dl.pending() == 0


def test_a_failing_callback_does_not_stop_the_others():
    dl = Deadlines()
    ok = threading.Event()

    def boom():
        raise RuntimeError("injected")
    dl.schedule(0.01, boom)
    dl.schedule(0.03, ok.set)
    assert ok.wait(5)


def test_one_thread_however_many_deadlines_and_cancels_free_memory():
    dl = Deadlines()
    before = threading.active_count()
    ds = [dl.schedule(3600, lambda: None) for _ in range(1000)]
    assert threading.active_count() <= before + 1
    for d in ds[:900]:
        d.cancel()
    assert dl.pending() == 100
    assert len(dl._heap) < 1000          # cancelled entries were dropped, not kept for an hour


def test_cancel_after_it_ran_is_harmless():
    dl = Deadlines()
    ran = threading.Event()
    d = dl.schedule(0.0, ran.set)
    assert ran.wait(5)
    time.sleep(0.01)
    dl._cancel(d)
    assert dl.pending() == 0
