/* NCCL for device buffers (transport.h), compiled only in builds with NCCL
 * (and, in CPU builds, against the mock NCCL of tests/nccl_mock): the stage
 * transport's links (per neighbour one two-rank non-blocking NCCL
 * communicator, a CUDA stream and a ring of header/event slots, carrying
 * both directions; transfers posted in one rp_transport_group_begin/end go
 * out in one ncclGroupStart/End) and rp_nccl_group, a communicator over all
 * ranks of an MPI communicator for collectives (the gradient all-reduce).
 *
 * Order with compute (the backend's stream): a post first runs
 * be->synchronize, so a send reads finished data and a receive overwrites
 * nothing that queued kernels still read; a wait returns once the host has
 * seen the event recorded after the transfer, so kernels queued after the
 * wait read the received data. Nothing makes the backend's stream wait on a
 * link's stream, and no link's stream waits on another. */
#include "config.h"

#include "pipe/transport_nccl.h"
#include "core/clock.h"

#include <cuda_runtime.h>
/* nccl.h declares a few functions with () instead of (void). */
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wstrict-prototypes"
#include <nccl.h>
#pragma GCC diagnostic pop
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

/* ---- polling with a watchdog ---- */

/* The host polls with a growing sleep capped at 50 us, as the MPI waits do
 * (transport.c, test_until): a wait on the critical path ends within 50 us of
 * its transfer, and the watchdog can fire instead of hanging. */
typedef struct {
    double start;
    long sleep_ns;
} poll_clock;

static void poll_start(poll_clock *c) {
    c->start = rp_now_seconds();
    c->sleep_ns = 1000;
}

static double poll_waited(const poll_clock *c) { return rp_now_seconds() - c->start; }

static void poll_sleep(poll_clock *c) {
    struct timespec ts = {0, c->sleep_ns};
    nanosleep(&ts, NULL);
    if (c->sleep_ns < 50000) c->sleep_ns *= 2;
}

/* A non-blocking communicator may answer ncclInProgress: the call is still
 * being carried out in the background (initialisation, finalisation, or the
 * enqueueing of a group), and nothing else may be issued on the communicator,
 * nor its kernels awaited, until ncclCommGetAsyncError says ncclSuccess.
 * Polls for that; *timed_out = 1 after timeout_s (> 0). */
static ncclResult_t nccl_settle(ncclComm_t comm, ncclResult_t r, double timeout_s,
                                int *timed_out) {
    poll_clock c;
    poll_start(&c);
    *timed_out = 0;
    while (r == ncclInProgress) {
        if (timeout_s > 0 && poll_waited(&c) > timeout_s) {
            *timed_out = 1;
            return r;
        }
        poll_sleep(&c);
        ncclResult_t q = ncclCommGetAsyncError(comm, &r);
        if (q != ncclSuccess) return q;
    }
    return r;
}

/* What waiting for an event ended with. */
typedef enum { EVENT_DONE, EVENT_TIMED_OUT, EVENT_NCCL_ERROR, EVENT_CUDA_ERROR } event_outcome;

/* Polls ev (recorded after NCCL calls on comm's stream) and comm's
 * asynchronous error until the event has happened, an error, or timeout_s
 * (> 0) passes (*waited = seconds). */
static event_outcome wait_event(cudaEvent_t ev, ncclComm_t comm, double timeout_s,
                                double *waited, ncclResult_t *nccl_rc, cudaError_t *cuda_rc) {
    poll_clock c;
    poll_start(&c);
    for (;;) {
        cudaError_t q = cudaEventQuery(ev);
        if (q == cudaSuccess) return EVENT_DONE;
        if (q != cudaErrorNotReady) {
            *cuda_rc = q;
            return EVENT_CUDA_ERROR;
        }
        /* "Not ready" is no error; keep it out of the backend's
         * cudaGetLastError after its next launch. */
        if (cudaPeekAtLastError() == cudaErrorNotReady) (void)cudaGetLastError();
        ncclResult_t async_rc = ncclSuccess;
        ncclResult_t q2 = ncclCommGetAsyncError(comm, &async_rc);
        if (q2 != ncclSuccess || (async_rc != ncclSuccess && async_rc != ncclInProgress)) {
            *nccl_rc = q2 != ncclSuccess ? q2 : async_rc;
            return EVENT_NCCL_ERROR;
        }
        *waited = poll_waited(&c);
        if (timeout_s > 0 && *waited > timeout_s) return EVENT_TIMED_OUT;
        poll_sleep(&c);
    }
}

/* Flushes and frees a communicator that has no operation in flight
 * (collective in effect: the state turns ncclSuccess once every rank has
 * finalised); aborts it instead after an error or timeout_s. */
