/* The child after clone3, in its new user/mount/pid/uts/ipc/cgroup(/net) namespaces:
 * build the filesystem, pivot, drop every privilege, then execute init.
 * It runs on its own stack in the caller's memory (CLONE_VM | CLONE_VFORK, spawn.c) until
 * that exec: it writes nothing but its stack and per-task state (fds, creds, mounts,
 * fs_struct), no malloc, no stdio, and no prctl that acts on the memory (dumpable). */
#include <errno.h>
#include <fcntl.h>
#include <linux/capability.h>
#include <linux/securebits.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "sbx_internal.h"

/* The raw set*id syscalls, not glibc's wrappers: glibc applies set*id to every thread it
 * knows of (nptl/nptl_setxid.c: it signals them and waits on a futex). This child was cloned
 * from a multithreaded daemon, so glibc still lists threads that do not exist here, and its
 * setresuid() would wait for them forever (seen: the child hung in setxid_mark_thread). The
 * child has exactly one thread, so the plain syscall is the whole job. */
static int sbx_setresgid(gid_t g) { return (int)syscall(SYS_setresgid, g, g, g); }
static int sbx_setresuid(uid_t u) { return (int)syscall(SYS_setresuid, u, u, u); }

static int setattr(const char *dst, uint64_t attr_set, int recursive, struct sbx_error *e)
{
    struct mount_attr attr;
    memset(&attr, 0, sizeof attr);
    attr.attr_set = attr_set;
    /* mount_setattr(2) only adds flags: it never clears the nosuid/nodev/noexec that a
     * less privileged mount namespace inherits locked (the EPERM trap of MS_REMOUNT). */
    SBX_TRY(e, "mounts", syscall(SYS_mount_setattr, AT_FDCWD, dst,
                                 AT_SYMLINK_NOFOLLOW | (recursive ? AT_RECURSIVE : 0), &attr,
                                 sizeof attr), dst);
    return 0;
}

/* Make an empty mount point of the same type as src (a directory or a file); one that is
 * there already (made by the parent in the generated /etc) is used as it is. No lstat
 * first: mkdir and O_CREAT | O_EXCL fail with EEXIST on what exists, before any check of
 * write access (the /etc view is the host's, not writable here). */
static int make_target(const char *dst, int is_dir, struct sbx_error *e)
{
    if (is_dir) {
        if (mkdir(dst, 0755) < 0 && errno != EEXIST)
            return sbx_fail(e, "mounts", "mkdir", dst);
        return 0;
    }
    int fd = open(dst, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC | O_NOFOLLOW, 0644);
    if (fd < 0) {
        if (errno == EEXIST)
            return 0;
        return sbx_fail(e, "mounts", "open", dst);
    }
    close(fd);
    return 0;
}

static int op_bind(const struct sbx_mount *m, struct sbx_error *e)
{
    struct stat st;
    if (lstat(m->src, &st) < 0) {
        if (errno == ENOENT && (m->opts & SBX_M_OPTIONAL))
            return 0;
        return sbx_fail(e, "mounts", "lstat", m->src);
    }
    if (S_ISLNK(st.st_mode)) {
        /* /bin -> usr/bin on merged-/usr hosts: mirror the link, never follow it */
        char target[4096];
        ssize_t n = readlink(m->src, target, sizeof target - 1);
        if (n < 0)
            return sbx_fail(e, "mounts", "readlink", m->src);
        target[n] = 0;
        SBX_TRY(e, "mounts", symlink(target, m->dst), m->dst);
        return 0;
    }
    if (make_target(m->dst, S_ISDIR(st.st_mode), e) < 0)
        return -1;
    SBX_TRY(e, "mounts", mount(m->src, m->dst, NULL, MS_BIND | MS_REC, NULL), m->dst);
    return m->attr_set ? setattr(m->dst, m->attr_set, 1, e) : 0;
}

