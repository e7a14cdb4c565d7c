/* Point-to-point transport between pipeline stages (docs/parallelism.md): post
 * a send, post a receive, wait. One interface, two implementations: MPI
 * (here, transport.c) and NCCL on device buffers (transport_nccl.c, built
 * --with-nccl).
 *
 * Messages are told apart by tag, never by arrival order: with two stages the
 * previous and the next stage are the same peer, and activations going
 * forward and gradients coming back share that link. A tag carries the
 * message kind and the micro-batch; a receive names the exact size it
 * expects, and a message of any other size is an error naming both sizes.
 * Waits give up after the transport's timeout with a message saying which
 * transfer they were waiting for (the caller then ends the job).
 *
 * Buffers are host memory until rp_transport_use_backend names a backend
 * whose memory is not host memory (CUDA): then every buffer is backend
 * memory, and MPI moves it through host staging buffers of the transport
 * (the fallback that also lets several ranks share one GPU), or NCCL moves
 * it from GPU to GPU once rp_transport_enable_nccl has set up the links. */
#ifndef RP_PIPE_TRANSPORT_H
#define RP_PIPE_TRANSPORT_H

#include <mpi.h>
#include <stddef.h>

#include "backend.h"
#include "core/error.h"

typedef enum {
    RP_MSG_ACT = 1,       /* residual stream x of a micro-batch, forward */
    RP_MSG_ACT_VFIRST,    /* layer 0's value v_first, forward */
    RP_MSG_GRAD,          /* d x, backward */
    RP_MSG_GRAD_VFIRST,   /* d v_first, backward */
    RP_MSG_CONTROL,       /* small control messages (engine commands) */
    RP_MSG_RESULT,        /* engine results, last stage -> rank 0 */
    RP_MSG_STATE,         /* a stage's part of a session state */
    RP_MSG_KIND_COUNT
} rp_msg_kind;

const char *rp_msg_kind_name(rp_msg_kind k);  /* "activations", ... */

/* Micro-batch ids travel in the tag modulo this (same-tag messages from one
 * peer arrive in order, so wrapping is safe). */
#define RP_TRANSPORT_TAG_SPAN 4096
/* The MPI tag of a message kind and micro-batch (every transfer's). */
int rp_transport_tag(rp_msg_kind kind, int micro_batch);

typedef struct {
    int active;
    int is_recv;
    int peer;
    rp_msg_kind kind;
    int micro_batch;
    size_t bytes;
    MPI_Request request;
    void *device_buf;     /* a staged receive: the backend buffer the data goes to */
    int staging;          /* index of its staging buffer in the transport, -1: none */
    int link, slot;       /* NCCL link and slot (transport_nccl.c), link -1: MPI */
} rp_transfer;

/* A host buffer that device transfers over MPI go through (reused). */
typedef struct {
    void *data;
    size_t bytes;
    int busy;
} rp_staging_buffer;

typedef struct rp_nccl_links rp_nccl_links;  /* transport_nccl.c */

/* Where a rank of the transport runs: errors name the node to look at. */
typedef struct {
    int world_rank;
    char host[64];
} rp_transport_peer;

typedef struct {
    MPI_Comm comm;        /* a duplicate of the caller's, with errors returned */
    int rank, size;
    double timeout_s;     /* a wait longer than this fails; <= 0: wait forever */
    const char *what;     /* "stage 1" etc. for messages */
    char what_buf[64];
    rp_backend *be;       /* non-NULL: buffers are this backend's (device) memory */
    rp_staging_buffer *staging;
    int n_staging;
    rp_nccl_links *nccl;  /* NULL: everything goes over MPI */
    int nccl_paused;      /* 1: the NCCL links are idle and MPI carries everything */
    rp_transport_peer *peers;  /* per rank of comm (NULL: unknown) */
} rp_transport;

/* " (rank R on HOST)": the world rank and node of the transport's rank
 * `peer`, for messages; "" when unknown. Returns buf. */
const char *rp_transport_peer_where(const rp_transport *t, int peer, char *buf, size_t size);

