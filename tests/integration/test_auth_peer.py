"""Who is on the other end of the daemon's socket (sandbox/daemon/auth.py), from the kernel:
the identity a peer had when it connected, never what /proc says about its pid later."""
import os
import socket
import time

from sandbox.daemon.auth import peer_of


def test_peer_groups_are_those_at_connect_time(tmp_path):
    """A child in supplementary groups 12345 and 23456 connects, then drops every group and
    changes its gid. peer_of() must report the connect-time identity (SO_PEERCRED +
    SO_PEERGROUPS); a lookup in /proc/<pid>/status would see the dropped groups."""
    path = str(tmp_path / "s")
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(1)
    srv.settimeout(10)                   # a child that failed before connect(): fail, not hang
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:                         # the child: connect in the groups, then leave them
        try:
            os.close(r)
            os.setgroups([12345, 23456])
            os.setgid(4242)
            c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            c.connect(path)
            os.setgroups([])
            os.setgid(0)
            os.write(w, b"x")
            time.sleep(30)               # the parent kills us once it has looked
        finally:
            os._exit(0)
    os.close(w)
    try:
        conn, _ = srv.accept()
        assert os.read(r, 1) == b"x"     # the child has dropped its groups by now
        with open(f"/proc/{pid}/status") as f:
            now = next(line for line in f if line.startswith("Groups:"))
        assert now.split()[1:] == []
        peer = peer_of(conn)
        assert peer.pid == pid and peer.uid == 0 and peer.gid == 4242
        assert sorted(peer.groups) == [12345, 23456]
        conn.close()
    finally:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
        os.close(r)
        srv.close()
