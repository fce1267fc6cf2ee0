"""The shipped policies load, the default holds the security design's lower bounds, and the
policy helpers (overrides, dict round trip, hash) behave. No root needed."""
from __future__ import annotations

import dataclasses
import math
import typing
from pathlib import Path

import pytest

from sandbox.policy import (Policy, load_policy, merge_overrides, policy_from_dict, policy_hash,
                            policy_to_dict)
from sandbox.policy.load import REPO_POLICY_DIR

GiB = 1024**3


@pytest.fixture(scope="module")
def default():
    return load_policy(str(REPO_POLICY_DIR / "default.toml"))


def test_default_holds_the_security_design_lower_bounds(default):
    lim = default.limits
    assert lim.cpus == 2.0
    assert lim.memory == 4 * GiB
    assert lim.swap == 0
    assert lim.disk == 10 * GiB
    assert lim.pids == 200
    assert lim.core == 0                      # no core dumps: they could hold secrets
    assert math.isfinite(default.timeout) and 0 < default.command_timeout <= default.timeout


def test_default_is_closed_by_default(default):
    assert default.name == "default"
    assert default.network.mode == "none" and default.network.allow == ()
    assert default.user.uid != 0 and default.user.gid != 0 and not default.user.allow_root
    assert default.filesystem.context == "ro"
    assert default.limits.host_workspace == "refuse"
    env = dict(default.environment.set)
    assert set(env) <= {"PATH", "LANG", "TERM", "LC_ALL", "TZ", "HOME", "USER"}


def test_default_toml_states_every_key_it_relies_on():
    """The file is the documentation operators read: the limits are written out, not implied."""
    import tomllib
    data = tomllib.loads((REPO_POLICY_DIR / "default.toml").read_text())
    for key in ("cpus", "memory", "swap", "disk", "pids"):
        assert key in data["limits"], key


def test_by_name_and_by_path_agree(default):
    assert load_policy("default") == default


@pytest.mark.parametrize("path", sorted(REPO_POLICY_DIR.glob("*.toml")), ids=lambda p: p.name)
def test_every_shipped_policy_loads(path):
    p = load_policy(str(path))
    assert p.name == path.stem


def test_dict_round_trip_and_stable_hash(default):
    d = policy_to_dict(default)
    assert isinstance(d["environment"]["set"], dict)
    assert isinstance(d["escalation"]["severity"], dict)      # a table even when empty
    again = policy_from_dict(d, source="roundtrip")
    assert again == default
    assert policy_hash(again) == policy_hash(default)
    assert len(policy_hash(default)) == 64


def test_hash_changes_with_any_limit(default):
    other = load_policy("default", {"limits": {"pids": 199}})
    assert other.limits.pids == 199 and policy_hash(other) != policy_hash(default)


def test_overrides_merge_tables_and_replace_values():
    data = {"limits": {"memory": "4GiB", "pids": 200}, "network": {"allow": ["a:1"]}}
    out = merge_overrides(data, {"limits": {"pids": 50}, "network": {"allow": []}})
    assert out == {"limits": {"memory": "4GiB", "pids": 50}, "network": {"allow": []}}
    assert data["limits"]["pids"] == 200                     # the input is not changed


def test_policies_are_frozen(default):
    with pytest.raises(dataclasses.FrozenInstanceError):
        default.limits.memory = 1  # type: ignore[misc]


def _all_fields(cls, prefix=""):
    for f in dataclasses.fields(cls):
        typ = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(typ):
            yield from _all_fields(typ, prefix + f.name + ".")
        else:
            yield prefix + f.name, f


def test_every_field_is_documented_and_has_an_immutable_default():
    for dotted, f in _all_fields(Policy):
        assert f.metadata.get("doc"), f"{dotted} has no doc"
        assert not isinstance(f.default, (list, dict, set)), dotted


def _policy_doc():
    import runpy
    return runpy.run_path(str(Path(__file__).resolve().parents[2] / "scripts" / "policy-doc"))


def test_policy_doc_table_covers_every_field():
    """scripts/policy-doc renders README's table from the same field docs."""
    table = _policy_doc()["render"]()
    for dotted, _ in _all_fields(Policy):
        assert f"`{dotted}`" in table, dotted


def test_readme_policy_table_is_current():
    doc = _policy_doc()
    text = doc["README"].read_text()
    assert doc["_replace"](text, doc["render"]()) == text, \
        "README.md's policy table is stale: run scripts/policy-doc --write"
