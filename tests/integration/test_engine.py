"""The engine's behaviour on the real kernel: status passthrough, ownership, uid ranges,
destroy, unwinding, and the plan fields other facilities fill in (C paths)."""
import os
import secrets
import signal
import struct
import subprocess
from pathlib import Path

import pytest

from sandbox.errors import PolicyError, SandboxError, SpawnError
from sandbox.runtime import sandbox as sbmod
from sandbox.runtime import uidrange
from sandbox.runtime.lifecycle import Step
from tests.helpers.engine import (SANDBOXCTL, host_sleeper, make_sandbox,  # noqa: F401
                                  policy_file, run, sh, state_dir, tag, engine_policy)


def ctl(state_dir, *args, **kw):
    pol = policy_file(state_dir.parent)
    return subprocess.run([SANDBOXCTL, "run", "--state-dir", str(state_dir), "--policy", pol, *args],
                          capture_output=True, timeout=60, **kw)


def test_cli_passes_exit_status_signal_stdin_and_timeout(state_dir):
    assert ctl(state_dir, "--", "sh", "-c", "exit 7").returncode == 7
    r = ctl(state_dir, "--", "sh", "-c", "kill -USR1 $$")
    assert r.returncode == 128 + signal.SIGUSR1
    payload = secrets.token_hex(8).encode()
    r = ctl(state_dir, "--", "sh", "-c", "cat; echo to-err >&2", input=payload)
    assert r.stdout == payload and r.stderr == b"to-err\n" and r.returncode == 0
    r = ctl(state_dir, "--timeout", "1", "--", "sleep", "30")
    assert r.returncode == 128 + signal.SIGKILL
    assert b"time limit" in r.stderr
    r = ctl(state_dir, "--env", "NOT_ALLOWED_X=1", "--", "true")
    assert r.returncode == 2 and b"NOT_ALLOWED_X" in r.stderr and b"Traceback" not in r.stderr
    assert not list((state_dir / "sandboxes").iterdir())  # every run destroyed its sandbox
    assert os.listdir(state_dir / "etc") == []   # each run's /etc view went when it exited


def test_host_workspace_stays_owned_by_its_owner(make_sandbox, tmp_path):
    ws = tmp_path / f"{tag()}-ws"
    ws.mkdir()
    os.chown(ws, 4242, 4243)
    pol = engine_policy({"limits": {"host_workspace": "unbounded"}})
    sb = make_sandbox(pol, workspace=str(ws))
    res = sh(sb, "stat -c %u:%g .; echo data > made-inside; mkdir dir-inside; "
                 "stat -c %u:%g made-inside")
    assert res.exit_code == 0, res.stderr
    assert res.stdout.split() == [b"1000:1000", b"1000:1000"]  # the agent's, inside
    for name in ("made-inside", "dir-inside"):
        st = (ws / name).stat()
        assert (st.st_uid, st.st_gid) == (4242, 4243)  # the owner's, on the host


def test_two_live_sandboxes_get_different_host_uid_ranges(make_sandbox):
    a, b = make_sandbox(), make_sandbox()
    maps = [Path(f"/proc/{s.init_pid}/uid_map").read_text().split() for s in (a, b)]
    assert maps[0][1] != maps[1][1]
    for s, m in zip((a, b), maps):
        assert m == ["0", str(s.ctx.uidrange.base), "65536"]
        uid = Path(f"/proc/{s.init_pid}/status").read_text().split("Uid:")[1].split()[0]
        assert int(uid) == s.ctx.uidrange.base + 1000  # the agent, as the host sees it
    assert abs(a.ctx.uidrange.base - b.ctx.uidrange.base) >= 65536


