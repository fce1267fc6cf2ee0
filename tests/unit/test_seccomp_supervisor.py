"""The supervisor's decoding, answers and audit records (no root, no kernel listener)."""
from __future__ import annotations

import errno

import pytest

from sandbox.audit.sink import MemorySink
from sandbox.kernel import seccomp
from sandbox.runtime import supervisor as sv


def _notif(nr, args=(0,) * 6, arch=seccomp.AUDIT_ARCH_X86_64, nid=7, pid=42):
    return sv.NOTIF.pack(nid, pid, 0, nr, arch, 0x401000, *args)


def test_struct_sizes_match_the_kernel_uapi():
    assert sv.NOTIF.size == 80 and sv.NOTIF_RESP.size == 24
    assert sv.SECCOMP_IOCTL_NOTIF_RECV == 0xC0502100
    assert sv.SECCOMP_IOCTL_NOTIF_SEND == 0xC0182101


def test_answer_is_eperm_and_never_continue():
    nid, val, error, flags = sv.NOTIF_RESP.unpack(sv.deny_response(99))
    assert (nid, val, error) == (99, 0, -errno.EPERM)
    assert flags == 0  # SECCOMP_USER_NOTIF_FLAG_CONTINUE would let the syscall run


def test_describe_names_the_syscall_and_the_arguments_that_matter():
    n = sv.decode(_notif(seccomp.resolve("socket"), (16, 3, 9, 0, 0, 0)))
    d = sv.describe(n)
    assert d["syscall"] == "socket" and d["pid"] == 42 and d["arch"] == "x86_64"
    assert d["args"] == {"family": 16, "type": 3, "protocol": 9, "family_name": "netlink"}
    c = sv.describe(sv.decode(_notif(seccomp.resolve("clone"), (0x10000011,) + (0,) * 5)))
    assert c["args"] == {"flags": 0x10000011}
    m = sv.describe(sv.decode(_notif(seccomp.resolve("mount"))))
    assert "args" in m and m["args"]["flags"] == 0


def test_foreign_arch_records_raw_args():
    d = sv.describe(sv.decode(_notif(20, (1, 2, 3, 0, 0, 0), arch=seccomp.AUDIT_ARCH_I386)))
    assert d["syscall"] == "i386:getpid" and d["arch"] == "i386" and d["args"]["raw"][:3] == [1, 2, 3]


def test_escalation_once_past_the_threshold():
    sink = MemorySink()
    sup = sv.SeccompSupervisor("sbxt-unit", audit=sink, probe_threshold=2)
    n = sv.decode(_notif(seccomp.resolve("ptrace")))
    for _ in range(5):
        sup._record(n, answered=True)
    assert sup.denials == 5
    assert len(sink.find("seccomp_violation", syscall="ptrace")) == 5
    esc = sink.find("escalation")
    assert len(esc) == 1
    assert esc[0]["details"]["kind"] == "boundary_probing" and esc[0]["details"]["detail"]["denials"] == 3


def test_dead_target_is_still_recorded():
    sink = MemorySink()
    sup = sv.SeccompSupervisor("sbxt-unit", audit=sink)
    sup._record(sv.decode(_notif(seccomp.resolve("bpf"))), answered=False)
    (rec,) = sink.find("seccomp_violation", syscall="bpf")
    assert rec["details"]["target_gone"] is True and rec["outcome"] == "denied"


def test_make_step_wires_the_listener_hand_off():
    from sandbox.policy import load_policy

    class Ctx:
        id = "sbxt-unit"
        policy = load_policy("default")
        audit = MemorySink()
        seccomp_listener = None

    step = sv.make_step(Ctx)
    sup = step.do()
    assert Ctx.seccomp_listener == sup.watch
    step.undo(sup)
    assert Ctx.seccomp_listener is None


def test_no_second_escalation_when_the_sink_feeds_an_escalation_store():
    class WatchingSink(MemorySink):
        escalations = object()   # sandbox/audit/escalation.py's WatchingSink has this

    sink = WatchingSink()
    sup = sv.SeccompSupervisor("sbxt-unit", audit=sink, probe_threshold=1)
    for _ in range(3):
        sup._record(sv.decode(_notif(seccomp.resolve("ptrace"))), answered=True)
    assert len(sink.find("seccomp_violation")) == 3 and sink.find("escalation") == []


