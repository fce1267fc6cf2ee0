"""C programs the seccomp tests compile with gcc, and a standalone installer harness.

- `sbx-syscall [--i386] NR [ARG...]`: the attacker. Makes one raw syscall (or, with --i386,
  one through `int $0x80`, the 32-bit ABI) and prints "RET ERRNO". If a clone leaks through
  as a new process, that child exits at once.
- `sbx-seccomp-exec BPF_FILE SOCK_FD UID -- ARGV...`: a stand-in for the engine's command
  child: drops to UID, sets no_new_privs, installs the filter (with NEW_LISTENER when
  SOCK_FD >= 0, sending the listener over that unix socket and closing it), then execs.
"""
from __future__ import annotations

import subprocess
from pathlib import Path

SYSCALL_C = r"""
#define _GNU_SOURCE
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

int main(int argc, char **argv) {
    int i386 = argc > 1 && strcmp(argv[1], "--i386") == 0;
    int first = i386 ? 2 : 1;
    if (argc <= first) { fprintf(stderr, "usage: sbx-syscall [--i386] NR [ARG...]\n"); return 2; }
    long nr = strtol(argv[first], NULL, 0);
    unsigned long a[6] = {0};
    for (int i = 0; i < 6 && first + 1 + i < argc; i++) a[i] = strtoul(argv[first + 1 + i], NULL, 0);
    long ret;
    int err = 0;
    if (i386) {
        /* 32-bit ABI from a 64-bit process: seccomp sees AUDIT_ARCH_I386. */
        __asm__ volatile("int $0x80" : "=a"(ret) : "a"(nr), "b"(a[0]), "c"(a[1]), "d"(a[2])
                         : "memory");
        if (ret < 0 && ret > -4096) { err = (int)-ret; ret = -1; }
    } else {
        errno = 0;
        ret = syscall(nr, a[0], a[1], a[2], a[3], a[4], a[5]);
        err = ret == -1 ? errno : 0;
    }
    if (ret == 0 && nr == SYS_clone && !i386) _exit(0);   /* a leaked clone's child */
    if (ret > 0 && nr == SYS_clone && !i386) waitpid((pid_t)ret, NULL, __WALL);
    printf("%ld %d\n", ret, err);
    fflush(stdout);
    return 0;
}
"""

EXEC_C = r"""
#define _GNU_SOURCE
#include <errno.h>
#include <grp.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <unistd.h>

static void die(const char *what) { fprintf(stderr, "sbx-seccomp-exec: %s: %s\n", what, strerror(errno)); _exit(127); }

int main(int argc, char **argv) {
    if (argc < 6 || strcmp(argv[4], "--") != 0) { fprintf(stderr, "usage\n"); return 2; }
    static unsigned char buf[4096 * 8];
    FILE *f = fopen(argv[1], "rb");
    if (!f) die("open bpf");
    size_t n = fread(buf, 1, sizeof buf, f);
    fclose(f);
    int sock = atoi(argv[2]);
    uid_t uid = (uid_t)atoi(argv[3]);
    if (uid != 0) {
        if (setgroups(0, NULL) || setresgid(uid, uid, uid) || setresuid(uid, uid, uid)) die("drop ids");
    }
    struct sock_fprog prog = { .len = (unsigned short)(n / sizeof(struct sock_filter)),
                               .filter = (struct sock_filter *)buf };
    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)) die("no_new_privs");
    unsigned long flags = sock >= 0 ? SECCOMP_FILTER_FLAG_NEW_LISTENER : 0;
    long fd = syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER, flags, &prog);
    if (fd < 0) die("seccomp");
    if (sock >= 0) {
        char c = 'L';
        struct iovec iov = { &c, 1 };
        char cbuf[CMSG_SPACE(sizeof(int))];
        memset(cbuf, 0, sizeof cbuf);
        struct msghdr msg = { .msg_iov = &iov, .msg_iovlen = 1, .msg_control = cbuf,
                              .msg_controllen = sizeof cbuf };
        struct cmsghdr *cm = CMSG_FIRSTHDR(&msg);
        cm->cmsg_level = SOL_SOCKET; cm->cmsg_type = SCM_RIGHTS; cm->cmsg_len = CMSG_LEN(sizeof(int));
        int ifd = (int)fd;
        memcpy(CMSG_DATA(cm), &ifd, sizeof ifd);
        if (sendmsg(sock, &msg, 0) != 1) die("sendmsg");
        close(ifd);          /* the agent must never hold its own listener */
        close(sock);
    }
    execvp(argv[5], argv + 5);
    die("execvp");
    return 127;
}
"""


def build(dest: Path) -> dict[str, Path]:
    """Compile the helper programs into DEST; returns {"syscall": path, "exec": path}."""
    out = {}
    for name, src in (("syscall", SYSCALL_C), ("exec", EXEC_C)):
        c = dest / f"sbx-{name}.c"
        c.write_text(src)
        exe = dest / f"sbx-{name}"
        subprocess.run(["gcc", "-O2", "-Wall", "-Werror", "-o", str(exe), str(c)], check=True,
                       capture_output=True, text=True)
        out[name] = exe
    return out


async def run_filtered(progs: dict, bpf: bytes, argv: list[str], *, tmp: Path, supervisor=None,
                       uid: int = 65534, cwd: Path | None = None, env: dict | None = None,
                       on_listener=None, timeout: float = 60.0) -> tuple[int, str, str]:
    """Run ARGV under the filter BPF through sbx-seccomp-exec. With a supervisor (or an
    on_listener callback) the filter is installed with NEW_LISTENER and the listener fd is
    handed over; returns (exit status, stdout, stderr)."""
    import asyncio
    import os
    import socket

    bpf_file = tmp / f"filter-{os.getpid()}-{id(bpf)}.bpf"
    bpf_file.write_bytes(bpf)
    notify = supervisor is not None or on_listener is not None
    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET) if notify else (None, None)
    pass_fds = (child.fileno(),) if child else ()
    proc = await asyncio.create_subprocess_exec(
        str(progs["exec"]), str(bpf_file), str(child.fileno() if child else -1), str(uid), "--", *argv,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, pass_fds=pass_fds,
        cwd=str(cwd) if cwd else None, env=env)
    try:
        if child:
            child.close()
            loop = asyncio.get_running_loop()
            parent.setblocking(False)
            _, fds, _, _ = await asyncio.wait_for(loop.run_in_executor(
                None, lambda: socket.recv_fds(_blocking(parent), 1, 1)), timeout)
            if len(fds) != 1:
                raise AssertionError("sbx-seccomp-exec sent no listener fd")
            (on_listener or supervisor.watch)(fds[0])
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
        return proc.returncode, out.decode(), err.decode()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        if parent:
            parent.close()
        bpf_file.unlink(missing_ok=True)


def _blocking(sock):
    sock.setblocking(True)
    return sock
