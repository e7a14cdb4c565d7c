/* libFuzzer target: the token shard reader (rp_shard_open in
 * src/train/shards.c), which the data loader maps and trusts afterwards.
 * Every shard it accepts is read back whole: each token must be below the
 * header's n_ids, and reads past the end must be refused. */
#include <stdlib.h>

#include "train/shards.h"
#include "fuzz_util.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    rp_shard s;
    rp_error err;
    if (rp_shard_open(&s, fuzz_input_path(data, size), &err) != RP_OK) return 0;
    if (s.n_tokens > size) abort(); /* the header cannot claim more than the file holds */
    int32_t *tokens = malloc(((size_t)s.n_tokens + 1) * sizeof *tokens);
    if (!tokens) abort();
    if (rp_shard_read(&s, 0, (size_t)s.n_tokens, tokens, &err) != RP_OK) abort();
    for (uint64_t i = 0; i < s.n_tokens; i++)
        if (tokens[i] < 0 || (uint32_t)tokens[i] >= s.n_ids) abort();
    if (rp_shard_read(&s, s.n_tokens, 1, tokens, &err) == RP_OK) abort();
    if (rp_shard_read(&s, UINT64_MAX, 2, tokens, &err) == RP_OK) abort();
    free(tokens);
    rp_shard_close(&s);
    return 0;
}
