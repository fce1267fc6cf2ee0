/* Shared between the C files of the spawn path; not part of the cffi interface. */
#ifndef SANDBOXD_INTERNAL_H
#define SANDBOXD_INTERNAL_H
#include "native.h"

/* Parent <-> child sync messages over a SOCK_SEQPACKET pair (one message each). */
enum sbx_msg_kind {
    MSG_CHILD_READY = 1,  /* child: I exist in my namespaces, write my maps */
    MSG_MAPS_WRITTEN = 2, /* parent: uid/gid maps and v1 cgroups are written (the ack) */
    MSG_SETUP_DONE = 3,   /* child: confined, pivoted; init serves the control socket */
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

/* The child after clone3: never returns. */
__attribute__((noreturn)) void sbx_child_main(const struct sbx_plan *p, int sync_fd, int ctl_fd,
                                              int last_cap);
/* init's control loop (pid 1 of the sandbox): never returns. */
__attribute__((noreturn)) void sbx_init_loop(const struct sbx_plan *p, int ctl_fd);
#endif
