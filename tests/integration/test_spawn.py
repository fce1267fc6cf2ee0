"""The C spawn path's own bookkeeping on the real kernel: the child shares the caller's
memory until it executes init (CLONE_VM | CLONE_VFORK from a cloning thread, csrc/spawn.c),
so whatever sbx_spawn sets up for it (the thread, the child's stack, the v1 cgroup fds)
must be gone afterwards, whether the spawn worked or failed in the child."""
import ctypes
import os
import threading

import pytest

from sandbox.errors import SpawnError
from sandbox.kernel import namespaces
from sandbox.runtime import sandbox as sbmod
from tests.helpers.engine import engine_policy, make_sandbox, run, state_dir  # noqa: F401

ROUNDS = 12


def _threads() -> int:
    return len(os.listdir("/proc/self/task"))


def _anon_maps() -> int:
    """Private anonymous mappings of this process (a leaked child stack would add one)."""
    with open("/proc/self/maps") as f:
        return sum(1 for line in f if len(line.split()) == 5)


def _fds() -> int:
    """Open fds but the netns pool's (it refills on its own thread after a spawn took
    one, and keeps more ready as more are asked for: tests/integration/test_netns_pool.py
    checks its fds), once it is full."""
    pool = namespaces.NETNS_POOL
    assert pool.wait_full(), pool.error
    return len(os.listdir("/proc/self/fd")) - pool.held()


def _grew(before: tuple[int, int]) -> bool:
    """More threads or fds than before? (Fewer is fine: timer threads of sandboxes made by
    earlier tests may end meanwhile.)"""
    return _threads() > before[0] or _fds() > before[1]


def test_spawns_leave_no_thread_stack_or_fd_behind(make_sandbox):
    for _ in range(2):             # first use: imports, caches, the netns pool's thread
        make_sandbox().destroy()
    before = _threads(), _fds()
    maps = _anon_maps()
    for _ in range(ROUNDS):
        sb = make_sandbox()
        assert run(sb, ["true"]).exit_code == 0
        sb.destroy()
    assert not _grew(before), (before, _threads(), _fds())
    # glibc may keep an arena or two; a leaked 256 KiB child stack per spawn would be ROUNDS
    assert _anon_maps() - maps < ROUNDS // 2


def test_failed_spawns_leave_no_thread_stack_or_fd_behind(state_dir):
    for _ in range(2):             # first use (as above)
        with pytest.raises(SpawnError):
            sbmod.Sandbox.create(engine_policy(), state_dir=state_dir, _fail_in_child=True)
    before = _threads(), _fds()
    maps = _anon_maps()
    for _ in range(ROUNDS):
        with pytest.raises(SpawnError, match="injected"):
            sbmod.Sandbox.create(engine_policy(), state_dir=state_dir, _fail_in_child=True)
    assert not _grew(before), (before, _threads(), _fds())
    assert _anon_maps() - maps < ROUNDS // 2


def test_caller_is_non_dumpable_after_a_spawn(make_sandbox):
    """The child's uid change would mark the shared memory non-dumpable anyway; the spawn
    path does it on purpose, so the caller's secrets never land in a core dump."""
    make_sandbox()
    libc = ctypes.CDLL(None, use_errno=True)
    PR_GET_DUMPABLE = 3
    assert libc.prctl(PR_GET_DUMPABLE, 0, 0, 0, 0) == 0


def test_spawns_from_several_threads_at_once(make_sandbox):
    """The daemon spawns from a thread pool: each spawn has its own cloning thread and
    child stack, and no child may run on another's."""
    errors, made = [], []
    lock = threading.Lock()

    def one():
        try:
            sb = make_sandbox()
            res = run(sb, ["sh", "-c", "echo $$"])
            with lock:
                made.append((sb, res))
        except Exception as e:  # noqa: BLE001 - collected and asserted below
            with lock:
                errors.append(e)

    workers = [threading.Thread(target=one) for _ in range(6)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=120)
    assert not errors, errors
    assert len(made) == 6
    assert all(res.exit_code == 0 and res.stdout.strip().isdigit() for _, res in made)
    assert len({sb.init_pid for sb, _ in made}) == 6


def test_mount_templates_are_copied_per_spawn():
    """The C mount list comes from a cached template (sandbox/_native.py): each spawn gets
    its own copy with its own mount fds; the template keeps none."""
    from sandbox import _native
    from sandbox.runtime.plan import BIND_FD, MountOp
    ops = lambda fd: [MountOp(6, "tmp"), MountOp(BIND_FD, "tmp", fd=fd),  # noqa: E731
                      MountOp(6, "home/agent/shared", mode=0o700)]
    keep_a, keep_b = [], []
    a = _native._c_mounts(ops(11), keep_a)
    b = _native._c_mounts(ops(12), keep_b)
    assert a != b and (a[1].fd, b[1].fd) == (11, 12)
    assert (a[0].fd, a[2].mode) == (-1, 0o700)
    tmpl = next(t for t in keep_a if isinstance(t, tuple))[0]
    assert tmpl[1].fd == -1
    assert _native.ffi.string(b[2].dst) == b"home/agent/shared"


def test_masks_and_device_nodes_are_locked_down(make_sandbox):
    """Every /proc mask is read-only, nosuid, nodev, noexec (later masks bind the first one
    of their kind: a bind takes the flags of the mount it binds), every device node nosuid
    and noexec (set on all of them at once), as the sandbox's own mount table says."""
    from sandbox.kernel import mounts
    sb = make_sandbox()
    table = {}
    with open(f"/proc/{sb.init_pid}/mountinfo") as f:
        for line in f:
            fields = line.split()
            table[fields[4]] = set(fields[5].split(","))
    masked = [f"/proc/{n}" for n in mounts.PROC_MASKED if os.path.lexists(f"/proc/{n}")]
    assert len(masked) >= 3
    for path in masked:
        assert {"ro", "nosuid", "nodev", "noexec"} <= table[path], (path, table.get(path))
    for name in mounts.DEV_NODES:
        assert {"nosuid", "noexec"} <= table[f"/dev/{name}"], name
    assert "nodev" not in table["/dev/null"]        # (a device node that works)
