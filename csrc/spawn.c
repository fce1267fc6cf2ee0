/* The parent side of the spawn path: clone3 into new namespaces, write the id maps and
 * v1 cgroups, wait for the child to report it is confined. See docs/internals.md. */
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/mount.h>
#include <sys/prctl.h>
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
/* The child's own stack while it shares our memory (CLONE_VM), with a guard page below. */
#define SBX_CHILD_STACK (256 * 1024)

/* struct clone_args of linux/sched.h (CLONE_ARGS_SIZE_VER2); defined here because
 * <linux/sched.h> and glibc's <sched.h> clash. */
struct sbx_clone_args {
    uint64_t flags, pidfd, child_tid, parent_tid, exit_signal, stack, stack_size, tls,
        set_tid, set_tid_size, cgroup;
};

int sbx_abi_version(void) { return SBX_ABI_VERSION; }


int sbx_cap_last_cap(void)
{
    /* CAP_LAST_CAP of the running kernel, not of our headers (capabilities(7)); read once
     * (it changes only with the kernel). Threads that race here store the same value. */
    static int known = -1;
    int v = __atomic_load_n(&known, __ATOMIC_RELAXED);
    if (v >= 0)
        return v;
    char buf[16] = {0};
    int fd = open("/proc/sys/kernel/cap_last_cap", O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return -1;
    ssize_t n = read(fd, buf, sizeof buf - 1);
    close(fd);
    if (n <= 0)
        return -1;
    v = atoi(buf);
    __atomic_store_n(&known, v, __ATOMIC_RELAXED);
    return v;
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
static void close_all(const int *fds, int n)
{
    for (int i = 0; i < n; i++)
        close(fds[i]);
}

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

static void kill_and_reap(int pid, int pidfd)
{
    if (pidfd >= 0)
        sbx_pidfd_send_signal(pidfd, SIGKILL);
    else
        kill(pid, SIGKILL);
    while (waitpid(pid, NULL, __WALL) < 0 && errno == EINTR)
        ;
}

/* What the child gets: it runs child_entry() on its own stack in our memory until it
 * executes init (sbx_child_main never returns). */
struct child_args {
    const struct sbx_plan *p;
    int sync_fd, ctl_fd;          /* the child's ends */
    int parent_sync, parent_ctl;  /* ours: the child closes its copies */
    int last_cap;
    const int *v1;
};

static int child_entry(void *arg)
{
    const struct child_args *a = arg;
    close(a->parent_sync);
    close(a->parent_ctl);
    sbx_child_main(a->p, a->sync_fd, a->ctl_fd, a->last_cap, a->v1);
}

/* clone3(2) running fn(arg) in the child on the stack given in ca, like glibc's clone():
 * with CLONE_VM the child must never return into the frames of the thread that cloned
 * it. x86-64 syscall ABI: nr in rax, args in rdi/rsi, rcx and r11 clobbered; fn and arg
 * ride in callee-saved r12/r13, which the child still holds after the syscall; the kernel
 * starts the child with sp = stack + stack_size (16-byte aligned, so after the call fn
 * sees the ABI's alignment). */
static long clone3_run(struct sbx_clone_args *ca, int (*fn)(void *), void *arg)
{
    long ret;
    register int (*r12)(void *) __asm__("r12") = fn;
    register void *r13 __asm__("r13") = arg;
    __asm__ volatile("syscall\n\t"
                     "testq %%rax, %%rax\n\t"
                     "jnz 1f\n\t"
                     "xorl %%ebp, %%ebp\n\t" /* the child: no frame to unwind into */
                     "movq %%r13, %%rdi\n\t"
                     "callq *%%r12\n\t"
                     "movq %%rax, %%rdi\n\t"
                     "movl $60, %%eax\n\t" /* SYS_exit, should fn ever return */
                     "syscall\n\t"
                     "hlt\n\t"
                     "1:\n\t"
                     : "=a"(ret)
                     : "0"((long)SYS_clone3), "D"(ca), "S"(sizeof *ca), "r"(r12), "r"(r13)
                     : "rcx", "r11", "memory");
    if (ret < 0) {
        errno = (int)-ret;
        return -1;
    }
    return ret;
}

/* clone3 with the calling thread's netns switched and its supplementary groups
 * cleared (raw syscalls: per thread, not the whole process). The child must not
 * inherit host root's groups: with setgroups "deny" it could never drop them and would
 * keep gid 0's access to host files. Restores both; a thread it cannot restore is
 * unrecoverable, so abort(). With CLONE_VFORK this returns once the child has executed
 * init or died. */
static long clone_child(const struct sbx_plan *p, struct sbx_clone_args *ca,
                        struct child_args *args, struct sbx_error *e)
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
    long pid = clone3_run(ca, child_entry, args);
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

/* The cloning thread. CLONE_VM | CLONE_VFORK (posix_spawn's way): no copy of the
 * caller's page tables to make, and none to tear down at the child's exec (a copy of a
 * Python daemon cost ~2 ms each way). CLONE_VFORK parks the cloning thread until the
 * child has executed init, and the child shares its stack-less state (errno, TLS) with
 * that thread only, which is why it is a thread of its own: the calling thread must stay
 * free to write the child's uid/gid maps while the child waits for them. Every signal is
 * blocked here, so none reaches the child before it resets the dispositions it copied
 * (Python's handler would run in the child and write into our memory). */
struct clone_job {
    const struct sbx_plan *p;
    struct sbx_clone_args *ca;
    struct child_args *args;
    struct sbx_error err;
    long pid;
};

static void *clone_thread(void *arg)
{
    struct clone_job *j = arg;
    sigset_t all;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, NULL);
    j->pid = clone_child(j->p, j->ca, j->args, &j->err);
    if (j->pid < 0) /* no child: tell the waiting caller through the child's end */
        sbx_send_msg(j->args->sync_fd, MSG_ERROR, &j->err);
    return NULL;
}

int sbx_spawn(const struct sbx_plan *p, struct sbx_child *out, struct sbx_error *e)
{
    int sync[2] = {-1, -1}, ctl[2] = {-1, -1}, pidfd = -1, v1[SBX_MAX_V1];
    pid_t child_tid = 0;                 /* CLONE_PARENT_SETTID stores a pid_t */
    void *stack = MAP_FAILED;
    pthread_t cloner;
    int cloner_started = 0;
    struct sbx_msg m;
    memset(&m, 0, sizeof m);
    memset(e, 0, sizeof *e);
    out->pid = out->pidfd = out->ctl_fd = -1;

    int last_cap = sbx_cap_last_cap();
    if (last_cap < 0)
        return sbx_fail(e, "capabilities", "read", "/proc/sys/kernel/cap_last_cap");
    /* The child's uid change marks the memory it shares with us non-dumpable anyway
     * (commit_creds, kernel/cred.c: set_dumpable(mm, suid_dumpable)); do it on purpose,
     * first: the caller holds what no sandbox may see (token secrets, the audit key), so
     * no core dump of it and no ptrace without CAP_SYS_PTRACE. */
    if (prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) < 0)
        return sbx_fail(e, "clone", "prctl", "caller non-dumpable");
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
    /* A child that neither reports nor dies (a bug, or a host so loaded it cannot finish)
     * must not hold this thread forever: recv fails with EAGAIN after the timeout and the
     * child is killed like any other failed setup (socket(7) SO_RCVTIMEO). */
    struct timeval tmo = {.tv_sec = SBX_SETUP_TIMEOUT_S};
    if (setsockopt(sync[0], SOL_SOCKET, SO_RCVTIMEO, &tmo, sizeof tmo) < 0) {
        sbx_fail(e, "clone", "setsockopt", "setup timeout");
        goto fail_fds;
    }
    stack = mmap(NULL, SBX_CHILD_STACK, PROT_READ | PROT_WRITE,
                 MAP_PRIVATE | MAP_ANONYMOUS | MAP_STACK, -1, 0);
    if (stack == MAP_FAILED || mprotect(stack, 4096, PROT_NONE) < 0) {
        sbx_fail(e, "clone", "mmap", "child stack");
        goto fail_fds;
    }

    struct sbx_clone_args ca;
    memset(&ca, 0, sizeof ca);
    ca.flags = CLONE_NEWUSER | CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWUTS | CLONE_NEWIPC |
               CLONE_NEWCGROUP | CLONE_PIDFD | CLONE_PARENT_SETTID | CLONE_VM | CLONE_VFORK;
    if (p->netns_fd < 0)
        ca.flags |= CLONE_NEWNET;
    if (p->cgroup2_fd >= 0) {
        ca.flags |= SBX_CLONE_INTO_CGROUP;
        ca.cgroup = (uint64_t)p->cgroup2_fd;
    }
    ca.pidfd = (uint64_t)(uintptr_t)&pidfd;
    ca.parent_tid = (uint64_t)(uintptr_t)&child_tid; /* both written before the child runs */
    ca.exit_signal = SIGCHLD;
    ca.stack = (uint64_t)(uintptr_t)stack;
    ca.stack_size = SBX_CHILD_STACK;

    struct child_args args = {p, sync[1], ctl[1], sync[0], ctl[0], last_cap, v1};
    struct clone_job job = {.p = p, .ca = &ca, .args = &args, .pid = -1};
    int rc = pthread_create(&cloner, NULL, clone_thread, &job);
    if (rc != 0) {
        errno = rc;
        sbx_fail(e, "clone", "pthread_create", "cloning thread");
        goto fail_fds;
    }
    cloner_started = 1;

    /* READY means the child exists (and has copied our fds): ours for it can go. Until the
     * maps are written it waits; then it builds the sandbox and executes init, which
     * reports SETUP_DONE. */
    if (sbx_recv_msg(sync[0], &m) < 0 || m.kind != MSG_CHILD_READY) {
        if (m.kind == MSG_ERROR && job.pid < 0)
            *e = m.e; /* clone3 failed: the cloning thread said why */
        else
            sbx_fail(e, "clone", "recv", "child did not report ready");
        goto fail_child;
    }
    int pid = child_tid;
    close_all(v1, p->n_cgroup_v1);
    close(sync[1]);
    close(ctl[1]);
    sync[1] = ctl[1] = -1;
    if (write_maps(p, pid, e) < 0)
        goto fail_child;
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
    pthread_join(cloner, NULL); /* returned at the child's exec, before SETUP_DONE */
    munmap(stack, SBX_CHILD_STACK);
    close(sync[0]);
    out->pid = pid;
    out->pidfd = pidfd;
    out->ctl_fd = ctl[0];
    return 0;

fail_child:
    /* the child may still be before its exec: the kill ends it and frees the cloning
     * thread (joined below) */
    if (child_tid)
        kill_and_reap((int)child_tid, pidfd);
    if (pidfd >= 0)
        close(pidfd);
fail_fds:
    if (cloner_started) /* after the kill: its clone3 has returned, the child's stack is free */
        pthread_join(cloner, NULL);
    if (sync[1] >= 0) /* before READY the v1 fds are still open (closed with sync[1]) */
        close_all(v1, p->n_cgroup_v1);
    if (stack != MAP_FAILED)
        munmap(stack, SBX_CHILD_STACK);
    for (int i = 0; i < 2; i++) {
        if (sync[i] >= 0)
            close(sync[i]);
        if (ctl[i] >= 0)
            close(ctl[i]);
    }
    return -1;
}