static void nccl_comm_close(ncclComm_t comm, double timeout_s) {
    if (!comm) return;
    int timed_out;
    ncclResult_t r = nccl_settle(comm, ncclCommFinalize(comm), timeout_s, &timed_out);
    if (r == ncclSuccess) ncclCommDestroy(comm);
    else ncclCommAbort(comm);
}

/* A bounded wait for the peers when closing (their own teardown may lag). */
static double close_timeout(double timeout_s) { return timeout_s > 0 ? timeout_s : 60.0; }

/* ---- the stage transport's links ---- */

/* Transfers in flight at once on one link, both directions together (the
 * executor has at most four per stash slot). */
#define LINK_SLOTS 64

/* Sent ahead of every message: NCCL has no tags, so the receiver checks that
 * the message is the one it expects (kind, micro-batch, size, and the
 * sequence number of its direction on the link). */
typedef struct {
    int32_t kind, micro_batch;
    uint32_t seq, reserved;
    uint64_t bytes;
} link_header;

/* An NCCL unique id as it travels over MPI; ok = 0 when its maker could not
 * get one (the receivers then fail too instead of waiting). */
typedef struct {
    int ok;
    ncclUniqueId id;
} nccl_id_message;

/* A transfer posted inside rp_transport_group_begin/end, issued at the end. */
typedef struct {
    void *buf;
    int slot;
    int is_recv;
    rp_msg_kind kind;
    int micro_batch;
    size_t bytes;
} link_op;

typedef struct {
    int present;
    int peer;                   /* the other end's rank in t->comm */
    int nccl_peer;              /* ... in the two-rank communicator */
    ncclComm_t comm;
    cudaStream_t stream;
    link_header *host_header;   /* pinned [LINK_SLOTS]: the copies stay asynchronous */
    link_header *dev_header;    /* device [LINK_SLOTS] */
    cudaEvent_t done[LINK_SLOTS];
    uint32_t slot_seq[LINK_SLOTS];
    unsigned char busy[LINK_SLOTS];    /* posted, not yet waited for */
    unsigned char issued[LINK_SLOTS];  /* handed to NCCL (its event is recorded) */
    uint32_t seq[2];            /* messages sent [0] and received [1] on the link so far */
    uint32_t next_slot;
    link_op queued[LINK_SLOTS]; /* posted in the open group, not yet issued */
    int n_queued;
    int broken;                 /* aborted or failed: no more transfers */
    char name[64];              /* "with stage 2" */
} nccl_link;

/* One link per neighbour, one two-rank communicator and one CUDA stream each,
 * carrying both directions (activations one way, gradients the other). NCCL
 * runs the operations of one stream in order and does not promise to
 * progress two communicators at once, so the executor issues what it sends
 * and receives with a neighbour at one point of its schedule as one group
 * (Megatron's batched send/receive): both ends' groups then match, and no
 * receive posted early waits in front of a send its peer needs first. */
enum { LINK_PREV, LINK_NEXT, LINK_COUNT };

struct rp_nccl_links {
    rp_backend *be;
    int grouping;               /* inside rp_transport_group_begin/end */
    nccl_link link[LINK_COUNT];
};

static int is_act_kind(rp_msg_kind k) { return k == RP_MSG_ACT || k == RP_MSG_ACT_VFIRST; }
static int is_grad_kind(rp_msg_kind k) { return k == RP_MSG_GRAD || k == RP_MSG_GRAD_VFIRST; }

int rp_nccl_link_of(const rp_transport *t, rp_msg_kind kind, int peer, int is_recv) {
    int k = -1;
    /* Activations come from the previous stage and go to the next one;
     * gradients the other way. */
    if (is_act_kind(kind)) k = is_recv ? (peer == t->rank - 1 ? LINK_PREV : -1)
                                       : (peer == t->rank + 1 ? LINK_NEXT : -1);
    else if (is_grad_kind(kind)) k = is_recv ? (peer == t->rank + 1 ? LINK_NEXT : -1)
                                             : (peer == t->rank - 1 ? LINK_PREV : -1);
    return k >= 0 && t->nccl->link[k].present ? k : -1;
}

static void link_break(nccl_link *l) {
    if (l->broken) return;
    l->broken = 1;
    l->n_queued = 0;
    if (l->comm) ncclCommAbort(l->comm);
    l->comm = NULL;
}

static rp_status link_nccl_failed(rp_transport *t, nccl_link *l, ncclResult_t r, const char *call,
                                  rp_error *err) {
    const char *detail = l->comm ? ncclGetLastError(l->comm) : NULL;
    rp_status st = rp_error_set(err, RP_ERR_MPI, "%s: NCCL link (%s): %s failed: %s%s%s",
                                t->what, l->name, call, ncclGetErrorString(r),
                                detail && *detail ? ": " : "", detail ? detail : "");
    link_break(l);
    return st;
}

