/* init: pid 1 of the sandbox, its own small static executable (linked by setup.py from
 * this file and common.c; the child executes it once the sandbox is built, see
 * sbx_internal.h for the fds it gets). Serves exec requests on the control socket, reaps
 * every zombie, forwards SIGTERM/SIGINT/SIGHUP to running commands, reports each command's
 * exit on its report socket, exits when the control socket closes (the pid namespace
 * dies with it). No malloc and no stdio (nothing to initialise, nothing to lock), and
 * commands start with clone(CLONE_VM | CLONE_VFORK) rather than fork(): no page tables to
 * copy, init waits until the command's execve. */
#include <errno.h>
#include <fcntl.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include "sbx_internal.h"

#define MAX_CMDS 256
#define MAX_STRINGS 8192

static struct {
    pid_t pid;
    int report;
} cmds[MAX_CMDS];
static char req[SBX_EXEC_MAX + 1];
static char *strs[MAX_STRINGS + 2];

static void report(int fd, int kind, int pid, int status, int err, const char *syscall, int pass_fd)
{
    struct sbx_report r;
    memset(&r, 0, sizeof r);
    r.kind = kind;
    r.pid = pid;
    r.status = status;
    r.err = err;
    sbx_copy(r.syscall, syscall, sizeof r.syscall);
    struct iovec iov = {&r, sizeof r};
    struct msghdr mh;
    union {
        struct cmsghdr h;
        char buf[CMSG_SPACE(sizeof(int))];
    } c;
    memset(&mh, 0, sizeof mh);
    mh.msg_iov = &iov;
    mh.msg_iovlen = 1;
    if (pass_fd >= 0) {
        memset(&c, 0, sizeof c);
        mh.msg_control = c.buf;
        mh.msg_controllen = sizeof c.buf;
        struct cmsghdr *cm = CMSG_FIRSTHDR(&mh);
        cm->cmsg_level = SOL_SOCKET;
        cm->cmsg_type = SCM_RIGHTS;
        cm->cmsg_len = CMSG_LEN(sizeof(int));
        memcpy(CMSG_DATA(cm), &pass_fd, sizeof(int));
    }
    while (sendmsg(fd, &mh, MSG_NOSIGNAL) < 0 && errno == EINTR)
        ;
}

static const char *env_path(char **envp)
{
    for (; *envp; envp++)
        if (strncmp(*envp, "PATH=", 5) == 0)
            return *envp + 5;
    return "/usr/bin:/bin";
}

/* execvpe(3) without its allocations: try each PATH entry; EACCES wins over ENOENT. */
static void exec_path(char **argv, char **envp)
{
    if (strchr(argv[0], '/')) {
        execve(argv[0], argv, envp);
        return;
    }
    char buf[4096];
    const char *p = env_path(envp);
    int saw_eacces = 0;
    size_t alen = strlen(argv[0]);
    while (*p) {
        const char *end = strchr(p, ':');
        size_t dlen = end ? (size_t)(end - p) : strlen(p);
        if (dlen && dlen + alen + 2 <= sizeof buf) {
            memcpy(buf, p, dlen);
            buf[dlen] = '/';
            memcpy(buf + dlen + 1, argv[0], alen + 1);
            execve(buf, argv, envp);
            if (errno == EACCES)
                saw_eacces = 1;
            else if (errno != ENOENT && errno != ENOTDIR)
                return;
        }
        if (!end)
            break;
        p = end + 1;
    }
    errno = saw_eacces ? EACCES : ENOENT;
}

/* The command's seccomp program, read once from the child's pipe (SBX_FD_FILTER). */
static struct {
    struct sbx_filter_hdr h;
    struct sock_filter prog[SBX_FILTER_MAX / sizeof(struct sock_filter)];
} filter;

/* The seccomp slot: the very last step before execve, after no_new_privs (set in init
 * and inherited). With NEW_LISTENER the listener fd goes to the parent first, so the
 * supervisor holds it before the first notified syscall can happen. */
static int install_seccomp(int report_fd)
{
    if (filter.h.len == 0)
        return 0;
    struct sock_fprog prog = {(unsigned short)(filter.h.len / sizeof(struct sock_filter)),
                              filter.prog};
    unsigned int flags = filter.h.notify ? SECCOMP_FILTER_FLAG_NEW_LISTENER : 0;
    long fd = syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER, flags, &prog);
    if (fd < 0)
        return -1;
    if (filter.h.notify) {
        report(report_fd, SBX_R_LISTENER, (int)getpid(), 0, 0, "", (int)fd);
        close((int)fd);
    }
    return 0;
}

