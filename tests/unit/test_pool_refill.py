"""When the warm pool (sandbox/runtime/pool.py) builds a replacement: with a refill delay,
not while takes keep coming and a sandbox is still ready; at once when it is empty."""
import threading
import time

from sandbox.runtime.pool import SandboxPool


class Fake:
    def __init__(self, n):
        self.id = f"fake-{n}"

    def destroy(self):
        pass


def _pool(size, delay):
    built = []
    lock = threading.Lock()

    def build():
        with lock:
            built.append(time.monotonic())
            return Fake(len(built))
    return SandboxPool(build, size, name="t", refill_delay=delay), built


def test_a_replacement_waits_for_a_quiet_moment_while_one_is_ready():
    pool, built = _pool(2, 2.0)
    try:
        assert pool.wait_ready(2, timeout=10)
        taken = time.monotonic()
        assert pool.take() is not None
        time.sleep(0.3)
        assert len(built) == 2 and pool.ready() == 1     # still quiet time: nothing built
        assert pool.wait_ready(2, timeout=10)             # ... then it refills
        assert built[2] - taken >= 2.0
    finally:
        assert pool.close() == []


def test_an_empty_pool_refills_at_once():
    pool, built = _pool(1, 30.0)
    try:
        assert pool.wait_ready(1, timeout=10)
        assert pool.take() is not None                    # empty now: no waiting 30 s
        assert pool.wait_ready(1, timeout=10)
        assert len(built) == 2
    finally:
        assert pool.close() == []


def test_no_delay_refills_at_once():
    pool, built = _pool(2, 0.0)
    try:
        assert pool.wait_ready(2, timeout=10)
        assert pool.take() is not None
        assert pool.wait_ready(2, timeout=10)
        assert len(built) == 3
    finally:
        assert pool.close() == []


def test_close_destroys_what_is_ready_even_when_a_build_is_stuck():
    destroyed, gate, calls = [], threading.Event(), []

    class Tracked(Fake):
        def destroy(self):
            destroyed.append(self.id)

    def build():
        calls.append(1)
        if len(calls) > 1:
            gate.wait(10)                 # the second build hangs (the kernel, say)
        return Tracked(len(calls))
    pool = SandboxPool(build, 2, name="t")
    for _ in range(200):
        if pool.ready() == 1 and len(calls) == 2:
            break
        time.sleep(0.01)
    failures = pool.close(timeout=0.2)
    assert failures and "did not stop" in failures[0]
    assert destroyed == ["fake-1"]
    gate.set()                            # the stuck build ends: closed, it is destroyed
    for _ in range(200):
        if destroyed == ["fake-1", "fake-2"]:
            break
        time.sleep(0.01)
    assert destroyed == ["fake-1", "fake-2"]