static rp_status link_cuda_failed(rp_transport *t, nccl_link *l, cudaError_t rc, const char *call,
                                  rp_error *err) {
    link_break(l);
    return rp_error_set(err, RP_ERR_MPI, "%s: NCCL link (%s): %s failed: %s", t->what, l->name,
                        call, cudaGetErrorString(rc));
}

/* Hands the link's queued transfers to NCCL: the send headers to the device,
 * then every header and payload in one ncclGroupStart/End (one kernel,
 * matched in order per direction), then the receive headers back and one
 * event per transfer. */
static rp_status link_issue(rp_transport *t, nccl_link *l, rp_error *err) {
    const int n = l->n_queued;
    if (n == 0) return RP_OK;
    l->n_queued = 0;
    cudaError_t ce;
    for (int i = 0; i < n; i++) {
        const link_op *o = &l->queued[i];
        if (!o->is_recv &&
            (ce = cudaMemcpyAsync(&l->dev_header[o->slot], &l->host_header[o->slot],
                                  sizeof(link_header), cudaMemcpyHostToDevice, l->stream)) !=
                cudaSuccess)
            return link_cuda_failed(t, l, ce, "cudaMemcpyAsync (header)", err);
    }
    ncclResult_t r = ncclGroupStart();
    for (int i = 0; i < n && r == ncclSuccess; i++) {
        const link_op *o = &l->queued[i];
        void *h = &l->dev_header[o->slot];
        r = o->is_recv ? ncclRecv(h, sizeof(link_header), ncclUint8, l->nccl_peer, l->comm,
                                  l->stream)
                       : ncclSend(h, sizeof(link_header), ncclUint8, l->nccl_peer, l->comm,
                                  l->stream);
        if (r == ncclSuccess && o->bytes > 0)
            r = o->is_recv ? ncclRecv(o->buf, o->bytes, ncclUint8, l->nccl_peer, l->comm,
                                      l->stream)
                           : ncclSend(o->buf, o->bytes, ncclUint8, l->nccl_peer, l->comm,
                                      l->stream);
    }
    ncclResult_t end = ncclGroupEnd();
    if (r == ncclSuccess || r == ncclInProgress) r = end;
    int timed_out;
    r = nccl_settle(l->comm, r, t->timeout_s, &timed_out);
    const link_op *o = &l->queued[0];
    if (timed_out) {
        link_break(l);
        return rp_error_set(err, RP_ERR_MPI, "%s: NCCL took over %.0f s (--comm-timeout) to issue "
                            "the %s of the %s of micro-batch %d %s stage %d (%d transfers in the "
                            "group)", t->what, t->timeout_s, o->is_recv ? "receive" : "send",
                            rp_msg_kind_name(o->kind), o->micro_batch,
                            o->is_recv ? "from" : "to", l->peer, n);
    }
    if (r != ncclSuccess)
        return link_nccl_failed(t, l, r, n > 1 ? "a grouped ncclSend/ncclRecv"
                                               : o->is_recv ? "ncclRecv" : "ncclSend", err);
    for (int i = 0; i < n; i++) {
        o = &l->queued[i];
        if (o->is_recv &&
            (ce = cudaMemcpyAsync(&l->host_header[o->slot], &l->dev_header[o->slot],
                                  sizeof(link_header), cudaMemcpyDeviceToHost, l->stream)) !=
                cudaSuccess)
            return link_cuda_failed(t, l, ce, "cudaMemcpyAsync (header)", err);
    }
    for (int i = 0; i < n; i++) {
        o = &l->queued[i];
        if ((ce = cudaEventRecord(l->done[o->slot], l->stream)) != cudaSuccess)
            return link_cuda_failed(t, l, ce, "cudaEventRecord", err);
        l->issued[o->slot] = 1;
    }
    return RP_OK;
}

