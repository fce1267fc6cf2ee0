"""The sandbox's only resolver: the daemon answers its DNS itself (DNS is not a tunnel).

One `Resolver` per egress sandbox listens on the host end of its veth, port 53, UDP and
TCP (RFC 1035 4.2.2 two-byte length framing), in the daemon's netns; the nft input chain
lets the sandbox reach nothing else on the host. For each query:
  * not exactly one question, not class IN: FORMERR / REFUSED;
  * over the per-sandbox rate (policy dns_qps, token bucket): REFUSED;
  * a type other than A / AAAA (TXT, ANY, MX, NULL...): REFUSED, never forwarded;
  * a name not on the allowlist: NXDOMAIN, never forwarded (a long random label under
    someone's domain is a tunnel: it must not reach any upstream resolver);
  * AAAA of an allowlisted name: an empty answer (sandboxes get IPv4 only);
  * A of an allowlisted name: asked upstream, the CNAME chain followed from the question,
    the final addresses pinned into the sandbox's nft allow set for the answer's TTL
    clamped to [dns_ttl_min, dns_ttl_max] with the entry's ports, and only then the
    answer (the chain only, TTLs clamped) is sent back.
Every query is audited (`dns_query`: name, type, outcome, answer or reason). The name is
data the agent chose: records keep at most 80 characters of it plus the length and a
sha256 prefix of the whole name, so a record stays bounded in size.
"""
from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import socket
import struct
import time

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset

from sandbox.errors import NetworkError

_UPSTREAM_TIMEOUT = 3.0
_TCP_IDLE = 10.0
_TCP_MAX_CONN = 8
_NAME_KEEP = 80


def upstreams(configured=()) -> list[tuple[str, int]]:
    """(address, port) of the upstream resolvers: configured ones, else the host's."""
    out = []
    for e in configured:
        if e.count(":") == 1:
            host, port = e.split(":")
            out.append((host, int(port)))
        else:
            out.append((e.strip("[]"), 53))
    if out:
        return out
    try:
        with open("/etc/resolv.conf") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 2 and parts[0] == "nameserver":
                    out.append((parts[1], 53))
    except OSError:
        pass
    if not out:
        raise NetworkError("no upstream DNS resolver: none in the policy's dns_upstream and "
                           "none in /etc/resolv.conf")
    return out


def name_record(name: str) -> dict:
    """How a queried name appears in an audit record: bounded, and hashed when long."""
    rec = {"name": name[:_NAME_KEEP], "name_len": len(name)}
    if len(name) > _NAME_KEEP:
        rec["name_sha256"] = hashlib.sha256(name.encode()).hexdigest()[:16]
        rec["name_truncated"] = True
    return rec


class TokenBucket:
    def __init__(self, rate: float, burst: float | None = None, clock=time.monotonic):
        self.rate, self.burst, self.clock = rate, burst or rate, clock
        self.tokens, self.last = self.burst, clock()

    def take(self) -> bool:
        now = self.clock()
        self.tokens = min(self.burst, self.tokens + (now - self.last) * self.rate)
        self.last = now
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        return False


def final_addresses(qname: dns.name.Name, answer: list) -> tuple[list, list[str], int | None]:
    """Follow the CNAME chain from qname through the answer section: (rrsets of the chain,
    the final A addresses, the smallest TTL on the way). Records off the chain are ignored,
    so an upstream cannot get other names' addresses pinned."""
    by_key = {(rr.name, rr.rdtype): rr for rr in answer}
    chain, name, ttl = [], qname, None
    for _ in range(16):  # bounded: CNAME loops end here
        cname = by_key.get((name, dns.rdatatype.CNAME))
        if cname is None:
            break
        chain.append(cname)
        ttl = cname.ttl if ttl is None else min(ttl, cname.ttl)
        name = cname[0].target
    a = by_key.get((name, dns.rdatatype.A))
    if a is None:
        return chain, [], ttl
    chain.append(a)
    ttl = a.ttl if ttl is None else min(ttl, a.ttl)
    return chain, [r.address for r in a], ttl


