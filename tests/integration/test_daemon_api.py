"""The API as documented: every response of a real daemon validates against
docs/openapi.yaml, and a bounded fuzz pass (hypothesis) finds no 5xx and no crash."""
import json
import urllib.parse

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.helpers.daemon import TEST_POLICY, DaemonProc, check_response, load_spec, raw_request

SPEC = load_spec()
SMALL = {"limits": {"memory": "512MiB"}}


@pytest.fixture(scope="module")
def daemon():
    with DaemonProc() as d:
        yield d


class Checked:
    """Sends requests and checks each response against the OpenAPI document."""

    def __init__(self, daemon, token=None):
        self.sock = daemon.socket
        self.token = token

    def __call__(self, method, template, *, params=None, query=None, body=None, raw=None,
                 token="default"):
        path = template
        for k, v in (params or {}).items():
            path = path.replace("{" + k + "}", urllib.parse.quote(v, safe=""))
        if query:
            path += "?" + urllib.parse.urlencode(query)
        headers = {}
        tok = self.token if token == "default" else token
        if tok:
            headers["Authorization"] = f"Bearer {tok}"
        data = raw
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        status, ctype, out = raw_request(self.sock, method, path, body=data, headers=headers)
        check_response(SPEC, method, template, status, ctype, out)
        return status, (json.loads(out) if ctype.startswith("application/json") else out)


def test_every_operation_responds_as_documented(daemon):
    admin = Checked(daemon)
    assert admin("GET", "/v1/health")[0] == 200
    assert admin("GET", "/v1/metrics")[0] == 200
    status, tok = admin("POST", "/v1/tokens", body={"name": "api", "ceiling": {"memory": "1GiB"},
                                                    "max_sandboxes": 2, "ttl": 600,
                                                    "policies": [TEST_POLICY]})
    assert status == 201
    c = Checked(daemon, tok["token"])
    assert admin("GET", "/v1/tokens")[0] == 200
    status, sb = c("POST", "/v1/sandboxes", body={"policy": TEST_POLICY, "overrides": SMALL})
    assert status == 201
    p = {"id": sb["id"]}
    assert c("GET", "/v1/sandboxes")[0] == 200
    assert c("GET", "/v1/sandboxes/{id}", params=p)[0] == 200
    assert c("PUT", "/v1/sandboxes/{id}/files", params=p, query={"path": "a/b.txt"},
             raw=b"hello\n")[0] == 201
    assert c("GET", "/v1/sandboxes/{id}/files", params=p, query={"path": "a/b.txt"})[0] == 200
    assert c("GET", "/v1/sandboxes/{id}/files", params=p, query={"path": "a"})[0] == 200
    status, out = c("POST", "/v1/sandboxes/{id}/exec", params=p,
                    body={"argv": ["sh", "-c", "cat a/b.txt; echo e >&2; exit 4"]})
    assert status == 200 and b'"exit_code":4' in out
    assert c("POST", "/v1/sandboxes/{id}/freeze", params=p)[0] == 200
    assert c("POST", "/v1/sandboxes/{id}/exec", params=p, body={"argv": ["true"]})[0] == 409
    assert c("POST", "/v1/sandboxes/{id}/resume", params=p)[0] == 200
    # Error responses are documented too.
    assert c("GET", "/v1/sandboxes/{id}", params={"id": "sb-000000000000"})[0] == 404
    assert c("POST", "/v1/sandboxes", body={"policy": TEST_POLICY, "x": 1})[0] == 400
    assert c("GET", "/v1/tokens")[0] == 403
    assert c("GET", "/v1/sandboxes", token="sbxd_000000000000_" + "A" * 43)[0] == 401
    assert admin("GET", "/v1/audit", query={"limit": "5"})[0] == 200
    assert c("DELETE", "/v1/sandboxes/{id}", params=p)[0] == 200
    status, sb2 = c("POST", "/v1/sandboxes", body={"policy": TEST_POLICY, "overrides": SMALL})
    assert status == 201
    p2 = {"id": sb2["id"]}
    assert c("DELETE", "/v1/sandboxes/{id}", params=p2, query={"wait": "maybe"})[0] == 400
    status, out = c("DELETE", "/v1/sandboxes/{id}", params=p2, query={"wait": "false"})
    assert status == 202 and out["state"] == "destroying"
    assert admin("DELETE", "/v1/tokens/{id}", params={"id": tok["id"]})[0] == 200
    assert admin("DELETE", "/v1/tokens/{id}", params={"id": "nope"})[0] == 404
    assert admin("POST", "/v1/kill")[0] == 200


