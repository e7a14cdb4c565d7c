/* Synthetic tasks generated on the fly: the no-download default data of the
 * trainer, and a quick check that a model learns in-context recall. Every
 * sample is a pure function of (task config, seed, split, sample index), so a
 * run is reproducible and resumable from a sample counter alone.
 *
 * Tokens 0 and 1 are special (0 = padding, 1 = separator); symbols are drawn
 * from [2, vocab_size). A sample is ctx_len+1 tokens (inputs = the first
 * ctx_len, targets = the last ctx_len) and a mask [ctx_len]: mask[t] = 1 when
 * the target at input position t, tokens[t+1], is an answer that counts for
 * accuracy (t predicts t+1).
 *
 * MQAR (multi-query associative recall), n = n_pairs, q = n_queries:
 *   keys are [2, 2+K) and values [2+K, vocab_size), K = (vocab_size-2)/2
 *   positions 0 .. 2n-1:        k_1 v_1 k_2 v_2 ... k_n v_n   (distinct keys,
 *                                                              values drawn
 *                                                              independently)
 *   positions 2n .. 2n+2q-1:    k_{p(1)} v_{p(1)} ... k_{p(q)} v_{p(q)}
 *                               (p = a random permutation of the n pairs;
 *                               q <= n; each query is followed by its answer)
 *   the rest, to ctx_len:       0
 *   mask[t] = 1 for t = 2n + 2j (the query k, whose target is its value).
 * Copy, L = copy_len:
 *   positions 0 .. L-1:         s_1 .. s_L   (symbols from [2, vocab_size))
 *   position  L:                1            (separator)
 *   positions L+1 .. 2L:        s_1 .. s_L
 *   the rest, to ctx_len:       0
 *   mask[t] = 1 for t = L .. 2L-1 (targets are the copied string). */
#ifndef RP_TRAIN_SYNTHETIC_H
#define RP_TRAIN_SYNTHETIC_H

#include <stdint.h>

#include "core/error.h"

typedef enum { RP_SYNTH_MQAR = 0, RP_SYNTH_COPY = 1 } rp_synth_task;
typedef enum { RP_SYNTH_TRAIN = 0, RP_SYNTH_EVAL = 1 } rp_synth_split;

#define RP_SYNTH_PAD 0
#define RP_SYNTH_SEPARATOR 1
#define RP_SYNTH_FIRST_SYMBOL 2

typedef struct {
    rp_synth_task task;
    int vocab_size;  /* the model's vocabulary; >= 4 (MQAR) or >= 3 (copy) */
    int ctx_len;
    int n_pairs;     /* MQAR: 0 = min(K, ctx_len / 4) */
    int n_queries;   /* MQAR: 0 = as many as fit, up to n_pairs */
    int copy_len;    /* copy: 0 = ctx_len / 2 */
} rp_synth_config;

/* "mqar" / "copy" -> task; -1 for other names. */
int rp_synth_task_from_name(const char *name);
const char *rp_synth_task_name(rp_synth_task task);

/* Fills the defaults (0 fields) in *cfg and checks that the layout fits
 * ctx_len + 1 tokens and the vocabulary; the message names the bad field. */
rp_status rp_synth_resolve(rp_synth_config *cfg, rp_error *err);

/* One sample: tokens [ctx_len+1], mask [ctx_len] (may be NULL). cfg must be
 * resolved. Train and eval draw from different streams of the same seed. */
void rp_synth_sample(const rp_synth_config *cfg, uint64_t seed, rp_synth_split split,
                     uint64_t sample_index, int32_t *tokens, uint8_t *mask);

/* Samples *cursor .. *cursor + batch_size*n_ranks - 1 of the split, with the
 * loader's DP convention (rank r takes every n_ranks-th, starting at r):
 * tokens [batch_size][ctx_len+1], mask [batch_size][ctx_len] (may be NULL).
 * Advances *cursor by batch_size * n_ranks. */
rp_status rp_synth_next_batch(const rp_synth_config *cfg, uint64_t seed, rp_synth_split split,
                              uint64_t *cursor, int batch_size, int rank, int n_ranks,
                              int32_t *tokens, uint8_t *mask, rp_error *err);

#endif
