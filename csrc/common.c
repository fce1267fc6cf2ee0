/* What the extension (spawn.c, child.c) and the exec'd init (init.c) share: the one
 * error helper of the C side and the sync messages. Async-signal-safe: no malloc, no stdio. */
#include <errno.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "sbx_internal.h"

void sbx_copy(char *dst, const char *src, unsigned long size)
{
    unsigned long i = 0;
    if (!src)
        src = "";
    for (; i + 1 < size && src[i]; i++)
        dst[i] = src[i];
    dst[i] = 0;
}

int sbx_fail(struct sbx_error *e, const char *step, const char *syscall, const char *detail)
{
    int saved = errno;
    char name[sizeof e->syscall];
    unsigned long i;
    /* "mount(...)" from the macro's #call: keep the function name only */
    sbx_copy(name, syscall, sizeof name);
    for (i = 0; name[i]; i++)
        if (name[i] == '(' || name[i] == ' ') {
            name[i] = 0;
            break;
        }
    sbx_copy(e->step, step, sizeof e->step);
    sbx_copy(e->syscall, name, sizeof e->syscall);
    sbx_copy(e->detail, detail, sizeof e->detail);
    e->err = saved ? saved : EIO;
    errno = saved;
    return -1;
}

int sbx_send_msg(int fd, int kind, const struct sbx_error *e)
{
    struct sbx_msg m;
    memset(&m, 0, sizeof m);
    m.kind = kind;
    if (e)
        m.e = *e;
    ssize_t n;
    do
        n = send(fd, &m, sizeof m, MSG_NOSIGNAL);
    while (n < 0 && errno == EINTR);
    return n == (ssize_t)sizeof m ? 0 : -1;
}

int sbx_recv_msg(int fd, struct sbx_msg *m)
{
    ssize_t n;
    do
        n = recv(fd, m, sizeof *m, 0);
    while (n < 0 && errno == EINTR);
    if (n == 0)
        errno = EPIPE; /* the other side died */
    return n == (ssize_t)sizeof *m ? 0 : -1;
}
