"""The daemon's HTTP layer against a stand-in engine: auth, visibility, bad input, release.

Kernel behaviour (freeze, kill, real output) is in tests/integration/test_daemon*.py.
"""
import json
import socket
import sys
import time
from pathlib import Path

import pytest

from sandbox.errors import SandboxError

sys.path.insert(0, str(Path(__file__).parent))
from daemon_fakes import BLOCK, REDACT, DaemonThread  # noqa: E402

from sandbox.client import Client, DaemonError  # noqa: E402


@pytest.fixture
def d():
    with DaemonThread(header_timeout=0.5, idle_timeout=2.0, max_connections=50) as dt:
        yield dt


@pytest.fixture
def admin(d):
    with Client(d.socket) as c:
        yield c


def _token(admin, **kw):
    t = admin.grant_token(**kw)
    return t["token"], t["id"]


def raw(d, data: bytes, shut: bool = False) -> bytes:
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(5)
    s.connect(d.socket)
    s.sendall(data)
    if shut:
        s.shutdown(socket.SHUT_WR)
    out = b""
    while chunk := s.recv(65536):
        out += chunk
    s.close()
    return out


def test_sandbox_operations_need_a_token_even_for_listing(d, admin):
    value, _ = _token(admin)
    with Client(d.socket, token=value + "x") as bad:
        with pytest.raises(DaemonError) as e:
            bad.list()
    assert e.value.status == 401 and value not in str(e.value)


def test_other_tokens_sandbox_is_not_found(d, admin):
    a, _ = _token(admin, name="a")
    b, _ = _token(admin, name="b")
    with Client(d.socket, token=a) as ca, Client(d.socket, token=b) as cb:
        sid = ca.create()["id"]
        for op in (lambda: cb.inspect(sid), lambda: cb.destroy(sid),
                   lambda: cb.exec(sid, ["echo", "x"]), lambda: cb.get_file(sid, "f"),
                   lambda: cb.put_file(sid, "f", b"x"), lambda: cb.freeze(sid)):
            with pytest.raises(DaemonError) as e:
                op()
            assert e.value.status == 404
        assert cb.list() == [] and [s["id"] for s in ca.list()] == [sid]
        assert sid in [s["id"] for s in admin.list()]


def test_tokens_cannot_administer(d, admin):
    a, tid = _token(admin)
    with Client(d.socket, token=a) as ca:
        for op in (lambda: ca.grant_token(), lambda: ca.revoke_token(tid), ca.kill_all,
                   ca.metrics, ca.list_tokens):
            with pytest.raises(DaemonError) as e:
                op()
            assert e.value.status == 403


def test_token_bounds_and_sandbox_count(d, admin):
    a, _ = _token(admin, max_sandboxes=1, ceiling={"memory": "1GiB"})
    with Client(d.socket, token=a) as ca:
        with pytest.raises(DaemonError) as e:
            ca.create()                   # the default policy's 4GiB is above the ceiling
        assert e.value.status == 403 and "limits.memory" in e.value.message
        ca.create(overrides={"limits": {"memory": "512MiB"}})
        with pytest.raises(DaemonError) as e:
            ca.create(overrides={"limits": {"memory": "512MiB"}})
        assert e.value.status == 429
        for bad in ({"scanner": {"rules": []}}, {"seccomp": {"groups": ["@all"]}},
                    {"filesystem": {"ro_binds": ["/"]}}):
            with pytest.raises(DaemonError) as e:
                ca.create(overrides=bad)
            assert e.value.status == 401 or e.value.status == 403
        with pytest.raises(DaemonError) as e:
            ca.create(policy="../../etc/passwd")
        assert e.value.status == 400


def test_revoke_kills_only_that_tokens_sandboxes(d, admin):
    a, aid = _token(admin)
    b, _ = _token(admin)
    with Client(d.socket, token=a) as ca, Client(d.socket, token=b) as cb:
        sa = ca.create()["id"]
        sb = cb.create()["id"]
        out = admin.revoke_token(aid)
        assert out["killed"] == 1
        assert d.engine.handles[sa].killed and not d.engine.handles[sb].killed
        with pytest.raises(DaemonError) as e:
            ca.list()
        assert e.value.status == 401 and "revoked" in e.value.message
        assert [s["id"] for s in cb.list()] == [sb]


