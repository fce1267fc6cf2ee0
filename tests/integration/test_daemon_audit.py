"""The daemon's audit trail and escalations, end to end: durable before acknowledged,
complete enough to replay a session, never holding a secret; escalations raised by an
agent's behaviour, visible and acknowledged through the API; a critical one freezes."""
import json
import os
import subprocess
import sys
import threading

import pytest

from sandbox.client import Client, DaemonError
from tests.helpers import fakes
from tests.helpers.daemon import TEST_POLICY, InProcDaemon, cgroup_frozen
from tests.integration.test_daemon import admin, daemon  # noqa: F401 - the same fixtures

SMALL = {"limits": {"memory": "512MiB"}}
NO_DISK = {"limits": {"memory": "512MiB", "disk": 0}}
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _durable_actions(fd) -> set:
    """(action, sandbox) of every record in the file behind fd (just fsynced; the log's
    fd is write-only, so read the file it names)."""
    out = set()
    with open(f"/proc/self/fd/{fd}", "rb") as f:
        data = f.read()
    for line in data.splitlines():
        try:
            r = json.loads(line)
        except ValueError:
            continue
        out.add((r.get("action"), r.get("sandbox")))
    return out


def test_create_and_exec_are_on_disk_before_the_client_hears_of_them():
    """Hook the log's fsync: what each fsync made durable is noted in the writer thread;
    the client checks, on receiving the 201 and the exit event, that the records for them
    were already durable. The daemon would have to reply before the fsync to fail this."""
    durable: set = set()
    fsyncs = []
    lock = threading.Lock()

    def fsync(fd):
        os.fdatasync(fd)
        seen = _durable_actions(fd)
        with lock:
            durable.update(seen)
            fsyncs.append(len(seen))

    with InProcDaemon(fsync=fsync) as d, Client(d.socket) as c:
        sb = c.create("default", overrides=NO_DISK)          # 201
        with lock:
            assert ("daemon_create", sb["id"]) in durable, "201 sent before its record was durable"
            # the engine's own lifecycle records were queued before the reply too
            assert ("sandbox_create", sb["id"]) in durable or \
                any(a == "setup_step" and s == sb["id"] for a, s in durable)
        exits = []

        def on_event(ev):
            if ev["event"] == "exit":
                with lock:
                    exits.append(("exec_end", sb["id"]) in durable
                                 and ("exec_start", sb["id"]) in durable
                                 and ("output", sb["id"]) in durable)
        res = c.exec(sb["id"], ["echo", "durable"], on_event=on_event)
        assert res.stdout == b"durable\n" and exits == [True]
        c.destroy(sb["id"])
        with lock:
            assert ("daemon_destroy", sb["id"]) in durable
        # group commit: fewer fsyncs than records (not a timing assertion: a count)
        assert d.log.fsyncs < d.log.records, (d.log.fsyncs, d.log.records)


def _mounts(n: int) -> list[str]:
    # Each mount(2) is refused by the seccomp filter (and audited by the supervisor).
    return ["sh", "-c", "i=0; while [ $i -lt %d ]; do mount -t tmpfs none /tmp 2>/dev/null; "
            "i=$((i+1)); done; echo probed" % n]


def test_replay_shows_command_output_denial_and_end_in_order_and_no_secret(daemon, admin):
    hidden = fakes.aws_secret_line().decode().split("=")[-1].strip()   # an env *value*
    sid = admin.create(TEST_POLICY, overrides=SMALL)["id"]
    res = admin.exec(sid, ["sh", "-c", "echo hello-replay; mount -t tmpfs none /tmp; true"],
                     env={"TZ": hidden}, cwd="/tmp")
    assert b"hello-replay" in res.stdout
    admin.destroy(sid)
    tl = admin.request("GET", f"/v1/audit/replay/{sid}")
    kinds = [e["kind"] for e in tl["events"]]
    first = {k: kinds.index(k) for k in ("command", "output", "denied")}
    # The daemon's exec_end (after the last released chunk); the engine's own "exec"
    # record may come before the scanner's held-back tail is released.
    first["exit"] = [e["action"] for e in tl["events"]].index("exec_end")
    assert first["command"] < first["output"] < first["exit"], kinds
    assert first["command"] < first["denied"] < first["exit"], kinds
    assert tl["commands"][0]["argv"][0] == "sh" and tl["commands"][0]["cwd"] == "/tmp"
    out = next(e for e in tl["events"] if e["kind"] == "output")
    assert "hello-replay" in out["details"]["text"]
    assert any("mount" in json.dumps(e) for e in tl["denials"])
    start = next(e for e in tl["events"] if e["action"] == "exec_start")
    assert start["details"]["env"] == ["TZ"]
    assert tl["ended"] is not None
    # The CLI shows the same timeline (it reads the state dir; the daemon keeps the log).
    cli = subprocess.run([sys.executable, "-m", "sandbox.cli.main", "audit", "--state-dir",
                          str(daemon.state), "replay", sid], cwd=REPO, capture_output=True,
                         text=True, timeout=60)
    assert "hello-replay" in cli.stdout and "DENIED" in cli.stdout, cli.stdout + cli.stderr
    assert admin.request("GET", "/v1/audit/verify")["ok"] is True
    for f in (daemon.state / "audit").glob("audit-*.jsonl"):
        assert hidden.encode() not in f.read_bytes()


