"""Escalation triggers, each with its record; critical ones freeze; the store survives
restarts; operators list and acknowledge."""
import json

import pytest

from sandbox.audit.escalation import Escalations
from sandbox.audit.log import AuditLog
from sandbox.audit.query import query
from sandbox.audit.sink import MemorySink
from sandbox.cli.main import main
from sandbox.errors import NotFoundError
from sandbox.policy.schema import EscalationPolicy, Policy


@pytest.fixture
def esc(tmp_path):
    frozen = []
    e = Escalations(tmp_path, MemorySink(), freeze_cb=frozen.append)
    e.frozen = frozen
    return e


def test_repeated_denials_raise_boundary_probing_once_per_threshold(esc):
    esc.set_policy("sb1", EscalationPolicy(denials=3))
    assert esc.observe_denial("sb1", "seccomp", {"syscall": "ptrace"}) is None
    assert esc.observe_denial("sb1", "network") is None
    raised = esc.observe_denial("sb1", "dns", {"name": "x.example"})
    assert raised["kind"] == "boundary_probing" and raised["severity"] == "warning"
    assert raised["detail"]["last"] == "dns" and raised["detail"]["denials"] == 3
    for _ in range(3):       # while open, repeats count up instead of flooding
        esc.observe_denial("sb1", "seccomp")
    assert [e["count"] for e in esc.list()] == [2]
    assert len(esc.audit.find("escalation", sandbox="sb1")) == 1
    assert esc.frozen == []   # a warning never freezes
    assert esc.observe_denial("sb2", "seccomp") is None   # other sandboxes count on their own


def test_secret_in_output_is_critical_and_freezes(esc):
    e = esc.observe_finding("sb1", "github-token", {"offset": 12, "hash": "hmac-sha256:00"})
    assert e["severity"] == "critical" and e["frozen"] and esc.frozen == ["sb1"]
    rec = esc.audit.find("escalation", sandbox="sb1")[0]
    assert rec["outcome"] == "critical" and rec["details"]["frozen"] is True


def test_no_freeze_when_the_policy_says_so_or_freeze_fails(tmp_path):
    e = Escalations(tmp_path, MemorySink(), freeze_cb=lambda s: (_ for _ in ()).throw(OSError("gone")))
    got = e.observe_finding("sb1", "aws-key")
    assert not got["frozen"] and "gone" in got["freeze_error"]
    calls = []
    e2 = Escalations(tmp_path / "b", MemorySink(), freeze_cb=calls.append)
    e2.set_policy("sb1", Policy(escalation=EscalationPolicy(freeze_on_critical=False)))
    assert not e2.observe_finding("sb1", "aws-key")["frozen"] and calls == []


def test_resource_limits_approached(esc):
    assert esc.observe_usage("sb1", {"memory_current": 80, "pids_current": 1},
                             {"memory": 100, "pids": 10}) == []
    raised = esc.observe_usage("sb1", {"memory_current": 95, "pids_peak": 9},
                               {"memory": 100, "pids": 10})
    assert [(r["kind"], r["detail"]["resource"]) for r in raised] == [
        ("resource_limit", "memory"), ("resource_limit", "pids")]
    assert raised[0]["detail"]["percent"] == 95.0


def test_error_spike_needs_failures_in_a_row(esc):
    esc.set_policy("sb1", EscalationPolicy(error_rate=3))
    for code in (1, 2, 0, 1, 1):
        assert esc.observe_exit("sb1", code) is None
    assert esc.observe_exit("sb1", 137)["kind"] == "error_spike"


def test_unusual_output_volume(esc):
    assert esc.observe_output_volume("sb1", 100, 1000) is None
    e = esc.observe_output_volume("sb1", 5000, 1000)
    assert e["kind"] == "output_volume" and e["detail"] == {"bytes": 5000, "expected": 1000}


def test_policy_severity_overrides_and_is_checked(esc):
    esc.set_policy("sb1", EscalationPolicy(severity=(("output_volume", "critical"),)))
    assert esc.observe_output_volume("sb1", 10, 1)["severity"] == "critical"
    assert esc.frozen == ["sb1"]
    with pytest.raises(ValueError, match="unknown trigger"):
        EscalationPolicy(severity=(("nope", "warning"),)).check()
    with pytest.raises(ValueError, match="must be one of"):
        EscalationPolicy(severity=(("error_spike", "loud"),)).check()


def test_store_survives_restart_and_ack_is_audited(tmp_path, capsys):
    with AuditLog(tmp_path, mirror=None) as log:
        e = Escalations(tmp_path, log)
        first = e.observe_finding("sb1", "private-key")
        e.observe_exit("sb2", 1)
    again = Escalations(tmp_path)
    assert [x["id"] for x in again.list()] == [first["id"]]
    assert main(["escalations", "--state-dir", str(tmp_path)]) == 0
    assert first["id"] in capsys.readouterr().out
    assert main(["escalations", "--state-dir", str(tmp_path), "ack", first["id"]]) == 0
    capsys.readouterr()
    assert Escalations(tmp_path).list() == []
    assert Escalations(tmp_path).list(all=True)[0]["status"] == "acked"
    assert main(["escalations", "--state-dir", str(tmp_path), "--all", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["acked_by"]
    acks = query(tmp_path, action="escalation_ack")
    assert acks[0]["details"]["id"] == first["id"]
    with pytest.raises(NotFoundError):
        Escalations(tmp_path).ack("esc-nope", 0)


def test_ack_while_the_log_is_held_says_to_use_the_daemon(tmp_path, capsys):
    with AuditLog(tmp_path, mirror=None):
        e = Escalations(tmp_path).observe_finding("sb1", "x")
        assert main(["escalations", "--state-dir", str(tmp_path), "ack", e["id"]]) == 2
    assert "another process" in capsys.readouterr().err