struct command {
    const int *fds;
    const char *cwd;
    char **argv, **envp;
};

/* Runs on its own stack in init's memory (CLONE_VM | CLONE_VFORK, like posix_spawn): no
 * page tables to copy, init waits until execve. Writes only its stack and per-task state. */
static int command_child(void *arg)
{
    const struct command *c = arg;
    const int *fds = c->fds;
    const char *cwd = c->cwd;
    char **argv = c->argv, **envp = c->envp;
    sigset_t none;
    sigemptyset(&none);
    /* Dispositions need no reset: init installs no handler and ignores no signal (it takes
     * them from a signalfd, blocked), and it started with every one at SIG_DFL (the child
     * resets them all before it executes init, child.c), so the command's are the
     * defaults too (64 rt_sigaction calls were ~25 us of every exec). Only the mask. */
    sigprocmask(SIG_SETMASK, &none, NULL);
    int rep = fds[3];
    const char *what = "setsid";
    if (setsid() < 0)
        goto fail;
    prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0);
    what = "dup2";
    for (int i = 0; i < 3; i++)
        if (dup2(fds[i], i) < 0)
            goto fail;
    rep = fcntl(rep, F_DUPFD_CLOEXEC, 3);
    if (rep < 0)
        goto fail;
    if (rep > 3)
        close_range(3, rep - 1, 0);
    close_range(rep + 1, ~0U, 0);
    what = "chdir";
    if (chdir(cwd) < 0)
        goto fail;
    what = "seccomp";
    if (install_seccomp(rep) < 0)
        goto fail;
    exec_path(argv, envp);
    report(rep, SBX_R_EXEC_FAILED, (int)getpid(), 0, errno, "execve", -1);
    _exit(errno == ENOENT ? 127 : 126);
fail:
    report(rep, SBX_R_SETUP_FAILED, (int)getpid(), 0, errno, what, -1);
    _exit(126);
}

static void close_fds(const int *fds, int n)
{
    for (int i = 0; i < n; i++)
        close(fds[i]);
}

/* header, then cwd, argv..., env... as NUL-terminated strings */
static int parse_request(size_t n, const char **cwd, char ***argv, char ***envp)
{
    struct sbx_exec_hdr h;
    if (n < sizeof h)
        return -1;
    memcpy(&h, req, sizeof h);
    if (h.magic != SBX_EXEC_MAGIC || h.argc < 1 || h.argc + h.envc > MAX_STRINGS)
        return -1;
    req[n] = 0;
    char *s = req + sizeof h, *end = req + n;
    uint32_t want = 1 + h.argc + h.envc, got = 0;
    while (got < want && s < end) {
        strs[got++] = s;
        s += strlen(s) + 1;
    }
    if (got != want)
        return -1;
    *cwd = strs[0];
    /* argv and envp are NULL terminated in place: shift env by one slot */
    for (uint32_t i = want; i > 1 + h.argc; i--)
        strs[i] = strs[i - 1];
    strs[1 + h.argc] = NULL;
    strs[want + 1] = NULL;
    *argv = &strs[1];
    *envp = &strs[2 + h.argc];
    return 0;
}

static void handle_request(int ctl)
{
    int fds[4], nfds = 0;
    union {
        struct cmsghdr h;
        char buf[CMSG_SPACE(sizeof fds)];
    } c;
    struct iovec iov = {req, SBX_EXEC_MAX};
    struct msghdr mh;
    memset(&mh, 0, sizeof mh);
    mh.msg_iov = &iov;
    mh.msg_iovlen = 1;
    mh.msg_control = c.buf;
    mh.msg_controllen = sizeof c.buf;
    ssize_t n = recvmsg(ctl, &mh, MSG_CMSG_CLOEXEC);
    if (n == 0)
        _exit(0); /* the parent closed the control socket: the sandbox ends */
    if (n < 0) {
        if (errno == EINTR || errno == EAGAIN)
            return;
        _exit(1);
    }
    for (struct cmsghdr *cm = CMSG_FIRSTHDR(&mh); cm; cm = CMSG_NXTHDR(&mh, cm))
        if (cm->cmsg_level == SOL_SOCKET && cm->cmsg_type == SCM_RIGHTS) {
            nfds = (int)((cm->cmsg_len - CMSG_LEN(0)) / sizeof(int));
            if (nfds > 4)
                nfds = 4;
            memcpy(fds, CMSG_DATA(cm), nfds * sizeof(int));
        }
    const char *cwd;
    char **argv, **envp;
    if (nfds != 4 || (mh.msg_flags & (MSG_TRUNC | MSG_CTRUNC)) ||
        parse_request((size_t)n, &cwd, &argv, &envp) < 0) {
        if (nfds == 4)
            report(fds[3], SBX_R_SETUP_FAILED, 0, 0, EINVAL, "request", -1);
        close_fds(fds, nfds);
        return;
    }
    int slot = -1;
    for (int i = 0; i < MAX_CMDS && slot < 0; i++)
        if (cmds[i].pid == 0)
            slot = i;
    static char stack[64 * 1024] __attribute__((aligned(16)));
    struct command cmd = {fds, cwd, argv, envp};
    long pid = slot < 0 ? (errno = EAGAIN, -1)
                        : clone(command_child, stack + sizeof stack, CLONE_VM | CLONE_VFORK | SIGCHLD,
                                &cmd);
    if (pid < 0) {
        report(fds[3], SBX_R_SETUP_FAILED, 0, 0, errno, "fork", -1);
        close_fds(fds, 4);
        return;
    }
    cmds[slot].pid = (pid_t)pid;
    cmds[slot].report = fds[3];
    report(fds[3], SBX_R_STARTED, (int)pid, 0, 0, "", -1);
    close_fds(fds, 3);
}

