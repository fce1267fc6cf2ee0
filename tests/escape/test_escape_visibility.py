"""From inside the sandbox, an attacker tries to see or reach what belongs to the host."""
import os
import secrets
import socket
import subprocess

from tests.helpers.engine import SANDBOXCTL, policy_file, py, sh, tag


def test_host_processes_are_invisible(make_sandbox, host_sleeper):
    # pid namespace + fresh /proc: only the sandbox's own processes are listed
    sb = make_sandbox()
    res = py(sb, "import os; print(sorted(int(p) for p in os.listdir('/proc') if p.isdigit()))")
    pids = eval(res.stdout.decode())  # noqa: S307 - a list of ints we printed
    assert res.exit_code == 0
    assert host_sleeper.pid not in pids and os.getpid() not in pids
    assert pids and max(pids) < 100, pids  # a handful: init, the shell, python
    assert 1 in pids


def test_init_holds_nothing_of_the_caller(make_sandbox):
    """init is executed from its own static program (sandbox/sbx-init), so it holds no
    copy of the engine's memory: no Python, no extension, no heap of the daemon."""
    sb = make_sandbox()
    maps = open(f"/proc/{sb.init_pid}/maps").read()
    files = {line.split()[-1] for line in maps.splitlines() if len(line.split()) >= 6}
    assert not [f for f in files if "python" in f or "_native_lib" in f or ".so" in f], files
    assert any(f.endswith("/sbx-init") for f in files), files
    assert open(f"/proc/{sb.init_pid}/comm").read().strip() == "sandbox-init"
    rss_kb = int(next(l.split()[1] for l in open(f"/proc/{sb.init_pid}/status")
                      if l.startswith("VmRSS:")))
    assert rss_kb < 4096, rss_kb  # a copy of the caller was ~17 MB


def test_agent_cannot_look_into_init(make_sandbox):
    """The exec of init makes it dumpable again; init turns that off before it serves
    anything, so the agent (same uid) cannot read its fds, maps or memory (proc(5):
    ptrace access mode checks)."""
    sb = make_sandbox()
    res = sh(sb, "ls /proc/1/fd; cat /proc/1/maps; head -c 16 /proc/1/mem; "
                 "readlink /proc/1/exe; echo done")
    assert b"done" in res.stdout
    assert b"sbx-init" not in res.stdout and b"/dev/null" not in res.stdout, res.stdout
    assert res.stderr.count(b"Permission denied") >= 3, res.stderr


def test_cannot_read_shadow_or_a_host_file(make_sandbox, tmp_path):
    secret_dir = tmp_path / f"{tag()}-hostfiles"
    secret_dir.mkdir()
    secret_dir.chmod(0o755)
    tmp_path.chmod(0o755)
    canary = secrets.token_hex(16)
    f = secret_dir / "note.txt"
    f.write_text(canary)
    f.chmod(0o644)
    sb = make_sandbox()
    res = sh(sb, f"cat /etc/shadow; cat {f}; cat /proc/1/root{f}; ls /root; "
                 f"find / -xdev -name note.txt 2>/dev/null; true")
    out = res.stdout + res.stderr
    assert canary.encode() not in out
    assert b"root:" not in res.stdout  # no shadow line
    assert b"No such file" in res.stderr


def test_caller_environment_does_not_leak(state_dir):
    # The canary is in the environment the caller *started* with, so it is also in the
    # memory init inherits: /proc/1/environ would show it if init were dumpable.
    canary = secrets.token_hex(16)
    env = dict(os.environ, **{f"SBXT_CANARY_{os.getpid()}": canary})
    script = ("env; cat /proc/self/environ; for f in /proc/[0-9]*/environ; do cat $f; done; "
              "cat /proc/1/environ /proc/1/cmdline; echo; echo done")
    res = subprocess.run([SANDBOXCTL, "run", "--state-dir", str(state_dir),
                          "--policy", policy_file(state_dir.parent), "--", "sh", "-c",
                          script], env=env, capture_output=True, timeout=60)
    assert canary.encode() not in res.stdout + res.stderr
    assert b"HOME=/home/agent" in res.stdout and b"done" in res.stdout  # it did run
    # /proc/1/cmdline (readable without ptrace access) must not show the caller's command
    # line either: init is its own program, not a copy of the caller
    assert b"sandboxctl" not in res.stdout and b"--state-dir" not in res.stdout


