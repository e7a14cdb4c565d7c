/* A byte-level JSON recogniser for structured output (docs/serving.md, response_format): a
 * pushdown automaton over a compiled grammar (any JSON object, or a JSON-schema subset) that
 * accepts a byte only if it can continue a valid document, and says when the document is
 * complete. The state is a fixed-size value (copy it to branch), so feeding never allocates;
 * json_mask.c walks a vocabulary trie with it to find the tokens allowed at a state. */
#ifndef RP_TEXT_JSON_GRAMMAR_H
#define RP_TEXT_JSON_GRAMMAR_H

#include <stddef.h>
#include <stdint.h>

#include "core/error.h"

#define RP_JSON_MAX_DEPTH 32   /* frames: containers + the string/number being written */
#define RP_JSON_MAX_CHOICES 64 /* properties of one object, values of one enum */
#define RP_JSON_MAX_WS 4       /* consecutive whitespace bytes between tokens */
#define RP_JSON_MAX_DIGITS 16  /* digits of an integer or fraction part (3 in an exponent) */

typedef struct rp_json_grammar rp_json_grammar;

/* Any JSON object (response_format json_object). */
rp_status rp_json_grammar_object(rp_json_grammar **out, rp_error *err);
/* A JSON schema given as text: objects (properties, required, additionalProperties false; the
 * properties come in the schema's order, optional ones may be left out), arrays (items,
 * minItems, maxItems), enum, const, strings (minLength, maxLength), number, integer, boolean,
 * null, $ref to #/$defs/... or #/definitions/..., anyOf / oneOf whose alternatives start with
 * different bytes, type lists. Any other keyword is RP_ERR_ARG naming it. */
rp_status rp_json_grammar_schema(rp_json_grammar **out, const char *schema, size_t len,
                                 rp_error *err);
void rp_json_grammar_free(rp_json_grammar *g);

typedef struct {
    uint8_t kind, sub, aux, lo, hi;
    uint16_t node, pos;
    uint32_t count;
    uint64_t bits;
} rp_json_frame;

typedef struct {
    uint16_t depth;
    uint8_t done, ws;
    uint32_t reserved;
    rp_json_frame f[RP_JSON_MAX_DEPTH];
} rp_json_state;

typedef enum {
    RP_JSON_OK = 0,
    RP_JSON_REJECT,    /* the byte cannot continue a valid document */
    RP_JSON_TOO_DEEP   /* it would nest deeper than RP_JSON_MAX_DEPTH */
} rp_json_result;

void rp_json_start(const rp_json_grammar *g, rp_json_state *s);
/* On anything but RP_JSON_OK the state is unspecified: feed a copy to test a byte. */
rp_json_result rp_json_feed(const rp_json_grammar *g, rp_json_state *s, uint8_t byte);
/* Whether the bytes fed so far form a complete document. */
int rp_json_complete(const rp_json_grammar *g, const rp_json_state *s);
/* The bytes of s that define it (the used frames), for hashing and comparing states. */
size_t rp_json_state_bytes(const rp_json_state *s);
/* dst = src, copying only the used frames (unused frames of dst are left as they are). */
void rp_json_state_copy(rp_json_state *dst, const rp_json_state *src);

#endif
