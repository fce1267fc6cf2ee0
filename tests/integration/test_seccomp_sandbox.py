"""Seccomp inside real sandboxes (the engine's Sandbox API), from the attacker's side.

A program in the sandbox makes each deny-listed syscall: it gets EPERM (ENOSYS for clone3)
and the sandbox's audit sink gets a `seccomp_violation` record with the right syscall name.
Ordinary build workloads work under the default policy. A foreign-arch syscall (int 0x80)
is refused. If the supervisor is gone, notified syscalls fail with ENOSYS.
"""
from __future__ import annotations

import asyncio
import errno
import os
import select
import shutil
import tempfile
from pathlib import Path

import pytest

from sandbox.audit.sink import MemorySink
from sandbox.kernel import seccomp
from sandbox.policy import load_policy, merge_overrides
from sandbox.runtime.sandbox import Sandbox
from tests.helpers.seccomp_progs import ALLOWED_USES, DENIED_CALLS, DENIED_USES, build

CONTEXT = "/home/agent/context"


class Box:
    """One sandbox with the attacker programs in its read-only context directory."""

    def __init__(self, sb: Sandbox, sink: MemorySink):
        self.sb, self.sink = sb, sink

    def run(self, argv, **kw):
        return asyncio.run(self.sb.exec(argv, **kw))

    def syscall(self, *args) -> tuple[tuple[int, int], list[dict]]:
        """Make one raw syscall in the sandbox: ((ret, errno), the violations it caused)."""
        before = len(self.sink.records)
        res = self.run([f"{CONTEXT}/sbx-syscall", *map(str, args)])
        assert res.exit_code == 0, (res.text, res.stderr)
        ret, err = res.stdout.split()
        new = [r for r in self.sink.records[before:] if r["action"] == "seccomp_violation"]
        return (int(ret), int(err)), new


