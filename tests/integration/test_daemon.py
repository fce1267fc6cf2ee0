"""sandboxd end to end: a real daemon (subprocess), the real engine and scanner, real kernel.

Each test talks to the daemon only through its socket, as an orchestrator would.
"""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from sandbox.client import Client, DaemonError
from tests.helpers import fakes
from tests.helpers.daemon import TEST_POLICY, DaemonProc, alive, cgroup_frozen, wait_until


@pytest.fixture(scope="module")
def daemon():
    with DaemonProc() as d:
        yield d


@pytest.fixture
def admin(daemon):
    with daemon.admin() as c:
        yield c
        for sb in c.list():             # whatever a failed test left running
            try:
                c.destroy(sb["id"])
            except DaemonError:
                pass


def _grant(admin, **kw):
    kw.setdefault("ceiling", {"memory": "1GiB"})
    kw.setdefault("policies", [TEST_POLICY])
    t = admin.grant_token(**kw)
    return t["token"], t["id"]


SMALL = {"limits": {"memory": "512MiB"}}


def _init_pid(admin, sid) -> int:
    return admin.inspect(sid)["info"]["init_pid"]


def test_orchestrator_flow(daemon, admin):
    """grant token -> create -> copy files in -> exec make test -> copy artifacts out -> destroy"""
    value, tid = _grant(admin, name="ci")
    with Client(daemon.socket, token=value) as c:
        sb = c.create(TEST_POLICY, overrides=SMALL)
        sid = sb["id"]
        c.put_file(sid, "Makefile", b"test:\n\tsh ./check.sh > build/report.txt\n\tcat build/report.txt\n")
        c.put_file(sid, "check.sh", b"mkdir -p build 2>/dev/null; echo \"tests passed as $(id -u)\"\n",
                   mode=0o755)
        c.put_file(sid, "build/.keep", b"")
        events = []
        res = c.exec(sid, ["make", "test"], on_event=events.append)
        assert res.exit_code == 0 and res.reason == "exited", (res, events)
        assert b"tests passed as 1000" in res.stdout
        assert c.get_file(sid, "build/report.txt") == b"tests passed as 1000\n"
        names = {e["name"] for e in c.list_files(sid)}
        assert {"Makefile", "check.sh", "build"} <= names
        info = admin.inspect(sid)
        pid = info["info"]["init_pid"]
        assert alive(pid) and info["token"] == tid and info["state"] == "running"
        ws_dirs = list((daemon.run / "sandboxes").iterdir())
        assert ws_dirs
        out = c.destroy(sid)
        assert out["state"] == "destroyed" and out["report"]["leftovers"] == []
        assert not alive(pid)
        assert c.list() == []
        with pytest.raises(DaemonError) as e:
            c.inspect(sid)
        assert e.value.status == 404


def test_failed_command_and_limit_events(daemon, admin):
    value, _ = _grant(admin)
    with Client(daemon.socket, token=value) as c:
        sid = c.create(TEST_POLICY, overrides=SMALL)["id"]
        res = c.exec(sid, ["sh", "-c", "echo out; echo err >&2; exit 3"])
        assert (res.exit_code, res.stdout, res.stderr) == (3, b"out\n", b"err\n")
        assert c.exec(sid, ["cat"], stdin="fed through stdin\n").stdout == b"fed through stdin\n"
        res = c.exec(sid, ["sleep", "30"], timeout=0.5)
        assert res.reason == "timeout" and res.limits and res.limits[0]["limit"] == "timeout"
        # A command timeout kills the whole sandbox (through its cgroup): only destroy is left.
        assert c.inspect(sid)["state"] == "dead"
        with pytest.raises(DaemonError) as e:
            c.exec(sid, ["true"])
        assert e.value.status == 409
        c.destroy(sid)


