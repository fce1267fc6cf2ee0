"""Seccomp policy resolution, validation and compilation (no root: nothing is installed)."""
from __future__ import annotations

import struct
from pathlib import Path

import pytest

from sandbox.errors import PolicyError
from sandbox.kernel import seccomp
from sandbox.policy import load_policy, policy_from_dict

GROUP_DIR = Path(__file__).resolve().parents[2] / "policies" / "seccomp"


def _sec(**kw):
    return policy_from_dict({"seccomp": kw}).seccomp


def test_every_group_file_parses_and_names_only_known_syscalls():
    names = ["@" + p.stem for p in GROUP_DIR.glob("*.toml")]
    assert "@default" in names and len(names) >= 10
    for n in names:
        assert seccomp.expand_groups([n]), n


def test_default_allows_what_build_workloads_need():
    rules = seccomp.resolve_rules(load_policy("default").seccomp)
    # seen with strace -f on sh/python3/gcc/git/tar/make
    needed = {"read", "write", "openat", "newfstatat", "execve", "clone", "vfork", "wait4", "pipe2",
              "mmap", "mprotect", "futex", "rseq", "getrandom", "statx", "faccessat2", "socket",
              "connect", "utimensat", "fchown", "rename", "getdents64", "close_range", "ioctl",
              "prlimit64", "set_robust_list", "sched_getaffinity", "epoll_create1", "personality"}
    assert needed <= set(rules.allow)


def test_fixed_deny_list_is_never_allowed_by_default():
    rules = seccomp.resolve_rules(load_policy("default").seccomp)
    hard = set(seccomp.FIXED_DENY) - set(seccomp.ARG_FILTERED)
    assert not hard & set(rules.allow)
    assert hard <= set(rules.deny)
    assert "clone3" not in rules.allow and "clone3" not in rules.deny


@pytest.mark.parametrize("name", ["mount", "ptrace", "bpf", "io_uring_setup", "unshare", "clone3"])
def test_policy_cannot_allow_a_fixed_deny_syscall(name):
    with pytest.raises(PolicyError, match=r"seccomp\.allow: .*fixed deny list"):
        _sec(allow=[name])


@pytest.mark.parametrize("field,value,pattern", [
    ("allow", ["getpidd"], r"seccomp\.allow: unknown syscall 'getpidd'"),
    ("deny", ["nosuchcall"], r"seccomp\.deny: unknown syscall 'nosuchcall'"),
    ("groups", ["@nope"], r"seccomp\.groups: unknown group '@nope' \(known: .*@default"),
    ("groups", ["default"], r"seccomp\.groups: not a group name"),
    ("socket_families", ["netlink"], r"socket_families: 'netlink' cannot be granted"),
    ("socket_families", ["martian"], r"socket_families: unknown family 'martian'"),
    ("deny", ["execve"], r"seccomp\.deny: 'execve' is needed"),
])
def test_invalid_sections_name_the_field(field, value, pattern):
    with pytest.raises(PolicyError, match=pattern):
        _sec(**{field: value})


def test_group_errors_name_the_file(tmp_path, monkeypatch):
    (tmp_path / "seccomp").mkdir()
    (tmp_path / "seccomp" / "bad.toml").write_text('syscalls = ["read", "frobnicate"]\n')
    (tmp_path / "seccomp" / "evil.toml").write_text('syscalls = ["mount"]\n')
    (tmp_path / "seccomp" / "loop.toml").write_text('include = ["@loop"]\nsyscalls = []\n')
    monkeypatch.setenv("SANDBOXD_POLICY_DIR", str(tmp_path))
    with pytest.raises(PolicyError, match=r"bad.toml\): unknown syscall 'frobnicate'"):
        _sec(groups=["@bad"])
    with pytest.raises(PolicyError, match=r"'mount' is on the fixed deny list"):
        _sec(groups=["@evil"])
    with pytest.raises(PolicyError, match=r"includes itself"):
        _sec(groups=["@loop"])


def test_policy_deny_removes_from_allow_and_reports():
    rules = seccomp.resolve_rules(_sec(deny=["fork", "socket"]))
    assert "fork" not in rules.allow and {"fork", "socket"} <= set(rules.deny)


