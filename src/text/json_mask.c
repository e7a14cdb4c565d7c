/* Vocabulary trie and per-state token masks for structured output (json_mask.h). The trie's
 * nodes are children lists (first child, next sibling); a walk keeps one automaton state per
 * depth in a preallocated array, so computing a mask allocates nothing. */
#include "text/json_mask.h"

#include <stdlib.h>
#include <string.h>

typedef struct {
    int32_t first_child, next_sibling, token;
    uint8_t byte;
} trie_node;

struct rp_token_trie {
    trie_node *nodes;
    int n_nodes, cap_nodes;
    int n_ids, max_len;
    int32_t *dup_next;   /* [n_ids] another id with the same bytes, or -1 */
    size_t *offset;      /* [n_ids + 1] into bytes */
    uint8_t *bytes;
};

static int trie_add_node(rp_token_trie *t, uint8_t byte) {
    if (t->n_nodes == t->cap_nodes) {
        int nc = t->cap_nodes ? t->cap_nodes * 2 : 1024;
        trie_node *p = realloc(t->nodes, (size_t)nc * sizeof *p);
        if (!p) return -1;
        t->nodes = p;
        t->cap_nodes = nc;
    }
    trie_node *n = &t->nodes[t->n_nodes];
    n->first_child = n->next_sibling = n->token = -1;
    n->byte = byte;
    return t->n_nodes++;
}

rp_status rp_token_trie_build(rp_token_trie **out, const rp_tokenizer *tok, rp_error *err) {
    *out = NULL;
    rp_token_trie *t = calloc(1, sizeof *t);
    int n = rp_tokenizer_n_ids(tok);
    size_t total = 0;
    for (int id = 0; id < n; id++) {
        size_t len = 0;
        rp_tokenizer_token_bytes(tok, id, &len);
        total += len;
    }
    if (t) {
        t->n_ids = n;
        t->dup_next = malloc((size_t)n * sizeof *t->dup_next);
        t->offset = malloc(((size_t)n + 1) * sizeof *t->offset);
        t->bytes = malloc(total + 1);
    }
    if (!t || !t->dup_next || !t->offset || !t->bytes || trie_add_node(t, 0) != 0) {
        rp_token_trie_free(t);
        return rp_error_set(err, RP_ERR_NOMEM, "token trie: out of memory for %d tokens", n);
    }
    size_t at = 0;
    for (int id = 0; id < n; id++) {
        size_t len = 0;
        const uint8_t *b = rp_tokenizer_token_bytes(tok, id, &len);
        t->offset[id] = at;
        t->dup_next[id] = -1;
        if (!b || len == 0) continue;
        memcpy(t->bytes + at, b, len);
        at += len;
        if ((int)len > t->max_len) t->max_len = (int)len;
        int node = 0;
        for (size_t i = 0; i < len; i++) {
            int c = t->nodes[node].first_child;
            while (c >= 0 && t->nodes[c].byte != b[i]) c = t->nodes[c].next_sibling;
            if (c < 0) {
                if ((c = trie_add_node(t, b[i])) < 0) {
                    rp_token_trie_free(t);
                    return rp_error_set(err, RP_ERR_NOMEM, "token trie: out of memory");
                }
                t->nodes[c].next_sibling = t->nodes[node].first_child;
                t->nodes[node].first_child = c;
            }
            node = c;
        }
        if (t->nodes[node].token < 0) t->nodes[node].token = id;
        else {
            t->dup_next[id] = t->dup_next[t->nodes[node].token];
            t->dup_next[t->nodes[node].token] = id;
        }
    }
    t->offset[n] = at;
    *out = t;
    return RP_OK;
}

void rp_token_trie_free(rp_token_trie *t) {
    if (!t) return;
    free(t->nodes);
    free(t->dup_next);
    free(t->offset);
    free(t->bytes);
    free(t);
}

int rp_token_trie_n_ids(const rp_token_trie *t) { return t->n_ids; }

const uint8_t *rp_token_trie_bytes(const rp_token_trie *t, int32_t id, size_t *len) {
    *len = 0;
    if (id < 0 || id >= t->n_ids) return NULL;
    *len = t->offset[id + 1] - t->offset[id];
    return *len ? t->bytes + t->offset[id] : NULL;
}

rp_json_result rp_json_feed_token(const rp_json_grammar *g, const rp_token_trie *t,
                                  rp_json_state *s, int32_t id) {
    size_t len;
    const uint8_t *b = rp_token_trie_bytes(t, id, &len);
    if (!b) return RP_JSON_REJECT;
    for (size_t i = 0; i < len; i++) {
        rp_json_result r = rp_json_feed(g, s, b[i]);
        if (r != RP_JSON_OK) return r;
    }
    return RP_JSON_OK;
}

/* ---- masks ---- */

typedef struct {
    rp_json_state key;
    uint64_t hash, used;
    uint64_t *bits;
    int valid;
} mask_entry;

