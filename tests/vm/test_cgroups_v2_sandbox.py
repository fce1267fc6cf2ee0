"""The limits from inside a real sandbox on cgroup v2 (the VM): the very tests of
tests/integration/test_limits_sandbox.py, collected again here so the v2 driver passes the
same fork bomb, memory bomb, disk filler, CPU quota, timeout, detach and refusal checks."""
from tests.integration.test_limits_sandbox import *  # noqa: F401,F403 - the same tests, on v2
from tests.integration.test_limits_sandbox import box, lim_env, make_sandbox, state_dir  # noqa: F401
