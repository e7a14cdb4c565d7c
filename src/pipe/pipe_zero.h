/* The collectives of ZeRO-1 (optim/zero.h) over the data communicator of a
 * stage: a reduce-scatter of gradients whose sums run in replica order
 * (0 + 1 + ... + DP-1, the same float operations whatever MPI's algorithm,
 * so the sharded and the unsharded runs agree bit for bit), the all-gather
 * of updated weights, the global gradient norm from the shards' partial
 * sums, and the gather of the moments for a checkpoint. Host memory only;
 * each posted nonblocking and waited with the --comm-timeout watchdog. */
#ifndef RP_PIPE_PIPE_ZERO_H
#define RP_PIPE_PIPE_ZERO_H

#include <mpi.h>

#include "optim/zero.h"

/* buf [n] on every replica; afterwards replica r's range (rp_zero_range) of
 * buf holds the sum over the replicas in replica order; the rest of buf is
 * unchanged. scratch: n floats or more. */
rp_status rp_zero_reduce_scatter(MPI_Comm data_comm, float *buf, size_t n, float *scratch,
                                 double timeout_s, rp_error *err);
/* buf [n]: every replica's range goes to every replica (in place). */
rp_status rp_zero_allgather(MPI_Comm data_comm, float *buf, size_t n, double timeout_s,
                            rp_error *err);
/* *sum = the replicas' `partial`s added in replica order (same on all). */
rp_status rp_zero_sum_partials(MPI_Comm data_comm, double partial, double *sum,
                               double timeout_s, rp_error *err);
/* Replica 0 gets the full moments (adam_m, adam_v: full models there, NULL
 * elsewhere) from every replica's shard. Collective over data_comm. */
rp_status rp_zero_gather_moments(MPI_Comm data_comm, const rp_zero_shard *z, rp_model *adam_m,
                                 rp_model *adam_v, double timeout_s, rp_error *err);

#endif
