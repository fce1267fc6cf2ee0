"""sandboxd's HTTP/1.1 + JSON API on a Unix socket (aiohttp), one asyncio process.

Every request: the peer's identity from SO_PEERCRED/SO_PEERGROUPS (auth.py), then the
capability token for sandbox operations, then a strictly validated body (unknown fields are
an error, sizes are bounded), then the work. Blocking engine calls run in threads so one
slow create never stalls another client. Output leaves only through the scanner.
"""
from __future__ import annotations

import asyncio
import base64
import hashlib
import itertools
import json
import logging
import os
import re
import resource
import socket
import stat
import time
from pathlib import Path

from aiohttp import web

from sandbox.audit.sink import NULL_SINK
from sandbox.daemon import bounds, files
from sandbox.daemon.auditing import QueuedSink
from sandbox.daemon.auth import Authorizer, Principal, group_id, peer_of
from sandbox.daemon.config import DaemonConfig
from sandbox.daemon.engine import call_blocking
from sandbox.daemon.errors import BadRequest, Forbidden, StateError, TooMany, status_of
from sandbox.daemon.metrics import Metrics
from sandbox.daemon.policies import PolicyCache
from sandbox.daemon.state import Registry, SandboxRecord, new_sandbox_id, valid_sandbox_id
from sandbox.daemon.tokens import CEILING_FIELDS, TokenScope, TokenStore
from sandbox.errors import AuthError, NotFoundError, PolicyError, SandboxError, TeardownError

log = logging.getLogger("sandboxd.server")

API = "/v1"
_POLICY_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
_LIMIT_REASONS = {"timeout", "oom", "pids", "disk", "cpu"}


# -- request validation -----------------------------------------------------------------------
def _typecheck(name: str, value, kind):
    ok = {"str": lambda v: isinstance(v, str),
          "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
          "num": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
          "bool": lambda v: isinstance(v, bool),
          "dict": lambda v: isinstance(v, dict),
          "strlist": lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v),
          "strmap": lambda v: isinstance(v, dict) and all(isinstance(x, str) for x in v.values()),
          "ceiling": lambda v: isinstance(v, dict)}[kind]
    if not ok(value):
        raise BadRequest(f"{name}: expected {kind}, got {type(value).__name__}")


def _check_fields(body, spec: dict[str, tuple[str, bool]]) -> dict:
    """spec: field -> (kind, required). Unknown fields are refused: a typo never does nothing."""
    if not isinstance(body, dict):
        raise BadRequest("body: expected a JSON object")
    unknown = sorted(set(body) - set(spec))
    if unknown:
        raise BadRequest(f"unknown field(s): {', '.join(map(str, unknown))[:200]} "
                         f"(known: {', '.join(spec)})")
    for name, (kind, required) in spec.items():
        if name not in body or body[name] is None:
            if required:
                raise BadRequest(f"{name}: required")
            body.pop(name, None)
            continue
        _typecheck(name, body[name], kind)
    return body


def _chunk_event(kind: str, data: bytes) -> dict:
    try:
        return {"event": kind, "data": data.decode("utf-8")}
    except UnicodeDecodeError:
        return {"event": kind, "b64": base64.b64encode(data).decode()}


class _Refuse(asyncio.Protocol):
    """Answers a connection over the limit with 503 and closes it (the daemon stays up)."""

    BODY = b'{"error": "Busy", "message": "too many connections, retry later"}'

    def connection_made(self, transport):
        transport.write(b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                        b"Connection: close\r\nContent-Length: %d\r\n\r\n" % len(self.BODY)
                        + self.BODY)
        transport.close()


class _Conn(asyncio.Protocol):
    """Wraps aiohttp's per-connection protocol to see when a connection idles or dawdles."""

    def __init__(self, daemon: "Daemon", inner):
        self.d, self.inner = daemon, inner
        self.transport = None
        self.last = time.monotonic()
        self.pending_since: float | None = None
        self.inflight = 0
        daemon.open_conns += 1      # counted at accept time, before connection_made runs

    def connection_made(self, transport):
        self.transport = transport
        self.d.conns[transport] = self
        self.inner.connection_made(transport)

    def data_received(self, data):
        self.last = time.monotonic()
        if not self.inflight and self.pending_since is None:
            self.pending_since = self.last
        self.inner.data_received(data)

    def eof_received(self):
        return self.inner.eof_received()

    def connection_lost(self, exc):
        self.d.conns.pop(self.transport, None)
        self.d.open_conns -= 1
        self.inner.connection_lost(exc)

    def pause_writing(self):
        self.inner.pause_writing()

    def resume_writing(self):
        self.inner.resume_writing()


