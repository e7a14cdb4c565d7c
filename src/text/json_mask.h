/* Token masks for structured output: which tokens of a vocabulary (tokens are byte strings)
 * can continue a JSON document from an automaton state (json_grammar.h). A walk of the
 * vocabulary's byte trie with the automaton finds them, pruning a branch at its first
 * rejected byte; masks are cached per state (LRU), so a repeated state costs a lookup. */
#ifndef RP_TEXT_JSON_MASK_H
#define RP_TEXT_JSON_MASK_H

#include <stddef.h>
#include <stdint.h>

#include "core/error.h"
#include "text/json_grammar.h"
#include "text/tokenizer.h"

typedef struct rp_token_trie rp_token_trie;

/* The ids [0, n_ids) of tok that have bytes (ids without, like end-of-text, are left out). */
rp_status rp_token_trie_build(rp_token_trie **out, const rp_tokenizer *tok, rp_error *err);
void rp_token_trie_free(rp_token_trie *t);
int rp_token_trie_n_ids(const rp_token_trie *t);
const uint8_t *rp_token_trie_bytes(const rp_token_trie *t, int32_t id, size_t *len);

/* Feeds token id's bytes to s: RP_JSON_OK, or why a byte was refused (s is then unspecified).
 * An id with no bytes is refused. */
rp_json_result rp_json_feed_token(const rp_json_grammar *g, const rp_token_trie *t,
                                  rp_json_state *s, int32_t id);

typedef struct rp_json_mask rp_json_mask;

/* A mask cache for one grammar over n_vocab ids (>= the trie's; ids beyond it are never
 * allowed). end_ids (n_end of them) are allowed exactly when the document is complete.
 * capacity: cached states (LRU). */
rp_status rp_json_mask_create(rp_json_mask **out, const rp_json_grammar *g, const rp_token_trie *t,
                              int n_vocab, const int32_t *end_ids, int n_end, int capacity,
                              rp_error *err);
void rp_json_mask_free(rp_json_mask *m);
/* The allowed ids at s as a bitset of (n_vocab + 63) / 64 words (bit id % 64 of word id / 64),
 * valid until the next call; NULL only when not even one mask could be allocated. Masks are
 * allocated as states come (at most capacity of them). */
const uint64_t *rp_json_mask_get(rp_json_mask *m, const rp_json_state *s);
/* Walks done (cache misses) and lookups, for tests and benchmarks. */
void rp_json_mask_counts(const rp_json_mask *m, long *walks, long *lookups);

#endif