def test_destroy_leaves_nothing(state_dir):
    sb = sbmod.Sandbox.create(engine_policy(), state_dir=state_dir)
    pidfds = []
    try:
        r = sh(sb, "sleep 300 >/dev/null 2>&1 & echo $!")
        assert r.exit_code == 0
        mine = os.readlink(f"/proc/{sb.init_pid}/ns/pid")
        for p in os.listdir("/proc"):
            try:
                if p.isdigit() and os.readlink(f"/proc/{p}/ns/pid") == mine:
                    pidfds.append(os.pidfd_open(int(p)))
            except OSError:
                pass
        assert len(pidfds) >= 2  # init and the background sleep
        rec, ws, base = sb.ctx.intent.path, Path(sb.ctx.workspace_host), sb.ctx.uidrange.base
        assert rec.exists() and ws.exists() and uidrange.in_use(state_dir, base)
    finally:
        report = sb.destroy()
    assert report["leftovers"] == []
    assert not rec.exists() and not ws.exists()
    assert not list((state_dir / "sandboxes").iterdir())
    assert not uidrange.in_use(state_dir, base)
    for fd in pidfds:  # a pidfd polls readable once its process is gone
        assert sbmod._wait_pidfd(fd, 5.0)
        os.close(fd)
    with open("/proc/self/mountinfo") as f:
        assert str(state_dir) not in f.read()


def _spy(monkeypatch, name):
    seen = {}
    orig = getattr(sbmod, name)

    def wrapper(ctx):
        seen["ctx"] = ctx
        return orig(ctx)
    monkeypatch.setattr(sbmod, name, wrapper)
    return seen


def _assert_unwound(ctx, state_dir):
    assert not ctx.intent.path.exists() and not list((state_dir / "sandboxes").iterdir())
    assert ctx.workspace_host is None or not Path(ctx.workspace_host).exists()
    assert not uidrange.in_use(state_dir, ctx.uidrange.base)
    if ctx.cgroup is not None:
        assert not any(p.exists() for p in ctx.cgroup.paths())


def test_failure_at_a_middle_step_unwinds_the_earlier_ones(state_dir, monkeypatch):
    seen = _spy(monkeypatch, "_rootfs_step")

    def failing_spawn(ctx):
        def do():
            raise SandboxError("injected by the test", step="spawn")
        return Step("spawn", do)
    monkeypatch.setattr(sbmod, "_spawn_step", failing_spawn)
    with pytest.raises(SandboxError, match="injected"):
        sbmod.Sandbox.create(engine_policy(), state_dir=state_dir)
    assert seen["ctx"].uidrange is not None  # earlier steps had run
    _assert_unwound(seen["ctx"], state_dir)


def test_a_failure_in_the_c_child_is_one_clear_error_and_unwinds(state_dir, monkeypatch):
    seen = _spy(monkeypatch, "_rootfs_step")
    with pytest.raises(SpawnError) as ei:
        sbmod.Sandbox.create(engine_policy(), state_dir=state_dir, _fail_in_child=True)
    e = ei.value
    assert (e.step, e.syscall, e.errno) == ("test", "injected", 1)
    assert "failure injected by a test" in str(e) and "EPERM" in str(e)
    _assert_unwound(seen["ctx"], state_dir)


def test_lifetime_timeout_kills_the_sandbox(make_sandbox):
    pol = engine_policy({"timeout": "2s", "command_timeout": "2s"})
    sb = make_sandbox(pol)
    res = run(sb, ["sleep", "60"], timeout=60)
    assert res.reason == "timeout" and "lifetime" in res.text
    with pytest.raises(SandboxError, match="not running"):
        run(sb, ["true"])


def test_environment_allowlist(make_sandbox):
    sb = make_sandbox()
    res = sh(sb, "echo $TZ", env={"TZ": "UTC"})
    assert res.stdout == b"UTC\n"
    with pytest.raises(PolicyError, match="SBXT_NOT_ALLOWED"):
        sh(sb, "true", env={"SBXT_NOT_ALLOWED": "x"})


# ---- plan fields filled by other facilities: the C paths, with hand-made producers -----