class _FakeKernel:
    """Stands in for the listener's ioctls: RECV hands out one notification, SEND answers."""

    def __init__(self, recv_error=None, send_error=None):
        self.recv_error, self.send_error = recv_error, send_error
        self.sent = []

    def ioctl(self, fd, req, buf, mutate=False):
        if req == sv.SECCOMP_IOCTL_NOTIF_RECV:
            assert not any(buf), "the receive buffer must be zeroed"
            if self.recv_error:
                raise OSError(self.recv_error, "fake")
            buf[:] = _notif(seccomp.resolve("unshare"), (0x10000000,) + (0,) * 5)
            return 0
        assert req == sv.SECCOMP_IOCTL_NOTIF_SEND
        if self.send_error:
            raise OSError(self.send_error, "fake")
        self.sent.append(sv.NOTIF_RESP.unpack(buf))
        return 0


@pytest.fixture
def supervised(monkeypatch):
    """supervised(kernel) -> (supervisor, sink, listener fd) on a fake kernel; cleaned up."""
    import asyncio
    import os
    made = []

    def make(kernel):
        monkeypatch.setattr(sv.fcntl, "ioctl", kernel.ioctl)
        loop = asyncio.new_event_loop()
        r, w = os.pipe()
        sink = MemorySink()
        sup = sv.SeccompSupervisor("sbxt-unit", audit=sink)
        sup._fds[r] = loop
        loop.add_reader(r, lambda: None)
        made.append((sup, w, loop))
        return sup, sink, r

    yield make
    for sup, w, loop in made:
        sup.close()
        os.close(w)
        loop.close()


def test_handle_answers_eperm_and_records(supervised):
    k = _FakeKernel()
    sup, sink, r = supervised(k)
    sup._handle_one(r)
    assert k.sent == [(7, 0, -errno.EPERM, 0)]
    (rec,) = sink.find("seccomp_violation", syscall="unshare")
    assert rec["details"]["args"] == {"flags": 0x10000000}


def test_target_dead_before_receive_is_skipped(supervised):
    sup, sink, r = supervised(_FakeKernel(recv_error=errno.ENOENT))
    sup._handle_one(r)
    assert sink.records == [] and sup.watching() == 1


def test_target_dead_before_answer_is_recorded(supervised):
    sup, sink, r = supervised(_FakeKernel(send_error=errno.ENOENT))
    sup._handle_one(r)
    (rec,) = sink.find("seccomp_violation")
    assert rec["details"]["target_gone"] is True and sup.watching() == 1


def test_broken_listener_is_closed_so_the_kernel_refuses(supervised):
    sup, sink, r = supervised(_FakeKernel(recv_error=errno.EBADF))
    sup._handle_one(r)
    assert sup.watching() == 0
    assert sink.find("seccomp_supervisor")[0]["outcome"] == "error"


def test_a_flood_is_refused_counted_and_summed_up(monkeypatch):
    monkeypatch.setattr(sv, "MAX_RECORDS", 5)
    sink = MemorySink()
    sup = sv.SeccompSupervisor("sbxt-unit", audit=sink, probe_threshold=1000)
    n = sv.decode(_notif(seccomp.resolve("mount")))
    for _ in range(12):
        sup._record(n, answered=True)
    assert len(sink.find("seccomp_violation", syscall="mount")) == 5
    sup.close()
    (summary,) = sink.find("seccomp_violation", summary=True)
    assert summary["details"]["not_recorded_one_by_one"] == {"mount": 7}
    assert summary["details"]["attempts"] == 7 and summary["outcome"] == "denied"


def test_invalid_numbers_get_a_plain_name():
    assert seccomp.syscall_name(-1) == "invalid:-1"


def test_close_from_another_thread_lets_the_loop_drop_the_fd():
    """The daemon destroys sandboxes in a worker thread while the loop runs elsewhere."""
    import asyncio
    import os

    async def main():
        r, w = os.pipe()
        sup = sv.SeccompSupervisor("sbxt-unit", audit=MemorySink())
        sup.watch(r)
        loop = asyncio.get_running_loop()
        await asyncio.to_thread(sup.close)
        assert sup.watching() == 0
        assert not loop.remove_reader(r)   # already removed, on the loop's own thread
        os.close(w)
        try:
            os.fstat(r)
        except OSError:
            return True
        return False

    assert asyncio.run(main())
