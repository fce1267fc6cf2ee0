"""One command's channels as exec() reads them (sandbox/runtime/io.py, CommandReader):
output complete and in order per stream, an async on_output holding its stream back, an
on_output that fails or a caller that gives up leaving nothing behind."""
import asyncio
import os

import pytest

from sandbox.kernel import namespaces
from tests.helpers.engine import make_sandbox, state_dir  # noqa: F401

LINES = 2000
SCRIPT = (f"i=0; while [ $i -lt {LINES} ]; do echo out-$i; echo err-$i >&2; i=$((i+1)); done; "
          "head -c 300000 /dev/zero | tr '\\0' x; exit 3")


def _expected(stream: str) -> bytes:
    body = b"".join(f"{stream}-{i}\n".encode() for i in range(LINES))
    return body + (b"x" * 300000 if stream == "out" else b"")


def _fds() -> list[str]:
    """What this process has open, but the netns pool's fds (it refills on its own thread)
    and seccomp listeners (the supervisor holds one while the command it is for still runs,
    as the command in these tests does after exec() gave up on it)."""
    pool = namespaces.NETNS_POOL
    assert pool.wait_full(), pool.error
    held = {str(fd) for fd in pool._fds}
    out = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            what = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue                                    # (listdir's own fd)
        if fd not in held and what != "anon_inode:seccomp notify":
            out.append(what.split("[")[0])              # pipe:, socket:, a path
    return sorted(out)


def test_collected_output_is_complete_in_order_with_the_status(make_sandbox):
    sb = make_sandbox()
    res = asyncio.run(sb.exec(["/bin/sh", "-c", SCRIPT]))
    assert res.exit_code == 3 and res.reason == "exited"
    assert res.stdout == _expected("out") and res.stderr == _expected("err")


def test_an_async_on_output_holds_its_stream_back_in_order(make_sandbox):
    sb = make_sandbox()
    got = {"stdout": [], "stderr": []}
    busy = {"stdout": False, "stderr": False}

    async def on_output(stream, data):
        assert not busy[stream]          # never called again before the last one finished
        busy[stream] = True
        await asyncio.sleep(0.0005)
        got[stream].append(bytes(data))
        busy[stream] = False

    res = asyncio.run(sb.exec(["/bin/sh", "-c", SCRIPT], on_output=on_output))
    assert res.exit_code == 3
    assert b"".join(got["stdout"]) == _expected("out")
    assert b"".join(got["stderr"]) == _expected("err")
    assert res.stdout == b"" and res.stderr == b""   # given to on_output, not collected


def test_a_failing_on_output_fails_the_exec_and_leaves_nothing_open(make_sandbox):
    sb = make_sandbox()
    asyncio.run(sb.exec(["true"]))
    before = _fds()

    class Boom(Exception):
        pass

    def on_output(stream, data):
        raise Boom("the caller's sink broke")

    with pytest.raises(Boom):
        asyncio.run(sb.exec(["/bin/sh", "-c", "echo hi; sleep 30"], on_output=on_output))
    assert _fds() == before
    assert asyncio.run(sb.exec(["true"])).exit_code == 0   # the sandbox still serves


def test_a_cancelled_exec_leaves_nothing_open(make_sandbox):
    sb = make_sandbox()
    asyncio.run(sb.exec(["true"]))
    before = _fds()

    async def give_up():
        task = asyncio.ensure_future(sb.exec(["/bin/sh", "-c", "echo started; sleep 30"]))
        await asyncio.sleep(0.3)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(give_up())
    assert _fds() == before
    assert asyncio.run(sb.exec(["true"])).exit_code == 0


def test_a_command_starts_with_default_signal_dispositions(make_sandbox):
    """The caller (Python ignores SIGPIPE and SIGXFSZ) passes none of its dispositions on:
    the child resets them before it executes init, and init sets none."""
    import signal
    assert signal.getsignal(signal.SIGPIPE) == signal.SIG_IGN   # (what must not leak)
    sb = make_sandbox()
    status = asyncio.run(sb.exec(["cat", "/proc/self/status"])).stdout.decode()
    fields = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
    assert int(fields["SigIgn"], 16) == 0 and int(fields["SigCgt"], 16) == 0
    assert int(fields["SigBlk"], 16) == 0
    init = open(f"/proc/{sb.init_pid}/status").read()
    assert "SigIgn:\t0000000000000000" in init and "SigCgt:\t0000000000000000" in init


def test_an_exec_into_a_dead_init_fails_cleanly_and_leaves_nothing_open(make_sandbox):
    """Init gone (OOM-killed, say) before the daemon noticed: sending the command fails.
    The exec must fail with the sandbox's error, close each of its fds exactly once (a
    second close of a number another thread has reused since closes that thread's fd: a
    spawn's mount fd, the netns pool's) and leave none of them open."""
    import select
    import signal

    from sandbox.errors import SandboxError
    sb = make_sandbox()
    asyncio.run(sb.exec(["true"]))
    before = _fds()
    os.kill(sb.init_pid, signal.SIGKILL)
    p = select.poll()
    p.register(sb.pidfd, select.POLLIN)   # readable once init has exited (not reaped here)
    assert p.poll(10_000)
    for stdin in (None, b"input"):
        with pytest.raises(SandboxError, match="not running"):
            asyncio.run(sb.exec(["true"], stdin=stdin))
        assert _fds() == before


def test_an_exec_cancelled_again_while_it_cleans_up_leaves_nothing_open(make_sandbox):
    """A second cancellation (a client gone, then the daemon shutting down) may land while
    exec() waits for an on_output call to finish cancelling: its pipes and report socket
    are closed all the same."""
    sb = make_sandbox()
    asyncio.run(sb.exec(["true"]))
    before = _fds()

    async def on_output(stream, data):
        try:
            await asyncio.Event().wait()     # a sink that never drains
        except asyncio.CancelledError:
            await asyncio.sleep(0.3)         # ... and takes its time to let go
            raise

    async def give_up_twice():
        task = asyncio.ensure_future(sb.exec(["/bin/sh", "-c", "echo started; sleep 30"],
                                             on_output=on_output))
        await asyncio.sleep(0.3)
        task.cancel()
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(give_up_twice())
    assert _fds() == before
    assert asyncio.run(sb.exec(["true"])).exit_code == 0
