"""Every way a policy can be wrong is refused with an error naming the file and the field, and
loading (valid or not) creates nothing on the host. No root needed."""
from __future__ import annotations

import builtins
import contextlib
import dataclasses
import io
import os
import shutil
import socket
import subprocess
import typing
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sandbox.errors import PolicyError
from sandbox.policy import Policy, load_policy, policy_from_dict

HINTS = typing.get_type_hints(Policy)
SECTIONS = [name for name, typ in HINTS.items() if dataclasses.is_dataclass(typ)]


# --- loading is pure ----------------------------------------------------------------------------

_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


class SideEffect(AssertionError):
    pass


@contextlib.contextmanager
def no_side_effects():
    """Every way Python changes the host (files, dirs, processes, sockets) raises instead."""
    def refuse(name):
        def f(*a, **k):
            raise SideEffect(f"policy loading called {name}{a!r}")
        return f

    real_open, real_os_open = builtins.open, os.open

    def guarded_open(file, mode="r", *a, **k):
        if any(c in mode for c in "wax+"):
            raise SideEffect(f"policy loading opened {file!r} for writing")
        return real_open(file, mode, *a, **k)

    def guarded_os_open(path, flags, *a, **k):
        if flags & _WRITE_FLAGS:
            raise SideEffect(f"policy loading opened {path!r} for writing")
        return real_os_open(path, flags, *a, **k)

    mp = pytest.MonkeyPatch()
    try:
        mp.setattr(builtins, "open", guarded_open)
        mp.setattr(io, "open", guarded_open)
        mp.setattr(os, "open", guarded_os_open)
        for name in ("mkdir", "makedirs", "rmdir", "unlink", "remove", "rename", "replace",
                     "symlink", "link", "chmod", "chown", "mknod", "mkfifo", "truncate",
                     "fork", "system", "kill", "setns", "unshare"):
            if hasattr(os, name):
                mp.setattr(os, name, refuse(f"os.{name}"))
        mp.setattr(shutil, "rmtree", refuse("shutil.rmtree"))
        mp.setattr(subprocess, "Popen", refuse("subprocess.Popen"))
        mp.setattr(socket, "socket", refuse("socket.socket"))
        yield
    finally:
        mp.undo()


@pytest.fixture(scope="module", autouse=True)
def _libraries_loaded():
    """The first seccomp check finds libseccomp with ctypes.util.find_library, which runs
    `ldconfig -p` once (read-only). Load it before the guard so the guard sees policy
    loading only, whatever ran before in the session."""
    import sandbox.kernel.seccomp  # noqa: F401


def write_policy(tmp_path: Path, text: str, name: str = "p") -> Path:
    path = tmp_path / f"{name}.toml"
    path.write_text(text)
    return path


def load_pure(path) -> Policy:
    """load_policy(path) with every side effect refused, and the directory left as it was."""
    before = sorted(Path(path).parent.iterdir()) if Path(path).parent.is_dir() else None
    with no_side_effects():
        try:
            return load_policy(str(path))
        finally:
            if before is not None:
                assert sorted(Path(path).parent.iterdir()) == before, "loading created files"


def expect_error(tmp_path: Path, text: str, field: str | None, *words: str) -> PolicyError:
    path = write_policy(tmp_path, text)
    with pytest.raises(PolicyError) as ei:
        load_pure(path)
    err = ei.value
    msg = str(err)
    assert err.source == str(path) and str(path) in msg, msg
    if field is not None:
        assert err.field == field, msg
        assert f"{field}: " in msg, msg
    for w in words:
        assert w in msg, f"{w!r} not in {msg!r}"
    assert "\n" not in msg
    return err


# --- unknown keys ---------------------------------------------------------------------------------

def test_unknown_top_level_key(tmp_path):
    expect_error(tmp_path, 'colour = "red"\n', "colour", "unknown key", "hostname")


def test_unknown_section(tmp_path):
    expect_error(tmp_path, "[bogus]\nx = 1\n", "bogus", "unknown key")


@pytest.mark.parametrize("section", SECTIONS)
def test_unknown_key_in_every_section(tmp_path, section):
    expect_error(tmp_path, f"[{section}]\nbogus_key = 1\n", f"{section}.bogus_key", "unknown key")


