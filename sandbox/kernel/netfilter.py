"""The one module that speaks nftables: a per-sandbox table in the daemon's network namespace.

Backend: pyroute2 0.7.12's synchronous `NFTables` (netlink, no `nft` binary). 0.9.x
breaks on sets (see shared/DESIGN.md "Host reality"), so everything pyroute2-specific
stays behind `Firewall`; a different backend replaces this module and nothing else.

The table `inet sbx_<id>` (one per sandbox) holds:
  * base chains `forward`, `input` (filter) and `postrouting` (nat) with policy ACCEPT.
    Every rule first matches the sandbox's host-side veth by name (iifname/oifname), so
    the host's own traffic passes these chains untouched (a drop policy on a hook the
    host uses would cut the machine off: never do that).
  * set `allow4` of `ipv4_addr . inet_service` with the `timeout` flag: DNS answers are
    pinned here for their (clamped) TTL; IP literals of the allowlist without timeout.
  * rules, in order (nft syntax, for the reader):
      forward: iifname V ip saddr != S log+counter drop          (spoofed source)
               iifname V ct state established,related accept
               oifname V ct state established,related accept
               iifname V ip daddr . tcp dport @allow4 accept
               iifname V log group G prefix "sbx:<id>" counter drop
               oifname V log ... counter drop                    (nothing new *into* it:
                                                                  other sandboxes, host)
      input:   iifname V ip saddr != S drop
               iifname V ct state established,related accept
               iifname V ip daddr R udp dport 53 accept, same for tcp (the resolver)
               iifname V log ... counter drop                    (host services)
      postrouting (nat): ip saddr S oifname != V masquerade
    IPv6 is dropped by the same catch-all rules (the sandbox gets IPv4 only).
Dropped packets go to NFLOG group G (read by `NflogReader`, parsed here in Python) and
are counted; `drops()` sums the counters.
"""
from __future__ import annotations

import ipaddress
import os
import socket
import struct
import threading
import time
from dataclasses import dataclass

from sandbox.errors import NetworkError, TeardownError

TABLE_PREFIX = "sbx_"
NFPROTO_INET = 1  # include/uapi/linux/netfilter.h
NFPROTO_IPV4 = 2
DEFAULT_NFLOG_GROUP = 0x5b0  # the daemon's NFLOG group (any u16 the host does not use)

# include/uapi/linux/netfilter/nf_tables.h
_NFT_REG_VERDICT, _NFT_REG_1 = 0, 1
_NFT_REG32_00, _NFT_REG32_01 = 8, 9
_NFT_CMP_EQ, _NFT_CMP_NEQ = 0, 1
_NF_DROP, _NF_ACCEPT = 0, 1
_BASE_NETWORK, _BASE_TRANSPORT = 1, 2
_META_NFPROTO, _META_L4PROTO, _META_IIFNAME, _META_OIFNAME = 15, 16, 6, 7
_CT_STATE = 0
# NF_CT_STATE_BIT(IP_CT_ESTABLISHED) | NF_CT_STATE_BIT(IP_CT_RELATED): 1<<1 | 1<<2
_CT_ESTABLISHED_RELATED = 0x2 | 0x4
_IFNAMSIZ = 16
# nftables/include/datatype.h: a concatenation's key type is the member types, 6 bits each
_TYPE_IPADDR, _TYPE_INET_SERVICE = 7, 13
_KEY_V4_SERVICE = (_TYPE_IPADDR << 6) | _TYPE_INET_SERVICE
_HOOKS = {"input": 1, "forward": 2, "postrouting": 4}


def table_name(sandbox_id: str) -> str:
    return TABLE_PREFIX + sandbox_id.replace("-", "_")[:40]


# ---- expression builders (each returns one netlink nft_expr) -------------------------

def _expr(name: str, **data) -> dict:
    return {"attrs": [("NFTA_EXPR_NAME", name),
                      ("NFTA_EXPR_DATA", {"attrs": [(f"NFTA_{name.upper()}_{k.upper()}", v)
                                                    for k, v in data.items()]})]}