/* A new, empty network namespace (lo down) as an fd, owned by the caller's user namespace
 * (the host's): unshare(2) CLONE_NEWNET moves only the calling thread, which opens its new
 * namespace and goes back to the one it was in. Making one costs ~1 ms of kernel time,
 * most of a clone3 with CLONE_NEWNET, so the engine makes them ahead, off the spawn path
 * (sandbox/kernel/namespaces.py, NetnsPool). A thread it cannot bring back is
 * unrecoverable (whatever it did next would happen in that namespace), so abort(). */
int sbx_make_netns(struct sbx_error *e)
{
    memset(e, 0, sizeof *e);
    int home = open("/proc/thread-self/ns/net", O_RDONLY | O_CLOEXEC);
    if (home < 0)
        return sbx_fail(e, "network", "open", "/proc/thread-self/ns/net");
    if (unshare(CLONE_NEWNET) < 0) {
        sbx_fail(e, "network", "unshare", "new network namespace");
        close(home);
        return -1;
    }
    int fd = open("/proc/thread-self/ns/net", O_RDONLY | O_CLOEXEC);
    int saved = errno;
    if (setns(home, CLONE_NEWNET) < 0)
        abort();
    close(home);
    if (fd < 0) {
        errno = saved;
        return sbx_fail(e, "network", "open", "the new network namespace");
    }
    return fd;
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
