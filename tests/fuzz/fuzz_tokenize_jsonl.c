/* libFuzzer target: `rwkvpipe tokenize` on an untrusted corpus file
 * (src/train/tokenize.c): JSON lines with a "text" string, or plain text,
 * read in small chunks so lines and characters straddle chunk boundaries.
 * The first input byte picks the input kind and the chunk size; the shards
 * written must then open cleanly (src/train/shards.c). */
#include <stdio.h>
#include <stdlib.h>

#include "text/tokenizer.h"
#include "train/shards.h"
#include "train/tokenize.h"
#include "fuzz_util.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (size == 0) return 0;
    rp_input_kind kind = data[0] & 1 ? RP_INPUT_TEXT : RP_INPUT_JSONL;
    size_t chunk_bytes = (size_t)(data[0] >> 1) + 1;
    const char *in_path = fuzz_input_path(data + 1, size - 1);
    rp_tokenizer *tok;
    rp_error err;
    if (rp_tokenizer_open(&tok, "bytes", &err) != RP_OK) abort();
    char prefix[4200];
    snprintf(prefix, sizeof prefix, "%s/out", fuzz_scratch_dir());
    rp_tokenize_options opt = {.shard_tokens = 64, .chunk_bytes = chunk_bytes, .overwrite = 1};
    rp_tokenize_stats stats;
    if (rp_tokenize_file(in_path, kind, tok, prefix, &opt, &stats, &err) == RP_OK) {
        uint64_t tokens = 0;
        for (uint32_t i = 0; i < stats.shards; i++) {
            char path[4300];
            rp_shard s;
            rp_tokenize_shard_path(path, sizeof path, prefix, i);
            if (rp_shard_open(&s, path, &err) != RP_OK) abort();
            tokens += s.n_tokens;
            rp_shard_close(&s);
        }
        if (tokens != stats.tokens) abort();
        if (kind == RP_INPUT_TEXT && size > 1 && stats.tokens != size) abort(); /* bytes + end */
    }
    rp_tokenizer_free(tok);
    return 0;
}