@pytest.fixture(scope="module")
def progs():
    d = Path(tempfile.mkdtemp(prefix=f"sbxt-{os.getpid()}-scprogs-"))
    os.chmod(d, 0o755)
    try:
        build(d)
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def state_dir():
    d = Path(tempfile.mkdtemp(prefix=f"sbxt-{os.getpid()}-scstate-"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


# No disk limit (/tmp is a tmpfs): these tests are about syscalls, and concurrent test runs
# on this host then share no loop devices with them.
NO_DISK = {"limits": {"disk": 0}}


def _make_box(progs, state_dir, name, overrides=None):
    sink = MemorySink()
    policy = load_policy("default", merge_overrides(NO_DISK, overrides or {}))
    sb = Sandbox.create(policy, context=progs, audit=sink, state_dir=state_dir,
                        sandbox_id=f"sbxt-{os.getpid()}-{name}")
    return Box(sb, sink)


@pytest.fixture(scope="module")
def box(progs, state_dir):
    b = _make_box(progs, state_dir, "sc")
    try:
        yield b
    finally:
        assert b.sb.destroy()["leftovers"] == []


@pytest.mark.parametrize("name", sorted(DENIED_CALLS))
def test_deny_listed_syscall_is_refused_and_reported(box, name):
    (ret, err), recs = box.syscall(seccomp.resolve(name), *DENIED_CALLS[name])
    assert (ret, err) == (-1, errno.EPERM), f"{name} returned {ret}, errno {err}"
    assert [r["details"]["syscall"] for r in recs] == [name]
    assert recs[0]["sandbox"] == box.sb.id and recs[0]["outcome"] == "denied"
    assert recs[0]["details"]["pid"] > 0 and recs[0]["details"]["time"] > 0


@pytest.mark.parametrize("case", DENIED_USES, ids=[c[0] for c in DENIED_USES])
def test_deny_listed_argument_is_refused_and_reported(box, case):
    _, name, args, (label, value) = case
    (ret, err), recs = box.syscall(seccomp.resolve(name), *args)
    assert (ret, err) == (-1, errno.EPERM), f"{case[0]} returned {ret}, errno {err}"
    assert [r["details"]["syscall"] for r in recs] == [name]
    assert recs[0]["details"]["args"][label] == value


@pytest.mark.parametrize("case", ALLOWED_USES, ids=[c[0] for c in ALLOWED_USES])
def test_harmless_uses_pass_or_fail_quietly(box, case):
    _, name, args, ok = case
    (ret, err), recs = box.syscall(seccomp.resolve(name), *args)
    assert ok(ret, err), f"{case[0]} returned {ret}, errno {err}"
    assert recs == []


def test_foreign_arch_int80_is_refused_and_reported(box):
    # getpid through the 32-bit ABI (i386 __NR_getpid = 20); getpid is allowlisted for x86_64.
    (ret, err), recs = box.syscall("--i386", 20)
    assert (ret, err) == (-1, errno.EPERM)
    assert [r["details"]["syscall"] for r in recs] == ["i386:getpid"]
    assert recs[0]["details"]["arch"] == "i386"


def test_x32_syscall_numbers_are_refused_and_reported(box):
    # __X32_SYSCALL_BIT | getpid, through the 64-bit syscall instruction.
    (ret, err), recs = box.syscall(seccomp.X32_SYSCALL_BIT | seccomp.resolve("getpid"))
    assert (ret, err) == (-1, errno.EPERM)
    assert [r["details"]["syscall"] for r in recs] == [f"x32:{seccomp.resolve('getpid')}"]


WORKLOADS = {
    "shell-pipeline": "printf 'b\\na\\nb\\n' | sort | uniq -c | awk '{s+=$1} END {print s}' | grep -qx 3",
    "python3": "python3 -c 'import subprocess, threading, hashlib, json; "
               "t = threading.Thread(target=print); t.start(); t.join(); "
               "assert subprocess.run([\"true\"]).returncode == 0'",
    "gcc": "cd /tmp && printf '#include <stdio.h>\\nint main(void){puts(\"built\");return 0;}\\n' > a.c"
           " && gcc -O2 -o a a.c && ./a | grep -qx built",
    "git": "cd /tmp && rm -rf r && git init -q r && cd r && echo x > f && git add f"
           " && git -c user.name=a -c user.email=a@example.invalid commit -qm m && git log --oneline | grep -q m",
    "tar": "cd /tmp && rm -rf t && mkdir -p t/d && echo hi > t/d/f && tar czf t.tgz t"
           " && mkdir -p x && tar xzf t.tgz -C x && grep -qx hi x/t/d/f",
    "make": "cd /tmp && rm -rf m && mkdir m && cd m && printf 'int main(void){return 0;}\\n' > a.c"
            " && printf 'out: a.c\\n\\tgcc -o out a.c\\n' > Makefile && make -s && ./out",
}


@pytest.mark.parametrize("name", sorted(WORKLOADS))
def test_ordinary_workloads_work_under_the_default_policy(box, name):
    before = len(box.sink.records)
    res = box.run(["/bin/sh", "-c", WORKLOADS[name]])
    assert res.exit_code == 0, (res.text, res.stdout[-2000:], res.stderr[-2000:])
    assert [r for r in box.sink.records[before:] if r["action"] == "seccomp_violation"] == []


def test_probing_raises_one_escalation(progs, state_dir):
    b = _make_box(progs, state_dir, "scprobe", {"seccomp": {"probe_threshold": 3, "deny": ["getppid"]}})
    try:
        # the policy's own deny list is refused and reported too
        (ret, err), recs = b.syscall(seccomp.resolve("getppid"))
        assert (ret, err) == (-1, errno.EPERM) and [r["details"]["syscall"] for r in recs] == ["getppid"]
        ptrace = seccomp.resolve("ptrace")
        res = b.run(["/bin/sh", "-c", "; ".join([f"{CONTEXT}/sbx-syscall {ptrace} 16 1"] * 5)])
        assert res.stdout.decode().split() == ["-1", str(errno.EPERM)] * 5
        assert len(b.sink.find("seccomp_violation", syscall="ptrace")) == 5
        esc = b.sink.find("escalation", kind="boundary_probing")
        assert len(esc) == 1 and esc[0]["sandbox"] == b.sb.id and esc[0]["details"]["detail"]["denials"] == 4
    finally:
        assert b.sb.destroy()["leftovers"] == []


def test_supervisor_gone_means_enosys_not_allowed(box):
    """The supervisor closes the listener while a deny-listed syscall waits for its answer
    (as if it died): that syscall and later ones fail with ENOSYS, they never run."""
    real = box.sb.ctx.seccomp_listener

    def dying_supervisor(fd, pid):
        async def die_when_waiting():
            for _ in range(500):  # bounded: 5 s
                if select.select([fd], [], [], 0)[0]:
                    break
                await asyncio.sleep(0.01)
            else:
                raise AssertionError("no notification arrived")
            os.close(fd)
        asyncio.get_running_loop().create_task(die_when_waiting())

    box.sb.ctx.seccomp_listener = dying_supervisor
    try:
        mount = seccomp.resolve("mount")
        res = box.run(["/bin/sh", "-c", f"{CONTEXT}/sbx-syscall {mount}; {CONTEXT}/sbx-syscall {mount}"])
    finally:
        box.sb.ctx.seccomp_listener = real
    assert res.exit_code == 0, res.stderr
    assert res.stdout.decode().split() == ["-1", str(errno.ENOSYS)] * 2


def test_command_holds_no_listener_and_runs_filtered(box):
    res = box.run(["/bin/sh", "-c", "grep ^Seccomp: /proc/self/status; ls -l /proc/self/fd/ | grep -c seccomp || true"])
    assert res.exit_code == 0
    assert res.stdout.decode().split() == ["Seccomp:", "2", "0"]   # SECCOMP_MODE_FILTER, no listener fd


def test_without_notification_the_deny_list_is_refused_silently(progs, state_dir):
    """seccomp.notify = false: no supervisor, no listener; deny-listed and foreign-arch
    syscalls still fail with EPERM (they just are not reported)."""
    b = _make_box(progs, state_dir, "scquiet", {"seccomp": {"notify": False}})
    try:
        assert b.sb.ctx.seccomp_listener is None
        for args in ([seccomp.resolve("mount"), 0, 0, 0, 0, 0], [seccomp.resolve("bpf"), 0, 0, 0],
                     [seccomp.resolve("socket"), 17, 3, 0], [seccomp.resolve("ioctl"), 0, 0x5412, 0],
                     ["--i386", 20]):
            (ret, err), recs = b.syscall(*args)
            assert (ret, err) == (-1, errno.EPERM), args
            assert recs == []
    finally:
        assert b.sb.destroy()["leftovers"] == []


def test_own_listener_cannot_replace_a_dead_supervisor(box):
    """The stacking attack: with our listener gone, a program installs a USER_NOTIF filter of
    its own with a listener (the newest USER_NOTIF filter wins), answers "continue" to its
    own unshare(CLONE_NEWUSER) and would get a user namespace. seccomp with NEW_LISTENER is
    on the fixed deny list, so the install fails (ENOSYS: nobody answers our notification)."""
    real = box.sb.ctx.seccomp_listener
    gate_r, gate_w = os.pipe()

    def dead_supervisor(fd, pid):
        os.close(fd)       # our listener is gone...
        os.close(gate_w)   # ...and only then may the attacker start (its stdin hits EOF)

    box.sb.ctx.seccomp_listener = dead_supervisor
    try:
        res = box.run(["/bin/sh", "-c", f"read gate; {CONTEXT}/sbx-stack"], stdin=gate_r)
    finally:
        box.sb.ctx.seccomp_listener = real
        os.close(gate_r)
    assert res.exit_code == 0, res.stderr
    assert res.stdout.decode().split() == ["install", "-1", str(errno.ENOSYS)]
