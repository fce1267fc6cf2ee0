"""Crash recovery on the real kernel: a stand-in daemon (tests/integration/crash_worker.py)
builds sandboxes with limits, disks and egress networks through the engine, is SIGKILLed
mid-create, mid-exec or mid-destroy, and recover() must leave nothing of them on the host
(processes, cgroups, netns, veths, nft tables, qdiscs, mounts, disk images, directories),
with the recovery in an intact audit chain.

The host side of the sandboxes' networks lives in a network namespace this test makes
(never the real one); everything is named sbxt-<pid>-..."""
import json
import os
import select
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from sandbox.audit.log import AuditLog
from sandbox.audit.query import query
from sandbox.audit.verify import verify
from sandbox.kernel import network
from sandbox.runtime.intent import Intent, list_intents
from sandbox.runtime.recovery import find_leftovers, recover

ROOT = Path(__file__).resolve().parents[2]
PID = os.getpid()


def _sh(*args):
    return subprocess.run(args, check=True, capture_output=True, text=True)


@pytest.fixture(scope="module")
def host_ns():
    """A namespace that plays the daemon's host netns (forwarding on in it only)."""
    name, netns_dir = f"sbxt-{PID}-rhost", f"/run/sbxt-{PID}-rnetns"
    saved = network.CONFIG
    _sh("ip", "netns", "add", name)
    try:
        _sh("ip", "-n", name, "link", "set", "lo", "up")
        _sh("ip", "netns", "exec", name, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        network.configure(host_netns=f"/run/netns/{name}", netns_dir=netns_dir, prefix="sbxt")
        yield {"host_netns": f"/run/netns/{name}", "netns_dir": netns_dir, "name": name}
    finally:
        network.CONFIG = saved
        if os.path.isdir(netns_dir):
            for n in os.listdir(netns_dir):
                subprocess.run(["umount", "-l", f"{netns_dir}/{n}"], capture_output=True)
                os.unlink(f"{netns_dir}/{n}")
            os.rmdir(netns_dir)
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


@pytest.fixture
def crash(tmp_path, host_ns, request):
    """Run the worker to its pause point, SIGKILL it; yields the config. Cleans up after."""
    state = {"cfg": None}
    parent = f"sbxt-{PID}-rc"

    def run(scenario, count=3, pause_step=0):
        cfg = {"state_dir": str(tmp_path / "run"), "id_prefix": f"sbxt-{PID}-{scenario[:2]}",
               "cgroup_parent": parent, "count": count, "scenario": scenario,
               "pause_step": pause_step, **{k: host_ns[k] for k in ("host_netns", "netns_dir")}}
        state["cfg"] = cfg
        p = subprocess.Popen([sys.executable, "-m", "tests.integration.crash_worker", json.dumps(cfg)],
                             cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            ready, _, _ = select.select([p.stdout], [], [], 60)
            line = p.stdout.readline().decode() if ready else ""
            assert line.startswith("PAUSED"), f"worker did not pause: {line!r} {p.stderr.read1(4000)!r}"
        finally:
            p.send_signal(signal.SIGKILL)     # the crash (our own child, by pid)
            p.wait()
            p.stdout.close()
            p.stderr.close()
        return cfg

    yield run
    cfg = state["cfg"]
    if cfg:   # whatever the test's outcome, leave nothing behind
        recover(cfg["state_dir"], id_prefix=cfg["id_prefix"], cgroup_parent=parent)
        for hier in Path("/sys/fs/cgroup").iterdir():
            if (hier / parent).is_dir():
                os.rmdir(hier / parent)
        shutil.rmtree(cfg["state_dir"], ignore_errors=True)


def _check_recovered(cfg, audit_dir):
    kw = {"id_prefix": cfg["id_prefix"], "cgroup_parent": cfg["cgroup_parent"]}
    before = find_leftovers(cfg["state_dir"], network_check=True, **kw)
    kinds = {r["kind"] for p in list_intents(cfg["state_dir"]) for r in Intent.load(p).resources}
    assert {"process", "cgroup"} <= kinds and before      # the crash really left things
    with AuditLog(audit_dir, mirror=None) as log:
        report = recover(cfg["state_dir"], log, **kw)
    assert report.ok, report.leftovers
    assert find_leftovers(cfg["state_dir"], network_check=True, **kw) == []
    assert verify(audit_dir).ok
    rec = query(audit_dir, action="recovery")
    assert rec and rec[-1]["outcome"] == "ok" and rec[-1]["details"]["removed"] > 0
    removed = {r["resource"] for r in query(audit_dir, action="recovery_removed")}
    return report, kinds, removed, before


def test_crash_mid_exec_leaves_nothing(crash, tmp_path):
    cfg = crash("exec", count=3)
    report, kinds, removed, before = _check_recovered(cfg, tmp_path / "audit-state")
    assert len(report.sandboxes) == 3
    assert {"netns", "veth", "nft", "qdisc", "disk", "process", "cgroup", "dir"} <= kinds
    assert kinds <= removed
    # (the sandboxes' processes may already be dead: init dies with its parent; recovery
    # then finds the recorded (pid, starttime) gone or a zombie, and says so)
    seen = {item.split()[0] for item in before}
    assert {"cgroup", "netns", "nft", "link", "mount", "intent"} <= seen
    # Idempotent: running it again finds nothing and changes nothing.
    again = recover(cfg["state_dir"], id_prefix=cfg["id_prefix"], cgroup_parent=cfg["cgroup_parent"])
    assert again.ok and again.sandboxes == [] and again.orphans == []


@pytest.mark.parametrize("pause_step", [3, 5])   # after cgroup / after network (of the last one)
def test_crash_mid_create_leaves_nothing(crash, tmp_path, pause_step):
    cfg = crash("create", count=3, pause_step=pause_step)
    report, kinds, _, _ = _check_recovered(cfg, tmp_path / "audit-state")
    assert len(report.sandboxes) == 3


def test_crash_mid_destroy_leaves_nothing(crash, tmp_path):
    cfg = crash("destroy", count=2, pause_step=2)
    report, kinds, _, _ = _check_recovered(cfg, tmp_path / "audit-state")
    assert len(report.sandboxes) == 2


def test_orphan_disk_no_intent_names_is_swept(tmp_path):
    """A disk whose intent is gone (destroy failed after the record was closed) is found by
    its name prefix and removed: unmounted, loop device detached, image deleted."""
    from sandbox.kernel import disk
    prefix = f"sbxt-{PID}-od"
    d = disk.create(f"{prefix}1", 16 * 1024**2, base=tmp_path / "disks")
    try:
        assert find_leftovers(tmp_path / "run", id_prefix=prefix, disk_base=tmp_path / "disks")
        report = recover(tmp_path / "run", id_prefix=prefix, cgroup_parent=f"sbxt-{PID}-none",
                         disk_base=tmp_path / "disks")
        assert report.ok and report.orphans == [f"disk({d.image})"]
        assert find_leftovers(tmp_path / "run", id_prefix=prefix, disk_base=tmp_path / "disks") == []
    finally:
        if d.image.exists():
            d.remove()
