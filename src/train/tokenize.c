/* Streaming corpus tokenization into rotating token shards (tokenize.h).
 *
 * Text files are read in chunks and still encoded exactly as if whole: the
 * encoder is a greedy longest match, so the token starting at byte s depends
 * only on bytes [s, s + M) where M is the longest token in the vocabulary.
 * Of each chunk's tokens, those starting at s with s + M <= end-of-chunk are
 * final; the bytes from the first other token on (< M of them) are carried
 * into the next chunk and encoded again. */
#include "train/tokenize.h"

#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "train/shards.h"

struct rp_tokenize_run {
    char *out_prefix;
    const rp_tokenizer *tok;
    uint32_t tokenizer_kind, n_ids;
    size_t max_token_bytes;
    rp_tokenize_options opt;
    rp_shard_writer **sealed;   /* complete shards, still under temporary names */
    uint32_t n_sealed, cap_sealed;
    rp_shard_writer *current;   /* NULL between a full shard and the next token */
    rp_tokenize_stats stats;
    int failed;
};

rp_input_kind rp_tokenize_input_kind(const char *path) {
    size_t n = strlen(path);
    if ((n >= 6 && strcmp(path + n - 6, ".jsonl") == 0) ||
        (n >= 5 && strcmp(path + n - 5, ".json") == 0))
        return RP_INPUT_JSONL;
    return RP_INPUT_TEXT;
}

char *rp_tokenize_shard_path(char *buf, size_t cap, const char *out_prefix, uint32_t index) {
    snprintf(buf, cap, "%s-%05u.tok", out_prefix, index);
    return buf;
}

void rp_tokenize_get_stats(const rp_tokenize_run *run, rp_tokenize_stats *stats) {
    *stats = run->stats;
    stats->shards = run->n_sealed + (run->current ? 1 : 0);
}

static rp_status open_next_shard(rp_tokenize_run *run, rp_error *err) {
    uint32_t index = run->n_sealed;
    size_t cap = strlen(run->out_prefix) + 32;
    char *path = rp_malloc(cap, "shard path", err);
    if (!path) return RP_ERR_NOMEM;
    rp_tokenize_shard_path(path, cap, run->out_prefix, index);
    rp_status st = rp_shard_writer_open(&run->current, path, run->tokenizer_kind, run->n_ids, err);
    free(path);
    return st;
}

static rp_status seal_current(rp_tokenize_run *run, rp_error *err) {
    if (run->n_sealed == run->cap_sealed) {
        uint32_t cap = run->cap_sealed ? 2 * run->cap_sealed : 16;
        rp_shard_writer **grown = realloc(run->sealed, cap * sizeof *grown);
        if (!grown) return rp_error_set(err, RP_ERR_NOMEM, "out of memory for the shard list");
        run->sealed = grown;
        run->cap_sealed = cap;
    }
    rp_status st = rp_shard_writer_seal(run->current, err);
    if (st != RP_OK) return st;
    run->sealed[run->n_sealed++] = run->current;
    run->current = NULL;
    return RP_OK;
}

/* Room in the current shard, opening the next one when it is full. */
static rp_status shard_room(rp_tokenize_run *run, uint64_t *room, rp_error *err) {
    rp_status st;
    if (run->current && rp_shard_writer_n_tokens(run->current) >= run->opt.shard_tokens &&
        (st = seal_current(run, err)) != RP_OK)
        return st;
    if (!run->current && (st = open_next_shard(run, err)) != RP_OK) return st;
    *room = run->opt.shard_tokens - rp_shard_writer_n_tokens(run->current);
    return RP_OK;
}

static rp_status emit_tokens(rp_tokenize_run *run, const int32_t *ids, size_t n, rp_error *err) {
    while (n > 0) {
        uint64_t room;
        rp_status st = shard_room(run, &room, err);
        if (st != RP_OK) return st;
        size_t take = n < room ? n : (size_t)room;
        if ((st = rp_shard_writer_append(run->current, ids, take, err)) != RP_OK) return st;
        ids += take;
        n -= take;
        run->stats.tokens += take;
    }
    return RP_OK;
}