class Resolver:
    """The DNS server of one sandbox. start()/stop() run in the host-side worker thread
    (network.HostSide), whose loop serves it; `pin` is the sandbox's nft allow set."""

    def __init__(self, handle, entries, pol, audit, upstream, pin=None, permanent=frozenset()):
        self.h = handle
        self.entries = entries
        self.pol = pol
        self.audit = audit
        self.upstream = upstream
        self._pin = pin or self._pin_nft
        self.permanent = permanent  # IP literals of the allowlist: never given a timeout
        self.bucket = TokenBucket(pol.dns_qps)
        self.limited = 0
        self._udp = None
        self._tasks: list = []
        self._socks: tuple = ()
        self._writers: set = set()
        self._fw = None
        self.queries = 0

    # -- lifecycle (called on the worker thread) ---------------------------------------
    def start(self):
        from sandbox.kernel.netfilter import Firewall
        loop = asyncio.get_event_loop()
        ip = self.h.resolver_ip
        self._fw = Firewall()
        try:
            usock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            usock.bind((ip, 53))
            usock.setblocking(False)
            tsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            tsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            tsock.bind((ip, 53))
            tsock.listen(16)
            tsock.setblocking(False)
        except OSError as e:
            self._fw.close()
            raise NetworkError(f"cannot listen for DNS on {ip}:53", errno=e.errno,
                               syscall="bind") from e
        self._socks = (usock, tsock)
        for sock in self._socks:
            forget_stale_fd(loop, sock)
        self._udp = _Udp(self, usock)
        self._tasks = [asyncio.ensure_future(loop.create_datagram_endpoint(lambda: self._udp,
                                                                           sock=usock)),
                       asyncio.ensure_future(asyncio.start_server(self._serve_tcp, sock=tsock,
                                                                  limit=4096))]

    def stop(self):
        """Close every socket now (the next sandbox may get this address at once)."""
        for t in self._tasks:
            if not t.done():
                t.cancel()
            elif not t.cancelled() and t.exception() is None:
                obj = t.result()
                (obj[0] if isinstance(obj, tuple) else obj).close()
        for w in list(self._writers):
            w.close()
        loop = asyncio.get_event_loop()
        for s in self._socks:
            # A task cancelled half-way (stop right after start) leaves its reader
            # registered: unregister before closing, or the fd number goes stale.
            # (the private variant: the public one refuses fds a closing transport owns)
            if s.fileno() >= 0:
                getattr(loop, "_remove_reader", loop.remove_reader)(s.fileno())
            s.close()
        if self._fw is not None:
            self._fw.close()
            self._fw = None

    # -- the decision --------------------------------------------------------------------
    def _match(self, name: str):
        for e in self.entries:
            if e.matches(name):
                return e
        return None

    def _audit(self, qname: str, qtype: str, outcome: str, **details):
        self.audit.record("dns_query", sandbox=self.h.sandbox_id, outcome=outcome,
                          resource=qtype, details={**name_record(qname), "type": qtype, **details})

    def _pin_nft(self, addrs: list[str], ports, ttl: float):
        # Re-adding an element updates its timeout (kernel 6.18 here); an allowlisted IP
        # literal must stay permanent, so it is never re-added with one.
        pairs = [(a, p) for a in addrs for p in ports if (a, p) not in self.permanent]
        self._fw.pin(self.h.table, pairs, timeout=ttl)

    async def answer(self, wire: bytes) -> bytes | None:
        """The reply to one query in wire format (None: drop it, it was not DNS)."""
        try:
            q = dns.message.from_wire(wire)
        except Exception:  # noqa: BLE001 - garbage from the agent: no reply, but audited
            self._audit("", "-", "denied", reason="malformed")
            return None
        self.queries += 1
        if q.flags & dns.flags.QR:
            return None
        if len(q.question) != 1:
            self._audit("", "-", "denied", reason="not one question")
            return _reply(q, dns.rcode.FORMERR).to_wire()
        rr = q.question[0]
        qname = rr.name.to_text(omit_final_dot=True).lower()
        qtype = dns.rdatatype.to_text(rr.rdtype)
        if not self.bucket.take():
            self.limited += 1
            if self.limited in (1, 10) or self.limited % 100 == 0:
                self._audit(qname, qtype, "denied", reason="rate limited",
                            limited_total=self.limited)
            return _reply(q, dns.rcode.REFUSED).to_wire()
        if rr.rdclass != dns.rdataclass.IN or rr.rdtype not in (dns.rdatatype.A,
                                                                  dns.rdatatype.AAAA):
            self._audit(qname, qtype, "denied", reason="type refused")
            return _reply(q, dns.rcode.REFUSED).to_wire()
        entry = self._match(qname)
        if entry is None:
            self._audit(qname, qtype, "denied", reason="not on the allowlist")
            return _reply(q, dns.rcode.NXDOMAIN).to_wire()
        if rr.rdtype == dns.rdatatype.AAAA:
            self._audit(qname, qtype, "ok", reason="ipv4 only", answer=[])
            return _reply(q, dns.rcode.NOERROR).to_wire()
        return await self._resolve(q, rr, qname, qtype, entry)

    async def _resolve(self, q, rr, qname, qtype, entry) -> bytes:
        up = dns.message.make_query(rr.name, dns.rdatatype.A)
        resp = None
        for host, port in self.upstream:
            try:
                resp = await ask_upstream(up, host, port)
                break
            except (dns.exception.DNSException, OSError, asyncio.TimeoutError, ValueError):
                continue
        if resp is None:
            self._audit(qname, qtype, "error", reason="upstream unreachable")
            return _reply(q, dns.rcode.SERVFAIL).to_wire()
        if resp.rcode() != dns.rcode.NOERROR:
            self._audit(qname, qtype, "ok", reason="upstream " + dns.rcode.to_text(resp.rcode()))
            return _reply(q, resp.rcode()).to_wire()
        chain, addrs, ttl = final_addresses(rr.name, resp.answer)
        refused = [a for a in addrs if not _pinnable(a, self.pol.dns_private)]
        addrs = [a for a in addrs if a not in refused]
        ttl = min(max(ttl or 0, self.pol.dns_ttl_min), self.pol.dns_ttl_max)
        if addrs:
            try:
                self._pin(addrs, entry.ports, ttl)   # the pin is in place before the answer
            except Exception as e:  # noqa: BLE001 - fail closed: no pin, no answer
                self._audit(qname, qtype, "error", reason=f"pin failed: {e}")
                return _reply(q, dns.rcode.SERVFAIL).to_wire()
        out = _reply(q, dns.rcode.NOERROR)
        for rrset in chain:
            if rrset.rdtype == dns.rdatatype.A:
                if not addrs:
                    continue  # every address refused: the name resolves to nothing
                rrset = dns.rrset.from_text_list(rrset.name, int(ttl), "IN", "A", addrs)
            else:
                rrset = dns.rrset.from_rdata_list(rrset.name, int(ttl), list(rrset))
            out.answer.append(rrset)
        extra = {"refused_answers": refused[:16]} if refused else {}
        self._audit(qname, qtype, "ok", answer=addrs[:16], ttl=int(ttl), ports=list(entry.ports),
                    **extra)
        return out.to_wire()

    # -- transports ----------------------------------------------------------------------
    def _from_sandbox(self, addr) -> bool:
        return addr and addr[0] == self.h.sandbox_ip

    async def _serve_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        if not self._from_sandbox(writer.get_extra_info("peername")) or \
                len(self._writers) >= _TCP_MAX_CONN:
            writer.close()
            return
        self._writers.add(writer)
        try:
            for _ in range(1000):  # bounded per connection
                head = await asyncio.wait_for(reader.readexactly(2), _TCP_IDLE)
                (n,) = struct.unpack("!H", head)
                wire = await asyncio.wait_for(reader.readexactly(n), _TCP_IDLE)
                reply = await self.answer(wire)
                if reply is None:
                    break
                writer.write(struct.pack("!H", len(reply)) + reply)
                await writer.drain()
        except (asyncio.IncompleteReadError, asyncio.TimeoutError, ConnectionError):
            pass
        finally:
            self._writers.discard(writer)
            writer.close()


