/* Collectives and gathers of the transport (transport.h): broadcast, gather,
 * all-reduce and the gather of one stage's slice to rank 0, each posted
 * nonblocking on the transport's communicator and waited with its watchdog,
 * so a rank that stops answering makes the others fail naming the operation
 * and the peer instead of hanging. Host memory only. */
#include "pipe/transport.h"

#include <limits.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

#include "core/clock.h"

/* The slice gathers' tag: below every message kind's tags (kind >= 1 times
 * RP_TRANSPORT_TAG_SPAN), so it never matches a stage-to-stage transfer. */
#define SLICE_TAG 1

/* Pieces of a large broadcast or slice: MPI counts are ints. */
#define PIECE_BYTES ((size_t)1 << 30)

/* "stage" or "rank": what the transport's ranks are called in messages (a
 * transport over the world communicator names itself "rank N"). */
static const char *peer_word(const rp_transport *t) {
    return strncmp(t->what, "rank", 4) == 0 ? "rank" : "stage";
}

static rp_status mpi_error(const rp_transport *t, int rc, const char *call, const char *what,
                           rp_error *err) {
    char text[MPI_MAX_ERROR_STRING] = "";
    int len = 0;
    MPI_Error_string(rc, text, &len);
    return rp_error_set(err, RP_ERR_MPI, "%s: %s for %s failed: %s", t->what, call, what, text);
}

/* MPI_Test until the request completes, or fails, or the transport's
 * timeout passes (the same polling as the transfers' waits: a growing sleep
 * capped at 50 us). `waiting_for` completes "waited N s for ..."; is_p2p: it
 * names the one peer that did not answer (else: a collective, any rank may
 * be the one missing). A timed-out receive is cancelled, so it cannot
 * swallow a later message. */
static rp_status poll_request(rp_transport *t, MPI_Request *req, MPI_Status *status,
                              int is_p2p, int is_recv, const char *waiting_for, rp_error *err) {
    const double start = rp_now_seconds();
    long sleep_ns = 1000;
    for (;;) {
        int done = 0;
        int rc = MPI_Test(req, &done, status);
        int cls = 0;
        if (rc != MPI_SUCCESS && MPI_Error_class(rc, &cls) == MPI_SUCCESS &&
            cls == MPI_ERR_TRUNCATE)
            return rp_error_set(err, RP_ERR_MPI, "%s: %s is larger than expected: the stages "
                                "disagree on its shape", t->what, waiting_for);
        if (rc != MPI_SUCCESS) return mpi_error(t, rc, "MPI_Test", waiting_for, err);
        if (done) return RP_OK;
        const double waited = rp_now_seconds() - start;
        if (t->timeout_s > 0 && waited > t->timeout_s) {
            if (is_recv && MPI_Cancel(req) == MPI_SUCCESS) MPI_Wait(req, MPI_STATUS_IGNORE);
            return rp_error_set(err, RP_ERR_MPI, "%s waited %.0f s (--comm-timeout) for %s; %s",
                                t->what, waited, waiting_for,
                                is_p2p ? "no reply: that rank stopped or died"
                                       : "a rank did not join: it stopped or died");
        }
        struct timespec ts = {0, sleep_ns};
        nanosleep(&ts, NULL);
        if (sleep_ns < 50000) sleep_ns *= 2;
    }
}

/* poll_request under the guard (transport.h): an MPI call in it that never
 * returns ends the process instead of hanging it. */
static rp_status wait_request(rp_transport *t, MPI_Request *req, MPI_Status *status,
                              int is_p2p, int is_recv, const char *waiting_for, rp_error *err) {
    rp_comm_guard_arm(t->timeout_s, t, t->what, waiting_for, -1, -1);
    rp_status st = poll_request(t, req, status, is_p2p, is_recv, waiting_for, err);
    rp_comm_guard_disarm();
    return st;
}

static rp_status check_root(const rp_transport *t, int root, const char *what, rp_error *err) {
    if (root < 0 || root >= t->size)
        return rp_error_set(err, RP_ERR_INTERNAL, "%s: %s names root %d of %d ranks", t->what,
                            what, root, t->size);
    return RP_OK;
}

rp_status rp_transport_bcast(rp_transport *t, void *buf, size_t bytes, int root,
                             const char *what, rp_error *err) {
    rp_status st = check_root(t, root, what, err);
    if (st != RP_OK) return st;
    char waiting_for[256];
    if (t->rank == root) {
        char others[192];
        snprintf(waiting_for, sizeof waiting_for, "%s (broadcast to the other %ss)%s", what,
                 peer_word(t), rp_transport_others_where(t, others, sizeof others));
    }
    else {
        char where[96];
        snprintf(waiting_for, sizeof waiting_for, "%s (broadcast from %s %d)%s", what,
                 peer_word(t), root, rp_transport_peer_where(t, root, where, sizeof where));
    }
    for (size_t at = 0; at < bytes || at == 0; at += PIECE_BYTES) {
        const size_t len = bytes - at < PIECE_BYTES ? bytes - at : PIECE_BYTES;
        MPI_Request req;
        int rc = MPI_Ibcast((char *)buf + at, (int)len, MPI_BYTE, root, t->comm, &req);
        if (rc != MPI_SUCCESS) return mpi_error(t, rc, "MPI_Ibcast", waiting_for, err);
        if ((st = wait_request(t, &req, MPI_STATUS_IGNORE, 0, 0, waiting_for, err)) != RP_OK)
            return st;
        if (bytes == 0) break;
    }
    return RP_OK;
}

