"""The one seam between the daemon and the engine (sandbox.runtime.sandbox.Sandbox).

The server only calls what is here, so the HTTP layer, auth and tokens can be unit-tested
with a stand-in engine without root; the integration tests always use `RealEngine`.
"""
from __future__ import annotations

import asyncio
import contextvars
import functools
import logging
import os
import signal
import threading
from pathlib import Path
from typing import Any, Awaitable, Callable, Protocol

from sandbox.client import ExecResult
from sandbox.errors import SandboxError

log = logging.getLogger("sandboxd.engine")

# While a warm sandbox is still ready, its taken sibling's replacement is built only after
# this long without another take (sandbox/runtime/pool.py), so the new sandbox's first
# requests do not compete with a build for the CPU and the GIL. Measured through the API,
# one create + exec /bin/true + destroy every 100 ms: 22-24 -> 14-15 ms (create 9 -> 5 ms);
# back-to-back cycles unchanged (an empty pool still refills at once).
WARM_REFILL_DELAY = 0.05

OutputCallback = Callable[[str, bytes], Awaitable[None] | None]


# What the server reads of a finished command is exactly the client's ExecResult (the
# output fields stay empty here: output went out through on_output and the scanner).
ExecOutcome = ExecResult


class Handle(Protocol):
    id: str

    @property
    def workspace(self) -> str: ...
    @property
    def workspace_owner(self) -> tuple[int, int] | None: ...
    async def exec(self, argv, *, env=None, cwd=None, stdin=None, timeout=None,
                   on_output: OutputCallback | None = None) -> ExecOutcome: ...
    def freeze(self) -> None: ...
    def thaw(self) -> None: ...
    def kill(self) -> None: ...
    def destroy(self) -> dict: ...
    def usage(self) -> dict: ...
    def info(self) -> dict: ...


class Engine(Protocol):
    def create(self, policy, *, sandbox_id: str, workspace: str | None, audit) -> Handle: ...
    def scanner(self, policy): ...


class RealHandle:
    """Wraps sandbox.runtime.sandbox.Sandbox with the names the server uses."""

    def __init__(self, sb):
        self.sb = sb
        self.id = sb.id

    @property
    def workspace(self) -> str:
        """The host directory behind /home/agent/workspace: the caller's, or the one the
        rootfs step made (its step result; the disk step may have put it on a loop image)."""
        if self.sb.ctx.workspace:
            return str(self.sb.ctx.workspace)
        for d in self.sb.lifecycle.done:
            if d.step.name == "rootfs" and d.result:
                return str(d.result)
        raise SandboxError(f"sandbox {self.id} has no workspace directory", step="files")

    @property
    def workspace_owner(self):
        """Files copied into a daemon-made workspace belong to the agent: its host uid/gid
        in this sandbox's uid range. A caller's workspace is idmapped: files keep the owner
        the orchestrator gave its directory (None: the daemon leaves them as written)."""
        ctx = self.sb.ctx
        if ctx.workspace or ctx.uidrange is None:
            return None
        u = ctx.policy.user
        return ctx.uidrange.host_uid(u.uid), ctx.uidrange.host_uid(u.gid)

    async def exec(self, argv, *, env=None, cwd=None, stdin=None, timeout=None, on_output=None):
        r = await self.sb.exec(argv, env=env, cwd=cwd, stdin=stdin, timeout=timeout,
                               on_output=on_output)
        return ExecOutcome(exit_code=r.exit_code, signal=r.signal, reason=str(r.reason),
                           reason_text=getattr(r, "text", "") or "",
                           usage=dict(r.usage or {}), duration=float(r.duration or 0.0))

    def freeze(self):
        self.sb.freeze()

    def thaw(self):
        self.sb.thaw()

    def kill(self):
        self.sb.kill()

    def kill_signal(self) -> int | None:
        """SIGKILL the sandbox's init through its pidfd, now, without waiting; returns a
        duplicate of that pidfd (the caller's to close), which polls readable once init has
        exited, which the kernel completes only after every other process of its pid
        namespace is gone (pid_namespaces(7)). None when init is gone already."""
        pidfd = self.sb.pidfd
        if pidfd is None:
            return None
        fd = os.dup(pidfd)          # ours: the engine closes its own at destroy
        try:
            signal.pidfd_send_signal(fd, signal.SIGKILL)
        except ProcessLookupError:
            pass                    # exited already: the fd polls readable at once
        except BaseException:
            os.close(fd)
            raise
        return fd

    def destroy(self) -> dict:
        report = self.sb.destroy()
        return report if isinstance(report, dict) else {"report": str(report)}

    def usage(self) -> dict:
        return dict(self.sb.usage())

    def info(self) -> dict:
        return dict(self.sb.info())