def test_typo_in_a_limit_names_the_known_keys(tmp_path):
    expect_error(tmp_path, '[limits]\nmemroy = "1GiB"\n', "limits.memroy", "memory")


def test_unknown_nested_table(tmp_path):
    expect_error(tmp_path, "[limits.extra]\na = 1\n", "limits.extra", "unknown key")


def test_sections_are_all_covered():
    assert set(SECTIONS) == {"user", "environment", "filesystem", "limits", "network", "seccomp",
                             "scanner", "escalation"}


# --- wrong types ----------------------------------------------------------------------------------

@pytest.mark.parametrize("text,field,word", [
    ("hostname = 5\n", "hostname", "expected str"),
    ("name = 5\n", "name", "expected str"),
    ("description = []\n", "description", "expected str"),
    ("timeout = true\n", "timeout", "boolean"),
    ("timeout = 1979-05-27T07:32:00Z\n", "timeout", "duration"),
    ('user = "agent"\n', "user", "must be a table"),
    ("limits = 5\n", "limits", "must be a table"),
    ('[user]\nuid = "1000"\n', "user.uid", "expected int"),
    ("[user]\nuid = true\n", "user.uid", "boolean"),
    ("[user]\nuid = 1000.0\n", "user.uid", "expected int"),
    ('[user]\nallow_root = "yes"\n', "user.allow_root", "expected bool"),
    ("[user]\nallow_root = 1\n", "user.allow_root", "expected bool"),
    ("[limits]\npids = 2.5\n", "limits.pids", "expected int"),
    ("[limits]\npids = true\n", "limits.pids", "boolean"),
    ('[limits]\ncpus = "2"\n', "limits.cpus", "expected float"),
    ("[limits]\ncpus = false\n", "limits.cpus", "expected float"),
    ('[filesystem]\nro_binds = "/usr"\n', "filesystem.ro_binds", "list of strings"),
    ("[filesystem]\nro_binds = [1]\n", "filesystem.ro_binds", "list of strings"),
    ('[filesystem]\nkeep_workspace = "no"\n', "filesystem.keep_workspace", "expected bool"),
    ('[environment]\nset = ["A=b"]\n', "environment.set", "table"),
    ("[environment]\nset = { A = 1 }\n", "environment.set", "table of string values"),
    ("[environment.set]\nA = { b = 1 }\n", "environment.set", "table of string values"),
    ('[environment]\nallow = "TERM"\n', "environment.allow", "list of strings"),
    ('[network]\nallow = "example.com"\n', "network.allow", "list of strings"),
    ("[network]\ndns_qps = 1.5\n", "network.dns_qps", "expected int"),
    ('[seccomp]\ngroups = "@default"\n', "seccomp.groups", "list of strings"),
    ("[scanner]\nrules = [1]\n", "scanner.rules", "list of strings"),
    ('[escalation]\nfreeze_on_critical = "no"\n', "escalation.freeze_on_critical", "expected bool"),
])
def test_wrong_types(tmp_path, text, field, word):
    expect_error(tmp_path, text, field, word)


# --- sizes, rates, durations ------------------------------------------------------------------------

@pytest.mark.parametrize("text,field,word", [
    ('[limits]\nmemory = "4 lightyears"\n', "limits.memory", "not a size"),
    ('[limits]\nmemory = "-1GiB"\n', "limits.memory", "not a size"),
    ("[limits]\nmemory = -1\n", "limits.memory", "negative"),
    ("[limits]\nmemory = 1.5\n", "limits.memory", "size"),
    ('[limits]\nmemory = "4GB4"\n', "limits.memory", "not a size"),
    ('[limits]\nmemory = ""\n', "limits.memory", "not a size"),
    ('[limits]\ndisk = "10 GiB extra"\n', "limits.disk", "not a size"),
    ('[limits]\nswap = "lots"\n', "limits.swap", "not a size"),
    ('[filesystem]\ntmp_size = "1e9"\n', "filesystem.tmp_size", "not a size"),
    ('[network]\nrate = "10 mph"\n', "network.rate", "not a rate"),
    ("[network]\nrate = -5\n", "network.rate", "negative"),
    ('[network]\nrate = "10"\n', "network.rate", "not a rate"),
    ('timeout = "forever"\n', "timeout", "not a duration"),
    ('timeout = "30M"\n', "timeout", "not a duration"),
    ("timeout = -1\n", "timeout", "negative"),
    ('command_timeout = "1h 30m"\n', "command_timeout", "not a duration"),
    ('[network]\ndns_ttl_min = "soon"\n', "network.dns_ttl_min", "not a duration"),
])
def test_bad_sizes_rates_durations(tmp_path, text, field, word):
    expect_error(tmp_path, text, field, word)


