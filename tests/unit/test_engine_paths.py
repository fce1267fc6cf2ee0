"""Engine pieces that need no root: caller path validation, the command environment,
exec requests, the rootfs plan and uid range slots."""
import dataclasses
import os

import pytest

from sandbox.errors import PolicyError, SandboxError
from sandbox.kernel import mounts
from sandbox.policy import load_policy
from sandbox.runtime import io as cio
from sandbox.runtime import plan as P
from sandbox.runtime import uidrange


@pytest.fixture
def policy():
    return load_policy("default")


def test_a_valid_directory_is_accepted(tmp_path):
    assert mounts.validate_host_dir(str(tmp_path), "workspace") == tmp_path.resolve()


@pytest.mark.parametrize("bad, why", [
    ("relative/dir", "absolute"),
    ("", "absolute"),
    ("/", "root directory"),
    ("/proc", "under /proc"),
    ("/proc/self", "symlink"),
    ("/sys/kernel", "under /sys"),
    ("/dev", "under /dev"),
    ("/etc", "under /etc"),
])
def test_forbidden_paths_are_refused(bad, why):
    with pytest.raises(PolicyError, match=why) as ei:
        mounts.validate_host_dir(bad, "workspace")
    assert "workspace" in str(ei.value)


def test_missing_file_and_symlinked_paths_are_refused(tmp_path):
    with pytest.raises(PolicyError, match="not an existing directory"):
        mounts.validate_host_dir(str(tmp_path / "missing"), "context")
    (tmp_path / "f").write_text("x")
    with pytest.raises(PolicyError, match="not an existing directory"):
        mounts.validate_host_dir(str(tmp_path / "f"), "context")
    (tmp_path / "link").symlink_to("/etc")
    with pytest.raises(PolicyError, match="symlink"):
        mounts.validate_host_dir(str(tmp_path / "link"), "context")
    (tmp_path / "d").mkdir()
    with pytest.raises(PolicyError, match="symlink"):  # ../ games resolve differently
        mounts.validate_host_dir(str(tmp_path / "link" / ".." / "d"), "context")


def test_extra_forbidden_roots(tmp_path):
    (tmp_path / "state" / "x").mkdir(parents=True)
    with pytest.raises(PolicyError, match="never mounted"):
        mounts.validate_host_dir(str(tmp_path / "state" / "x"), "workspace",
                                 (str(tmp_path / "state"),))


def test_command_env_is_policy_plus_allowlist_only(policy, monkeypatch):
    monkeypatch.setenv("SBXT_HOST_ONLY", "host-value")
    env = dict(e.split("=", 1) for e in cio.command_env(policy, {"TZ": "UTC"}))
    assert env["HOME"] == "/home/agent" and env["USER"] == env["LOGNAME"] == "agent"
    assert env["TZ"] == "UTC" and env["PATH"] == dict(policy.environment.set)["PATH"]
    assert "SBXT_HOST_ONLY" not in env
    assert not set(env) - {"HOME", "USER", "LOGNAME", "TZ", *dict(policy.environment.set)}


def test_a_variable_outside_the_allowlist_is_refused_by_name(policy):
    with pytest.raises(PolicyError) as ei:
        cio.command_env(policy, {"AWS_SECRET_ACCESS_KEY": "value-never-shown"})
    assert "AWS_SECRET_ACCESS_KEY" in str(ei.value)
    assert "value-never-shown" not in str(ei.value)


def test_exec_request_layout_and_limits():
    data = cio.pack_request(["ls", "-l"], ["A=1"], "/w")
    assert data[:16] == cio._HDR.pack(cio.MAGIC, 2, 1, 0)
    assert data[16:] == b"/w\0ls\0-l\0A=1\0"
    with pytest.raises(SandboxError, match="NUL"):
        cio.pack_request(["a\0b"], [], "/")
    with pytest.raises(SandboxError, match="empty"):
        cio.pack_request([], [], "/")
    with pytest.raises(SandboxError, match="too long"):
        cio.pack_request(["x" * cio.MAX_REQUEST], [], "/")


def _plan(policy):
    fd_op = P.MountOp(P.BIND_FD, "", fd=99)
    return mounts.build_rootfs(policy, etc=fd_op, etc_ops=[], workspace=fd_op, context=None,
                               shared=None)