rp_status rp_nccl_post(rp_transport *t, void *buf, rp_transfer *x, rp_error *err) {
    nccl_link *l = &t->nccl->link[x->link];
    rp_backend *be = t->nccl->be;
    if (l->broken) {
        x->active = 0;
        return rp_error_set(err, RP_ERR_MPI, "%s: the NCCL link (%s) failed earlier; cannot %s "
                            "the %s of micro-batch %d", t->what, l->name,
                            x->is_recv ? "receive" : "send", rp_msg_kind_name(x->kind),
                            x->micro_batch);
    }
    int slot = -1;
    for (int i = 0; i < LINK_SLOTS && slot < 0; i++) {
        const int k = (int)((l->next_slot + (uint32_t)i) % LINK_SLOTS);
        if (!l->busy[k]) slot = k;
    }
    if (slot < 0) {
        x->active = 0;
        return rp_error_set(err, RP_ERR_INTERNAL, "%s: more than %d transfers in flight on the "
                            "NCCL link (%s)", t->what, LINK_SLOTS, l->name);
    }
    /* A send reads finished data; a receive overwrites nothing that queued
     * kernels still read. */
    if (be) {
        be->synchronize(be);
        rp_status st = be->status(be, err);
        if (st != RP_OK) {
            x->active = 0;
            return rp_error_prefix(err, "%s: before the %s of micro-batch %d over NCCL", t->what,
                                   rp_msg_kind_name(x->kind), x->micro_batch);
        }
    }
    const uint32_t seq = l->seq[x->is_recv ? 1 : 0]++;
    if (!x->is_recv)
        l->host_header[slot] = (link_header){.kind = (int32_t)x->kind,
                                             .micro_batch = x->micro_batch, .seq = seq,
                                             .bytes = (uint64_t)x->bytes};
    l->busy[slot] = 1;
    l->issued[slot] = 0;
    l->slot_seq[slot] = seq;
    l->next_slot = (uint32_t)slot + 1;
    l->queued[l->n_queued++] = (link_op){.buf = buf, .slot = slot, .is_recv = x->is_recv,
                                         .kind = x->kind, .micro_batch = x->micro_batch,
                                         .bytes = x->bytes};
    x->slot = slot;
    if (t->nccl->grouping) return RP_OK;
    rp_status st = link_issue(t, l, err);
    if (st != RP_OK) x->active = 0;
    return st;
}

void rp_nccl_group_begin(rp_transport *t) { t->nccl->grouping = 1; }

rp_status rp_nccl_group_end(rp_transport *t, rp_error *err) {
    t->nccl->grouping = 0;
    rp_status first = RP_OK;
    /* Link by link: each link's transfers are one NCCL group on its own
     * communicator, so no kernel waits on two communicators at once. */
    for (int k = 0; k < LINK_COUNT; k++) {
        nccl_link *l = &t->nccl->link[k];
        if (!l->present || l->n_queued == 0) continue;
        rp_error e2;
        rp_status st = link_issue(t, l, first == RP_OK ? err : &e2);
        if (first == RP_OK) first = st;
    }
    return first;
}

rp_status rp_nccl_wait(rp_transport *t, rp_transfer *x, rp_error *err) {
    nccl_link *l = &t->nccl->link[x->link];
    const char *verb = x->is_recv ? "receive" : "send", *dir = x->is_recv ? "from" : "to";
    if (l->broken)
        return rp_error_set(err, RP_ERR_MPI, "%s: the NCCL link (%s) failed earlier; the %s of "
                            "micro-batch %d is lost", t->what, l->name,
                            rp_msg_kind_name(x->kind), x->micro_batch);
    if (!l->issued[x->slot]) {
        link_break(l);
        return rp_error_set(err, RP_ERR_INTERNAL, "%s: waited for the %s of the %s of "
                            "micro-batch %d %s stage %d before its group was issued "
                            "(rp_transport_group_end)", t->what, verb, rp_msg_kind_name(x->kind),
                            x->micro_batch, dir, x->peer);
    }
    double waited = 0;
    ncclResult_t nccl_rc = ncclSuccess;
    cudaError_t cuda_rc = cudaSuccess;
    switch (wait_event(l->done[x->slot], l->comm, t->timeout_s, &waited, &nccl_rc, &cuda_rc)) {
    case EVENT_DONE: break;
    case EVENT_TIMED_OUT:
        /* Its kernel may never finish: abort the communicator so that the
         * GPU is not left spinning, and end the job with the transfer. */
        link_break(l);
        return rp_error_set(err, RP_ERR_MPI,
                            "%s waited %.0f s (--comm-timeout) to %s the %s of micro-batch %d %s "
                            "stage %d over NCCL; that rank is stuck or dead", t->what, waited,
                            verb, rp_msg_kind_name(x->kind), x->micro_batch, dir, x->peer);
    case EVENT_NCCL_ERROR: {
        char call[128];
        snprintf(call, sizeof call, "the %s of the %s of micro-batch %d", verb,
                 rp_msg_kind_name(x->kind), x->micro_batch);
        return link_nccl_failed(t, l, nccl_rc, call, err);
    }
    case EVENT_CUDA_ERROR:
        return link_cuda_failed(t, l, cuda_rc, "cudaEventQuery", err);
    }
    l->busy[x->slot] = 0;
    l->issued[x->slot] = 0;
    if (x->is_recv) {
        const link_header *h = &l->host_header[x->slot];
        if (h->kind != (int32_t)x->kind || h->micro_batch != x->micro_batch ||
            h->bytes != (uint64_t)x->bytes || h->seq != l->slot_seq[x->slot]) {
            link_break(l);
            return rp_error_set(err, RP_ERR_INTERNAL,
                                "%s: NCCL delivered message %u from stage %d, the %s of "
                                "micro-batch %d (%llu bytes), where message %u, the %s of "
                                "micro-batch %d (%zu bytes), was expected: the stages issue the "
                                "transfers of a link in different orders or disagree on the "
                                "batch shape", t->what, h->seq, x->peer,
                                rp_msg_kind_name((rp_msg_kind)h->kind), h->micro_batch,
                                (unsigned long long)h->bytes, l->slot_seq[x->slot],
                                rp_msg_kind_name(x->kind), x->micro_batch, x->bytes);
        }
    }
    return RP_OK;
}