def test_units_are_parsed(tmp_path):
    p = load_pure(write_policy(tmp_path, 'timeout = "90m"\ncommand_timeout = "500ms"\n'
                               '[limits]\nmemory = "1.5GiB"\ndisk = "1GB"\n'
                               '[network]\nmode = "egress"\nrate = "2mbps"\n'))
    assert p.timeout == 5400 and p.command_timeout == 0.5
    assert p.limits.memory == 1536 * 1024**2 and p.limits.disk == 10**9
    assert p.network.rate == 16 * 10**6


# --- impossible limits ------------------------------------------------------------------------------

@pytest.mark.parametrize("text,field", [
    ('[limits]\nmemory = "1MiB"\n', "limits.memory"),
    ('[limits]\nmemory = "2TiB"\n', "limits.memory"),
    ("[limits]\npids = 0\n", "limits.pids"),
    ("[limits]\npids = 1\n", "limits.pids"),
    ("[limits]\ncpus = -1\n", "limits.cpus"),
    ("[limits]\ncpus = 2000\n", "limits.cpus"),
    ("[limits]\ncpus = nan\n", "limits.cpus"),
    ("[limits]\ncpus = inf\n", "limits.cpus"),
    ("[limits]\nnofile = 8\n", "limits.nofile"),
    ('[limits]\ndisk = "1MiB"\n', "limits.disk"),
    ('[limits]\nhost_workspace = "maybe"\n', "limits.host_workspace"),
    ('[filesystem]\ntmp_size = "100KiB"\n', "filesystem.tmp_size"),
    ('timeout = "1h"\ncommand_timeout = "2h"\n', "command_timeout"),
    ('command_timeout = "0s"\n', "command_timeout"),
    ('timeout = "8d"\n', "timeout"),
    ("timeout = 0\n", "timeout"),
    ("timeout = nan\n", "timeout"),
    ("timeout = inf\n", "timeout"),
    ('[network]\ndns_ttl_min = "2h"\ndns_ttl_max = "1h"\n', "network.dns_ttl_min"),
    ("[network]\ndns_qps = 0\n", "network.dns_qps"),
    ('[network]\nmode = "egress"\nrate = "1bit"\n', "network.rate"),
    ("[seccomp]\nprobe_threshold = 0\n", "seccomp.probe_threshold"),
    ("[escalation]\nmemory_pct = 0\n", "escalation.memory_pct"),
    ("[escalation]\npids_pct = 101\n", "escalation.pids_pct"),
])
def test_impossible_limits(tmp_path, text, field):
    expect_error(tmp_path, text, field, "must")


def test_allowlist_without_egress(tmp_path):
    expect_error(tmp_path, '[network]\nallow = ["example.com:443"]\n', "network.allow", "egress")


# --- paths ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("key", ["ro_binds", "etc_binds"])
@pytest.mark.parametrize("path,word", [
    ("usr", "absolute"),
    ("", "absolute"),
    ("./usr", "absolute"),
    ("/usr/../etc", ".."),
    ("/usr/./lib", "'.'"),
    ("/..", ".."),
    ("/usr/lib/..", ".."),
    ("/usr\\u0000/lib", "NUL"),
])
def test_relative_or_escaping_bind_paths(tmp_path, key, path, word):
    expect_error(tmp_path, f'[filesystem]\n{key} = ["/usr", "{path}"]\n', f"filesystem.{key}", word)


@pytest.mark.parametrize("path,word", [("srv/shared", "absolute"), ("/srv/../etc", "..")])
def test_relative_or_escaping_shared_dir(tmp_path, path, word):
    expect_error(tmp_path, f'[filesystem]\nshared = "{path}"\n', "filesystem.shared", word)


