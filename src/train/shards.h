/* Token shard files (.tok): the on-disk form of a tokenized corpus, written by
 * `rwkvpipe tokenize` (src/train/tokenize.c) and read (pread) by the data
 * loader (src/train/loader.c). Documents are separated by token 0.
 *
 * Layout (all integers little-endian; docs/formats.md "Token shards"):
 *   offset  size  field
 *        0     8  magic "RWKVTOK1"
 *        8     4  u32 version = 1
 *       12     4  u32 tokenizer kind: 0 = bytes, 1 = world
 *       16     4  u32 vocab n_ids (every token is < n_ids)
 *       20     4  u32 dtype of a token: 0 = u16, 1 = u32
 *       24     8  u64 n_tokens
 *       32     8  u64 n_documents (end-of-document tokens written in this shard)
 *       40    24  reserved, zero
 *       64     -  n_tokens tokens of 2 (u16) or 4 (u32) bytes; nothing after */
#ifndef RP_TRAIN_SHARDS_H
#define RP_TRAIN_SHARDS_H

#include <stddef.h>
#include <stdint.h>

#include "core/error.h"

#define RP_SHARD_MAGIC "RWKVTOK1"
#define RP_SHARD_VERSION 1u
#define RP_SHARD_HEADER_BYTES 64u

typedef enum { RP_SHARD_TOKENIZER_BYTES = 0, RP_SHARD_TOKENIZER_WORLD = 1 } rp_shard_tokenizer;
typedef enum { RP_SHARD_DTYPE_U16 = 0, RP_SHARD_DTYPE_U32 = 1 } rp_shard_dtype;

/* Tokenizer kind code for rp_tokenizer_kind()'s name ("bytes", "world");
 * -1 for any other name. */
int rp_shard_tokenizer_code(const char *kind_name);
const char *rp_shard_tokenizer_name(uint32_t code);

/* ------------------------------------------------------------------ writer */

/* Streaming writer: tokens are buffered and appended to a hidden temporary
 * file beside path (core/fileio.h);
 * finishing rewrites the header, fsyncs and renames, so a crash or an error
 * never leaves a file at `path` that looks complete. The dtype is u16 when
 * n_ids <= 65536, else u32. */
typedef struct rp_shard_writer rp_shard_writer;

rp_status rp_shard_writer_open(rp_shard_writer **out, const char *path, uint32_t tokenizer_kind,
                               uint32_t n_ids, rp_error *err);
/* Appends tokens; each must be in [0, n_ids) (an error names the first that
 * is not and its position in `tokens`). */
rp_status rp_shard_writer_append(rp_shard_writer *w, const int32_t *tokens, size_t n,
                                 rp_error *err);
/* Appends the end-of-document token 0 and counts a document. */
rp_status rp_shard_writer_end_document(rp_shard_writer *w, rp_error *err);
uint64_t rp_shard_writer_n_tokens(const rp_shard_writer *w);
const char *rp_shard_writer_path(const rp_shard_writer *w);

/* Writes the final header, fsyncs and closes the temporary file, which stays
 * under its temporary name: for writers of several shards that rename them
 * all only once every one is complete. After sealing, only commit, abort or
 * (finish =) seal + commit are valid. */
rp_status rp_shard_writer_seal(rp_shard_writer *w, rp_error *err);
/* Renames a sealed temporary file to its path (and fsyncs the directory). */
rp_status rp_shard_writer_commit(rp_shard_writer *w, rp_error *err);
/* seal + commit + free. On failure the temporary file is removed; w is freed
 * either way. */
rp_status rp_shard_writer_finish(rp_shard_writer *w, rp_error *err);
/* Removes the temporary file (if not yet committed) and frees. NULL is fine. */
void rp_shard_writer_abort(rp_shard_writer *w);
/* Frees a committed writer (abort would do the same; this reads better). */
void rp_shard_writer_free(rp_shard_writer *w);

/* ------------------------------------------------------------------ reader */

/* An open shard. Opening validates the header (magic, version, kind, dtype,
 * reserved bytes), the file size against n_tokens, and every token against
 * n_ids (one linear pass; the first bad position is named). Tokens are then
 * read with pread, not through a mapping: a shard truncated or rewritten
 * while training (another job re-tokenizing into the same directory, a full
 * disk) gives an error naming the shard and the offset instead of a SIGBUS
 * that kills the run. The file descriptor stays open until rp_shard_close,
 * so a shard replaced by rename keeps serving the file that was validated. */
typedef struct {
    char *path;
    uint32_t version;
    uint32_t tokenizer_kind;
    uint32_t n_ids;
    uint32_t dtype;
    uint32_t bytes_per_token;
    uint64_t n_tokens;
    uint64_t n_documents;
    uint64_t file_bytes;     /* size at open: header + n_tokens * bytes_per_token */
    int fd;                  /* -1 when closed */
} rp_shard;

rp_status rp_shard_open(rp_shard *shard, const char *path, rp_error *err);
void rp_shard_close(rp_shard *shard);

/* Copies tokens [start, start + n) as int32 (thread-safe: positioned reads).
 * Fails if the range leaves the shard (RP_ERR_ARG); if the file no longer
 * holds them, RP_ERR_IO with "shard X was truncated to N bytes while training
 * (it had M)" and the byte offset; a token outside [0, n_ids) (the file was
 * overwritten) is RP_ERR_FORMAT. */
rp_status rp_shard_read(const rp_shard *s, uint64_t start, size_t n, int32_t *out, rp_error *err);

#endif
