"""A real sandboxd started by a test: a subprocess with its own socket, state and run dirs.

Everything lives under one temp dir named sbxt-<pid>-...; stop() sends SIGTERM (the daemon
destroys its sandboxes), waits, and checks nothing was left in the run dir.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from sandbox.client import Client, DaemonError

REPO = Path(__file__).resolve().parents[2]
TEST_POLICY = "sbxt-nodisk"


class DaemonProc:
    def __init__(self, *, client_group: str = "nogroup", admin_group: str = "sbxt-noadmin",
                 extra_args: tuple = (), env: dict | None = None):
        self.tmp = Path(tempfile.mkdtemp(prefix=f"sbxt-{os.getpid()}-sbxd-"))
        self.socket = str(self.tmp / "sandboxd.sock")
        self.state = self.tmp / "state"
        self.run = self.tmp / "run"
        self.log = self.tmp / "daemon.log"
        # The daemon runs in a network namespace of its own (unshare --net), made for this
        # test and gone with it: whatever a request asks for, the host's network is never
        # touched (NETWORK SAFETY in the brief). The Unix socket is a file: reachable anyway.
        self.args = ["unshare", "--net", "--", sys.executable, "-m", "sandbox.daemon.main",
                     "--foreground",
                     "--socket", self.socket, "--state-dir", str(self.state),
                     "--run-dir", str(self.run), "--client-group", client_group,
                     "--admin-group", admin_group, *extra_args]
        if "--warm-pool" not in extra_args:
            # No warm sandboxes unless a test asks: the tests count the sandboxes and
            # intent records a daemon has; the pool has tests of its own.
            self.args += ["--warm-pool", "0"]
        self.proc: subprocess.Popen | None = None
        self.extra_env = env or {}
        self._write_test_policy()

    def _write_test_policy(self):
        """Policy TEST_POLICY: the default policy without the bounded-disk image (/tmp and
        the workspace on the host instead of a loop-mounted ext4). The daemon's tests are
        about the daemon; the loop disk has its own tests and, under heavy parallel load,
        a teardown that can outlast its wait (see the report)."""
        pdir = self.tmp / "policies"
        pdir.mkdir()
        text = (REPO / "policies" / "default.toml").read_text()
        text = re.sub(r'(?m)^name = "default"', f'name = "{TEST_POLICY}"', text)
        text, n = re.subn(r'(?m)^disk = "[^"]*"', "disk = 0", text)
        assert n == 1, "policies/default.toml changed shape: update tests/helpers/daemon.py"
        (pdir / f"{TEST_POLICY}.toml").write_text(text)
        self.args += ["--policy-dir", str(pdir)]

    def start(self) -> "DaemonProc":
        env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "SANDBOXD_TOKEN")}
        env.update(self.extra_env)
        self._logf = open(self.log, "wb")
        self.proc = subprocess.Popen(self.args, cwd=REPO, stdout=self._logf, stderr=self._logf,
                                     env=env)
        for _ in range(300):
            if self.proc.poll() is not None:
                raise RuntimeError(f"sandboxd exited {self.proc.returncode}: {self.log.read_text()}")
            try:
                with Client(self.socket, timeout=5) as c:
                    c.health()
                return self
            except DaemonError:
                time.sleep(0.05)
        raise RuntimeError(f"sandboxd did not come up: {self.log.read_text()}")

    def admin(self) -> Client:
        return Client(self.socket)

    def stop(self) -> list[str]:
        """SIGTERM and wait; returns what was left in the run dir (should be nothing)."""
        left = []
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                left.append("daemon did not stop on SIGTERM")
        self._logf.close()
        for sub in ("sandboxes", "etc"):   # intent records; the shared /etc views
            d = self.run / sub
            if d.exists():
                left += [str(p) for p in d.iterdir()]
        return left

    def cleanup(self):
        import shutil
        shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        try:
            left = self.stop()
        finally:
            self.cleanup()
        assert not left, f"the daemon left: {left}"


class InProcDaemon:
    """The real daemon (main.assemble: real engine, hash-chained log, escalations) on an
    event loop in a thread of the test process, so a test can hook the log's fsync.
    Sandboxes use the default policy (network mode "none": no host-side network)."""

    def __init__(self, fsync=None):
        import asyncio
        import threading
        from sandbox.audit.log import AuditLog
        from sandbox.daemon.config import DaemonConfig
        from sandbox.daemon.engine import RealEngine
        from sandbox.daemon.main import assemble
        self.tmp = Path(tempfile.mkdtemp(prefix=f"sbxt-{os.getpid()}-inproc-"))
        self.socket = str(self.tmp / "d.sock")
        self.state = self.tmp / "state"
        self.config = DaemonConfig(socket_path=Path(self.socket), state_dir=self.state,
                                   run_dir=self.tmp / "run", client_group="nogroup",
                                   admin_group="sbxt-noadmin", network_sweep=False,
                                   warm_pool=0)       # as DaemonProc: no sandboxes unasked
        self.log = AuditLog(self.state, **({"fsync": fsync} if fsync else {}), mirror=None)
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        self.daemon = None
        try:
            self.daemon = self._run(assemble(self.config, self.log, RealEngine(self.tmp / "run")))
            self._run(self.daemon.start())
        except BaseException:
            self.close()
            raise

    def _run(self, coro):
        import asyncio
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(60)

    def close(self):
        import shutil
        try:
            if self.daemon is not None:
                self._run(self.daemon.stop())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)
            self.log.close()
            shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def cgroup_frozen(pid: int) -> bool:
    """Is the process's cgroup2 frozen? (cgroup.events 'frozen 1', cgroup-v2.rst)."""
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        hier, _, path = line.split(":", 2)
        if hier == "0":
            for root in ("/sys/fs/cgroup/unified", "/sys/fs/cgroup"):
                ev = Path(root + path) / "cgroup.events"
                if ev.exists():
                    return "frozen 1" in ev.read_text().splitlines()
    raise AssertionError(f"no cgroup2 membership for pid {pid}")