class RealEngine:
    """The kernel-backed engine. Imports lazily so `sandboxd --help` stays light."""

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        self._scanners: dict[str, Any] = {}
        self._pool = None
        self._pool_key: str | None = None

    # -- warm sandboxes (sandbox/runtime/pool.py) ------------------------------------------
    def start_pool(self, policy, size: int, *, audit, new_id: Callable[[], str]):
        """Keep `size` sandboxes of exactly `policy` (no host directories) built ahead."""
        from sandbox.policy import policy_hash
        from sandbox.runtime.pool import SandboxPool
        from sandbox.runtime.sandbox import Sandbox
        if size <= 0:
            return
        self._pool_key = policy_hash(policy)
        self._pool = SandboxPool(
            lambda: RealHandle(Sandbox.create(policy, audit=audit, state_dir=self.run_dir,
                                              sandbox_id=new_id())),
            size, name=f"warm-{policy.name}", refill_delay=WARM_REFILL_DELAY)

    def take_warm(self, policy, workspace: str | None) -> RealHandle | None:
        """A warm sandbox when the request is exactly the pool's policy and brings no host
        directory; its lifetime starts now. None otherwise (the caller builds one)."""
        if self._pool is None or workspace is not None:
            return None
        from sandbox.policy import policy_hash
        if policy_hash(policy) != self._pool_key:
            return None
        while (h := self._pool.take()) is not None:
            if h.sb.running():
                h.sb.restart_lifetime()
                return h
            # it waited in the pool past its lifetime (or lost its init): never hand it out
            log.warning("warm sandbox %s was no longer running; destroyed instead", h.sb.id)
            try:
                h.destroy()
            except SandboxError as e:
                log.error("warm sandbox %s not fully destroyed: %s (recovery removes it)",
                          h.sb.id, e)
        return None

    def warm_ready(self) -> int:
        return self._pool.ready() if self._pool is not None else 0

    def drain_pool(self) -> list[str]:
        return self._pool.drain() if self._pool is not None else []

    def close_pool(self) -> list[str]:
        pool, self._pool = self._pool, None
        return pool.close() if pool is not None else []

    def create(self, policy, *, sandbox_id: str, workspace: str | None, audit) -> RealHandle:
        from sandbox.runtime.sandbox import Sandbox
        sb = Sandbox.create(policy, workspace=workspace, audit=audit, state_dir=self.run_dir,
                            sandbox_id=sandbox_id)
        return RealHandle(sb)

    def scanner(self, policy):
        """One compiled scanner per scanner policy (compiling hyperscan databases is slow)."""
        from sandbox.policy import policy_hash
        from sandbox.scan import Scanner
        key = policy_hash(policy)
        if key not in self._scanners:
            self._scanners[key] = Scanner.from_policy(policy.scanner)
        return self._scanners[key]

    def recover(self, audit, *, escalations=None, network_sweep: bool = False) -> Any:
        """Clean up what a crashed daemon left behind (the audit engineer's recovery);
        a teardown that leaves something raises a critical escalation."""
        from sandbox.runtime.recovery import recover
        # No id_prefix: sweeping cgroups by name could hit another daemon's sandboxes
        # (tests run several daemons side by side); intent records name everything we made.
        # network_sweep looks only in the daemon's configured host netns, at our prefix.
        return recover(self.run_dir, audit, escalations=escalations,
                       network_sweep=network_sweep)


_calls_lock = threading.Lock()
_calls = 0           # engine calls handed to a worker thread and not yet returned there


def calls_in_flight() -> int:
    """How many call_blocking calls are still running (or queued) in worker threads: a stop
    that finds none can let the interpreter exit normally (its atexit clean-up included)."""
    with _calls_lock:
        return _calls


def _count(delta: int):
    global _calls
    with _calls_lock:
        _calls += delta


async def call_blocking(fn, *args, **kw):
    """Run a blocking engine call off the event loop so other clients keep being served.
    Counted until it returns in its thread, not when its awaiter gives up (a cancelled
    request does not stop the engine call it started)."""
    def run():
        try:
            return fn(*args, **kw)
        finally:
            _count(-1)
    _count(+1)
    try:
        fut = asyncio.get_running_loop().run_in_executor(
            None, functools.partial(contextvars.copy_context().run, run))
    except BaseException:
        _count(-1)             # never handed over (the executor is shut down)
        raise
    return await fut
