"""A stand-in engine and scanner for the daemon's unit tests (HTTP, auth, tokens, release).

The integration tests (tests/integration/test_daemon*.py) use the real engine and scanner;
these fakes only let the API layer be tested without root. The fake scanner blocks on a
marker and redacts another, mimicking ScanResult(released, findings, blocked).
"""
from __future__ import annotations

import asyncio
import os
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path

from sandbox.daemon.config import DaemonConfig
from sandbox.daemon.engine import ExecOutcome

BLOCK = b"BLOCK-MARKER"
REDACT = b"REDACT-MARKER"


@dataclass
class _Finding:
    rule: str
    action: str

    def to_dict(self):
        return {"rule": self.rule, "action": self.action, "offset": 0}


@dataclass
class _Result:
    released: bytes = b""
    findings: list = field(default_factory=list)
    blocked: bool = False


class FakeStream:
    def feed(self, chunk: bytes) -> _Result:
        if BLOCK in chunk:
            return _Result(b"", [_Finding("fake-block", "block")], True)
        if REDACT in chunk:
            return _Result(chunk.replace(REDACT, b"[REDACTED]"), [_Finding("fake-redact", "redact")])
        return _Result(chunk)

    def finish(self) -> _Result:
        return _Result()


class FakeScanner:
    def stream(self, salt=None):
        return FakeStream()


class FakeHandle:
    def __init__(self, sid: str, root: Path):
        self.id = sid
        self.dir = root / sid
        self.dir.mkdir()
        self.frozen = False
        self.killed = False
        self.destroyed = False

    @property
    def workspace(self):
        return str(self.dir)

    workspace_owner = None

    async def exec(self, argv, *, env=None, cwd=None, stdin=None, timeout=None, on_output=None):
        # argv ["echo", words...] prints the words; ["fail"] exits 3.
        if argv[0] == "echo":
            for word in argv[1:]:
                await on_output("stdout", word.encode() + b"\n")
            return ExecOutcome(0, None, "exited", "exited 0", {"cpu_seconds": 0.0}, 0.001)
        if argv[0] == "sleep-forever":
            await asyncio.sleep(3600)
        return ExecOutcome(3, None, "exited", "exited 3", {}, 0.001)

    def freeze(self):
        self.frozen = True

    def thaw(self):
        self.frozen = False

    def kill(self):
        self.killed = True

    def destroy(self):
        self.destroyed = True
        return {"left": []}

    def usage(self):
        return {"cpu_seconds": 0.0, "memory_peak": 0, "pids": 1}

    def info(self):
        return {"id": self.id}


class FakeEngine:
    def __init__(self, root: Path):
        self.root = root
        self.handles: dict[str, FakeHandle] = {}

    def create(self, policy, *, sandbox_id, workspace, audit):
        h = FakeHandle(sandbox_id, self.root)
        self.handles[sandbox_id] = h
        return h

    def scanner(self, policy):
        return FakeScanner()


class DaemonThread:
    """A Daemon on its own event loop in a thread, listening on a socket in a temp dir."""

    def __init__(self, **config):
        from sandbox.daemon.server import Daemon
        self.tmp = tempfile.TemporaryDirectory(prefix=f"sbxt-{os.getpid()}-")
        root = Path(self.tmp.name)
        (root / "ws").mkdir()
        self.config = DaemonConfig(socket_path=root / "d.sock", state_dir=root / "state",
                                   run_dir=root / "run", client_group="sbxt-nogroup",
                                   admin_group="sbxt-noadmin", **config)
        self.engine = FakeEngine(root / "ws")
        self.loop = asyncio.new_event_loop()
        from sandbox.audit.sink import MemorySink
        self.audit = MemorySink()          # what the daemon recorded, for the tests to read
        self.daemon = Daemon(self.config, self.engine, audit=self.audit)
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def __enter__(self):
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self.daemon.start(), self.loop).result(10)
        return self

    def call(self, fn, *args):
        async def run():
            return fn(*args)
        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(10)

    def __exit__(self, *exc):
        try:
            asyncio.run_coroutine_threadsafe(self.daemon.stop(), self.loop).result(10)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)
            self.loop.close()
            self.tmp.cleanup()

    @property
    def socket(self) -> str:
        return str(self.config.socket_path)
