/* Synthetic MQAR and copy samples (layouts in synthetic.h). Draws come from
 * Philox with the sample index as the high counter word, so any sample is
 * generated alone; distinct keys and the query order use the loader's keyed
 * bijection instead of a shuffled scratch array, so no memory is needed. */
#include "train/synthetic.h"

#include <stdio.h>
#include <string.h>

#include "core/rng.h"
#include "train/loader.h"

/* Counter words reserved for the per-sample permutation keys (ordinary draws
 * use counters 0, 1, 2, ... and never get near them). */
#define KEY_ORDER_COUNTER (~0ull)
#define QUERY_ORDER_COUNTER (~0ull - 1)

int rp_synth_task_from_name(const char *name) {
    if (strcmp(name, "mqar") == 0) return RP_SYNTH_MQAR;
    if (strcmp(name, "copy") == 0) return RP_SYNTH_COPY;
    return -1;
}

const char *rp_synth_task_name(rp_synth_task task) {
    return task == RP_SYNTH_MQAR ? "mqar" : task == RP_SYNTH_COPY ? "copy" : "unknown";
}

rp_status rp_synth_resolve(rp_synth_config *c, rp_error *err) {
    if (c->ctx_len < 2)
        return rp_error_set(err, RP_ERR_ARG, "synthetic %s: ctx_len %d must be >= 2",
                            rp_synth_task_name(c->task), c->ctx_len);
    if (c->task == RP_SYNTH_MQAR) {
        if (c->vocab_size < 4)
            return rp_error_set(err, RP_ERR_ARG,
                                "synthetic mqar: vocab size %d must be >= 4 (pad, separator, one "
                                "key, one value)",
                                c->vocab_size);
        int n_keys = (c->vocab_size - 2) / 2;
        if (c->n_pairs == 0) {
            c->n_pairs = c->ctx_len / 4 < n_keys ? c->ctx_len / 4 : n_keys;
            if (c->n_pairs < 1) c->n_pairs = 1;
        }
        if (c->n_pairs < 1 || c->n_pairs > n_keys)
            return rp_error_set(err, RP_ERR_ARG,
                                "synthetic mqar: %d pairs need as many distinct keys, but vocab "
                                "size %d gives %d keys; use 1..%d pairs",
                                c->n_pairs, c->vocab_size, n_keys, n_keys);
        int room = (c->ctx_len + 1 - 2 * c->n_pairs) / 2;
        if (room < 1)
            return rp_error_set(err, RP_ERR_ARG,
                                "synthetic mqar: %d pairs (%d tokens) leave no room for a query "
                                "in ctx_len %d + 1 tokens; use at most %d pairs",
                                c->n_pairs, 2 * c->n_pairs, c->ctx_len, (c->ctx_len - 1) / 2);
        if (c->n_queries == 0) c->n_queries = room < c->n_pairs ? room : c->n_pairs;
        if (c->n_queries < 1 || c->n_queries > c->n_pairs || c->n_queries > room)
            return rp_error_set(err, RP_ERR_ARG,
                                "synthetic mqar: %d queries is not in [1, %d] (at most one per "
                                "pair, and %d fit after %d pairs in ctx_len %d + 1)",
                                c->n_queries, room < c->n_pairs ? room : c->n_pairs, room,
                                c->n_pairs, c->ctx_len);
        return RP_OK;
    }
    if (c->task == RP_SYNTH_COPY) {
        if (c->vocab_size < 3)
            return rp_error_set(err, RP_ERR_ARG,
                                "synthetic copy: vocab size %d must be >= 3 (pad, separator, a "
                                "symbol)",
                                c->vocab_size);
        if (c->copy_len == 0) c->copy_len = c->ctx_len / 2;
        if (c->copy_len < 1 || 2 * c->copy_len > c->ctx_len)
            return rp_error_set(err, RP_ERR_ARG,
                                "synthetic copy: copy length %d must be in [1, %d] (string, "
                                "separator and copy fit in ctx_len %d + 1 tokens)",
                                c->copy_len, c->ctx_len / 2, c->ctx_len);
        return RP_OK;
    }
    return rp_error_set(err, RP_ERR_ARG, "synthetic: unknown task %d (mqar or copy)", (int)c->task);
}

