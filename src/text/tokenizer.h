/* Tokenizers: byte-level (id = byte value, the embedded default) and the RWKV
 * World tokenizer read from a rwkv_vocab_v20230424.txt-format file (greedy
 * longest match over raw bytes; token 0 = end of text, never produced by the
 * encoder). Decoding concatenates token bytes; rp_utf8_stream holds back a
 * partial UTF-8 character so streamed output never prints half of one. */
#ifndef RP_TEXT_TOKENIZER_H
#define RP_TEXT_TOKENIZER_H

#include <stddef.h>
#include <stdint.h>

#include "core/error.h"

typedef struct rp_tokenizer rp_tokenizer;

/* spec: "bytes" for the byte-level tokenizer, otherwise a vocab file path.
 * A malformed vocab line fails with the file name and line number. */
rp_status rp_tokenizer_open(rp_tokenizer **out, const char *spec, rp_error *err);
void rp_tokenizer_free(rp_tokenizer *tok);

/* "bytes" or "world". */
const char *rp_tokenizer_kind(const rp_tokenizer *tok);
/* One more than the largest id it can produce or decode (256 for bytes,
 * 65530 for the World vocab). A model's vocab may be larger (padding). */
int rp_tokenizer_n_ids(const rp_tokenizer *tok);
/* The id that ends a document (0 for both kinds). */
int rp_tokenizer_eot_id(const rp_tokenizer *tok);

/* Encodes n bytes; *ids is malloc'ed (free() it), *n_ids its length. Fails
 * (RP_ERR_ARG, naming the byte and offset) only if a vocab lacks a single-byte
 * token that the input needs; the World vocab has all 256. */
rp_status rp_tokenizer_encode(const rp_tokenizer *tok, const uint8_t *bytes, size_t n,
                              int32_t **ids, size_t *n_ids, rp_error *err);
/* Bytes of one token; NULL (and *len 0) for an id it cannot decode. */
const uint8_t *rp_tokenizer_token_bytes(const rp_tokenizer *tok, int32_t id, size_t *len);
/* Decodes ids; *bytes is malloc'ed and NUL-terminated (not counted in *n_bytes).
 * An id out of range is an error naming its position. */
rp_status rp_tokenizer_decode(const rp_tokenizer *tok, const int32_t *ids, size_t n_ids,
                              uint8_t **bytes, size_t *n_bytes, rp_error *err);

/* Streaming UTF-8 boundary keeper. push() appends bytes and returns how many
 * leading bytes of the internal buffer form complete characters (or invalid
 * bytes that can never become valid, passed through as-is); take them with
 * rp_utf8_stream_data() then rp_utf8_stream_consume(). finish() releases
 * whatever is left (an incomplete character at the end of the stream). */
typedef struct {
    uint8_t *buf;
    size_t len, cap;
    size_t ready;
} rp_utf8_stream;

void rp_utf8_stream_init(rp_utf8_stream *s);
void rp_utf8_stream_free(rp_utf8_stream *s);
rp_status rp_utf8_stream_push(rp_utf8_stream *s, const uint8_t *bytes, size_t n,
                              size_t *ready, rp_error *err);
const uint8_t *rp_utf8_stream_data(const rp_utf8_stream *s);
void rp_utf8_stream_consume(rp_utf8_stream *s, size_t n);
size_t rp_utf8_stream_finish(rp_utf8_stream *s);

#endif