rp_status rp_transport_gather(rp_transport *t, const void *send, void *recv, size_t bytes,
                              int root, const char *what, rp_error *err) {
    rp_status st = check_root(t, root, what, err);
    if (st != RP_OK) return st;
    if (bytes > (size_t)INT_MAX)
        return rp_error_set(err, RP_ERR_ARG, "%s: a gather of %zu bytes per rank (%s) is over "
                            "MPI's 2 GiB count limit", t->what, bytes, what);
    char waiting_for[256];
    char where[192];
    snprintf(waiting_for, sizeof waiting_for, "%s (gather to %s %d)%s", what, peer_word(t), root,
             t->rank == root ? rp_transport_others_where(t, where, sizeof where)
                             : rp_transport_peer_where(t, root, where, sizeof where));
    MPI_Request req;
    int rc = MPI_Igather(send, (int)bytes, MPI_BYTE, recv, (int)bytes, MPI_BYTE, root, t->comm,
                         &req);
    if (rc != MPI_SUCCESS) return mpi_error(t, rc, "MPI_Igather", waiting_for, err);
    return wait_request(t, &req, MPI_STATUS_IGNORE, 0, 0, waiting_for, err);
}

static rp_status allreduce(rp_transport *t, void *v, int n, MPI_Datatype type, rp_reduce_op op,
                           const char *what, rp_error *err) {
    char waiting_for[256], others[192];
    snprintf(waiting_for, sizeof waiting_for, "%s (all-reduce over %d %ss)%s", what, t->size,
             peer_word(t), rp_transport_others_where(t, others, sizeof others));
    MPI_Request req;
    int rc = MPI_Iallreduce(MPI_IN_PLACE, v, n, type, op == RP_REDUCE_MAX ? MPI_MAX : MPI_SUM,
                            t->comm, &req);
    if (rc != MPI_SUCCESS) return mpi_error(t, rc, "MPI_Iallreduce", waiting_for, err);
    return wait_request(t, &req, MPI_STATUS_IGNORE, 0, 0, waiting_for, err);
}

rp_status rp_transport_allreduce_int(rp_transport *t, int *v, int n, rp_reduce_op op,
                                     const char *what, rp_error *err) {
    return allreduce(t, v, n, MPI_INT, op, what, err);
}

rp_status rp_transport_allreduce_double(rp_transport *t, double *v, int n, rp_reduce_op op,
                                        const char *what, rp_error *err) {
    return allreduce(t, v, n, MPI_DOUBLE, op, what, err);
}

rp_status rp_transport_gather_slice(rp_transport *t, int from, void *dst, const void *src,
                                    size_t bytes, const char *what, rp_error *err) {
    if (from < 0 || from >= t->size)
        return rp_error_set(err, RP_ERR_INTERNAL, "%s: %s from %s %d of %d", t->what, what,
                            peer_word(t), from, t->size);
    if (from == 0) {
        if (t->rank == 0 && dst != src && bytes) memmove(dst, src, bytes);
        return RP_OK;
    }
    if (t->rank != 0 && t->rank != from) return RP_OK;
    const int is_recv = t->rank == 0;
    char waiting_for[256];
    if (is_recv)
        snprintf(waiting_for, sizeof waiting_for, "%s %d's %s", peer_word(t), from, what);
    else
        snprintf(waiting_for, sizeof waiting_for, "%s 0 to take its %s", peer_word(t), what);
    for (size_t at = 0; at < bytes || at == 0; at += PIECE_BYTES) {
        const size_t len = bytes - at < PIECE_BYTES ? bytes - at : PIECE_BYTES;
        MPI_Request req;
        MPI_Status status;
        int rc = is_recv ? MPI_Irecv((char *)dst + at, (int)len, MPI_BYTE, from, SLICE_TAG,
                                     t->comm, &req)
                         : MPI_Isend((const char *)src + at, (int)len, MPI_BYTE, 0, SLICE_TAG,
                                     t->comm, &req);
        if (rc != MPI_SUCCESS)
            return mpi_error(t, rc, is_recv ? "MPI_Irecv" : "MPI_Isend", waiting_for, err);
        rp_status st = wait_request(t, &req, is_recv ? &status : MPI_STATUS_IGNORE, 1, is_recv,
                                    waiting_for, err);
        if (st != RP_OK) return st;
        if (is_recv) {
            int count = 0;
            MPI_Get_count(&status, MPI_BYTE, &count);
            if ((size_t)count != len)
                return rp_error_set(err, RP_ERR_MPI, "%s: %s holds %d bytes, expected %zu: the "
                                    "stages disagree on its shape", t->what, waiting_for, count,
                                    len);
        }
        if (bytes == 0) break;
    }
    return RP_OK;
}
