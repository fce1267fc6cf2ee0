"""A sandbox's network: its namespace, veth pair, addresses, routes; the `network` step.

Modes (policy `[network].mode`):
  * none:     nothing here; the engine gives the sandbox an empty netns, lo down: one
              made ahead (kernel/namespaces.py, NetnsPool; owned by the host user namespace,
              like the namespaces made here), else clone3's CLONE_NEWNET.
  * loopback: a netns made here with lo up; the engine joins it (`plan.netns_fd`).
  * egress:   a netns made here by the daemon (owned by the host user namespace, so
              nothing inside can administer it), a veth pair (host end `sbx<8 hex>h` in
              the daemon's netns, `eth0` inside), a /30 from the address pool, a default
              route via the host end, the nft table (netfilter.py), the resolver (dns.py)
              on the host end's address, and the rate limit (tc.py).

Every host-side object is made by one worker thread per "host netns" (`HostSide`) that
has setns()'d into the daemon's network namespace: by default the one the process is
in; tests name a namespace they made (`configure(host_netns=...)`), so nothing is ever
added to the real host's. Sockets keep the namespace they were opened in, so the
resolver and the netlink sockets that thread opens all live in the host netns.
The worker also runs the asyncio loop the resolvers and the NFLOG reader use: it runs
whether or not the sandbox owner's loop is running (`sandboxctl run` has none between
commands), and a netlink pin never stalls the daemon's request loop.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import ctypes
import errno as _errno
import fcntl
import hashlib
import ipaddress
import os
import re
import threading
from dataclasses import dataclass, field, replace
from typing import Any, Callable

from sandbox.errors import NetworkError, TeardownError, UnsupportedError

# include/uapi/linux/sched.h, include/uapi/linux/mount.h
CLONE_NEWNET = 0x40000000
MS_BIND = 0x1000
MNT_DETACH = 0x2

_libc = ctypes.CDLL(None, use_errno=True)


def _check(ret: int, syscall: str, what: str):
    if ret != 0:
        e = ctypes.get_errno()
        raise NetworkError(what, errno=e, syscall=syscall)


def _setns(fd: int):
    # setns(2) with CLONE_NEWNET moves only the calling thread; the process stays put.
    _check(_libc.setns(fd, CLONE_NEWNET), "setns", "cannot switch network namespace")


@dataclass(frozen=True)
class NetConfig:
    host_netns: str | None = None     # path of the daemon's netns (None: the process's own)
    pool: str = "10.213.0.0/16"       # split into /30s: .1 host end + resolver, .2 sandbox
    prefix: str = "sbx"               # netns "<prefix>-<id>", veth "<prefix><8 hex>h"
    netns_dir: str = "/run/netns"     # where named namespaces are bind-mounted (like ip-netns)
    lock_dir: str = "/run"            # the pool lock (one per host netns)
    nflog_group: int = 0x5b0
    dns_upstream: tuple = ()          # overrides the policy's and the host's resolvers

    def check(self):
        net = ipaddress.IPv4Network(self.pool)
        if net.prefixlen > 29:
            raise ValueError(f"pool: {self.pool} is too small (at least a /29)")
        if not re.fullmatch(r"[a-z]{1,6}", self.prefix):
            raise ValueError("prefix: 1 to 6 lowercase letters (interface names are short)")


CONFIG = NetConfig()


def configure(**changes) -> NetConfig:
    """Set the process-wide network configuration (the daemon at start, tests)."""
    global CONFIG
    new = replace(CONFIG, **changes)
    new.check()
    CONFIG = new
    return new


def netns_name(sandbox_id: str, cfg: NetConfig | None = None) -> str:
    return f"{(cfg or CONFIG).prefix}-{sandbox_id}"


def veth_name(sandbox_id: str, cfg: NetConfig | None = None) -> str:
    # IFNAMSIZ is 16 with the NUL: a hash keeps any id short and unique enough.
    return f"{(cfg or CONFIG).prefix}{hashlib.sha256(sandbox_id.encode()).hexdigest()[:8]}h"


# ---- the host side: one worker thread per host netns ---------------------------------

class HostSide:
    """A thread in the daemon's network namespace running an asyncio loop."""

    _all: dict[str | None, "HostSide"] = {}
    _all_lock = threading.Lock()

    @classmethod
    def get(cls, cfg: NetConfig | None = None) -> "HostSide":
        cfg = cfg or CONFIG
        path = cfg.host_netns or f"/proc/{os.getpid()}/ns/net"
        try:
            ino = os.stat(path).st_ino
        except OSError as e:
            raise NetworkError(f"the host network namespace {path} is not there",
                               errno=e.errno, syscall="stat") from e
        with cls._all_lock:
            hs = cls._all.get(cfg.host_netns)
            if hs is not None and (hs.host_ino != ino or not hs.thread.is_alive()):
                hs.close()  # a namespace re-made under the same name is another one
                hs = None
            if hs is None:
                hs = cls._all[cfg.host_netns] = cls(cfg)
            return hs

    def close(self):
        """Stop the worker (its namespace is gone or was replaced)."""
        if self.thread.is_alive():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(timeout=5)
        if self._nflog is not None:
            self._nflog.close()
        for r in self._readers or ():
            r.close()
        if self.host_fd >= 0:
            os.close(self.host_fd)
            self.host_fd = -1

    def __init__(self, cfg: NetConfig):
        self.cfg = cfg
        self.loop = asyncio.new_event_loop()
        self.host_fd = -1
        self.host_ino = 0
        self._ready = concurrent.futures.Future()
        self.drop_sinks: dict[str, Callable] = {}
        self._nflog = None
        self._readers = None
        self.thread = threading.Thread(target=self._main, name="sandboxd-net", daemon=True)
        self.thread.start()
        self._ready.result()

    def _main(self):
        try:
            path = self.cfg.host_netns or f"/proc/{os.getpid()}/ns/net"
            self.host_fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            self.host_ino = os.fstat(self.host_fd).st_ino
            _setns(self.host_fd)
        except BaseException as e:  # noqa: BLE001 - handed to the creator
            self._ready.set_exception(e if isinstance(e, NetworkError) else NetworkError(
                f"cannot enter the host network namespace {self.cfg.host_netns}: {e}"))
            return
        asyncio.set_event_loop(self.loop)
        self._ready.set_result(None)
        self.loop.run_forever()

    def call(self, fn: Callable, *args, **kw) -> Any:
        """Run fn in the host netns thread and return its result (raises its exception)."""
        if threading.current_thread() is self.thread:
            return fn(*args, **kw)
        fut: concurrent.futures.Future = concurrent.futures.Future()

        def run():
            try:
                fut.set_result(fn(*args, **kw))
            except BaseException as e:  # noqa: BLE001 - re-raised in the caller
                fut.set_exception(e)
        self.loop.call_soon_threadsafe(run)
        return fut.result()

    @contextlib.contextmanager
    def inside(self, fd: int):
        """(worker thread only) temporarily enter another netns, then come back home."""
        assert threading.current_thread() is self.thread
        _setns(fd)
        try:
            yield
        finally:
            _setns(self.host_fd)

    def readers(self):
        """(worker) an IPRoute and a Firewall kept open for reading counters."""
        if self._readers is None:
            from sandbox.kernel.netfilter import Firewall
            self._readers = (_ipr(), Firewall())
        return self._readers

    def ensure_nflog(self):
        """(worker) bind the daemon's NFLOG group once; drops are routed by sandbox id."""
        if self._nflog is not None:
            return
        from sandbox.kernel.netfilter import NflogReader
        try:
            self._nflog = NflogReader(self.cfg.nflog_group)
        except OSError as e:
            raise UnsupportedError(f"cannot bind NFLOG group {self.cfg.nflog_group}: drops could "
                                   "not be audited (another process, e.g. a second sandboxd in "
                                   "this netns, holds the group, or nfnetlink_log is missing)",
                                   errno=e.errno, syscall="nfnetlink_log bind") from e
        self.loop.add_reader(self._nflog.fileno(), self._on_nflog)

    def _on_nflog(self):
        for drop in self._nflog.read():
            sink = self.drop_sinks.get(drop.sandbox_id)
            if sink is not None:
                sink(drop)