class Daemon:
    def __init__(self, config: DaemonConfig, engine, *, audit=NULL_SINK, notifier=None,
                 escalations=None):
        self.config = config
        self.engine = engine
        # Everything the daemon, the engine and the escalation triggers record goes through
        # one QueuedSink: queued (never blocks), awaited once before each acknowledgement.
        self.audit = audit if isinstance(audit, QueuedSink) else QueuedSink(audit)
        self.esc = escalations
        if escalations is not None:
            escalations.audit = self.audit
            escalations.freeze_cb = self._escalation_freeze
        self.engine_sink = escalations.watch(self.audit) if escalations is not None else self.audit
        self._exec_ids = itertools.count(1)
        self.notifier = notifier
        self.tokens = TokenStore(config.tokens_path, default_ttl=config.token_default_ttl)
        self.auth = Authorizer(self.tokens, admin_group=config.admin_group,
                               client_group=config.client_group)
        self.registry = Registry()
        self.policies = PolicyCache()
        # Tests only: hold every teardown this long, so a test can crash the daemon between
        # a destroy's answer (?wait=false) and the end of its teardown.
        self._teardown_delay = float(os.environ.get("SANDBOXD_TEST_TEARDOWN_DELAY") or 0)
        self.metrics = Metrics()
        self.started = time.time()
        self.conns: dict = {}
        self.open_conns = 0
        self._tasks: set[asyncio.Task] = set()
        self._token_timers: dict[str, asyncio.TimerHandle] = {}
        self._runner: web.AppRunner | None = None
        self._server = None
        self._sweeper: asyncio.Task | None = None
        self.app = self._make_app()

    # -- app and routes -------------------------------------------------------------------
    def _make_app(self) -> web.Application:
        app = web.Application(client_max_size=self.config.max_body,
                              middlewares=[self._middleware])
        r = app.router
        r.add_get(f"{API}/health", self.health)
        r.add_get(f"{API}/metrics", self.metrics_text)
        r.add_post(f"{API}/sandboxes", self.create)
        r.add_get(f"{API}/sandboxes", self.list_sandboxes)
        r.add_get(f"{API}/sandboxes/{{id}}", self.inspect)
        r.add_delete(f"{API}/sandboxes/{{id}}", self.destroy)
        r.add_post(f"{API}/sandboxes/{{id}}/exec", self.exec)
        r.add_put(f"{API}/sandboxes/{{id}}/files", self.put_file)
        r.add_get(f"{API}/sandboxes/{{id}}/files", self.get_file)
        r.add_post(f"{API}/sandboxes/{{id}}/freeze", self.freeze)
        r.add_post(f"{API}/sandboxes/{{id}}/resume", self.resume)
        r.add_post(f"{API}/kill", self.kill_all)
        r.add_post(f"{API}/tokens", self.grant_token)
        r.add_get(f"{API}/tokens", self.list_tokens)
        r.add_delete(f"{API}/tokens/{{id}}", self.revoke_token)
        r.add_get(f"{API}/audit", self.audit_query)
        r.add_get(f"{API}/audit/replay/{{id}}", self.audit_replay)
        r.add_get(f"{API}/audit/verify", self.audit_verify)
        r.add_get(f"{API}/escalations", self.list_escalations)
        r.add_post(f"{API}/escalations/{{id}}/ack", self.ack_escalation)
        return app

    def routes(self) -> set[tuple[str, str]]:
        """(METHOD, path template) of every route: checked against docs/openapi.yaml."""
        out = set()
        for route in self.app.router.routes():
            if route.method in ("HEAD", "*"):
                continue
            out.add((route.method, route.resource.canonical))
        return out

    @web.middleware
    async def _middleware(self, request: web.Request, handler):
        conn = self.conns.get(request.transport)
        if conn is not None:
            conn.inflight += 1
            conn.pending_since = None
        try:
            try:
                resp = await handler(request)
            except web.HTTPException as e:
                if e.status >= 400:
                    resp = self._error(e.status, e.reason.replace(" ", ""), e.text or e.reason)
                else:
                    raise
            except SandboxError as e:
                code = status_of(e)
                if code in (401, 403):
                    self.metrics.denials["auth" if code == 401 else "forbidden"] += 1
                elif code == 429 or type(e).__name__ == "LimitError":
                    self.metrics.denials["bounds"] += 1
                if code >= 500:
                    log.error("request failed: %s %s: %s", request.method, request.path, e)
                resp = self._error(code, type(e).__name__, str(e))
            except (asyncio.TimeoutError, TimeoutError):
                resp = self._error(408, "Timeout", "request body not received in time")
            except ConnectionResetError:
                raise
            except Exception as e:  # noqa: BLE001 - one bad request must not stop the daemon
                log.exception("internal error on %s %s", request.method, request.path)
                resp = self._error(500, "InternalError", f"internal error: {type(e).__name__}")
            if not resp.prepared:
                resp = await self._after_durable(resp)
            self.metrics.requests[f"{resp.status // 100}xx"] += 1
            return resp
        finally:
            if conn is not None:
                conn.inflight -= 1
                conn.last = time.monotonic()

    async def _after_durable(self, resp):
        """The reply acknowledges what the handler recorded: it leaves only once those
        records are on disk. A failed audit write fails the request (closed), never acks."""
        try:
            await self.audit.durable()
        except Exception as e:  # noqa: BLE001
            log.error("audit log failed; refusing to acknowledge: %s", e)
            return self._error(503, "AuditUnavailable",
                               "the audit log could not record this action; not acknowledged")
        return resp

    @staticmethod
    def _error(status: int, kind: str, message: str) -> web.Response:
        return web.json_response({"error": kind, "message": message[:2000]}, status=status)

    # -- auth helpers ---------------------------------------------------------------------
    def _principal(self, request: web.Request) -> Principal:
        sock = request.transport.get_extra_info("socket") if request.transport else None
        if sock is None:
            raise Forbidden("no peer credentials on this connection")
        peer = peer_of(sock)
        try:
            return self.auth.authenticate(peer, request.headers.get("Authorization"))
        except AuthError as e:
            if "neither root" in str(e):
                raise Forbidden(str(e)) from None
            raise

    def _need_admin(self, request) -> Principal:
        p = self._principal(request)
        if not p.admin:
            raise Forbidden("this needs an administrator (root or the admin group)")
        return p

    def _need_sandbox_rights(self, request) -> Principal:
        p = self._principal(request)
        if not p.admin and p.token is None:
            raise AuthError("a capability token is required (Authorization: Bearer sbxd_...)")
        return p

    def _lookup(self, request, p: Principal) -> SandboxRecord:
        sid = request.match_info["id"]
        rec = self.registry.get(sid) if valid_sandbox_id(sid) else None
        # Another token's sandbox is "not found", never "forbidden": existence is not confirmed.
        if rec is None or (not p.admin and rec.token_id != p.token_id):
            raise NotFoundError(f"no sandbox {sid[:40]!r}")
        return rec

    async def _json(self, request: web.Request, spec) -> dict:
        if request.content_length is not None and request.content_length > self.config.max_json_body:
            raise web.HTTPRequestEntityTooLarge(max_size=self.config.max_json_body,
                                                actual_size=request.content_length)
        raw = await asyncio.wait_for(request.read(), self.config.body_timeout)
        if len(raw) > self.config.max_json_body:
            raise web.HTTPRequestEntityTooLarge(max_size=self.config.max_json_body,
                                                actual_size=len(raw))
        if not raw.strip():
            body = {}
        else:
            try:
                body = json.loads(raw)
            except (ValueError, RecursionError) as e:
                raise BadRequest(f"body is not valid JSON: {str(e)[:100]}") from None
        return _check_fields(body, spec)

    def _record(self, action: str, p: Principal | None, **kw):
        """Queue an audit record (never blocks the loop); the reply that acknowledges it
        waits for it in the middleware (or explicitly, for streamed replies)."""
        kw.update(token=p.token_id if p else None, uid=p.peer.uid if p else None)
        try:
            self.audit.record(action, **kw)
        except Exception:  # noqa: BLE001 - the log fails closed; durable() then refuses acks
            log.exception("audit record %s failed", action)

    def _spawn(self, coro):
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # -- health and metrics ---------------------------------------------------------------
    async def health(self, request):
        self._principal(request)
        from sandbox import __version__
        warm = getattr(self.engine, "warm_ready", None)
        return web.json_response({"status": "ok", "version": __version__,
                                  "sandboxes": len(self.registry.all()),
                                  "warm": warm() if warm is not None else 0,
                                  "uptime": round(time.time() - self.started, 3)})

    async def metrics_text(self, request):
        self._need_admin(request)
        return web.Response(text=self.metrics.render(self.registry.by_state()),
                            content_type="text/plain", charset="utf-8",
                            headers={"X-Prometheus-Format": "0.0.4"})

    # -- sandboxes ------------------------------------------------------------------------
    async def create(self, request):
        p = self._need_sandbox_rights(request)
        body = await self._json(request, {"policy": ("str", False), "overrides": ("dict", False),
                                          "workspace": ("str", False)})
        name = body.get("policy", "default")
        if not _POLICY_NAME.fullmatch(name):
            raise BadRequest("policy: a policy name (letters, digits, - and _), not a path")
        overrides = body.get("overrides") or {}
        workspace = body.get("workspace")
        if p.token is not None:
            scope = p.token.scope
            bounds.check_policy_allowed(scope, name)
            bounds.check_override_keys(overrides)
            workspace = bounds.check_workspace(scope, workspace)
        elif workspace is not None:
            if not workspace.startswith("/") or not os.path.isdir(workspace):
                raise BadRequest("workspace: must be an existing absolute host directory")
            workspace = os.path.realpath(workspace)
        base, final = self.policies.load_pair(name, overrides)
        if p.token is not None:
            bounds.check_within(p.token.scope, base, final)
            if self.registry.count_token(p.token_id) >= p.token.scope.max_sandboxes:
                raise TooMany(f"this token already has {p.token.scope.max_sandboxes} sandboxes "
                              "(its maximum); destroy one first")
        if p.token is not None and not p.token.active():
            # Revoked (or expired) while this request was being read: the revocation has
            # already collected the token's sandboxes, so none may be added after it.
            raise AuthError(f"token {p.token_id} was revoked or has expired")
        t0 = time.perf_counter()
        take_warm = getattr(self.engine, "take_warm", None)
        warm = take_warm(final, workspace) if take_warm is not None else None
        rec = SandboxRecord(id=warm.id if warm is not None else new_sandbox_id(), policy=final,
                            token_id=p.token_id, uid=p.peer.uid)
        self.registry.add(rec)
        if warm is not None:
            rec.handle = warm
        else:
            try:
                rec.handle = await call_blocking(self.engine.create, final, sandbox_id=rec.id,
                                                 workspace=workspace, audit=self.engine_sink)
            except BaseException:
                self.registry.remove(rec.id)
                raise
        dt = time.perf_counter() - t0
        if rec.state == "destroying":      # revoked while it was being made
            self._spawn(self._destroy(rec, "revoked during create", background=True))
            raise AuthError("the token was revoked while the sandbox was being created")
        rec.state = "running"
        if self.esc is not None:
            self.esc.set_policy(rec.id, final)
        self.metrics.create_latency.observe(dt)
        self.metrics.created += 1
        rec.expiry_timer = asyncio.get_running_loop().call_later(
            final.timeout,
            lambda: self._spawn(self._destroy(rec, "policy timeout", background=True)))
        self._record("daemon_create", p, sandbox=rec.id, resource=name,
                     duration_ms=round(dt * 1000, 3), details={"warm": warm is not None})
        return web.json_response(self._describe(rec, p), status=201)

    def _describe(self, rec: SandboxRecord, p: Principal, *, full: bool = False) -> dict:
        d = rec.summary()
        open_esc = self.esc.list(sandbox=rec.id) if self.esc is not None else []
        d["escalations"] = len(open_esc)
        if full:
            d["open_escalations"] = open_esc
        try:
            d["usage"] = rec.handle.usage() if rec.handle is not None else {}
        except Exception as e:  # noqa: BLE001 - a dying sandbox still lists
            d["usage"] = {"error": str(e)[:200]}
        if full:
            from sandbox.policy import policy_to_dict
            d["policy_detail"] = policy_to_dict(rec.policy)
            lim = rec.policy.limits
            d["limits"] = {"memory": lim.memory, "cpus": lim.cpus, "pids": lim.pids,
                           "disk": lim.disk, "timeout": rec.policy.timeout,
                           "command_timeout": rec.policy.command_timeout}
            d["network"] = {"mode": rec.policy.network.mode, "allow": list(rec.policy.network.allow)}
            try:
                d["info"] = rec.handle.info() if rec.handle is not None else {}
            except Exception as e:  # noqa: BLE001
                d["info"] = {"error": str(e)[:200]}
        return json.loads(json.dumps(d, default=str))

    async def list_sandboxes(self, request):
        p = self._need_sandbox_rights(request)
        recs = [r for r in self.registry.all() if p.admin or r.token_id == p.token_id]
        return web.json_response({"sandboxes": [self._describe(r, p) for r in recs]})

    async def inspect(self, request):
        p = self._need_sandbox_rights(request)
        return web.json_response(self._describe(self._lookup(request, p), p, full=True))

    async def destroy(self, request):
        """DELETE: kill and tear down, verify nothing is left, then answer (200). With
        ?wait=false: answer (202, "destroying") as soon as every process of the sandbox is
        gone and the pending teardown is on record; the teardown goes on in the background.
        Until it is done the sandbox lists and inspects as "destroying" and still counts
        against its token's max_sandboxes; if the daemon dies first, the engine's intent
        record (written before each resource was made) lets start-up recovery finish it."""
        p = self._need_sandbox_rights(request)
        rec = self._lookup(request, p)
        unknown = set(request.query) - {"wait"}
        if unknown:
            raise BadRequest(f"unknown query parameter(s): {', '.join(sorted(unknown))[:200]}")
        wait = request.query.get("wait", "true")
        if wait not in ("true", "false", "1", "0"):
            raise BadRequest("wait: true or false")
        if rec.state in ("creating", "destroying"):
            raise StateError(f"sandbox {rec.id} is {rec.state}")
        if wait in ("true", "1"):
            report = await self._destroy(rec, "requested", p)
            return web.json_response({"id": rec.id, "state": "destroyed", "report": report})
        try:
            kill_ms = await self._kill_now([rec])
            self._record("daemon_destroy_pending", p, sandbox=rec.id,
                         details={"why": "requested", "kill_ms": kill_ms})
        finally:
            self._spawn(self._destroy(rec, "requested", p, kill=True, background=True))
        return web.json_response({"id": rec.id, "state": "destroying", "kill_ms": kill_ms},
                                 status=202)

    async def _destroy(self, rec: SandboxRecord, why: str, p: Principal | None = None, *,
                       kill: bool = False, background: bool = False) -> dict:
        """Tear a sandbox down (once: every caller shares the one teardown in flight).
        background: nobody waits for the report (a failure is logged and escalated)."""
        if rec.teardown is None:
            if rec.handle is None:
                return {}           # still being created: create destroys it when it exists
            rec.state = "destroying"
            if rec.expiry_timer is not None:
                rec.expiry_timer.cancel()
            rec.teardown = self._spawn(self._teardown(rec, why, p, kill))
        try:
            return await asyncio.shield(rec.teardown)
        except SandboxError as e:
            if not background:
                raise
            log.error("background teardown of %s failed: %s", rec.id, e)
            return {}

    async def _teardown(self, rec: SandboxRecord, why: str, p, kill: bool) -> dict:
        handle = rec.handle
        report: dict = {}
        if self._teardown_delay:
            await asyncio.sleep(self._teardown_delay)     # tests: a crash in between

        def run():
            if kill:
                # Its processes are gone already (pidfd); this records why, through the
                # engine, and empties the cgroup for good.
                try:
                    handle.kill()
                except Exception:  # noqa: BLE001 - destroy reports what is left
                    log.exception("kill of %s failed", rec.id)
            return handle.destroy()
        try:
            report = await call_blocking(run)
        except TeardownError as e:
            if self.esc is not None:
                self.esc.observe_teardown_failure(rec.id, e.leftovers or [str(e)])
            raise
        finally:
            if self.esc is not None:
                self.esc.forget(rec.id)
            self.registry.remove(rec.id)
            rec.handle = None
            self.metrics.destroyed += 1
            self._record("daemon_destroy", p, sandbox=rec.id, details={"why": why})
        return json.loads(json.dumps(report, default=str))

    async def freeze(self, request):
        p = self._need_sandbox_rights(request)
        rec = self._lookup(request, p)
        if rec.state != "running":
            raise StateError(f"sandbox {rec.id} is {rec.state}, not running")
        await call_blocking(rec.handle.freeze)
        rec.state = "frozen"
        self._record("daemon_freeze", p, sandbox=rec.id)
        return web.json_response(self._describe(rec, p))

    async def resume(self, request):
        p = self._need_sandbox_rights(request)
        rec = self._lookup(request, p)
        if rec.state == "held" and not p.admin:
            raise Forbidden(f"sandbox {rec.id} is held after a scanner block; only an operator "
                            "may resume it")
        if rec.state not in ("frozen", "held"):
            raise StateError(f"sandbox {rec.id} is {rec.state}, not frozen or held")
        was = rec.state
        await call_blocking(rec.handle.thaw)
        rec.state, rec.held_reason = "running", None
        # Nothing withheld is released: the output was discarded when the block was found.
        self._record("daemon_resume", p, sandbox=rec.id, details={"was": was})
        return web.json_response(self._describe(rec, p))

    async def kill_all(self, request):
        p = self._need_admin(request)
        recs = [r for r in self.registry.all() if r.state != "destroying"]
        try:
            kill_ms = await self._kill_now(recs)
        except BaseException as e:
            # _kill_now marked them all destroying: tear down whatever is left, on record
            self._finish_kills(recs, "kill switch", p)
            self._record("daemon_kill_all", p, outcome="error",
                         details={"sandboxes": len(recs), "error": str(e)[:200]})
            raise
        drain = getattr(self.engine, "drain_pool", None)   # warm ones go too (and are rebuilt)
        if drain is not None:
            for failure in await call_blocking(drain):
                log.error("warm sandbox not destroyed: %s (recovery removes it)", failure)
        self._record("daemon_kill_all", p, details={"sandboxes": len(recs), "kill_ms": kill_ms})
        resp = await self._after_durable(web.json_response({"killed": len(recs),
                                                            "kill_ms": kill_ms}))
        return await self._answer_then_teardown(request, resp, recs, "kill switch", p)

    async def _answer_then_teardown(self, request, resp, recs, why: str, p):
        """Answer first, then start the teardowns: they would compete with the reply for the
        interpreter, and nothing of those sandboxes runs any more."""
        try:
            await resp.prepare(request)
            await resp.write_eof()
        finally:
            self._finish_kills(recs, why, p)
        return resp

    async def _kill_now(self, recs: list[SandboxRecord]) -> float:
        """Kill every sandbox at once; return (ms) once the last process of all is gone.

        Each sandbox's init gets SIGKILL through its pidfd, all of them first; then one
        wait on all the pidfds in the event loop. When a pid namespace's init dies the
        kernel kills every other process of the namespace and reaps them all before init's
        own exit is complete (pid_namespaces(7); zap_pid_namespace), and a pidfd polls
        readable only then (pidfd_open(2)): readable = the whole sandbox is gone. The
        engine's kill (cgroup.kill, reason, audit) follows in the background teardown.
        Handles without a pidfd are killed through the engine, side by side in threads."""
        t0 = time.perf_counter()
        fds, slow = [], []
        for r in recs:
            if r.teardown is not None:
                continue             # being destroyed already (its own kill is under way)
            if r.expiry_timer is not None:
                r.expiry_timer.cancel()
            r.state = "destroying"   # no new command; one still being created dies at birth
            if r.handle is None:
                continue
            start = getattr(r.handle, "kill_signal", None)
            fd = None
            if start is not None:
                try:
                    fd = start()
                except Exception:  # noqa: BLE001 - fall back to the engine's own kill
                    log.exception("pidfd kill of %s failed; killing through the engine", r.id)
            if fd is None:
                slow.append(r)
            else:
                fds.append((r, fd))

        def kill(r):
            try:
                r.handle.kill()
            except Exception:  # noqa: BLE001 - kill the others; destroy reports leftovers
                log.exception("kill of %s failed", r.id)
        try:
            waits = [_pidfds_gone([fd for _, fd in fds], KILL_WAIT)] if fds else []
            waits += [call_blocking(kill, r) for r in slow]
            if waits:
                await asyncio.gather(*waits)
        finally:
            for _, fd in fds:
                os.close(fd)
        return round((time.perf_counter() - t0) * 1000, 3)

    # -- exec and output release ----------------------------------------------------------
    def _scanner(self, rec: SandboxRecord):
        """The sandbox's scanner, looked up once (the engine's cache key hashes the policy)."""
        if rec.scanner is None:
            rec.scanner = self.policies.memo(rec.policy, "scanner",
                                             lambda: self.engine.scanner(rec.policy))
        return rec.scanner

    async def exec(self, request):
        p = self._need_sandbox_rights(request)
        rec = self._lookup(request, p)
        body = await self._json(request, {"argv": ("strlist", True), "env": ("strmap", False),
                                          "cwd": ("str", False), "stdin": ("str", False),
                                          "timeout": ("num", False)})
        if not body["argv"] or not body["argv"][0]:
            raise BadRequest("argv: must name a program")
        if any("\0" in a for a in body["argv"]):
            raise BadRequest("argv: must not contain NUL")
        timeout = body.get("timeout")
        if timeout is not None and not 0 < timeout <= rec.policy.command_timeout:
            raise BadRequest(f"timeout: must be more than 0 and at most the policy's "
                             f"command_timeout ({rec.policy.command_timeout}s)")
        if rec.state != "running":
            raise StateError(f"sandbox {rec.id} is {rec.state}"
                             + (" waiting for an operator" if rec.state == "held" else ""))
        scanner = self._scanner(rec)
        salt = bytes.fromhex(rec.salt)
        streams = {"stdout": scanner.stream(salt=salt), "stderr": scanner.stream(salt=salt)}
        queue: asyncio.Queue = asyncio.Queue(maxsize=64)

        async def on_output(stream: str, data: bytes):
            await queue.put((stream, bytes(data)))

        exec_id = f"{rec.id}-{next(self._exec_ids)}"
        # Env *names* only: values may be credentials the orchestrator hands the agent.
        self._record("exec_start", p, sandbox=rec.id, resource=body["argv"][0][:200],
                     details={"exec_id": exec_id, "argv": body["argv"], "cwd": body.get("cwd"),
                              "env": sorted((body.get("env") or {}).keys()),
                              "stdin_bytes": len(body.get("stdin") or "")})
        ctx = _ExecAudit(exec_id)
        resp = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await resp.prepare(request)
        rec.execs += 1
        rec.running_execs += 1
        self.metrics.execs += 1
        stdin = body["stdin"].encode() if "stdin" in body else None
        task = asyncio.get_running_loop().create_task(rec.handle.exec(
            body["argv"], env=body.get("env"), cwd=body.get("cwd"), stdin=stdin,
            timeout=timeout, on_output=on_output))
        task.add_done_callback(lambda _t: setattr(rec, "running_execs", rec.running_execs - 1))
        out = _Emitter(resp)
        held = await self._pump(rec, p, queue, task, streams, out, ctx)
        if held:
            async def drain():
                await self._pump(rec, p, queue, task, streams, None, ctx)
                await self._finish_exec(rec, p, task, None, ctx)
            self._spawn(drain())
            self._record("exec_end", p, sandbox=rec.id, outcome="held",
                         details={"exec_id": exec_id, "exit_code": None, "reason": "held",
                                  "released_bytes": ctx.nbytes})
            await self._durable_or_error(out)
            await out.send({"event": "exit", "exit_code": None, "signal": None, "reason": "held",
                            "reason_text": rec.held_reason, "usage": {}, "duration": 0.0})
        else:
            await self._finish_exec(rec, p, task, out, ctx)
        try:
            await resp.write_eof()
        except (ConnectionResetError, RuntimeError):
            pass
        return resp

    async def _pump(self, rec, p, queue, task, streams, out, ctx) -> bool:
        """Scan and release output until the command ends (False) or a block holds it (True).

        With out=None the output is withheld: scanned (findings still count and are
        audited) and dropped until the command ends, so a held sandbox never releases
        what it printed.
        """
        async def one(stream, result) -> bool:
            return await self._release(rec, p, stream, result, out, ctx) and out is not None

        while not task.done():
            getter = asyncio.ensure_future(queue.get())
            finished, _ = await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
            if getter not in finished:
                getter.cancel()
                break
            stream, data = getter.result()
            if await one(stream, streams[stream].feed(data)):
                return True
        # The engine awaited every on_output before returning: what is queued is all there is.
        while not queue.empty():
            stream, data = queue.get_nowait()
            if await one(stream, streams[stream].feed(data)):
                return True
        for name, st in streams.items():
            if await one(name, st.finish()):
                return True
        return False

    async def _release(self, rec, p, stream: str, result, out, ctx=None) -> bool:
        """Send one scan result's findings and released bytes; hold on a block or on a
        critical escalation that froze the sandbox. True if held."""
        for f in result.findings:
            fd = f.to_dict()
            rec.findings += 1
            self.metrics.findings[(str(fd.get("rule", "?")), str(fd.get("action", "?")))] += 1
            self._audit_finding(rec, p, stream, fd, ctx)
            if out is not None:
                await out.send({"event": "finding", "stream": stream, "finding": fd})
        if result.blocked and rec.state not in ("held", "destroying"):
            await self._hold(rec, p, f"scanner blocked {stream} output")
        if result.blocked or rec.state == "held":
            if out is not None and not (ctx and ctx.held_sent):
                if ctx:
                    ctx.held_sent = True
                await out.send({"event": "held", "reason": rec.held_reason})
            return True
        if result.released:
            self._audit_output(rec, p, stream, result.released, bool(result.findings), ctx)
            if out is not None:
                await out.send(_chunk_event(stream, result.released))
        return False

    def _audit_finding(self, rec, p, stream, fd: dict, ctx):
        """Rule, where, and a salted fingerprint: never the matched text (nor its preview)."""
        offset = fd.get("start")
        base = ctx.offsets.get(stream, 0) if ctx else 0
        self._record("scan_finding", p, sandbox=rec.id, resource=str(fd.get("rule")),
                     details={"exec_id": ctx.exec_id if ctx else None, "rule": fd.get("rule"),
                              "kind": fd.get("kind"), "action": fd.get("action"),
                              "stream": stream, "offset": offset,
                              "length": (fd["end"] - fd["start"]) if isinstance(fd.get("end"), int)
                              and isinstance(offset, int) else None, "stream_base": base,
                              "hash": self.audit.finding_hash(str(fd.get("hash")))})
        if self.esc is not None:
            self.esc.observe_finding(rec.id, str(fd.get("rule")),
                                     {"stream": stream, "offset": offset, "action": fd.get("action")})

    def _audit_output(self, rec, p, stream, data: bytes, redacted: bool, ctx):
        """One released chunk: what the client receives (already scanned and redacted)."""
        if ctx is None:
            return
        ctx.nbytes += len(data)
        ctx.offsets[stream] = ctx.offsets.get(stream, 0) + len(data)
        ev = _chunk_event(stream, data)
        self._record("output", p, sandbox=rec.id, resource=stream,
                     details={"exec_id": ctx.exec_id, "stream": stream, "bytes": len(data),
                              "sha256": hashlib.sha256(data).hexdigest(),
                              "verdict": "redacted" if redacted else "release",
                              **({"text": ev["data"]} if "data" in ev else {})})

    async def _durable_or_error(self, out) -> bool:
        try:
            await self.audit.durable()
            return True
        except Exception as e:  # noqa: BLE001 - fail closed: no exit event without its record
            log.error("audit log failed; not acknowledging the exec: %s", e)
            if out is not None:
                await out.send({"event": "error", "error": "AuditUnavailable",
                                "message": "the audit log could not record this command"})
            return False

    def _escalation_freeze(self, sandbox_id: str):
        """Escalations' freeze_cb: a critical escalation freezes the sandbox and holds it
        for an operator, exactly like a scanner block."""
        rec = self.registry.get(sandbox_id)
        if rec is None or rec.handle is None or rec.state in ("held", "destroying", "dead"):
            return
        rec.handle.freeze()
        rec.state, rec.held_reason = "held", "critical escalation: waiting for an operator"
        self.metrics.held += 1
        self._record("daemon_hold", None, sandbox=rec.id, outcome="held",
                     details={"why": "critical escalation"})

    async def _hold(self, rec: SandboxRecord, p, reason: str):
        """Freeze the sandbox (cgroup freeze) and wait for an operator."""
        rec.state, rec.held_reason = "held", reason
        self.metrics.held += 1
        try:
            rec.handle.freeze()
        except Exception:  # noqa: BLE001 - cannot freeze: kill rather than let it run on
            log.exception("freeze of held sandbox %s failed; killing it", rec.id)
            rec.handle.kill()
        self._record("daemon_hold", p, sandbox=rec.id, outcome="held", details={"why": reason})
        log.warning("sandbox %s held: %s", rec.id, reason)

    async def _finish_exec(self, rec, p, task, out, ctx):
        if out is None:           # a held command's background drain: record how it ended
            out = _Emitter(None)
            out.gone = True
            try:
                await task
            except BaseException:  # noqa: BLE001 - reported below through task.result()
                pass
        try:
            res = task.result()
        except SandboxError as e:
            self._record("exec_end", p, sandbox=rec.id, outcome="error",
                         details={"exec_id": ctx.exec_id, "error": type(e).__name__})
            await self._durable_or_error(out)
            await out.send({"event": "error", "error": type(e).__name__, "message": str(e)})
            return
        except Exception as e:  # noqa: BLE001
            log.exception("exec in %s failed", rec.id)
            await out.send({"event": "error", "error": "InternalError",
                            "message": f"internal error: {type(e).__name__}"})
            return
        self._note_death(rec)
        usage = json.loads(json.dumps(res.usage, default=str))
        self._record("exec_end", p, sandbox=rec.id,
                     outcome="ok" if res.exit_code == 0 else "failed",
                     details={"exec_id": ctx.exec_id, "exit_code": res.exit_code,
                              "signal": res.signal, "reason": res.reason, "usage": usage,
                              "duration": res.duration, "released_bytes": ctx.nbytes})
        if self.esc is not None:
            self.esc.observe_usage(rec.id, res.usage, rec.policy.limits)
            self.esc.observe_output_volume(rec.id, ctx.nbytes,
                                           rec.policy.scanner.expected_output)
        if not await self._durable_or_error(out):
            return
        if res.reason in _LIMIT_REASONS:
            await out.send({"event": "limit", "limit": res.reason, "text": res.reason_text})
        await out.send({"event": "exit", "exit_code": res.exit_code, "signal": res.signal,
                        "reason": res.reason, "reason_text": res.reason_text,
                        "usage": usage, "duration": res.duration})

    def _note_death(self, rec: SandboxRecord):
        """A command timeout (or the lifetime) kills the whole sandbox: say so in its state."""
        try:
            info = rec.handle.info() if rec.handle is not None else {}
        except Exception:  # noqa: BLE001 - a sandbox being destroyed
            return
        if info.get("state") == "dead" and rec.state == "running":
            rec.state = "dead"
            rec.held_reason = info.get("reason")

    # -- files ----------------------------------------------------------------------------
    def _file_rec(self, request, states=("running", "frozen")) -> tuple[Principal, SandboxRecord, str]:
        p = self._need_sandbox_rights(request)
        rec = self._lookup(request, p)
        unknown = set(request.query) - {"path", "mode"}
        if unknown:
            raise BadRequest(f"unknown query parameter(s): {', '.join(sorted(unknown))[:200]}")
        if rec.state not in states:
            raise StateError(f"sandbox {rec.id} is {rec.state}")
        return p, rec, request.query.get("path", "")

    async def put_file(self, request):
        p, rec, path = self._file_rec(request)
        files.check_relpath(path)
        mode_s = request.query.get("mode", "644")
        if not re.fullmatch(r"0?[0-7]{3}", mode_s):
            raise BadRequest("mode: octal permission bits like 644")
        data = await asyncio.wait_for(request.read(), self.config.body_timeout)
        n = await call_blocking(files.write_file, rec.handle.workspace, path, data,
                                mode=int(mode_s, 8), owner=rec.handle.workspace_owner)
        self._record("daemon_file_in", p, sandbox=rec.id, resource=path, details={"bytes": n})
        return web.json_response({"path": path, "size": n}, status=201)

    async def get_file(self, request):
        # Artifacts of a sandbox a timeout killed can still be read out (scanned as ever).
        p, rec, path = self._file_rec(request, ("running", "frozen", "dead"))
        if not path or path in (".", "/"):
            return web.json_response({"path": "", "entries": await call_blocking(
                files.list_dir, rec.handle.workspace, "")})
        files.check_relpath(path)
        try:
            data = await call_blocking(files.read_file, rec.handle.workspace, path,
                                       max_bytes=self.config.max_file_read)
        except files.PathError as e:
            if "is a directory" not in str(e):
                raise
            return web.json_response({"path": path, "entries": await call_blocking(
                files.list_dir, rec.handle.workspace, path)})
        st = self._scanner(rec).stream(salt=bytes.fromhex(rec.salt))
        results = [st.feed(data), st.finish()]
        findings = [f.to_dict() for r in results for f in r.findings]
        for fd in findings:
            rec.findings += 1
            self.metrics.findings[(str(fd.get("rule", "?")), str(fd.get("action", "?")))] += 1
            self._audit_finding(rec, p, "file", fd, None)
        if any(r.blocked for r in results) and rec.state not in ("held", "destroying"):
            await self._hold(rec, p, f"scanner blocked file {path[:200]}")
        if any(r.blocked for r in results) or rec.state == "held":
            self._record("daemon_file_out", p, sandbox=rec.id, resource=path, outcome="withheld")
            return web.json_response({"error": "Withheld", "message": f"{path}: withheld by the "
                                      f"scanner; sandbox {rec.id} is held for an operator",
                                      "findings": findings}, status=409)
        released = b"".join(r.released for r in results)
        self._record("daemon_file_out", p, sandbox=rec.id, resource=path,
                     details={"bytes": len(released), "findings": len(findings)})
        ev = _chunk_event("file", released)
        ev.pop("event")
        return web.json_response({"path": path, "size": len(released), "findings": findings, **ev})

    # -- tokens ---------------------------------------------------------------------------
    async def grant_token(self, request):
        p = self._need_admin(request)
        body = await self._json(request, {"name": ("str", False), "policies": ("strlist", False),
                                          "ceiling": ("ceiling", False), "network": ("strlist", False),
                                          "workspace_roots": ("strlist", False),
                                          "max_sandboxes": ("int", False), "ttl": ("num", False)})
        scope = TokenScope(policies=body.get("policies", ["default"]),
                           ceiling=_parse_ceiling(body.get("ceiling", {})),
                           network=body.get("network", []),
                           workspace_roots=body.get("workspace_roots", []),
                           max_sandboxes=body.get("max_sandboxes", 8))
        tok, value = self.tokens.grant(scope, granted_by=p.peer.uid, ttl=body.get("ttl"),
                                       name=body.get("name", ""))
        self._arm_token_timer(tok)
        self._record("token_grant", p, resource=tok.id, details={"name": tok.name,
                                                                 "expires": tok.expires})
        return web.json_response({"token": value, **tok.public()}, status=201)

    async def list_tokens(self, request):
        self._need_admin(request)
        return web.json_response({"tokens": [
            {**t.public(), "sandboxes": self.registry.count_token(t.id)} for t in self.tokens.list()]})

    async def revoke_token(self, request):
        """Revoke a token and kill its sandboxes: the token is refused from the first step
        on (in memory); the kill and the fsynced token file are done side by side; the reply
        comes once every process of every sandbox of the token is gone *and* the revocation
        (token file and audit record) is durable. Teardown goes on in the background."""
        p = self._need_admin(request)
        tid = request.match_info["id"]
        try:
            tok, unsaved = self.tokens.mark_revoked(tid)
        except KeyError:
            raise NotFoundError(f"no token {tid[:40]!r}") from None
        timer = self._token_timers.pop(tok.id, None)
        if timer is not None:
            timer.cancel()
        saving = asyncio.ensure_future(call_blocking(self.tokens.save)) if unsaved else None
        recs = [r for r in self.registry.of_token(tok.id) if r.state != "destroying"]
        try:
            kill_ms = await self._kill_now(recs)
        except BaseException:
            self._finish_kills(recs, "token revoked", p)   # whatever is left is torn down
            if saving is not None:
                saving.add_done_callback(lambda f: f.cancelled() or f.exception())
            raise
        log.info("token %s revoked: killed %d sandboxes in %.3f ms", tok.id, len(recs), kill_ms)
        self._record("token_revoke", p, resource=tok.id,
                     details={"sandboxes": len(recs), "kill_ms": kill_ms})
        # The token file and the audit record go to disk side by side.
        saved, logged = await asyncio.gather(saving or asyncio.sleep(0), self.audit.durable(),
                                             return_exceptions=True)
        if isinstance(saved, BaseException):
            log.error("token %s revoked in memory and its sandboxes killed, but the token "
                      "file could not be written: %s", tok.id, saved)
            self._record("token_revoke_not_durable", p, resource=tok.id, outcome="error",
                         details={"persist_error": type(saved).__name__})
            self._finish_kills(recs, "token revoked", p)
            return self._error(503, "NotDurable", f"token {tok.id} is refused and its "
                               f"{len(recs)} sandboxes were killed, but the revocation could "
                               "not be saved (it would not survive a restart); retry")
        resp = web.json_response({**tok.public(), "killed": len(recs), "kill_ms": kill_ms})
        if isinstance(logged, BaseException):
            resp = await self._after_durable(resp)       # the audit log failed: 503, not an ack
        return await self._answer_then_teardown(request, resp, recs, "token revoked", p)

    def _finish_kills(self, recs: list[SandboxRecord], why: str, p=None):
        """Background teardown of killed sandboxes (the engine's kill records the reason)."""
        for r in recs:
            if r.handle is not None:
                self._spawn(self._destroy(r, why, p, kill=True, background=True))

    def _arm_token_timer(self, tok):
        if not tok.active():
            return
        loop = asyncio.get_running_loop()

        async def expire_now():
            recs = [r for r in self.registry.of_token(tok.id) if r.state != "destroying"]
            try:
                ms = await self._kill_now(recs)
            except BaseException as e:
                self._record("token_expire", None, resource=tok.id, outcome="error",
                             details={"sandboxes": len(recs), "error": str(e)[:200]})
                raise
            finally:
                self._finish_kills(recs, "token expired")   # whatever the kill left
            log.info("token %s expired: killed %d sandboxes in %.3f ms", tok.id, len(recs), ms)
            self._record("token_expire", None, resource=tok.id,
                         details={"sandboxes": len(recs), "kill_ms": ms})

        def expire():
            self._token_timers.pop(tok.id, None)
            self._spawn(expire_now())
        # call_later caps long delays fine; re-check at fire time in case of clock jumps.
        self._token_timers[tok.id] = loop.call_later(max(0.0, tok.expires - time.time()), expire)

    # -- audit ----------------------------------------------------------------------------
    async def audit_query(self, request):
        """Audit records (the audit engineer's sandbox.audit.query.query), oldest first."""
        self._need_admin(request)
        unknown = set(request.query) - {"sandbox", "action", "since_seq", "limit"}
        if unknown:
            raise BadRequest(f"unknown query parameter(s): {', '.join(sorted(unknown))[:200]}")
        q = request.query
        try:
            limit = int(q.get("limit", "100"))
            since = int(q.get("since_seq", "0"))
        except ValueError:
            raise BadRequest("limit and since_seq: integers") from None
        if not 1 <= limit <= 10000 or since < 0:
            raise BadRequest("limit: between 1 and 10000; since_seq: 0 or more")
        if getattr(self.audit, "dir", None) is None:
            return web.json_response({"records": []})
        from sandbox.audit.query import query
        flush = getattr(self.audit, "flush_async", None)
        if flush:
            await flush()
        records = await call_blocking(query, self.audit.dir, sandbox=q.get("sandbox"),
                                      action=q.get("action"), since_seq=since, limit=limit)
        return web.json_response({"records": json.loads(json.dumps(records, default=str))})

    def _audit_dir(self):
        d = getattr(self.audit, "dir", None)
        if d is None:
            raise StateError("this daemon runs without an audit log")
        return d

    async def audit_replay(self, request):
        """One sandbox's timeline (sandbox.audit.replay): commands, output, denials, end."""
        self._need_admin(request)
        sid = request.match_info["id"]
        if not valid_sandbox_id(sid):
            raise BadRequest("sandbox: a sandbox id (sb- and 12 hex digits)")
        d = self._audit_dir()
        await self.audit.flush_async()
        from sandbox.audit.replay import replay
        tl = await call_blocking(replay, d.parent, sid)
        return web.json_response(json.loads(json.dumps(tl, default=str)))

    async def audit_verify(self, request):
        """Check the whole hash chain (sandbox.audit.verify); names the first bad record."""
        self._need_admin(request)
        d = self._audit_dir()
        await self.audit.flush_async()
        from sandbox.audit.verify import verify
        rep = await call_blocking(verify, d)
        return web.json_response(json.loads(json.dumps(rep.to_dict(), default=str)))

    # -- escalations ----------------------------------------------------------------------
    async def list_escalations(self, request):
        self._need_admin(request)
        unknown = set(request.query) - {"all", "sandbox"}
        if unknown:
            raise BadRequest(f"unknown query parameter(s): {', '.join(sorted(unknown))[:200]}")
        items = [] if self.esc is None else self.esc.list(
            all=request.query.get("all", "") in ("1", "true", "yes"),
            sandbox=request.query.get("sandbox"))
        return web.json_response({"escalations": json.loads(json.dumps(items, default=str))})

    async def ack_escalation(self, request):
        p = self._need_admin(request)
        if self.esc is None:
            raise NotFoundError("no escalations in this daemon")
        eid = request.match_info["id"]
        if not re.fullmatch(r"esc-[0-9a-f]{1,32}", eid):
            raise NotFoundError(f"no escalation {eid[:40]!r}")
        esc = self.esc.ack(eid, p.peer.uid)
        return web.json_response(json.loads(json.dumps(esc, default=str)))

    # -- lifecycle ------------------------------------------------------------------------
    def _make_socket(self) -> socket.socket:
        path = Path(self.config.socket_path)
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
        if path.exists() or path.is_symlink():
            if not stat.S_ISSOCK(path.lstat().st_mode):
                raise SandboxError(f"{path} exists and is not a socket; refusing to replace it")
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(str(path))
                raise SandboxError(f"another daemon is listening on {path}")
            except (ConnectionRefusedError, FileNotFoundError):
                path.unlink()
            finally:
                probe.close()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        old = os.umask(0o177)          # born 0600: no window where others could connect
        try:
            sock.bind(str(path))
        finally:
            os.umask(old)
        gid = group_id(self.config.client_group)
        if gid is None:
            log.warning("group %r does not exist: socket %s is root-only (0600); run "
                        "scripts/install-systemd to create it", self.config.client_group, path)
        else:
            os.chown(path, 0 if os.geteuid() == 0 else -1, gid)
            os.chmod(path, 0o660)
        sock.listen(1024)
        sock.setblocking(False)
        return sock

    async def start(self):
        _raise_nofile()
        os.environ.pop("SANDBOXD_TOKEN", None)
        self._runner = web.AppRunner(self.app, access_log=None, shutdown_timeout=5.0,
                                     keepalive_timeout=self.config.idle_timeout,
                                     handle_signals=False)
        await self._runner.setup()
        sock = self._make_socket()
        inner = self._runner.server
        loop = asyncio.get_running_loop()

        def factory():
            if self.open_conns >= self.config.max_connections:
                self.metrics.denials["connections"] += 1
                return _Refuse()
            return _Conn(self, inner())
        self._server = await loop.create_unix_server(factory, sock=sock, backlog=1024)
        for tok in self.tokens.list():
            self._arm_token_timer(tok)
        self._sweeper = loop.create_task(self._sweep())
        self._start_warm_pool()
        self._record("daemon_start", None, details={"socket": str(self.config.socket_path),
                                                    "pid": os.getpid()})
        log.info("listening on %s", self.config.socket_path)

    async def _sweep(self):
        """Close connections that idle or send a request too slowly (slowloris)."""
        while True:
            await asyncio.sleep(min(1.0, self.config.header_timeout / 2))
            now = time.monotonic()
            for conn in list(self.conns.values()):
                if conn.inflight:
                    continue
                if ((conn.pending_since is not None
                     and now - conn.pending_since > self.config.header_timeout)
                        or now - conn.last > self.config.idle_timeout):
                    conn.transport.close()

    def _start_warm_pool(self):
        """Warm sandboxes of the default policy, unchanged: what a create asking for
        exactly that gets at once (engine.take_warm); a default policy that cannot be
        loaded only means no pool."""
        start = getattr(self.engine, "start_pool", None)
        if not self.config.warm_pool or start is None:
            return
        try:
            _, final = self.policies.load_pair("default", {})
        except SandboxError as e:
            log.error("no warm pool: the default policy does not load: %s", e)
            return
        start(final, self.config.warm_pool, audit=self.engine_sink, new_id=new_sandbox_id)

    async def _close_warm_pool(self):
        close = getattr(self.engine, "close_pool", None)
        if close is not None:
            for failure in await call_blocking(close):
                log.error("warm sandbox not destroyed: %s (recovery removes it)", failure)

    async def stop(self):
        if self._sweeper:
            self._sweeper.cancel()
        await self._close_warm_pool()
        for t in self._token_timers.values():
            t.cancel()
        if self._server is not None:
            self._server.close()
        recs = self.registry.all()
        if recs:
            try:
                await self._kill_now(recs)
            except SandboxError as e:
                log.error("stopping: %s", e)
            # Every process is gone already; what a slow teardown leaves after this bound
            # is named in the intent records and removed by recovery at the next start.
            done, pending = await asyncio.wait(
                [asyncio.ensure_future(self._destroy(r, "daemon stopping", kill=True))
                 for r in recs if r.handle is not None] or [asyncio.sleep(0)], timeout=30)
            if pending:
                log.error("%d sandboxes not destroyed in time; recovery removes them at the "
                          "next start", len(pending))
        for t in list(self._tasks):
            t.cancel()
        if self._runner is not None:
            await self._runner.cleanup()
        try:
            os.unlink(self.config.socket_path)
        except FileNotFoundError:
            pass
        self._record("daemon_stop", None, details={"pid": os.getpid()})


