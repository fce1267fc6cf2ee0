/* The parent side of the spawn path: clone3 into new namespaces, write the id maps and
 * v1 cgroups, wait for the child to report it is confined. See docs/internals.md. */
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/time.h>
#include <sys/wait.h>
#include <unistd.h>

#include "sbx_internal.h"

#ifndef CLONE_PIDFD
#define CLONE_PIDFD 0x00001000
#endif
#ifndef CLONE_NEWCGROUP
#define CLONE_NEWCGROUP 0x02000000
#endif
#define SBX_CLONE_INTO_CGROUP 0x200000000ULL

/* struct clone_args of linux/sched.h (CLONE_ARGS_SIZE_VER2); defined here because
 * <linux/sched.h> and glibc's <sched.h> clash. */
struct sbx_clone_args {
    uint64_t flags, pidfd, child_tid, parent_tid, exit_signal, stack, stack_size, tls,
        set_tid, set_tid_size, cgroup;
};

int sbx_abi_version(void) { return SBX_ABI_VERSION; }

/* How long the parent waits for each message of the child's setup. */
#define SBX_SETUP_TIMEOUT_S 30

int sbx_cap_last_cap(void)
{
    /* CAP_LAST_CAP of the running kernel, not of our headers (capabilities(7)). */
    char buf[16] = {0};
    int fd = open("/proc/sys/kernel/cap_last_cap", O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return -1;
    ssize_t n = read(fd, buf, sizeof buf - 1);
    close(fd);
    if (n <= 0)
        return -1;
    return atoi(buf);
}

int sbx_pidfd_send_signal(int pidfd, int sig)
{
    return (int)syscall(SYS_pidfd_send_signal, pidfd, sig, NULL, 0);
}

static int write_file(const char *path, const char *data, struct sbx_error *e, const char *step)
{
    int fd = open(path, O_WRONLY | O_CLOEXEC);
    if (fd < 0)
        return sbx_fail(e, step, "open", path);
    size_t len = strlen(data);
    ssize_t n = write(fd, data, len);
    if (n != (ssize_t)len) {
        sbx_fail(e, step, "write", path);
        close(fd);
        return -1;
    }
    close(fd);
    return 0;
}

/* user_namespaces(7): setgroups "deny" first, then one range per sandbox for uids and gids. */
static int write_maps(const struct sbx_plan *p, int pid, struct sbx_error *e)
{
    char path[64], map[96];
    snprintf(path, sizeof path, "/proc/%d/setgroups", pid);
    if (write_file(path, "deny", e, "idmap") < 0)
        return -1;
    snprintf(path, sizeof path, "/proc/%d/uid_map", pid);
    snprintf(map, sizeof map, "0 %u %u\n", p->uid_base, p->range);
    if (write_file(path, map, e, "idmap") < 0)
        return -1;
    snprintf(path, sizeof path, "/proc/%d/gid_map", pid);
    snprintf(map, sizeof map, "0 %u %u\n", p->gid_base, p->range);
    return write_file(path, map, e, "idmap");
}

/* v1 controllers have no CLONE_INTO_CGROUP. The child joins them itself, first thing, by
 * writing "0" to their `tasks` files through fds opened here, as host root: writing another
 * task's pid into cgroup.procs takes cgroup_threadgroup_rwsem for writing, and its first
 * writer after a pause waits for an RCU grace period (rcu_sync; 5-13 ms measured here),
 * while a thread moving itself skips that lock (kernel/cgroup/cgroup.c,
 * cgroup_procs_write_start). v1 checks the writer against the credentials the file was
 * opened with (__cgroup1_procs_write: of->file->f_cred), so the child, unprivileged on the
 * host, may do it through these fds and nothing else. */
static void close_all(const int *fds, int n);
static int open_v1_tasks(const struct sbx_plan *p, int *fds, struct sbx_error *e)
{
    if (p->n_cgroup_v1 > SBX_MAX_V1) {
        errno = E2BIG;
        return sbx_fail(e, "cgroup", "plan", "too many v1 hierarchies");
    }
    for (int i = 0; i < p->n_cgroup_v1; i++) {
        fds[i] = open(p->cgroup_v1_tasks[i], O_WRONLY | O_CLOEXEC);
        if (fds[i] < 0) {
            sbx_fail(e, "cgroup", "open", p->cgroup_v1_tasks[i]);
            close_all(fds, i);
            return -1;
        }
    }
    return 0;
}

static void close_all(const int *fds, int n)
{
    for (int i = 0; i < n; i++)
        close(fds[i]);
}

static void kill_and_reap(int pid, int pidfd)
{
    if (pidfd >= 0)
        sbx_pidfd_send_signal(pidfd, SIGKILL);
    else
        kill(pid, SIGKILL);
    while (waitpid(pid, NULL, __WALL) < 0 && errno == EINTR)
        ;
}

/* clone3 with the calling thread's netns switched and its supplementary groups
 * cleared (raw syscalls: per thread, not the whole process). The child must not
 * inherit host root's groups: with setgroups "deny" it could never drop them and would
 * keep gid 0's access to host files. Restores both; a thread it cannot restore is
 * unrecoverable, so abort(). */
static long clone_child(const struct sbx_plan *p, struct sbx_clone_args *ca, struct sbx_error *e)
{
    gid_t saved[256];
    int ngroups = (int)syscall(SYS_getgroups, 256, saved);
    if (ngroups < 0)
        return sbx_fail(e, "clone", "getgroups", "");
    if (syscall(SYS_setgroups, 0, NULL) < 0)
        return sbx_fail(e, "clone", "setgroups", "clear the groups the child inherits");
    int self_ns = -1;
    if (p->netns_fd >= 0) {
        self_ns = open("/proc/thread-self/ns/net", O_RDONLY | O_CLOEXEC);
        if (self_ns < 0 || setns(p->netns_fd, CLONE_NEWNET) < 0) {
            sbx_fail(e, "network", self_ns < 0 ? "open" : "setns", "join the sandbox netns");
            if (self_ns >= 0)
                close(self_ns);
            if (syscall(SYS_setgroups, ngroups, saved) < 0)
                abort();
            return -1;
        }
    }
    long pid = syscall(SYS_clone3, ca, sizeof *ca);
    if (pid == 0)
        return 0;
    int saved_errno = errno;
    if (self_ns >= 0) {
        if (setns(self_ns, CLONE_NEWNET) < 0)
            abort(); /* a thread left in the sandbox's netns would leak it to everything */
        close(self_ns);
    }
    if (syscall(SYS_setgroups, ngroups, saved) < 0)
        abort();
    errno = saved_errno;
    if (pid < 0)
        return sbx_fail(e, "clone", "clone3", "");
    return pid;
}

int sbx_spawn(const struct sbx_plan *p, struct sbx_child *out, struct sbx_error *e)
{
    int sync[2] = {-1, -1}, ctl[2] = {-1, -1}, pidfd = -1, v1[SBX_MAX_V1];
    struct sbx_msg m;
    memset(e, 0, sizeof *e);
    out->pid = out->pidfd = out->ctl_fd = -1;

    int last_cap = sbx_cap_last_cap();
    if (last_cap < 0)
        return sbx_fail(e, "capabilities", "read", "/proc/sys/kernel/cap_last_cap");
    if (open_v1_tasks(p, v1, e) < 0)
        return -1;
    if (socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, sync) < 0) {
        sbx_fail(e, "clone", "socketpair", "sync");
        goto fail_fds;
    }
    if (socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, ctl) < 0) {
        sbx_fail(e, "clone", "socketpair", "control");
        goto fail_fds;
    }

    struct sbx_clone_args ca;
    memset(&ca, 0, sizeof ca);
    ca.flags = CLONE_NEWUSER | CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWUTS | CLONE_NEWIPC |
               CLONE_NEWCGROUP | CLONE_PIDFD;
    if (p->netns_fd < 0)
        ca.flags |= CLONE_NEWNET;
    if (p->cgroup2_fd >= 0) {
        ca.flags |= SBX_CLONE_INTO_CGROUP;
        ca.cgroup = (uint64_t)p->cgroup2_fd;
    }
    ca.pidfd = (uint64_t)(uintptr_t)&pidfd;
    ca.exit_signal = SIGCHLD;

    long pid = clone_child(p, &ca, e);
    if (pid == 0) {
        close(sync[0]);
        close(ctl[0]);
        sbx_child_main(p, sync[1], ctl[1], last_cap, v1);
    }
    close_all(v1, p->n_cgroup_v1); /* the child has its copies */
    if (pid < 0)
        goto fail_socks;
    close(sync[1]);
    close(ctl[1]);
    sync[1] = ctl[1] = -1;

    /* The child exists once clone3 returns: map it right away (it waits for
     * MSG_MAPS_WRITTEN before doing anything), then collect its READY; one round trip
     * less on the hot path. */
    struct timeval tmo = {.tv_sec = SBX_SETUP_TIMEOUT_S};
    if (setsockopt(sync[0], SOL_SOCKET, SO_RCVTIMEO, &tmo, sizeof tmo) < 0) {
        sbx_fail(e, "clone", "setsockopt", "setup timeout");
        goto fail_child;
    }
    if (write_maps(p, (int)pid, e) < 0)
        goto fail_child;
    if (sbx_recv_msg(sync[0], &m) < 0 || m.kind != MSG_CHILD_READY) {
        sbx_fail(e, "clone", "recv", "child did not report ready");
        goto fail_child;
    }
    if (sbx_send_msg(sync[0], MSG_MAPS_WRITTEN, NULL) < 0) {
        sbx_fail(e, "clone", "send", "maps written");
        goto fail_child;
    }
    if (sbx_recv_msg(sync[0], &m) < 0) {
        sbx_fail(e, "setup", "recv", "child died during setup");
        goto fail_child;
    }
    if (m.kind != MSG_SETUP_DONE) {
        if (m.kind == MSG_ERROR)
            *e = m.e;
        else
            sbx_fail(e, "setup", "recv", "unexpected message");
        goto fail_child;
    }
    close(sync[0]);
    out->pid = (int)pid;
    out->pidfd = pidfd;
    out->ctl_fd = ctl[0];
    return 0;