@pytest.mark.parametrize("key,value", [("workspace", "rwx"), ("context", "rw")])
def test_mount_modes(tmp_path, key, value):
    expect_error(tmp_path, f'[filesystem]\n{key} = "{value}"\n', f"filesystem.{key}", value)


def test_ro_bind_through_a_symlink_pointing_out_is_refused(tmp_path):
    """A read-only bind follows symlinks (mount(2) resolves the source): a bind path that is a
    symlink to / would expose the whole host. Allowed only when it resolves inside another,
    symlink-free bind of the same policy (Debian's /lib -> usr/lib under /usr)."""
    link = tmp_path / "tools"
    link.symlink_to("/")
    err = expect_error(tmp_path, f'[filesystem]\nro_binds = ["/usr", "{link}"]\n',
                       "filesystem.ro_binds", str(link), "symlink", "resolves to /")
    assert "real path" in str(err)


def test_ro_bind_symlink_inside_another_bind_is_accepted(tmp_path):
    link = tmp_path / "mylib"
    link.symlink_to("/usr/lib")
    p = load_pure(write_policy(tmp_path, f'[filesystem]\nro_binds = ["/usr", "{link}"]\n'))
    assert str(link) in p.filesystem.ro_binds


def test_ro_bind_symlink_to_a_symlink_bind_is_refused(tmp_path):
    """Inside another bind only counts when that bind is itself no symlink."""
    out = tmp_path / "out"
    out.mkdir()
    a, b = tmp_path / "a", tmp_path / "b"
    a.symlink_to(out)
    b.symlink_to(out / "sub")
    expect_error(tmp_path, f'[filesystem]\nro_binds = ["{a}", "{b}"]\n', "filesystem.ro_binds",
                 "symlink")


def test_missing_ro_binds_are_fine_at_load_time(tmp_path):
    """Missing bind sources are skipped by the engine: no host check refuses them here."""
    p = load_pure(write_policy(tmp_path, '[filesystem]\nro_binds = ["/usr", "/nonexistent-sbxt"]\n'))
    assert "/nonexistent-sbxt" in p.filesystem.ro_binds


# --- user, hostname, environment ----------------------------------------------------------------

@pytest.mark.parametrize("text,field,word", [
    ("[user]\nuid = 0\n", "user.uid", "allow_root"),
    ("[user]\ngid = 0\n", "user.gid", "allow_root"),
    ("[user]\nuid = 65534\n", "user.uid", "between"),
    ("[user]\nuid = -1\n", "user.uid", "between"),
    ("[user]\ngid = 70000\n", "user.gid", "between"),
    ('[user]\nname = "Agent!"\n', "user.name", "user name"),
    ('[user]\nname = ""\n', "user.name", "user name"),
    ('[user]\nname = "root:x:0"\n', "user.name", "user name"),
])
def test_user(tmp_path, text, field, word):
    expect_error(tmp_path, text, field, word)


def test_uid_0_with_allow_root_loads(tmp_path):
    p = load_pure(write_policy(tmp_path, "[user]\nuid = 0\ngid = 0\nallow_root = true\n"))
    assert (p.user.uid, p.user.gid, p.user.allow_root) == (0, 0, True)


@pytest.mark.parametrize("hostname", ["Bad_Host", "-lead", "trail-", "a" * 64, "", "UPPER",
                                      "two words", "host.name", "h\\u0000"])
def test_invalid_hostname(tmp_path, hostname):
    expect_error(tmp_path, f'hostname = "{hostname}"\n', "hostname", "not a valid hostname")


@pytest.mark.parametrize("text,field", [
    ('[environment]\nset = { "1X" = "a" }\n', "environment.set"),
    ('[environment]\nset = { "A-B" = "a" }\n', "environment.set"),
    ('[environment]\nset = { "A=B" = "a" }\n', "environment.set"),
    ('[environment]\nset = { "" = "a" }\n', "environment.set"),
    ('[environment]\nallow = ["A-B"]\n', "environment.allow"),
    ('[environment]\nallow = [""]\n', "environment.allow"),
    ('[environment]\nallow = ["PATH", "X Y"]\n', "environment.allow"),
])
def test_invalid_environment_names(tmp_path, text, field):
    expect_error(tmp_path, text, field, "not a variable name")