def test_secret_printed_by_agent_never_reaches_client_and_sandbox_is_held(daemon, admin):
    value, _ = _grant(admin)
    secret = fakes.aws_key_id()
    with Client(daemon.socket, token=value) as c:
        sid = c.create(TEST_POLICY, overrides=SMALL)["id"]
        pid = _init_pid(admin, sid)
        # The agent writes the secret to a file, then prints it among ordinary output.
        c.put_file(sid, "creds.txt", secret + b"\n")
        raw = []
        res = c.exec(sid, ["sh", "-c", "echo building; cat creds.txt; echo done"],
                     on_event=raw.append)
        wire = json.dumps(raw).encode()
        assert secret not in wire and secret not in res.stdout + res.stderr
        assert res.held and res.reason == "held"
        assert any(ev["event"] == "finding" and ev["finding"]["action"] == "block" for ev in raw)
        assert c.inspect(sid)["state"] == "held"
        assert cgroup_frozen(pid), "a held sandbox must be frozen by its cgroup"
        with pytest.raises(DaemonError) as e:                # nothing more runs or leaves
            c.exec(sid, ["echo", "x"])
        assert e.value.status == 409
        with pytest.raises(DaemonError) as e:
            c.get_file(sid, "creds.txt")
        assert e.value.status == 409
        with pytest.raises(DaemonError) as e:                # the token cannot release it
            c.resume(sid)
        assert e.value.status == 403
        admin.resume(sid)                                      # an operator can; nothing withheld
        assert not cgroup_frozen(pid)
        res2 = c.exec(sid, ["echo", "after"])
        assert res2.stdout == b"after\n" and secret not in res2.stdout
        # Reading the secret out as a file is withheld and holds the sandbox again.
        with pytest.raises(DaemonError) as e:
            c.get_file(sid, "creds.txt")
        assert e.value.status == 409 and secret.decode() not in e.value.message
        assert cgroup_frozen(pid)
        c.destroy(sid)
    admin.request("GET", "/v1/health")
    holds = admin.audit(action="daemon_hold")
    assert any(r["sandbox"] == sid for r in holds)
    for f in (daemon.state / "audit").glob("audit-*.jsonl"):
        assert secret not in f.read_bytes()
    assert secret not in daemon.log.read_bytes()


def test_revocation_kills_only_that_tokens_sandboxes(daemon, admin):
    a, aid = _grant(admin, name="a")
    b, _ = _grant(admin, name="b")
    with Client(daemon.socket, token=a) as ca, Client(daemon.socket, token=b) as cb:
        sa = [ca.create(TEST_POLICY, overrides=SMALL)["id"] for _ in range(2)]
        sb = cb.create(TEST_POLICY, overrides=SMALL)["id"]
        pids_a = [_init_pid(admin, s) for s in sa]
        pid_b = _init_pid(admin, sb)
        out = admin.revoke_token(aid)
        assert out["killed"] == 2
        # cgroup.kill returned only once each cgroup was empty: gone by the time we hear back.
        assert not any(alive(p) for p in pids_a)
        assert alive(pid_b)
        with pytest.raises(DaemonError) as e:
            ca.list()
        assert e.value.status == 401 and a not in str(e.value)
        assert cb.exec(sb, ["echo", "still here"]).stdout == b"still here\n"
        assert wait_until(lambda: {s["id"] for s in admin.list()} == {sb})
        cb.destroy(sb)


def test_expiry_kills_only_that_tokens_sandboxes(daemon, admin):
    a, _ = _grant(admin, name="short", ttl=2.0)
    b, _ = _grant(admin, name="long")
    with Client(daemon.socket, token=a) as ca, Client(daemon.socket, token=b) as cb:
        sa = ca.create(TEST_POLICY, overrides=SMALL)["id"]
        sb = cb.create(TEST_POLICY, overrides=SMALL)["id"]
        pid_a, pid_b = _init_pid(admin, sa), _init_pid(admin, sb)
        assert wait_until(lambda: sa not in {s["id"] for s in admin.list()})
        assert not alive(pid_a) and alive(pid_b)
        with pytest.raises(DaemonError) as e:
            ca.create(TEST_POLICY, overrides=SMALL)
        assert e.value.status == 401 and "expired" in e.value.message
        cb.destroy(sb)


def test_other_tokens_sandbox_is_not_found(daemon, admin):
    a, _ = _grant(admin)
    b, _ = _grant(admin)
    with Client(daemon.socket, token=a) as ca, Client(daemon.socket, token=b) as cb:
        sid = ca.create(TEST_POLICY, overrides=SMALL)["id"]
        for op in (lambda: cb.inspect(sid), lambda: cb.exec(sid, ["id"]),
                   lambda: cb.get_file(sid, "x"), lambda: cb.destroy(sid)):
            with pytest.raises(DaemonError) as e:
                op()
            assert e.value.status == 404
        assert alive(_init_pid(admin, sid))
        ca.destroy(sid)