static void reap(void)
{
    int status;
    pid_t pid;
    while ((pid = waitpid(-1, &status, WNOHANG | __WALL)) > 0)
        for (int i = 0; i < MAX_CMDS; i++)
            if (cmds[i].pid == pid) {
                report(cmds[i].report, SBX_R_EXITED, pid, status, 0, "", -1);
                close(cmds[i].report);
                cmds[i].pid = 0;
                break;
            }
}

static void forward(int sig)
{
    for (int i = 0; i < MAX_CMDS; i++)
        if (cmds[i].pid > 0)
            kill(-cmds[i].pid, sig); /* the command's process group (its own session) */
}

static __attribute__((noreturn)) void init_loop(int ctl)
{
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGCHLD);
    sigaddset(&set, SIGTERM);
    sigaddset(&set, SIGINT);
    sigaddset(&set, SIGHUP);
    sigprocmask(SIG_BLOCK, &set, NULL);
    int sfd = signalfd(-1, &set, SFD_CLOEXEC);
    if (sfd < 0)
        _exit(1);
    struct pollfd pfd[2] = {{ctl, POLLIN, 0}, {sfd, POLLIN, 0}};
    for (;;) {
        if (poll(pfd, 2, -1) < 0) {
            if (errno == EINTR)
                continue;
            _exit(1);
        }
        if (pfd[1].revents & POLLIN) {
            struct signalfd_siginfo si;
            while (read(sfd, &si, sizeof si) < 0 && errno == EINTR)
                ;
            if (si.ssi_signo == SIGCHLD)
                reap();
            else
                forward((int)si.ssi_signo);
        }
        if (pfd[0].revents & (POLLIN | POLLHUP | POLLERR))
            handle_request(ctl);
    }
}

static int read_full(int fd, void *buf, size_t len)
{
    size_t got = 0;
    while (got < len) {
        ssize_t n = read(fd, (char *)buf + got, len - got);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            return -1;
        got += (size_t)n;
    }
    return 0;
}

static int start(struct sbx_error *e)
{
    /* execve made us dumpable again (our creds did not change): the agent, same uid, must
     * not ptrace us or read /proc/1/mem; nothing of the agent's runs before this */
    SBX_TRY(e, "init", prctl(PR_SET_DUMPABLE, 0, 0, 0, 0), "dumpable");
    prctl(PR_SET_NAME, "sandbox-init", 0, 0, 0); /* what `ps` on the host shows */
    if (read_full(SBX_FD_FILTER, &filter.h, sizeof filter.h) < 0 ||
        filter.h.len > sizeof filter.prog || filter.h.len % sizeof(struct sock_filter) ||
        (filter.h.len && read_full(SBX_FD_FILTER, filter.prog, filter.h.len) < 0)) {
        errno = EPROTO;
        return sbx_fail(e, "init", "read", "seccomp program");
    }
    close(SBX_FD_FILTER);
    return 0;
}

int main(void)
{
    struct sbx_error e;
    memset(&e, 0, sizeof e);
    if (start(&e) < 0) {
        sbx_send_msg(SBX_FD_SYNC, MSG_ERROR, &e);
        _exit(125);
    }
    if (sbx_send_msg(SBX_FD_SYNC, MSG_SETUP_DONE, NULL) < 0)
        _exit(124);
    close(SBX_FD_SYNC);
    init_loop(SBX_FD_CTL);
}
