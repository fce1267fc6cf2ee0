"""The engine's API: Sandbox.create / exec / freeze / thaw / kill / destroy (docs/internals.md).

create() runs a flat list of named steps (sandbox/runtime/lifecycle.py), each with its undo:
state dir + intent record -> uid range -> cgroup -> disk -> network -> seccomp -> rootfs plan
-> spawn init -> supervisor. Any failure unwinds what was done. destroy() unwinds the
same list and verifies that nothing is left: init gone, no mount, no directory.
"""
from __future__ import annotations

import asyncio
import importlib
import os
import select
import shutil
import signal
import socket
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from sandbox import _native
from sandbox.audit.sink import NULL_SINK, AuditSink
from sandbox.errors import SandboxError, TeardownError, UnsupportedError
from sandbox.kernel import mounts, namespaces, userns
from sandbox.runtime import io as cio
from sandbox.runtime import uidrange
from sandbox.runtime.deadlines import DEADLINES
from sandbox.runtime.intent import Intent, proc_starttime
from sandbox.runtime.lifecycle import Lifecycle, Step
from sandbox.runtime.plan import (ATTR_LOCKDOWN, ATTR_NODEV, ATTR_NOSUID, ATTR_RDONLY, BIND_FD,
                                  MountOp, SpawnPlan)

WORKSPACE = "/home/agent/workspace"
DEFAULT_STATE_DIR = Path("/run/sandboxd")

# Facility steps, in order. Every module is required: a facility that cannot be imported
# stops the sandbox from starting (fail closed). A module's make_step() returns None only when
# the policy does not ask for that control (e.g. network mode "none", disk = 0).
FACILITY_MODULES = ("sandbox.kernel.cgroups", "sandbox.kernel.disk", "sandbox.kernel.network",
                    "sandbox.kernel.seccomp")
SUPERVISOR_MODULE = "sandbox.runtime.supervisor"


@dataclass
class ExecResult:
    exit_code: int | None
    signal: int | None
    reason: str                # exited | signaled | timeout | oom | pids | killed | exec_failed
    text: str                  # a human sentence for the reason
    usage: dict
    duration: float
    stdout: bytes = b""        # collected only when exec() got no on_output
    stderr: bytes = b""

    @property
    def status(self) -> int:
        """Shell-style status: the exit code, or 128+signal."""
        if self.exit_code is not None:
            return self.exit_code
        return 128 + (self.signal or signal.SIGKILL)


@dataclass
class SandboxContext:
    id: str
    policy: Any
    plan: SpawnPlan
    audit: AuditSink
    state_dir: Path
    intent: Any = None
    uidrange: uidrange.UidRange | None = None
    cgroup: Any = None                   # set by the cgroup step (kill/freeze/thaw/usage/reason)
    workspace: str | None = None         # caller's host dir, or None
    context: str | None = None
    shared: str | None = None
    keep_workspace: bool = False
    tmp_dir: str | None = None           # the disk step may give /tmp a host directory
    workspace_dir: str | None = None     # the disk step may give the auto workspace a home
    workspace_host: str | None = None    # the host dir mounted at /home/agent/workspace
    nameservers: tuple = ()              # the network step's resolver for /etc/resolv.conf
    seccomp_listener: Callable[[int, int], None] | None = None  # supervisor: (fd, pid)
    mount_fds: list = field(default_factory=list)
    pidfd: int | None = None
    init_pid: int | None = None
    extra: dict = field(default_factory=dict)


def _facility_step(module: str, ctx: SandboxContext) -> Step | None:
    try:
        make = importlib.import_module(module).make_step
    except (ImportError, AttributeError) as e:
        raise UnsupportedError(f"facility {module} is not available: {e}") from e
    return make(ctx)


# ---- the engine's own steps ------------------------------------------------------------

def _state_step(ctx: SandboxContext) -> Step:
    """The intent record (one append-only file, sandbox/runtime/intent.py). There is no
    per-sandbox directory any more: /etc is a shared view and the root mount point a shared
    empty directory (_rootfs_step)."""
    def do():
        ctx.intent = Intent.create(ctx.state_dir, ctx.id, {"policy": ctx.policy.name})
        return ctx.intent

    def undo(intent: Intent):
        intent.close()
        if os.path.lexists(intent.path):
            raise TeardownError("intent record not removed", leftovers=[str(intent.path)])

    return Step("state", do, undo, describe="intent record", only_if_clean=True)


