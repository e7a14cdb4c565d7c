/* ZeRO-1 (train --zero 1, docs/parallelism.md): the Adam moments of one
 * stage are split over its DP data replicas. Each owned flat buffer (layers,
 * then embedding, then head: the order of rp_grad_sum_squares) of n floats
 * is cut into DP contiguous ranges [n r / DP, n (r+1) / DP); replica r keeps
 * the moments of range r only and runs AdamW on it. No MPI here: the
 * reduce-scatter and all-gather are in src/pipe/pipe_zero.c. */
#ifndef RP_OPTIM_ZERO_H
#define RP_OPTIM_ZERO_H

#include "model/model.h"
#include "optim/optim.h"

typedef struct {
    int dp, rank;           /* data replicas, this one */
    int n_buf;              /* owned flat buffers */
    size_t *full;           /* [n_buf] floats of each buffer */
    size_t *begin, *count;  /* [n_buf] this replica's range of each buffer */
    float **m, **v;         /* [n_buf] the range's moments (backend memory) */
    size_t shard_floats;    /* sum of count */
    rp_backend *be;
} rp_zero_shard;

/* Range of replica r of a buffer of n floats split over dp. */
void rp_zero_range(size_t n, int dp, int r, size_t *begin, size_t *count);

/* Flat buffer i of m in the shard order (layers, embed, head); NULL past
 * the last. n: its floats. */
float *rp_zero_buffer(const rp_model *m, int i, size_t *n);
int rp_zero_n_buffers(const rp_model *m);

/* Zeroed moments of replica `rank`'s ranges of like's buffers. */
rp_status rp_zero_shard_init(rp_zero_shard *z, const rp_model *like, int dp, int rank,
                             rp_error *err);
void rp_zero_shard_free(rp_zero_shard *z);

/* Copies this replica's ranges out of full moments (a resumed checkpoint),
 * or into them (a checkpoint's gather: the caller fills the other ranges). */
void rp_zero_take(rp_zero_shard *z, const rp_model *adam_m, const rp_model *adam_v);
void rp_zero_put(const rp_zero_shard *z, rp_model *adam_m, rp_model *adam_v);

/* Sum of squares of replica d's ranges of every buffer of grads, in buffer
 * order: the global norm is these partials summed in replica order, so the
 * sharded and the unsharded runs compute it with the same operations. */
double rp_zero_partial_sum_squares(const rp_model *grads, int dp, int d);

/* rp_optim_step on this replica's ranges only (the same element-wise AdamW,
 * each tensor's piece in the range with its group's lr and decay). */
void rp_zero_optim_step(rp_zero_shard *z, rp_model *weights, const rp_model *grads,
                        const rp_optim_config *c, long step, float grad_scale);

#endif
