/* Training data from token shards (shards.h): fixed-length windows in a
 * deterministic pseudo-random order, a held-out eval split, DP sharding and a
 * cursor that checkpoints save and restore. Used by the trainer (src/train).
 *
 * Windows: shard s with n tokens holds windows k = 0 .. (n-1)/ctx_len - 1 of
 * ctx_len+1 tokens starting at k*ctx_len (inputs = the first ctx_len tokens,
 * targets = the last ctx_len); windows never cross shards and are numbered
 * globally in shard order. Window w is held out for eval when
 * uniform(key(seed, "loader.eval"), w) < eval_fraction (if that leaves eval
 * or train empty while there are >= 2 windows, the window with the smallest
 * (largest) draw is moved). Epoch e visits every window once in the order
 * rp_permute_index(n_windows, key(seed, e), 0, 1, ...), skipping eval
 * windows. The global order does not depend on the number of DP ranks: rank r
 * of R takes global samples r, r+R, r+2R, ... and every rank advances the
 * same cursor, so a run can resume with a different R. */
#ifndef RP_TRAIN_LOADER_H
#define RP_TRAIN_LOADER_H

#include <stddef.h>
#include <stdint.h>

#include "core/error.h"

/* A bijection of [0, n) keyed by `key`: a 6-round Feistel network on the
 * smallest even-bit power of two >= n, cycle-walked back into [0, n). Nothing
 * is stored; i >= n returns i. */
uint64_t rp_permute_index(uint64_t n, uint64_t key, uint64_t i);

typedef struct rp_loader rp_loader;

/* Where the train stream stands; plain integers for checkpoints. */
typedef struct {
    uint64_t epoch;      /* epochs completed */
    uint64_t index;      /* next slot of this epoch's permutation, in [0, n_windows] */
    uint64_t samples;    /* train samples drawn so far, all ranks together */
    uint64_t n_windows;  /* the loader's window count, checked on restore */
} rp_loader_position;

#define RP_LOADER_DEFAULT_EVAL_FRACTION 0.01

/* paths: shard files, or directories whose *.tok files are taken in name
 * order. Every shard is validated (shards.h) and all must share tokenizer
 * kind and vocabulary size. eval_fraction in [0, 1). */
rp_status rp_loader_open(rp_loader **out, const char *const *paths, size_t n_paths, int ctx_len,
                         uint64_t seed, double eval_fraction, rp_error *err);
void rp_loader_free(rp_loader *loader);

int rp_loader_ctx_len(const rp_loader *loader);
uint64_t rp_loader_n_windows(const rp_loader *loader);
uint64_t rp_loader_n_train(const rp_loader *loader);
uint64_t rp_loader_n_eval(const rp_loader *loader);
uint64_t rp_loader_n_tokens(const rp_loader *loader);     /* in all shards */
size_t rp_loader_n_shards(const rp_loader *loader);
const char *rp_loader_shard_path(const rp_loader *loader, size_t i);
uint32_t rp_loader_n_ids(const rp_loader *loader);         /* vocabulary size of the shards */
const char *rp_loader_tokenizer(const rp_loader *loader);  /* "bytes" or "world" */
int rp_loader_is_eval(const rp_loader *loader, uint64_t window);

/* The next batch_size * n_ranks samples of the global train order; this
 * rank's batch_size windows go to tokens_out [batch_size][ctx_len+1] and (if
 * not NULL) their window numbers to window_ids_out [batch_size]. */
rp_status rp_loader_next_batch(rp_loader *loader, int batch_size, int32_t *tokens_out,
                               uint64_t *window_ids_out, int rank, int n_ranks, rp_error *err);
/* Eval window j (j < n_eval, in window order) -> out [ctx_len+1]. */
rp_status rp_loader_eval_window(const rp_loader *loader, uint64_t j, int32_t *out,
                                uint64_t *window_id, rp_error *err);
/* Any window by its number -> out [ctx_len+1]. */
rp_status rp_loader_window(const rp_loader *loader, uint64_t window, int32_t *out, rp_error *err);

void rp_loader_get_position(const rp_loader *loader, rp_loader_position *pos);
/* Fails (naming both counts) if the position was saved over a different set
 * of windows (other shards or ctx_len), or is out of range. */
rp_status rp_loader_set_position(rp_loader *loader, const rp_loader_position *pos, rp_error *err);

#endif
