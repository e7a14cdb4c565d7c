/* libFuzzer target: the World vocabulary parser (src/infer/tokenizer.c,
 * rwkv_vocab_v20230424.txt format: "ID LITERAL LENGTH" a line, Python str or
 * bytes literals). When a vocab parses, the input itself is encoded with it
 * and decoded again: greedy encoding over a vocab that has every byte it
 * needs must round-trip exactly, and streamed UTF-8 must lose no byte. */
#include <stdlib.h>
#include <string.h>

#include "text/tokenizer.h"
#include "fuzz_util.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    rp_tokenizer *tok;
    rp_error err;
    if (rp_tokenizer_open(&tok, fuzz_input_path(data, size), &err) != RP_OK) return 0;
    int32_t *ids = NULL;
    size_t n_ids = 0;
    if (rp_tokenizer_encode(tok, data, size, &ids, &n_ids, &err) == RP_OK) {
        uint8_t *bytes = NULL;
        size_t n_bytes = 0;
        if (rp_tokenizer_decode(tok, ids, n_ids, &bytes, &n_bytes, &err) != RP_OK) abort();
        if (n_bytes != size || memcmp(bytes, data, size) != 0) abort(); /* round trip */
        for (size_t i = 0; i < n_ids; i++) {
            size_t len;
            if (!rp_tokenizer_token_bytes(tok, ids[i], &len) || len == 0) abort();
        }
        free(bytes);
    }
    free(ids);
    /* Ids the vocab may not have: every one decodes or fails cleanly. */
    int32_t probe[4] = {0, rp_tokenizer_n_ids(tok) - 1, rp_tokenizer_n_ids(tok), -1};
    for (int i = 0; i < 4; i++) {
        uint8_t *bytes = NULL;
        size_t n_bytes;
        if (rp_tokenizer_decode(tok, &probe[i], 1, &bytes, &n_bytes, &err) == RP_OK) free(bytes);
    }
    rp_tokenizer_free(tok);
    return 0;
}
