"""systemd integration without systemd (pid 1 here is not systemd): the unit file verifies,
the install script lays out groups-free files under a root, and the real daemon speaks the
sd_notify protocol (READY, WATCHDOG, STOPPING) to a datagram socket the test binds."""
import os
import signal
import socket
import subprocess
from pathlib import Path

from tests.helpers.daemon import REPO, DaemonProc


def _unit_options(text: str) -> dict:
    out = {}
    for line in text.splitlines():
        if "=" in line and not line.lstrip().startswith("#"):
            k, _, v = line.partition("=")
            out.setdefault(k.strip(), v.strip())
    return out


def test_install_script_and_unit_verify(tmp_path):
    root = tmp_path / f"sbxt-{os.getpid()}-root"
    out = subprocess.run([str(REPO / "scripts/install-systemd"), "--root", str(root)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    unit = root / "etc/systemd/system/sandboxd.service"
    opts = _unit_options(unit.read_text())
    assert opts["Type"] == "notify" and opts["NotifyAccess"] == "main"
    assert opts["Delegate"] == "yes" and opts["Restart"] == "on-failure" and opts["WatchdogSec"]
    assert "RestrictNamespaces" not in opts and "ProtectControlGroups" not in opts
    assert opts["ExecStart"].split()[0] == str(REPO / ".venv/bin/sandboxd")
    assert oct((root / "var/lib/sandboxd").stat().st_mode & 0o777) == "0o700"
    v = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True,
                       timeout=60, cwd=tmp_path)
    assert v.returncode == 0, v.stderr


def test_daemon_notifies_ready_watchdog_and_stopping(tmp_path):
    ns = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    ns.settimeout(30)
    addr = str(tmp_path / "notify")
    ns.bind(addr)
    d = DaemonProc(env={"NOTIFY_SOCKET": addr, "WATCHDOG_USEC": "400000"})
    try:
        d.start()
        msgs = [ns.recv(4096).decode()]
        ready = dict(line.split("=", 1) for line in msgs[0].split("\n"))
        assert ready["READY"] == "1" and ready["MAINPID"] == str(d.proc.pid)
        # Health answered before READY? start() waited for health; READY came with it.
        assert ns.recv(4096) == b"WATCHDOG=1"
        d.proc.send_signal(signal.SIGTERM)
        for _ in range(50):
            m = ns.recv(4096).decode()
            if m.startswith("STOPPING=1"):
                break
        else:
            raise AssertionError("no STOPPING=1")
        assert d.proc.wait(60) == 0
        assert not Path(d.socket).exists()
    finally:
        assert not d.stop()
        d.cleanup()
        ns.close()
