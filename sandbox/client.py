"""The Python client of sandboxd, for orchestrators and for sandboxctl.

    from sandbox.client import Client
    with Client(token=open("/etc/myrunner/sandboxd.token").read()) as c:
        sb = c.create(policy="default")
        c.put_file(sb["id"], "Makefile", b"test:\\n\\techo ok\\n")
        result = c.exec(sb["id"], ["make", "test"], on_event=print)   # scanned NDJSON events
        report = c.get_file(sb["id"], "report.txt")                     # scanned too
        c.destroy(sb["id"])

`AsyncClient` has the same methods as coroutines (aiohttp over the Unix socket). The sync
client uses only http.client over AF_UNIX so `sandboxctl ps` starts fast. The token is
read from the argument, `$SANDBOXD_TOKEN` or a file; it is sent only in the Authorization
header and never appears in errors or reprs.
"""
from __future__ import annotations

import base64
import http.client
import json
import os
import socket
import urllib.parse
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

DEFAULT_SOCKET = os.environ.get("SANDBOXD_SOCKET", "/run/sandboxd/sandboxd.sock")
API = "/v1"


class DaemonError(Exception):
    """The daemon refused or failed a request: status, kind and its one-line message."""

    def __init__(self, status: int, kind: str, message: str, body: dict | None = None):
        self.status, self.kind, self.message, self.body = status, kind, message, body or {}
        super().__init__(f"{message} ({status} {kind})")


class NotRunning(DaemonError):
    def __init__(self, path: str, why: str):
        super().__init__(0, "NotRunning", f"sandboxd is not reachable at {path}: {why}")


@dataclass
class ExecResult:
    """What `exec` returns once the command ends: the exit event plus the released output."""

    exit_code: int | None
    signal: int | None
    reason: str
    reason_text: str
    usage: dict
    duration: float
    stdout: bytes = b""
    stderr: bytes = b""
    findings: list = field(default_factory=list)
    limits: list = field(default_factory=list)
    held: str | None = None


def event_bytes(ev: dict) -> bytes:
    """The bytes of a stdout/stderr/file event (text in 'data', binary in 'b64')."""
    if "b64" in ev:
        return base64.b64decode(ev["b64"])
    return ev.get("data", "").encode()


def token_from_env(token_file: str | None = None) -> str | None:
    """A token from a file, else $SANDBOXD_TOKEN; never from argv (visible in ps)."""
    if token_file:
        with open(token_file) as f:
            return f.read().strip()
    value = os.environ.get("SANDBOXD_TOKEN")
    return value.strip() if value else None


def _quote(sid: str) -> str:
    return urllib.parse.quote(sid, safe="")


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float | None):
        super().__init__("localhost", timeout=timeout)
        self.unix_path = path

    def connect(self):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        if self.timeout is not None:
            s.settimeout(self.timeout)
        try:
            s.connect(self.unix_path)
        except OSError as e:
            s.close()
            raise NotRunning(self.unix_path, e.strerror or str(e)) from None
        self.sock = s


def _collect(events, on_event) -> ExecResult:
    out, err, findings, limits, held, last = [], [], [], [], None, None
    for ev in events:
        if on_event:
            on_event(ev)
        kind = ev.get("event")
        if kind == "stdout":
            out.append(event_bytes(ev))
        elif kind == "stderr":
            err.append(event_bytes(ev))
        elif kind == "finding":
            findings.append(ev.get("finding"))
        elif kind == "limit":
            limits.append(ev)
        elif kind == "held":
            held = ev.get("reason")
        elif kind == "error":
            raise DaemonError(500, ev.get("error", "Error"), ev.get("message", ""), ev)
        elif kind == "exit":
            last = ev
    if last is None:
        raise DaemonError(502, "Truncated", "the daemon ended the output stream without an exit")
    return ExecResult(exit_code=last.get("exit_code"), signal=last.get("signal"),
                      reason=last.get("reason", ""), reason_text=last.get("reason_text") or "",
                      usage=last.get("usage") or {}, duration=last.get("duration") or 0.0,
                      stdout=b"".join(out), stderr=b"".join(err), findings=findings,
                      limits=limits, held=held)


class _Api:
    """Paths and bodies shared by the sync and async clients (written once)."""

    @staticmethod
    def create(policy, overrides, workspace):
        body: dict[str, Any] = {"policy": policy}
        if overrides:
            body["overrides"] = overrides
        if workspace:
            body["workspace"] = workspace
        return "POST", f"{API}/sandboxes", body

    @staticmethod
    def exec_body(argv, env, cwd, stdin, timeout):
        body: dict[str, Any] = {"argv": list(argv)}
        for k, v in (("env", env), ("cwd", cwd), ("stdin", stdin), ("timeout", timeout)):
            if v is not None:
                body[k] = v
        return body

    @staticmethod
    def file_path(sid, path, mode=None):
        q = {"path": path}
        if mode is not None:
            q["mode"] = f"{mode:o}"
        return f"{API}/sandboxes/{_quote(sid)}/files?" + urllib.parse.urlencode(q)

    @staticmethod
    def grant(name, policies, ceiling, network, workspace_roots, max_sandboxes, ttl):
        body = {k: v for k, v in (("name", name), ("policies", policies), ("ceiling", ceiling),
                                  ("network", network), ("workspace_roots", workspace_roots),
                                  ("max_sandboxes", max_sandboxes), ("ttl", ttl)) if v is not None}
        return body


