/* Corpus -> token shards, streaming: `rwkvpipe tokenize` (src/cli/cmd_tokenize.c)
 * feeds it input files one by one. Inputs are read in chunks and never held
 * whole; output shards OUT_PREFIX-00000.tok, -00001.tok, ... (shards.h) are
 * written under temporary names and renamed only when every input succeeded.
 *
 * Documents: a plain text file is ONE document; a JSON-lines file (.jsonl or
 * .json) has one document per line, the line's "text" string (blank lines are
 * skipped). Each non-empty document is followed by token 0; empty ones are
 * skipped. A text document is encoded exactly as rp_tokenizer_encode() would
 * encode the whole file, whatever the chunk size (see tokenize.c). */
#ifndef RP_TRAIN_TOKENIZE_H
#define RP_TRAIN_TOKENIZE_H

#include <stddef.h>
#include <stdint.h>

#include "core/error.h"
#include "text/tokenizer.h"

#define RP_TOKENIZE_DEFAULT_SHARD_TOKENS 100000000ull
#define RP_TOKENIZE_DEFAULT_CHUNK_BYTES (16u << 20)

typedef enum {
    RP_INPUT_AUTO = 0, /* .jsonl / .json -> JSONL, anything else -> text */
    RP_INPUT_TEXT,
    RP_INPUT_JSONL
} rp_input_kind;

/* Called after every chunk and at the end of each file: bytes of the current
 * file consumed so far and its size, tokens written by the whole run. */
typedef void (*rp_tokenize_progress_fn)(uint64_t bytes_done, uint64_t bytes_total,
                                        uint64_t tokens, void *user);

typedef struct {
    uint64_t shard_tokens;   /* tokens per shard (the last may hold fewer); 0 = 100M */
    size_t chunk_bytes;      /* read size; 0 = 16 MiB (tests use tiny chunks) */
    int overwrite;           /* 0: fail if OUT_PREFIX-00000.tok exists; 1: replace
                              * it and remove higher-numbered shards left over */
    rp_tokenize_progress_fn progress;  /* may be NULL */
    void *progress_user;
} rp_tokenize_options;

typedef struct {
    uint64_t files, bytes, tokens, documents;
    uint32_t shards;         /* OUT_PREFIX-00000.tok .. OUT_PREFIX-(shards-1).tok */
    uint32_t removed_stale;  /* old shards removed (overwrite) */
} rp_tokenize_stats;

typedef struct rp_tokenize_run rp_tokenize_run;

/* Starts a run writing OUT_PREFIX-NNNNN.tok. opt may be NULL (defaults). The
 * tokenizer must outlive the run. */
rp_status rp_tokenize_begin(rp_tokenize_run **out, const char *out_prefix,
                            const rp_tokenizer *tok, const rp_tokenize_options *opt,
                            rp_error *err);
/* Tokenizes one input file into the run. A malformed JSONL line fails with
 * "FILE:LINE: ...". After a failure, only rp_tokenize_abort() is valid. */
rp_status rp_tokenize_add_file(rp_tokenize_run *run, const char *in_path, rp_input_kind kind,
                               rp_error *err);
/* Seals and renames every shard (an empty corpus gives one empty shard), then
 * frees the run (also on failure, removing the temporary files). */
rp_status rp_tokenize_finish(rp_tokenize_run *run, rp_tokenize_stats *stats, rp_error *err);
/* Removes the temporary files of an unfinished run and frees it. NULL is fine. */
void rp_tokenize_abort(rp_tokenize_run *run);
/* Counters so far (for progress reports). */
void rp_tokenize_get_stats(const rp_tokenize_run *run, rp_tokenize_stats *stats);

/* One file: begin + add_file + finish. */
rp_status rp_tokenize_file(const char *in_path, rp_input_kind kind, const rp_tokenizer *tok,
                           const char *out_prefix, const rp_tokenize_options *opt,
                           rp_tokenize_stats *stats, rp_error *err);

/* The input kind that RP_INPUT_AUTO picks for a path. */
rp_input_kind rp_tokenize_input_kind(const char *path);
/* Shard i's path: "<out_prefix>-%05u.tok" into buf; returns buf. */
char *rp_tokenize_shard_path(char *buf, size_t cap, const char *out_prefix, uint32_t index);

#endif