def test_revoke_that_cannot_be_saved_is_refused_and_killed_but_not_acknowledged(d, admin):
    a, aid = _token(admin)
    with Client(d.socket, token=a) as ca:
        sa = ca.create()["id"]

        def broken_save():
            raise OSError(28, "No space left on device")
        d.daemon.tokens.save = broken_save
        with pytest.raises(DaemonError) as e:
            admin.revoke_token(aid)
        assert e.value.status == 503 and e.value.kind == "NotDurable"
        assert d.engine.handles[sa].killed                   # killed all the same
        with pytest.raises(DaemonError) as e:
            ca.list()
        assert e.value.status == 401                          # and refused in memory
        del d.daemon.tokens.save                              # the disk is back: the retry
        assert admin.revoke_token(aid)["killed"] == 0         # ... saves the revocation
        saved = json.loads(d.config.tokens_path.read_text())["tokens"]
        assert [t["revoked"] is not None for t in saved if t["id"] == aid] == [True]


def _failing_kill(d):
    """_kill_now as when the processes do not go in time: marked destroying, then raises."""
    async def kill_now(recs):
        for r in recs:
            r.state = "destroying"
        raise SandboxError("1 sandbox(es) still had processes 30 s after SIGKILL")
    d.daemon._kill_now = kill_now


def _records(d, action) -> list[dict]:
    """The daemon's audit records of `action` (its sink here is in memory)."""
    return [r for r in d.audit.records if r["action"] == action]


def _all_destroyed(d, ids) -> bool:
    for _ in range(100):
        if all(d.engine.handles[i].destroyed for i in ids):
            return True
        time.sleep(0.05)
    return False


def test_a_kill_switch_whose_kill_times_out_still_tears_down_and_records_it(d, admin):
    a, _ = _token(admin)
    with Client(d.socket, token=a) as ca:
        ids = [ca.create()["id"], ca.create()["id"]]
    _failing_kill(d)
    with pytest.raises(DaemonError) as e:
        admin.kill_all()
    assert e.value.status >= 500
    assert _all_destroyed(d, ids)                 # not left "destroying" forever
    assert admin.list() == []
    rec = _records(d, "daemon_kill_all")
    assert rec and rec[-1]["outcome"] == "error"


def test_an_expiry_whose_kill_times_out_still_tears_down_and_records_it(d, admin):
    a, _ = _token(admin, ttl=0.5)
    with Client(d.socket, token=a) as ca:
        sid = ca.create()["id"]
    _failing_kill(d)
    assert _all_destroyed(d, [sid])
    assert admin.list() == []
    for _ in range(100):
        rec = _records(d, "token_expire")
        if rec:
            break
        time.sleep(0.05)
    assert rec and rec[-1]["outcome"] == "error"


def test_expiry_kills_the_tokens_sandboxes(d, admin):
    a, _ = _token(admin, ttl=0.5)
    b, _ = _token(admin)
    with Client(d.socket, token=a) as ca, Client(d.socket, token=b) as cb:
        sa = ca.create()["id"]
        sb = cb.create()["id"]
        for _ in range(100):
            if d.engine.handles[sa].destroyed:
                break
            time.sleep(0.05)
        assert d.engine.handles[sa].killed and d.engine.handles[sa].destroyed
        assert not d.engine.handles[sb].killed
        assert [s["id"] for s in admin.list()] == [sb]


def test_output_is_redacted_and_blocks_hold(d, admin):
    a, _ = _token(admin)
    with Client(d.socket, token=a) as ca:
        sid = ca.create()["id"]
        r = ca.exec(sid, ["echo", "one", "a" + REDACT.decode() + "b"])
        assert r.stdout == b"one\na[REDACTED]b\n" and r.findings[0]["action"] == "redact"
        r = ca.exec(sid, ["echo", "before", BLOCK.decode(), "after"])
        assert r.held and r.reason == "held"
        assert BLOCK not in r.stdout and b"after" not in r.stdout
        assert d.engine.handles[sid].frozen
        assert ca.inspect(sid)["state"] == "held"
        with pytest.raises(DaemonError) as e:
            ca.exec(sid, ["echo", "x"])
        assert e.value.status == 409
        with pytest.raises(DaemonError) as e:
            ca.resume(sid)                 # only an operator releases a hold
        assert e.value.status == 403
        admin.resume(sid)
        assert not d.engine.handles[sid].frozen and ca.inspect(sid)["state"] == "running"