class Client:
    """Synchronous client (http.client over AF_UNIX). One connection, kept alive."""

    def __init__(self, socket_path: str | None = None, token: str | None = None,
                 timeout: float | None = 300.0):
        self.socket_path = str(socket_path or DEFAULT_SOCKET)
        self._token = token
        self.timeout = timeout
        self._conn: _UnixHTTPConnection | None = None

    def __repr__(self):
        return f"Client({self.socket_path!r}, token={'set' if self._token else 'none'})"

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    # -- transport ------------------------------------------------------------------------
    def _headers(self, content_type: str | None) -> dict:
        h = {"Accept": "application/json"}
        if content_type:
            h["Content-Type"] = content_type
        if self._token:
            h["Authorization"] = f"Bearer {self._token}"
        return h

    def _send(self, method: str, path: str, body: bytes | None, content_type: str | None):
        for attempt in (0, 1):
            if self._conn is None:
                self._conn = _UnixHTTPConnection(self.socket_path, self.timeout)
            try:
                self._conn.request(method, path, body=body, headers=self._headers(content_type))
                return self._conn.getresponse()
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
                # The daemon closed an idle keep-alive connection: reconnect once.
                self.close()
                if attempt:
                    raise NotRunning(self.socket_path, "connection closed") from None
        raise AssertionError("unreachable")

    def _check(self, resp) -> None:
        if resp.status >= 400:
            raw = resp.read()
            try:
                data = json.loads(raw)
                raise DaemonError(resp.status, data.get("error", "Error"),
                                  data.get("message", ""), data)
            except (ValueError, AttributeError):
                raise DaemonError(resp.status, resp.reason, raw[:200].decode(errors="replace")) \
                    from None

    def request(self, method: str, path: str, body: Any = None, *, raw: bytes | None = None):
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        ctype = "application/octet-stream" if raw is not None else (
            "application/json" if body is not None else None)
        resp = self._send(method, path, data, ctype)
        self._check(resp)
        payload = resp.read()
        if resp.getheader("Content-Type", "").startswith("application/json"):
            return json.loads(payload)
        return payload.decode()

    def stream(self, method: str, path: str, body: Any) -> Iterator[dict]:
        resp = self._send(method, path, json.dumps(body).encode(), "application/json")
        self._check(resp)
        try:
            while line := resp.readline():
                if line.strip():
                    yield json.loads(line)
        finally:
            resp.read()
            if resp.will_close:
                self.close()

    # -- API ------------------------------------------------------------------------------
    def health(self) -> dict:
        return self.request("GET", f"{API}/health")

    def metrics(self) -> str:
        return self.request("GET", f"{API}/metrics")

    def create(self, policy: str = "default", overrides: dict | None = None,
               workspace: str | None = None) -> dict:
        method, path, body = _Api.create(policy, overrides, workspace)
        return self.request(method, path, body)

    def list(self) -> list[dict]:
        return self.request("GET", f"{API}/sandboxes")["sandboxes"]

    def inspect(self, sid: str) -> dict:
        return self.request("GET", f"{API}/sandboxes/{_quote(sid)}")

    def exec_events(self, sid: str, argv, *, env=None, cwd=None, stdin=None,
                    timeout=None) -> Iterator[dict]:
        return self.stream("POST", f"{API}/sandboxes/{_quote(sid)}/exec",
                           _Api.exec_body(argv, env, cwd, stdin, timeout))

    def exec(self, sid: str, argv, *, env=None, cwd=None, stdin=None, timeout=None,
             on_event: Callable[[dict], None] | None = None) -> ExecResult:
        return _collect(self.exec_events(sid, argv, env=env, cwd=cwd, stdin=stdin,
                                         timeout=timeout), on_event)

    def put_file(self, sid: str, path: str, data: bytes, mode: int | None = None) -> dict:
        return self.request("PUT", _Api.file_path(sid, path, mode), raw=bytes(data))

    def get_file(self, sid: str, path: str) -> bytes:
        return event_bytes(self.request("GET", _Api.file_path(sid, path)))

    def list_files(self, sid: str, path: str = "") -> list[dict]:
        return self.request("GET", _Api.file_path(sid, path))["entries"]

    def freeze(self, sid: str) -> dict:
        return self.request("POST", f"{API}/sandboxes/{_quote(sid)}/freeze")

    def resume(self, sid: str) -> dict:
        return self.request("POST", f"{API}/sandboxes/{_quote(sid)}/resume")

    def destroy(self, sid: str, wait: bool = True) -> dict:
        """Kill the sandbox and remove everything it had. wait=False: return (state
        "destroying") once its processes are gone; the daemon finishes the teardown in the
        background, and the sandbox lists as "destroying" until it is."""
        return self.request("DELETE", f"{API}/sandboxes/{_quote(sid)}"
                            + ("" if wait else "?wait=false"))

    def kill_all(self) -> dict:
        return self.request("POST", f"{API}/kill")

    def grant_token(self, *, name=None, policies=None, ceiling=None, network=None,
                    workspace_roots=None, max_sandboxes=None, ttl=None) -> dict:
        return self.request("POST", f"{API}/tokens", _Api.grant(
            name, policies, ceiling, network, workspace_roots, max_sandboxes, ttl))

    def list_tokens(self) -> list[dict]:
        return self.request("GET", f"{API}/tokens")["tokens"]

    def revoke_token(self, tid: str) -> dict:
        return self.request("DELETE", f"{API}/tokens/{_quote(tid)}")

    def audit(self, **filters) -> list[dict]:
        q = urllib.parse.urlencode({k: v for k, v in filters.items() if v is not None})
        return self.request("GET", f"{API}/audit" + (f"?{q}" if q else ""))["records"]


