"""Network logic without root: allowlist parsing, the resolver's decisions, NFLOG parsing.

The resolver is driven through `Resolver.answer()` with a fake upstream DNS server on
127.0.0.1 (loopback only) that records every query, and a fake pin that records the
order of events: the answer must never be produced before the pin."""
import asyncio
import socket
import struct
import threading
from types import SimpleNamespace

import dns.message
import dns.rcode
import dns.rrset
import pytest

from sandbox.audit.sink import MemorySink
from sandbox.kernel import dns as sdns
from sandbox.kernel.netfilter import parse_ipv4, parse_nflog
from sandbox.policy.schema import NetworkPolicy, parse_allow_entry


@pytest.mark.parametrize("text,host,wild,ip,ports", [
    ("api.github.com:443", "api.github.com", False, False, (443,)),
    ("*.pypi.org", "pypi.org", True, False, (443,)),
    ("10.1.2.3:8443", "10.1.2.3", False, True, (8443,)),
    ("[2001:db8::1]:443", "2001:db8::1", False, True, (443,)),
    ("Example.COM:80,443", "example.com", False, False, (80, 443)),
])
def test_allow_entries_parse(text, host, wild, ip, ports):
    e = parse_allow_entry(text)
    assert (e.host, e.wildcard, e.is_ip, e.ports) == (host, wild, ip, ports)


@pytest.mark.parametrize("text,why", [
    ("a.*.b.com", "wildcard"), ("*.com", "two labels"), ("x.com:0", "port"),
    ("x.com:70000", "port"), ("x.com:", "empty port"), ("1.2.3:4", "IPv4"),
    ("2001:db8::1", "brackets"), ("[1.2.3.4]:5", "brackets"), ("bad!.com", "host name"),
    ("127.0.0.1", "usable"), ("[::1]:443", "usable"), ("*", "wildcard"), ("x.com:https", "port"),
])
def test_bad_allow_entries_are_refused_with_a_reason(text, why):
    with pytest.raises(ValueError, match=why):
        parse_allow_entry(text)


def test_policy_check_names_the_field():
    with pytest.raises(ValueError, match="allow: 'x.com:0'"):
        NetworkPolicy(mode="egress", allow=("x.com:0",)).check()


def test_wildcard_does_not_match_the_bare_domain():
    e = parse_allow_entry("*.pypi.org")
    assert e.matches("files.pypi.org") and e.matches("a.b.pypi.org.")
    assert not e.matches("pypi.org") and not e.matches("evilpypi.org")


def test_token_bucket():
    now = [0.0]
    b = sdns.TokenBucket(2, clock=lambda: now[0])
    assert [b.take() for _ in range(3)] == [True, True, False]
    now[0] += 0.5
    assert b.take() and not b.take()


def test_long_names_are_bounded_and_hashed_in_records():
    name = "a" * 60 + "." + "b" * 60 + ".evil.test"
    rec = sdns.name_record(name)
    assert len(rec["name"]) == 80 and rec["name_len"] == len(name) and rec["name_truncated"]
    assert len(rec["name_sha256"]) == 16


def test_cname_chain_pins_only_the_chain():
    q = dns.message.make_query("alias.t.", "A").question[0].name
    answer = [dns.rrset.from_text("alias.t.", 300, "IN", "CNAME", "real.t."),
              dns.rrset.from_text("real.t.", 60, "IN", "A", "192.0.2.1"),
              dns.rrset.from_text("other.t.", 60, "IN", "A", "192.0.2.99")]
    chain, addrs, ttl = sdns.final_addresses(q, answer)
    assert addrs == ["192.0.2.1"] and ttl == 60 and len(chain) == 2


def test_nflog_and_ipv4_parsing():
    ip = bytes([0x45, 0, 0, 40, 0, 0, 0, 0, 64, 6, 0, 0]) + socket.inet_aton("10.0.0.2") \
        + socket.inet_aton("192.0.2.7") + struct.pack("!HH", 40000, 22)
    assert parse_ipv4(ip) == ("tcp", "10.0.0.2", "192.0.2.7", 22)
    attrs = struct.pack("=HH", 4 + 8, 10) + b"sbx:abc\0"
    attrs += struct.pack("=HH", 4 + len(ip), 9) + ip
    msg = struct.pack("=BBH", 2, 0, 0) + attrs
    dgram = struct.pack("=IHHII", 16 + len(msg), 4 << 8, 0, 0, 0) + msg
    assert parse_nflog(dgram) == [("sbx:abc", ip)]