def test_environment_value_with_nul_is_refused(tmp_path):
    # execve(2) takes NUL-terminated strings: the value would be cut short silently.
    expect_error(tmp_path, '[environment]\nset = { A = "x\\u0000y" }\n', "environment.set", "NUL")


# --- missing policy, invalid TOML -------------------------------------------------------------------

def test_missing_policy_name():
    with no_side_effects(), pytest.raises(PolicyError) as ei:
        load_policy("sbxt-no-such-policy")
    assert "sbxt-no-such-policy" in str(ei.value) and "policies" in str(ei.value)


@pytest.mark.parametrize("name", ["bad name!", "", "a;b", "../default"])
def test_invalid_policy_name(name):
    with no_side_effects(), pytest.raises(PolicyError) as ei:
        load_policy(name)
    assert repr(name) in str(ei.value) or name in str(ei.value)


def test_missing_policy_file(tmp_path):
    path = tmp_path / "nope.toml"
    with no_side_effects(), pytest.raises(PolicyError, match="no such policy file") as ei:
        load_policy(str(path))
    assert str(path) in str(ei.value)


def test_directory_is_not_a_policy_file(tmp_path):
    with no_side_effects(), pytest.raises(PolicyError, match="no such policy file"):
        load_policy(str(tmp_path) + "/")


@pytest.mark.parametrize("text", ["a = \n", "[limits\n", "x = 1\nx = 2\n", "hostname = 'a\n",
                                  "[user]\n[user]\n"])
def test_invalid_toml(tmp_path, text):
    err = expect_error(tmp_path, text, None, "not valid TOML")
    assert err.field is None


def test_invalid_utf8(tmp_path):
    path = tmp_path / "p.toml"
    path.write_bytes(b'hostname = "\xff"\n')
    with pytest.raises(PolicyError, match="UTF-8") as ei:
        load_pure(path)
    assert ei.value.source == str(path)


def test_override_errors_name_the_field_and_file():
    with no_side_effects(), pytest.raises(PolicyError) as ei:
        load_policy("default", {"limits": {"memory": "1MiB"}})
    assert ei.value.field == "limits.memory" and "default.toml" in str(ei.value)
    assert "overrides" in str(ei.value)
    with no_side_effects(), pytest.raises(PolicyError, match="limits: must be a table"):
        load_policy("default", {"limits": 5})


def test_not_a_table():
    with pytest.raises(PolicyError, match="must be a table"):
        policy_from_dict(["not", "a", "table"])


# --- the loader only ever raises PolicyError ------------------------------------------------------

def _leaf_values():
    scalar = st.one_of(st.integers(-2**40, 2**40), st.floats(allow_nan=True), st.booleans(),
                       st.text(max_size=12),
                       st.sampled_from(["4GiB", "10mbit", "30m", "/usr", "../x", "egress", "rw",
                                        "@default", "0", "1e3", "*.example.com:443"]))
    return st.recursive(scalar, lambda c: st.one_of(st.lists(c, max_size=3),
                                                    st.dictionaries(st.text(max_size=6), c,
                                                                    max_size=3)),
                        max_leaves=6)


def _section_keys():
    return {sec: [g.name for g in dataclasses.fields(HINTS[sec])] + ["bogus"] for sec in SECTIONS}


@st.composite
def policy_dicts(draw):
    keys = _section_keys()
    top = [f.name for f in dataclasses.fields(Policy) if f.name not in SECTIONS]
    data = {}
    for k in draw(st.lists(st.sampled_from(top), max_size=3, unique=True)):
        data[k] = draw(_leaf_values())
    for sec in draw(st.lists(st.sampled_from(sorted(keys)), max_size=3, unique=True)):
        names = draw(st.lists(st.sampled_from(keys[sec]), min_size=1, max_size=3, unique=True))
        data[sec] = {n: draw(_leaf_values()) for n in names}
    return data


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(policy_dicts())
def test_any_input_gives_a_policy_or_a_policy_error(data):
    with no_side_effects():
        try:
            p = policy_from_dict(data, source="fuzz.toml")
        except PolicyError as e:
            assert str(e).startswith("fuzz.toml: ")
        else:
            assert isinstance(p, Policy)
