"""Per-sandbox bandwidth: a token bucket (tbf, tc-tbf(8)) on the sandbox side of its veth.

The qdisc sits on `eth0` inside the sandbox's netns. That netns belongs to the host user
namespace, so nothing in the sandbox (not even root in its own user namespace) holds
CAP_NET_ADMIN over it and cannot change or remove the qdisc. It limits what the sandbox
sends (egress: uploads, floods); it goes away with the namespace.
Callers run these functions in the namespace of the interface (network.HostSide.inside).
"""
from __future__ import annotations

import contextlib

from sandbox.errors import NetworkError, TeardownError

_ROOT_HANDLE = 0x10000  # "1:"


def _ipr():
    from pyroute2 import IPRoute
    return IPRoute()


def burst_bytes(rate_bps: int) -> int:
    # The bucket must hold at least one full packet (plus GSO slack) and about 20 ms at the
    # rate, or tbf throttles below it; much more lets bursts overshoot the average.
    return max(16 * 1024, rate_bps // 8 // 50)


def limit_egress(ifname: str, rate_bps: int):
    """Put a tbf root qdisc on ifname (in the current netns). Raises NetworkError."""
    with contextlib.closing(_ipr()) as ipr:
        idx = ipr.link_lookup(ifname=ifname)
        if not idx:
            raise NetworkError(f"tc: no interface {ifname} to rate-limit")
        try:
            ipr.tc("add", "tbf", idx[0], _ROOT_HANDLE, rate=f"{rate_bps}bit",
                   burst=burst_bytes(rate_bps), latency="50ms")
        except Exception as e:
            raise NetworkError(f"tc: cannot add a tbf qdisc on {ifname}",
                               errno=getattr(e, "code", None), syscall="rtnetlink") from e


def qdisc_kinds(ifname: str) -> list[str]:
    """The root qdisc kinds on ifname (for tests and verification)."""
    with contextlib.closing(_ipr()) as ipr:
        idx = ipr.link_lookup(ifname=ifname)
        if not idx:
            return []
        return [q.get_attr("TCA_KIND") for q in ipr.get_qdiscs(idx[0])
                if q["parent"] == 0xFFFFFFFF]


def remove(ifname: str):
    """Delete our root qdisc on ifname (if the interface still exists) and verify."""
    with contextlib.closing(_ipr()) as ipr:
        idx = ipr.link_lookup(ifname=ifname)
        if not idx:
            return
        with contextlib.suppress(Exception):
            ipr.tc("del", "tbf", idx[0], _ROOT_HANDLE)
    if "tbf" in qdisc_kinds(ifname):
        raise TeardownError("tbf qdisc survived deletion", leftovers=[ifname])


def cleanup_qdisc(fields: dict):
    """Crash recovery for intent kind `qdisc`: the qdisc lives on eth0 inside the sandbox's
    netns, so it is gone once the netns is; if the netns is still there, remove it there."""
    import os
    from sandbox.kernel import network
    ns = fields.get("netns")
    if not ns:
        return
    path = os.path.join(fields.get("netns_dir", network.CONFIG.netns_dir), ns)
    if not os.path.exists(path):
        return
    hs = network.HostSide.get()

    def run():
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            with hs.inside(fd):
                remove(fields.get("ifname", "eth0"))
        finally:
            os.close(fd)
    hs.call(run)


def probe():
    """Raise unless tc over rtnetlink works here (a dump of the loopback's qdiscs)."""
    with contextlib.closing(_ipr()) as ipr:
        ipr.get_qdiscs()
