"""The daemon's policy cache: one load per (name, overrides) while nothing it was read from
changes; any change to the policy file, a shadowing file or a seccomp group file loads it
again; a policy that fails to load fails every time."""
import os
import re
from pathlib import Path

import pytest

from sandbox.daemon.policies import PolicyCache
from sandbox.errors import PolicyError
from sandbox.policy import load_policy

REPO = Path(__file__).resolve().parents[2]
DEFAULT = (REPO / "policies" / "default.toml").read_text()


def _policy(text: str, name: str, **subs) -> str:
    text = re.sub(r'(?m)^name = "default"', f'name = "{name}"', text)
    for key, value in subs.items():
        text, n = re.subn(rf'(?m)^{key} = .*$', f"{key} = {value}", text)
        assert n == 1, key
    return text


def _touch_later(path: Path, text: str):
    """Rewrite a file so that its stat differs even on a coarse clock."""
    st = path.stat()
    path.write_text(text)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))


@pytest.fixture
def pdir(tmp_path, monkeypatch):
    d = tmp_path / "policies"
    d.mkdir()
    monkeypatch.setenv("SANDBOXD_POLICY_DIR", str(d))
    (d / "sbxt-p.toml").write_text(_policy(DEFAULT, "sbxt-p", hostname='"one"'))
    return d


def test_reuses_a_loaded_policy_and_equals_a_fresh_load(pdir):
    cache = PolicyCache()
    over = {"limits": {"memory": "512MiB"}}
    base, final = cache.load_pair("sbxt-p", over)
    assert cache.load_pair("sbxt-p", over) == (base, final)
    assert cache.load("sbxt-p", over) is final and cache.load("sbxt-p") is base
    assert cache.loads == 2 and cache.hits >= 4
    assert final == load_policy("sbxt-p", over) and base == load_policy("sbxt-p")
    assert final.limits.memory == 512 * 1024**2 and base.limits.memory != final.limits.memory
    # Overrides are compared by value, not by the order of their keys.
    o1 = {"limits": {"memory": "512MiB", "pids": 50}}
    o2 = {"limits": {"pids": 50, "memory": "512MiB"}}
    assert cache.load("sbxt-p", o1) is cache.load("sbxt-p", o2)


def test_an_edited_policy_file_is_loaded_again(pdir):
    cache = PolicyCache()
    first = cache.load("sbxt-p")
    assert first.hostname == "one"
    _touch_later(pdir / "sbxt-p.toml", _policy(DEFAULT, "sbxt-p", hostname='"two"'))
    second = cache.load("sbxt-p")
    assert second.hostname == "two" and second is not first


def test_a_file_in_a_directory_searched_first_shadows_the_cached_one(pdir, tmp_path, monkeypatch):
    cache = PolicyCache()
    assert cache.load("default").hostname == "sandbox"      # from the repo's policies/
    (pdir / "default.toml").write_text(_policy(DEFAULT, "default", hostname='"shadow"'))
    assert cache.load("default").hostname == "shadow"
    (pdir / "default.toml").unlink()
    assert cache.load("default").hostname == "sandbox"


def test_a_changed_seccomp_group_is_resolved_again(pdir):
    cache = PolicyCache()
    cache.load("sbxt-p")
    assert cache.loads == 1
    (pdir / "seccomp").mkdir()
    (pdir / "seccomp" / "sbxt-extra.toml").write_text('syscalls = ["getpid"]\n')
    cache.load("sbxt-p")
    assert cache.loads == 2
    _touch_later(pdir / "seccomp" / "sbxt-extra.toml", 'syscalls = ["getppid"]\n')
    cache.load("sbxt-p")
    assert cache.loads == 3


def test_a_policy_that_fails_to_load_fails_every_time(pdir):
    cache = PolicyCache()
    (pdir / "sbxt-bad.toml").write_text('name = "sbxt-bad"\n[limits]\nmemroy = "1GiB"\n')
    for _ in range(2):
        with pytest.raises(PolicyError, match="memroy"):
            cache.load("sbxt-bad")
    with pytest.raises(PolicyError, match="limits.pids"):
        cache.load("sbxt-p", {"limits": {"pids": 1}})
    with pytest.raises(PolicyError):
        cache.load("sbxt-missing")
    assert cache.loads == 0


def test_memo_is_per_policy_object(pdir):
    cache = PolicyCache()
    made = []
    p1 = cache.load("sbxt-p")
    v1 = cache.memo(p1, "scanner", lambda: made.append(1) or object())
    assert cache.memo(p1, "scanner", lambda: made.append(1) or object()) is v1
    _touch_later(pdir / "sbxt-p.toml", _policy(DEFAULT, "sbxt-p", hostname='"three"'))
    p2 = cache.load("sbxt-p")
    assert cache.memo(p2, "scanner", lambda: made.append(1) or object()) is not v1
    assert len(made) == 2
