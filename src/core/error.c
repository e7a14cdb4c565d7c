/* Error context helpers (see error.h). */
#include "core/error.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

rp_status rp_error_set(rp_error *err, rp_status code, const char *fmt, ...) {
    if (err) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(err->msg, sizeof err->msg, fmt, ap);
        va_end(ap);
        err->code = code;
    }
    return code;
}

rp_status rp_error_prefix(rp_error *err, const char *fmt, ...) {
    if (!err) return RP_ERR_INTERNAL;
    char prefix[RP_ERROR_MSG_LEN / 2];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(prefix, sizeof prefix, fmt, ap);
    va_end(ap);
    /* Build "prefix: old" in a scratch buffer; the old message is cut, not
     * the prefix, when the two do not fit. */
    char joined[RP_ERROR_MSG_LEN];
    size_t n = strlen(prefix);
    memcpy(joined, prefix, n);
    joined[n++] = ':';
    joined[n++] = ' ';
    size_t old_len = strlen(err->msg);
    if (old_len > sizeof joined - 1 - n) old_len = sizeof joined - 1 - n;
    memcpy(joined + n, err->msg, old_len);
    joined[n + old_len] = '\0';
    memcpy(err->msg, joined, sizeof joined);
    return err->code;
}

void rp_error_clear(rp_error *err) {
    if (err) {
        err->code = RP_OK;
        err->msg[0] = '\0';
    }
}

const char *rp_status_name(rp_status code) {
    switch (code) {
    case RP_OK: return "ok";
    case RP_ERR_IO: return "I/O error";
    case RP_ERR_FORMAT: return "format error";
    case RP_ERR_SHAPE: return "shape error";
    case RP_ERR_ARG: return "invalid argument";
    case RP_ERR_NOMEM: return "out of memory";
    case RP_ERR_MPI: return "communication error";
    case RP_ERR_DIVERGED: return "training diverged";
    case RP_ERR_BUSY: return "busy";
    case RP_ERR_UNAVAILABLE: return "unavailable";
    case RP_ERR_INTERNAL: return "internal error";
    }
    return "unknown error";
}

void *rp_malloc(size_t bytes, const char *what, rp_error *err) {
    void *p = malloc(bytes ? bytes : 1);
    if (!p) rp_error_set(err, RP_ERR_NOMEM, "cannot allocate %zu bytes for %s", bytes, what);
    return p;
}

void *rp_calloc(size_t count, size_t size, const char *what, rp_error *err) {
    void *p = calloc(count ? count : 1, size ? size : 1);
    if (!p) rp_error_set(err, RP_ERR_NOMEM, "cannot allocate %zu x %zu bytes for %s", count, size, what);
    return p;
}