/* Sets up the link with a neighbour (the rank below makes the unique id and
 * sends it over MPI), then exchanges one empty message each way in one
 * group: NCCL connects peers lazily on their first transfer, and connecting
 * allocates device memory, which must not happen while another link's
 * kernel waits. */
static rp_status link_open(rp_transport *t, int index, int peer, rp_error *err) {
    nccl_link *l = &t->nccl->link[index];
    const int lower = t->rank < peer;
    l->peer = peer;
    l->nccl_peer = lower ? 1 : 0;
    snprintf(l->name, sizeof l->name, "with stage %d", peer);
    /* Tag 1 lies below every message tag (kind >= 1 times the span). */
    nccl_id_message msg;
    memset(&msg, 0, sizeof msg);
    ncclResult_t r = ncclSuccess;
    MPI_Request req;
    if (lower) {
        r = ncclGetUniqueId(&msg.id);
        msg.ok = r == ncclSuccess;
        MPI_Isend(&msg, (int)sizeof msg, MPI_BYTE, peer, 1, t->comm, &req);
    } else {
        MPI_Irecv(&msg, (int)sizeof msg, MPI_BYTE, peer, 1, t->comm, &req);
    }
    char what[128];
    snprintf(what, sizeof what, "the NCCL id of the link (%s)", l->name);
    rp_status st = rp_comm_wait(&req, t->timeout_s, what, err);
    if (st != RP_OK) return rp_error_prefix(err, "%s", t->what);
    if (!msg.ok)
        return rp_error_set(err, RP_ERR_MPI, "%s: NCCL link (%s): ncclGetUniqueId failed on "
                            "stage %d%s%s", t->what, l->name, lower ? t->rank : peer,
                            lower ? ": " : "", lower ? ncclGetErrorString(r) : "");
    ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
    config.blocking = 0;
    r = ncclCommInitRankConfig(&l->comm, 2, msg.id, lower ? 0 : 1, &config);
    l->present = 1;  /* from here on rp_nccl_links_free tears it down */
    int timed_out = 0;
    if (r == ncclSuccess || r == ncclInProgress)
        r = nccl_settle(l->comm, r, t->timeout_s, &timed_out);
    if (timed_out) {
        link_break(l);
        return rp_error_set(err, RP_ERR_MPI, "%s: setting up the NCCL link (%s) took over %.0f s "
                            "(--comm-timeout); that rank is stuck or dead", t->what, l->name,
                            t->timeout_s);
    }
    if (r != ncclSuccess) return link_nccl_failed(t, l, r, "ncclCommInitRankConfig", err);
    cudaError_t ce = cudaStreamCreateWithFlags(&l->stream, cudaStreamNonBlocking);
    if (ce == cudaSuccess)
        ce = cudaMallocHost((void **)&l->host_header, LINK_SLOTS * sizeof(link_header));
    if (ce == cudaSuccess)
        ce = cudaMalloc((void **)&l->dev_header, LINK_SLOTS * sizeof(link_header));
    for (int i = 0; i < LINK_SLOTS && ce == cudaSuccess; i++)
        ce = cudaEventCreateWithFlags(&l->done[i], cudaEventDisableTiming);
    if (ce != cudaSuccess)
        return link_cuda_failed(t, l, ce, "allocating the link's stream and headers", err);
    rp_transfer x[2];
    for (int i = 0; i < 2; i++)
        x[i] = (rp_transfer){.active = 1, .is_recv = i, .peer = peer, .kind = RP_MSG_CONTROL,
                             .micro_batch = 0, .bytes = 0, .staging = -1, .link = index};
    rp_nccl_group_begin(t);
    st = rp_nccl_post(t, NULL, &x[0], err);
    if (st == RP_OK) st = rp_nccl_post(t, NULL, &x[1], err);
    rp_status end = rp_nccl_group_end(t, st == RP_OK ? err : NULL);
    if (st == RP_OK) st = end;
    for (int i = 0; i < 2 && st == RP_OK; i++) st = rp_nccl_wait(t, &x[i], err);
    return st;
}