static rp_status emit_end_of_document(rp_tokenize_run *run, rp_error *err) {
    uint64_t room;
    rp_status st = shard_room(run, &room, err);
    if (st == RP_OK) st = rp_shard_writer_end_document(run->current, err);
    if (st == RP_OK) {
        run->stats.tokens++;
        run->stats.documents++;
    }
    return st;
}

rp_status rp_tokenize_begin(rp_tokenize_run **out, const char *out_prefix,
                            const rp_tokenizer *tok, const rp_tokenize_options *opt,
                            rp_error *err) {
    *out = NULL;
    if (!out_prefix || !*out_prefix)
        return rp_error_set(err, RP_ERR_ARG, "tokenize: empty output prefix");
    int kind = rp_shard_tokenizer_code(rp_tokenizer_kind(tok));
    if (kind < 0)
        return rp_error_set(err, RP_ERR_ARG, "tokenize: tokenizer kind '%s' has no shard code",
                            rp_tokenizer_kind(tok));
    rp_tokenize_run *run = rp_calloc(1, sizeof *run, "tokenize run", err);
    if (!run) return RP_ERR_NOMEM;
    if (opt) run->opt = *opt;
    if (run->opt.shard_tokens == 0) run->opt.shard_tokens = RP_TOKENIZE_DEFAULT_SHARD_TOKENS;
    if (run->opt.chunk_bytes == 0) run->opt.chunk_bytes = RP_TOKENIZE_DEFAULT_CHUNK_BYTES;
    run->tok = tok;
    run->tokenizer_kind = (uint32_t)kind;
    run->n_ids = (uint32_t)rp_tokenizer_n_ids(tok);
    for (int id = 0; id < rp_tokenizer_n_ids(tok); id++) {
        size_t len;
        if (rp_tokenizer_token_bytes(tok, id, &len) && len > run->max_token_bytes)
            run->max_token_bytes = len;
    }
    if (run->max_token_bytes == 0) run->max_token_bytes = 1;
    run->out_prefix = strdup(out_prefix);
    if (!run->out_prefix) {
        free(run);
        return rp_error_set(err, RP_ERR_NOMEM, "out of memory");
    }
    if (!run->opt.overwrite) {
        char first[4096];
        rp_tokenize_shard_path(first, sizeof first, out_prefix, 0);
        if (access(first, F_OK) == 0) {
            rp_tokenize_abort(run);
            return rp_error_set(err, RP_ERR_ARG,
                                "%s already exists; remove the old shards, choose another "
                                "output prefix or allow overwriting (--force)",
                                first);
        }
    }
    /* Opened now so that a bad output directory fails before any input is read. */
    rp_status st = open_next_shard(run, err);
    if (st != RP_OK) {
        rp_tokenize_abort(run);
        return st;
    }
    *out = run;
    return RP_OK;
}

/* Reads until buf is full or the file ends; *got < n means end of file. */
static rp_status read_fully(int fd, const char *path, uint8_t *buf, size_t n, size_t *got,
                            rp_error *err) {
    size_t total = 0;
    *got = 0;
    while (total < n) {
        ssize_t k = read(fd, buf + total, n - total);
        if (k < 0) {
            if (errno == EINTR) continue;
            return rp_error_set(err, RP_ERR_IO, "%s: read failed: %s", path, strerror(errno));
        }
        if (k == 0) break;
        total += (size_t)k;
    }
    *got = total;
    return RP_OK;
}

static void report(const rp_tokenize_run *run, uint64_t done, uint64_t total) {
    if (run->opt.progress) run->opt.progress(done, total, run->stats.tokens, run->opt.progress_user);
}

