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


async def _emit(on_output, stream: str, data: bytes):
    if on_output is None:
        return
    r = on_output(stream, data)
    if inspect.isawaitable(r):
        await r


async def pump_output(fd: int, stream: str, on_output, sink: list[bytes] | None) -> None:
    """Read a non-blocking pipe until EOF, passing each chunk on in order."""
    loop = asyncio.get_running_loop()
    os.set_blocking(fd, False)
    ready = asyncio.Event()
    loop.add_reader(fd, ready.set)
    try:
        while True:
            try:
                data = os.read(fd, 65536)
            except BlockingIOError:
                ready.clear()
                await ready.wait()
                continue
            if not data:
                return
            if sink is not None:
                sink.append(data)
            await _emit(on_output, stream, data)
    finally:
        loop.remove_reader(fd)
        os.close(fd)


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
        for fd in [self.stdout_w, self.stderr_w, *self.to_close]:
            os.close(fd)
        self.report_child.close()
        self.to_close = []