fail_child:
    kill_and_reap((int)pid, pidfd);
    if (pidfd >= 0)
        close(pidfd);
    goto fail_socks;
fail_fds:
    close_all(v1, p->n_cgroup_v1);
fail_socks:
    for (int i = 0; i < 2; i++) {
        if (sync[i] >= 0)
            close(sync[i]);
        if (ctl[i] >= 0)
            close(ctl[i]);
    }
    return -1;
}

/* A user namespace holding only the given maps, for MOUNT_ATTR_IDMAP. A child enters it
 * and waits; we write its maps, open its ns file and let it exit. Raw clone: the child
 * only reads a pipe (no malloc in a child of a threaded process). */
int sbx_make_userns(const char *uid_map, const char *gid_map, struct sbx_error *e)
{
    int pipefd[2];
    char path[64];
    memset(e, 0, sizeof *e);
    if (pipe2(pipefd, O_CLOEXEC) < 0)
        return sbx_fail(e, "idmap", "pipe2", "");
    long pid = syscall(SYS_clone, CLONE_NEWUSER | SIGCHLD, NULL, NULL, NULL, NULL);
    if (pid == 0) {
        char c;
        close(pipefd[1]);
        while (read(pipefd[0], &c, 1) < 0 && errno == EINTR)
            ;
        _exit(0);
    }
    close(pipefd[0]);
    if (pid < 0) {
        close(pipefd[1]);
        return sbx_fail(e, "idmap", "clone", "user namespace for the idmapped mount");
    }
    int fd = -1;
    snprintf(path, sizeof path, "/proc/%ld/setgroups", pid);
    if (write_file(path, "deny", e, "idmap") == 0) {
        snprintf(path, sizeof path, "/proc/%ld/uid_map", pid);
        if (write_file(path, uid_map, e, "idmap") == 0) {
            snprintf(path, sizeof path, "/proc/%ld/gid_map", pid);
            if (write_file(path, gid_map, e, "idmap") == 0) {
                snprintf(path, sizeof path, "/proc/%ld/ns/user", pid);
                fd = open(path, O_RDONLY | O_CLOEXEC);
                if (fd < 0)
                    sbx_fail(e, "idmap", "open", path);
            }
        }
    }
    close(pipefd[1]);
    while (waitpid((pid_t)pid, NULL, 0) < 0 && errno == EINTR)
        ;
    return fd;
}

/* A detached copy of `path` (open_tree(2)), shown through userns_fd's maps when
 * userns_fd >= 0 (mount_setattr(2) MOUNT_ATTR_IDMAP). */
int sbx_idmapped_tree(const char *path, int userns_fd, int recursive, struct sbx_error *e)
{
    memset(e, 0, sizeof *e);
    int fd = (int)syscall(SYS_open_tree, AT_FDCWD, path,
                          OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC | (recursive ? AT_RECURSIVE : 0));
    if (fd < 0)
        return sbx_fail(e, "idmap", "open_tree", path);
    if (userns_fd < 0)
        return fd;
    struct mount_attr attr;
    memset(&attr, 0, sizeof attr);
    attr.attr_set = MOUNT_ATTR_IDMAP;
    attr.userns_fd = (uint64_t)userns_fd;
    if (syscall(SYS_mount_setattr, fd, "", AT_EMPTY_PATH | (recursive ? AT_RECURSIVE : 0), &attr,
                sizeof attr) < 0) {
        sbx_fail(e, "idmap", "mount_setattr", path);
        close(fd);
        return -1;
    }
    return fd;
}