def _uidrange_step(ctx: SandboxContext) -> Step:
    def do():
        # No intent record: the range is held by a flock that dies with its holder, so a
        # crash can never leak one (an fsynced record would only cost time).
        r = uidrange.allocate(ctx.state_dir)
        ctx.uidrange = r
        p = ctx.plan
        p.uid_base = p.gid_base = r.base
        p.range = r.size
        return r

    def undo(r: uidrange.UidRange):
        r.release()

    return Step("uidrange", do, undo, describe="host uid/gid range")


def _tree_op(path: str, ctx: SandboxContext, attr: int, *, idmap: bool) -> MountOp:
    """A host directory as a detached mount fd for the child (BIND_FD; dst set by the
    rootfs plan). With idmap, the directory's owner appears as the agent inside while its
    files stay owned by that owner on the host (sandbox/kernel/userns.py)."""
    if idmap:
        u, r = ctx.policy.user, ctx.uidrange
        fd = userns.idmapped_dir(path, host_uid=r.host_uid(u.uid), host_gid=r.host_uid(u.gid))
    else:
        fd = _native.open_tree(path)
    ctx.mount_fds.append(fd)
    return MountOp(BIND_FD, "", fd=fd, attr_set=attr)


def _close_mount_fds(ctx: SandboxContext):
    while ctx.mount_fds:
        os.close(ctx.mount_fds.pop())


def _auto_workspace(ctx: SandboxContext) -> str:
    """The workspace the engine makes when the caller gave no host directory, owned by the
    agent's host uid: on the sandbox's disk when the disk step gave it a home there (made
    empty and root-owned with the disk; the disk's undo removes it with the image), else in
    state_dir/workspaces/<id>."""
    u, r = ctx.policy.user, ctx.uidrange
    base = Path(ctx.workspace_dir) if ctx.workspace_dir else ctx.state_dir / "workspaces" / ctx.id
    ctx.intent.add("dir", path=str(base), keep=bool(ctx.keep_workspace))
    if ctx.workspace_dir:
        try:
            st = os.lstat(base)
        except FileNotFoundError:
            os.mkdir(base, 0o755)
        else:
            # made empty with the disk (kernel/disk.py); never chown what is not that
            if not stat.S_ISDIR(st.st_mode) or st.st_uid != 0:
                raise SandboxError(f"the disk's workspace {base} is not a root-owned "
                                   "directory", step="rootfs")
    else:
        base.mkdir(parents=True, mode=0o755)
    os.chown(base, r.host_uid(u.uid), r.host_uid(u.gid), follow_symlinks=False)
    return str(base)


