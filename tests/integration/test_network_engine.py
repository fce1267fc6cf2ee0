"""Real sandboxes through the engine API, with their host side in the test's host netns
(tests/helpers/netlab.py): the agent's own tools (getaddrinfo via the generated
/etc/resolv.conf, sockets, ip) against the allowlist."""
import pytest

from sandbox.policy import load_policy
from tests.helpers.engine import make_sandbox, py, sh, state_dir  # noqa: F401 (fixtures)
from tests.helpers.netlab import lab, wait_for  # noqa: F401 (fixture)

AGENT = r'''
import socket, ssl, sys
def tryit(f):
    try:
        return f()
    except Exception as e:
        return type(e).__name__
def https(name):
    ctx = ssl.create_default_context(); ctx.check_hostname = False; ctx.verify_mode = ssl.CERT_NONE
    s = ctx.wrap_socket(socket.create_connection((name, 443), timeout=2), server_hostname=name)
    s.sendall(b"GET / HTTP/1.0\r\n\r\n"); data = b""
    while True:
        d = s.recv(4096)
        if not d: break
        data += d
    return data.decode()[-6:]
def plain(host, port):
    socket.create_connection((host, port), timeout=2); return "connected"
print(tryit(lambda: https("api.example.test")))
print(tryit(lambda: socket.gethostbyname("evil.test")))
print(tryit(lambda: plain("10.250.2.2", 80)))
print(open("/etc/resolv.conf").read().split()[1])
'''


def egress_policy(**user):
    over = {"network": {"mode": "egress", "allow": ["api.example.test:443"],
                        "dns_upstream": ["10.250.3.2"], "dns_private": True}}
    if user:
        over["user"] = user
    return load_policy("default", over)


def test_agent_in_a_real_sandbox_reaches_only_the_allowlist(lab, make_sandbox):
    sb = make_sandbox(egress_policy())
    net = sb.ctx.extra["network"]
    before = len(lab.queries())
    r = py(sb, AGENT)
    assert r.exit_code == 0, r.stderr
    out = r.stdout.decode().split("\n")
    assert out[0] == "secure"                        # resolved by our resolver, pinned, TLS
    assert out[1] == "gaierror"                      # NXDOMAIN
    assert out[2] in ("TimeoutError", "timeout")     # plain HTTP by IP: dropped
    assert out[3] == net.resolver_ip                 # the generated resolv.conf
    assert "evil.test" not in lab.queries()[before:]
    assert wait_for(lambda: sb.ctx.audit.find("net_drop", dst="10.250.2.2", dport=80)
                    if hasattr(sb.ctx.audit, "find") else True)
    u = sb.usage()
    assert u["net_tx_bytes"] > 0 and u["net_rx_bytes"] > 0 and u["net_drops"] >= 1
    names = (net.netns, net.veth, net.table)
    sb.destroy()
    assert not any(n in lab.host_nft() for n in names[2:])
    assert names[1] not in lab.host_links()


def test_root_in_a_sandbox_cannot_touch_the_network_setup(lab, make_sandbox):
    sb = make_sandbox(egress_policy(uid=0, gid=0, allow_root=True))
    before = lab.host_nft()
    r = sh(sb, "id -u; ip link set eth0 down; echo rc=$?; ip addr add 10.213.255.9/32 dev eth0;"
               " echo rc=$?; ip route del default; echo rc=$?")
    out = r.stdout.decode()
    assert out.startswith("0\n")
    assert out.count("rc=0") == 0 and out.count("rc=") == 3, (out, r.stderr)
    assert lab.host_nft() == before


@pytest.mark.parametrize("mode", ["none", "loopback"])
def test_none_and_loopback_modes(make_sandbox, mode):
    sb = make_sandbox(load_policy("default", {"network": {"mode": mode}}))
    # (netlink sockets are not among the agent's socket families: ask by name, SIOCGIFINDEX)
    r = py(sb, "import socket\ndef idx(n):\n    try:\n        return socket.if_nametoindex(n)\n"
               "    except OSError:\n        return None\n"
               "print([n for n in ('lo', 'eth0') if idx(n)])\n"
               "s = socket.socket(); s.bind(('127.0.0.1', 0)); s.listen()\n"
               "try:\n    socket.create_connection(s.getsockname(), timeout=1); print('lo-up')\n"
               "except OSError as e:\n    print('lo-down', type(e).__name__)\n")
    out = r.stdout.decode().split("\n")
    assert out[0] == "['lo']", r.stderr   # no other interface
    assert out[1] == ("lo-up" if mode == "loopback" else "lo-down OSError"), out
