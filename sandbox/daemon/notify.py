"""The sd_notify(3) protocol, spoken directly: one datagram per state change to $NOTIFY_SOCKET.

No libsystemd: the protocol is a newline-separated list of VAR=VALUE in one AF_UNIX
SOCK_DGRAM datagram; a socket path starting with '@' is in the abstract namespace. With
NotifyAccess=main, only datagrams from the main pid count, so we send from the daemon itself.
WATCHDOG_USEC (with WATCHDOG_PID, when set, naming us) asks for WATCHDOG=1 at least that
often; we send at half the interval, as sd_watchdog_enabled(3) advises.
"""
from __future__ import annotations

import os
import socket


class Notifier:
    def __init__(self, env: dict | None = None):
        env = os.environ if env is None else env
        self.address = env.get("NOTIFY_SOCKET") or None
        if self.address and self.address.startswith("@"):
            self.address = "\0" + self.address[1:]
        self.watchdog_interval: float | None = None
        usec = env.get("WATCHDOG_USEC")
        wpid = env.get("WATCHDOG_PID")
        if usec and usec.isdigit() and int(usec) > 0 and (not wpid or wpid == str(os.getpid())):
            self.watchdog_interval = int(usec) / 1e6 / 2

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, **fields) -> bool:
        """Send one datagram, e.g. send(READY=1, STATUS="serving"). False when not under systemd."""
        if not self.address:
            return False
        payload = "\n".join(f"{k}={v}" for k, v in fields.items()).encode()
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.sendto(payload, self.address)
        return True

    def ready(self, status: str = "") -> bool:
        return self.send(READY=1, STATUS=status or "ready", MAINPID=os.getpid())

    def watchdog(self) -> bool:
        return self.send(WATCHDOG=1)

    def stopping(self, status: str = "") -> bool:
        return self.send(STOPPING=1, STATUS=status or "stopping")
