"""What the scanner reports: findings that never carry the secret, and per-feed results.

A Finding holds the rule id, kind, severity, action, byte offsets into the stream, a salted
hash of the matched bytes (sha256 over salt + match, truncated to 16 hex digits: enough to
correlate the same secret across outputs of one sandbox, useless to brute-force a random
token, and unlinkable across sandboxes because the salt is per sandbox) and a masked preview
(at most 4 leading characters, fewer for short values, plus the length). `repr()` and
`to_dict()` show only those fields.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

ACTIONS = ("flag", "redact", "block")          # in increasing severity
ACTION_RANK = {a: i for i, a in enumerate(ACTIONS)}
SEVERITIES = ("info", "low", "medium", "high", "critical")
KINDS = ("secret", "pii", "encoded", "binary", "volume")


def salted_hash(salt: bytes, value: bytes) -> str:
    return hashlib.sha256(salt + value).hexdigest()[:16]


def masked_preview(value: bytes) -> str:
    """At most 4 leading characters and never more than a quarter of the value, plus length."""
    keep = min(4, len(value) // 4)
    head = value[:keep].decode("ascii", "replace")
    head = "".join(c if c.isprintable() and c.isascii() else "?" for c in head)
    return f"{head}…({len(value)})"


@dataclass(frozen=True)
class Finding:
    rule_id: str
    kind: str
    severity: str
    action: str
    start: int                  # byte offset in the stream (of the encoded text, if encoded)
    end: int
    hash: str = ""              # salted_hash(salt, matched bytes)
    preview: str = ""           # masked_preview(matched bytes)
    encoding: tuple = ()        # decoders applied, outermost first: ("base64",), ("hex", "base64")

    @property
    def blocks(self) -> bool:
        return self.action == "block"

    def to_dict(self) -> dict:
        return {"rule": self.rule_id, "kind": self.kind, "severity": self.severity,
                "action": self.action, "start": self.start, "end": self.end,
                "hash": self.hash, "preview": self.preview, "encoding": list(self.encoding)}

    def to_jsonl(self) -> dict:
        """The stable four-field form of `sandboxctl scan --jsonl`."""
        return {"start": self.start, "end": self.end, "kind": self.kind, "block": self.blocks}

    def shifted(self, delta: int) -> "Finding":
        return Finding(self.rule_id, self.kind, self.severity, self.action, self.start + delta,
                       self.end + delta, self.hash, self.preview, self.encoding)


@dataclass
class ScanResult:
    released: bytes = b""                 # bytes that may leave the sandbox (redacted)
    findings: list = field(default_factory=list)
    blocked: bool = False                 # the stream is blocked: nothing more is released

    def __repr__(self) -> str:
        return (f"ScanResult(released={len(self.released)} bytes, findings={self.findings!r}, "
                f"blocked={self.blocked})")