def _rootfs_step(ctx: SandboxContext) -> Step:
    fs = ctx.policy.filesystem
    forbidden = (str(ctx.state_dir),)

    def do():
        ws_attr = ATTR_NOSUID | ATTR_NODEV | (ATTR_RDONLY if fs.workspace == "ro" else 0)
        auto = None
        try:
            if ctx.workspace:
                ws = str(mounts.validate_host_dir(ctx.workspace, "workspace", forbidden))
                ws_op = _tree_op(ws, ctx, ws_attr, idmap=True)
            else:
                ws = auto = _auto_workspace(ctx)
                ws_op = _tree_op(auto, ctx, ws_attr, idmap=False)
            ctx.workspace_host = ws
            context_op = shared_op = tmp_op = None
            if ctx.context:
                c = str(mounts.validate_host_dir(ctx.context, "context", forbidden))
                context_op = _tree_op(c, ctx, ATTR_LOCKDOWN, idmap=False)
            if ctx.shared:
                sh = mounts.validate_host_dir(ctx.shared, "shared", forbidden)
                st = sh.stat()
                for sub in ("incoming", "outgoing"):
                    if not (sh / sub).is_dir():
                        (sh / sub).mkdir(mode=0o755)
                        os.chown(sh / sub, st.st_uid, st.st_gid)
                shared_op = _tree_op(str(sh), ctx, ATTR_NOSUID | ATTR_NODEV, idmap=True)
            if ctx.tmp_dir:
                tmp_op = _tree_op(ctx.tmp_dir, ctx, ATTR_NOSUID | ATTR_NODEV, idmap=False)
            # /etc: the shared read-only view for this content (mounts.etc_view), bound
            # read-only by the plan; the root: a shared empty mount point (mounts.newroot_dir)
            view = ctx.extra["etc_view"] = mounts.etc_view(ctx.state_dir, ctx.policy,
                                                           nameservers=ctx.nameservers)
            etc_op = _tree_op(str(view.path), ctx, 0, idmap=False)
            ctx.plan.root = str(mounts.newroot_dir(ctx.state_dir))
            ctx.plan.mounts = mounts.build_rootfs(
                ctx.policy, etc=etc_op, etc_ops=list(view.ops), workspace=ws_op,
                context=context_op, shared=shared_op, tmp=tmp_op)
        except BaseException as e:
            try:
                _release_rootfs(ctx, auto)
            except Exception as left:  # noqa: BLE001 - reported with the cause, not instead
                if isinstance(e, SandboxError):
                    e.message += f" (and its cleanup left: {left})"
            raise
        return auto    # the daemon reads the workspace it made from here (daemon/engine.py)

    def undo(auto: str | None):
        _release_rootfs(ctx, auto)

    return Step("rootfs", do, undo, describe="filesystem plan, /etc, workspace")


def _release_rootfs(ctx: SandboxContext, auto: str | None) -> None:
    """Undo of the rootfs step (also when it fails half-way): mount fds, the workspace the
    engine made (not one on the disk: the disk's undo removes the whole image), the /etc view."""
    try:
        _close_mount_fds(ctx)
        if auto and not ctx.keep_workspace and auto != ctx.workspace_dir:
            # Intent entries are not removed one by one on the way down: every cleanup is
            # idempotent, and the state step's undo deletes the whole record at the end.
            if os.path.lexists(auto):
                shutil.rmtree(auto)
            if os.path.lexists(auto):
                raise TeardownError("workspace not removed", leftovers=[auto])
    finally:
        view = ctx.extra.pop("etc_view", None)
        if view is not None:
            view.release()


def _spawn_step(ctx: SandboxContext) -> Step:
    def do():
        pooled = None
        if ctx.plan.netns_fd is None:   # no network step: an empty netns, made ahead if ready
            pooled = ctx.plan.netns_fd = namespaces.NETNS_POOL.take()
        try:
            child = _native.spawn(ctx.plan)
        finally:
            _close_mount_fds(ctx)  # the child has its copies (or failed)
            if pooled is not None:  # init is in it now (or failed): it ends with the sandbox
                os.close(pooled)
                ctx.plan.netns_fd = None
        ctx.pidfd, ctx.init_pid = child.pidfd, child.pid
        ctx.extra["init_starttime"] = proc_starttime(child.pid)
        ctx.intent.add("process", pid=child.pid, starttime=ctx.extra["init_starttime"])
        return child

    def undo(child: _native.Child):
        ctl = ctx.extra.pop("ctl", None)
        if ctl is not None:
            ctl.close()  # init exits when its control socket closes
        else:
            os.close(child.ctl_fd)
        if not _wait_pidfd(child.pidfd, 2.0):
            _kill_init(ctx)
            if not _wait_pidfd(child.pidfd, 10.0):
                raise TeardownError("init did not exit", leftovers=[f"pid {child.pid}"])
        try:
            os.waitid(os.P_PIDFD, child.pidfd, os.WEXITED)
        except ChildProcessError:
            pass  # already reaped by someone else
        os.close(child.pidfd)
        ctx.pidfd = None

    return Step("spawn", do, undo, describe="clone3 the sandbox's init")


def _wait_pidfd(pidfd: int, seconds: float) -> bool:
    """A pidfd polls readable once its process exited (pidfd_open(2))."""
    p = select.poll()
    p.register(pidfd, select.POLLIN)
    return bool(p.poll(int(seconds * 1000)))


