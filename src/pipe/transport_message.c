/* Variable-size messages over the stage transport (transport.h, last block):
 * a nonblocking send of a host buffer, and a probe-then-receive of the next
 * message of a kind whose size the receiver does not know (the engine's
 * packed commands, results and session states). Same tags, watchdog and
 * rp_transport_wait as the fixed-size transfers of transport.c. */
#include "config.h"

#include "pipe/transport.h"

#include <limits.h>
#include <stdlib.h>
#include <time.h>

#include "core/clock.h"

static rp_status check_message(rp_transport *t, int peer, int any_ok, rp_msg_kind kind,
                               int micro_batch, rp_error *err) {
    if (!(any_ok && peer == RP_TRANSPORT_ANY_PEER) &&
        (peer < 0 || peer >= t->size || peer == t->rank))
        return rp_error_set(err, RP_ERR_INTERNAL, "%s: message with peer %d of %d", t->what,
                            peer, t->size);
    if (kind < RP_MSG_ACT || kind >= RP_MSG_KIND_COUNT || micro_batch < 0)
        return rp_error_set(err, RP_ERR_INTERNAL, "%s: bad message kind %d / micro-batch %d",
                            t->what, (int)kind, micro_batch);
    return RP_OK;
}

static rp_status message_failed(rp_transport *t, int rc, const char *call, rp_msg_kind kind,
                                int peer, rp_error *err) {
    char text[MPI_MAX_ERROR_STRING] = "";
    int len = 0;
    MPI_Error_string(rc, text, &len);
    return rp_error_set(err, RP_ERR_MPI, "%s: the %s with stage %d failed in %s: %s", t->what,
                        rp_msg_kind_name(kind), peer, call, text);
}

rp_status rp_transport_post_send_message(rp_transport *t, const void *data, size_t bytes,
                                         int peer, rp_msg_kind kind, int micro_batch,
                                         rp_transfer *x, rp_error *err) {
    rp_status st = check_message(t, peer, 0, kind, micro_batch, err);
    if (st != RP_OK) return st;
    if (bytes > (size_t)INT_MAX)
        return rp_error_set(err, RP_ERR_ARG, "%s: a %s of %zu bytes is over MPI's 2 GiB count "
                            "limit", t->what, rp_msg_kind_name(kind), bytes);
    /* Host memory and MPI always (never staged, never NCCL): rp_transport_wait
     * then only waits for the request. */
    *x = (rp_transfer){.active = 1, .is_recv = 0, .peer = peer, .kind = kind,
                       .micro_batch = micro_batch, .bytes = bytes, .staging = -1, .link = -1};
    int rc = MPI_Isend(data, (int)bytes, MPI_BYTE, peer, rp_transport_tag(kind, micro_batch),
                       t->comm, &x->request);
    if (rc != MPI_SUCCESS) {
        x->active = 0;
        return message_failed(t, rc, "MPI_Isend", kind, peer, err);
    }
    return RP_OK;
}

static rp_status recv_message(rp_transport *t, int peer, rp_msg_kind kind, int micro_batch,
                              rp_msg_wait wait, void **data, size_t *bytes, int *from,
                              rp_error *err) {
    *data = NULL;
    *bytes = 0;
    rp_status st = check_message(t, peer, 1, kind, micro_batch, err);
    if (st != RP_OK) return st;
    const int source = peer == RP_TRANSPORT_ANY_PEER ? MPI_ANY_SOURCE : peer;
    /* The sleep between probes grows to 50 us where the wait is on the
     * critical path, to 0.5 ms for an idle stage (it then costs little). */
    const long cap_ns = wait == RP_MSG_WAIT_IDLE ? 500000 : 50000;
    const double start = rp_now_seconds();
    long sleep_ns = 1000;
    MPI_Message msg;
    MPI_Status status;
    int flag = 0;
    for (;;) {
        int rc = MPI_Improbe(source, rp_transport_tag(kind, micro_batch), t->comm, &flag, &msg,
                             &status);
        if (rc != MPI_SUCCESS) return message_failed(t, rc, "MPI_Improbe", kind, peer, err);
        if (flag || wait == RP_MSG_POLL) break;
        const double waited = rp_now_seconds() - start;
        if (wait == RP_MSG_WAIT && t->timeout_s > 0 && waited > t->timeout_s) {
            if (peer == RP_TRANSPORT_ANY_PEER)
                return rp_error_set(err, RP_ERR_MPI, "%s waited %.0f s (--comm-timeout) for a "
                                    "%s from any stage; a rank is stuck or dead", t->what,
                                    waited, rp_msg_kind_name(kind));
            return rp_error_set(err, RP_ERR_MPI, "%s waited %.0f s (--comm-timeout) for the %s "
                                "from stage %d; that rank is stuck or dead", t->what, waited,
                                rp_msg_kind_name(kind), peer);
        }
        struct timespec ts = {0, sleep_ns};
        nanosleep(&ts, NULL);
        if (sleep_ns < cap_ns) sleep_ns *= 2;
    }
    if (!flag) return RP_OK;
    int count = 0;
    MPI_Get_count(&status, MPI_BYTE, &count);
    void *buf = malloc(count > 0 ? (size_t)count : 1);
    if (!buf)
        return rp_error_set(err, RP_ERR_NOMEM, "%s: a %d-byte %s from stage %d", t->what, count,
                            rp_msg_kind_name(kind), status.MPI_SOURCE);
    int rc = MPI_Mrecv(buf, count, MPI_BYTE, &msg, MPI_STATUS_IGNORE);
    if (rc != MPI_SUCCESS) {
        free(buf);
        return message_failed(t, rc, "MPI_Mrecv", kind, status.MPI_SOURCE, err);
    }
    *data = buf;
    *bytes = (size_t)count;
    if (from) *from = status.MPI_SOURCE;
    return RP_OK;
}

/* recv_message under the guard (transport.h) when it waits with the timeout:
 * an MPI call in it that never returns ends the process. */
rp_status rp_transport_recv_message(rp_transport *t, int peer, rp_msg_kind kind, int micro_batch,
                                    rp_msg_wait wait, void **data, size_t *bytes, int *from,
                                    rp_error *err) {
    if (wait != RP_MSG_WAIT)
        return recv_message(t, peer, kind, micro_batch, wait, data, bytes, from, err);
    rp_comm_guard_arm(t->timeout_s, t, t->what, rp_msg_kind_name(kind), micro_batch,
                      peer == RP_TRANSPORT_ANY_PEER ? -1 : peer);
    rp_status st = recv_message(t, peer, kind, micro_batch, wait, data, bytes, from, err);
    rp_comm_guard_disarm();
    return st;
}
