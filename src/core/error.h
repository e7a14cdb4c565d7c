/* Status codes and the caller-owned error context used by every library call.
 * Library code never prints or exits: it returns an rp_status and fills an
 * rp_error with a message naming the object, the bad value and the fix.
 * Only src/cli prints and exits. */
#ifndef RP_CORE_ERROR_H
#define RP_CORE_ERROR_H

#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef enum {
    RP_OK = 0,
    RP_ERR_IO,       /* open/read/write/mmap failed */
    RP_ERR_FORMAT,   /* outside bytes are malformed (file, vocab, request) */
    RP_ERR_SHAPE,    /* tensor shape or model config inconsistent */
    RP_ERR_ARG,      /* bad option or argument value */
    RP_ERR_NOMEM,    /* allocation failed */
    RP_ERR_MPI,      /* communication failure */
    RP_ERR_INTERNAL, /* a bug: an invariant did not hold */
    RP_ERR_DIVERGED, /* training produced a non-finite loss/gradient (same on every rank) */
    RP_ERR_BUSY,     /* a queue or limit is full: try again later (HTTP 429) */
    RP_ERR_UNAVAILABLE /* shutting down: no new work is accepted (HTTP 503) */
} rp_status;

#define RP_ERROR_MSG_LEN 1024

typedef struct {
    rp_status code;
    char msg[RP_ERROR_MSG_LEN];
} rp_error;

/* Sets err (if non-NULL) and returns code, so callers can write
 *   return rp_error_set(err, RP_ERR_FORMAT, "%s: bad header", path); */
rp_status rp_error_set(rp_error *err, rp_status code, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

/* Prepends "prefix: " to an existing message (adds context on the way up). */
rp_status rp_error_prefix(rp_error *err, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));

void rp_error_clear(rp_error *err);
const char *rp_status_name(rp_status code);

/* Allocation helpers that fail with a message instead of returning NULL silently. */
void *rp_malloc(size_t bytes, const char *what, rp_error *err);
void *rp_calloc(size_t count, size_t size, const char *what, rp_error *err);

#ifdef __cplusplus
}
#endif

#endif
