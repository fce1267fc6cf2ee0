"""From inside the sandbox, an attacker tries to gain privilege or act on the host."""
import os
import pty
import secrets
import select
import signal
import subprocess
import termios

from tests.helpers.engine import PY, SANDBOXCTL, compile_c, policy_file, py, run, sh, tag

CAP_FIELDS = ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")


def test_every_capability_set_is_empty(make_sandbox):
    sb = make_sandbox()
    res = sh(sb, "cat /proc/self/status; sleep 0 & cat /proc/1/status")
    assert res.exit_code == 0, res.stderr
    lines = [l.split(":\t") for l in res.stdout.decode().splitlines() if ":\t" in l]
    caps = [(k, v.strip()) for k, v in lines if k in CAP_FIELDS]
    assert len(caps) == 2 * len(CAP_FIELDS)  # the command and init
    assert all(v == "0000000000000000" for _, v in caps), caps
    fields = dict((k, v.strip()) for k, v in lines)
    assert fields["NoNewPrivs"] == "1"
    assert fields["Groups"] == ""  # host root's supplementary groups did not follow
    assert fields["Uid"].split() == ["1000"] * 4


def test_writes_outside_workspace_and_tmp_fail(make_sandbox):
    sb = make_sandbox()
    targets = ["/x", "/usr/x", "/etc/x", "/etc/passwd", "/home/agent/x", "/dev/x", "/bin/x",
               "/home/agent/context/x", "/proc/sys/kernel/hostname", "/proc/sysrq-trigger"]
    script = "; ".join(f"(echo 1 > {t}) 2>/dev/null && echo WROTE {t}" for t in targets)
    script += "; echo ok > /tmp/x && echo TMP; echo ok > /home/agent/workspace/x && echo WS"
    script += "; echo ok > /home/agent/shared/outgoing/x && echo SHARED"
    res = sh(sb, script)
    assert b"WROTE" not in res.stdout, res.stdout
    assert b"TMP" in res.stdout and b"WS" in res.stdout and b"SHARED" in res.stdout


MOUNT_ATTACK = r"""
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
MS_REMOUNT, MS_BIND, MS_RDONLY = 32, 4096, 1
def attempt(name, rc):
    print(name, "OK" if rc == 0 else "denied:%d" % ctypes.get_errno())
attempt("remount-root-rw", libc.mount(None, b"/", None, MS_REMOUNT, None))
attempt("remount-usr-rw", libc.mount(None, b"/usr", None, MS_REMOUNT | MS_BIND, None))
attempt("mount-tmpfs", libc.mount(b"none", b"/tmp", b"tmpfs", 0, None))
attempt("bind-root", libc.mount(b"/", b"/tmp", None, MS_BIND, None))
attempt("mount-proc", libc.mount(b"proc", b"/tmp", b"proc", 0, None))
attempt("umount-proc-mask", libc.umount2(b"/proc/kcore", 2))
os.mkdir("/tmp/newroot")
attempt("pivot_root", libc.syscall(155, b"/tmp", b"/tmp/newroot"))
attempt("chroot", libc.chroot(b"/tmp"))
"""


def test_mount_remount_pivot_root_are_refused(make_sandbox):
    sb = make_sandbox()
    res = py(sb, MOUNT_ATTACK)
    assert res.exit_code == 0, res.stderr
    lines = res.stdout.decode().split("\n")
    attempts = [l for l in lines if l]
    assert len(attempts) == 8, attempts
    assert all("denied:1" in l for l in attempts), attempts  # EPERM, each one
    # and / really is read-only, not just refused to be remounted
    assert b"Read-only file system" in sh(sb, "touch /newfile").stderr


SHOWID = r"""
#include <stdio.h>
#include <unistd.h>
int main(void) { printf("euid=%d\n", (int)geteuid()); return 0; }
"""


def test_setuid_binaries_do_not_raise_privilege(make_sandbox, tmp_path):
    ctx_dir = tmp_path / f"{tag()}-context"
    ctx_dir.mkdir()
    tmp_path.chmod(0o755)
    helper = compile_c(SHOWID, ctx_dir / "showid")
    sb = make_sandbox(context=str(ctx_dir))
    # owned by the sandbox's own root (host uid base + 0) and setuid: inside it looks like a
    # setuid-root binary; nosuid on the mount and no_new_privs must keep euid the agent's
    os.chown(helper, sb.ctx.uidrange.base, sb.ctx.uidrange.base)
    os.chmod(helper, 0o4755)
    res = run(sb, ["/home/agent/context/showid"])
    assert res.stdout == b"euid=1000\n", (res.stdout, res.stderr)
    st = sh(sb, "ls -ln /home/agent/context/showid").stdout.split()
    assert st[0].startswith(b"-rwsr") and st[2] == b"0"  # it really is setuid root inside
    res = sh(sb, "su -c id root </dev/null; echo rc=$?")
    assert b"uid=0" not in res.stdout