static int op_bind_fd(const struct sbx_mount *m, struct sbx_error *e)
{
    if (make_target(m->dst, 1, e) < 0)
        return -1;
    SBX_TRY(e, "mounts", syscall(SYS_move_mount, m->fd, "", AT_FDCWD, m->dst,
                                 MOVE_MOUNT_F_EMPTY_PATH), m->dst);
    close(m->fd);
    return m->attr_set ? setattr(m->dst, m->attr_set, 1, e) : 0;
}

/* The first mask of each kind made so far (file: a bind of src, locked down; directory: an
 * empty read-only tmpfs), on the building child's stack: later masks bind it (one mount
 * each; a bind copies the flags of the mount it binds) instead of binding src and then
 * locking each down, or making a superblock per directory. */
struct masks {
    const struct sbx_mount *file, *dir;
};

static int op_mask(const struct sbx_mount *m, struct masks *done, struct sbx_error *e)
{
    struct stat st;
    if (lstat(m->dst, &st) < 0) {
        if (errno == ENOENT)
            return 0;
        return sbx_fail(e, "mounts", "lstat", m->dst);
    }
    if (S_ISDIR(st.st_mode)) {
        if (done->dir) {
            SBX_TRY(e, "mounts", mount(done->dir->dst, m->dst, NULL, MS_BIND, NULL), m->dst);
            return 0;
        }
        SBX_TRY(e, "mounts", mount("tmpfs", m->dst, "tmpfs",
                                   MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC,
                                   "size=0,mode=0555"), m->dst);
        done->dir = m;
        return 0;
    }
    if (done->file && strcmp(done->file->src, m->src) == 0) {
        SBX_TRY(e, "mounts", mount(done->file->dst, m->dst, NULL, MS_BIND, NULL), m->dst);
        return 0;
    }
    SBX_TRY(e, "mounts", mount(m->src, m->dst, NULL, MS_BIND, NULL), m->dst);
    if (setattr(m->dst, MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV |
                            MOUNT_ATTR_NOEXEC, 0, e) < 0)
        return -1;
    done->file = m;
    return 0;
}

static int op_pivot(const struct sbx_mount *m, struct sbx_error *e)
{
    /* pivot_root(".", ".") stacks the old root under the new one; detaching it leaves
     * nothing of the host's tree reachable (pivot_root(2), NOTES). */
    SBX_TRY(e, "pivot", chdir(m->dst), m->dst);
    SBX_TRY(e, "pivot", syscall(SYS_pivot_root, ".", "."), m->dst);
    SBX_TRY(e, "pivot", umount2(".", MNT_DETACH), "old root");
    SBX_TRY(e, "pivot", chdir("/"), "/");
    return 0;
}