# ---- namespaces ----------------------------------------------------------------------

def _netns_path(name: str, cfg: NetConfig) -> str:
    return os.path.join(cfg.netns_dir, name)


def _create_netns(hs: HostSide, name: str) -> int:
    """(worker) a new named netns like `ip netns add`; returns an O_RDONLY fd to it."""
    path = _netns_path(name, hs.cfg)
    os.makedirs(hs.cfg.netns_dir, exist_ok=True)
    fd = os.open(path, os.O_RDONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o444)
    os.close(fd)
    try:
        # unshare(2) CLONE_NEWNET on this thread only: the new netns belongs to the
        # daemon's (host) user namespace, so root inside a sandbox cannot administer it.
        _check(_libc.unshare(CLONE_NEWNET), "unshare", "cannot create a network namespace")
        try:
            src = f"/proc/self/task/{threading.get_native_id()}/ns/net".encode()
            _check(_libc.mount(src, path.encode(), None, MS_BIND, None), "mount",
                   f"cannot bind-mount the network namespace at {path}")
        finally:
            _setns(hs.host_fd)
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except BaseException:
        _remove_netns_path(path)
        raise


def _remove_netns_path(path: str):
    if _libc.umount2(path.encode(), MNT_DETACH) != 0 and ctypes.get_errno() not in (
            _errno.EINVAL, _errno.ENOENT):
        raise NetworkError(f"cannot unmount {path}", errno=ctypes.get_errno(), syscall="umount2")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def netns_exists(name: str, cfg: NetConfig | None = None) -> bool:
    return os.path.exists(_netns_path(name, cfg or CONFIG))


