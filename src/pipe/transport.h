/* Point-to-point transport between pipeline stages (DESIGN.md section 4): post
 * a send, post a receive, wait. One interface, two implementations: MPI on
 * host buffers (here) and NCCL on device buffers (the CUDA issue).
 *
 * Messages are told apart by tag, never by arrival order: with two stages the
 * previous and the next stage are the same peer, and activations going
 * forward and gradients coming back share that link. A tag carries the
 * message kind and the micro-batch; a receive names the exact size it
 * expects, and a message of any other size is an error naming both sizes.
 * Waits give up after the transport's timeout with a message saying which
 * transfer they were waiting for (the caller then ends the job). */
#ifndef RP_PIPE_TRANSPORT_H
#define RP_PIPE_TRANSPORT_H

#include <mpi.h>
#include <stddef.h>

#include "core/error.h"

typedef enum {
    RP_MSG_ACT = 1,       /* residual stream x of a micro-batch, forward */
    RP_MSG_ACT_VFIRST,    /* layer 0's value v_first, forward */
    RP_MSG_GRAD,          /* d x, backward */
    RP_MSG_GRAD_VFIRST,   /* d v_first, backward */
    RP_MSG_CONTROL,       /* small control messages (engine commands) */
    RP_MSG_KIND_COUNT
} rp_msg_kind;

const char *rp_msg_kind_name(rp_msg_kind k);  /* "activations", ... */

/* Micro-batch ids travel in the tag modulo this (same-tag messages from one
 * peer arrive in order, so wrapping is safe). */
#define RP_TRANSPORT_TAG_SPAN 4096

typedef struct {
    int active;
    int is_recv;
    int peer;
    rp_msg_kind kind;
    int micro_batch;
    size_t bytes;
    MPI_Request request;
} rp_transfer;

typedef struct {
    MPI_Comm comm;        /* a duplicate of the caller's, with errors returned */
    int rank, size;
    double timeout_s;     /* a wait longer than this fails; <= 0: wait forever */
    const char *what;     /* "stage 1" etc. for messages */
    char what_buf[64];
} rp_transport;

/* Duplicates comm (collective over it). timeout_s: see --comm-timeout. */
rp_status rp_transport_init(rp_transport *t, MPI_Comm comm, double timeout_s, rp_error *err);
void rp_transport_free(rp_transport *t);

/* Nonblocking; buf must stay untouched until rp_transport_wait(x) returns. */
rp_status rp_transport_post_send(rp_transport *t, const void *buf, size_t bytes, int peer,
                                 rp_msg_kind kind, int micro_batch, rp_transfer *x,
                                 rp_error *err);
rp_status rp_transport_post_recv(rp_transport *t, void *buf, size_t bytes, int peer,
                                 rp_msg_kind kind, int micro_batch, rp_transfer *x,
                                 rp_error *err);
/* Completes x (no-op when x is not active); a receive also checks the size. */
rp_status rp_transport_wait(rp_transport *t, rp_transfer *x, rp_error *err);

/* Waits for a nonblocking collective (MPI_Iallreduce, MPI_Ibcast, ...) with
 * the same watchdog as transfers: a rank that stops answering makes the
 * others fail after timeout_s (<= 0: never) instead of hanging. what names
 * the operation in the message. */
rp_status rp_comm_wait(MPI_Request *request, double timeout_s, const char *what, rp_error *err);

/* Blocking conveniences: post + wait. */
rp_status rp_transport_send(rp_transport *t, const void *buf, size_t bytes, int peer,
                            rp_msg_kind kind, int micro_batch, rp_error *err);
rp_status rp_transport_recv(rp_transport *t, void *buf, size_t bytes, int peer,
                            rp_msg_kind kind, int micro_batch, rp_error *err);

#endif