static rp_status tokenize_text(rp_tokenize_run *run, int fd, const char *path,
                               uint64_t file_bytes, rp_error *err) {
    const size_t M = run->max_token_bytes, chunk = run->opt.chunk_bytes;
    uint8_t *buf = rp_malloc(chunk + M, "text chunk", err);
    if (!buf) return RP_ERR_NOMEM;
    size_t len = 0;            /* bytes in buf: carry + new chunk */
    uint64_t buf_offset = 0;   /* file offset of buf[0] */
    uint64_t doc_tokens = 0;
    rp_status st = RP_OK;
    for (;;) {
        size_t got;
        if ((st = read_fully(fd, path, buf + len, chunk, &got, err)) != RP_OK) break;
        len += got;
        int eof = got < chunk;
        int32_t *ids;
        size_t n_ids;
        if ((st = rp_tokenizer_encode(run->tok, buf, len, &ids, &n_ids, err)) != RP_OK) {
            rp_error_prefix(err, "%s (chunk starting at byte %llu)", path,
                            (unsigned long long)buf_offset);
            break;
        }
        size_t n_final = n_ids, consumed = len;
        if (!eof) {
            size_t start = 0;
            n_final = 0;
            while (n_final < n_ids && start + M <= len) {
                size_t tl;
                rp_tokenizer_token_bytes(run->tok, ids[n_final], &tl);
                start += tl;
                n_final++;
            }
            consumed = start;
        }
        st = emit_tokens(run, ids, n_final, err);
        free(ids);
        if (st != RP_OK) break;
        doc_tokens += n_final;
        memmove(buf, buf + consumed, len - consumed);
        len -= consumed;
        buf_offset += consumed;
        report(run, buf_offset + len, file_bytes);
        if (eof) break;
    }
    free(buf);
    if (st == RP_OK && doc_tokens > 0) st = emit_end_of_document(run, err);
    return st;
}

static int is_blank(const char *s, size_t n) {
    for (size_t i = 0; i < n; i++)
        if (s[i] != ' ' && s[i] != '\t' && s[i] != '\r' && s[i] != '\n') return 0;
    return 1;
}

static rp_status tokenize_json_line(rp_tokenize_run *run, const char *path,
                                    unsigned long long line_no, const char *line, size_t n,
                                    rp_error *err) {
    if (is_blank(line, n)) return RP_OK;
    json_error_t jerr;
    json_t *root = json_loadb(line, n, JSON_ALLOW_NUL, &jerr);
    if (!root)
        return rp_error_set(err, RP_ERR_FORMAT, "%s:%llu: invalid JSON at column %d: %s", path,
                            line_no, jerr.column, jerr.text);
    json_t *text = json_is_object(root) ? json_object_get(root, "text") : NULL;
    if (!text || !json_is_string(text)) {
        const char *what = !json_is_object(root) ? "the line is not a JSON object"
                           : !text               ? "the object has no \"text\" field"
                                                 : "its \"text\" field is not a string";
        json_decref(root);
        return rp_error_set(err, RP_ERR_FORMAT,
                            "%s:%llu: expected an object with a \"text\" string, but %s", path,
                            line_no, what);
    }
    int32_t *ids;
    size_t n_ids;
    rp_status st = rp_tokenizer_encode(run->tok, (const uint8_t *)json_string_value(text),
                                       json_string_length(text), &ids, &n_ids, err);
    json_decref(root);
    if (st != RP_OK) return rp_error_prefix(err, "%s:%llu", path, line_no);
    st = emit_tokens(run, ids, n_ids, err);
    free(ids);
    if (st == RP_OK && n_ids > 0) st = emit_end_of_document(run, err);
    return st;
}

static rp_status tokenize_jsonl(rp_tokenize_run *run, int fd, const char *path,
                                uint64_t file_bytes, rp_error *err) {
    size_t cap = run->opt.chunk_bytes;
    char *buf = rp_malloc(cap, "JSONL chunk", err);
    if (!buf) return RP_ERR_NOMEM;
    size_t len = 0;
    uint64_t read_bytes = 0;
    unsigned long long line_no = 0;
    rp_status st = RP_OK;
    for (;;) {
        if (len == cap) { /* one line longer than the buffer: it has to fit whole */
            char *grown = realloc(buf, 2 * cap);
            if (!grown) {
                st = rp_error_set(err, RP_ERR_NOMEM, "%s:%llu: out of memory for a %zu-byte line",
                                  path, line_no + 1, len);
                break;
            }
            buf = grown;
            cap *= 2;
        }
        size_t got;
        if ((st = read_fully(fd, path, (uint8_t *)buf + len, cap - len, &got, err)) != RP_OK) break;
        int eof = got < cap - len;
        len += got;
        read_bytes += got;
        size_t begin = 0;
        for (;;) {
            char *nl = memchr(buf + begin, '\n', len - begin);
            if (!nl) break;
            size_t end = (size_t)(nl - buf);
            if ((st = tokenize_json_line(run, path, ++line_no, buf + begin, end - begin, err)) != RP_OK)
                break;
            begin = end + 1;
        }
        if (st != RP_OK) break;
        if (eof) {
            if (begin < len) st = tokenize_json_line(run, path, ++line_no, buf + begin, len - begin, err);
            break;
        }
        memmove(buf, buf + begin, len - begin);
        len -= begin;
        report(run, read_bytes - len, file_bytes);
    }
    free(buf);
    return st;
}