rp_status rp_transport_enable_nccl(rp_transport *t, rp_backend *be, rp_error *err) {
    if (!be || be->is_host_memory)
        return rp_error_set(err, RP_ERR_ARG, "%s: NCCL moves device memory; the %s backend's is "
                            "host memory", t->what, be ? be->name : "(no)");
    if (t->nccl) return RP_OK;
    rp_transport_use_backend(t, be);
    t->nccl = calloc(1, sizeof *t->nccl);
    if (!t->nccl) return rp_error_set(err, RP_ERR_NOMEM, "%s: NCCL links", t->what);
    t->nccl->be = be;
    /* Pair (0,1) first: every rank opens its link with the previous stage
     * before the one with the next, so the set-up is a chain that never
     * waits in a circle. */
    rp_status st = RP_OK;
    if (t->rank > 0) st = link_open(t, LINK_PREV, t->rank - 1, err);
    if (st == RP_OK && t->rank + 1 < t->size) st = link_open(t, LINK_NEXT, t->rank + 1, err);
    if (st != RP_OK) rp_nccl_links_free(t);
    return st;
}

void rp_nccl_links_free(rp_transport *t) {
    rp_nccl_links *links = t->nccl;
    if (!links) return;
    /* Finalise every link first, then wait: the peers tear their ends down
     * in their own order. */
    for (int k = 0; k < LINK_COUNT; k++) {
        nccl_link *l = &links->link[k];
        if (l->present && l->comm && !l->broken) {
            ncclResult_t r = ncclCommFinalize(l->comm);
            if (r != ncclSuccess && r != ncclInProgress) link_break(l);
        }
    }
    for (int k = 0; k < LINK_COUNT; k++) {
        nccl_link *l = &links->link[k];
        if (!l->present) continue;
        if (l->comm && !l->broken) {
            int timed_out;
            ncclResult_t r = nccl_settle(l->comm, ncclInProgress, close_timeout(t->timeout_s),
                                         &timed_out);
            if (r == ncclSuccess) ncclCommDestroy(l->comm);
            else ncclCommAbort(l->comm);
            l->comm = NULL;
        }
        for (int i = 0; i < LINK_SLOTS; i++)
            if (l->done[i]) cudaEventDestroy(l->done[i]);
        if (l->host_header) cudaFreeHost(l->host_header);
        if (l->dev_header) cudaFree(l->dev_header);
        if (l->stream) cudaStreamDestroy(l->stream);
    }
    free(links);
    t->nccl = NULL;
}

/* ---- whether to use NCCL ---- */

int rp_nccl_usable(MPI_Comm comm, const rp_backend *be, char *why, size_t why_size) {
    enum { OK = 0, HOST_MEMORY, TURNED_OFF, NO_DEVICE };
    struct {
        int reason;
        unsigned char uuid[16];
    } mine, *all;
    memset(&mine, 0, sizeof mine);
    const char *env = getenv("RWKVPIPE_NCCL");
    int device = -1;
    struct cudaDeviceProp prop;
    if (!be || be->is_host_memory) mine.reason = HOST_MEMORY;
    else if (env && strcmp(env, "0") == 0) mine.reason = TURNED_OFF;
    else if (cudaGetDevice(&device) != cudaSuccess ||
             cudaGetDeviceProperties(&prop, device) != cudaSuccess)
        mine.reason = NO_DEVICE;
    else
        memcpy(mine.uuid, prop.uuid.bytes, sizeof mine.uuid);
    int size = 1;
    MPI_Comm_size(comm, &size);
    all = malloc(sizeof mine * (size_t)size);
    if (!all) {
        /* Every rank must agree: fall back on this one's failure too. */
        mine.reason = NO_DEVICE;
        all = &mine;
        size = 1;
    } else {
        MPI_Allgather(&mine, (int)sizeof mine, MPI_BYTE, all, (int)sizeof mine, MPI_BYTE, comm);
    }
    static const char *const reasons[] = {"", "its backend uses host memory",
                                          "RWKVPIPE_NCCL=0", "it sees no CUDA device"};
    int usable = 1;
    for (int i = 0; i < size && usable; i++)
        if (all[i].reason != OK) {
            if (why && why_size) snprintf(why, why_size, "rank %d: %s", i, reasons[all[i].reason]);
            usable = 0;
        }
    for (int i = 0; i < size && usable; i++)
        for (int j = i + 1; j < size && usable; j++)
            if (!memcmp(all[i].uuid, all[j].uuid, sizeof mine.uuid)) {
                if (why && why_size)
                    snprintf(why, why_size, "ranks %d and %d share one GPU, which NCCL refuses", i,
                             j);
                usable = 0;
            }
    if (usable && why && why_size) snprintf(why, why_size, "NCCL");
    if (all != &mine) free(all);
    return usable;
}