def _kill_init(ctx: SandboxContext):
    """Kill the whole sandbox: the cgroup if there is one, else init (its pid namespace
    dies with it: pid_namespaces(7))."""
    if ctx.cgroup is not None:
        ctx.cgroup.kill()
    if ctx.pidfd is not None:
        try:
            signal.pidfd_send_signal(ctx.pidfd, signal.SIGKILL)
        except ProcessLookupError:
            pass


def build_steps(ctx: SandboxContext) -> list[Step]:
    steps = [_state_step(ctx), _uidrange_step(ctx)]
    for module in FACILITY_MODULES:
        s = _facility_step(module, ctx)
        if s is not None:
            steps.append(s)
    steps += [_rootfs_step(ctx), _spawn_step(ctx)]
    s = _facility_step(SUPERVISOR_MODULE, ctx)
    if s is not None:
        steps.append(s)
    return steps


class Sandbox:
    def __init__(self, ctx: SandboxContext, lifecycle: Lifecycle):
        self.ctx = ctx
        self.lifecycle = lifecycle
        self.created = time.time()
        self._ctl = socket.socket(fileno=ctx.extra.pop("ctl_fd"))
        ctx.extra["ctl"] = self._ctl
        self._dead_reason: tuple[str, str] | None = None
        self._destroyed = False
        self._timer = None
        self.restart_lifetime()

    def running(self) -> bool:
        """Init is alive and nothing has killed the sandbox (a warm one may have outlived its
        lifetime in the pool, or lost its init)."""
        return (not self._destroyed and self._dead_reason is None
                and not _wait_pidfd(self.ctx.pidfd, 0))

    def restart_lifetime(self):
        """Count the sandbox's lifetime (policy.timeout) from now: at creation, and again
        when a warm sandbox is handed out of a pool (sandbox/runtime/pool.py)."""
        if self._timer is not None:
            self._timer.cancel()
        self.created = time.time()
        self._timer = DEADLINES.schedule(self.ctx.policy.timeout, self._expire)

    # ---- creation ----------------------------------------------------------------------
    @classmethod
    def create(cls, policy, *, workspace=None, context=None, shared=None, keep_workspace=None,
               audit: AuditSink = NULL_SINK, state_dir: Path = DEFAULT_STATE_DIR,
               sandbox_id: str | None = None, _fail_in_child: bool = False,
               plan_fields: dict | None = None, **ctx_fields) -> "Sandbox":
        """Build a sandbox (sync). ctx_fields set SandboxContext attributes and plan_fields
        SpawnPlan fields before the steps run (tests: cgroup_parent, a hand-made netns_fd or
        seccomp_bpf; a facility step that runs later sets its own fields over them)."""
        sid = sandbox_id or os.urandom(6).hex()   # 48 random bits, as uuid4().hex[:12] had
        fs = policy.filesystem
        plan = SpawnPlan(uid=policy.user.uid, gid=policy.user.gid, hostname=policy.hostname,
                         rlim_nofile=policy.limits.nofile, rlim_core=policy.limits.core,
                         rlim_fsize=policy.limits.fsize, test_fail_step=int(_fail_in_child))
        ctx = SandboxContext(
            id=sid, policy=policy, plan=plan, audit=audit, state_dir=Path(state_dir),
            workspace=os.fspath(workspace) if workspace else None,
            context=os.fspath(context) if context else None,
            shared=os.fspath(shared) if shared else (fs.shared or None),
            keep_workspace=fs.keep_workspace if keep_workspace is None else keep_workspace)
        for k, v in (plan_fields or {}).items():
            if not hasattr(plan, k):
                raise TypeError(f"SpawnPlan has no field {k!r}")
            setattr(plan, k, v)
        for k, v in ctx_fields.items():
            setattr(ctx, k, v)  # e.g. cgroup_parent (read by the cgroup step with getattr)
        life = Lifecycle(sid, audit)
        try:
            for step in build_steps(ctx):
                life.run(step)
        except BaseException as e:
            failures = life.unwind()
            if failures and isinstance(e, SandboxError):
                e.message += f" (and the unwind left: {'; '.join(failures)})"
            raise
        child = life.done[[d.step.name for d in life.done].index("spawn")].result
        ctx.extra["ctl_fd"] = child.ctl_fd
        audit.record("sandbox_create", sandbox=sid, details={"policy": policy.name,
                                                             "uid_base": plan.uid_base})
        return cls(ctx, life)

    @property
    def id(self) -> str:
        return self.ctx.id

    @property
    def pidfd(self) -> int | None:
        return self.ctx.pidfd

    @property
    def init_pid(self) -> int | None:
        return self.ctx.init_pid

    # ---- commands ----------------------------------------------------------------------
    async def exec(self, argv, *, env: dict | None = None, cwd: str | None = None, stdin=None,
                   timeout: float | None = None, on_output=None) -> ExecResult:
        if self._destroyed:
            raise SandboxError(f"sandbox {self.id} is destroyed", step="exec")
        if self._dead_reason:
            raise SandboxError(f"sandbox {self.id} is not running ({self._dead_reason[1]})",
                               step="exec")
        argv = [os.fspath(a) for a in argv]
        request = cio.pack_request(argv, cio.command_env(self.ctx.policy, env), cwd or WORKSPACE)
        timeout = timeout or self.ctx.policy.command_timeout
        t0 = time.monotonic()
        mark = self.ctx.cgroup.mark() if self.ctx.cgroup is not None else None  # per-command figures
        chan = cio.CommandIO.open(stdin)
        try:
            chan.send(self._ctl, request)
        except OSError as e:
            chan.close_parent_ends()          # (the child ends: in the finally, once)
            raise SandboxError(f"sandbox {self.id} is not running", step="exec",
                               errno=e.errno, syscall="sendmsg") from None
        finally:
            chan.close_child_ends()
        out, err = ([], []) if on_output is None else (None, None)
        reader = cio.CommandReader(chan, on_output, {"stdout": out, "stderr": err},
                                   self._listener)
        # stdin is fed on the side: a command may exit without reading it all (or a
        # terminal may never send EOF); the command is done when its outputs and report are
        feeder = (asyncio.ensure_future(cio.feed_stdin(chan.stdin_parent, stdin))
                  if chan.stdin_parent is not None else None)
        timed_out = False
        try:
            reader.start()
            if not reader.done.done():
                await asyncio.wait((reader.done,), timeout=timeout)
            if not reader.done.done():
                timed_out = True
                self._kill_for("timeout", f"command exceeded its {timeout:g} s time limit; "
                                          "the sandbox was killed")
                await asyncio.wait((reader.done,), timeout=10)  # outputs end as it dies
                if reader.done.done() and not reader.done.cancelled():
                    reader.done.exception()      # (seen: the timeout is what is reported)
            else:
                reader.done.result()             # raises what a channel or on_output raised
        finally:
            # on a timeout, a cancelled caller or a failing on_output: nothing keeps running
            if not reader.done.done():
                reader.done.cancel()
            if feeder is not None:
                feeder.cancel()
            reader.stop()            # (before any await: a second cancellation may end one)
            chan.report.close()
            await reader.close()
            if feeder is not None:
                await asyncio.gather(feeder, return_exceptions=True)
        reports = reader.reports
        res = self._result(argv, reports, timed_out, time.monotonic() - t0, mark)
        if out is not None:
            res.stdout, res.stderr = b"".join(out), b"".join(err)
        self.ctx.audit.record("exec", sandbox=self.id, outcome=res.reason,
                              details={"argv0": argv[0], "exit_code": res.exit_code,
                                       "signal": res.signal}, duration_ms=res.duration * 1000)
        return res

    def _listener(self, fd: int, pid: int):
        handler = self.ctx.seccomp_listener
        if handler is None:
            os.close(fd)  # nobody supervises: notified syscalls then fail with ENOSYS
        else:
            handler(fd, pid)

    def _result(self, argv, reports, timed_out: bool, duration: float, mark=None) -> ExecResult:
        # this command's cpu time, memory peak and oom/pids events (cgroups.since)
        usage = self.ctx.cgroup.since(mark) if mark is not None else self.usage()
        by = {r.kind: r for r in reports}
        if timed_out or cio.EXITED not in by:
            reason, text = self._dead_reason or ("killed", "the sandbox was killed")
            if self._dead_reason is None and self.ctx.cgroup is not None:
                code, why = self.ctx.cgroup.reason(usage)  # v2 memory.oom.group kills init too
                if code:
                    reason, text = self._dead_reason = (code, why)
            return ExecResult(None, signal.SIGKILL, reason, text, usage, duration)
        status = by[cio.EXITED].status
        for kind in (cio.EXEC_FAILED, cio.SETUP_FAILED):
            if kind in by:
                r = by[kind]
                return ExecResult(os.waitstatus_to_exitcode(status), None, "exec_failed",
                                  f"cannot execute {argv[0]}: {r.syscall}: {os.strerror(r.err)}",
                                  usage, duration)
        if os.WIFSIGNALED(status):
            sig = os.WTERMSIG(status)
            reason, text = "signaled", f"killed by signal {signal.Signals(sig).name}"
            if self.ctx.cgroup is not None:
                code, why = self.ctx.cgroup.reason(usage)
                if code:
                    reason, text = code, why
            return ExecResult(None, sig, reason, text, usage, duration)
        code = os.WEXITSTATUS(status)
        if code and self.ctx.cgroup is not None:  # failed after fork hit pids.max: say so
            limit, why = self.ctx.cgroup.reason(usage)
            if limit == "pids":
                return ExecResult(code, None, "pids", f"{why} (exited with status {code})",
                                  usage, duration)
        return ExecResult(code, None, "exited", f"exited with status {code}", usage, duration)

    # ---- control -----------------------------------------------------------------------
    def _kill_for(self, reason: str, text: str):
        if self._dead_reason is None:
            self._dead_reason = (reason, text)
            self.ctx.audit.record("sandbox_kill", sandbox=self.id, outcome=reason,
                                  details={"reason": text})
        _kill_init(self.ctx)

    def _expire(self):
        if not self._destroyed:
            self._kill_for("timeout", f"sandbox lifetime of {self.ctx.policy.timeout:g} s expired")

    def kill(self):
        self._kill_for("killed", "killed by the operator")

    def freeze(self):
        if self.ctx.cgroup is None:
            raise UnsupportedError("freeze needs the sandbox's cgroup (no cgroup step ran)")
        self.ctx.cgroup.freeze()

    def thaw(self):
        if self.ctx.cgroup is None:
            raise UnsupportedError("thaw needs the sandbox's cgroup (no cgroup step ran)")
        self.ctx.cgroup.thaw()

    def usage(self) -> dict:
        u = self.ctx.cgroup.usage() if self.ctx.cgroup is not None else {}
        net = self.ctx.extra.get("network")  # set by the network step (kernel/network.py)
        if net is not None:
            u.update(net.usage())  # net_tx_bytes, net_rx_bytes, net_drops
        return u

    def info(self) -> dict:
        c = self.ctx
        return {"id": c.id, "policy": c.policy.name, "init_pid": c.init_pid,
                "uid_base": c.plan.uid_base, "workspace": c.workspace, "created": self.created,
                "state": ("destroyed" if self._destroyed else
                          "dead" if self._dead_reason else "running"),
                "reason": self._dead_reason[1] if self._dead_reason else None}

    def destroy(self) -> dict:
        """Unwind every step, newest first, and verify nothing is left."""
        if self._destroyed:
            return {"id": self.id, "leftovers": []}
        self._destroyed = True
        self._timer.cancel()
        pid = self.ctx.init_pid
        failures = self.lifecycle.unwind()
        leftovers = list(failures)
        if pid and os.path.exists(f"/proc/{pid}") and _same_process(pid, self.ctx):
            leftovers.append(f"process {pid}")
        self.ctx.audit.record("sandbox_destroy", sandbox=self.id,
                              outcome="ok" if not leftovers else "error",
                              details={"leftovers": len(leftovers)})
        if leftovers:
            raise TeardownError(f"destroy of sandbox {self.id} left things behind",
                                leftovers=leftovers)
        return {"id": self.id, "leftovers": []}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.destroy()


def _same_process(pid: int, ctx: SandboxContext) -> bool:
    """Is `pid` still our init (not a reused pid)? Compares the recorded start time."""
    st = ctx.extra.get("init_starttime")
    return st is None or proc_starttime(pid) == st