def forget_stale_fd(loop, sock):
    """Drop any selector entry left for this fd number. A socket closed while the loop still
    had it registered (the kernel drops it from epoll, asyncio keeps the key) would make a
    later add_reader on the reused number a silent no-op: the new socket is never polled."""
    sel = getattr(loop, "_selector", None)
    if sel is not None and sock.fileno() in sel.get_map():
        try:
            sel.unregister(sock.fileno())
        except (KeyError, OSError, ValueError):
            pass


async def ask_upstream(q: dns.message.Message, host: str, port: int,
                       timeout: float = _UPSTREAM_TIMEOUT) -> dns.message.Message:
    """One query to an upstream resolver on the running loop: UDP on a connected socket
    (only the upstream's replies are accepted), TCP if the answer was truncated. The
    socket is made by the calling thread, so it lives in the host netns."""
    loop = asyncio.get_running_loop()
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    wire = q.to_wire()
    with socket.socket(family, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC) as s:
        forget_stale_fd(loop, s)
        s.connect((host, port))
        await loop.sock_sendall(s, wire)
        deadline = loop.time() + timeout
        for _ in range(8):  # bounded: skip stray datagrams that are not our answer
            data = await asyncio.wait_for(loop.sock_recv(s, 65535), max(0.01, deadline - loop.time()))
            try:
                r = dns.message.from_wire(data)
            except dns.exception.DNSException:
                continue
            if q.is_response(r):
                break
        else:
            raise dns.exception.Timeout()
    if not r.flags & dns.flags.TC:
        return r
    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    try:
        writer.write(struct.pack("!H", len(wire)) + wire)
        (n,) = struct.unpack("!H", await asyncio.wait_for(reader.readexactly(2), timeout))
        r = dns.message.from_wire(await asyncio.wait_for(reader.readexactly(n), timeout))
    finally:
        writer.close()
    if not q.is_response(r):
        raise ValueError("upstream answered another question")
    return r