def _value(raw: bytes) -> dict:
    return {"attrs": [("NFTA_DATA_VALUE", raw)]}


def _meta(key: int, dreg: int = _NFT_REG_1) -> dict:
    return _expr("meta", dreg=dreg, key=key)


def _cmp(raw: bytes, op: int = _NFT_CMP_EQ, sreg: int = _NFT_REG_1) -> dict:
    return _expr("cmp", sreg=sreg, op=op, data=_value(raw))


def _payload(base: int, offset: int, length: int, dreg: int = _NFT_REG_1) -> dict:
    return _expr("payload", dreg=dreg, base=base, offset=offset, len=length)


def _verdict(code: int) -> dict:
    return _expr("immediate", dreg=_NFT_REG_VERDICT,
                 data={"attrs": [("NFTA_DATA_VERDICT", {"attrs": [("NFTA_VERDICT_CODE", code)]})]})


def _ifname(key: int, name: str, op: int = _NFT_CMP_EQ) -> list:
    # meta iifname loads IFNAMSIZ bytes; compare the NUL-padded name (what nft does).
    return [_meta(key), _cmp(name.encode().ljust(_IFNAMSIZ, b"\0"), op)]


def _is_ipv4() -> list:
    return [_meta(_META_NFPROTO), _cmp(bytes([NFPROTO_IPV4]))]


def _l4proto(proto: int) -> list:
    return [_meta(_META_L4PROTO), _cmp(bytes([proto]))]


def _ct_established() -> list:
    # ct state is a host-endian u32 bitmask; (state & mask) != 0
    return [_expr("ct", dreg=_NFT_REG_1, key=_CT_STATE),
            _expr("bitwise", sreg=_NFT_REG_1, dreg=_NFT_REG_1, len=4,
                  mask=_value(struct.pack("=I", _CT_ESTABLISHED_RELATED)),
                  xor=_value(b"\0\0\0\0")),
            _cmp(b"\0\0\0\0", _NFT_CMP_NEQ)]


def _ip_addr(offset: int, addr: str, op: int = _NFT_CMP_EQ) -> list:
    return _is_ipv4() + [_payload(_BASE_NETWORK, offset, 4), _cmp(socket.inet_aton(addr), op)]


def _saddr(addr, op=_NFT_CMP_EQ):
    return _ip_addr(12, addr, op)  # RFC 791: source address at offset 12


def _daddr(addr, op=_NFT_CMP_EQ):
    return _ip_addr(16, addr, op)


def _dport(port: int) -> list:
    return [_payload(_BASE_TRANSPORT, 2, 2), _cmp(struct.pack("!H", port))]


def _lookup_daddr_dport(set_name: str) -> list:
    # ip daddr . tcp dport @set: a concatenation lives in consecutive 32-bit registers.
    return (_is_ipv4() + _l4proto(socket.IPPROTO_TCP)
            + [_payload(_BASE_NETWORK, 16, 4, dreg=_NFT_REG32_00),
               _payload(_BASE_TRANSPORT, 2, 2, dreg=_NFT_REG32_01),
               _expr("lookup", set=set_name, sreg=_NFT_REG32_00)])


def _log_drop(group: int, prefix: str) -> list:
    # NFTA_LOG_GROUP is a be16 in the kernel (net/netfilter/nft_log.c) while pyroute2 0.7
    # encodes it as be32: shift it into the first two bytes the kernel reads.
    return [_expr("log", group=group << 16, prefix=prefix), _expr("counter", bytes=0, packets=0),
            _verdict(_NF_DROP)]


def _elem_key(addr: str, port: int) -> bytes:
    # ipv4_addr (4 bytes) . inet_service (2 bytes big-endian, padded to a 4-byte register)
    return socket.inet_aton(addr) + struct.pack("!H", port) + b"\0\0"


