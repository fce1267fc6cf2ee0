"""The seccomp supervisor: answers the sandbox's user notifications and audits them.

The filter (sandbox/kernel/seccomp.py) sends every attempt of a deny-listed syscall, and
every foreign-architecture syscall, to SECCOMP_RET_USER_NOTIF. The C command child installs
it with SECCOMP_FILTER_FLAG_NEW_LISTENER and passes the listener fd to the parent, which
hands it to `SeccompSupervisor.watch(fd)`. For each notification the supervisor

- answers EPERM (never SECCOMP_USER_NOTIF_FLAG_CONTINUE: the agent could change the
  arguments in memory between our look and the kernel's, seccomp_unotify(2) "Caveats"),
- writes one audit record: sandbox, pid, syscall name, the arguments that matter, time,
- and, past `probe_threshold` denials, one "escalation" record of kind "boundary_probing"
  (past MAX_RECORDS, attempts are counted and summed up in one record at close()).

It never blocks the event loop: the listener is watched with loop.add_reader, and the
receive ioctl only runs when poll(2) says a notification is waiting (SECCOMP_IOCTL_NOTIF_RECV
would otherwise sleep). If the target dies between poll and receive or before our answer,
the ioctls fail with ENOENT and we carry on. If the supervisor dies or closes the listener,
the kernel fails the notifying syscalls with ENOSYS: they stay refused (seccomp_unotify(2)).

Records go to the sandbox's audit sink like every other part's (the durable log returns
after its write is on disk; the daemon's escalation-watching sink sees them there), at most
MAX_RECORDS one by one per sandbox, so a flood of attempts cannot stall the loop for long.

We never read the target's memory or /proc entries, only the registers the kernel copied
into the notification, so there is no pid-reuse race for SECCOMP_IOCTL_NOTIF_ID_VALID to
close; the pid recorded is the one the kernel translated into our pid namespace at receive.
"""
from __future__ import annotations

import asyncio
import errno
import fcntl
import os
import select
import struct
import threading
import time

from sandbox.audit.sink import NULL_SINK, AuditSink
from sandbox.kernel import seccomp

# include/uapi/linux/seccomp.h
# struct seccomp_notif { u64 id; u32 pid; u32 flags; struct seccomp_data data; }  (80 bytes)
NOTIF = struct.Struct("=QIIiIQ6Q")
# struct seccomp_notif_resp { u64 id; s64 val; s32 error; u32 flags; }  (24 bytes)
NOTIF_RESP = struct.Struct("=QqiI")


def _iowr(nr: int, size: int) -> int:
    # _IOWR(SECCOMP_IOC_MAGIC '!', nr, size): dir=3 (read|write) << 30 | size << 16 | '!' << 8 | nr
    return (3 << 30) | (size << 16) | (ord("!") << 8) | nr


SECCOMP_IOCTL_NOTIF_RECV = _iowr(0, NOTIF.size)
SECCOMP_IOCTL_NOTIF_SEND = _iowr(1, NOTIF_RESP.size)

# Notifications handled per wake-up before yielding back to the loop (bounds one callback).
BATCH = 32
# Records written one by one per sandbox. Past this, a program hammering a deny-listed
# syscall would only fill the audit log: attempts are still refused, counted per syscall,
# and summed up in one record when the supervisor closes.
MAX_RECORDS = 1000


def decode(buf: bytes) -> dict:
    """A received struct seccomp_notif as a dict (id, pid, flags, nr, arch, ip, args)."""
    nid, pid, flags, nr, arch, ip, *args = NOTIF.unpack(buf)
    return {"id": nid, "pid": pid, "flags": flags, "nr": nr, "arch": arch, "ip": ip, "args": args}


def deny_response(notif_id: int, err: int = errno.EPERM) -> bytes:
    """The answer to a notification: fail the syscall with -err. flags is always 0: never
    SECCOMP_USER_NOTIF_FLAG_CONTINUE."""
    return NOTIF_RESP.pack(notif_id, 0, -err, 0)


def describe(notif: dict) -> dict:
    """What an audit record says about a notification: names and numbers only."""
    name = seccomp.syscall_name(notif["nr"], notif["arch"])
    details = {"pid": notif["pid"], "syscall": name, "nr": notif["nr"],
               "arch": _ARCH_NAMES.get(notif["arch"], f"{notif['arch']:#x}")}
    if notif["arch"] == seccomp.AUDIT_ARCH_X86_64:
        args = {label: notif["args"][i] for label, i in seccomp.REPORT_ARGS.get(name, ())}
        if name in ("socket", "socketpair"):
            args["family_name"] = seccomp.family_name(args["family"])
        if args:
            details["args"] = args
    else:
        details["args"] = {"raw": list(notif["args"])}
    return details


_ARCH_NAMES = {seccomp.AUDIT_ARCH_X86_64: "x86_64", seccomp.AUDIT_ARCH_I386: "i386"}


