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
