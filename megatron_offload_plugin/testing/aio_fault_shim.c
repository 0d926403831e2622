/*
 * Fault injection for DeepSpeed's async I/O op: an LD_PRELOAD library wrapping libaio's io_submit.
 *
 * DeepSpeed's aio kernels (csrc/aio/common) prepare every request with io_prep_pread /
 * io_prep_pwrite, submit it with io_submit and reap it with io_pgetevents without ever
 * looking at the completion's result, so a transfer that moved fewer bytes than asked
 * goes unnoticed.  This library makes such transfers happen on demand, so that tests
 * can prove the layers above detect them.
 *
 * At every io_submit call it reads MOP_AIO_FAULT (getenv each time: a Python process
 * switches faults on and off through os.environ, which calls putenv; change it only
 * while no transfer is being submitted, as getenv is not safe against a concurrent
 * putenv).  Spec, fields separated by ':':
 *
 *     OP:MODE[:skip=N][:count=N][:path=SUBSTRING]
 *
 *   OP     read | write | any       which requests (IOCB_CMD_PREAD / IOCB_CMD_PWRITE) match
 *   MODE   drop                     the request's byte count is set to 0: nothing moves
 *          short                    the byte count is halved, rounded down to a multiple
 *                                   of 512 (O_DIRECT needs it; a 512-byte request becomes 0)
 *   skip   matching requests let through before the first fault (default 0)
 *   count  matching requests faulted after that (default: all)
 *   path   only requests whose file (readlink of /proc/self/fd/<fd>) contains SUBSTRING
 *          match; it cannot contain ':'
 *
 * A "request" is one iocb: DeepSpeed splits a transfer into block_size pieces (and first
 * into intra_op_parallelism per-thread parts), so skip and count count blocks, and
 * "short" halves every faulted block.  The counters belong to one spec value: they start
 * from zero whenever the value differs from the one seen at the previous call (unset and
 * set again counts as a change).  An empty value means no faults.  A bad spec prints one
 * line to stderr (once per distinct value) and faults nothing; nothing else is printed.
 *
 * If MOP_AIO_FAULT_LOG names a file, each faulted request appends one line to it,
 * "OP PATH OFFSET NBYTES" (NBYTES: the byte count asked for, before the fault), so a
 * test can count what was faulted.
 *
 * The vectored commands (IOCB_CMD_PREADV / PWRITEV) are never faulted: DeepSpeed 0.19.8
 * does not use them.  iocbs are restored after the real io_submit returns (the kernel
 * has copied them by then), so the caller never sees the change.
 *
 * io_submit is exported with libaio's symbol version (LIBAIO_0.1, the one DeepSpeed's op
 * binds to) by the version script aio_faults.py links with.  The real function is found
 * with dlvsym(RTLD_NEXT) and, because Python loads extension modules (and so libaio)
 * RTLD_LOCAL where RTLD_NEXT from a preloaded library cannot see them, in the already
 * loaded libaio.so.1 otherwise.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <linux/aio_abi.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define SPEC_ENV "MOP_AIO_FAULT"
#define LOG_ENV "MOP_AIO_FAULT_LOG"
#define SPEC_MAX 1024
#define OP_READ 1
#define OP_WRITE 2
#define LOCAL_MAX 64 /* iocbs per call restored without a heap allocation */

typedef int (*io_submit_fn)(void *ctx, long nr, struct iocb **iocbs);

struct spec {
    int valid; /* 0: fault nothing */
    int ops;   /* OP_READ | OP_WRITE */
    int shorten;
    unsigned long long skip;
    unsigned long long count;
    int has_count;
    char path[SPEC_MAX];
};

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static int last_set;               /* whether MOP_AIO_FAULT was set (non-empty) at the last call */
static char last_value[SPEC_MAX];  /* its value then */
static struct spec cur;
static unsigned long long seen;    /* matching requests so far, this spec value */
static unsigned long long faulted; /* faulted requests so far, this spec value */
static char warned[SPEC_MAX];      /* last bad value reported */
static io_submit_fn real_submit;

