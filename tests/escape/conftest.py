from tests.helpers.engine import host_sleeper, make_sandbox, state_dir  # noqa: F401
