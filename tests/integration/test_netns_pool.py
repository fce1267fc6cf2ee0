"""Empty network namespaces made ahead (sandbox/kernel/namespaces.py, NetnsPool): what a
sandbox without a network gets from the pool is an empty namespace with a down loopback that
no other sandbox ever had, and the pool leaks none of them."""
import fcntl
import os

import pytest

from sandbox.kernel import namespaces
from sandbox.kernel.namespaces import NetnsPool
from tests.helpers.engine import make_sandbox, py, state_dir  # noqa: F401

NS_GET_USERNS = 0xB701  # _IO(0xb7, 0x1), ioctl_ns(2)

# lo present, no other interface (ioctl by name: netlink is not among the agent's socket
# families), and lo down: a connection to a listening socket on 127.0.0.1 fails
PROBE = ("import socket\n"
         "def idx(n):\n"
         "    try:\n        return socket.if_nametoindex(n)\n"
         "    except OSError:\n        return None\n"
         "print([n for n in ('lo', 'eth0') if idx(n)])\n"
         "s = socket.socket(); s.bind(('127.0.0.1', 0)); s.listen()\n"
         "try:\n    socket.create_connection(s.getsockname(), timeout=1); print('lo-up')\n"
         "except OSError as e:\n    print('lo-down')\n")


def _ino(path_or_fd) -> int:
    return os.stat(path_or_fd).st_ino


def _owner_ino(ns_fd: int) -> int:
    fd = fcntl.ioctl(ns_fd, NS_GET_USERNS)
    try:
        return _ino(fd)
    finally:
        os.close(fd)


@pytest.fixture
def pool(monkeypatch):
    p = NetnsPool(2)
    monkeypatch.setattr(namespaces, "NETNS_POOL", p)
    yield p
    p.size = 0
    p.clear()


@pytest.fixture
def taken(pool, monkeypatch):
    """The inode of every namespace the pool hands out, in order (None: it had none)."""
    got = []
    take = pool.take

    def spy():
        fd = take()
        got.append(None if fd is None else _ino(fd))
        return fd
    monkeypatch.setattr(pool, "take", spy)
    return got


def test_a_sandbox_gets_a_pooled_empty_netns_with_lo_down(pool, taken, make_sandbox):
    pool.take(), pool.take()          # (demand: from the second on, the pool keeps some)
    assert pool.wait_full()
    sb = make_sandbox()
    inside = f"/proc/{sb.init_pid}/ns/net"
    assert taken[-1] == _ino(inside)  # the sandbox is in the namespace the pool gave out
    assert _ino(inside) != _ino("/proc/self/ns/net")
    out = py(sb, PROBE).stdout.decode().split("\n")
    assert out[:2] == ["['lo']", "lo-down"], out
    # owned by the host's user namespace (the engine's), not the sandbox's
    fd = os.open(inside, os.O_RDONLY | os.O_CLOEXEC)
    try:
        assert _owner_ino(fd) == _ino("/proc/self/ns/user")
        assert _owner_ino(fd) != _ino(f"/proc/{sb.init_pid}/ns/user")
    finally:
        os.close(fd)


def test_each_pooled_netns_goes_to_one_sandbox_only(pool, taken, make_sandbox):
    pool.take(), pool.take()
    made = []
    for i in range(6):
        if i % 2:
            pool.wait_full()          # and every other one right after the last
        sb = make_sandbox()
        if taken[-1] is not None:
            assert taken[-1] == _ino(f"/proc/{sb.init_pid}/ns/net")
        made.append(sb)
    nets = [_ino(f"/proc/{sb.init_pid}/ns/net") for sb in made]
    assert len(set(nets)) == len(nets)                 # live sandboxes never share one
    assert sum(t is not None for t in taken[2:]) >= 3  # (the pool did serve)
    held = {_ino(fd) for fd in pool._fds}              # what the pool still holds is unused
    assert not held & set(nets)


def test_without_a_pooled_netns_the_spawn_makes_its_own(pool, make_sandbox):
    pool.size = 0                     # an empty pool: clone3 makes the netns (CLONE_NEWNET)
    sb = make_sandbox()
    inside = f"/proc/{sb.init_pid}/ns/net"
    assert _ino(inside) != _ino("/proc/self/ns/net")
    fd = os.open(inside, os.O_RDONLY | os.O_CLOEXEC)
    try:
        assert _owner_ino(fd) == _ino(f"/proc/{sb.init_pid}/ns/user")
    finally:
        os.close(fd)
    out = py(sb, PROBE).stdout.decode().split("\n")
    assert out[:2] == ["['lo']", "lo-down"], out


def test_the_spawn_closes_the_pooled_fd_and_the_pool_refills(pool, monkeypatch, make_sandbox):
    pool.take(), pool.take()
    assert pool.wait_full()
    given = []
    take = pool.take

    def spy():
        fd = take()
        given.append((fd, _ino(fd)))
        return fd
    monkeypatch.setattr(pool, "take", spy)
    sb = make_sandbox()
    (fd, ino), = given
    assert ino == _ino(f"/proc/{sb.init_pid}/ns/net")
    assert not _is(fd, ino)           # only the sandbox holds it now: it ends with it
    assert pool.wait_full() and ino not in {_ino(f) for f in pool._fds}
    sb.destroy()


def test_a_forked_child_drops_the_pool_it_inherited(pool):
    pool.take(), pool.take()
    assert pool.wait_full()
    inherited = [(fd, _ino(fd)) for fd in pool._fds]
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:                      # the child: nothing inherited may be handed out here
        try:
            ok = pool.held() == 0 and pool.take() != inherited[-1][0] and \
                not any(_is(fd, ino) for fd, ino in inherited)
            os.write(w, b"1" if ok else b"0")
        finally:
            os._exit(0)
    os.close(w)
    assert os.read(r, 1) == b"1"
    os.close(r)
    os.waitpid(pid, 0)
    assert [(fd, _ino(fd)) for fd in pool._fds] == inherited   # the parent's are untouched


def _is(fd: int, ino: int) -> bool:
    try:
        return os.fstat(fd).st_ino == ino
    except OSError:
        return False


def test_the_pool_keeps_as_many_ready_as_were_asked_for(pool):
    """A process that makes one sandbox (sandboxctl run) makes no namespace ahead: each
    made and dropped unused is ~1 ms of kernel work for nothing."""
    assert pool.take() is None        # nothing asked for before: nothing made ahead
    assert pool.wait_full() and pool.held() == 0 and pool._thread is None
    assert pool.take() is None        # a second one: now one is kept ready
    assert pool.wait_full() and pool.held() == 1
    for _ in range(2 * pool.size):
        fd = pool.take()
        if fd is not None:
            os.close(fd)
    assert pool.wait_full() and pool.held() == pool.size


def test_a_filler_that_cannot_start_loses_no_namespace(pool, monkeypatch):
    """take() starts the filler thread before an fd leaves the pool: when the start fails
    (no threads left), the error comes out and every namespace is still the pool's."""
    pool.take()
    pool.take()                          # the second ask starts making them ahead
    assert pool.wait_full()
    held = pool.held()
    assert held >= 1
    monkeypatch.setattr(pool, "_thread", None)          # as if the filler had ended

    def no_thread(self):
        raise RuntimeError("can't start new thread")
    monkeypatch.setattr(namespaces.threading.Thread, "start", no_thread)
    with pytest.raises(RuntimeError):
        pool.take()
    assert pool.held() == held