static int parse_count(const char *s, unsigned long long *out)
{
    if (*s < '0' || *s > '9') return -1;
    char *end = NULL;
    errno = 0;
    unsigned long long v = strtoull(s, &end, 10);
    if (errno || *end) return -1;
    *out = v;
    return 0;
}

/* Fills *sp from value; on error returns a message (sp->valid stays 0). */
static const char *parse_spec(const char *value, struct spec *sp)
{
    char buf[SPEC_MAX];
    int seen_skip = 0, seen_path = 0, field = 0;
    memset(sp, 0, sizeof(*sp));
    if (strlen(value) >= sizeof(buf)) return "spec too long";
    if (value[0] == ':' || strstr(value, "::") || value[strlen(value) - 1] == ':') return "empty field";
    strcpy(buf, value);
    char *save = NULL;
    for (char *tok = strtok_r(buf, ":", &save); tok; tok = strtok_r(NULL, ":", &save), ++field) {
        if (field == 0) {
            if (!strcmp(tok, "read")) sp->ops = OP_READ;
            else if (!strcmp(tok, "write")) sp->ops = OP_WRITE;
            else if (!strcmp(tok, "any")) sp->ops = OP_READ | OP_WRITE;
            else return "the first field must be read, write or any";
        } else if (field == 1) {
            if (!strcmp(tok, "drop")) sp->shorten = 0;
            else if (!strcmp(tok, "short")) sp->shorten = 1;
            else return "the second field must be drop or short";
        } else if (!strncmp(tok, "skip=", 5)) {
            if (seen_skip++ || parse_count(tok + 5, &sp->skip)) return "skip= needs one non-negative integer";
        } else if (!strncmp(tok, "count=", 6)) {
            if (sp->has_count++ || parse_count(tok + 6, &sp->count)) return "count= needs one non-negative integer";
        } else if (!strncmp(tok, "path=", 5)) {
            if (seen_path++ || !tok[5]) return "path= needs one non-empty substring";
            strcpy(sp->path, tok + 5);
        } else {
            return "fields after OP:MODE must be skip=N, count=N or path=SUBSTRING";
        }
    }
    if (field < 2) return "expected OP:MODE, e.g. write:drop";
    sp->valid = 1;
    return NULL;
}

/* Called with the lock held: picks up a changed MOP_AIO_FAULT, resetting the counters. */
static void refresh_spec(void)
{
    const char *value = getenv(SPEC_ENV);
    int set = value != NULL && *value;
    if (set == last_set && (!set || !strncmp(value, last_value, sizeof(last_value))))
        return;
    last_set = set;
    last_value[0] = '\0';
    seen = faulted = 0;
    memset(&cur, 0, sizeof(cur));
    if (!set) return;
    snprintf(last_value, sizeof(last_value), "%s", value);
    const char *err = strlen(value) >= sizeof(last_value) ? "spec too long" : parse_spec(value, &cur);
    if (err && strcmp(warned, last_value)) {
        fprintf(stderr, "aio_fault_shim: ignoring %s='%s' (faulting nothing): %s; "
                        "format OP:MODE[:skip=N][:count=N][:path=SUBSTRING], OP read|write|any, MODE drop|short\n",
                SPEC_ENV, last_value, err);
        snprintf(warned, sizeof(warned), "%s", last_value);
    }
}

static void fd_path(int fd, char *out, size_t size)
{
    char link[64];
    snprintf(link, sizeof(link), "/proc/self/fd/%d", fd);
    ssize_t n = readlink(link, out, size - 1);
    if (n < 0) n = 0;
    out[n] = '\0';
}

