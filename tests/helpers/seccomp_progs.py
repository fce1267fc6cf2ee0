"""C programs the seccomp tests compile with gcc, and a standalone installer harness.

- `sbx-syscall [--i386] NR [ARG...]`: the attacker. Makes one raw syscall (or, with --i386,
  one through `int $0x80`, the 32-bit ABI) and prints "RET ERRNO". If a clone leaks through
  as a new process, that child exits at once.
- `sbx-seccomp-exec BPF_FILE SOCK_FD UID -- ARGV...`: a stand-in for the engine's command
  child: drops to UID, sets no_new_privs, installs the filter (with NEW_LISTENER when
  SOCK_FD >= 0, sending the listener over that unix socket and closing it), then execs.
  scripts/bench_seccomp.py uses it to compare the same program with and without a filter.
"""
from __future__ import annotations

import errno
from pathlib import Path

from sandbox.kernel import seccomp

# ---- what the attacker tries (shared by the harness and the sandbox tests)

AT_FDCWD = 0xFFFFFF9C  # (unsigned) -100

# name -> raw arguments (NULL pointers, invalid fds, bogus magic): harmless even if let through.
DENIED_CALLS = {
    "mount": [0, 0, 0, 0, 0],
    "umount2": [0, 0],
    "pivot_root": [0, 0],
    "chroot": [0],
    "setns": [0xFFFFFFFF, 0],
    "unshare": [0x10000000],                                  # CLONE_NEWUSER
    "ptrace": [16, 1, 0, 0],                                  # PTRACE_ATTACH pid 1
    "process_vm_readv": [1, 0, 0, 0, 0, 0],
    "process_vm_writev": [1, 0, 0, 0, 0, 0],
    "pidfd_getfd": [0xFFFFFFFF, 0, 0],
    "keyctl": [0, 0xFFFFFFFD],                                # KEYCTL_GET_KEYRING_ID
    "add_key": [0, 0, 0, 0, 0],
    "request_key": [0, 0, 0, 0],
    "bpf": [0, 0, 0],
    "perf_event_open": [0, 0, 0xFFFFFFFF, 0xFFFFFFFF, 0],
    "userfaultfd": [0],
    "kexec_load": [0, 0, 0, 0],
    "kexec_file_load": [0xFFFFFFFF, 0xFFFFFFFF, 0, 0, 0],
    "init_module": [0, 0, 0],
    "finit_module": [0xFFFFFFFF, 0, 0],
    "delete_module": [0, 0],
    "open_by_handle_at": [0xFFFFFFFF, 0, 0],
    "name_to_handle_at": [0xFFFFFFFF, 0, 0, 0, 0],
    "iopl": [4],
    "ioperm": [0, 0, 0],
    "modify_ldt": [0, 0, 0],
    "swapon": [0, 0],
    "swapoff": [0],
    "reboot": [0, 0, 0, 0],                                   # bad magic
    "acct": [0],
    "settimeofday": [0, 0],
    "clock_settime": [0, 0],
    "clock_adjtime": [0, 0],
    "adjtimex": [0],
    "io_uring_setup": [1, 0],
    "io_uring_enter": [0xFFFFFFFF, 0, 0, 0, 0, 0],
    "io_uring_register": [0xFFFFFFFF, 0, 0, 0],
    "fanotify_init": [0, 0],
    "lookup_dcookie": [0, 0, 0],
    "quotactl": [0, 0, 0, 0],
    "quotactl_fd": [0xFFFFFFFF, 0, 0, 0],
    "vhangup": [],
    "nfsservctl": [0, 0, 0],
    "uselib": [0],
    "syslog": [3, 0, 0],
    "move_mount": [0xFFFFFFFF, 0, 0xFFFFFFFF, 0, 0],
    "fsopen": [0, 0],
    "fsmount": [0xFFFFFFFF, 0, 0],
    "fspick": [0xFFFFFFFF, 0, 0],
    "open_tree": [0xFFFFFFFF, 0, 0],
    "mount_setattr": [0xFFFFFFFF, 0, 0, 0, 0],
}
assert set(DENIED_CALLS) == set(seccomp.FIXED_DENY) - set(seccomp.ARG_FILTERED)