def _pinnable(addr: str, private_ok: bool) -> bool:
    """May an upstream answer be pinned? Never loopback, unspecified or multicast. Unless
    the policy says dns_private, only global addresses: otherwise whoever controls the DNS
    of an allowlisted (wildcard) domain could point it at 169.254.169.254, the host's LAN
    or other internal services and open them to the sandbox (DNS rebinding)."""
    a = ipaddress.IPv4Address(addr)
    if a.is_loopback or a.is_unspecified or a.is_multicast or a.is_reserved:
        return False
    return private_ok or a.is_global


def _reply(q: dns.message.Message, rcode: int) -> dns.message.Message:
    r = dns.message.make_response(q)
    r.set_rcode(rcode)
    r.flags |= dns.flags.RA
    return r


class _Udp(asyncio.DatagramProtocol):
    def __init__(self, resolver: Resolver, sock):
        self.r = resolver
        self.sock = sock
        self.transport = None

    def connection_made(self, transport):
        self.transport = transport

    def datagram_received(self, data, addr):
        if not self.r._from_sandbox(addr):
            return
        asyncio.ensure_future(self._reply(data, addr))

    async def _reply(self, data, addr):
        reply = await self.r.answer(data)
        if reply is None or self.transport is None or self.transport.is_closing():
            return
        if len(reply) > 512:  # RFC 1035 4.2.1: truncate; the client retries over TCP
            q = dns.message.from_wire(data)
            r = _reply(q, dns.rcode.NOERROR)
            r.flags |= dns.flags.TC
            reply = r.to_wire()
        self.transport.sendto(reply, addr)