KILL_WAIT = 30.0     # seconds a kill may take before the request fails (D-state, a kernel bug)


async def _pidfds_gone(fds: list[int], timeout: float):
    """Wait in the event loop until every pidfd polls readable (its process exited)."""
    loop = asyncio.get_running_loop()
    left = set(fds)
    done = loop.create_future()

    def ready(fd):
        loop.remove_reader(fd)
        left.discard(fd)
        if not left and not done.done():
            done.set_result(None)
    for fd in fds:
        loop.add_reader(fd, ready, fd)
    try:
        await asyncio.wait_for(done, timeout)
    except asyncio.TimeoutError:
        raise SandboxError(f"{len(left)} sandbox(es) still had processes {timeout:g} s after "
                           "SIGKILL", step="kill") from None
    finally:
        for fd in left:
            loop.remove_reader(fd)


class _ExecAudit:
    """Per-command audit state: its id, released bytes, offsets per stream."""

    def __init__(self, exec_id: str):
        self.exec_id = exec_id
        self.nbytes = 0
        self.offsets: dict[str, int] = {}
        self.held_sent = False


class _Emitter:
    """Writes NDJSON events; a client that went away stops receiving, the scan goes on."""

    def __init__(self, resp: web.StreamResponse):
        self.resp = resp
        self.gone = False

    async def send(self, event: dict):
        if self.gone:
            return
        try:
            await self.resp.write(json.dumps(event, separators=(",", ":")).encode() + b"\n")
        except (ConnectionResetError, RuntimeError, ConnectionError):
            self.gone = True


def _parse_ceiling(raw: dict) -> dict:
    from sandbox.policy.units import parse_duration, parse_size
    out = {}
    for k, v in raw.items():
        if k not in CEILING_FIELDS:
            raise BadRequest(f"ceiling.{k}: unknown (known: {', '.join(CEILING_FIELDS)})")
        try:
            if isinstance(v, str) and k in ("memory", "disk"):
                v = parse_size(v)
            elif isinstance(v, str) and k == "timeout":
                v = parse_duration(v)
        except ValueError as e:
            raise BadRequest(f"ceiling.{k}: {e}") from None
        if not isinstance(v, (int, float)) or isinstance(v, bool) or v <= 0 or v != v:
            raise BadRequest(f"ceiling.{k}: must be a positive number")
        out[k] = v
    return out


def _raise_nofile():
    """Thousands of idle clients need thousands of fds: lift the soft limit to the hard one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else 65536
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