def test_host_unix_sockets_are_unreachable(make_sandbox, tmp_path):
    path = tmp_path / f"{tag()}.sock"
    name = f"\0{tag()}-abstract"
    servers = []
    for addr in (str(path), name):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(addr)
        s.listen(1)
        servers.append(s)
    try:
        sb = make_sandbox()
        code = ("import socket,sys\n"
                "for a in sys.argv[1:]:\n"
                "    a = a.replace('@', '\\0', 1)\n"
                "    s = socket.socket(socket.AF_UNIX)\n"
                "    try:\n        s.connect(a); print('CONNECTED', repr(a))\n"
                "    except OSError as e: print('refused', e.errno)\n")
        res = sb_py_args(sb, code, [str(path), "@" + name[1:]])
        assert res.exit_code == 0, res.stderr
        assert b"CONNECTED" not in res.stdout
        assert res.stdout.count(b"refused") == 2
    finally:
        for s in servers:
            s.close()


def sb_py_args(sb, code, args):
    from tests.helpers.engine import PY, run
    return run(sb, [PY, "-c", code, *args])


def test_host_sysv_ipc_is_invisible(make_sandbox):
    out = subprocess.run(["ipcmk", "-Q"], capture_output=True, text=True, check=True).stdout
    qid = out.strip().split()[-1]
    try:
        host = subprocess.run(["ipcs", "-q"], capture_output=True, text=True, check=True).stdout
        assert qid in host.split()  # the host sees it: the check below can fail
        sb = make_sandbox()
        res = sh(sb, "ipcs -q; cat /proc/sysvipc/msg")
        assert res.exit_code == 0, res.stderr
        lines = res.stdout.decode().split("\n")
        assert not any(qid in line.split() for line in lines), res.stdout
    finally:
        subprocess.run(["ipcrm", "-q", qid], check=True)


def test_cannot_change_host_hostname(make_sandbox):
    before = socket.gethostname()
    sb = make_sandbox()
    res = sh(sb, f"hostname; hostname {tag()}-evil; echo rc=$?")
    assert res.stdout.decode().split("\n")[0] == "sandbox"
    assert b"rc=0" not in res.stdout  # no CAP_SYS_ADMIN: sethostname fails inside
    assert socket.gethostname() == before


def test_dev_is_minimal_and_sys_is_absent(make_sandbox):
    sb = make_sandbox()
    res = sh(sb, "ls -A /dev; echo --; ls /sys 2>&1; ls /dev/pts")
    dev, _, rest = res.stdout.decode().partition("--\n")
    assert sorted(dev.split()) == sorted(["fd", "full", "null", "ptmx", "pts", "random", "shm",
                                          "stderr", "stdin", "stdout", "tty", "urandom", "zero"])
    assert "No such file" in rest
    assert rest.split()[-1] == "ptmx"  # a fresh devpts: the host's terminals are not there


def test_sensitive_proc_entries_are_masked(make_sandbox):
    # each one, where this kernel has it, is /dev/null (a character device) or an empty dir
    sb = make_sandbox()
    res = sh(sb, "for f in timer_list kcore keys key-users sysrq-trigger sched_debug; do "
                 "[ -e /proc/$f ] && { [ -c /proc/$f ] && echo $f masked || echo $f OPEN; }; done; "
                 "for d in acpi scsi; do [ -d /proc/$d ] && echo $d $(ls -A /proc/$d | wc -l); done; "
                 "echo b > /proc/sysrq-trigger || echo SYSRQ-DENIED")
    out = res.stdout.decode()
    assert "OPEN" not in out, out
    assert "timer_list masked" in out and "keys masked" in out  # (no sysrq-trigger on this kernel)
    assert ("sysrq-trigger masked" in out) == os.path.exists("/proc/sysrq-trigger")
    assert " 0\n" in out or "acpi" not in out  # an empty dir over /proc/acpi
    assert "SYSRQ-DENIED" in out