def test_compile_is_cached_and_within_kernel_limits():
    sec = load_policy("default").seccomp
    a = seccomp.compile_policy(sec)
    assert seccomp.compile_policy(sec) is a
    assert len(a) % 8 == 0 and 0 < len(a) // 8 <= seccomp.BPF_MAXINSNS
    b = seccomp.compile_policy(_sec(notify=False))
    assert b != a


def _insns(prog: bytes):
    return [struct.unpack_from("=HBBI", prog, i) for i in range(0, len(prog), 8)]


def test_no_rule_returns_allow_for_deny_listed_numbers_in_the_program():
    """Every SECCOMP_RET the program can return is one of the actions we chose."""
    prog = seccomp.compile_policy(load_policy("default").seccomp)
    rets = {k for code, _, _, k in _insns(prog) if code == 0x06}
    allowed = {seccomp.SECCOMP_RET_ALLOW, seccomp.SECCOMP_RET_USER_NOTIF,
               seccomp.SECCOMP_RET_ERRNO | 1, seccomp.SECCOMP_RET_ERRNO | 38,
               seccomp.SECCOMP_RET_ERRNO | 97}
    assert rets <= allowed, {hex(r) for r in rets - allowed}
    assert seccomp.SECCOMP_RET_USER_NOTIF in rets


def test_guard_prologue_jumps_stay_inside_and_compare_low_words():
    deny = seccomp.SECCOMP_RET_USER_NOTIF
    pro = _insns(seccomp._guard_prologue(deny))
    n = len(pro)
    for i, (code, jt, jf, k) in enumerate(pro):
        if code in (0x15, 0x45):
            assert i + 1 + jt <= n and i + 1 + jf <= n
        if code == 0x20:
            assert k in (0, 4, 16, 20, 24)   # nr, arch, args[0] lo/hi, args[1] lo
    assert pro[-1] == (0x06, 0, 0, deny)
    loads = [k for code, _, _, k in pro if code == 0x20]
    assert 24 in loads and 20 in loads   # ioctl cmd low word; personality high word


def test_syscall_names_for_reports():
    assert seccomp.syscall_name(seccomp.resolve("mount")) == "mount"
    assert seccomp.syscall_name(20, seccomp.AUDIT_ARCH_I386) == "i386:getpid"
    assert seccomp.syscall_name(seccomp.X32_SYSCALL_BIT | 39) == "x32:39"
    assert seccomp.syscall_name(5, 0x1234).startswith("arch0x1234:")
    assert seccomp.family_name(16) == "netlink"


def test_probe_reports_the_library_and_actions():
    info = seccomp.probe()
    assert info["libseccomp"].count(".") == 2
    assert isinstance(info["actions"], list) and "user_notif" in info


def test_make_step_fills_the_plan():
    class Plan:
        seccomp_bpf = b""
        seccomp_notify = False

    class Ctx:
        policy = load_policy("default")
        plan = Plan()

    step = seccomp.make_step(Ctx)
    assert step.name == "seccomp"
    step.do()
    assert Ctx.plan.seccomp_bpf == seccomp.compile_policy(Ctx.policy.seccomp)
    assert Ctx.plan.seccomp_notify is True


def test_cli_policy_show_prints_allowed_and_fixed_deny(capsys):
    from sandbox.cli.main import main
    assert main(["policy", "show", "default"]) == 0
    out = capsys.readouterr().out
    assert "allowed syscalls" in out and "fixed deny list" in out
    assert "  openat " in out and "  mount " in out and "clone3" in out


def test_cli_policy_check_reports_unknown_syscall_and_group(tmp_path, capsys):
    from sandbox.cli.main import main
    bad = tmp_path / "bad.toml"
    bad.write_text('[seccomp]\ngroups = ["@default", "@nope"]\nallow = ["getpid"]\n')
    assert main(["policy", "check", str(bad)]) == 2
    assert "unknown group '@nope'" in capsys.readouterr().err
    bad.write_text('[seccomp]\nallow = ["frobnicate"]\n')
    assert main(["policy", "check", str(bad)]) == 2
    assert "unknown syscall 'frobnicate'" in capsys.readouterr().err
    good = tmp_path / "good.toml"
    good.write_text('[seccomp]\ngroups = ["@default", "@aio"]\n')
    assert main(["policy", "check", str(good)]) == 0