def test_workspace_escape_through_agent_symlinks_is_refused(daemon, admin):
    """The agent plants symlinks to host files; reads and writes through them are refused."""
    value, _ = _grant(admin)
    marker = daemon.tmp / "host-secret.txt"
    marker.write_text("host only\n")
    with Client(daemon.socket, token=value) as c:
        sid = c.create(TEST_POLICY, overrides=SMALL)["id"]
        res = c.exec(sid, ["sh", "-c", f"ln -s {marker} abs; ln -s ../../../../../.. up; "
                                       "ln -s /proc/self/root root; mkfifo fifo; echo ok"])
        assert res.exit_code == 0, res
        for path in ("abs", "up/etc/passwd", "root/etc/shadow", "../x", "/etc/passwd", "fifo"):
            with pytest.raises(DaemonError) as e:
                c.get_file(sid, path)
            assert e.value.status in (400, 404), path
        with pytest.raises(DaemonError):
            c.put_file(sid, "abs", b"overwritten")
        with pytest.raises(DaemonError):
            c.put_file(sid, "up/tmp/x", b"planted")
        assert marker.read_text() == "host only\n"
        c.destroy(sid)


def _as_nobody(sock_path: str, token: str | None, gid: int) -> tuple[int, str]:
    """Run a client as uid nobody with the given gid (no supplementary groups)."""
    code = (
        "import os, sys, json\n"
        "from sandbox.client import Client, DaemonError, NotRunning\n"   # before the drop:
        "import http.client, base64, urllib.parse\n"                    # the venv is root's
        f"os.setgroups([]); os.setgid({gid}); os.setuid(65534)\n"
        "tok = os.environ.get('SANDBOXD_TOKEN')\n"
        "try:\n"
        f"    Client({sock_path!r}, token=tok).list(); print('200 ok')\n"
        "except NotRunning as e:\n"
        "    print('0 ' + e.message)\n"
        "except DaemonError as e:\n"
        "    print(f'{e.status} {e.message}')\n")
    env = {"PATH": os.environ.get("PATH", "/usr/bin"), "PYTHONPATH": str(Path(__file__).parents[2])}
    if token:
        env["SANDBOXD_TOKEN"] = token
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    status, _, msg = out.stdout.strip().partition(" ")
    return int(status), msg


def test_clients_outside_the_groups_or_without_token_are_refused(daemon, admin):
    value, _ = _grant(admin)
    os.chmod(daemon.tmp, 0o755)          # let nobody reach the socket's directory
    # Member of the client group (nogroup here) without a token: must present one.
    status, msg = _as_nobody(daemon.socket, None, 65534)
    assert status == 401 and "token" in msg
    # ...with a token: allowed.
    assert _as_nobody(daemon.socket, value, 65534)[0] == 200
    # Outside the groups: the socket's mode (0660, group nogroup) refuses the connect.
    status, msg = _as_nobody(daemon.socket, value, 1)
    assert status == 0 and "Permission denied" in msg
    # Even if the socket were world-writable, the daemon's own SO_PEERCRED check refuses.
    os.chmod(daemon.socket, 0o666)
    try:
        status, msg = _as_nobody(daemon.socket, value, 1)
        assert status == 403 and "neither root" in msg
    finally:
        os.chmod(daemon.socket, 0o660)


def test_tokens_never_appear_in_logs_ps_or_audit(daemon, admin):
    value, _ = _grant(admin)
    env = dict(os.environ, SANDBOXD_TOKEN=value)
    ps = subprocess.run([sys.executable, "-m", "sandbox.cli.main", "ps", "--socket", daemon.socket],
                        env=env, capture_output=True, text=True, timeout=60)
    assert ps.returncode == 0, ps.stderr
    bad = subprocess.run([sys.executable, "-m", "sandbox.cli.main", "ps", "--socket", daemon.socket],
                         env=dict(env, SANDBOXD_TOKEN=value[:-4] + "AAAA"), capture_output=True,
                         text=True, timeout=60)
    assert bad.returncode == 2 and "invalid token" in bad.stderr
    secret = value.split("_", 2)[2]
    admin.audit(limit=1)
    for blob in [ps.stdout, ps.stderr, bad.stderr, daemon.log.read_text(),
                 (daemon.state / "tokens.json").read_text(),
                 *[f.read_text() for f in (daemon.state / "audit").glob("audit-*.jsonl")]]:
        assert secret not in blob and secret[:-4] not in blob