rp_status rp_tokenize_add_file(rp_tokenize_run *run, const char *in_path, rp_input_kind kind,
                               rp_error *err) {
    if (run->failed)
        return rp_error_set(err, RP_ERR_INTERNAL, "tokenize: run used after a failure");
    int fd = open(in_path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        run->failed = 1;
        return rp_error_set(err, RP_ERR_IO, "%s: cannot open: %s", in_path, strerror(errno));
    }
    struct stat sb;
    uint64_t file_bytes = fstat(fd, &sb) == 0 && S_ISREG(sb.st_mode) ? (uint64_t)sb.st_size : 0;
    if (kind == RP_INPUT_AUTO) kind = rp_tokenize_input_kind(in_path);
    posix_fadvise(fd, 0, 0, POSIX_FADV_SEQUENTIAL);
    rp_status st = kind == RP_INPUT_JSONL ? tokenize_jsonl(run, fd, in_path, file_bytes, err)
                                          : tokenize_text(run, fd, in_path, file_bytes, err);
    close(fd);
    if (st != RP_OK) {
        run->failed = 1;
        return st;
    }
    run->stats.files++;
    run->stats.bytes += file_bytes;
    report(run, file_bytes, file_bytes);
    return RP_OK;
}

rp_status rp_tokenize_finish(rp_tokenize_run *run, rp_tokenize_stats *stats, rp_error *err) {
    rp_status st = RP_OK;
    if (run->failed) st = rp_error_set(err, RP_ERR_INTERNAL, "tokenize: finishing a failed run");
    if (st == RP_OK && run->current) st = seal_current(run, err);
    /* Only now, with every input read and every shard complete, do the
     * shards get their real names. */
    for (uint32_t i = 0; st == RP_OK && i < run->n_sealed; i++)
        st = rp_shard_writer_commit(run->sealed[i], err);
    if (st == RP_OK && run->opt.overwrite) {
        size_t cap = strlen(run->out_prefix) + 32;
        char *path = rp_malloc(cap, "shard path", err);
        if (!path) st = RP_ERR_NOMEM;
        for (uint32_t i = run->n_sealed; path; i++) {
            rp_tokenize_shard_path(path, cap, run->out_prefix, i);
            if (unlink(path) != 0) break;
            run->stats.removed_stale++;
        }
        free(path);
    }
    if (stats) rp_tokenize_get_stats(run, stats);
    rp_tokenize_abort(run);
    return st;
}

void rp_tokenize_abort(rp_tokenize_run *run) {
    if (!run) return;
    rp_shard_writer_abort(run->current);
    for (uint32_t i = 0; i < run->n_sealed; i++) rp_shard_writer_abort(run->sealed[i]);
    free(run->sealed);
    free(run->out_prefix);
    free(run);
}

rp_status rp_tokenize_file(const char *in_path, rp_input_kind kind, const rp_tokenizer *tok,
                           const char *out_prefix, const rp_tokenize_options *opt,
                           rp_tokenize_stats *stats, rp_error *err) {
    rp_tokenize_run *run;
    rp_status st = rp_tokenize_begin(&run, out_prefix, tok, opt, err);
    if (st != RP_OK) return st;
    if ((st = rp_tokenize_add_file(run, in_path, kind, err)) != RP_OK) {
        rp_tokenize_abort(run);
        return st;
    }
    return rp_tokenize_finish(run, stats, err);
}