static void log_fault(const char *op, const char *path, long long offset, unsigned long long nbytes)
{
    const char *log = getenv(LOG_ENV);
    if (!log || !*log) return;
    char line[PATH_MAX + 96];
    int n = snprintf(line, sizeof(line), "%s %s %lld %llu\n", op, *path ? path : "?", offset, nbytes);
    if (n <= 0) return;
    if ((size_t)n >= sizeof(line)) n = sizeof(line) - 1;
    int fd = open(log, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0600);
    if (fd < 0) {
        fprintf(stderr, "aio_fault_shim: cannot open %s='%s': %s\n", LOG_ENV, log, strerror(errno));
        return;
    }
    if (write(fd, line, (size_t)n) != n)
        fprintf(stderr, "aio_fault_shim: cannot write to %s='%s'\n", LOG_ENV, log);
    close(fd);
}

static io_submit_fn find_real(void)
{
    io_submit_fn fn = __atomic_load_n(&real_submit, __ATOMIC_ACQUIRE);
    if (fn) return fn;
    fn = (io_submit_fn)dlvsym(RTLD_NEXT, "io_submit", "LIBAIO_0.1");
    if (!fn) fn = (io_submit_fn)dlsym(RTLD_NEXT, "io_submit");
    if (!fn) { /* libaio came in RTLD_LOCAL (a Python extension's dependency) */
        void *lib = dlopen("libaio.so.1", RTLD_LAZY | RTLD_NOLOAD);
        if (!lib) lib = dlopen("libaio.so.1", RTLD_LAZY);
        if (lib) {
            fn = (io_submit_fn)dlvsym(lib, "io_submit", "LIBAIO_0.1");
            if (!fn) fn = (io_submit_fn)dlsym(lib, "io_submit");
        }
    }
    if (fn) __atomic_store_n(&real_submit, fn, __ATOMIC_RELEASE);
    return fn;
}

__attribute__((visibility("default"))) int io_submit(void *ctx, long nr, struct iocb **iocbs)
{
    io_submit_fn real = find_real();
    if (!real) {
        fprintf(stderr, "aio_fault_shim: the real io_submit (libaio.so.1, LIBAIO_0.1) was not found\n");
        return -ENOSYS; /* libaio's convention: -errno */
    }
    int candidates = 0;
    for (long i = 0; i < nr && iocbs; ++i)
        if (iocbs[i] && (iocbs[i]->aio_lio_opcode == IOCB_CMD_PREAD || iocbs[i]->aio_lio_opcode == IOCB_CMD_PWRITE))
            candidates = 1;
    if (!candidates) return real(ctx, nr, iocbs);

    unsigned long long local[LOCAL_MAX];
    unsigned long long *orig = nr <= LOCAL_MAX ? local : malloc(sizeof(*orig) * (size_t)nr);
    if (!orig) return real(ctx, nr, iocbs); /* no memory to restore with: fault nothing */
    char path[PATH_MAX];
    int changed = 0;

    pthread_mutex_lock(&lock);
    refresh_spec();
    for (long i = 0; i < nr; ++i) {
        struct iocb *cb = iocbs[i];
        orig[i] = cb ? cb->aio_nbytes : 0;
        if (!cur.valid || !cb) continue;
        int op = cb->aio_lio_opcode == IOCB_CMD_PREAD ? OP_READ : cb->aio_lio_opcode == IOCB_CMD_PWRITE ? OP_WRITE : 0;
        if (!(op & cur.ops)) continue;
        fd_path((int)cb->aio_fildes, path, sizeof(path));
        if (cur.path[0] && !strstr(path, cur.path)) continue;
        if (++seen <= cur.skip || (cur.has_count && faulted >= cur.count)) continue;
        ++faulted;
        cb->aio_nbytes = cur.shorten ? (cb->aio_nbytes / 2) & ~511ULL : 0;
        changed = 1;
        log_fault(op == OP_READ ? "read" : "write", path, (long long)cb->aio_offset, orig[i]);
    }
    pthread_mutex_unlock(&lock);

    int ret = real(ctx, nr, iocbs);
    if (changed) {
        int saved = errno;
        for (long i = 0; i < nr; ++i)
            if (iocbs[i]) iocbs[i]->aio_nbytes = orig[i];
        errno = saved;
    }
    if (orig != local) free(orig);
    return ret;
}
