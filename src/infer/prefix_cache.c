/* The prefix state cache's index (prefix_cache.h): a linear table (a
 * server keeps tens to hundreds of states, each megabytes), the prefix
 * hashes of a lookup computed once, every hash hit verified token by token. */
#include <stdlib.h>
#include <string.h>

#include "infer/prefix_cache.h"

/* FNV-1a over the token's 4 bytes: cheap, and hash(prefix + t) follows
 * from hash(prefix), so one pass gives every prefix's hash. */
uint64_t rp_prefix_mix(uint64_t h, int32_t token) {
    uint32_t t = (uint32_t)token;
    for (int i = 0; i < 4; i++) {
        h ^= (t >> (8 * i)) & 0xffu;
        h *= 1099511628211ULL;
    }
    return h;
}

void rp_prefix_cache_init(rp_prefix_cache *c, size_t budget_bytes, size_t state_bytes) {
    memset(c, 0, sizeof *c);
    c->budget = budget_bytes;
    c->state_bytes = state_bytes;
    c->mix = rp_prefix_mix;
}

void rp_prefix_cache_free(rp_prefix_cache *c) {
    for (int i = 0; i < c->n; i++) free(c->e[i].tokens);
    free(c->e);
    c->e = NULL;
    c->n = c->cap = 0;
    c->bytes = 0;
}

static size_t entry_bytes(const rp_prefix_cache *c, int len) {
    return c->state_bytes + (size_t)len * sizeof(int32_t);
}

static uint64_t hash_of(const rp_prefix_cache *c, const int32_t *toks, int len) {
    uint64_t h = RP_PREFIX_HASH_SEED;
    for (int i = 0; i < len; i++) h = c->mix(h, toks[i]);
    return h;
}

uint64_t rp_prefix_cache_lookup(rp_prefix_cache *c, uint64_t origin, const int32_t *toks,
                                int max_len, int *len_out) {
    *len_out = 0;
    if (c->n == 0 || max_len < 1) return 0;
    int longest = 0;
    for (int i = 0; i < c->n; i++)
        if (c->e[i].origin == origin && c->e[i].len <= max_len && c->e[i].len > longest)
            longest = c->e[i].len;
    if (longest == 0) return 0;
    uint64_t *h = malloc(sizeof(uint64_t) * ((size_t)longest + 1));
    if (!h) return 0;  /* a miss: the request reads its whole prompt */
    h[0] = RP_PREFIX_HASH_SEED;
    for (int i = 0; i < longest; i++) h[i + 1] = c->mix(h[i], toks[i]);
    int best = -1;
    for (int i = 0; i < c->n; i++) {
        const rp_prefix_entry *en = &c->e[i];
        if (en->origin != origin || en->len > longest ||
            (best >= 0 && en->len <= c->e[best].len))
            continue;
        if (en->hash != h[en->len]) continue;
        if (memcmp(en->tokens, toks, sizeof(int32_t) * (size_t)en->len) != 0) continue;
        best = i;
    }
    free(h);
    if (best < 0) return 0;
    c->e[best].last_used = ++c->clock;
    *len_out = c->e[best].len;
    return c->e[best].id;
}

rp_status rp_prefix_cache_insert(rp_prefix_cache *c, uint64_t origin, const int32_t *toks,
                                 int len, uint64_t *id, int *is_new, uint64_t *evicted,
                                 int max_evicted, int *n_evicted, rp_error *err) {
    *id = 0;
    *is_new = 0;
    *n_evicted = 0;
    if (len < 1) return RP_OK;
    const size_t need = entry_bytes(c, len);
    if (need > c->budget) return RP_OK;
    const uint64_t h = hash_of(c, toks, len);
    for (int i = 0; i < c->n; i++)
        if (c->e[i].origin == origin && c->e[i].len == len && c->e[i].hash == h &&
            memcmp(c->e[i].tokens, toks, sizeof(int32_t) * (size_t)len) == 0) {
            c->e[i].last_used = ++c->clock;
            *id = c->e[i].id;
            return RP_OK;
        }
    while (c->n > 0 && c->bytes + need > c->budget) {
        int lru = 0;
        for (int i = 1; i < c->n; i++)
            if (c->e[i].last_used < c->e[lru].last_used) lru = i;
        if (*n_evicted < max_evicted) evicted[(*n_evicted)++] = c->e[lru].id;
        c->bytes -= entry_bytes(c, c->e[lru].len);
        free(c->e[lru].tokens);
        c->e[lru] = c->e[--c->n];
    }
    if (c->n == c->cap) {
        int cap = c->cap ? 2 * c->cap : 16;
        rp_prefix_entry *grown = realloc(c->e, sizeof *grown * (size_t)cap);
        if (!grown) return rp_error_set(err, RP_ERR_NOMEM, "prefix cache table (%d entries)", cap);
        c->e = grown;
        c->cap = cap;
    }
    int32_t *copy = malloc(sizeof(int32_t) * (size_t)len);
    if (!copy) return rp_error_set(err, RP_ERR_NOMEM, "prefix cache tokens (%d)", len);
    memcpy(copy, toks, sizeof(int32_t) * (size_t)len);
    rp_prefix_entry *en = &c->e[c->n++];
    en->id = ++c->next_id;
    en->origin = origin;
    en->hash = h;
    en->last_used = ++c->clock;
    en->tokens = copy;
    en->len = len;
    c->bytes += need;
    *id = en->id;
    *is_new = 1;
    return RP_OK;
}
