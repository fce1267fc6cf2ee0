"""Warm sandboxes (sandbox/runtime/pool.py) built by the real engine."""
import time

from sandbox.runtime.pool import SandboxPool
from sandbox.runtime.sandbox import Sandbox
from tests.helpers.engine import engine_policy, run, state_dir  # noqa: F401


def _leftover_intents(state_dir):
    d = state_dir / "sandboxes"
    return sorted(p.name for p in d.iterdir()) if d.exists() else []


def test_pool_hands_out_ready_sandboxes_and_refills(state_dir):
    pol = engine_policy()
    pool = SandboxPool(lambda: Sandbox.create(pol, state_dir=state_dir), 2, name="test")
    taken = []
    try:
        assert pool.wait_ready(2, timeout=120), pool.last_error
        built_at = time.time()
        time.sleep(0.05)
        sb = pool.take()
        taken.append(sb)
        assert sb is not None and sb.created < built_at   # built ahead of demand
        sb.restart_lifetime()
        assert sb.created > built_at                       # lifetime counts from hand-out
        res = run(sb, ["sh", "-c", "ls -A /home/agent/workspace | wc -l; echo ok"])
        assert res.exit_code == 0 and res.stdout.split() == [b"0", b"ok"]  # fresh and empty
        assert pool.wait_ready(2, timeout=120), pool.last_error   # its replacement
        other = pool.take()
        taken.append(other)
        assert other.id != sb.id and other.ctx.uidrange.base != sb.ctx.uidrange.base
    finally:
        failures = pool.close()
        for s in taken:
            s.destroy()
    assert failures == []
    assert pool.take() is None                             # closed: nothing handed out
    assert _leftover_intents(state_dir) == []              # every pooled sandbox destroyed


def test_pool_survives_failed_builds_and_drain_destroys(state_dir):
    pol = engine_policy()
    calls = {"n": 0}

    def build():
        calls["n"] += 1
        if calls["n"] <= 2:
            raise RuntimeError("injected build failure")
        return Sandbox.create(pol, state_dir=state_dir)

    pool = SandboxPool(build, 1, name="test")
    try:
        assert pool.wait_ready(1, timeout=120), pool.last_error
        assert pool.failures == 2 and "injected" in pool.last_error
        drained = pool.built
        assert pool.drain() == []
        assert pool.wait_ready(1, timeout=120)             # builds again after a drain
        assert pool.built > drained
    finally:
        assert pool.close() == []
    assert _leftover_intents(state_dir) == []


def test_zero_size_pool_builds_nothing(state_dir):
    pool = SandboxPool(lambda: Sandbox.create(engine_policy(), state_dir=state_dir), 0)
    assert pool.take() is None and pool.ready() == 0
    assert pool.close() == []
    assert _leftover_intents(state_dir) == []
