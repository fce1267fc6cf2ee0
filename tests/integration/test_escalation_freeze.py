"""Escalations from the attacker's side on real sandboxes: a program that probes the seccomp
boundary raises "boundary probing"; a program that prints a secret raises a critical
escalation that freezes the sandbox (the kernel's cgroup freezer says frozen) until an
operator thaws it; nothing secret reaches the audit log."""
import asyncio
import os
import shutil
from pathlib import Path

import pytest

from sandbox.audit.escalation import Escalations
from sandbox.audit.log import AuditLog, audit_files
from sandbox.audit.query import query
from sandbox.audit.replay import replay
from sandbox.audit.verify import verify
from sandbox.policy import load_policy
from sandbox.runtime.recovery import find_leftovers
from sandbox.runtime.sandbox import Sandbox
from sandbox.scan.engine import Scanner
from tests.helpers import fakes

PID = os.getpid()
PARENT = f"sbxt-{PID}-esc"


@pytest.fixture
def world(tmp_path):
    """An audit log, an escalation engine freezing real sandboxes, a sandbox factory."""
    sandboxes = {}
    log = AuditLog(tmp_path / "state", mirror=None)
    esc = Escalations(tmp_path / "state", log, freeze_cb=lambda sid: sandboxes[sid].freeze())
    sink = esc.watch(log)
    policy = load_policy("default", overrides={"limits": {"memory": "128MiB", "disk": 0},
                                               "escalation": {"denials": 5}})

    def make(name):
        sb = Sandbox.create(policy, audit=sink, state_dir=tmp_path / "run",
                            sandbox_id=f"sbxt-{PID}-{name}", cgroup_parent=PARENT)
        sandboxes[sb.id] = sb
        esc.set_policy(sb.id, policy)
        return sb
    try:
        yield make, esc, log, tmp_path
    finally:
        for sb in sandboxes.values():
            try:
                sb.thaw()
            except Exception:   # noqa: BLE001 - destroy below reports what is left
                pass
            sb.destroy()
        log.close()
        for hier in Path("/sys/fs/cgroup").iterdir():
            if (hier / PARENT).is_dir():
                os.rmdir(hier / PARENT)
        assert find_leftovers(tmp_path / "run", id_prefix=f"sbxt-{PID}-", cgroup_parent=PARENT) == []
        shutil.rmtree(tmp_path / "run", ignore_errors=True)


PROBE = ("import ctypes, os\n"
         "libc = ctypes.CDLL(None, use_errno=True)\n"
         "for _ in range(7):\n"
         "    r = libc.syscall(165, b'none', b'/tmp', b'tmpfs', 0, None)\n"   # mount(2)
         "    print(r, ctypes.get_errno())\n")


def test_boundary_probing_is_stopped_audited_and_escalated(world):
    make, esc, log, tmp = world
    sb = make("probe")
    res = asyncio.run(sb.exec(["python3", "-c", PROBE]))
    assert res.exit_code == 0
    assert res.stdout.decode().split("\n")[:7] == ["-1 1"] * 7     # every mount got EPERM
    log.flush()
    denied = query(tmp / "state", sandbox=sb.id, action="seccomp_violation")
    assert len(denied) >= 7 and all(r["outcome"] == "denied" for r in denied)
    open_ = esc.list(sandbox=sb.id)
    assert [e["kind"] for e in open_] == ["boundary_probing"] and not open_[0]["frozen"]
    assert query(tmp / "state", sandbox=sb.id, action="escalation")
    # Replay of the real log: created, the 7 denied mounts, the escalation, the command's end.
    tl = replay(tmp / "state", sb.id)
    kinds = [e["kind"] for e in tl["events"] if e["kind"] != "other"]
    assert kinds.index("denied") < kinds.index("exit")
    assert [e["resource"] for e in tl["denials"]][:7] == ["mount"] * 7
    assert "escalation" in kinds and tl["events"][0]["action"] == "setup_step"


def test_secret_in_output_freezes_the_sandbox_until_thawed(world):
    make, esc, log, tmp = world
    sb = make("leak")
    secret = fakes.private_key_block()
    scanner = Scanner.from_policy(load_policy("default").scanner)
    # The program inside prints a private key (handed to it as an argument).
    res = asyncio.run(sb.exec(["sh", "-c", 'printf "%s\\n" "$1"', "sh", secret]))
    scan = scanner.scan(res.stdout, salt=log.salt)
    assert scan.findings and secret.encode() not in scan.released
    for f in scan.findings:
        log.record("scan_finding", sandbox=sb.id, details={"rule": f.rule_id, "offset": f.start,
                                                             "hash": f.hash})
        esc.observe_finding(sb.id, f.rule_id, {"offset": f.start})
    [e] = esc.list(sandbox=sb.id)
    assert e["severity"] == "critical" and e["frozen"]
    assert _frozen(sb), "the sandbox's cgroup is not frozen"
    esc.ack(e["id"], 0)
    sb.thaw()
    assert not _frozen(sb)
    assert asyncio.run(sb.exec(["true"])).exit_code == 0
    log.flush()
    data = b"".join(f.read_bytes() for f in audit_files(tmp / "state" / "audit"))
    for s in fakes.emitted:
        assert s.encode() not in data
    assert verify(tmp / "state").ok


def _frozen(sb) -> bool:
    """The kernel's word: cgroup.events 'frozen 1' (v2/unified) or freezer.state FROZEN (v1)."""
    for p in map(Path, sb.ctx.cgroup.paths()):
        if (p / "cgroup.events").exists():
            return "frozen 1" in (p / "cgroup.events").read_text()
        if (p / "freezer.state").exists():
            return (p / "freezer.state").read_text().strip() == "FROZEN"
    raise AssertionError("no freezer file in the sandbox's cgroups")
