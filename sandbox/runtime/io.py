"""One command's I/O with the sandbox's init: the exec request, pipes, the report socket.

The parent sends one SOCK_SEQPACKET message (csrc/native.h `struct sbx_exec_hdr`, then
cwd, argv and env as NUL-terminated strings) with SCM_RIGHTS [stdin, stdout, stderr,
report]. init answers on the report socket: STARTED, maybe LISTENER (a seccomp listener
fd), EXEC_FAILED / SETUP_FAILED, and EXITED with the wait status.
"""
from __future__ import annotations

import asyncio
import inspect
import os
import socket
import struct
from dataclasses import dataclass, field

from sandbox.errors import PolicyError, SandboxError

MAGIC = 0x53425845
MAX_REQUEST = 196608
_HDR = struct.Struct("=IIII")
_REPORT = struct.Struct("=iiii32s")
STARTED, LISTENER, EXEC_FAILED, EXITED, SETUP_FAILED = 1, 2, 3, 4, 5
HOME = "/home/agent"


def command_env(policy, env: dict | None) -> list[str]:
    """policy.environment.set + HOME/USER/LOGNAME + caller variables named in
    policy.environment.allow. A variable outside the allowlist is refused by name (its
    value is never shown). The host's environment never enters."""
    out = dict(policy.environment.set)
    out.update(HOME=HOME, USER=policy.user.name, LOGNAME=policy.user.name)
    for name, value in (env or {}).items():
        if name not in policy.environment.allow:
            raise PolicyError(f"variable {name} is not in the policy's allowlist "
                              f"({', '.join(policy.environment.allow) or 'empty'})",
                              field="environment.allow")
        if "\0" in name or "\0" in str(value) or "=" in name:
            raise PolicyError(f"variable {name}: invalid name or value", field="environment")
        out[name] = str(value)
    return [f"{k}={v}" for k, v in out.items()]


def pack_request(argv: list[str], env: list[str], cwd: str) -> bytes:
    if not argv or not argv[0]:
        raise SandboxError("empty command", step="exec")
    strings = [cwd, *argv, *env]
    if any("\0" in s for s in strings):
        raise SandboxError("NUL byte in a command argument or variable", step="exec")
    body = b"".join(s.encode() + b"\0" for s in strings)
    data = _HDR.pack(MAGIC, len(argv), len(env), 0) + body
    if len(data) > MAX_REQUEST:
        raise SandboxError(f"command too long ({len(data)} bytes, at most {MAX_REQUEST})",
                           step="exec")
    return data


@dataclass
class Report:
    kind: int
    pid: int
    status: int
    err: int
    syscall: str
    fd: int | None = None


def recv_report(sock: socket.socket) -> Report | None:
    """One report, or None at EOF (init died: the sandbox was killed)."""
    msg, fds, _flags, _addr = socket.recv_fds(sock, _REPORT.size, 1)
    if not msg:
        for fd in fds:
            os.close(fd)
        return None
    kind, pid, status, err, name = _REPORT.unpack(msg[:_REPORT.size])
    return Report(kind, pid, status, err, name.split(b"\0", 1)[0].decode(),
                  fds[0] if fds else None)