def test_rootfs_plan_masks_proc_and_ends_pivoted_read_only(policy):
    ops = _plan(policy)
    assert all(not op.dst.startswith("/") for op in ops[:-1])  # relative to the new root
    assert [o.kind for o in ops[-2:]] == [P.PIVOT, P.SETATTR]
    assert ops[-1].dst == "/" and ops[-1].attr_set & P.ATTR_RDONLY
    masked = {o.dst for o in ops if o.kind == P.MASK}
    assert {"proc/kcore", "proc/sysrq-trigger", "proc/keys", "proc/timer_list"} <= masked
    proc_sys = [o for o in ops if o.dst == "proc/sys" and o.kind == P.BIND]
    assert proc_sys and proc_sys[0].attr_set & P.ATTR_RDONLY
    binds = {o.dst: o for o in ops if o.kind == P.BIND and o.src.startswith("/usr")}
    assert binds["usr"].attr_set & P.ATTR_NOSUID and binds["usr"].attr_set & P.ATTR_RDONLY
    devs = {o.dst for o in ops if o.kind == P.BIND and o.dst.startswith("dev/")}
    assert devs == {f"dev/{n}" for n in mounts.DEV_NODES}
    assert not any(o.dst.startswith("sys") for o in ops)  # no /sys at all
    home_ro = [o for o in ops if o.kind == P.SETATTR and o.dst == "home/agent"]
    assert home_ro and home_ro[0].attr_set & P.ATTR_RDONLY


def test_generated_etc_has_the_agent_and_no_host_secrets(policy, tmp_path):
    view = mounts.etc_view(tmp_path, policy)
    try:
        names = sorted(p.name for p in view.path.iterdir())
        assert "shadow" not in names and "passwd" in names and "resolv.conf" in names
        assert "agent:x:1000:1000::/home/agent:/bin/sh" in (view.path / "passwd").read_text()
    finally:
        view.release()
        mounts.clear_etc_cache()


def test_uid_ranges_are_exclusive_while_held(tmp_path):
    a = uidrange.allocate(tmp_path)
    b = uidrange.allocate(tmp_path)
    try:
        assert a.base != b.base and abs(a.base - b.base) >= uidrange.SIZE
        assert a.base >= uidrange.BASE and uidrange.in_use(tmp_path, a.base)
    finally:
        a.release()
        b.release()
    assert not uidrange.in_use(tmp_path, a.base)
    c = uidrange.allocate(tmp_path)
    assert c.base == a.base  # released slots are reused
    c.release()


def test_rootfs_plans_share_one_frozen_template_and_keep_their_own_fds(policy):
    ws = lambda fd: P.MountOp(P.BIND_FD, "", fd=fd, attr_set=P.ATTR_NOSUID)  # noqa: E731
    etc = P.MountOp(P.BIND_FD, "", fd=7)
    a = mounts.build_rootfs(policy, etc=etc, etc_ops=[], workspace=ws(11), context=None,
                            shared=None)
    b = mounts.build_rootfs(policy, etc=etc, etc_ops=[], workspace=ws(12), context=None,
                            shared=None)
    assert a.template is b.template and len(a) == len(b) == len(a.template)
    fds = lambda ops: {o.dst: o.fd for o in ops if o.fd != -1}  # noqa: E731
    assert fds(a) == {"etc": 7, "home/agent/workspace": 11}
    assert fds(b) == {"etc": 7, "home/agent/workspace": 12}
    assert all(o.fd == -1 for o in a.template)            # the template holds no fd
    assert sum(x is not y for x, y in zip(a, b)) == 2     # all else is the same objects
    with pytest.raises(dataclasses.FrozenInstanceError):
        a[0].dst = "elsewhere"                            # shared: nobody may change one
    # other inputs, another plan: a context dir adds its bind
    c = mounts.build_rootfs(policy, etc=etc, etc_ops=[], workspace=ws(11), context=ws(13),
                            shared=None)
    assert c.template is not a.template and fds(c)["home/agent/context"] == 13


def test_the_c_mount_list_follows_a_changed_plan_not_its_template(policy):
    from sandbox import _native
    etc = P.MountOp(P.BIND_FD, "", fd=7)
    plan = mounts.build_rootfs(policy, etc=etc, etc_ops=[], workspace=etc, context=None,
                               shared=None)
    assert _native._signature(plan) == ("rootfs", id(plan.template))
    changed = mounts.RootfsOps(plan)
    changed.template = plan.template
    changed[0] = dataclasses.replace(changed[0], attr_set=0)   # e.g. a bind made writable
    sig = _native._signature(changed)
    assert sig[0] != "rootfs" and sig[0][6] == 0               # read op by op
    changed.append(P.MountOp(P.MKDIR, "extra"))
    assert _native._signature(changed)[-1][3] == "extra"
    keep: list = []
    arr = _native._c_mounts(changed, keep)
    assert arr[0].attr_set == 0 and _native.ffi.string(arr[len(changed) - 1].dst) == b"extra"


def test_the_etc_spec_is_worked_out_again_when_the_host_etc_binds_change(policy, monkeypatch):
    calls = []
    real = mounts._etc_spec
    monkeypatch.setattr(mounts, "_etc_spec", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setattr(mounts, "_etc_specs", {})
    first = mounts._etc_spec_cached(policy, ())
    assert mounts._etc_spec_cached(policy, ()) == first and len(calls) == 1
    assert mounts._etc_spec_cached(policy, ("10.0.0.1",))[3] != first[3]   # resolver
    host = mounts._host_etc(policy)
    monkeypatch.setattr(mounts, "_host_etc", lambda p: (None,) + host[1:])  # one went
    mounts._etc_spec_cached(policy, ())
    assert len(calls) == 3