@dataclass(frozen=True)
class Layout:
    """What the table of one sandbox is built from."""
    sandbox_id: str
    veth: str            # host-side interface name
    sandbox_ip: str      # the only source address the sandbox may use
    resolver_ip: str     # the host end: the daemon's resolver listens here
    nflog_group: int = DEFAULT_NFLOG_GROUP

    @property
    def table(self) -> str:
        return table_name(self.sandbox_id)

    @property
    def log_prefix(self) -> str:
        return f"sbx:{self.sandbox_id}"[:63]


class Firewall:
    """nftables over one netlink socket opened in the namespace the caller is in.

    All methods are thread-safe (the resolver pins from its loop while the engine may tear
    down). Errors become NetworkError naming the object; nothing is silently skipped.
    """

    def __init__(self):
        from pyroute2.nftables.main import NFTables
        try:
            self._nft = NFTables(nfgen_family=NFPROTO_INET)
        except OSError as e:
            raise NetworkError("cannot open an nftables netlink socket", errno=e.errno,
                               syscall="socket(NETLINK_NETFILTER)") from e
        self._lock = threading.Lock()

    def close(self):
        self._nft.close()

    def _call(self, what: str, fn, *args, **kw):
        with self._lock:
            try:
                return fn(*args, **kw)
            except Exception as e:  # NetlinkError carries the errno as .code
                code = getattr(e, "code", None) or getattr(e, "errno", None)
                raise NetworkError(f"nftables: cannot {what}", errno=code,
                                   syscall="nfnetlink") from e

    # -- building ----------------------------------------------------------------------
    def create(self, lay: Layout, literals: list[tuple[str, int]]):
        """Build the whole table. On any error the partial table is deleted, then raised."""
        try:
            self._build(lay, literals)
        except BaseException:
            self.delete_table(lay.table, missing_ok=True)
            raise

    def _build(self, lay: Layout, literals):
        # One nftables transaction (NFNL_MSG_BATCH_BEGIN ... END): the kernel commits the
        # table, chains, set and rules atomically, so a half-built table never filters
        # anything, and one commit costs one RCU grace period instead of eighteen.
        t = lay.table
        msgs = [_msg("table", "create", name=t)]
        for name, hook, kind, prio in (("forward", "forward", "filter", 0),
                                       ("input", "input", "filter", 0),
                                       ("postrouting", "postrouting", "nat", 100)):
            msgs.append(_msg("chain", "add", table=t, name=name, type=kind, policy=_NF_ACCEPT,
                             hook={"attrs": [["NFTA_HOOK_HOOKNUM", _HOOKS[hook]],
                                             ["NFTA_HOOK_PRIORITY", prio]]}))
        msgs.append(_msg("set", "add", table=t, name="allow4", flags={"NFT_SET_TIMEOUT"},
                         key_type=_KEY_V4_SERVICE, key_len=8, id=1))
        for chain, chain_rules in _rules(lay).items():
            for r in chain_rules:
                msgs.append(_msg("rule", "add", table=t, chain=chain, expressions=r))
        self._call(f"create table inet {t} (one transaction)", self._commit, msgs)
        if literals:
            self.pin(t, literals, timeout=None)

    def _commit(self, msgs):
        from pyroute2.netlink.nfnetlink import NFNL_SUBSYS_NFTABLES, nfgen_msg
        begin, end = nfgen_msg(), nfgen_msg()
        for m, kind in ((begin, 0x10), (end, 0x11)):  # NFNL_MSG_BATCH_BEGIN / _END
            m["res_id"] = NFNL_SUBSYS_NFTABLES
            m["header"]["type"] = kind
            m["header"]["flags"] = 1  # NLM_F_REQUEST
        for m in msgs:
            m["nfgen_family"] = NFPROTO_INET
        self._nft.nlm_request_batch([begin, *msgs, end])

    # -- the allow set -----------------------------------------------------------------
    def pin(self, table: str, pairs: list[tuple[str, int]], timeout: float | None):
        """Add (address, port) pairs to the allow set; timeout in seconds (None: forever)."""
        from pyroute2.nftables.main import NFTSet, NFTSetElem
        elems = []
        for addr, port in pairs:
            ipaddress.IPv4Address(addr)  # refuses anything but a dotted IPv4 address
            elems.append(NFTSetElem(value=_elem_key(addr, port),
                                    timeout=None if timeout is None else int(timeout * 1000)))
        if elems:
            self._call(f"pin {len(elems)} address(es) in {table}", self._nft.set_elems, "add",
                       set=NFTSet(table=table, name="allow4", key_type=None), elements=elems)

    def allowed(self, table: str) -> set[tuple[str, int]]:
        """The (address, port) pairs in the allow set now (for tests and `info`)."""
        from pyroute2.nftables.main import NFTSet
        got = self._call(f"list the allow set of {table}", self._nft.set_elems, "get",
                         set=NFTSet(table=table, name="allow4", key_type=None))
        out = set()
        for e in got:
            raw = bytes(e.value) if not isinstance(e.value, str) else bytes.fromhex(
                e.value.replace(":", ""))
            out.add((socket.inet_ntoa(raw[:4]), struct.unpack("!H", raw[4:6])[0]))
        return out

    # -- reading -----------------------------------------------------------------------
    def tables(self, prefix: str = TABLE_PREFIX) -> list[str]:
        found = self._call("list tables", self._nft.get_tables)
        return [m.get_attr("NFTA_TABLE_NAME") for m in found
                if m.get("nfgen_family") == NFPROTO_INET
                and (m.get_attr("NFTA_TABLE_NAME") or "").startswith(prefix)]

    def drops(self, table: str) -> int:
        """Packets dropped by the table's rules (sum of their counters)."""
        from pyroute2.netlink.nfnetlink.nftsocket import nft_rule_msg
        req = nft_rule_msg()
        req["attrs"] = [["NFTA_RULE_TABLE", table]]  # the kernel dumps this table only
        total = 0
        for rule in self._call(f"list the rules of {table}", self._nft.request_get, req, 7):
            if rule.get_attr("NFTA_RULE_TABLE") != table:  # NFT_MSG_GETRULE = 7
                continue
            for expr in rule.get_attr("NFTA_RULE_EXPRESSIONS") or ():
                if expr.get_attr("NFTA_EXPR_NAME") == "counter":
                    total += expr.get_attr("NFTA_EXPR_DATA").get_attr("NFTA_COUNTER_PACKETS") or 0
        return total

    # -- teardown ----------------------------------------------------------------------
    def delete_table(self, table: str, missing_ok: bool = True):
        """Delete the table (its chains, rules and sets go with it) and verify it is gone."""
        try:
            with self._lock:
                self._nft.table("del", name=table)
        except Exception as e:
            if getattr(e, "code", None) != 2 or not missing_ok:  # ENOENT: already gone
                raise NetworkError(f"nftables: cannot delete table inet {table}",
                                   errno=getattr(e, "code", None), syscall="nfnetlink") from e
        if table in self.tables(prefix=table):
            raise TeardownError("nftables table survived deletion", leftovers=[f"inet {table}"])


