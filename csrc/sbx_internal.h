/* Shared between the C files of the spawn path; not part of the cffi interface. */
#ifndef SANDBOXD_INTERNAL_H
#define SANDBOXD_INTERNAL_H
#include "native.h"

/* Parent <-> child sync messages over a SOCK_SEQPACKET pair (one message each). */
enum sbx_msg_kind {
    MSG_CHILD_READY = 1,  /* child: I exist in my namespaces, write my maps */
    MSG_MAPS_WRITTEN = 2, /* parent: uid/gid maps are written (the ack) */
    MSG_SETUP_DONE = 3,   /* init (exec'd): confined, pivoted, serving the control socket */
    MSG_ERROR = 4,        /* child: failed, see .e */
};
struct sbx_msg {
    int kind;
    struct sbx_error e;
};

/* Fill *e from errno at a failing call and return -1: the one error helper of the C side.
 * Async-signal-safe (no malloc, no stdio): it also runs in the cloned child. */
int sbx_fail(struct sbx_error *e, const char *step, const char *syscall, const char *detail);
#define SBX_TRY(e, step, call, detail) \
    do { if ((call) < 0) return sbx_fail((e), (step), #call, (detail)); } while (0)

void sbx_copy(char *dst, const char *src, unsigned long size);
int sbx_send_msg(int fd, int kind, const struct sbx_error *e);
int sbx_recv_msg(int fd, struct sbx_msg *m);

/* The child after clone3: never returns. It ends by executing the init program (init.c,
 * linked as its own static executable, SBX_INIT_EXE next to the extension), which gets
 * exactly these fds and nothing else of the caller's: not its memory, not its files. */
__attribute__((noreturn)) void sbx_child_main(const struct sbx_plan *p, int sync_fd, int ctl_fd,
                                              int last_cap, const int *v1_tasks);
#define SBX_MAX_V1 8                 /* v1 hierarchies a sandbox joins (memory, pids, cpu, ...) */
#define SBX_SETUP_TIMEOUT_S 30       /* seconds either side of the spawn waits for the other */
#define SBX_INIT_EXE "sbx-init"
enum sbx_init_fds {
    SBX_FD_SYNC = 3,   /* sync socket: init sends MSG_SETUP_DONE (or MSG_ERROR) on it */
    SBX_FD_CTL = 4,    /* control socket: exec requests */
    SBX_FD_FILTER = 5, /* pipe: struct sbx_filter_hdr, then the seccomp program */
    SBX_FD_EXE = 6,    /* the init executable itself (close-on-exec) */
};
/* The seccomp program fits a pipe's default capacity (64 KiB), so the child writes it
 * whole before the exec: BPF_MAXINSNS (4096) * sizeof(struct sock_filter) (8). */
#define SBX_FILTER_MAX (4096 * 8)
struct sbx_filter_hdr {
    uint32_t len;      /* bytes of struct sock_filter[], 0 = no filter */
    uint32_t notify;   /* SECCOMP_FILTER_FLAG_NEW_LISTENER */
};
#endif