/* ---- collectives over a group ---- */

struct rp_nccl_group {
    ncclComm_t comm;
    cudaStream_t stream;
    cudaEvent_t done;
    int rank, size;
    double timeout_s;
    int broken;
};

static rp_status group_nccl_failed(rp_nccl_group *g, ncclResult_t r, const char *what,
                                   rp_error *err) {
    const char *detail = g->comm ? ncclGetLastError(g->comm) : NULL;
    rp_status st = rp_error_set(err, RP_ERR_MPI, "rank %d of an NCCL group: %s failed: %s%s%s",
                                g->rank, what, ncclGetErrorString(r),
                                detail && *detail ? ": " : "", detail ? detail : "");
    if (!g->broken && g->comm) ncclCommAbort(g->comm);
    g->broken = 1;
    g->comm = NULL;
    return st;
}

rp_status rp_nccl_group_create(rp_nccl_group **out, MPI_Comm comm, double timeout_s,
                               rp_error *err) {
    *out = NULL;
    rp_nccl_group *g = calloc(1, sizeof *g);
    if (!g) return rp_error_set(err, RP_ERR_NOMEM, "an NCCL group");
    g->timeout_s = timeout_s;
    MPI_Comm_rank(comm, &g->rank);
    MPI_Comm_size(comm, &g->size);
    nccl_id_message msg;
    memset(&msg, 0, sizeof msg);
    ncclResult_t r = ncclSuccess;
    if (g->rank == 0) msg.ok = (r = ncclGetUniqueId(&msg.id)) == ncclSuccess;
    MPI_Request req;
    rp_status st;
    if (MPI_Ibcast(&msg, (int)sizeof msg, MPI_BYTE, 0, comm, &req) != MPI_SUCCESS)
        st = rp_error_set(err, RP_ERR_MPI, "MPI_Ibcast of an NCCL id failed");
    else
        st = rp_comm_wait(&req, timeout_s, "the NCCL id of a group", err);
    if (st == RP_OK && !msg.ok)
        st = rp_error_set(err, RP_ERR_MPI, "ncclGetUniqueId failed on rank 0%s%s",
                          g->rank == 0 ? ": " : "", g->rank == 0 ? ncclGetErrorString(r) : "");
    if (st != RP_OK) {
        free(g);
        return st;
    }
    ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
    config.blocking = 0;
    r = ncclCommInitRankConfig(&g->comm, g->size, msg.id, g->rank, &config);
    int timed_out = 0;
    if (r == ncclSuccess || r == ncclInProgress) r = nccl_settle(g->comm, r, timeout_s, &timed_out);
    if (timed_out) r = ncclInternalError;
    if (r != ncclSuccess) {
        st = group_nccl_failed(g, r, timed_out ? "ncclCommInitRankConfig (--comm-timeout)"
                                               : "ncclCommInitRankConfig", err);
        free(g);
        return st;
    }
    cudaError_t ce = cudaStreamCreateWithFlags(&g->stream, cudaStreamNonBlocking);
    if (ce == cudaSuccess) ce = cudaEventCreateWithFlags(&g->done, cudaEventDisableTiming);
    if (ce != cudaSuccess) {
        st = rp_error_set(err, RP_ERR_MPI, "an NCCL group's stream: %s", cudaGetErrorString(ce));
        rp_nccl_group_free(g);
        return st;
    }
    *out = g;
    return RP_OK;
}

void rp_nccl_group_free(rp_nccl_group *g) {
    if (!g) return;
    if (!g->broken) nccl_comm_close(g->comm, close_timeout(g->timeout_s));
    if (g->done) cudaEventDestroy(g->done);
    if (g->stream) cudaStreamDestroy(g->stream);
    free(g);
}