def _rules(lay: Layout) -> dict[str, list[list]]:
    iif = lambda: _ifname(_META_IIFNAME, lay.veth)  # noqa: E731
    oif = lambda: _ifname(_META_OIFNAME, lay.veth)  # noqa: E731
    logdrop = lambda: _log_drop(lay.nflog_group, lay.log_prefix)  # noqa: E731
    dns = lambda proto: (iif() + _daddr(lay.resolver_ip) + _l4proto(proto)  # noqa: E731
                         + _dport(53) + [_verdict(_NF_ACCEPT)])
    return {
        "forward": [
            iif() + _saddr(lay.sandbox_ip, _NFT_CMP_NEQ) + logdrop(),     # spoofed source
            iif() + _ct_established() + [_verdict(_NF_ACCEPT)],
            oif() + _ct_established() + [_verdict(_NF_ACCEPT)],
            iif() + _lookup_daddr_dport("allow4") + [_verdict(_NF_ACCEPT)],
            iif() + logdrop(),                                            # all else out
            oif() + logdrop(),                                            # nothing new in
        ],
        "input": [
            iif() + _saddr(lay.sandbox_ip, _NFT_CMP_NEQ) + logdrop(),
            iif() + _ct_established() + [_verdict(_NF_ACCEPT)],
            dns(socket.IPPROTO_UDP),
            dns(socket.IPPROTO_TCP),
            iif() + logdrop(),                                            # host services
        ],
        "postrouting": [
            _saddr(lay.sandbox_ip) + _ifname(_META_OIFNAME, lay.veth, _NFT_CMP_NEQ)
            + [_expr("masq")],
        ],
    }


