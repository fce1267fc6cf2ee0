"""Mirror audit records to journald with structured fields, where journald runs.

Uses journald's native protocol (systemd.journal-fields(7), "Native Journal Protocol" in
systemd's docs): one datagram per entry on /run/systemd/journal/socket, each field
`KEY=value\\n`, or, when the value holds a newline, `KEY\\n` + the value's length as a 64-bit
little-endian integer + the value + `\\n`. Field names are upper case ASCII letters, digits
and underscores, not starting with an underscore (those are trusted fields journald adds).

The mirror never blocks or fails the log: the chained file is the record of truth; a lost
datagram (journald down, socket full) is counted, not raised. Where the socket does not
exist (no systemd, as on the CI machine) the mirror is a no-op. The record passed the
redaction guard before it reaches here, so nothing secret is sent.
"""
from __future__ import annotations

import json
import os
import re
import socket
import struct

JOURNAL_SOCKET = "/run/systemd/journal/socket"
_MAX_DATAGRAM = 200 * 1024    # well under the socket's default buffer; bigger records are cut
_NAME_OK = re.compile(r"[A-Z0-9][A-Z0-9_]*")
_PRIORITY = {"ok": 6, "warning": 4, "denied": 5, "error": 3, "critical": 2}


def _field(name: str, value: str) -> bytes:
    if not _NAME_OK.fullmatch(name):
        raise ValueError(f"not a journal field name: {name!r}")
    data = value.encode("utf-8", "replace")
    if b"\n" in data:
        return name.encode() + b"\n" + struct.pack("<Q", len(data)) + data + b"\n"
    return name.encode() + b"=" + data + b"\n"


def encode(record: dict) -> bytes:
    """One audit record as a native-protocol journal entry."""
    summary = f"{record.get('action')} {record.get('outcome')}"
    if record.get("sandbox"):
        summary += f" sandbox={record['sandbox']}"
    if record.get("resource"):
        summary += f" resource={record['resource']}"
    fields = [("MESSAGE", summary),
              ("PRIORITY", str(_PRIORITY.get(str(record.get("outcome")), 6))),
              ("SYSLOG_IDENTIFIER", "sandboxd"),
              ("SANDBOXD_AUDIT_SEQ", str(record.get("seq"))),
              ("SANDBOXD_AUDIT_HASH", str(record.get("hash"))),
              ("SANDBOXD_ACTION", str(record.get("action"))),
              ("SANDBOXD_OUTCOME", str(record.get("outcome")))]
    for key in ("sandbox", "token", "uid", "resource", "permission"):
        if record.get(key) is not None:
            fields.append((f"SANDBOXD_{key.upper()}", str(record[key])))
    fields.append(("SANDBOXD_RECORD", json.dumps(record, sort_keys=True, separators=(",", ":"))))
    out = b"".join(_field(k, v) for k, v in fields)
    if len(out) > _MAX_DATAGRAM:  # keep the structured fields, drop the full copy
        out = b"".join(_field(k, v) for k, v in fields[:-1]) + _field("SANDBOXD_RECORD_TRUNCATED", "1")
    return out


class JournalMirror:
    def __init__(self, path: str = JOURNAL_SOCKET):
        self.path = path
        self.sent = 0
        self.dropped = 0
        self._sock: socket.socket | None = None
        if os.path.exists(path):
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.setblocking(False)

    @property
    def active(self) -> bool:
        return self._sock is not None

    def send(self, record: dict) -> None:
        if self._sock is None:
            return
        try:
            self._sock.sendto(encode(record), self.path)
            self.sent += 1
        except OSError:
            self.dropped += 1

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
