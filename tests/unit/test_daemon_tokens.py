"""Capability tokens: hashed at rest, verified in constant time, scoped, persisted."""
import json
import os
import stat

import pytest

from sandbox.daemon import bounds
from sandbox.daemon.tokens import TokenScope, TokenStore, token_id_of
from sandbox.errors import AuthError, LimitError, PolicyError
from sandbox.policy import load_policy


@pytest.fixture
def store(tmp_path):
    return TokenStore(tmp_path / "tokens.json")


def test_secret_is_never_stored_and_file_is_private(store, tmp_path):
    tok, value = store.grant(TokenScope(), granted_by=0, name="ci")
    raw = (tmp_path / "tokens.json").read_text()
    secret = value.rsplit("_", 1)[-1] if value.count("_") == 2 else value.split("_", 2)[2]
    assert value.startswith("sbxd_") and token_id_of(value) == tok.id
    assert secret not in raw and value not in raw
    assert stat.S_IMODE(os.stat(tmp_path / "tokens.json").st_mode) == 0o600
    assert json.loads(raw)["tokens"][0]["id"] == tok.id


def test_verify_accepts_only_the_exact_value(store):
    tok, value = store.grant(TokenScope(), granted_by=0)
    assert store.verify(value).id == tok.id
    forged = value[:-1] + ("A" if value[-1] != "A" else "B")
    with pytest.raises(AuthError, match="invalid token"):
        store.verify(forged)
    with pytest.raises(AuthError, match="malformed"):
        store.verify("not-a-token")
    other = "sbxd_" + "0" * 12 + "_" + value.split("_", 2)[2]
    with pytest.raises(AuthError, match="invalid token"):
        store.verify(other)


def test_errors_never_echo_the_token(store):
    _, value = store.grant(TokenScope(), granted_by=0)
    forged = value[:-2] + "xx"
    with pytest.raises(AuthError) as e:
        store.verify(forged)
    assert forged not in str(e.value) and forged.split("_", 2)[2] not in str(e.value)


def test_revoked_and_expired_tokens_are_refused_and_persist(store, tmp_path):
    tok, value = store.grant(TokenScope(), granted_by=0)
    store.revoke(tok.id)
    with pytest.raises(AuthError, match="revoked"):
        store.verify(value)
    again = TokenStore(tmp_path / "tokens.json")
    with pytest.raises(AuthError, match="revoked"):
        again.verify(value)
    short, v2 = store.grant(TokenScope(), granted_by=0, ttl=0.001)
    import time
    time.sleep(0.01)
    with pytest.raises(AuthError, match="expired"):
        store.verify(v2)


def test_mark_revoked_refuses_at_once_and_save_makes_it_durable(store, tmp_path):
    tok, value = store.grant(TokenScope(), granted_by=0)
    marked, changed = store.mark_revoked(tok.id)
    assert marked is tok and changed
    with pytest.raises(AuthError, match="revoked"):          # refused before any write
        store.verify(value)
    # The file still says active until save() (the daemon saves while it kills).
    assert TokenStore(tmp_path / "tokens.json").verify(value).id == tok.id
    store.save()
    with pytest.raises(AuthError, match="revoked"):
        TokenStore(tmp_path / "tokens.json").verify(value)
    assert store.mark_revoked(tok.id) == (tok, False)        # once only: nothing to save
    with pytest.raises(KeyError):
        store.mark_revoked("000000000000")


def test_damaged_token_file_fails_closed(tmp_path):
    (tmp_path / "tokens.json").write_text("{not json")
    with pytest.raises(AuthError, match="damaged"):
        TokenStore(tmp_path / "tokens.json")


def test_scope_is_validated(store):
    with pytest.raises(PolicyError, match="ceiling"):
        store.grant(TokenScope(ceiling={"swap": 1}), granted_by=0)
    with pytest.raises(PolicyError, match="workspace_roots"):
        store.grant(TokenScope(workspace_roots=["relative"]), granted_by=0)
    with pytest.raises(PolicyError, match="ttl"):
        store.grant(TokenScope(), granted_by=0, ttl=-1)


def test_bounds_limit_what_a_token_asks_for(tmp_path):
    scope = TokenScope(policies=["default"], ceiling={"memory": 2 * 1024**3}, network=["a.example:443"])
    base = load_policy("default")
    bounds.check_policy_allowed(scope, "default")
    with pytest.raises(AuthError, match="not allowed"):
        bounds.check_policy_allowed(scope, "other")
    with pytest.raises(AuthError, match="may not override"):
        bounds.check_override_keys({"seccomp": {"groups": []}})
    with pytest.raises(AuthError, match="may not override"):
        bounds.check_override_keys({"limits": {"nofile": 9}})
    with pytest.raises(LimitError, match="limits.memory"):
        bounds.check_within(scope, base, load_policy("default", {"limits": {"memory": "3GiB"}}))
    bounds.check_within(scope, base, load_policy("default", {"limits": {"memory": "1GiB"}}))
    # No ceiling for pids: the policy's own value is the bound.
    with pytest.raises(LimitError, match="limits.pids"):
        bounds.check_within(scope, base, load_policy("default", {"limits": {"pids": 100000,
                                                                          "memory": "1GiB"}}))
    ok = load_policy("default", {"network": {"mode": "egress", "allow": ["a.example:443"]},
                                    "limits": {"memory": "1GiB"}})
    bounds.check_within(scope, base, ok)
    bad = load_policy("default", {"network": {"mode": "egress", "allow": ["b.example:443"]},
                                     "limits": {"memory": "1GiB"}})
    with pytest.raises(LimitError, match="network.allow"):
        bounds.check_within(scope, base, bad)


def test_workspace_must_be_under_a_granted_root(tmp_path):
    root = tmp_path / "roots" / "a"
    (root / "job").mkdir(parents=True)
    (tmp_path / "outside").mkdir()
    os.symlink(tmp_path / "outside", root / "link")
    scope = TokenScope(workspace_roots=[str(root)])
    assert bounds.check_workspace(scope, str(root / "job")) == str(root / "job")
    with pytest.raises(AuthError):
        bounds.check_workspace(scope, str(tmp_path / "outside"))
    with pytest.raises(AuthError):   # a symlink under the root that leads out is resolved first
        bounds.check_workspace(scope, str(root / "link"))
    with pytest.raises(AuthError):
        bounds.check_workspace(scope, str(root) + "/../outside")


def test_a_revocation_whose_save_failed_is_saved_by_the_retry(store, tmp_path, monkeypatch):
    """The daemon answers 503 "retry" when the token file cannot be written; the retry must
    save the revocation, not see the token already revoked in memory and acknowledge it."""
    import sandbox.daemon.tokens as tokens_mod
    tok, value = store.grant(TokenScope(), granted_by=0)
    assert store.mark_revoked(tok.id) == (tok, True)

    def no_rename(*a):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(tokens_mod.os, "rename", no_rename)
    with pytest.raises(OSError):
        store.save()
    monkeypatch.undo()
    assert TokenStore(tmp_path / "tokens.json").verify(value).id == tok.id   # not on disk yet
    assert store.mark_revoked(tok.id) == (tok, True)          # the retry must save
    store.save()
    assert store.mark_revoked(tok.id) == (tok, False)
    with pytest.raises(AuthError, match="revoked"):
        TokenStore(tmp_path / "tokens.json").verify(value)