# Argument-dependent denials: (test id, syscall, args, argument that must be recorded).
DENIED_USES = [
    ("clone-newuser", "clone", [0x10000000 | 17, 0, 0, 0, 0], ("flags", 0x10000011)),
    ("clone-newnet", "clone", [0x40000000 | 17, 0, 0, 0, 0], ("flags", 0x40000011)),
    ("clone-newns", "clone", [0x00020000 | 17, 0, 0, 0, 0], ("flags", 0x00020011)),
    ("socket-netlink-audit", "socket", [16, 3, 9], ("family", 16)),
    ("socket-packet", "socket", [17, 3, 0], ("family", 17)),
    ("socket-inet-raw", "socket", [2, 3, 1], ("type", 3)),
    ("socket-inet6-raw", "socket", [10, 3, 58], ("type", 3)),
    ("socket-bluetooth", "socket", [31, 1, 0], ("family", 31)),
    ("socket-alg", "socket", [38, 5, 0], ("family", 38)),
    ("socket-vsock", "socket", [40, 1, 0], ("family", 40)),
    ("socketpair-inet", "socketpair", [2, 1, 0, 0], ("family", 2)),
    ("ioctl-tiocsti", "ioctl", [0, 0x5412, 0], ("request", 0x5412)),
    # high bits set: the kernel still reads TIOCSTI (CVE-2019-10063)
    ("ioctl-tiocsti-highbits", "ioctl", [0, 0x100005412, 0], ("request", 0x100005412)),
    ("ioctl-tioclinux", "ioctl", [0, 0x541C, 0], ("request", 0x541C)),
    ("personality-no-aslr", "personality", [0x0040000], ("persona", 0x0040000)),
    ("personality-read-implies-exec", "personality", [0x0400000], ("persona", 0x0400000)),
    ("personality-highbits", "personality", [0x100000000], ("persona", 0x100000000)),
    ("mknod-chr", "mknod", [0, 0o020600, 0x103], ("mode", 0o020600)),
    ("mknodat-blk", "mknodat", [AT_FDCWD, 0, 0o060600, 0x800], ("mode", 0o060600)),
    # SECCOMP_SET_MODE_FILTER with NEW_LISTENER: the agent's own listener would take
    # precedence over ours and could answer "continue" to unshare, mount, ...
    ("seccomp-new-listener", "seccomp", [1, 8, 0], ("flags", 8)),
    ("seccomp-new-listener-tsync", "seccomp", [1, 8 | 1, 0], ("flags", 9)),
]


# Harmless uses of the argument-filtered syscalls, and the quiet refusals: no record.
ALLOWED_USES = [
    ("personality-query", "personality", [0xFFFFFFFF], lambda r, e: r >= 0),
    ("personality-linux", "personality", [0], lambda r, e: r >= 0),
    ("socket-unix", "socket", [1, 1 | 0x80000, 0], lambda r, e: r >= 0),
    ("socket-inet-dgram", "socket", [2, 2, 0], lambda r, e: r >= 0),
    ("socketpair-unix", "socketpair", [1, 1, 0, 0], lambda r, e: e == errno.EFAULT),
    ("ioctl-tcgets", "ioctl", [0, 0x5401, 0], lambda r, e: e != errno.EPERM),
    ("mknod-fifo-null-path", "mknod", [0, 0o010600, 0], lambda r, e: e == errno.EFAULT),
    # a filter of its own without a listener is fine (NULL program: EFAULT, not EPERM)
    ("seccomp-filter-no-listener", "seccomp", [1, 0, 0], lambda r, e: e == errno.EFAULT),
    # glibc's getaddrinfo probes NETLINK_ROUTE and carries on: refused quietly.
    ("socket-netlink-route", "socket", [16, 3, 0], lambda r, e: e == errno.EAFNOSUPPORT),
    # glibc falls back from clone3 to clone on ENOSYS; not a violation.
    ("clone3-enosys", "clone3", [0, 0], lambda r, e: e == errno.ENOSYS),
    # Not allowlisted, not deny-listed: plain EPERM, nothing to report.
    ("sync-eperm", "sync", [], lambda r, e: e == errno.EPERM),
]



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

# The stacking attack (include/uapi/linux/seccomp.h): install a filter of one's own that
# sends unshare to USER_NOTIF with a listener, answer "continue" from a forked helper, and
# call unshare(CLONE_NEWUSER). Prints "install RET ERRNO" and, if that worked, "unshare RET ERRNO".
STACK_LISTENER_C = r"""
#define _GNU_SOURCE
#include <errno.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <sched.h>
#include <stddef.h>
#include <stdio.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

int main(void) {
    struct sock_filter f[] = {
        BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr)),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, SYS_unshare, 0, 1),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_USER_NOTIF),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
    };
    struct sock_fprog prog = { 4, f };
    long fd = syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER, SECCOMP_FILTER_FLAG_NEW_LISTENER, &prog);
    printf("install %ld %d\n", fd < 0 ? -1L : 0L, fd < 0 ? errno : 0);
    fflush(stdout);
    if (fd < 0) return 0;
    pid_t helper = fork();
    if (helper == 0) {                       /* the agent's own "supervisor" */
        struct seccomp_notif req;
        struct seccomp_notif_resp resp;
        memset(&req, 0, sizeof req);
        if (ioctl((int)fd, SECCOMP_IOCTL_NOTIF_RECV, &req) == 0) {
            memset(&resp, 0, sizeof resp);
            resp.id = req.id;
            resp.flags = SECCOMP_USER_NOTIF_FLAG_CONTINUE;
            ioctl((int)fd, SECCOMP_IOCTL_NOTIF_SEND, &resp);
        }
        _exit(0);
    }
    close((int)fd);
    long r = syscall(SYS_unshare, CLONE_NEWUSER);
    printf("unshare %ld %d\n", r, r < 0 ? errno : 0);
    waitpid(helper, NULL, 0);
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
    """Compile the helper programs into DEST; returns {"syscall": path, "exec": path, ...}."""
    from tests.helpers.engine import compile_c
    return {name: compile_c(src, dest / f"sbx-{name}")
            for name, src in (("syscall", SYSCALL_C), ("exec", EXEC_C), ("stack", STACK_LISTENER_C))}
