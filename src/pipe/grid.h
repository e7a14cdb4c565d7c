/* The process grid of a parallel job (docs/parallelism.md): world = DP x PP.
 * World rank r runs pipeline stage r / DP of data replica r % DP (the pipeline
 * index varies slowest, Megatron's default order: the replicas of one stage
 * sit on neighbouring ranks, usually one node). The pipe communicator holds
 * the P stages of one replica (rank = stage), the data communicator the DP
 * replicas of one stage (rank = replica).
 *
 * The layer partition is a list of per-stage layer counts: stage 0 also owns
 * the embedding and ln0, the last stage ln_out, the head and the loss. */
#ifndef RP_PIPE_GRID_H
#define RP_PIPE_GRID_H

#include <mpi.h>
#include <stdio.h>

#include "core/error.h"
#include "model/config.h"

#define RP_GRID_MAX_STAGES 1024

typedef struct {
    int world_rank, world_size;
    int pp, dp;                  /* pipeline stages, data replicas */
    int stage, replica;          /* this rank's place */
    MPI_Comm world_comm;         /* the communicator the grid was made from */
    MPI_Comm pipe_comm, data_comm;
    int *layer_begin, *layer_end; /* [pp] layers [begin, end) of every stage */
} rp_grid;

/* Relative cost (multiply-adds per token, forward) of one block, of the
 * embedding + ln0 and of ln_out + head: what the balanced partition weighs. */
double rp_partition_layer_cost(const rp_config *cfg);
double rp_partition_head_cost(const rp_config *cfg);

/* Contiguous split of cfg->n_layer layers over n_stages (1..n_layer) stages,
 * each with at least one layer, minimising the most expensive stage (the
 * head counts on the last stage). Deterministic; layers[s] = count. */
rp_status rp_partition_balanced(const rp_config *cfg, int n_stages, int *layers, rp_error *err);

/* Decode (serving, generation): the last stage also samples every token
 * (log-softmax, penalties, top-p over the whole vocabulary, per sequence,
 * while the matrices are shared by a decode group), so the head weighs
 * C * V + RP_PARTITION_SAMPLE_COST * V. The constant, in multiply-adds per
 * vocabulary id: measured 22-25 GEMV multiply-adds per id for rp_sample on
 * a flat distribution (V = 65536, top-p 0.85) next to a head GEMV, ~800 next
 * to a 64-row GEMM (compute-bound), and ~340 from the serving run of
 * docs/perf/serving.md (last stage 90% busy, first 26%): 512 between. */
#define RP_PARTITION_SAMPLE_COST 512.0
double rp_partition_head_decode_cost(const rp_config *cfg);
/* rp_partition_balanced with the head weighed by rp_partition_head_decode_cost. */
rp_status rp_partition_balanced_decode(const rp_config *cfg, int n_stages, int *layers,
                                       rp_error *err);

/* "4,4,3,1" -> layers[]; refuses a list whose length is not n_stages, a
 * stage with no layer, or counts that do not add up to n_layer (every layer
 * exactly once) with a message naming the difference. */
rp_status rp_partition_parse(const char *text, const rp_config *cfg, int n_stages, int *layers,
                             rp_error *err);

/* Splits world into the grid (collective over world). world_size must be a
 * multiple of pp; layers[] (pp counts, checked) gives the partition. */
rp_status rp_grid_create(rp_grid *g, MPI_Comm world, int pp, const int *layers, rp_error *err);
void rp_grid_free(rp_grid *g);

/* Collective: rank 0 prints one line per rank (host, rank, stage, layers,
 * what else the stage owns, data replica). */
void rp_grid_print_map(const rp_grid *g, FILE *out);

#endif