class AsyncClient:
    """asyncio client (aiohttp over the Unix socket); same methods as Client, awaited."""

    def __init__(self, socket_path: str | None = None, token: str | None = None,
                 timeout: float | None = 300.0):
        self.socket_path = str(socket_path or DEFAULT_SOCKET)
        self._token = token
        self.timeout = timeout
        self._session = None

    def __repr__(self):
        return f"AsyncClient({self.socket_path!r}, token={'set' if self._token else 'none'})"

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await self.close()

    async def close(self):
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _sess(self):
        import aiohttp
        if self._session is None:
            headers = {"Authorization": f"Bearer {self._token}"} if self._token else {}
            self._session = aiohttp.ClientSession(
                connector=aiohttp.UnixConnector(path=self.socket_path), headers=headers,
                timeout=aiohttp.ClientTimeout(total=self.timeout))
        return self._session

    async def _open(self, method, path, body=None, raw=None):
        import aiohttp
        try:
            resp = await self._sess().request(
                method, "http://localhost" + path, data=raw,
                json=body if raw is None and body is not None else None)
        except aiohttp.ClientConnectorError as e:
            raise NotRunning(self.socket_path, str(e.os_error)) from None
        if resp.status >= 400:
            try:
                data = await resp.json(content_type=None)
                raise DaemonError(resp.status, data.get("error", "Error"), data.get("message", ""),
                                  data)
            except (ValueError, AttributeError):
                raise DaemonError(resp.status, resp.reason or "", "") from None
        return resp

    async def request(self, method, path, body=None, *, raw=None):
        resp = await self._open(method, path, body, raw)
        async with resp:
            if resp.content_type == "application/json":
                return await resp.json()
            return await resp.text()

    async def exec_events(self, sid, argv, *, env=None, cwd=None, stdin=None, timeout=None):
        resp = await self._open("POST", f"{API}/sandboxes/{_quote(sid)}/exec",
                                _Api.exec_body(argv, env, cwd, stdin, timeout))
        async with resp:
            async for line in resp.content:
                if line.strip():
                    yield json.loads(line)

    async def exec(self, sid, argv, *, env=None, cwd=None, stdin=None, timeout=None,
                   on_event=None) -> ExecResult:
        events = [ev async for ev in self.exec_events(sid, argv, env=env, cwd=cwd, stdin=stdin,
                                                      timeout=timeout)]
        return _collect(events, on_event)

    async def health(self):
        return await self.request("GET", f"{API}/health")

    async def create(self, policy="default", overrides=None, workspace=None):
        method, path, body = _Api.create(policy, overrides, workspace)
        return await self.request(method, path, body)

    async def list(self):
        return (await self.request("GET", f"{API}/sandboxes"))["sandboxes"]

    async def inspect(self, sid):
        return await self.request("GET", f"{API}/sandboxes/{_quote(sid)}")

    async def put_file(self, sid, path, data, mode=None):
        return await self.request("PUT", _Api.file_path(sid, path, mode), raw=bytes(data))

    async def get_file(self, sid, path) -> bytes:
        return event_bytes(await self.request("GET", _Api.file_path(sid, path)))

    async def freeze(self, sid):
        return await self.request("POST", f"{API}/sandboxes/{_quote(sid)}/freeze")

    async def resume(self, sid):
        return await self.request("POST", f"{API}/sandboxes/{_quote(sid)}/resume")

    async def destroy(self, sid, wait=True):
        return await self.request("DELETE", f"{API}/sandboxes/{_quote(sid)}"
                                  + ("" if wait else "?wait=false"))

    async def grant_token(self, **kw):
        return await self.request("POST", f"{API}/tokens", _Api.grant(
            kw.get("name"), kw.get("policies"), kw.get("ceiling"), kw.get("network"),
            kw.get("workspace_roots"), kw.get("max_sandboxes"), kw.get("ttl")))

    async def revoke_token(self, tid):
        return await self.request("DELETE", f"{API}/tokens/{_quote(tid)}")