/* Records the group's event after what was just issued and waits for it. */
static rp_status group_finish(rp_nccl_group *g, ncclResult_t r, const char *what, rp_error *err) {
    int timed_out;
    r = nccl_settle(g->comm, r, g->timeout_s, &timed_out);
    if (timed_out) r = ncclInternalError;
    if (r != ncclSuccess) return group_nccl_failed(g, r, what, err);
    cudaError_t ce = cudaEventRecord(g->done, g->stream);
    if (ce != cudaSuccess)
        return rp_error_set(err, RP_ERR_MPI, "%s: cudaEventRecord: %s", what,
                            cudaGetErrorString(ce));
    double waited = 0;
    ncclResult_t nccl_rc = ncclSuccess;
    cudaError_t cuda_rc = cudaSuccess;
    switch (wait_event(g->done, g->comm, g->timeout_s, &waited, &nccl_rc, &cuda_rc)) {
    case EVENT_DONE: return RP_OK;
    case EVENT_TIMED_OUT:
        ncclCommAbort(g->comm);
        g->comm = NULL;
        g->broken = 1;
        return rp_error_set(err, RP_ERR_MPI, "waited %.0f s (--comm-timeout) for %s over NCCL; a "
                            "rank is stuck or dead", waited, what);
    case EVENT_NCCL_ERROR: return group_nccl_failed(g, nccl_rc, what, err);
    case EVENT_CUDA_ERROR: break;
    }
    return rp_error_set(err, RP_ERR_MPI, "%s: cudaEventQuery: %s", what,
                        cudaGetErrorString(cuda_rc));
}

rp_status rp_nccl_group_allreduce_sum(rp_nccl_group *g, float *buf, size_t n, const char *what,
                                      rp_error *err) {
    if (g->broken)
        return rp_error_set(err, RP_ERR_MPI, "%s: the NCCL group failed earlier", what);
    if (n == 0) return RP_OK;
    return group_finish(g, ncclAllReduce(buf, buf, n, ncclFloat32, ncclSum, g->comm, g->stream),
                        what, err);
}

rp_status rp_nccl_group_sendrecv(rp_nccl_group *g, const void *src, void *dst, size_t bytes,
                                 int peer, rp_error *err) {
    if (g->broken)
        return rp_error_set(err, RP_ERR_MPI, "NCCL send/receive: the group failed earlier");
    if (peer < 0 || peer >= g->size)
        return rp_error_set(err, RP_ERR_INTERNAL, "NCCL send/receive with rank %d of %d", peer,
                            g->size);
    ncclResult_t r = ncclGroupStart();
    if (r == ncclSuccess) r = ncclSend(src, bytes, ncclUint8, peer, g->comm, g->stream);
    if (r == ncclSuccess) r = ncclRecv(dst, bytes, ncclUint8, peer, g->comm, g->stream);
    ncclResult_t end = ncclGroupEnd();
    if (r == ncclSuccess || r == ncclInProgress) r = end;
    char what[64];
    snprintf(what, sizeof what, "an NCCL send/receive with rank %d", peer);
    return group_finish(g, r, what, err);
}

rp_status rp_nccl_group_exchange(rp_nccl_group *g, const float *src, const size_t *send_at,
                                 const size_t *send_n, float *dst, const size_t *recv_at,
                                 const size_t *recv_n, const char *what, rp_error *err) {
    if (g->broken)
        return rp_error_set(err, RP_ERR_MPI, "%s: the NCCL group failed earlier", what);
    /* One group: NCCL pairs each send with its peer's receive in issue
     * order, and no peer waits for a transfer the group has not issued. */
    ncclResult_t r = ncclGroupStart();
    for (int k = 0; k < g->size && r == ncclSuccess; k++) {
        if (send_n[k])
            r = ncclSend(src + send_at[k], send_n[k], ncclFloat32, k, g->comm, g->stream);
        if (r == ncclSuccess && recv_n[k])
            r = ncclRecv(dst + recv_at[k], recv_n[k], ncclFloat32, k, g->comm, g->stream);
    }
    ncclResult_t end = ncclGroupEnd();
    if (r == ncclSuccess || r == ncclInProgress) r = end;
    return group_finish(g, r, what, err);
}

rp_status rp_nccl_group_run(rp_nccl_group *g, const rp_nccl_xfer *x, int n, const char *what,
                            rp_error *err) {
    if (g->broken)
        return rp_error_set(err, RP_ERR_MPI, "%s: the NCCL group failed earlier", what);
    ncclResult_t r = ncclGroupStart();
    for (int i = 0; i < n && r == ncclSuccess; i++) {
        if (!x[i].count) continue;
        const ncclDataType_t type = x[i].bf16 ? ncclBfloat16 : ncclFloat32;
        r = x[i].recv ? ncclRecv(x[i].p, x[i].count, type, x[i].peer, g->comm, g->stream)
                      : ncclSend(x[i].p, x[i].count, type, x[i].peer, g->comm, g->stream);
    }
    ncclResult_t end = ncclGroupEnd();
    if (r == ncclSuccess || r == ncclInProgress) r = end;
    return group_finish(g, r, what, err);
}