class CommandReader:
    """Reads one command's stdout, stderr and report socket on the running loop, with a
    reader callback per channel: a command's end (both outputs at EOF, EXITED) is seen in
    one loop iteration, not a task wakeup per channel and a gather after them (that was
    ~0.3 ms of loop round trips per command). `done` resolves once both outputs reached EOF
    and the report socket gave EXITED (or EOF: init died); it fails with the first error
    of a channel or of on_output.

    Output goes to on_output(stream, data), in order per stream; when it returns an
    awaitable, that stream is not read again until it completed (the daemon's bounded
    queue holds a chatty command back this way). Without on_output, chunks go to `sinks`."""

    CHUNKS_PER_WAKEUP = 16       # then the loop gets a turn (timers, other sandboxes)

    def __init__(self, chan: "CommandIO", on_output, sinks: dict, on_listener):
        self.loop = asyncio.get_running_loop()
        self.done = self.loop.create_future()
        self.reports: list[Report] = []
        self._on_output = on_output
        self._sinks = sinks
        self._on_listener = on_listener
        self._report = chan.report
        self._streams = {chan.stdout_r: "stdout", chan.stderr_r: "stderr"}
        self._watching: set[int] = set()
        self._open = 3
        self._pending: set = set()     # on_output awaitables in flight

    def start(self) -> None:
        for fd in self._streams:
            os.set_blocking(fd, False)
            self._watch(fd, self._read_output, fd)
        self._report.setblocking(False)
        self._watch(self._report.fileno(), self._read_reports)

    def _watch(self, fd: int, cb, *args) -> None:
        self.loop.add_reader(fd, cb, *args)
        self._watching.add(fd)

    def _unwatch(self, fd: int) -> None:
        if fd in self._watching:
            self._watching.discard(fd)
            self.loop.remove_reader(fd)

    def _fail(self, e: BaseException) -> None:
        if not self.done.done():
            self.done.set_exception(e)

    def _finished(self, fd: int) -> None:
        self._unwatch(fd)
        self._open -= 1
        if self._open == 0 and not self.done.done():
            self.done.set_result(None)

    def _read_output(self, fd: int) -> None:
        stream = self._streams[fd]
        try:
            for _ in range(self.CHUNKS_PER_WAKEUP):
                try:
                    data = os.read(fd, 65536)
                except BlockingIOError:
                    return
                if not data:
                    self._finished(fd)
                    return
                if self._on_output is None:
                    self._sinks[stream].append(data)
                    continue
                r = self._on_output(stream, data)
                if inspect.isawaitable(r):
                    self._unwatch(fd)           # this stream waits for it, in order
                    fut = asyncio.ensure_future(r)
                    self._pending.add(fut)
                    fut.add_done_callback(lambda f, fd=fd: self._resume(fd, f))
                    return
        except Exception as e:  # noqa: BLE001 - the command's error, raised by exec()
            self._unwatch(fd)
            self._fail(e)

    def _resume(self, fd: int, fut) -> None:
        self._pending.discard(fut)
        if fut.cancelled() or self.done.done() or fd not in self._streams:
            return
        if fut.exception() is not None:
            self._fail(fut.exception())
            return
        self._watch(fd, self._read_output, fd)

    def _read_reports(self) -> None:
        fd = self._report.fileno()
        try:
            while True:
                try:
                    r = recv_report(self._report)
                except BlockingIOError:
                    return
                if r is None:
                    self._finished(fd)
                    return
                if r.kind == LISTENER and r.fd is not None:
                    self._on_listener(r.fd, r.pid)
                self.reports.append(r)
                if r.kind == EXITED:
                    self._finished(fd)
                    return
        except Exception as e:  # noqa: BLE001 - as in _read_output
            self._unwatch(fd)
            self._fail(e)

    def stop(self) -> None:
        """Stop reading and close the output pipes, without waiting for anything: a caller
        does this before its first await on the way out, which a second cancellation may end
        (the on_output calls still running need no fd, and _resume watches nothing after)."""
        for fd in list(self._watching):
            self._unwatch(fd)
        streams, self._streams = self._streams, {}
        for fd in streams:
            os.close(fd)

    async def close(self) -> None:
        """Stop reading and close the output pipes; on_output calls still running are
        cancelled (a timeout, a cancelled caller, a failing on_output)."""
        self.stop()
        pending, self._pending = list(self._pending), set()
        for fut in pending:
            fut.cancel()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)


async def feed_stdin(fd: int, stdin) -> None:
    """Write bytes or an async iterator of bytes to a non-blocking pipe, then close it."""
    loop = asyncio.get_running_loop()
    os.set_blocking(fd, False)
    ready = asyncio.Event()
    loop.add_writer(fd, ready.set)
    try:
        if isinstance(stdin, (bytes, bytearray, memoryview)):
            async def _once(data=stdin):
                yield data
            stdin = _once()
        async for chunk in stdin:
            view = memoryview(bytes(chunk))
            while view:
                try:
                    n = os.write(fd, view)
                    view = view[n:]
                except BlockingIOError:
                    ready.clear()
                    await ready.wait()
    except BrokenPipeError:
        pass  # the command stopped reading: not an error of ours
    finally:
        loop.remove_writer(fd)
        os.close(fd)


@dataclass
class CommandIO:
    """The parent's ends of one command's channels."""
    stdin_child: int
    stdin_parent: int | None
    stdout_r: int
    stdout_w: int
    stderr_r: int
    stderr_w: int
    report: socket.socket
    report_child: socket.socket
    to_close: list = field(default_factory=list)

    @classmethod
    def open(cls, stdin) -> "CommandIO":
        out_r, out_w = os.pipe2(os.O_CLOEXEC)
        err_r, err_w = os.pipe2(os.O_CLOEXEC)
        rep, rep_child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        stdin_parent = None
        to_close = []
        if isinstance(stdin, int):
            stdin_child = stdin  # the caller's fd: passed through, not ours to close
        elif stdin is None:
            stdin_child = os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)
            to_close.append(stdin_child)
        else:
            stdin_child, stdin_parent = os.pipe2(os.O_CLOEXEC)
            to_close.append(stdin_child)
        return cls(stdin_child, stdin_parent, out_r, out_w, err_r, err_w, rep, rep_child, to_close)

    def send(self, ctl: socket.socket, request: bytes) -> None:
        fds = [self.stdin_child, self.stdout_w, self.stderr_w, self.report_child.fileno()]
        socket.send_fds(ctl, [request], fds)

    def close_child_ends(self) -> None:
        """Close the ends the command got (init has its copies). Once: each closed number
        is forgotten, since closing it again could close another thread's new fd."""
        fds = [fd for fd in (self.stdout_w, self.stderr_w) if fd >= 0] + self.to_close
        self.stdout_w = self.stderr_w = -1
        self.to_close = []
        for fd in fds:
            os.close(fd)
        self.report_child.close()

    def close_parent_ends(self) -> None:
        """Close our ends, when the command never started (no reader took them)."""
        fds = [fd for fd in (self.stdout_r, self.stderr_r, self.stdin_parent)
               if fd is not None and fd >= 0]
        self.stdout_r = self.stderr_r = -1
        self.stdin_parent = None
        for fd in fds:
            os.close(fd)
        self.report.close()
