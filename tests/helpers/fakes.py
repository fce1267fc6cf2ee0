"""Fake secrets generated at run time: never a literal real-looking secret in the repo.

Each generator returns a fresh random value in the shape of a real credential, so the
scanner, the audit guard and the tests that grep for leaks see realistic input. Tests keep
the values they emitted (see `emitted`) and grep every artifact for all of them.
"""
from __future__ import annotations

import secrets
import string

emitted: list[str] = []


def _keep(value: str) -> str:
    emitted.append(value)
    return value


def _rand(alphabet: str, n: int) -> str:
    return "".join(secrets.choice(alphabet) for _ in range(n))


def daemon_token() -> str:
    """In the shape of sandbox/daemon/tokens.py: sbxd_<12 hex>_<43 urlsafe>."""
    return _keep(f"sbxd_{secrets.token_hex(6)}_{secrets.token_urlsafe(32)}")


def aws_access_key_id() -> str:
    return _keep("AKIA" + _rand(string.ascii_uppercase + string.digits, 16))


def github_token() -> str:
    return _keep("ghp_" + _rand(string.ascii_letters + string.digits, 36))


def private_key_block() -> str:
    body = "\n".join(_rand(string.ascii_letters + string.digits + "+/", 64) for _ in range(4))
    return _keep(f"-----BEGIN RSA PRIVATE KEY-----\n{body}\n-----END RSA PRIVATE KEY-----")


def password() -> str:
    return _keep(_rand(string.ascii_letters + string.digits, 24))