def _ipr():
    from pyroute2 import IPRoute
    return IPRoute()


def _link_index(ipr, name: str) -> int | None:
    found = ipr.link_lookup(ifname=name)
    return found[0] if found else None


def _up_loopback():
    with contextlib.closing(_ipr()) as ipr:
        ipr.link("set", index=_link_index(ipr, "lo"), state="up")


# ---- the address pool ----------------------------------------------------------------

@dataclass(frozen=True)
class Slot:
    host_ip: str
    sandbox_ip: str
    prefixlen: int = 30


@contextlib.contextmanager
def _pool_lock(hs: HostSide):
    """An flock per host netns (keyed by its inode): safe across daemon processes."""
    ino = os.fstat(hs.host_fd).st_ino
    path = os.path.join(hs.cfg.lock_dir, f"sandboxd-netpool-{ino}.lock")
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _free_slot(ipr, pool: ipaddress.IPv4Network) -> Slot:
    """The first /30 of the pool no address in this netns falls into (kernel state is the
    allocation table: a crashed daemon's slots free themselves when their veth goes)."""
    used = set()
    for msg in ipr.get_addr(family=2):
        addr = ipaddress.IPv4Address(msg.get_attr("IFA_ADDRESS"))
        if addr in pool:
            used.add(int(addr) >> 2)
    for sub in pool.subnets(new_prefix=30):
        if int(sub.network_address) >> 2 not in used:
            hosts = list(sub.hosts())
            return Slot(str(hosts[0]), str(hosts[1]))
    raise NetworkError(f"the address pool {pool} is exhausted")


# ---- the handle a set-up network returns ----------------------------------------------

@dataclass
class NetHandle:
    sandbox_id: str
    mode: str
    cfg: NetConfig
    netns: str | None = None
    netns_fd: int = -1
    veth: str | None = None
    slot: Slot | None = None
    table: str | None = None
    resolver: Any = None
    rate: int = 0
    final_usage: dict | None = None
    drops: list = field(default_factory=list)

    @property
    def resolver_ip(self) -> str | None:
        return self.slot.host_ip if self.slot else None

    @property
    def sandbox_ip(self) -> str | None:
        return self.slot.sandbox_ip if self.slot else None

    def usage(self) -> dict:
        if self.final_usage is not None:
            return dict(self.final_usage)
        if self.mode != "egress" or self.veth is None:
            return {"net_tx_bytes": 0, "net_rx_bytes": 0, "net_drops": 0}
        return HostSide.get(self.cfg).call(_read_usage, self)


def _read_usage(h: NetHandle) -> dict:
    """(worker) byte and drop counters; on the worker's long-lived sockets, since the engine
    asks after every command."""
    hs = HostSide.get(h.cfg)
    ipr, fw = hs.readers()
    idx = _link_index(ipr, h.veth)
    stats = ipr.get_links(idx)[0].get_attr("IFLA_STATS64") if idx else None
    drops = fw.drops(h.table)
    # host end rx = what the sandbox sent; host end tx = what it received
    return {"net_tx_bytes": stats["rx_bytes"] if stats else 0,
            "net_rx_bytes": stats["tx_bytes"] if stats else 0, "net_drops": drops}


# ---- set up / tear down ----------------------------------------------------------------

def _intent(ctx, kind: str, **fields):
    intent = getattr(ctx, "intent", None)
    if intent is not None:
        intent.add(kind, **fields)


