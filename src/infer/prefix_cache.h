/* The prefix state cache's index (docs/serving.md, Prefix state cache):
 * which token prefixes have a stored recurrent state, keyed by (hash,
 * length) and verified against the stored tokens, in an LRU under a byte
 * budget. Rank 0's driver owns it; the states themselves live on every
 * stage under the entry's id (engine_worker.c), so this file is plain data. */
#ifndef RP_INFER_PREFIX_CACHE_H
#define RP_INFER_PREFIX_CACHE_H

#include <stddef.h>
#include <stdint.h>

#include "core/error.h"

typedef struct {
    uint64_t id;         /* the stages' key: never 0, never reused */
    uint64_t origin;     /* the state the prefix was read from: 0 zero, else a
                          * stored session's version (engine_internal.h) */
    uint64_t hash;       /* of tokens[0..len) */
    uint64_t last_used;
    int32_t *tokens;
    int len;
} rp_prefix_entry;

typedef struct {
    rp_prefix_entry *e;
    int n, cap;
    size_t budget;       /* bytes: states (whole model) + tokens */
    size_t bytes;
    size_t state_bytes;  /* one state of the whole model */
    uint64_t clock, next_id;
    /* the hash step (h of a prefix one token longer); tests replace it to
     * force collisions */
    uint64_t (*mix)(uint64_t h, int32_t token);
} rp_prefix_cache;

#define RP_PREFIX_HASH_SEED 1469598103934665603ULL

uint64_t rp_prefix_mix(uint64_t h, int32_t token);
void rp_prefix_cache_init(rp_prefix_cache *c, size_t budget_bytes, size_t state_bytes);
void rp_prefix_cache_free(rp_prefix_cache *c);
/* The longest stored prefix of toks no longer than max_len, read from the
 * same origin, whose tokens equal toks' (a hash match with other tokens is
 * a miss). Returns its id
 * (and marks it used) or 0; *len_out its length (0 on a miss). */
uint64_t rp_prefix_cache_lookup(rp_prefix_cache *c, uint64_t origin, const int32_t *toks,
                                int max_len, int *len_out);
/* Stores the prefix toks[0..len) read from origin: *id is the new entry's (*is_new 1: the
 * stages must store the state under it), an existing equal entry's
 * (*is_new 0, marked used), or 0 when one entry exceeds the budget.
 * Entries evicted to make room (least recently used first) are written to
 * evicted (up to max_evicted; the caller passes room for every entry: n). */
rp_status rp_prefix_cache_insert(rp_prefix_cache *c, uint64_t origin, const int32_t *toks,
                                 int len, uint64_t *id, int *is_new, uint64_t *evicted,
                                 int max_evicted, int *n_evicted, rp_error *err);

#endif