PTRACE = r"""
import ctypes, os, signal, sys
pid = int(sys.argv[1])
libc = ctypes.CDLL(None, use_errno=True)
for sig in (0, signal.SIGKILL):
    try:
        os.kill(pid, sig); print("KILLED", sig)
    except OSError as e:
        print("kill denied", e.errno)
print("ptrace", libc.ptrace(16, pid, None, None), ctypes.get_errno())  # PTRACE_ATTACH
try:
    os.kill(-1, signal.SIGKILL)   # everything we may signal: only the sandbox
except OSError as e:
    print("kill -1", e.errno)
"""


def test_cannot_signal_or_ptrace_a_host_process(make_sandbox, host_sleeper):
    sb = make_sandbox()
    res = run(sb, [PY, "-c", PTRACE, str(host_sleeper.pid)])
    assert b"KILLED" not in res.stdout
    assert res.stdout.count(b"kill denied 3") == 2  # ESRCH: not even visible
    # ESRCH (not in our pid namespace) or EPERM (the seccomp filter refuses ptrace first)
    assert b"ptrace -1 3" in res.stdout or b"ptrace -1 1" in res.stdout, res.stdout
    assert host_sleeper.poll() is None  # still alive after kill(-1, SIGKILL) inside


TIOCSTI = r"""
import fcntl, os, termios
marker = "MK" + str(6 * 7 * 1000003)
def inject(fd):
    try:
        for ch in marker + "\n":
            fcntl.ioctl(fd, termios.TIOCSTI, ch.encode())
        return "INJECTED"
    except OSError as e:
        return "denied:%d" % e.errno
res = [inject(fd) for fd in (0, 1, 2)]
try:
    tty = os.open("/dev/tty", os.O_RDWR)
    res.append(inject(tty))
except OSError as e:
    res.append("no-tty:%d" % e.errno)
print("RESULT", " ".join(res))
"""


def test_tiocsti_cannot_inject_into_the_callers_terminal(tmp_path, state_dir):
    master, slave = pty.openpty()
    p = None
    try:
        def make_ctty():  # the pty becomes sandboxctl's controlling terminal, like a login
            os.setsid()
            import fcntl
            fcntl.ioctl(0, termios.TIOCSCTTY, 0)
        p = subprocess.Popen([SANDBOXCTL, "run", "--state-dir", str(state_dir),
                          "--policy", policy_file(state_dir.parent), "--", PY, "-c", TIOCSTI], stdin=slave,
                             stdout=slave, stderr=slave, preexec_fn=make_ctty)
        os.close(slave)
        slave = -1
        seen = b""
        for _ in range(600):  # bounded (60 s): read the terminal until sandboxctl exits
            r, _, _ = select.select([master], [], [], 0.1)
            if r:
                try:
                    seen += os.read(master, 4096)
                except OSError:
                    break
            if p.poll() is not None and not r:
                break
        rc = p.wait(timeout=30)
        assert rc == 0, seen
        assert b"RESULT denied:" in seen, seen  # it ran and reported
        assert b"INJECTED" not in seen, seen
        assert str(6 * 7 * 1000003).encode() not in seen
    finally:
        if p is not None and p.poll() is None:
            p.kill()
            p.wait()
        os.close(master)
        if slave >= 0:
            os.close(slave)


def test_callers_supplementary_groups_do_not_follow(state_dir):
    # sandboxctl runs with extra groups (as a root shell in group disk/adm might); with
    # setgroups "deny" the agent could never drop them, so the engine clears them before clone3
    res = subprocess.run([SANDBOXCTL, "run", "--state-dir", str(state_dir),
                          "--policy", policy_file(state_dir.parent), "--",
                          "grep", "^Groups:", "/proc/self/status"],
                         extra_groups=[0, 4242], capture_output=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == [b"Groups:"], res.stdout