def test_files_are_scanned_and_confined(d, admin):
    a, _ = _token(admin)
    with Client(d.socket, token=a) as ca:
        sid = ca.create()["id"]
        ws = Path(d.engine.handles[sid].workspace)
        ca.put_file(sid, "dir/x.txt", b"hello " + REDACT)
        assert ca.get_file(sid, "dir/x.txt") == b"hello [REDACTED]"
        assert {e["name"] for e in ca.list_files(sid)} == {"dir"}
        (ws.parent / f"secret-{sid}").write_text("host file")
        (ws / "esc").symlink_to(ws.parent / f"secret-{sid}")
        (ws / "abs").symlink_to("/etc/hostname")
        for path in ("../x", "/etc/passwd", "esc", "abs", "dir/../../x"):
            with pytest.raises(DaemonError) as e:
                ca.get_file(sid, path)
            assert e.value.status == 400, path
        with pytest.raises(DaemonError) as e:
            ca.put_file(sid, "esc", b"overwrite")
        assert e.value.status == 400
        assert (ws.parent / f"secret-{sid}").read_text() == "host file"
        import os
        os.mkfifo(ws / "fifo")
        with pytest.raises(DaemonError) as e:
            ca.get_file(sid, "fifo")          # a FIFO would hang a naive reader
        assert e.value.status == 400
        (ws / "leak").write_bytes(b"x" + BLOCK)
        with pytest.raises(DaemonError) as e:
            ca.get_file(sid, "leak")
        assert e.value.status == 409 and ca.inspect(sid)["state"] == "held"


@pytest.mark.parametrize("body,status", [
    (b"{not json", 400), (b"[1,2]", 400), (b'{"policy": 3}', 400),
    (b'{"policy": "default", "bogus": 1}', 400), (b'{"overrides": "x"}', 400),
])
def test_malformed_bodies_are_refused(d, admin, body, status):
    out = raw(d, b"POST /v1/sandboxes HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body)
    assert out.startswith(b"HTTP/1.1 %d" % status), out[:200]
    assert json.loads(out.split(b"\r\n\r\n", 1)[1])["message"]


def test_oversized_and_garbage_requests_keep_the_daemon_serving(d, admin):
    big = b"x" * (2 * 1024**2)
    out = raw(d, b"POST /v1/tokens HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n"
              b"Connection: close\r\n\r\n" % len(big) + big)
    assert out.startswith(b"HTTP/1.1 413")
    assert raw(d, b"\x00\xffGARBAGE\r\n\r\n").split(b" ")[1] == b"400"
    assert raw(d, b"GET /v1/nothing HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").startswith(
        b"HTTP/1.1 404")
    assert admin.health()["status"] == "ok"


def test_slow_and_idle_clients_are_dropped_and_connections_bounded(d, admin):
    slow = socket.socket(socket.AF_UNIX)
    slow.settimeout(10)
    slow.connect(d.socket)
    slow.sendall(b"GET /v1/health HTTP/1.1\r\nHo")       # never finishes its headers
    assert slow.recv(100) == b""                         # closed by the daemon
    slow.close()
    idle = []
    try:
        for _ in range(60):                              # over max_connections=50
            s = socket.socket(socket.AF_UNIX)
            s.connect(d.socket)
            idle.append(s)
        idle[-1].settimeout(5)
        assert idle[-1].recv(100).startswith(b"HTTP/1.1 503")
    finally:
        for s in idle:
            s.close()
    for _ in range(50):
        try:
            assert admin.health()["status"] == "ok"
            break
        except DaemonError:
            time.sleep(0.1)


def test_metrics_count_states_creates_and_denials(d, admin):
    a, _ = _token(admin)
    with Client(d.socket, token=a) as ca:
        ca.create()
        with pytest.raises(DaemonError):
            Client(d.socket, token=a[:-3] + "zzz").list()
    text = admin.metrics()
    assert 'sandboxd_sandboxes{state="running"} 1' in text
    assert "sandboxd_create_seconds_count 1" in text
    assert 'sandboxd_denials_total{reason="auth"} 1' in text