struct rp_json_mask {
    const rp_json_grammar *g;
    const rp_token_trie *t;
    int n_vocab, words;
    int32_t *end_ids;
    int n_end;
    mask_entry *entries;
    int capacity;
    uint64_t clock;
    rp_json_state *walk;  /* [max_len + 1]: the state at each depth of the trie walk */
    long walks, lookups;
};

rp_status rp_json_mask_create(rp_json_mask **out, const rp_json_grammar *g, const rp_token_trie *t,
                              int n_vocab, const int32_t *end_ids, int n_end, int capacity,
                              rp_error *err) {
    *out = NULL;
    rp_json_mask *m = calloc(1, sizeof *m);
    if (capacity < 1) capacity = 1;
    if (m) {
        m->g = g;
        m->t = t;
        m->n_vocab = n_vocab;
        m->words = (n_vocab + 63) / 64;
        m->capacity = capacity;
        m->n_end = n_end;
        m->end_ids = malloc((size_t)(n_end > 0 ? n_end : 1) * sizeof *m->end_ids);
        m->entries = calloc((size_t)capacity, sizeof *m->entries);
        m->walk = malloc(((size_t)t->max_len + 2) * sizeof *m->walk);
    }
    /* an entry's mask is allocated when first used: most documents visit few states */
    int ok = m && m->end_ids && m->entries && m->walk;
    if (!ok) {
        rp_json_mask_free(m);
        return rp_error_set(err, RP_ERR_NOMEM, "json mask: out of memory (%d states of %d tokens)",
                            capacity, n_vocab);
    }
    if (n_end > 0) memcpy(m->end_ids, end_ids, (size_t)n_end * sizeof *end_ids);
    *out = m;
    return RP_OK;
}

void rp_json_mask_free(rp_json_mask *m) {
    if (!m) return;
    for (int i = 0; m->entries && i < m->capacity; i++) free(m->entries[i].bits);
    free(m->entries);
    free(m->end_ids);
    free(m->walk);
    free(m);
}

void rp_json_mask_counts(const rp_json_mask *m, long *walks, long *lookups) {
    *walks = m->walks;
    *lookups = m->lookups;
}

static uint64_t hash_bytes(const void *p, size_t n) {
    const uint8_t *b = p;
    uint64_t h = 1469598103934665603ull;
    for (size_t i = 0; i < n; i++) h = (h ^ b[i]) * 1099511628211ull;
    return h;
}

static void set_token(rp_json_mask *m, uint64_t *bits, int32_t id) {
    for (; id >= 0; id = m->t->dup_next[id])
        if (id < m->n_vocab) bits[id >> 6] |= 1ull << (id & 63);
}

static void walk(rp_json_mask *m, int node, int depth, uint64_t *bits) {
    const trie_node *nodes = m->t->nodes;
    for (int c = nodes[node].first_child; c >= 0; c = nodes[c].next_sibling) {
        rp_json_state *s = &m->walk[depth + 1];
        rp_json_state_copy(s, &m->walk[depth]);
        if (rp_json_feed(m->g, s, nodes[c].byte) != RP_JSON_OK) continue;
        if (nodes[c].token >= 0) set_token(m, bits, nodes[c].token);
        if (nodes[c].first_child >= 0) walk(m, c, depth + 1, bits);
    }
}

const uint64_t *rp_json_mask_get(rp_json_mask *m, const rp_json_state *s) {
    const size_t n = rp_json_state_bytes(s);
    const uint64_t h = hash_bytes(s, n);
    m->lookups++;
    m->clock++;
    mask_entry *victim = &m->entries[0];
    for (int i = 0; i < m->capacity; i++) {
        mask_entry *e = &m->entries[i];
        if (e->valid && e->hash == h && rp_json_state_bytes(&e->key) == n && memcmp(&e->key, s, n) == 0) {
            e->used = m->clock;
            return e->bits;
        }
        if (!e->valid || (victim->valid && e->used < victim->used)) victim = e;
    }
    m->walks++;
    if (!victim->bits && !(victim->bits = malloc((size_t)m->words * sizeof(uint64_t)))) {
        /* out of memory: reuse the least recently used allocated entry */
        victim = NULL;
        for (int i = 0; i < m->capacity; i++)
            if (m->entries[i].bits && (!victim || m->entries[i].used < victim->used)) victim = &m->entries[i];
        if (!victim) return NULL;
    }
    memset(victim->bits, 0, (size_t)m->words * sizeof(uint64_t));
    rp_json_state_copy(&m->walk[0], s);
    walk(m, 0, 0, victim->bits);
    if (rp_json_complete(m->g, s))
        for (int i = 0; i < m->n_end; i++)
            if (m->end_ids[i] >= 0 && m->end_ids[i] < m->n_vocab)
                victim->bits[m->end_ids[i] >> 6] |= 1ull << (m->end_ids[i] & 63);
    rp_json_state_copy(&victim->key, s);
    victim->hash = h;
    victim->used = m->clock;
    victim->valid = 1;
    return victim->bits;
}