def test_daemon_survives_bad_input(daemon, admin):
    def raw(data: bytes) -> bytes:
        s = socket.socket(socket.AF_UNIX)
        s.settimeout(10)
        s.connect(daemon.socket)
        s.sendall(data)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
        s.close()
        return out
    assert b" 400 " in raw(b"POST /v1/sandboxes HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
                           b"Connection: close\r\n\r\n{oops")[:20]
    assert b" 401 " in raw(b"GET /v1/sandboxes HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                           b"sbxd_000000000000_" + b"A" * 43 + b"\r\nConnection: close\r\n\r\n")[:20]
    assert b" 404 " in raw(b"GET /v1/sandboxes/..%2f..%2fetc HTTP/1.1\r\nHost: x\r\n"
                           b"Connection: close\r\n\r\n")[:20]
    idle = [socket.socket(socket.AF_UNIX) for _ in range(200)]
    try:
        for s in idle:
            s.connect(daemon.socket)
        assert admin.health()["status"] == "ok"
    finally:
        for s in idle:
            s.close()
    assert admin.health()["status"] == "ok"


def _ctl(daemon, *argv, env=None, input=None):
    e = {k: v for k, v in os.environ.items() if k != "SANDBOXD_TOKEN"}
    e.update(env or {})
    return subprocess.run([sys.executable, "-m", "sandbox.cli.main", *argv], env=e, input=input,
                          capture_output=True, text=True, timeout=120)


def test_cli_flow_with_a_token_file(daemon, admin, tmp_path):
    tok_file = tmp_path / "token"
    out = _ctl(daemon, "token", "--socket", daemon.socket, "grant", "--name", "cli",
               "--memory", "1GiB", "--policy", TEST_POLICY, "--out", str(tok_file))
    assert out.returncode == 0, out.stderr
    assert oct(tok_file.stat().st_mode & 0o777) == "0o600"
    value = tok_file.read_text().strip()
    assert value not in out.stdout
    common = ["--socket", daemon.socket, "--token-file", str(tok_file)]
    sid = _ctl(daemon, "create", *common, "--policy", TEST_POLICY,
               "--set", "limits.memory=512MiB").stdout.strip()
    assert sid.startswith("sb-")
    (tmp_path / "proj").mkdir()
    (tmp_path / "proj" / "hello.sh").write_text("echo hello from $(hostname)\n")
    assert _ctl(daemon, "cp", *common, str(tmp_path / "proj"), f"{sid}:src").returncode == 0
    ex = _ctl(daemon, "exec", *common, sid, "sh", "-c", "sh src/hello.sh > out.txt; cat out.txt; exit 6")
    assert ex.returncode == 6 and ex.stdout == "hello from sandbox\n", ex.stderr
    assert _ctl(daemon, "cp", *common, f"{sid}:out.txt", str(tmp_path)).returncode == 0
    assert (tmp_path / "out.txt").read_text() == "hello from sandbox\n"
    ps = _ctl(daemon, "ps", *common)
    assert sid in ps.stdout and value.split("_")[1] in ps.stdout and value not in ps.stdout
    top = _ctl(daemon, "top", *common, "--iterations", "2", "--interval", "0.1")
    assert top.returncode == 0 and top.stdout.count(sid) == 2, top.stdout + top.stderr
    assert _ctl(daemon, "destroy", *common, sid).returncode == 0
    gone = _ctl(daemon, "inspect", *common, sid)
    assert gone.returncode == 2 and len(gone.stderr.strip().splitlines()) == 1


def test_run_goes_through_the_daemon(daemon, admin):
    before = len(admin.audit(action="daemon_create", limit=10000))
    out = _ctl(daemon, "run", "--policy", TEST_POLICY, "--", "sh", "-c", "echo via daemon; exit 7",
               env={"SANDBOXD_SOCKET": daemon.socket})
    assert out.returncode == 7 and out.stdout == "via daemon\n", out.stderr
    assert len(admin.audit(action="daemon_create", limit=10000)) == before + 1
    assert wait_until(lambda: admin.list() == [])
