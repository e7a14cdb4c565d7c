/* What transport.c calls in transport_nccl.c, the NCCL links of the stage
 * transport (only in builds with RP_HAVE_NCCL). No CUDA or NCCL types: the
 * links are opaque to everything but transport_nccl.c. */
#ifndef RP_PIPE_TRANSPORT_NCCL_H
#define RP_PIPE_TRANSPORT_NCCL_H

#include "pipe/transport.h"

/* The link (index into t->nccl) that carries a transfer of this kind with
 * peer in this direction, or -1 when MPI carries it. */
int rp_nccl_link_of(const rp_transport *t, rp_msg_kind kind, int peer, int is_recv);
/* Issues x (filled in, x->link set) on its link; buf is device memory. On
 * failure x is inactive again. */
rp_status rp_nccl_post(rp_transport *t, void *buf, rp_transfer *x, rp_error *err);
/* Completes x (already marked inactive by the caller) with the watchdog. */
rp_status rp_nccl_wait(rp_transport *t, rp_transfer *x, rp_error *err);
/* Transfers posted until rp_nccl_group_end are queued per link, then issued
 * link by link, each link's in one ncclGroupStart/End. */
void rp_nccl_group_begin(rp_transport *t);
rp_status rp_nccl_group_end(rp_transport *t, rp_error *err);
/* Tears the links down (no transfer active) and sets t->nccl = NULL. */
void rp_nccl_links_free(rp_transport *t);

#endif