def setup(ctx, cfg: NetConfig | None = None) -> NetHandle:
    """Make the sandbox's network for its policy. Fails closed; undoes itself on error."""
    cfg = cfg or CONFIG
    pol = ctx.policy.network
    h = NetHandle(ctx.id, pol.mode, cfg)
    if pol.mode == "none":
        return h
    hs = HostSide.get(cfg)
    try:
        hs.call(_setup_in_host, hs, h, ctx)
    except BaseException:
        failures = teardown(h, verify=False)
        if failures:
            ctx.audit.record("network_teardown", sandbox=ctx.id, outcome="error",
                             details={"left": failures})
        raise
    ctx.plan.netns_fd = h.netns_fd
    if h.resolver_ip:
        ctx.nameservers = (h.resolver_ip,)   # the engine writes them to /etc/resolv.conf
    extra = getattr(ctx, "extra", None)
    if extra is not None:
        extra["network"] = h                 # usage(): extra["network"].usage()
    return h


def _setup_in_host(hs: HostSide, h: NetHandle, ctx):
    pol = ctx.policy.network
    if pol.mode == "egress":  # every check that can refuse comes before the first object
        entries = parse_entries(pol.allow)
        v6 = [e.text for e in entries if e.is_ip and ":" in e.host]
        if v6:
            raise UnsupportedError(f"IPv6 egress is not supported yet (sandboxes get IPv4 "
                                   f"only): {', '.join(v6)}")
        _check_forwarding()
        hs.ensure_nflog()
    h.netns = netns_name(h.sandbox_id, hs.cfg)
    _intent(ctx, "netns", name=h.netns, netns_dir=hs.cfg.netns_dir)
    h.netns_fd = _create_netns(hs, h.netns)
    if pol.mode == "loopback":
        with hs.inside(h.netns_fd):
            _up_loopback()
        return
    from sandbox.kernel import dns, netfilter, tc
    h.veth = veth_name(h.sandbox_id, hs.cfg)
    _intent(ctx, "veth", name=h.veth)
    with _pool_lock(hs), contextlib.closing(_ipr()) as ipr:
        h.slot = _free_slot(ipr, ipaddress.IPv4Network(hs.cfg.pool))
        _make_veth(ipr, h)
    with hs.inside(h.netns_fd):
        _configure_inside(h.slot)
        if pol.rate:
            _intent(ctx, "qdisc", ifname="eth0", netns=h.netns, netns_dir=hs.cfg.netns_dir)
            tc.limit_egress("eth0", pol.rate)
            h.rate = pol.rate
    h.table = netfilter.table_name(h.sandbox_id)
    _intent(ctx, "nft", family="inet", table=h.table, chain="forward,input,postrouting",
            sets="allow4")
    lay = netfilter.Layout(h.sandbox_id, h.veth, h.slot.sandbox_ip, h.slot.host_ip,
                           hs.cfg.nflog_group)
    literals = [(e.host, p) for e in entries if e.is_ip for p in e.ports]
    upstream = dns.upstreams(hs.cfg.dns_upstream or pol.dns_upstream)
    fw = netfilter.Firewall()
    try:
        fw.create(lay, literals)
    finally:
        fw.close()
    hs.drop_sinks[h.sandbox_id] = _drop_auditor(ctx.audit, h)
    h.resolver = dns.Resolver(h, [e for e in entries if not e.is_ip], pol, ctx.audit,
                              upstream=upstream, permanent=set(literals))
    h.resolver.start()


def _check_forwarding():
    # Egress needs IPv4 forwarding in the daemon's netns. We never change a host sysctl:
    # the operator enables it (sysctl net.ipv4.ip_forward=1); say so instead of a silent
    # black hole. /proc/sys/net shows the namespace of the thread that reads it.
    with open("/proc/sys/net/ipv4/ip_forward") as f:
        if f.read().strip() != "1":
            raise UnsupportedError("egress mode needs IPv4 forwarding in the daemon's network "
                                   "namespace (sysctl net.ipv4.ip_forward=1)")


def _make_veth(ipr, h: NetHandle):
    try:
        ipr.link("add", ifname=h.veth, kind="veth",
                 peer={"ifname": "eth0", "net_ns_fd": h.netns_fd})
        idx = _link_index(ipr, h.veth)
        _no_ipv6(h.veth)
        ipr.addr("add", index=idx, address=h.slot.host_ip, prefixlen=h.slot.prefixlen)
        ipr.link("set", index=idx, state="up")
    except Exception as e:
        raise NetworkError(f"cannot create the veth pair {h.veth}: {e}") from e


