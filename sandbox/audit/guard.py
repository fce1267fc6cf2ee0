"""The redaction guard: the last line of defence that keeps secrets out of audit records.

Callers already pass only ids, names, numbers, hashes and offsets (sandbox/audit/sink.py).
This guard is defensive, for the mistakes: before a record is hashed and written, every
string in it is checked, and anything that looks like a secret is masked *in place of*
refusing the record (a refused record would be a hole in the trail; a masked one says
what was removed and why). Masked:

- the daemon's capability tokens (`sbxd_<id>_<secret>`, sandbox/daemon/tokens.py): the id is
  kept, the secret part is replaced, so the record still says which token was involved;
- well-known credential shapes (private key blocks, cloud and forge access keys, bearer
  headers): the scanner finds these in output; an argv carrying one must not land here;
- values of the host's environment variables whose names say they are secret
  (TOKEN, KEY, SECRET, PASS...): "no host environment value in a record";
- strings longer than `max_value` characters: replaced by their length and sha256, so a
  runaway caller cannot push bulk data (which could hold anything) into the log.

`salted_hash()` is the one way to fingerprint sensitive content (a scanner finding): an
HMAC-SHA256 under a per-log random salt, truncated, so equal findings correlate within one
log but a low-entropy secret cannot be confirmed by hashing guesses without the salt.
"""
from __future__ import annotations

import hashlib
import hmac
import os
import re
from typing import Any

MASK = "[masked]"
DEFAULT_MAX_VALUE = 8192

# sandbox/daemon/tokens.py: `sbxd_<12 hex id>_<43 urlsafe chars>`; kept loose on the secret
# part (>= 16 chars) so a truncated token is masked too.
_TOKEN = re.compile(r"(sbxd_[0-9a-f]{12}_)[A-Za-z0-9_-]{16,}")
_CREDENTIAL_SHAPES = [
    re.compile(r"-----BEGIN [A-Z0-9 ]*PRIVATE KEY-----.*?(?:-----END [A-Z0-9 ]*PRIVATE KEY-----|$)",
               re.S),
    re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"),                    # AWS access key id
    re.compile(r"\bgh[pousr]_[A-Za-z0-9]{36,}\b"),                   # GitHub tokens
    re.compile(r"\bgithub_pat_[A-Za-z0-9_]{40,}\b"),
    re.compile(r"\bxox[abposr]-[A-Za-z0-9-]{10,}\b"),                # Slack
    re.compile(r"\bsk-[A-Za-z0-9_-]{20,}\b"),                        # OpenAI-style API keys
    re.compile(r"(?i)\b(authorization:\s*(?:bearer|basic|token)\s+)[A-Za-z0-9._~+/=-]{8,}"),
    re.compile(r"\beyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\b"),  # JWT
]
# One search that finds a string any of the shapes above could match: most strings in a
# record (actions, ids, outcomes) match none, and 9 searches each were ~0.1 ms per record.
# Only a hit runs the substitutions. The parts are the shapes' own patterns (scoped flags
# instead of global ones); tests/unit/test_audit_log.py checks every shape's examples.
_ANY_SHAPE = re.compile("|".join(
    [f"(?:{_TOKEN.pattern})"] +
    [f"(?{'s' if rx.flags & re.S else ''}{'i' if rx.pattern.startswith('(?i)') else ''}:"
     f"{rx.pattern.removeprefix('(?i)')})" if (rx.flags & re.S or rx.pattern.startswith("(?i)"))
     else f"(?:{rx.pattern})" for rx in _CREDENTIAL_SHAPES]))
_MIN_SHAPE = 14     # no shape matches fewer characters (xox?- and 10)
_SECRET_ENV_NAME = re.compile(r"(?i)(TOKEN|SECRET|PASS|KEY|CRED|AUTH|SESSION|COOKIE|PRIVATE)")
_MIN_ENV_SECRET = 6


def _host_env_secrets() -> list[str]:
    """Values of the daemon's own environment whose names say they are secret."""
    return sorted({v for k, v in os.environ.items()
                   if _SECRET_ENV_NAME.search(k) and len(v) >= _MIN_ENV_SECRET}, key=len, reverse=True)


class Guard:
    """Masks secret-looking strings in a record's fields. Counts what it masked."""

    def __init__(self, *, max_value: int = DEFAULT_MAX_VALUE, extra_secrets: list[str] | None = None):
        self.max_value = max_value
        self.env_secrets = _host_env_secrets() + [s for s in (extra_secrets or []) if s]
        self.masked = 0

    def clean(self, value: Any) -> Any:
        """A copy of `value` (JSON-like) with every secret-looking string masked."""
        if isinstance(value, str):
            return self._clean_str(value)
        if isinstance(value, dict):
            return {str(self._clean_str(str(k))): self.clean(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [self.clean(v) for v in value]
        if isinstance(value, bytes):
            # Bytes never go into a record as such: only their size and digest.
            return {"bytes": len(value), "sha256": hashlib.sha256(value).hexdigest()}
        if value is None or isinstance(value, (bool, int, float)):
            return value
        return self._clean_str(str(value))

    def _clean_str(self, s: str) -> str | dict:
        if len(s) > self.max_value:
            self.masked += 1
            return {"masked": "too long", "chars": len(s),
                    "sha256": hashlib.sha256(s.encode("utf-8", "surrogatepass")).hexdigest()}
        out = s
        if len(s) >= _MIN_SHAPE and _ANY_SHAPE.search(s):
            out = _TOKEN.sub(lambda m: m.group(1) + MASK, s)
            for rx in _CREDENTIAL_SHAPES:
                # A shape with a group keeps its harmless prefix ("Authorization: Bearer ").
                out = rx.sub(lambda m: (m.group(1) if m.re.groups else "") + MASK, out)
        for secret in self.env_secrets:
            if secret in out:
                out = out.replace(secret, MASK)
        if out != s:
            self.masked += 1
        return out


def salted_hash(data: bytes | str, salt: bytes) -> str:
    """Fingerprint of sensitive content: HMAC-SHA256 under the log's salt, 128 bits, hex."""
    if isinstance(data, str):
        data = data.encode("utf-8", "surrogatepass")
    return "hmac-sha256:" + hmac.new(salt, data, hashlib.sha256).hexdigest()[:32]
