/* The C side of sandboxd: the spawn hot path between clone3 and execve.
 *
 * Python (sandbox/runtime/plan.py) fills one `struct sbx_plan`; sbx_spawn() clones the
 * sandbox's first process with it, which builds the sandbox and then executes the init
 * program (init.c, its own small static executable). No Python runs in the child: it uses
 * no malloc (a raw clone3 in a threaded process may copy a held malloc lock) and no stdio.
 * Every failure is reported through one `struct sbx_error` (step, errno, syscall, detail);
 * sandbox/_native.py is the one place that turns it into SpawnError.
 */
#ifndef SANDBOXD_NATIVE_H
#define SANDBOXD_NATIVE_H
#include <stdint.h>

#define SBX_ABI_VERSION 7

struct sbx_error {
    char step[32];
    int err;
    char syscall[32];
    char detail[192];
};

/* Mount operations, executed in order by the child in its new mount namespace, with
 * paths relative to the new root (the child's cwd while it builds): once it is root of its
 * user namespace it can no longer walk host paths under root-owned 0700 dirs (host root
 * is not mapped there), so it opens plan->root first, attaches the root tmpfs on that fd
 * and works from there. Host directories come in as mount fds (SBX_M_BIND_FD). */
enum sbx_mount_kind {
    SBX_M_TMPFS = 1,   /* dst, data (tmpfs options), flags = MS_* */
    SBX_M_BIND = 2,    /* src -> dst (recursive), then attr_set (MOUNT_ATTR_*) recursively */
    SBX_M_BIND_FD = 3, /* move_mount(fd) -> dst, then attr_set */
    SBX_M_PROC = 4,    /* fresh proc for the new pid namespace at dst */
    SBX_M_DEVPTS = 5,  /* new devpts instance at dst, data */
    SBX_M_MKDIR = 6,   /* mkdir dst mode (ok if it exists) */
    SBX_M_SYMLINK = 7, /* symlink(src, dst) */
    SBX_M_MASK = 8,    /* hide dst: /dev/null over a file, empty ro tmpfs over a dir; skip if absent */
    SBX_M_SETATTR = 9, /* mount_setattr(dst, attr_set) on one mount (e.g. read-only after filling) */
    SBX_M_PIVOT = 10,  /* pivot_root to dst, detach the old root */
    SBX_M_CHOWN = 11,  /* chown dst to uid/gid (ids inside the sandbox) */
};

#define SBX_M_OPTIONAL 1   /* skip silently when src (or dst for MASK) does not exist */

struct sbx_mount {
    int kind;
    int opts;
    const char *src;
    const char *dst;
    const char *data;
    unsigned long flags;
    uint64_t attr_set;
    int fd;
    unsigned int mode;
    int uid, gid;
};

struct sbx_plan {
    /* identity: inside ids 0..range-1 map to host uid_base.. / gid_base.. */
    unsigned int uid_base, gid_base, range;
    unsigned int uid, gid;            /* the agent inside */
    const char *hostname;
    /* filesystem */
    const char *root;                 /* host dir the new root tmpfs is attached on */
    const struct sbx_mount *mounts;
    int n_mounts;
    /* limits: rlimits (RLIMIT_NOFILE, RLIMIT_CORE, RLIMIT_FSIZE); 0 fsize = unlimited */
    uint64_t rlim_nofile, rlim_core, rlim_fsize;
    /* network: -1 = new empty netns; else setns() around clone3 */
    int netns_fd;
    /* cgroups: cgroup2 dir fd for CLONE_INTO_CGROUP (-1 none); v1 `tasks` files the child
     * joins itself through (opened by the parent, see spawn.c) */
    int cgroup2_fd;
    const char *const *cgroup_v1_tasks;
    int n_cgroup_v1;
    /* seccomp: struct sock_filter[] bytes, installed last before execve in each command */
    const void *seccomp_bpf;
    int seccomp_bpf_len;              /* bytes; 0 = no filter */
    int seccomp_notify;               /* SECCOMP_FILTER_FLAG_NEW_LISTENER */
    /* init: an O_PATH fd of the init executable, run by the child once it is confined */
    int init_fd;
    int test_fail_step;               /* tests: fail at this child step number (0 = never) */
};

struct sbx_child {
    int pid;
    int pidfd;
    int ctl_fd;       /* SOCK_SEQPACKET to init's control loop */
};

/* Exec request (parent -> init), one SEQPACKET message, with SCM_RIGHTS
 * [stdin, stdout, stderr, report]:
 *   struct sbx_exec_hdr, then NUL-terminated strings: cwd, argv[0..argc), env[0..envc). */
#define SBX_EXEC_MAGIC 0x53425845u
#define SBX_EXEC_MAX 196608
struct sbx_exec_hdr {
    uint32_t magic, argc, envc, flags;
};

/* Reports (init -> parent) on a command's report socket. */
enum sbx_report_kind {
    SBX_R_STARTED = 1,   /* pid (in the sandbox's pid ns) */
    SBX_R_LISTENER = 2,  /* seccomp listener fd attached (SCM_RIGHTS) */
    SBX_R_EXEC_FAILED = 3,
    SBX_R_EXITED = 4,    /* status = wait status */
    SBX_R_SETUP_FAILED = 5, /* err, detail in syscall */
};
struct sbx_report {
    int32_t kind, pid, status, err;
    char syscall[32];
};

int sbx_abi_version(void);
int sbx_spawn(const struct sbx_plan *plan, struct sbx_child *out, struct sbx_error *err);
int sbx_make_userns(const char *uid_map, const char *gid_map, struct sbx_error *err);
int sbx_idmapped_tree(const char *path, int userns_fd, int recursive, struct sbx_error *err);
int sbx_pidfd_send_signal(int pidfd, int sig);
int sbx_cap_last_cap(void);
int sbx_make_netns(struct sbx_error *err);
#endif