def _no_ipv6(ifname: str):
    # Sandboxes get IPv4 only: without this, eth0's link-local address and router
    # solicitations would fill the drop log. Per-interface sysctl of the namespace this
    # thread is in (our own interface; /proc/sys/net follows the reading thread's netns).
    try:
        with open(f"/proc/sys/net/ipv6/conf/{ifname}/disable_ipv6", "w") as f:
            f.write("1")
    except FileNotFoundError:
        pass  # IPv6 is off in this kernel altogether


def _configure_inside(slot: Slot):
    _no_ipv6("eth0")
    with contextlib.closing(_ipr()) as ipr:
        lo, eth0 = _link_index(ipr, "lo"), _link_index(ipr, "eth0")
        ipr.link("set", index=lo, state="up")
        ipr.addr("add", index=eth0, address=slot.sandbox_ip, prefixlen=slot.prefixlen)
        ipr.link("set", index=eth0, state="up")
        ipr.route("add", dst="0.0.0.0/0", gateway=slot.host_ip, oif=eth0)


def _drop_auditor(audit, h: NetHandle):
    """Each NFLOG drop becomes a `net_drop` audit record, at most 20 per second per sandbox
    (a flood is summarised as a count, so the audit log stays bounded)."""
    import time
    state = {"second": 0, "n": 0, "suppressed": 0}

    def on_drop(d):
        sec = int(time.monotonic())
        if sec != state["second"]:
            state["second"], state["n"] = sec, 0
        state["n"] += 1
        if state["n"] > 20:
            state["suppressed"] += 1
            return
        details = {"proto": d.proto, "dst": d.dst, "dport": d.dport, "src": d.src}
        if state["suppressed"]:
            details["suppressed_before"] = state["suppressed"]
            state["suppressed"] = 0
        h.drops.append(details)
        del h.drops[:-100]
        audit.record("net_drop", sandbox=h.sandbox_id, outcome="denied",
                     resource=f"{d.proto}:{d.dst}:{d.dport}", details=details)
    return on_drop


def teardown(h: NetHandle, verify: bool = True) -> list[str]:
    """Remove everything the setup made; return what could not be removed (empty: clean).
    With verify, raise TeardownError naming what is left."""
    if h.mode == "none" or h.netns is None:
        return []
    hs = HostSide.get(h.cfg)
    if h.veth and h.final_usage is None:
        try:
            h.final_usage = hs.call(_read_usage, h)
        except Exception:  # noqa: BLE001 - figures are best effort; removal is not
            h.final_usage = {"net_tx_bytes": 0, "net_rx_bytes": 0, "net_drops": 0}
    failures = hs.call(_teardown_in_host, hs, h)
    if verify and failures:
        raise TeardownError("network teardown left things behind", leftovers=failures)
    return failures


def _teardown_in_host(hs: HostSide, h: NetHandle) -> list[str]:
    failures = []
    hs.drop_sinks.pop(h.sandbox_id, None)
    if h.resolver is not None:
        h.resolver.stop()
    for what, fn, arg in (("nft table", cleanup_table_now, h.table),
                          ("veth", _delete_veth, h.veth),
                          ("netns", _delete_netns, h)):
        if arg is None:
            continue
        try:
            fn(arg)
        except Exception as e:  # noqa: BLE001 - every object gets its chance
            failures.append(f"{what}: {e}")
    return failures


def cleanup_table_now(table: str):
    from sandbox.kernel.netfilter import Firewall
    fw = Firewall()
    try:
        fw.delete_table(table)
    finally:
        fw.close()


def _delete_veth(name: str):
    with contextlib.closing(_ipr()) as ipr:
        idx = _link_index(ipr, name)
        if idx is not None:
            try:
                ipr.link("del", index=idx)
            except Exception as e:
                if getattr(e, "code", None) != _errno.ENODEV:
                    raise
        if _link_index(ipr, name) is not None:
            raise TeardownError("veth survived deletion", leftovers=[name])


def _delete_netns(h: NetHandle):
    if h.netns_fd >= 0:
        os.close(h.netns_fd)
        h.netns_fd = -1
    path = _netns_path(h.netns, h.cfg)
    _remove_netns_path(path)
    if os.path.exists(path):
        raise TeardownError("network namespace survived deletion", leftovers=[path])


# ---- the engine's step -----------------------------------------------------------------