/* " (the other stages: stage S (rank R on HOST), ...)" for a collective that
 * any of them may have left hanging; "" when t is NULL or unknown. */
const char *rp_transport_others_where(const rp_transport *t, char *buf, size_t size);

/* Duplicates comm (collective over it) and learns every rank's node.
 * timeout_s: see --comm-timeout. */
rp_status rp_transport_init(rp_transport *t, MPI_Comm comm, double timeout_s, rp_error *err);
/* Also frees the staging buffers and the NCCL links. No transfer may be
 * active. */
void rp_transport_free(rp_transport *t);

/* From now on buffers are be's memory when be is not host memory (be NULL
 * or a host-memory backend: host buffers, the default). Over MPI a send then
 * runs be->synchronize and copies the buffer to a staging buffer before
 * MPI_Isend, so the caller's kernels that wrote it must be queued already;
 * a receive lands in a staging buffer that rp_transport_wait copies into
 * the device buffer (stream-ordered with the backend's later kernels).
 * Call it with no transfer active. */
void rp_transport_use_backend(rp_transport *t, rp_backend *be);

/* NCCL links to the neighbouring stages (collective over t's communicator;
 * rank i of the communicator is stage i). Activations (RP_MSG_ACT*) sent to
 * rank + 1 and gradients (RP_MSG_GRAD*) sent to rank - 1 then go GPU to GPU,
 * one two-rank communicator and CUDA stream per neighbour carrying both
 * directions; every other transfer stays on MPI. NCCL has no tags: both ends
 * must issue the messages of one direction of a link in the same order (each
 * message carries a header with its kind, micro-batch, size and sequence
 * number that the receiver checks). NCCL runs a link's transfers in the
 * order they were issued and does not promise to progress two links at once,
 * so a receive issued on its own ahead of a send its peer is waiting for can
 * hang both: issue what is exchanged with a neighbour at one point of the
 * schedule as one group (rp_transport_group_begin/end), as the executor does.
 * Also calls rp_transport_use_backend(t, be). RP_ERR_ARG in builds without
 * NCCL. Decide with rp_nccl_usable first: NCCL cannot put two ranks of one
 * communicator on the same GPU. */
rp_status rp_transport_enable_nccl(rp_transport *t, rp_backend *be, rp_error *err);
/* paused = 1: device transfers go over MPI (staged) until resumed. Both ends
 * of every link must switch at the same point of their message sequence,
 * with no transfer active (the executor does it between steps). */
void rp_transport_pause_nccl(rp_transport *t, int paused);
/* 1 when NCCL links are set up and not paused. */
int rp_transport_nccl_active(const rp_transport *t);

/* Collective over comm: 1 when NCCL should carry transfers between its ranks
 * (the build has NCCL, be's memory is device memory, no two ranks of comm
 * share a GPU, and RWKVPIPE_NCCL is not 0 on any rank); else 0, with the
 * reason in why (may be NULL). Every rank gets the same answer. */
int rp_nccl_usable(MPI_Comm comm, const rp_backend *be, char *why, size_t why_size);

/* An NCCL communicator over all ranks of an MPI communicator with its own
 * CUDA stream, for collectives on device memory (the data-parallel gradient
 * all-reduce). Waits have the transport's watchdog: after timeout_s (> 0)
 * the communicator is aborted and the call fails naming the operation. */
typedef struct rp_nccl_group rp_nccl_group;

/* Collective over comm (rank 0 makes the id, MPI_Bcast hands it out), on the
 * current CUDA device. RP_ERR_ARG in builds without NCCL. */
rp_status rp_nccl_group_create(rp_nccl_group **g, MPI_Comm comm, double timeout_s,
                               rp_error *err);
void rp_nccl_group_free(rp_nccl_group *g);
/* buf [n] (device memory) = its sum over the group, in place. The caller
 * synchronizes the stream that wrote buf first; when this returns, buf
 * holds the sum. what names the operation in messages. */
rp_status rp_nccl_group_allreduce_sum(rp_nccl_group *g, float *buf, size_t n, const char *what,
                                      rp_error *err);
