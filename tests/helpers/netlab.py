"""A little internet for the network tests, made only of namespaces the test creates.

    sbxt-<pid>-host   plays the daemon's netns (ip_forward on, lo up); the code under test
                      makes its veths, nft tables and resolver sockets here, never in the
                      real root netns.
    sbxt-<pid>-web    10.250.1.2: HTTPS on 443 (certificate made at run time by openssl)
    sbxt-<pid>-plain  10.250.2.2: plain HTTP on 80, an SSH-like banner on 22, a UDP echo
                      on 5353, a byte sink on 9000 (rate-limit measurement)
    sbxt-<pid>-dns    10.250.3.2: the fake upstream DNS; logs every query it receives
Each upstream ns is wired to the host ns by a veth (host side 10.250.N.1/24). Everything
is removed in `close()` (namespaces first: their veths go with them), also on failure.
Tests may use `ip`/`nft` to build the lab and to inspect; the product code never does.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

PY = sys.executable
HOSTS = {"web": "10.250.1.2", "plain": "10.250.2.2", "dns": "10.250.3.2"}
ZONE = {  # the fake upstream's answers (A records, ttl 60)
    "api.example.test": "10.250.1.2",
    "www.example.test": "10.250.1.2",
    "plain.example.test": "10.250.2.2",
    "evil.test": "10.250.2.2",
    "sub.wild.test": "10.250.1.2",
    "wild.test": "10.250.1.2",
}
CNAMES = {"alias.example.test": "api.example.test"}

_DNS_SERVER = r'''
import socket, sys, dns.message, dns.rrset, dns.rcode, json
zone, cnames, log = json.loads(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3]
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("0.0.0.0", 53))
print("ready", flush=True)
while True:
    data, addr = s.recvfrom(4096)
    try:
        q = dns.message.from_wire(data)
    except Exception:
        continue
    name = q.question[0].name.to_text(omit_final_dot=True).lower()
    with open(log, "a") as f:
        f.write(json.dumps({"name": name, "type": q.question[0].rdtype}) + "\n")
    r = dns.message.make_response(q)
    target = cnames.get(name, name)
    if name in cnames:
        r.answer.append(dns.rrset.from_text(name + ".", 60, "IN", "CNAME", target + "."))
    if target in zone and q.question[0].rdtype == 1:
        r.answer.append(dns.rrset.from_text(target + ".", 60, "IN", "A", zone[target]))
    elif target not in zone:
        r.set_rcode(dns.rcode.NXDOMAIN)
    s.sendto(r.to_wire(), addr)
'''

_PLAIN_SERVER = r'''
import socket, threading, sys, time, json
def tcp(port, fn):
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", port)); s.listen(16)
    def loop():
        while True:
            c, _ = s.accept(); threading.Thread(target=fn, args=(c,), daemon=True).start()
    threading.Thread(target=loop, daemon=True).start()
def http(c):
    c.recv(4096); c.sendall(b"HTTP/1.0 200 OK\r\n\r\nplain"); c.close()
def ssh(c):
    c.sendall(b"SSH-2.0-fake\r\n"); c.close()
def sink(c):
    n, first, last = 0, None, None
    while True:
        d = c.recv(65536)
        if not d: break
        now = time.monotonic()
        first = first or now; last = now; n += len(d)
    c.sendall(json.dumps({"bytes": n, "seconds": (last or 0) - (first or 0)}).encode()); c.close()
tcp(80, http); tcp(22, ssh); tcp(9000, sink)
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.bind(("0.0.0.0", 5353))
print("ready", flush=True)
while True:
    d, a = u.recvfrom(2048); u.sendto(d, a)
'''

_HTTPS_SERVER = r'''
import http.server, ssl, sys
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200); self.end_headers(); self.wfile.write(b"secure")
    def log_message(self, *a): pass
srv = http.server.ThreadingHTTPServer(("0.0.0.0", 443), H)
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER); ctx.load_cert_chain(sys.argv[1], sys.argv[2])
srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
print("ready", flush=True)
srv.serve_forever()
'''


def sh(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), capture_output=True, text=True, check=check, timeout=30)


class NetLab:
    def __init__(self):
        self.pid = os.getpid()
        # readable by the unprivileged client (it needs the CA certificate)
        self.tmp = tmp = Path(f"/tmp/sbxt-{self.pid}-lab")
        tmp.mkdir(mode=0o755, exist_ok=True)
        self.host = f"sbxt-{self.pid}-host"
        self.netns_dir = f"/run/sbxt-{self.pid}-netns"   # the sandboxes' named namespaces
        self.ns = {k: f"sbxt-{self.pid}-{k}" for k in HOSTS}
        self.dns_log = tmp / "dns-queries.jsonl"
        self.cert = tmp / "cert.pem"
        self.key = tmp / "key.pem"
        self.procs: list[subprocess.Popen] = []
        self.made: list[str] = []

    # -- build ---------------------------------------------------------------------------
    def start(self) -> "NetLab":
        sh("ip", "netns", "add", self.host)
        self.made.append(self.host)
        sh("ip", "-n", self.host, "link", "set", "lo", "up")
        # forwarding on in the TEST's host namespace only (never the real one)
        sh("ip", "netns", "exec", self.host, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        # like a real host, the host ns has its own eth0: the sandbox's eth0 must be made
        # directly in the sandbox's netns, never here first
        sh("ip", "-n", self.host, "link", "add", "eth0", "type", "bridge")  # (no dummy module)
        for i, (k, addr) in enumerate(HOSTS.items(), start=1):
            ns = self.ns[k]
            sh("ip", "netns", "add", ns)
            self.made.append(ns)
            sh("ip", "-n", self.host, "link", "add", f"up{i}", "type", "veth",
               "peer", "name", "eth0", "netns", ns)
            sh("ip", "-n", self.host, "addr", "add", f"10.250.{i}.1/24", "dev", f"up{i}")
            sh("ip", "-n", self.host, "link", "set", f"up{i}", "up")
            sh("ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", "eth0")
            sh("ip", "-n", ns, "link", "set", "eth0", "up")
            sh("ip", "-n", ns, "link", "set", "lo", "up")
            sh("ip", "-n", ns, "route", "add", "default", "via", f"10.250.{i}.1")
        # a service on the host ns's own loopback and uplink address: must be unreachable
        self.host_service = self._serve(self.host, _PLAIN_SERVER)
        sh("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
           "-subj", "/CN=api.example.test", "-addext",
           "subjectAltName=DNS:api.example.test,DNS:www.example.test,DNS:alias.example.test",
           "-keyout", str(self.key), "-out", str(self.cert))
        self.cert.chmod(0o644)
        self._serve(self.ns["web"], _HTTPS_SERVER, str(self.cert), str(self.key))
        self._serve(self.ns["plain"], _PLAIN_SERVER)
        self.dns_log.write_text("")
        self._serve(self.ns["dns"], _DNS_SERVER, json.dumps(ZONE), json.dumps(CNAMES),
                    str(self.dns_log))
        return self

    def _serve(self, ns: str, code: str, *args: str) -> subprocess.Popen:
        p = subprocess.Popen(["ip", "netns", "exec", ns, PY, "-c", code, *args],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.procs.append(p)
        line = p.stdout.readline()  # bounded: the server prints "ready" or exits
        if line.strip() != "ready":
            raise RuntimeError(f"lab server in {ns} did not start: {p.stderr.read()[-2000:]}")
        return p

    # -- use -----------------------------------------------------------------------------
    def queries(self) -> list[str]:
        """Names the fake upstream DNS received, in order."""
        return [json.loads(l)["name"] for l in self.dns_log.read_text().splitlines() if l]

    def in_sandbox(self, netns: str, code: str, *args: str, uid: int = 1000,
                   userns_root: bool = False, timeout: float = 30) -> subprocess.CompletedProcess:
        """Run Python code in a sandbox's netns as an unprivileged uid (no capabilities),
        the stand-in for a real sandboxed process (tests use the engine once it lands).
        userns_root: root of a fresh user namespace (what allow_root gives a sandbox)."""
        argv = ["nsenter", f"--net={self.netns_dir}/{netns}", f"--setuid={uid}",
                f"--setgid={uid}", "--"]
        if userns_root:
            argv += ["unshare", "--user", "--map-root-user", "--"]
        argv += [CLIENT_PY, "-c", code, *args]
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout)

    def host_nft(self) -> str:
        return sh("ip", "netns", "exec", self.host, "nft", "list", "ruleset").stdout

    def host_links(self) -> list[str]:
        out = sh("ip", "-n", self.host, "-o", "link", "show").stdout
        return [l.split(":")[1].strip().split("@")[0] for l in out.splitlines()]

    # -- teardown ------------------------------------------------------------------------
    def close(self):
        for p in self.procs:
            p.kill()  # our own children, by pid
            p.wait(timeout=10)
            for f in (p.stdout, p.stderr):
                f.close()
        for ns in reversed(self.made):
            sh("ip", "netns", "del", ns, check=False)
        if os.path.isdir(self.netns_dir):
            for n in os.listdir(self.netns_dir):
                subprocess.run(["umount", "-l", f"{self.netns_dir}/{n}"], capture_output=True)
                os.unlink(f"{self.netns_dir}/{n}")
            os.rmdir(self.netns_dir)
        shutil.rmtree(self.tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def lab():
    """The little internet, with the network module pointed at its host namespace; checks
    at the end that the REAL root netns holds nothing of ours."""
    from sandbox.kernel import network
    lab = NetLab()
    saved = network.CONFIG
    try:
        lab.start()
        network.configure(host_netns=f"/run/netns/{lab.host}", netns_dir=lab.netns_dir)
        yield lab
    finally:
        network.CONFIG = saved
        lab.close()
        left = root_netns_leftovers()
        assert not left, f"objects left in the REAL root netns: {left}"


def root_netns_leftovers() -> list[str]:
    """sbx/sbxt links or sbx nft tables in the REAL root netns (must always be empty)."""
    left = []
    out = sh("ip", "-o", "link", "show").stdout
    for l in out.splitlines():
        name = l.split(":")[1].strip().split("@")[0]
        if name.startswith("sbx"):
            left.append(f"link {name}")
    for l in sh("nft", "list", "tables").stdout.splitlines():
        if " sbx" in l:
            left.append(l.strip())
    return left


# The client runs as uid 1000 with the system Python (the venv lives under /root): DNS wire
# format by hand (RFC 1035 4.1), no third-party modules.
CLIENT_PY = "/usr/bin/python3"
CLIENT = r'''
import json, socket, ssl, sys, time, struct, random
cmd, args = sys.argv[1], json.loads(sys.argv[2])
RCODES = {0: "NOERROR", 1: "FORMERR", 2: "SERVFAIL", 3: "NXDOMAIN", 4: "NOTIMP", 5: "REFUSED"}
TYPES = {"A": 1, "AAAA": 28, "TXT": 16, "ANY": 255, "MX": 15, "NULL": 10}
def query(name, rtype):
    qid = random.randrange(65536)
    q = struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 0)
    for label in name.split("."):
        q += bytes([len(label)]) + label.encode()
    return qid, q + b"\0" + struct.pack("!HH", TYPES[rtype], 1)
def skip_name(m, i):
    while True:
        n = m[i]
        if n == 0: return i + 1
        if n >= 0xC0: return i + 2
        i += n + 1
def parse(m):
    qid, flags, qd, an = struct.unpack("!HHHH", m[:8])
    i = 12
    for _ in range(qd):
        i = skip_name(m, i) + 4
    addrs = []
    for _ in range(an):
        i = skip_name(m, i)
        t, c, ttl, ln = struct.unpack("!HHIH", m[i:i + 10]); i += 10
        if t == 1: addrs.append(socket.inet_ntoa(m[i:i + 4]))
        i += ln
    return {"rcode": RCODES.get(flags & 0xF, str(flags & 0xF)), "a": addrs, "tc": bool(flags & 0x200)}
def resolve(name, rtype="A", server=None, tcp=False, port=53):
    server = server or args.get("resolver")
    qid, q = query(name, rtype)
    try:
        if tcp:
            s = socket.create_connection((server, port), timeout=2)
            s.sendall(struct.pack("!H", len(q)) + q)
            n = struct.unpack("!H", s.recv(2))[0]; m = b""
            while len(m) < n:
                d = s.recv(n - len(m))
                if not d: break
                m += d
        else:
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(2)
            s.sendto(q, (server, port)); m = s.recv(4096)
        return parse(m)
    except Exception as e:
        return {"error": type(e).__name__}
def connect(host, port, tls=False, sni=None):
    try:
        s = socket.create_connection((host, port), timeout=2)
        if tls:
            c = ssl.create_default_context(cafile=args["ca"])
            s = c.wrap_socket(s, server_hostname=sni)
            s.sendall(b"GET / HTTP/1.0\r\nHost: x\r\n\r\n")
        else:
            s.sendall(b"GET / HTTP/1.0\r\n\r\n")
        data = b""
        while True:
            d = s.recv(4096)
            if not d: break
            data += d
        s.close()
        return {"ok": True, "data": data.decode(errors="replace")[-20:]}
    except Exception as e:
        return {"ok": False, "error": type(e).__name__}
def udp(host, port):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(1.5)
    try:
        s.sendto(b"ping", (host, port)); return {"ok": True, "data": s.recv(100).decode()}
    except Exception as e:
        return {"ok": False, "error": type(e).__name__}
def bulk(host, port, seconds):
    s = socket.create_connection((host, port), timeout=5)
    buf = b"x" * 65536; end = time.monotonic() + seconds
    while time.monotonic() < end:
        s.sendall(buf)
    s.shutdown(socket.SHUT_WR)
    return json.loads(s.recv(4096).decode())
def many(queries):
    return [resolve(**q) for q in queries]
def conns(cs):
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(len(cs)) as ex:
        return list(ex.map(lambda c: connect(**c), cs))
def shell(argv):
    import subprocess
    r = subprocess.run(argv, capture_output=True, text=True)
    return {"rc": r.returncode, "err": r.stderr[-300:]}
out = {"resolve": lambda: resolve(**args["q"]), "connect": lambda: connect(**args["c"]),
       "udp": lambda: udp(**args["u"]), "bulk": lambda: bulk(**args["b"]),
       "many": lambda: many(args["qs"]), "conns": lambda: conns(args["cs"]), "shell": lambda: shell(args["argv"])}[cmd]()
print(json.dumps(out))
'''


def client(lab: NetLab, netns: str, cmd: str, uid: int = 1000, userns_root: bool = False,
           **args) -> dict:
    """Run one client action in the sandbox's netns; returns its JSON result."""
    args.setdefault("ca", str(lab.cert))
    r = lab.in_sandbox(netns, CLIENT, cmd, json.dumps(args), uid=uid, userns_root=userns_root)
    if r.returncode != 0:
        raise AssertionError(f"client failed: {r.stderr[-1500:]}")
    return json.loads(r.stdout)


def wait_for(pred, seconds: float = 5.0) -> bool:
    """Poll a condition (bounded); for events that arrive asynchronously, e.g. NFLOG."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.05)
    return pred()