typedef struct {
    uint64_t key, sample;
} sample_stream;

static uint32_t draw_u32(const sample_stream *s, uint64_t j) {
    uint32_t out[4];
    rp_philox4x32(s->key, s->sample, j / 4, out);
    return out[j % 4];
}

static uint64_t draw_u64_at(const sample_stream *s, uint64_t counter) {
    uint32_t out[4];
    rp_philox4x32(s->key, s->sample, counter, out);
    return (uint64_t)out[0] << 32 | out[1];
}

/* Uniform in [0, m), m < 2^32 (multiply-shift; its bias is below 2^-32 * m). */
static uint32_t draw_below(const sample_stream *s, uint64_t j, uint32_t m) {
    return (uint32_t)(((uint64_t)draw_u32(s, j) * m) >> 32);
}

void rp_synth_sample(const rp_synth_config *c, uint64_t seed, rp_synth_split split,
                     uint64_t sample_index, int32_t *tokens, uint8_t *mask) {
    char stream_name[64];
    snprintf(stream_name, sizeof stream_name, "synthetic.%s.%s", rp_synth_task_name(c->task),
             split == RP_SYNTH_EVAL ? "eval" : "train");
    sample_stream s = {rp_rng_key(seed, stream_name), sample_index};
    const int T = c->ctx_len;
    for (int t = 0; t <= T; t++) tokens[t] = RP_SYNTH_PAD;
    if (mask) memset(mask, 0, (size_t)T);
    const uint32_t n_symbols = (uint32_t)(c->vocab_size - RP_SYNTH_FIRST_SYMBOL);

    if (c->task == RP_SYNTH_MQAR) {
        const uint32_t n_keys = n_symbols / 2, n_values = n_symbols - n_keys;
        const int32_t first_value = RP_SYNTH_FIRST_SYMBOL + (int32_t)n_keys;
        const int n = c->n_pairs;
        uint64_t key_order = draw_u64_at(&s, KEY_ORDER_COUNTER);
        uint64_t query_order = draw_u64_at(&s, QUERY_ORDER_COUNTER);
        for (int i = 0; i < n; i++) {
            tokens[2 * i] = RP_SYNTH_FIRST_SYMBOL + (int32_t)rp_permute_index(n_keys, key_order, (uint64_t)i);
            tokens[2 * i + 1] = first_value + (int32_t)draw_below(&s, (uint64_t)i, n_values);
        }
        for (int j = 0; j < c->n_queries; j++) {
            int pair = (int)rp_permute_index((uint64_t)n, query_order, (uint64_t)j);
            int t = 2 * n + 2 * j;
            tokens[t] = tokens[2 * pair];
            tokens[t + 1] = tokens[2 * pair + 1];
            if (mask) mask[t] = 1;
        }
        return;
    }
    const int L = c->copy_len;
    for (int i = 0; i < L; i++) {
        int32_t sym = RP_SYNTH_FIRST_SYMBOL + (int32_t)draw_below(&s, (uint64_t)i, n_symbols);
        tokens[i] = sym;
        tokens[L + 1 + i] = sym;
        if (mask) mask[L + i] = 1;
    }
    tokens[L] = RP_SYNTH_SEPARATOR;
}

rp_status rp_synth_next_batch(const rp_synth_config *c, uint64_t seed, rp_synth_split split,
                              uint64_t *cursor, int batch_size, int rank, int n_ranks,
                              int32_t *tokens, uint8_t *mask, rp_error *err) {
    if (batch_size < 1 || n_ranks < 1 || rank < 0 || rank >= n_ranks)
        return rp_error_set(err, RP_ERR_ARG,
                            "synthetic: batch size %d, rank %d of %d ranks: need batch >= 1 and "
                            "0 <= rank < ranks",
                            batch_size, rank, n_ranks);
    const size_t T = (size_t)c->ctx_len;
    for (int b = 0; b < batch_size; b++) {
        uint64_t index = *cursor + (uint64_t)b * (uint64_t)n_ranks + (uint64_t)rank;
        rp_synth_sample(c, seed, split, index, tokens + (size_t)b * (T + 1),
                        mask ? mask + (size_t)b * T : NULL);
    }
    *cursor += (uint64_t)batch_size * (uint64_t)n_ranks;
    return RP_OK;
}