def test_probing_agent_raises_an_escalation_visible_in_ps_and_acked_by_admin(daemon, admin):
    sid = admin.create(TEST_POLICY, overrides=SMALL)["id"]
    res = admin.exec(sid, _mounts(12))
    assert res.stdout == b"probed\n"
    escs = admin.request("GET", f"/v1/escalations?sandbox={sid}")["escalations"]
    probe = [e for e in escs if e["kind"] == "boundary_probing"]
    assert probe and probe[0]["status"] == "open", escs
    assert next(s for s in admin.list() if s["id"] == sid)["escalations"] >= 1
    assert any(e["id"] == probe[0]["id"] for e in admin.inspect(sid)["open_escalations"])
    # a client with a token is not an operator
    tok = admin.grant_token(policies=[TEST_POLICY], ceiling={"memory": "1GiB"})
    with Client(daemon.socket, token=tok["token"]) as c:
        for method, path in (("GET", "/v1/escalations"),
                             ("POST", f"/v1/escalations/{probe[0]['id']}/ack")):
            with pytest.raises(DaemonError) as e:
                c.request(method, path)
            assert e.value.status == 403
    acked = admin.request("POST", f"/v1/escalations/{probe[0]['id']}/ack")
    assert acked["status"] == "acked"
    assert not [e for e in admin.request("GET", f"/v1/escalations?sandbox={sid}")["escalations"]
                if e["id"] == probe[0]["id"]]
    assert any(r["details"].get("id") == probe[0]["id"]
               for r in admin.audit(action="escalation_ack"))
    admin.revoke_token(tok["id"])
    admin.destroy(sid)


def test_secret_in_output_is_critical_and_freezes_until_an_operator_acts(daemon, admin):
    """A redact-rule secret (credentials in a URL) is redacted AND raises the critical
    secret_in_output escalation, which freezes the sandbox; the token cannot thaw it."""
    secret = fakes.url_with_password()
    password = secret.split(b"@")[0].rsplit(b":", 1)[1]
    tok = admin.grant_token(policies=[TEST_POLICY], ceiling={"memory": "1GiB"})
    with Client(daemon.socket, token=tok["token"]) as c:
        sid = c.create(TEST_POLICY, overrides=SMALL)["id"]
        pid = admin.inspect(sid)["info"]["init_pid"]
        c.put_file(sid, "cfg", secret + b"\n")
        raw = []
        res = c.exec(sid, ["sh", "-c", "cat cfg; echo after"], on_event=raw.append)
        assert password not in json.dumps(raw).encode()
        assert res.reason == "held"
        assert cgroup_frozen(pid)
        esc = [e for e in admin.request("GET", f"/v1/escalations?sandbox={sid}")["escalations"]
               if e["kind"] == "secret_in_output"]
        assert esc and esc[0]["severity"] == "critical" and esc[0]["frozen"] is True
        with pytest.raises(DaemonError) as e:
            c.resume(sid)
        assert e.value.status == 403 and cgroup_frozen(pid)
        admin.resume(sid)
        assert not cgroup_frozen(pid)
        c.destroy(sid)
    admin.revoke_token(tok["id"])
    for f in (daemon.state / "audit").glob("audit-*.jsonl"):
        data = f.read_bytes()
        assert password not in data and secret not in data
    assert password not in (daemon.state / "escalations.json").read_bytes()