class SeccompSupervisor:
    """Watches the listener fds of one sandbox's commands on an asyncio loop."""

    def __init__(self, sandbox_id: str, *, audit: AuditSink = NULL_SINK, probe_threshold: int = 10):
        self.sandbox_id = sandbox_id
        self.audit = audit
        self.probe_threshold = probe_threshold
        self.denials = 0
        self.escalated = False
        self.suppressed: dict[str, int] = {}   # syscall -> attempts past MAX_RECORDS
        self._fds: dict[int, asyncio.AbstractEventLoop] = {}   # listener fd -> its loop

    # -- hand-off from the engine (SandboxContext.seccomp_listener)
    def watch(self, fd: int, pid: int | None = None) -> None:
        """Take ownership of the listener fd of one command (pid: the command's process;
        each notification names the exact pid). Must be called on the thread of a running
        event loop; the supervisor closes the fd when no process uses the filter any more,
        or in close()."""
        loop = asyncio.get_running_loop()
        self._fds[fd] = loop
        loop.add_reader(fd, self._on_readable, fd)

    def watching(self) -> int:
        return len(self._fds)

    def close(self) -> None:
        """Stop watching and close every listener: pending and later notifications then
        fail with ENOSYS in the sandbox (still refused)."""
        for fd in list(self._fds):
            self._unwatch(fd)
        if self.suppressed:
            self.audit.record("seccomp_violation", sandbox=self.sandbox_id, outcome="denied",
                              resource="summary",
                              details={"summary": True, "not_recorded_one_by_one": dict(self.suppressed),
                                       "attempts": sum(self.suppressed.values())})
            self.suppressed = {}

    def _unwatch(self, fd: int) -> None:
        loop = self._fds.pop(fd, None)
        if loop is None:
            return
        try:
            on_loop = asyncio.get_running_loop() is loop
        except RuntimeError:
            on_loop = False
        if on_loop or not loop.is_running():
            _stop_watching(loop, fd)
            return
        # The loop runs in another thread (the daemon destroys sandboxes in a worker thread):
        # a selector may only be changed from its own thread, so ask the loop to do it.
        done = threading.Event()

        def stop():
            try:
                _stop_watching(loop, fd)
            finally:
                done.set()

        loop.call_soon_threadsafe(stop)
        done.wait(10)  # bounded; if the loop is stuck, it still closes the fd when it runs

    # -- the notification path
    def _on_readable(self, fd: int) -> None:
        for _ in range(BATCH):
            revents = _poll_now(fd)
            if revents & select.POLLIN:
                self._handle_one(fd)
                continue
            if revents & (select.POLLHUP | select.POLLERR | select.POLLNVAL):
                # No process uses the filter any more (kernel/seccomp.c, seccomp_notify_poll).
                self._unwatch(fd)
            return

    def _handle_one(self, fd: int) -> None:
        buf = bytearray(NOTIF.size)    # must be zeroed: the kernel refuses dirty buffers
        try:
            fcntl.ioctl(fd, SECCOMP_IOCTL_NOTIF_RECV, buf, True)
        except OSError as e:
            if e.errno in (errno.ENOENT, errno.EINTR, errno.EAGAIN):
                return                 # the target died between poll and receive
            self._broken(fd, "receive", e)
            return
        notif = decode(bytes(buf))
        try:
            fcntl.ioctl(fd, SECCOMP_IOCTL_NOTIF_SEND, deny_response(notif["id"]), False)
            answered = True
        except OSError as e:
            if e.errno != errno.ENOENT:
                self._broken(fd, "answer", e)
            answered = False           # the target died (or was interrupted) before our answer
        self._record(notif, answered)

    def _broken(self, fd: int, what: str, e: OSError) -> None:
        """An unusable listener: close it, so the kernel fails its syscalls with ENOSYS."""
        self._unwatch(fd)
        self.audit.record("seccomp_supervisor", sandbox=self.sandbox_id, outcome="error",
                          resource=what, details={"error": os.strerror(e.errno), "errno": e.errno})

    def _record(self, notif: dict, answered: bool) -> None:
        self.denials += 1
        details = describe(notif)
        details["errno"] = "EPERM"
        details["time"] = time.time()
        if not answered:
            details["target_gone"] = True
        if self.denials <= MAX_RECORDS:
            self.audit.record("seccomp_violation", sandbox=self.sandbox_id, outcome="denied",
                              resource=details["syscall"], details=details)
        else:
            self.suppressed[details["syscall"]] = self.suppressed.get(details["syscall"], 0) + 1
        if self.denials > self.probe_threshold and not self.escalated:
            self.escalated = True
            if hasattr(self.audit, "escalations"):
                # The daemon's sink feeds its Escalations store (sandbox/audit/escalation.py),
                # which already turns these "denied" records into a boundary_probing
                # escalation: raising one here too would report the same probing twice.
                return
            self.audit.record("escalation", sandbox=self.sandbox_id, outcome="warning",
                              resource="boundary_probing",
                              details={"kind": "boundary_probing", "severity": "warning",
                                       "detail": {"denials": self.denials, "last": "seccomp",
                                                  "threshold": self.probe_threshold,
                                                  "syscall": details["syscall"]}})

def _stop_watching(loop: asyncio.AbstractEventLoop, fd: int) -> None:
    if not loop.is_closed():
        loop.remove_reader(fd)
    os.close(fd)


def _poll_now(fd: int) -> int:
    p = select.poll()
    p.register(fd, select.POLLIN)
    events = p.poll(0)
    return events[0][1] if events else 0


def make_step(ctx):
    """The engine's "supervisor" step: one supervisor per sandbox, fed each command's
    listener through ctx.seccomp_listener; the undo closes every listener."""
    from sandbox.runtime.lifecycle import Step

    sec = ctx.policy.seccomp
    if not sec.notify:
        return None

    def do():
        sup = SeccompSupervisor(ctx.id, audit=ctx.audit, probe_threshold=sec.probe_threshold)
        ctx.seccomp_listener = sup.watch
        return sup

    def undo(sup):
        ctx.seccomp_listener = None
        sup.close()

    return Step("supervisor", do, undo, describe="answer and audit the seccomp notifications")