def make_step(ctx):
    """The `network` step for Sandbox.create, or None for mode = none (the engine's own
    empty netns with lo down is then the whole story)."""
    if ctx.policy.network.mode == "none":
        return None
    from sandbox.runtime.lifecycle import Step
    return Step("network", do=lambda: setup(ctx), undo=lambda h: teardown(h),
                describe=f"network namespace ({ctx.policy.network.mode})")


# ---- crash recovery (runtime/recovery.py maps intent kinds here) -----------------------

def cleanup_netns(fields: dict):
    """Remove a named netns left by a crash (idempotent; verifies it is gone)."""
    cfg = replace(CONFIG, netns_dir=fields.get("netns_dir", CONFIG.netns_dir))
    h = NetHandle(sandbox_id="", mode="egress", cfg=cfg, netns=fields["name"])
    HostSide.get(cfg).call(_delete_netns, h)


def cleanup_veth(fields: dict):
    """Remove a host-side veth left by a crash (idempotent; verifies it is gone)."""
    HostSide.get().call(_delete_veth, fields["name"])


_VETH_RE_TMPL = r"{prefix}[0-9a-f]{{8}}h"


def cleanup_leftovers(active_ids=(), cfg: NetConfig | None = None) -> list[str]:
    """Daemon start: remove every netns, veth and nft table of ours (by name prefix) that
    belongs to no active sandbox. Returns the names removed."""
    cfg = cfg or CONFIG
    from sandbox.kernel.netfilter import Firewall, table_name
    keep_ns = {netns_name(i, cfg) for i in active_ids}
    keep_veth = {veth_name(i, cfg) for i in active_ids}
    keep_tables = {table_name(i) for i in active_ids}
    hs = HostSide.get(cfg)

    def sweep():
        removed = []
        fw = Firewall()
        try:
            for t in fw.tables():
                if t not in keep_tables:
                    fw.delete_table(t)
                    removed.append(f"nft inet {t}")
        finally:
            fw.close()
        veth_re = re.compile(_VETH_RE_TMPL.format(prefix=re.escape(cfg.prefix)))
        with contextlib.closing(_ipr()) as ipr:
            names = [l.get_attr("IFLA_IFNAME") for l in ipr.get_links()]
        for n in names:
            if veth_re.fullmatch(n) and n not in keep_veth:
                _delete_veth(n)
                removed.append(f"veth {n}")
        if os.path.isdir(cfg.netns_dir):
            for n in os.listdir(cfg.netns_dir):
                if n.startswith(cfg.prefix + "-") and n not in keep_ns:
                    _remove_netns_path(os.path.join(cfg.netns_dir, n))
                    removed.append(f"netns {n}")
        return removed
    return hs.call(sweep)


# ---- doctor ----------------------------------------------------------------------------

def probe(cfg: NetConfig | None = None) -> list[tuple[str, bool, str]]:
    """For `sandboxctl doctor`: (feature, ok, detail) rows for what the network modes need.
    Read-only in the daemon's netns (a throwaway named netns is made and removed)."""
    cfg = cfg or CONFIG
    hs = HostSide.get(cfg)
    rows = []

    def check(name, fn, detail):
        try:
            hs.call(fn)
            rows.append((name, True, detail))
        except Exception as e:  # noqa: BLE001 - reported, not raised
            rows.append((name, False, str(e)))

    def nft():
        from sandbox.kernel.netfilter import Firewall
        fw = Firewall()
        try:
            fw.tables()
        finally:
            fw.close()

    def netns():
        ns = f"{cfg.prefix}-probe-{os.getpid()}"
        os.close(_create_netns(hs, ns))
        _remove_netns_path(_netns_path(ns, cfg))

    def tcprobe():
        from sandbox.kernel import tc
        tc.probe()

    check("nftables (netlink)", nft, "per-sandbox tables, sets with timeouts")
    check("network namespaces", netns, f"named under {cfg.netns_dir}")
    check("tc (rtnetlink)", tcprobe, "tbf rate limits")
    check("ip_forward", _check_forwarding, "needed by network.mode = egress only")
    return rows


# ---- allowlist entries ---------------------------------------------------------------
# The policy validates entries with the same parser (sandbox/policy/schema.py).
from sandbox.policy.schema import AllowEntry, parse_allow_entry  # noqa: E402


def parse_entries(entries) -> list[AllowEntry]:
    return [parse_allow_entry(e) for e in entries]
