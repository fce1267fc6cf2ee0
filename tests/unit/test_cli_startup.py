"""sandboxctl starts light: `run` imports the daemon client only when a daemon socket exists,
and the command list is a directory listing. (Start-up time itself is measured by
scripts/bench_engine.py, never by a timed test.)"""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _py(code: str, **env) -> str:
    e = {k: v for k, v in os.environ.items() if k != "SANDBOXD_SOCKET"}
    e.update(env)
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=e, capture_output=True,
                          text=True, check=True, timeout=60).stdout.strip()


def test_run_without_a_daemon_socket_never_imports_the_client(tmp_path):
    code = ("import argparse, sys\n"
            "from sandbox.cli.commands import _daemon\n"
            "args = argparse.Namespace(context=None, keep_workspace=False, policy='default',\n"
            "                          env=[], command=['true'])\n"
            "print(_daemon.run_via_daemon(args, None),\n"
            "      sorted(m for m in ('sandbox.client', 'http.client', 'email.parser')\n"
            "             if m in sys.modules))")
    out = _py(code, SANDBOXD_SOCKET=str(tmp_path / "no-daemon.sock"))
    assert out == "None []"


def test_the_light_default_socket_is_the_clients():
    out = _py("from sandbox.cli.commands._daemon import DEFAULT_SOCKET as a\n"
              "from sandbox.client import DEFAULT_SOCKET as b\nprint(a == b)")
    assert out == "True"


def test_command_names_are_the_public_command_modules():
    from sandbox.cli.main import _command_names
    names = _command_names()
    assert {"run", "ps", "doctor", "audit", "exec", "token"} <= set(names)
    assert not [n for n in names if n.startswith(("_", "-"))]
    mods = {p.stem.replace("_", "-") for p in (ROOT / "sandbox/cli/commands").glob("*.py")
            if not p.stem.startswith("_")}
    assert set(names) == mods
