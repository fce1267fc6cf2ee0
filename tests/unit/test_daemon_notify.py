"""sd_notify spoken directly: READY/WATCHDOG/STOPPING datagrams to a socket the test binds."""
import os
import socket

from sandbox.daemon.notify import Notifier


def _bound(tmp_path, abstract=False):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.settimeout(5)
    if abstract:
        name = f"sbxt-{os.getpid()}-notify"
        s.bind("\0" + name)
        return s, "@" + name
    path = str(tmp_path / "notify")
    s.bind(path)
    return s, path


def test_ready_watchdog_stopping(tmp_path):
    s, addr = _bound(tmp_path)
    with s:
        n = Notifier({"NOTIFY_SOCKET": addr, "WATCHDOG_USEC": "4000000",
                      "WATCHDOG_PID": str(os.getpid())})
        assert n.enabled and n.watchdog_interval == 2.0
        assert n.ready("serving")
        msg = dict(line.split("=", 1) for line in s.recv(4096).decode().split("\n"))
        assert msg["READY"] == "1" and msg["STATUS"] == "serving" and msg["MAINPID"] == str(os.getpid())
        n.watchdog()
        assert s.recv(4096) == b"WATCHDOG=1"
        n.stopping()
        assert s.recv(4096).startswith(b"STOPPING=1\n")


def test_abstract_socket_and_no_systemd(tmp_path):
    s, addr = _bound(tmp_path, abstract=True)
    with s:
        assert Notifier({"NOTIFY_SOCKET": addr}).watchdog()
        assert s.recv(4096) == b"WATCHDOG=1"
    off = Notifier({})
    assert not off.enabled and not off.ready() and off.watchdog_interval is None
    # A watchdog meant for another pid is not ours to pet.
    assert Notifier({"NOTIFY_SOCKET": addr, "WATCHDOG_USEC": "1000",
                     "WATCHDOG_PID": "1"}).watchdog_interval is None