_NEW = {"table": 0, "chain": 3, "rule": 6, "set": 9}  # NFT_MSG_NEW*


def _msg(kind: str, cmd: str, **attrs):
    """One nf_tables netlink message (as pyroute2's NFTables._command builds it)."""
    from pyroute2.netlink import NLM_F_ACK, NLM_F_APPEND, NLM_F_CREATE, NLM_F_EXCL, NLM_F_REQUEST
    from pyroute2.netlink.nfnetlink import NFNL_SUBSYS_NFTABLES
    from pyroute2.netlink.nfnetlink import nftsocket as ns
    klass = {"table": ns.nft_table_msg, "chain": ns.nft_chain_msg, "rule": ns.nft_rule_msg,
             "set": ns.nft_set_msg}[kind]
    flags = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_APPEND
    if cmd == "create":
        flags |= NLM_F_EXCL
    m = klass()
    m["attrs"] = [[klass.name2nla(k), v] for k, v in attrs.items()]
    m["header"]["type"] = (NFNL_SUBSYS_NFTABLES << 8) | _NEW[kind]
    m["header"]["flags"] = flags
    return m


def _set_msg():
    from pyroute2.netlink.nfnetlink.nftsocket import nft_set_msg
    return nft_set_msg


# ---- NFLOG: per-packet detail of every drop -------------------------------------------
# include/uapi/linux/netfilter/nfnetlink_log.h
_NFNL_SUBSYS_ULOG = 4
_NFULNL_MSG_PACKET, _NFULNL_MSG_CONFIG = 0, 1
_NFULA_CFG_CMD, _NFULA_CFG_MODE = 1, 2
_NFULNL_CFG_CMD_BIND, _NFULNL_CFG_CMD_UNBIND = 1, 2
_NFULNL_COPY_PACKET = 2
_NFULA_PAYLOAD, _NFULA_PREFIX = 9, 10
_NLM_F_REQUEST, _NLM_F_ACK = 1, 4
_NLMSG_ERROR = 2
_NETLINK_NETFILTER = 12


@dataclass(frozen=True)
class Drop:
    sandbox_id: str
    proto: str
    src: str
    dst: str
    dport: int | None
    ts: float


def parse_ipv4(payload: bytes) -> tuple[str, str, str, int | None] | None:
    """(proto, src, dst, dport) from an IPv4 packet's first bytes; None if not IPv4."""
    if len(payload) < 20 or payload[0] >> 4 != 4:
        return None
    ihl = (payload[0] & 0xF) * 4
    num = payload[9]
    proto = {6: "tcp", 17: "udp", 1: "icmp"}.get(num, str(num))
    dport = None
    if num in (6, 17) and len(payload) >= ihl + 4:
        dport = struct.unpack("!H", payload[ihl + 2:ihl + 4])[0]
    return proto, socket.inet_ntoa(payload[12:16]), socket.inet_ntoa(payload[16:20]), dport


def _nlattrs(buf: bytes) -> dict[int, bytes]:
    out, i = {}, 0
    while i + 4 <= len(buf):
        length, kind = struct.unpack_from("=HH", buf, i)
        if length < 4:
            break
        out[kind & 0x7FFF] = buf[i + 4:i + length]
        i += (length + 3) & ~3
    return out