def _without(monkeypatch, *modules):
    monkeypatch.setattr(sbmod, "FACILITY_MODULES",
                        tuple(m for m in sbmod.FACILITY_MODULES if m not in modules))


def _bpf(nr: int, action: int) -> bytes:
    """seccomp_data.nr == nr ? action : ALLOW (x86_64 only: the arch is checked too)."""
    ld_w_abs, jeq_k, ret_k = 0x20, 0x15, 0x06
    ins = [(ld_w_abs, 0, 0, 4), (jeq_k, 1, 0, 0xC000003E), (ret_k, 0, 0, 0),  # AUDIT_ARCH_X86_64
           (ld_w_abs, 0, 0, 0), (jeq_k, 0, 1, nr), (ret_k, 0, 0, action),
           (ret_k, 0, 0, 0x7FFF0000)]
    return b"".join(struct.pack("=HBBI", *i) for i in ins)


SYS_MKDIR = 83


def test_seccomp_filter_is_installed_last_before_execve(make_sandbox, monkeypatch):
    _without(monkeypatch, "sandbox.kernel.seccomp")
    sb = make_sandbox(plan_fields={"seccomp_bpf": _bpf(SYS_MKDIR, 0x00050000 | 1)})  # ERRNO(EPERM)
    res = sh(sb, "mkdir /tmp/d; echo rc=$?; grep Seccomp: /proc/self/status")
    assert b"Operation not permitted" in res.stderr and b"rc=1" in res.stdout
    assert b"Seccomp:\t2" in res.stdout


def test_seccomp_notify_listener_reaches_the_parent(make_sandbox, monkeypatch):
    _without(monkeypatch, "sandbox.kernel.seccomp")
    import sandbox.runtime.supervisor as supervisor
    monkeypatch.setattr(supervisor, "make_step", lambda ctx: None)  # this test is the listener
    got = []

    def handler(fd, pid):
        got.append((os.readlink(f"/proc/self/fd/{fd}"), pid))
        os.close(fd)  # nobody answers: the notified call fails with ENOSYS
    sb = make_sandbox(plan_fields={"seccomp_bpf": _bpf(SYS_MKDIR, 0x7FC00000),  # USER_NOTIF
                                   "seccomp_notify": True}, seccomp_listener=handler)
    res = sh(sb, "mkdir /tmp/d; echo rc=$?")
    assert len(got) == 1 and "seccomp" in got[0][0]
    assert b"rc=1" in res.stdout and b"not implemented" in res.stderr.lower()


@pytest.fixture
def netns():
    name = f"{tag()}-ns"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        yield f"/run/netns/{name}"
    finally:
        subprocess.run(["ip", "netns", "delete", name], check=True)


def test_netns_fd_joins_that_namespace_and_restores_the_thread(make_sandbox, netns):
    before = os.readlink("/proc/thread-self/ns/net")
    fd = os.open(netns, os.O_RDONLY | os.O_CLOEXEC)
    try:
        sb = make_sandbox(plan_fields={"netns_fd": fd})
    finally:
        os.close(fd)
    assert os.readlink("/proc/thread-self/ns/net") == before
    inside = os.readlink(f"/proc/{sb.init_pid}/ns/net")
    assert inside == f"net:[{os.stat(netns).st_ino}]" and inside != before


@pytest.fixture
def cgroups():
    v2 = Path(f"/sys/fs/cgroup/unified/{tag()}-eng")
    v1 = Path(f"/sys/fs/cgroup/pids/{tag()}-eng")
    v2.mkdir()
    v1.mkdir()
    try:
        yield v2, v1
    finally:
        for d in (v2, v1):
            for _ in range(50):
                try:
                    d.rmdir()
                    break
                except OSError:
                    import time
                    time.sleep(0.1)  # the killed init leaves the cgroup asynchronously