static int do_mount(const struct sbx_mount *m, struct masks *masks, struct sbx_error *e)
{
    switch (m->kind) {
    case SBX_M_TMPFS:
        SBX_TRY(e, "mounts", mount("tmpfs", m->dst, "tmpfs", m->flags, m->data), m->dst);
        return 0;
    case SBX_M_BIND:
        return op_bind(m, e);
    case SBX_M_BIND_FD:
        return op_bind_fd(m, e);
    case SBX_M_PROC:
        SBX_TRY(e, "mounts", mount("proc", m->dst, "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL),
                m->dst);
        return 0;
    case SBX_M_DEVPTS:
        SBX_TRY(e, "mounts", mount("devpts", m->dst, "devpts", MS_NOSUID | MS_NOEXEC, m->data),
                m->dst);
        return 0;
    case SBX_M_MKDIR:
        if (mkdir(m->dst, m->mode) < 0 && errno != EEXIST)
            return sbx_fail(e, "mounts", "mkdir", m->dst);
        return 0;
    case SBX_M_SYMLINK:
        SBX_TRY(e, "mounts", symlink(m->src, m->dst), m->dst);
        return 0;
    case SBX_M_MASK:
        return op_mask(m, masks, e);
    case SBX_M_SETATTR:
        return setattr(m->dst, m->attr_set, (int)m->flags, e);
    case SBX_M_PIVOT:
        return op_pivot(m, e);
    case SBX_M_CHOWN:
        SBX_TRY(e, "mounts", lchown(m->dst, (uid_t)m->uid, (gid_t)m->gid), m->dst);
        return 0;
    }
    errno = EINVAL;
    return sbx_fail(e, "mounts", "plan", "unknown mount operation");
}

/* A fresh tmpfs attached on root_fd, made our cwd (new mount API: fsopen(2), fsmount(2),
 * move_mount(2) with fds, so no host path is walked). */
static int new_root(int root_fd, struct sbx_error *e)
{
    int fs = (int)syscall(SYS_fsopen, "tmpfs", FSOPEN_CLOEXEC);
    if (fs < 0)
        return sbx_fail(e, "mounts", "fsopen", "root tmpfs");
    if (syscall(SYS_fsconfig, fs, FSCONFIG_SET_STRING, "mode", "0755", 0) < 0 ||
        syscall(SYS_fsconfig, fs, FSCONFIG_SET_STRING, "size", "1m", 0) < 0 ||
        syscall(SYS_fsconfig, fs, FSCONFIG_CMD_CREATE, NULL, NULL, 0) < 0)
        return sbx_fail(e, "mounts", "fsconfig", "root tmpfs");
    int mnt = (int)syscall(SYS_fsmount, fs, FSMOUNT_CLOEXEC, MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV);
    if (mnt < 0)
        return sbx_fail(e, "mounts", "fsmount", "root tmpfs");
    close(fs);
    SBX_TRY(e, "mounts", syscall(SYS_move_mount, mnt, "", root_fd, "",
                                 MOVE_MOUNT_F_EMPTY_PATH | MOVE_MOUNT_T_EMPTY_PATH), "root tmpfs");
    SBX_TRY(e, "mounts", fchdir(mnt), "root tmpfs");
    close(mnt);
    close(root_fd);
    return 0;
}

static int build_filesystem(const struct sbx_plan *p, int root_fd, struct sbx_error *e)
{
    /* Nothing we mount may propagate back to the host (mount_namespaces(7)). */
    SBX_TRY(e, "mounts", mount(NULL, "/", NULL, MS_REC | MS_PRIVATE, NULL), "/");
    if (new_root(root_fd, e) < 0)
        return -1;
    struct masks masks = {NULL, NULL};
    for (int i = 0; i < p->n_mounts; i++)
        if (do_mount(&p->mounts[i], &masks, e) < 0)
            return -1;
    return 0;
}

static int set_rlimit(int res, uint64_t v, const char *name, struct sbx_error *e)
{
    struct rlimit rl = {v, v};
    SBX_TRY(e, "rlimits", setrlimit(res, &rl), name);
    return 0;
}

/* capabilities(7): empty every set. Bounding set and securebits while we still hold
 * CAP_SETPCAP (in our user namespace), then the uid change clears permitted/effective,
 * then inheritable and ambient explicitly. no_new_privs: execve never grants anything. */
static int drop_privileges(const struct sbx_plan *p, int last_cap, struct sbx_error *e)
{
    if (set_rlimit(RLIMIT_NOFILE, p->rlim_nofile, "RLIMIT_NOFILE", e) < 0 ||
        set_rlimit(RLIMIT_CORE, p->rlim_core, "RLIMIT_CORE", e) < 0 ||
        (p->rlim_fsize && set_rlimit(RLIMIT_FSIZE, p->rlim_fsize, "RLIMIT_FSIZE", e) < 0))
        return -1;
    SBX_TRY(e, "capabilities", prctl(PR_SET_SECUREBITS, SECBIT_NOROOT | SECBIT_NOROOT_LOCKED |
                                     SECBIT_NO_SETUID_FIXUP_LOCKED | SECBIT_KEEP_CAPS_LOCKED),
            "securebits");
    for (int cap = 0; cap <= last_cap; cap++)
        SBX_TRY(e, "capabilities", prctl(PR_CAPBSET_DROP, cap, 0, 0, 0), "bounding set");
    SBX_TRY(e, "capabilities", prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0),
            "ambient set");
    SBX_TRY(e, "capabilities", prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs");
    SBX_TRY(e, "identity", sbx_setresgid(p->gid), "agent gid");
    SBX_TRY(e, "identity", sbx_setresuid(p->uid), "agent uid");
    struct __user_cap_header_struct hdr = {_LINUX_CAPABILITY_VERSION_3, 0};
    struct __user_cap_data_struct data[2];
    memset(data, 0, sizeof data);
    SBX_TRY(e, "capabilities", syscall(SYS_capset, &hdr, data), "clear all sets");
    /* Not PR_SET_DUMPABLE here: it is a flag of the memory, which until the exec is the
     * caller's (CLONE_VM, spawn.c). init sets it first thing after the exec, before it
     * reports ready. Until then no process of the agent exists, and no other process on
     * the host has this sandbox's uids (uidrange.py), so nothing could attach to us. */
    return 0;
}

/* Point 0-2 at /dev/null and move keep[i] to fd 3+i (init's fixed fds, sbx_internal.h),
 * close-on-exec for now; close everything else: nothing of the caller (terminal, sockets,
 * files, mount fds not used) stays reachable from init. */
static int reset_fds(int *keep, int n, struct sbx_error *e)
{
    /* first above every target (0-2 and 3..3+n-1), so nothing below overwrites an fd
     * that is still needed (the caller may have run with 0-2 closed) */
    int high[8];
    for (int i = 0; i < n; i++) {
        high[i] = fcntl(keep[i], F_DUPFD_CLOEXEC, 3 + n);
        if (high[i] < 0)
            return sbx_fail(e, "fds", "fcntl", "move the kept fds");
    }
    int nul = open("/dev/null", O_RDWR | O_CLOEXEC);
    if (nul < 0)
        return sbx_fail(e, "fds", "open", "/dev/null");
    for (int fd = 0; fd < 3; fd++)
        if (fd != nul)
            SBX_TRY(e, "fds", dup2(nul, fd), "stdio");
    if (nul > 2)
        close(nul);
    for (int i = 0; i < n; i++) {
        SBX_TRY(e, "fds", dup3(high[i], 3 + i, O_CLOEXEC), "kept fds");
        keep[i] = 3 + i;
    }
    close_range(3 + n, ~0U, 0);
    return 0;
}

/* The seccomp program for init, in a pipe it reads once (sbx_internal.h: it fits). */
static int filter_pipe(const struct sbx_plan *p, struct sbx_error *e)
{
    int fds[2];
    struct sbx_filter_hdr h = {(uint32_t)p->seccomp_bpf_len, (uint32_t)p->seccomp_notify};
    if (p->seccomp_bpf_len < 0 || p->seccomp_bpf_len > SBX_FILTER_MAX) {
        errno = E2BIG;
        return sbx_fail(e, "seccomp", "plan", "program larger than BPF_MAXINSNS");
    }
    SBX_TRY(e, "seccomp", pipe2(fds, O_CLOEXEC), "filter pipe");
    if (write(fds[1], &h, sizeof h) != (ssize_t)sizeof h ||
        (h.len && write(fds[1], p->seccomp_bpf, h.len) != (ssize_t)h.len)) {
        sbx_fail(e, "seccomp", "write", "filter pipe");
        close(fds[0]);
        close(fds[1]);
        return -1;
    }
    close(fds[1]);
    return fds[0];
}

static int child_setup(const struct sbx_plan *p, int last_cap, int *keep, struct sbx_error *e)
{
    umask(0);
    if (p->test_fail_step == 1) {
        errno = EPERM;
        return sbx_fail(e, "test", "injected", "failure injected by a test");
    }
    prctl(PR_SET_NAME, "sandbox-init", 0, 0, 0); /* what `ps` on the host shows */
    /* Still host uid 0 (unmapped here, but the owner of the state dir): open our root's
     * mount point in our own mount namespace now, while we can walk to it. */
    int root_fd = open(p->root, O_PATH | O_DIRECTORY | O_CLOEXEC);
    if (root_fd < 0)
        return sbx_fail(e, "mounts", "open", p->root);
    /* root of our user namespace: owns the new mount ns, may build in it */
    SBX_TRY(e, "identity", sbx_setresgid(0), "root gid in the user namespace");
    SBX_TRY(e, "identity", sbx_setresuid(0), "root uid in the user namespace");
    if (p->hostname)
        SBX_TRY(e, "hostname", sethostname(p->hostname, strlen(p->hostname)), p->hostname);
    if (build_filesystem(p, root_fd, e) < 0)
        return -1;
    keep[2] = filter_pipe(p, e);
    if (keep[2] < 0)
        return -1;
    keep[3] = p->init_fd;
    if (reset_fds(keep, 4, e) < 0)
        return -1;
    if (drop_privileges(p, last_cap, e) < 0)
        return -1;
    SBX_TRY(e, "session", setsid(), "no controlling terminal");
    umask(022);
    return 0;
}

/* Become init: execveat(2) the init program from its fd (opened by the parent on the
 * host; AT_EMPTY_PATH needs no path in our new root). The exec leaves the caller's memory
 * (which we share until now) and its argv/environ, which /proc/1/cmdline and
 * /proc/1/environ would show; it also releases the caller's cloning thread (CLONE_VFORK).
 * Only returns on failure. */
static int exec_init(struct sbx_error *e)
{
    for (int fd = SBX_FD_SYNC; fd <= SBX_FD_FILTER; fd++)
        SBX_TRY(e, "init", fcntl(fd, F_SETFD, 0), "keep init's fds across exec");
    char *const argv[] = {"sandbox-init", NULL}, *const envp[] = {NULL};
    syscall(SYS_execveat, SBX_FD_EXE, "", argv, envp, AT_EMPTY_PATH);
    return sbx_fail(e, "init", "execveat", SBX_INIT_EXE);
}

/* Into each v1 cgroup through the parent's fds (spawn.c, open_v1_tasks): "0" is the
 * writing thread, our only one. */
static int join_v1_cgroups(const struct sbx_plan *p, const int *fds, struct sbx_error *e)
{
    for (int i = 0; i < p->n_cgroup_v1; i++) {
        if (write(fds[i], "0", 1) != 1)
            return sbx_fail(e, "cgroup", "write", p->cgroup_v1_tasks[i]);
        close(fds[i]);
    }
    return 0;
}

void sbx_child_main(const struct sbx_plan *p, int sync_fd, int ctl_fd, int last_cap,
                    const int *v1_tasks)
{
    struct sbx_error e;
    struct sbx_msg m;
    memset(&e, 0, sizeof e);
    /* the caller's handlers (Python's C signal handler writes to its wakeup fd) must never
     * run here: default dispositions, nothing blocked */
    for (int sig = 1; sig < NSIG; sig++)
        signal(sig, SIG_DFL);
    sigset_t none;
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, NULL);
    /* Bounded, like the parent's side: while we wait, the cloning thread waits for us
     * (CLONE_VFORK), and a tool that stops every thread of the caller (py-spy without
     * --nonblocking, gdb) would otherwise wait for that thread for ever. */
    struct timeval tmo = {.tv_sec = SBX_SETUP_TIMEOUT_S};
    if (setsockopt(sync_fd, SOL_SOCKET, SO_RCVTIMEO, &tmo, sizeof tmo) < 0)
        _exit(120);
    if (sbx_send_msg(sync_fd, MSG_CHILD_READY, NULL) < 0)
        _exit(121);
    if (sbx_recv_msg(sync_fd, &m) < 0 || m.kind != MSG_MAPS_WRITTEN)
        _exit(122); /* the parent died or gave up: nothing to report to */
    int keep[4] = {sync_fd, ctl_fd, -1, -1};
    /* limits first: nothing of ours is charged elsewhere, nothing of the agent's ever runs
     * outside them (the cgroup2 directory we were cloned into already holds us) */
    if (join_v1_cgroups(p, v1_tasks, &e) < 0 || child_setup(p, last_cap, keep, &e) < 0 ||
        exec_init(&e) < 0) {
        sbx_send_msg(keep[0], MSG_ERROR, &e);
        _exit(123);
    }
    _exit(124); /* not reached: exec_init returns only on failure */
}
