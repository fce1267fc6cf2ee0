"""The lifecycle: steps run in order, undo newest first, every undo runs, failures reported."""
import errno

import pytest

from sandbox.audit.sink import MemorySink
from sandbox.errors import SandboxError, TeardownError
from sandbox.runtime.lifecycle import Lifecycle, Step


def _steps(log, fail_undo=(), fail_do=None):
    def make(name, only_if_clean=False):
        def do():
            if name == fail_do:
                raise OSError(errno.EACCES, "denied")
            log.append(f"do {name}")
            return name

        def undo(result):
            assert result == name
            if name in fail_undo:
                raise RuntimeError(f"{name} stuck")
            log.append(f"undo {name}")
        return Step(name, do, undo, only_if_clean=only_if_clean)
    return [make("state", only_if_clean=True), make("cgroup"), make("network"), make("spawn")]


def test_steps_run_in_order_and_unwind_newest_first():
    log, audit = [], MemorySink()
    lc = Lifecycle("sbx1", audit)
    for s in _steps(log):
        lc.run(s)
    assert lc.unwind() == []
    assert log == ["do state", "do cgroup", "do network", "do spawn",
                   "undo spawn", "undo network", "undo cgroup", "undo state"]
    assert [r["resource"] for r in audit.find("teardown_step")] == ["spawn", "network", "cgroup", "state"]
    assert set(lc.timings()) == set()  # nothing done is left after a full unwind


def test_a_failing_undo_does_not_stop_the_others_and_keeps_the_intent_step():
    log, audit = [], MemorySink()
    lc = Lifecycle("sbx1", audit)
    for s in _steps(log, fail_undo=("network",)):
        lc.run(s)
    failures = lc.unwind()
    assert "undo cgroup" in log and "undo spawn" in log
    assert "undo state" not in log, "the intent record must survive a failed teardown"
    assert failures[0].startswith("network: network stuck")
    assert failures[1].startswith("state: kept for recovery")
    with pytest.raises(TeardownError, match="cgroup: cgroup stuck"):
        for s in _steps([], fail_undo=("cgroup",)):
            lc.run(s)
        lc.unwind_or_raise()


def test_a_failing_step_is_reported_as_a_sandbox_error_naming_the_step():
    log, audit = [], MemorySink()
    lc = Lifecycle("sbx1", audit)
    with pytest.raises(SandboxError) as e:
        for s in _steps(log, fail_do="network"):
            lc.run(s)
    assert e.value.step == "network" and e.value.errno == errno.EACCES
    assert audit.find("setup_step", resource="network")[0]["outcome"] == "error"
    assert lc.unwind() == []
    assert log[-2:] == ["undo cgroup", "undo state"]