def parse_nflog(datagram: bytes) -> list[tuple[str, bytes]]:
    """(prefix, payload) of each NFULNL_MSG_PACKET in a netlink datagram."""
    out, i = [], 0
    while i + 16 <= len(datagram):
        length, kind, _flags, _seq, _pid = struct.unpack_from("=IHHII", datagram, i)
        if length < 16:
            break
        if kind == (_NFNL_SUBSYS_ULOG << 8) | _NFULNL_MSG_PACKET:
            attrs = _nlattrs(datagram[i + 20:i + length])  # 16 nlmsghdr + 4 nfgenmsg
            prefix = attrs.get(_NFULA_PREFIX, b"").split(b"\0")[0].decode(errors="replace")
            out.append((prefix, attrs.get(_NFULA_PAYLOAD, b"")))
        i += (length + 3) & ~3
    return out


class NflogReader:
    """A netlink socket bound to the daemon's NFLOG group in the current namespace.

    `fileno()` is for an event loop's add_reader; `read()` returns the Drops waiting.
    One reader per daemon (per host namespace); packets name their sandbox by prefix.
    """

    def __init__(self, group: int = DEFAULT_NFLOG_GROUP):
        self.group = group
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_NONBLOCK
                                  | socket.SOCK_CLOEXEC, _NETLINK_NETFILTER)
        try:
            self.sock.bind((0, 0))
            self._config(struct.pack("=HHB", 5, _NFULA_CFG_CMD, _NFULNL_CFG_CMD_BIND) + b"\0" * 3)
            # copy the first 64 bytes of each packet: enough for the IP and L4 headers
            self._config(struct.pack("=HH", 10, _NFULA_CFG_MODE) + struct.pack("!IB", 64,
                         _NFULNL_COPY_PACKET) + b"\0" * 3)
        except OSError:
            self.sock.close()
            raise

    def _config(self, attrs: bytes):
        nfgen = struct.pack("=BBH", socket.AF_UNSPEC, 0, socket.htons(self.group))
        body = nfgen + attrs
        hdr = struct.pack("=IHHII", 16 + len(body), (_NFNL_SUBSYS_ULOG << 8) | _NFULNL_MSG_CONFIG,
                          _NLM_F_REQUEST | _NLM_F_ACK, 1, 0)
        self.sock.send(hdr + body)
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline:
            try:
                reply = self.sock.recv(65536)
            except BlockingIOError:
                time.sleep(0.001)
                continue
            length, kind = struct.unpack_from("=IH", reply)
            if kind == _NLMSG_ERROR:
                err = -struct.unpack_from("=i", reply, 16)[0]
                if err:
                    raise OSError(err, os.strerror(err))
                return
        raise OSError(110, "no answer from nfnetlink_log")

    def fileno(self) -> int:
        return self.sock.fileno()

    def read(self) -> list[Drop]:
        drops = []
        for _ in range(256):  # bounded: the rest waits for the next wakeup
            try:
                data = self.sock.recv(65536)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:  # ENOBUFS: the kernel dropped log messages; counters still count
                break
            now = time.time()
            for prefix, payload in parse_nflog(data):
                if not prefix.startswith("sbx:"):
                    continue
                parsed = parse_ipv4(payload)
                proto, src, dst, dport = parsed or ("other", "", "", None)
                drops.append(Drop(prefix[4:], proto, src, dst, dport, now))
        return drops

    def close(self):
        self.sock.close()


def cleanup_nft(fields: dict):
    """Crash recovery for intent kind `nft`: delete the sandbox's table (its chains, rules
    and sets go with it) in the daemon's netns; idempotent, verifies it is gone."""
    from sandbox.kernel import network
    network.HostSide.get().call(network.cleanup_table_now, fields["table"])


cleanup = cleanup_nft  # the name runtime/recovery.py looks up
