"""docs/openapi.yaml and the server agree: every route is documented and every documented
operation exists. (Responses are validated against the schemas in
tests/integration/test_daemon_api.py, against a real daemon.)"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from daemon_fakes import DaemonThread  # noqa: E402

from tests.helpers.daemon import load_spec, spec_routes  # noqa: E402


def test_every_route_is_documented_and_vice_versa():
    spec = load_spec()
    with DaemonThread() as d:
        server = d.daemon.routes()
    assert server == spec_routes(spec), (
        f"undocumented: {sorted(server - spec_routes(spec))}; "
        f"documented but missing: {sorted(spec_routes(spec) - server)}")


def test_every_operation_documents_its_errors():
    spec = load_spec()
    for path, item in spec["paths"].items():
        for method, op in item.items():
            if method == "parameters":
                continue
            codes = set(op["responses"])
            assert any(c.startswith("2") for c in codes), f"{method} {path}: no success response"
            assert "403" in codes, f"{method} {path}: peers outside the groups get 403"
            if path != "/v1/health":
                assert "401" in codes, f"{method} {path}: bad tokens get 401"
