"""The client library and the CLI's client side: light imports, tokens kept out of sight."""
import subprocess
import sys

import pytest

from sandbox.client import AsyncClient, Client, NotRunning, event_bytes, token_from_env


def test_ps_imports_no_heavy_modules():
    code = ("import sys\nfrom sandbox.cli.main import main\n"
            "rc = main(['ps', '--socket', '/nonexistent-sbxt'])\n"
            "heavy = [m for m in ('aiohttp', 'hyperscan', 'pyroute2', 'sandbox.runtime.sandbox',"
            " 'sandbox.scan') if m in sys.modules]\n"
            "print(rc, heavy)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "2 []", out.stdout + out.stderr
    assert "not reachable" in out.stderr and len(out.stderr.strip().splitlines()) == 1


def test_token_sources_and_repr(tmp_path, monkeypatch):
    f = tmp_path / "tok"
    f.write_text("sbxd_aaaaaaaaaaaa_" + "x" * 43 + "\n")
    assert token_from_env(str(f)) == "sbxd_aaaaaaaaaaaa_" + "x" * 43
    monkeypatch.setenv("SANDBOXD_TOKEN", " sbxd_bbbbbbbbbbbb_" + "y" * 43)
    assert token_from_env() == "sbxd_bbbbbbbbbbbb_" + "y" * 43
    c = Client("/x", token="sbxd_bbbbbbbbbbbb_" + "y" * 43)
    assert "y" * 43 not in repr(c) and "set" in repr(c)
    assert "y" * 43 not in repr(AsyncClient("/x", token="sbxd_bbbbbbbbbbbb_" + "y" * 43))


def test_event_bytes_and_not_running():
    assert event_bytes({"data": "hé"}) == "hé".encode()
    assert event_bytes({"b64": "AAE="}) == b"\x00\x01"
    with pytest.raises(NotRunning):
        Client("/nonexistent-sbxt.sock").health()


def test_token_never_accepted_on_the_command_line():
    out = subprocess.run([sys.executable, "-m", "sandbox.cli.main", "ps", "--token", "x"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and ("unrecognized" in out.stderr or "ambiguous" in out.stderr)