/* Sends src [bytes] to peer and receives dst [bytes] from peer in one NCCL
 * group (peer may be this rank: a one-rank group then moves the data through
 * NCCL's self path), then waits. Device memory. */
rp_status rp_nccl_group_sendrecv(rp_nccl_group *g, const void *src, void *dst, size_t bytes,
                                 int peer, rp_error *err);
/* ZeRO-1's reduce-scatter and all-gather (pipe_zero.c): in one NCCL group,
 * to each rank k send_n[k] floats from src + send_at[k] and from each rank k
 * recv_n[k] floats into dst + recv_at[k] (zero counts issue nothing: both
 * ends know them), then waits. Device memory; the caller synchronizes the
 * stream that wrote src first. */
rp_status rp_nccl_group_exchange(rp_nccl_group *g, const float *src, const size_t *send_at,
                                 const size_t *send_n, float *dst, const size_t *recv_at,
                                 const size_t *recv_n, const char *what, rp_error *err);
/* One transfer of rp_nccl_group_run: count elements of fp32 (bf16 = 0) or
 * bf16 (bf16 = 1, 2 bytes: ZeRO-1's all-gather into the weights' bf16
 * copies) sent to or received (recv = 1) from peer. */
typedef struct {
    int peer, recv, bf16;
    void *p;
    size_t count;
} rp_nccl_xfer;
/* The transfers x [n] in one NCCL group, in order (each pair of ranks must
 * list its sends and receives to each other in the same order), then waits.
 * Device memory; the caller synchronizes the stream that wrote the sends. */
rp_status rp_nccl_group_run(rp_nccl_group *g, const rp_nccl_xfer *x, int n, const char *what,
                            rp_error *err);

/* Nonblocking; buf must stay untouched until rp_transport_wait(x) returns. */
rp_status rp_transport_post_send(rp_transport *t, const void *buf, size_t bytes, int peer,
                                 rp_msg_kind kind, int micro_batch, rp_transfer *x,
                                 rp_error *err);
rp_status rp_transport_post_recv(rp_transport *t, void *buf, size_t bytes, int peer,
                                 rp_msg_kind kind, int micro_batch, rp_transfer *x,
                                 rp_error *err);
/* Transfers posted between begin and end are issued together at the end:
 * over NCCL, those on each link in one ncclGroupStart/End, so they progress
 * together (a send and a receive with one neighbour cannot wait for each
 * other). No effect on MPI transfers. A transfer may be waited for only
 * after its group's end; groups do not nest. */
void rp_transport_group_begin(rp_transport *t);
rp_status rp_transport_group_end(rp_transport *t, rp_error *err);

/* Completes x (no-op when x is not active); a receive also checks the size. */
rp_status rp_transport_wait(rp_transport *t, rp_transfer *x, rp_error *err);

/* Waits for a nonblocking collective (MPI_Iallreduce, MPI_Ibcast, ...) with
 * the same watchdog as transfers: a rank that stops answering makes the
 * others fail after timeout_s (<= 0: never) instead of hanging. what names
 * the operation in the message. */
rp_status rp_comm_wait(MPI_Request *request, double timeout_s, const char *what, rp_error *err);

/* The watchdog's backstop. The waits poll MPI and give up after timeout_s,
 * but only between MPI calls: a call that never returns cannot time out.
 * One does: when a TCP write to a peer that died fails, Open MPI's handling
 * of it (its fatal-error path, inside the MPI_Test of a wait) can block for
 * good (tests/test_cluster_slurm.sh: rank 0 silent 60 s after rpnode2 was
 * killed, no watchdog message). rp_comm_guard_arm starts a deadline of
 * timeout_s + RP_COMM_GUARD_GRACE_S for the wait the calling thread is in;
 * if that thread is still inside it then, a guard thread prints what was
 * awaited (who: "stage 0"; what: "the activation gradients"; micro_batch and
 * peer: -1 when none; t: names the peer's node, may be NULL) and ends the
 * process with status 1 without calling MPI. The strings must live until
 * rp_comm_guard_disarm. timeout_s <= 0: nothing armed. One wait at a time
 * (the thread that calls MPI). */