_json = st.recursive(
    st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.floats(allow_nan=False)
    | st.text(max_size=20),
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=10), kids, max_size=4),
    max_leaves=12)

_OPS = sorted((m.upper(), path) for path, item in SPEC["paths"].items()
              for m in item if m != "parameters")


def _body_for(template: str, draw_json, keys):
    """Either arbitrary JSON, or a known-shaped body with fuzzed values."""
    shaped = {"/v1/sandboxes": ["policy", "overrides", "workspace"],
              "/v1/sandboxes/{id}/exec": ["argv", "env", "cwd", "stdin", "timeout"],
              "/v1/tokens": ["name", "policies", "ceiling", "network", "workspace_roots",
                             "max_sandboxes", "ttl"]}.get(template)
    if shaped and keys:
        return {k: v for k, v in zip(shaped, draw_json)}
    return draw_json[0] if draw_json else None


@settings(max_examples=100, deadline=None, derandomize=True,
          suppress_health_check=list(HealthCheck))
@given(op=st.sampled_from(_OPS), values=st.lists(_json, max_size=7), shaped=st.booleans(),
       sid=st.one_of(st.just("LIVE"), st.text(max_size=30), st.from_regex(r"sb-[0-9a-f]{12}", fullmatch=True)),
       path=st.one_of(st.text(max_size=40), st.sampled_from(["../etc/passwd", "/etc/shadow", "a/../../x",
                                                               "ok.txt", "", ".", "a\x00b"])),
       who=st.sampled_from(["admin", "token", "forged"]),
       raw=st.binary(max_size=200))
def _fuzz(daemon_ctx, op, values, shaped, sid, path, who, raw):
    method, template = op
    live, token, daemon = daemon_ctx
    if template == "/v1/kill":
        return                            # the kill switch would end the other examples' sandbox
    c = Checked(daemon, {"admin": None, "token": token,
                               "forged": "sbxd_" + "f" * 12 + "_" + "B" * 43}[who])
    params = {"id": live if sid == "LIVE" else sid} if "{id}" in template else None
    query = {"path": path} if template.endswith("/files") else None
    body = raw_body = None
    if template.endswith("/files") and method == "PUT":
        raw_body = raw
    elif method in ("POST", "PUT"):
        body = _body_for(template, values, shaped)
    try:
        status, out = c(method, template, params=params, query=query, body=body, raw=raw_body)
    except ValueError:                     # a NUL in the path cannot even be sent
        return
    assert status < 500, (method, template, status, out)
    if method == "POST" and template == "/v1/sandboxes" and status == 201:
        Checked(daemon)("DELETE", "/v1/sandboxes/{id}", params={"id": out["id"]})


def test_fuzz_finds_no_server_errors(daemon):
    admin = Checked(daemon)
    _, tok = admin("POST", "/v1/tokens", body={"name": "fuzz", "ceiling": {"memory": "1GiB"},
                                               "max_sandboxes": 3, "policies": [TEST_POLICY]})
    _, sb = Checked(daemon, tok["token"])("POST", "/v1/sandboxes",
                                          body={"policy": TEST_POLICY, "overrides": SMALL})
    try:
        _fuzz((sb["id"], tok["token"], daemon))
    finally:
        for s in json.loads(raw_request(daemon.socket, "GET", "/v1/sandboxes")[2])["sandboxes"]:
            raw_request(daemon.socket, "DELETE", f"/v1/sandboxes/{s['id']}")
    assert admin("GET", "/v1/health")[0] == 200
    assert daemon.proc.poll() is None