class FakeUpstream:
    """A DNS server on 127.0.0.1 that records every name it is asked."""

    def __init__(self, answers=("192.0.2.10",)):
        self.answers = answers
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.names: list[str] = []
        self.t = threading.Thread(target=self._run, daemon=True)
        self.t.start()

    def _run(self):
        while True:
            try:
                data, addr = self.sock.recvfrom(4096)
            except OSError:
                return
            q = dns.message.from_wire(data)
            name = q.question[0].name.to_text(omit_final_dot=True)
            self.names.append(name)
            r = dns.message.make_response(q)
            r.answer.append(dns.rrset.from_text_list(q.question[0].name, 5, "IN", "A",
                                                     list(self.answers)))
            self.sock.sendto(r.to_wire(), addr)

    def close(self):
        self.sock.close()


def make_resolver(answers=("192.0.2.10",), private=True):
    up = FakeUpstream(answers)
    events = []
    pol = NetworkPolicy(mode="egress", allow=("api.example.test:443,8443", "*.wild.test"),
                        dns_qps=5, dns_ttl_min=30, dns_ttl_max=600, dns_private=private)
    h = SimpleNamespace(sandbox_id="u1", sandbox_ip="10.0.0.2", resolver_ip="10.0.0.1", table="t")
    entries = [parse_allow_entry(e) for e in pol.allow]
    audit = MemorySink()
    r = sdns.Resolver(h, entries, pol, audit, [("127.0.0.1", up.port)],
                      pin=lambda addrs, ports, ttl: events.append(("pin", addrs, ports, ttl)))
    r.events, r.up, r.sink = events, up, audit
    return r


@pytest.fixture
def resolver():
    r = make_resolver()
    yield r
    r.up.close()


def test_internal_answers_are_not_pinned_unless_the_policy_says_so():
    # whoever runs an allowlisted domain's DNS points it at metadata / LAN addresses
    r = make_resolver(answers=("169.254.169.254", "10.0.0.5", "192.168.1.1", "100.64.0.1",
                               "1.2.3.4"), private=False)
    try:
        m = ask(r, "x.wild.test")
        assert [a.address for rr in m.answer for a in rr] == ["1.2.3.4"]
        assert r.events[0] == ("pin", ["1.2.3.4"], (443,), 30)
        rec = r.sink.find("dns_query", name="x.wild.test")[0]["details"]
        assert len(rec["refused_answers"]) == 4
    finally:
        r.up.close()
    r = make_resolver(answers=("10.0.0.5",), private=False)
    try:
        m = ask(r, "x.wild.test")
        assert m.rcode() == dns.rcode.NOERROR and m.answer == []
        assert [e for e in r.events if e[0] == "pin"] == []
    finally:
        r.up.close()


def ask(r, name, rtype="A"):
    wire = dns.message.make_query(name, rtype).to_wire()
    out = asyncio.run(r.answer(wire))
    r.events.append(("answer", name))
    return dns.message.from_wire(out)


def test_allowlisted_name_is_pinned_before_it_is_answered(resolver):
    m = ask(resolver, "api.example.test")
    assert m.rcode() == dns.rcode.NOERROR
    assert [a.address for rr in m.answer for a in rr] == ["192.0.2.10"]
    assert m.answer[0].ttl == 30  # upstream said 5: clamped up to dns_ttl_min
    assert resolver.events == [("pin", ["192.0.2.10"], (443, 8443), 30), ("answer",
                                                                           "api.example.test")]
    assert resolver.up.names == ["api.example.test"]


def test_names_off_the_list_never_reach_upstream(resolver):
    exfil = "x" * 63 + ".deadbeef" * 5 + ".evil.test"
    for name in ("evil.test", exfil, "wild.test", "api.example.test.evil.test"):
        assert ask(resolver, name).rcode() == dns.rcode.NXDOMAIN
    assert resolver.up.names == [] and not [e for e in resolver.events if e[0] == "pin"]
    denied = resolver.sink.find("dns_query", reason="not on the allowlist")
    assert len(denied) == 4 and all(len(r["details"]["name"]) <= 80 for r in denied)


def test_other_types_are_refused_without_upstream(resolver):
    for t in ("TXT", "ANY", "MX", "NULL"):
        assert ask(resolver, "api.example.test", t).rcode() == dns.rcode.REFUSED
    assert ask(resolver, "a.wild.test", "AAAA").answer == []
    assert resolver.up.names == []
    assert len(resolver.sink.find("dns_query", reason="type refused")) == 4


def test_queries_over_the_rate_are_refused(resolver):
    codes = [ask(resolver, "nope.test").rcode() for _ in range(8)]
    assert codes.count(dns.rcode.REFUSED) >= 3  # 5 qps, burst 5
    assert resolver.sink.find("dns_query", reason="rate limited")


def test_a_failing_pin_means_no_answer(resolver):
    def broken(*a):
        raise RuntimeError("netlink down")
    resolver._pin = broken
    assert ask(resolver, "x.wild.test").rcode() == dns.rcode.SERVFAIL


def test_garbage_gets_no_reply(resolver):
    assert asyncio.run(resolver.answer(b"\x00\x01garbage")) is None
