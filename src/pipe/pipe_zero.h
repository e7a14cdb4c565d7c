/* The collectives of ZeRO-1 (optim/zero.h) over the data communicator of a
 * stage: a reduce-scatter of gradients whose sums run in replica order
 * (0 + 1 + ... + DP-1, the same float operations whatever MPI's algorithm,
 * so the sharded and the unsharded runs agree bit for bit), the all-gather
 * of updated weights, the global gradient norm from the shards' partial
 * sums, and the gather of the moments for a checkpoint. The rp_zero_*
 * calls on a buffer take host memory; rp_zero_links moves backend memory
 * (device buffers over NCCL, or over MPI through host buffers). Each posted
 * nonblocking and waited with the --comm-timeout watchdog. */
#ifndef RP_PIPE_PIPE_ZERO_H
#define RP_PIPE_PIPE_ZERO_H

#include <mpi.h>

#include "optim/zero.h"
#include "pipe/transport.h"

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
 * elsewhere) from every replica's shard. Collective over data_comm. On a
 * device backend through host buffers (a checkpoint is rare). */
rp_status rp_zero_gather_moments(MPI_Comm data_comm, const rp_zero_shard *z, rp_model *adam_m,
                                 rp_model *adam_v, double timeout_s, rp_error *err);

/* The reduce-scatter and all-gather of one stage's backend buffers. Host
 * memory: MPI in place (the rp_zero_* calls above). Device memory with nccl
 * (the trainer's data-replica group): grouped ncclSend/ncclRecv of the
 * ranges, and the owner adds the DP pieces in replica order with the
 * backend's copy and add, the same float operations as the host path, so
 * the bits are those of the CPU run. Device memory without NCCL: staged
 * through host buffers, then the host path. */
typedef struct rp_zero_links rp_zero_links;

/* most: floats of the stage's largest flat buffer. nccl: NULL for MPI
 * (borrowed, not freed). Not collective. */
rp_status rp_zero_links_create(rp_zero_links **out, MPI_Comm data_comm, rp_backend *be,
                               rp_nccl_group *nccl, size_t most, double timeout_s,
                               rp_error *err);
void rp_zero_links_free(rp_zero_links *l);
/* 1 when the links write device memory behind the backend's back (NCCL on
 * a backend without refresh_weights): the caller refreshes what the backend
 * caches of the weights (rp_model_register_weights). 0 when they keep the
 * backend's weight copies current themselves: the all-gather refreshes the
 * ranges it received (only what changed is converted). */
int rp_zero_links_bypass_backend(const rp_zero_links *l);
/* "NCCL", "MPI through host memory" or "MPI" (for the start-up line). */
const char *rp_zero_links_describe(const rp_zero_links *l);
/* As rp_zero_reduce_scatter / rp_zero_allgather on backend memory buf [n]. */
rp_status rp_zero_links_reduce_scatter(rp_zero_links *l, float *buf, size_t n, rp_error *err);
rp_status rp_zero_links_allgather(rp_zero_links *l, float *buf, size_t n, rp_error *err);

/* The bf16 all-gather (NCCL on a backend with weight_copy: CUDA, bf16
 * math): from now on the all-gather of m's layer and head buffers moves the
 * GEMM matrices' ranges (rp_tensor_quantizable) as bf16 straight into the
 * other replicas' bf16 copies, the rest of the buffer as fp32. The other
 * replicas' fp32 of those matrices is then stale on each replica until
 * rp_zero_links_gather_master. m: the stage's weights (borrowed), already
 * registered (rp_model_register_weights). Only when every replica keeps a
 * bf16 copy of every layer and head buffer; nothing to do (RP_OK) without
 * NCCL or weight_copy. Collective over the data replicas (with NCCL). */
rp_status rp_zero_links_use_model(rp_zero_links *l, const rp_model *m, rp_error *err);
/* 1 when the all-gather moves the matrices as bf16 (rp_zero_links_use_model). */
int rp_zero_links_bf16(const rp_zero_links *l);
/* After the bf16 all-gather is on (rp_zero_links_use_model) and the weights
 * are final for the first step (after a resume): nothing reads the other
 * replicas' fp32 of the matrices any more until a save (the GEMMs read the
 * bf16 copies, AdamW only the own range), so on a backend with sparse
 * buffers (backend.h alloc_sparse / release_range) each layer and head
 * buffer moves into a sparse buffer (copied, registered again) and the
 * whole pages that hold only those stale matrix floats are given back. m's
 * buffer pointers and field bindings change. Nothing without the bf16
 * all-gather or the entries. Not collective. */
rp_status rp_zero_links_release_master(rp_zero_links *l, rp_model *m, rp_error *err);
/* The fp32 weights per rank, for the start-up line: bytes of every buffer,
 * of the GEMM matrices among them, and how many of each are backed by
 * memory (less after rp_zero_links_release_master); the bf16 copies'
 * bytes the backend keeps (weight_copy; 0 in fp32 math); the page size of
 * the release (0: none). l may be NULL (no --zero). */
typedef struct {
    size_t fp32_bytes, fp32_backed, matrix_bytes, matrix_backed, bf16_bytes, page;
} rp_zero_memory;
void rp_zero_links_memory(const rp_zero_links *l, const rp_model *m, rp_zero_memory *out);
/* The whole fp32 weights of m, for a checkpoint or the -o file (which only
 * replica 0 writes). Nothing stale (no bf16 all-gather): *whole = m. Else
 * replica 0 gets a host copy (an rp_model on host_be, a backend of host
 * memory: borrowed, it must outlive the copy) holding each replica's range
 * from its owner (an MPI gather; the device's stale or released pages are
 * never read), and the other replicas NULL; the copy lives until
 * rp_zero_links_drop_master or rp_zero_links_free. Collective over the data
 * replicas. */
rp_status rp_zero_links_gather_master(rp_zero_links *l, const rp_model *m, rp_backend *host_be,
                                      const rp_model **whole, rp_error *err);
void rp_zero_links_drop_master(rp_zero_links *l);

#endif