#define RP_COMM_GUARD_GRACE_S 5.0
void rp_comm_guard_arm(double timeout_s, const rp_transport *t, const char *who,
                       const char *what, int micro_batch, int peer);
void rp_comm_guard_disarm(void);

/* Blocking conveniences: post + wait. */
rp_status rp_transport_send(rp_transport *t, const void *buf, size_t bytes, int peer,
                            rp_msg_kind kind, int micro_batch, rp_error *err);
rp_status rp_transport_recv(rp_transport *t, void *buf, size_t bytes, int peer,
                            rp_msg_kind kind, int micro_batch, rp_error *err);

/* ---- Variable-size messages (transport_message.c) ----
 * Packed protobuf commands and results whose size the receiver does not
 * know: the receiver probes for the next message of a kind (and micro-batch)
 * from a peer, then takes it whole. Message buffers are always host memory,
 * whatever rp_transport_use_backend said. */

#define RP_TRANSPORT_ANY_PEER (-1)

typedef enum {
    RP_MSG_POLL,       /* return at once; *data stays NULL when none has arrived */
    RP_MSG_WAIT,       /* wait up to the transport's timeout, then fail naming the peer */
    RP_MSG_WAIT_IDLE   /* wait forever, polling slowly: a stage with nothing to do */
} rp_msg_wait;

/* Nonblocking send of a host buffer; data stays untouched until
 * rp_transport_wait(x) returns. bytes may be 0. */
rp_status rp_transport_post_send_message(rp_transport *t, const void *data, size_t bytes,
                                         int peer, rp_msg_kind kind, int micro_batch,
                                         rp_transfer *x, rp_error *err);
/* The next message of kind / micro_batch from peer (or RP_TRANSPORT_ANY_PEER):
 * *data (malloc'ed, the caller frees), *bytes, *from (may be NULL). */
rp_status rp_transport_recv_message(rp_transport *t, int peer, rp_msg_kind kind, int micro_batch,
                                    rp_msg_wait wait, void **data, size_t *bytes, int *from,
                                    rp_error *err);

/* ---- Collectives and gathers (transport_collective.c) ----
 * Host memory only, whatever rp_transport_use_backend named: copy device
 * data to host first. Each call is posted nonblocking on the transport's
 * communicator and waited with its watchdog: after timeout_s without the
 * peers it fails with a message naming `what` (a noun phrase: "the
 * checkpoint start") and the root or peer, e.g. "stage 0 waited 5 s
 * (--comm-timeout) for stage 1's logits; no reply: that rank stopped or
 * died" (a collective: "...; a rank did not join: it stopped or died");
 * the caller then ends the job. A transport over the world
 * communicator whose what_buf says "rank N" names its peers ranks. */
typedef enum { RP_REDUCE_SUM, RP_REDUCE_MAX } rp_reduce_op;

/* Collective: buf [bytes] of root lands in buf on every rank. */
rp_status rp_transport_bcast(rp_transport *t, void *buf, size_t bytes, int root,
                             const char *what, rp_error *err);
/* Collective: send [bytes] of rank i lands at recv + i * bytes on root
 * (recv is only read on root). bytes < 2 GiB. */
rp_status rp_transport_gather(rp_transport *t, const void *send, void *recv, size_t bytes,
                              int root, const char *what, rp_error *err);
/* Collective: v [n] = its sum or maximum over every rank, in place. */
rp_status rp_transport_allreduce_int(rp_transport *t, int *v, int n, rp_reduce_op op,
                                     const char *what, rp_error *err);
rp_status rp_transport_allreduce_double(rp_transport *t, double *v, int n, rp_reduce_op op,
                                        const char *what, rp_error *err);
/* Rank `from`'s slice src [bytes] lands in dst on rank 0 (from 0: a copy on
 * rank 0); the other ranks return at once. Called by rank 0 and rank from
 * with the same bytes; a slice of another size is an error naming both.
 * Slices from one rank arrive in the order they were sent, never mixed up
 * with stage-to-stage transfers. */
rp_status rp_transport_gather_slice(rp_transport *t, int from, void *dst, const void *src,
                                    size_t bytes, const char *what, rp_error *err);

#endif