def wait_until(pred, seconds: float = 60.0, step: float = 0.05) -> bool:
    """Poll pred() until true or `seconds` pass (bounded: background destroys, pool refills)."""
    for _ in range(max(1, int(seconds / step))):
        if pred():
            return True
        time.sleep(step)
    return pred()


def process_tree(pid: int) -> list[int]:
    """pid and every process below it (a sandbox's whole pid namespace, seen from
    outside, when pid is its init), through /proc/<pid>/task/*/children."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except (FileNotFoundError, ProcessLookupError):
            pass
    return out


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    return state != "Z"


# -- the OpenAPI document as a checker ---------------------------------------------------------
SPEC_PATH = REPO / "docs" / "openapi.yaml"


def load_spec() -> dict:
    import yaml
    return yaml.safe_load(SPEC_PATH.read_text())


def spec_routes(spec: dict) -> set[tuple[str, str]]:
    methods = {"get", "put", "post", "delete", "patch"}
    return {(m.upper(), path) for path, item in spec["paths"].items() for m in item if m in methods}


def _resolve(spec: dict, obj: dict) -> dict:
    while "$ref" in obj:
        node = spec
        for part in obj["$ref"].lstrip("#/").split("/"):
            node = node[part]
        obj = node
    return obj


def check_response(spec: dict, method: str, template: str, status: int, content_type: str,
                   body: bytes) -> None:
    """Assert the response is documented for this operation and its body fits the schema.
    NDJSON bodies are checked line by line."""
    import json

    import jsonschema_rs
    op = spec["paths"][template][method.lower()]
    responses = op["responses"]
    assert str(status) in responses, f"{method} {template}: status {status} is not documented"
    resp = _resolve(spec, responses[str(status)])
    ctype = content_type.split(";")[0].strip()
    content = resp.get("content", {})
    assert ctype in content, f"{method} {template} {status}: content type {ctype} not documented"
    schema = content[ctype]["schema"]
    root = {**schema, "components": spec["components"]}   # so '#/components/...' refs resolve
    validator = jsonschema_rs.validator_for(root)
    if ctype == "application/json":
        docs = [json.loads(body)]
    elif ctype == "application/x-ndjson":
        docs = [json.loads(line) for line in body.splitlines() if line.strip()]
    else:
        docs = [body.decode()]
    for doc in docs:
        errors = [str(e) for e in validator.iter_errors(doc)]
        assert not errors, f"{method} {template} {status}: {errors[:3]} in {str(doc)[:300]}"


def raw_request(socket_path: str, method: str, path: str, *, body: bytes | None = None,
                headers: dict | None = None, timeout: float = 60) -> tuple[int, str, bytes]:
    """One request on a fresh connection: (status, content type, body)."""
    from sandbox.client import _UnixHTTPConnection
    conn = _UnixHTTPConnection(socket_path, timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        r = conn.getresponse()
        return r.status, r.getheader("Content-Type", ""), r.read()
    finally:
        conn.close()