def test_cgroup_fields_place_init_before_it_runs(make_sandbox, monkeypatch, cgroups):
    _without(monkeypatch, "sandbox.kernel.cgroups")
    v2, v1 = cgroups
    fd = os.open(v2, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        sb = make_sandbox(plan_fields={"cgroup2_fd": fd,
                                       "cgroup_v1_tasks": [str(v1 / "tasks")]})
    finally:
        os.close(fd)
    assert str(sb.init_pid) in (v2 / "cgroup.procs").read_text().split()
    assert str(sb.init_pid) in (v1 / "cgroup.procs").read_text().split()
    sb.destroy()


def test_doctor_reports_features_and_a_working_spawn():
    r = subprocess.run([SANDBOXCTL, "doctor"], capture_output=True, text=True, timeout=120)
    rows = {line[6:].split("  ")[0].strip(): line[:4] for line in r.stdout.splitlines()}
    for feature in ("user namespaces", "clone3", "pidfd", "CLONE_INTO_CGROUP",
                    "idmapped mounts", "seccomp actions", "sandbox spawn"):
        assert rows.get(feature) == "ok  ", (feature, r.stdout, r.stderr)
    assert r.returncode == (0 if all(v == "ok  " for v in rows.values()) else 1)


def test_init_forwards_sigterm_and_reaps_orphans(make_sandbox):
    import asyncio

    async def scenario(sb):
        seen, listed = [], asyncio.Event()

        def on_output(stream, data):
            seen.append(data)
            if b"listed" in b"".join(seen):
                listed.set()
        task = asyncio.ensure_future(sb.exec(
            ["sh", "-c", "sh -c 'true &'; sleep 0.2; "   # an orphan for init to reap
                         "grep -l '^State:.*Z' /proc/[0-9]*/status; echo listed; "
                         "exec sleep 60"], on_output=on_output))
        await asyncio.wait_for(listed.wait(), 30)
        for _ in range(100):  # bounded: until `exec sleep 60` replaced the shell
            if _sleeping_in(sb):
                break
            await asyncio.sleep(0.05)
        signal.pidfd_send_signal(sb.pidfd, signal.SIGTERM)  # to init, from the host
        return await task, b"".join(seen)
    sb = make_sandbox()
    res, out = asyncio.run(scenario(sb))
    assert b"/status" not in out  # no zombie: init reaped the orphan
    assert (res.reason, res.signal) == ("signaled", signal.SIGTERM)
    assert res.status == 128 + signal.SIGTERM
    assert run(sb, ["true"]).exit_code == 0  # init itself lives on


def _sleeping_in(sb) -> bool:
    mine = os.readlink(f"/proc/{sb.init_pid}/ns/pid")
    for p in os.listdir("/proc"):
        try:
            if (p.isdigit() and os.readlink(f"/proc/{p}/ns/pid") == mine
                    and Path(f"/proc/{p}/comm").read_text().strip() == "sleep"):
                return True
        except OSError:
            pass
    return False


def test_stdin_bytes_kill_and_freeze_without_a_cgroup(make_sandbox, monkeypatch):
    from sandbox.errors import UnsupportedError
    _without(monkeypatch, "sandbox.kernel.cgroups")
    sb = make_sandbox()
    assert run(sb, ["cat"], stdin=b"abc" * 50000).stdout == b"abc" * 50000
    with pytest.raises(UnsupportedError):
        sb.freeze()
    sb.kill()  # no cgroup: SIGKILL to init ends the pid namespace
    assert sbmod._wait_pidfd(sb.pidfd, 10.0)
    with pytest.raises(SandboxError, match="killed by the operator"):
        run(sb, ["true"])


def test_shared_is_rw_with_incoming_outgoing_and_context_is_read_only(make_sandbox, tmp_path):
    shared, context = tmp_path / f"{tag()}-shared", tmp_path / f"{tag()}-context"
    shared.mkdir()
    context.mkdir()
    os.chown(shared, 4242, 4243)
    (context / "input.txt").write_text("given")
    sb = make_sandbox(shared=str(shared), context=str(context))
    res = sh(sb, "cat /home/agent/context/input.txt; echo; "
                 "echo x > /home/agent/context/new || echo CONTEXT-RO; "
                 "echo out > /home/agent/shared/outgoing/result && echo SHARED-RW; "
                 "ls /home/agent/shared")
    assert res.stdout.split() == [b"given", b"CONTEXT-RO", b"SHARED-RW", b"incoming", b"outgoing"]
    st = (shared / "outgoing" / "result").stat()
    assert (st.st_uid, st.st_gid) == (4242, 4243)
    assert not (context / "new").exists()


def test_keep_workspace_survives_destroy(state_dir):
    import shutil
    sb = sbmod.Sandbox.create(engine_policy(), state_dir=state_dir, keep_workspace=True)
    try:
        assert sh(sb, "echo kept > result").exit_code == 0
        ws = Path(sb.ctx.workspace_host)
    finally:
        sb.destroy()
    try:
        assert (ws / "result").read_text() == "kept\n"
        assert not sb.ctx.intent.path.exists()  # everything else is gone
    finally:
        shutil.rmtree(ws, ignore_errors=True)


def test_a_root_owned_host_workspace_is_refused(make_sandbox, tmp_path, state_dir):
    # the agent could chmod u+s a file there: a setuid-root program on the host
    ws = tmp_path / f"{tag()}-rootws"
    ws.mkdir()
    pol = engine_policy({"limits": {"host_workspace": "unbounded"}})
    with pytest.raises(PolicyError, match="owned by root"):
        make_sandbox(pol, workspace=str(ws))
    assert not list((state_dir / "sandboxes").iterdir())  # nothing left of the attempt


def test_cli_without_root_is_one_clear_line(state_dir):
    r = subprocess.run(["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups",
                        SANDBOXCTL, "run", "--", "true"], capture_output=True, timeout=60)
    assert r.returncode == 2
    assert r.stderr.decode().count("\n") == 1 and b"needs root" in r.stderr


def test_spawn_from_a_busy_multithreaded_process_never_hangs(state_dir):
    """The daemon clones sandboxes while its other threads come and go. The clone3 child
    inherits glibc's list of those threads; glibc's setresuid() wrapper then waits for a
    thread that was being created at clone time and never exists in the child (seen: a child
    hung forever in setxid_mark_thread, holding the daemon's fds). The child must use raw
    syscalls; this would hang (and fail at the spawn timeout) without that."""
    import threading

    from sandbox.runtime.sandbox import Sandbox
    from tests.helpers.engine import engine_policy

    stop = threading.Event()

    def churn():  # keep threads in the middle of being created
        while not stop.is_set():
            ts = [threading.Thread(target=lambda: None) for _ in range(8)]
            for t in ts:
                t.start()
            for t in ts:
                t.join()

    churners = [threading.Thread(target=churn) for _ in range(2)]
    for t in churners:
        t.start()
    try:
        for _ in range(25):
            Sandbox.create(engine_policy(), state_dir=state_dir).destroy()
    finally:
        stop.set()
        for t in churners:
            t.join()


def _etc_mount(pid: int) -> list[str]:
    """The /etc mount as the sandbox sees it: mountinfo fields (3: its source directory on
    the host filesystem, 5: per-mount options)."""
    with open(f"/proc/{pid}/mountinfo") as f:
        found = [line.split() for line in f if line.split()[4] == "/etc"]
    assert len(found) == 1, found
    return found[0]


ETC_WRITES = r"""
import errno, os
for what, fn in (("append", lambda: open("/etc/passwd", "a")),
                 ("create", lambda: open("/etc/new-file", "w")),
                 ("mkdir", lambda: os.mkdir("/etc/newdir")),
                 ("chmod", lambda: os.chmod("/etc/hosts", 0o666)),
                 ("unlink", lambda: os.unlink("/etc/resolv.conf")),
                 ("rename", lambda: os.rename("/etc/hostname", "/etc/h2"))):
    try:
        fn()
        print(what, "WROTE")
    except OSError as e:
        print(what, errno.errorcode[e.errno])
"""


def test_etc_is_one_shared_read_only_view_per_content(make_sandbox, state_dir):
    """Sandboxes of one policy share one generated /etc on the host (written once): it is
    mounted read-only, nosuid, nodev, noexec, its files belong to host root, and nothing a
    sandbox tries changes it for another. Other content gets another view."""
    a, b = make_sandbox(), make_sandbox()
    ma, mb = _etc_mount(a.init_pid), _etc_mount(b.init_pid)
    view = Path(ma[3])
    assert mb[3] == ma[3] and view.parent.parent == state_dir / "etc"
    assert {"ro", "nosuid", "nodev", "noexec"} <= set(ma[5].split(","))
    st = view.stat()
    assert (st.st_uid, st.st_mode & 0o7777) == (0, 0o755)
    files = {p.name: p.read_bytes() for p in view.iterdir() if p.is_file()}
    assert {"passwd", "group", "hosts", "hostname", "resolv.conf", "nsswitch.conf"} <= set(files)
    for name in files:
        st = (view / name).stat()
        assert (st.st_uid, st.st_mode & 0o7777) == (0, 0o644), name
    res = run(a, ["/usr/bin/python3", "-c", ETC_WRITES])
    assert res.exit_code == 0, res.stderr
    lines = res.stdout.decode().split("\n")
    assert len([l for l in lines if l]) == 6 and "WROTE" not in res.stdout.decode(), lines
    assert all(l.endswith(("EROFS", "EACCES", "EPERM")) for l in lines if l), lines
    assert {p.name: p.read_bytes() for p in view.iterdir() if p.is_file()} == files
    assert sh(b, "cat /etc/hostname").stdout == b"sandbox\n"
    c = make_sandbox(engine_policy({"hostname": "other-host"}))
    assert _etc_mount(c.init_pid)[3] != ma[3]
    assert sh(c, "cat /etc/hostname").stdout == b"other-host\n"
    # the root mount point: one shared directory, empty on the host while sandboxes run on it
    assert a.ctx.plan.root == b.ctx.plan.root == c.ctx.plan.root == str(state_dir / "newroot")
    assert os.listdir(a.ctx.plan.root) == []


def test_unused_etc_views_are_removed_beyond_the_idle_bound(make_sandbox, state_dir, monkeypatch):
    from sandbox.kernel import mounts
    monkeypatch.setattr(mounts, "ETC_IDLE", 0)
    sb = make_sandbox()
    view = Path(_etc_mount(sb.init_pid)[3])
    other = make_sandbox(engine_policy({"hostname": "other-host"}))
    sb.destroy()
    assert not view.exists()                     # its last user went: nothing keeps it
    assert Path(_etc_mount(other.init_pid)[3]).is_dir()   # a view in use stays
    assert sh(other, "cat /etc/hostname").stdout == b"other-host\n"


def test_recovery_removes_etc_views_of_dead_processes_only(make_sandbox, state_dir):
    from sandbox.runtime.recovery import recover
    sb = make_sandbox()
    mine = Path(_etc_mount(sb.init_pid)[3])
    dead = state_dir / "etc" / "999999999-1"     # above any pid_max: a process that is gone
    (dead / "0123abcd").mkdir(parents=True)
    (dead / "0123abcd" / "passwd").write_text("x\n")
    rep = recover(state_dir)
    assert rep.ok and rep.orphans == [f"etc({dead})"] and not dead.exists()
    assert mine.is_dir() and rep.skipped_live == [sb.id]
    assert sh(sb, "cat /etc/hostname").exit_code == 0
