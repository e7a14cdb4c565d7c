/* Token shard writer (buffered, atomic through core/fileio.h) and reader
 * (positioned reads, full validation on open). The format is described in
 * shards.h. */
#include "train/shards.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "core/fileio.h"

#define WRITER_BUFFER_BYTES (1u << 20)

int rp_shard_tokenizer_code(const char *kind_name) {
    if (strcmp(kind_name, "bytes") == 0) return RP_SHARD_TOKENIZER_BYTES;
    if (strcmp(kind_name, "world") == 0) return RP_SHARD_TOKENIZER_WORLD;
    return -1;
}

const char *rp_shard_tokenizer_name(uint32_t code) {
    switch (code) {
    case RP_SHARD_TOKENIZER_BYTES: return "bytes";
    case RP_SHARD_TOKENIZER_WORLD: return "world";
    default: return "unknown";
    }
}

static void put_u32(uint8_t *p, uint32_t v) {
    for (int i = 0; i < 4; i++) p[i] = (uint8_t)(v >> (8 * i));
}
static void put_u64(uint8_t *p, uint64_t v) {
    for (int i = 0; i < 8; i++) p[i] = (uint8_t)(v >> (8 * i));
}
static uint32_t get_u32(const uint8_t *p) {
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}
static uint64_t get_u64(const uint8_t *p) {
    return (uint64_t)get_u32(p) | (uint64_t)get_u32(p + 4) << 32;
}

/* ------------------------------------------------------------------ writer */

typedef enum { WRITER_OPEN, WRITER_SEALED, WRITER_COMMITTED } writer_stage;

struct rp_shard_writer {
    char *path;
    rp_atomic_file file; /* the temporary file until committed */
    writer_stage stage;
    uint32_t tokenizer_kind, n_ids, dtype, bytes_per_token;
    uint64_t n_tokens, n_documents;
    uint8_t *buf;
    size_t buf_used;
};

const char *rp_shard_writer_path(const rp_shard_writer *w) { return w->path; }
uint64_t rp_shard_writer_n_tokens(const rp_shard_writer *w) { return w->n_tokens; }

rp_status rp_shard_writer_open(rp_shard_writer **out, const char *path, uint32_t tokenizer_kind,
                               uint32_t n_ids, rp_error *err) {
    *out = NULL;
    if (!path || !*path) return rp_error_set(err, RP_ERR_ARG, "token shard: empty output path");
    if (tokenizer_kind > RP_SHARD_TOKENIZER_WORLD)
        return rp_error_set(err, RP_ERR_ARG, "%s: tokenizer kind %u is not 0 (bytes) or 1 (world)",
                            path, tokenizer_kind);
    if (n_ids == 0 || n_ids > (uint32_t)INT32_MAX)
        return rp_error_set(err, RP_ERR_ARG, "%s: vocabulary size %u is not in [1, 2^31)", path,
                            n_ids);
    rp_shard_writer *w = rp_calloc(1, sizeof *w, "shard writer", err);
    if (!w) return RP_ERR_NOMEM;
    w->path = strdup(path);
    w->buf = malloc(WRITER_BUFFER_BYTES);
    if (!w->path || !w->buf) {
        free(w->path);
        free(w->buf);
        free(w);
        return rp_error_set(err, RP_ERR_NOMEM, "%s: out of memory for the shard writer", path);
    }
    w->tokenizer_kind = tokenizer_kind;
    w->n_ids = n_ids;
    w->dtype = n_ids <= 65536u ? RP_SHARD_DTYPE_U16 : RP_SHARD_DTYPE_U32;
    w->bytes_per_token = w->dtype == RP_SHARD_DTYPE_U16 ? 2 : 4;
    rp_status st = rp_atomic_file_open(&w->file, AT_FDCWD, path, 0644, 0, err);
    if (st != RP_OK) {
        free(w->path);
        free(w->buf);
        free(w);
        return st;
    }
    /* A zero header until sealing: an unfinished file never passes as a shard. */
    uint8_t zeros[RP_SHARD_HEADER_BYTES] = {0};
    if (rp_write_all(w->file.fd, zeros, sizeof zeros) != 0) {
        st = rp_error_set(err, RP_ERR_IO, "%s: cannot write temporary file '%s': %s", path,
                          w->file.tmp_path, strerror(errno));
        rp_shard_writer_abort(w);
        return st;
    }
    *out = w;
    return RP_OK;
}

static rp_status writer_flush(rp_shard_writer *w, rp_error *err) {
    if (w->buf_used == 0) return RP_OK;
    if (rp_write_all(w->file.fd, w->buf, w->buf_used) != 0)
        return rp_error_set(err, RP_ERR_IO, "%s: cannot write temporary file '%s': %s", w->path,
                            w->file.tmp_path, strerror(errno));
    w->buf_used = 0;
    return RP_OK;
}

static rp_status writer_check_open(const rp_shard_writer *w, rp_error *err) {
    if (w->stage != WRITER_OPEN)
        return rp_error_set(err, RP_ERR_INTERNAL, "%s: shard writer used after sealing", w->path);
    return RP_OK;
}

rp_status rp_shard_writer_append(rp_shard_writer *w, const int32_t *tokens, size_t n,
                                 rp_error *err) {
    rp_status st = writer_check_open(w, err);
    if (st != RP_OK) return st;
    for (size_t i = 0; i < n; i++) {
        int32_t t = tokens[i];
        if (t < 0 || (uint32_t)t >= w->n_ids)
            return rp_error_set(err, RP_ERR_ARG,
                                "%s: token %d at input position %zu is outside the vocabulary "
                                "[0, %u)",
                                w->path, t, i, w->n_ids);
        if (w->buf_used + 4 > WRITER_BUFFER_BYTES && (st = writer_flush(w, err)) != RP_OK)
            return st;
        uint8_t *p = w->buf + w->buf_used;
        p[0] = (uint8_t)t;
        p[1] = (uint8_t)(t >> 8);
        if (w->bytes_per_token == 4) {
            p[2] = (uint8_t)(t >> 16);
            p[3] = (uint8_t)(t >> 24);
        }
        w->buf_used += w->bytes_per_token;
    }
    w->n_tokens += n;
    return RP_OK;
}

rp_status rp_shard_writer_end_document(rp_shard_writer *w, rp_error *err) {
    static const int32_t eot = 0;
    rp_status st = rp_shard_writer_append(w, &eot, 1, err);
    if (st == RP_OK) w->n_documents++;
    return st;
}

rp_status rp_shard_writer_seal(rp_shard_writer *w, rp_error *err) {
    rp_status st = writer_check_open(w, err);
    if (st != RP_OK) return st;
    if ((st = writer_flush(w, err)) != RP_OK) return st;
    uint8_t h[RP_SHARD_HEADER_BYTES] = {0};
    memcpy(h, RP_SHARD_MAGIC, 8);
    put_u32(h + 8, RP_SHARD_VERSION);
    put_u32(h + 12, w->tokenizer_kind);
    put_u32(h + 16, w->n_ids);
    put_u32(h + 20, w->dtype);
    put_u64(h + 24, w->n_tokens);
    put_u64(h + 32, w->n_documents);
    if (rp_pwrite_all(w->file.fd, h, sizeof h, 0) != 0)
        return rp_error_set(err, RP_ERR_IO, "%s: cannot write the header of temporary file "
                            "'%s': %s", w->path, w->file.tmp_path, strerror(errno));
    if ((st = rp_atomic_file_seal(&w->file, err)) != RP_OK) return st;
    w->stage = WRITER_SEALED;
    return RP_OK;
}

rp_status rp_shard_writer_commit(rp_shard_writer *w, rp_error *err) {
    if (w->stage != WRITER_SEALED)
        return rp_error_set(err, RP_ERR_INTERNAL, "%s: shard writer committed before sealing",
                            w->path);
    rp_status st = rp_atomic_file_commit(&w->file, err);
    if (st == RP_OK) w->stage = WRITER_COMMITTED;
    return st;
}

rp_status rp_shard_writer_finish(rp_shard_writer *w, rp_error *err) {
    rp_status st = rp_shard_writer_seal(w, err);
    if (st == RP_OK) st = rp_shard_writer_commit(w, err);
    rp_shard_writer_abort(w);
    return st;
}

void rp_shard_writer_abort(rp_shard_writer *w) {
    if (!w) return;
    rp_atomic_file_end(&w->file);
    free(w->path);
    free(w->buf);
    free(w);
}

void rp_shard_writer_free(rp_shard_writer *w) { rp_shard_writer_abort(w); }

/* ------------------------------------------------------------------ reader */

void rp_shard_close(rp_shard *shard) {
    if (!shard) return;
    if (shard->path && shard->fd >= 0) close(shard->fd);
    free(shard->path);
    memset(shard, 0, sizeof *shard);
    shard->fd = -1;
}

/* The header fields, checked in the order a reader needs them. */
static rp_status check_header(rp_shard *s, const char *path, const uint8_t *h,
                              unsigned long long file_bytes, rp_error *err) {
    if (memcmp(h, RP_SHARD_MAGIC, 8) != 0) {
        char shown[8 * 4 + 1];
        size_t k = 0;
        for (int i = 0; i < 8; i++) {
            if (h[i] >= 0x20 && h[i] < 0x7f) shown[k++] = (char)h[i];
            else k += (size_t)snprintf(shown + k, sizeof shown - k, "\\x%02x", h[i]);
        }
        shown[k] = '\0';
        return rp_error_set(err, RP_ERR_FORMAT,
                            "%s: not a token shard (magic is \"%s\", expected \"%s\"); shards "
                            "are made by `rwkvpipe tokenize`",
                            path, shown, RP_SHARD_MAGIC);
    }
    s->version = get_u32(h + 8);
    s->tokenizer_kind = get_u32(h + 12);
    s->n_ids = get_u32(h + 16);
    s->dtype = get_u32(h + 20);
    s->n_tokens = get_u64(h + 24);
    s->n_documents = get_u64(h + 32);
    if (s->version != RP_SHARD_VERSION)
        return rp_error_set(err, RP_ERR_FORMAT,
                            "%s: token shard version %u is not supported (this build reads "
                            "version %u); re-tokenize the corpus with this rwkvpipe",
                            path, s->version, RP_SHARD_VERSION);
    if (s->tokenizer_kind > RP_SHARD_TOKENIZER_WORLD)
        return rp_error_set(err, RP_ERR_FORMAT,
                            "%s: tokenizer kind %u in the header is not 0 (bytes) or 1 (world)",
                            path, s->tokenizer_kind);
    if (s->dtype > RP_SHARD_DTYPE_U32)
        return rp_error_set(err, RP_ERR_FORMAT,
                            "%s: token dtype %u in the header is not 0 (u16) or 1 (u32)", path,
                            s->dtype);
    s->bytes_per_token = s->dtype == RP_SHARD_DTYPE_U16 ? 2 : 4;
    if (s->n_ids == 0)
        return rp_error_set(err, RP_ERR_FORMAT, "%s: vocabulary size 0 in the header", path);
    if (s->n_ids > (uint32_t)INT32_MAX)
        return rp_error_set(err, RP_ERR_FORMAT,
                            "%s: vocabulary size %u in the header exceeds the largest token id "
                            "rwkvpipe handles (2^31 - 1)",
                            path, s->n_ids);
    if (s->dtype == RP_SHARD_DTYPE_U16 && s->n_ids > 65536u)
        return rp_error_set(err, RP_ERR_FORMAT,
                            "%s: vocabulary of %u ids cannot be stored as u16 tokens (dtype 0); "
                            "the header is corrupt",
                            path, s->n_ids);
    for (int i = 40; i < 64; i++)
        if (h[i] != 0)
            return rp_error_set(err, RP_ERR_FORMAT,
                                "%s: reserved header byte %d is 0x%02x, expected 0 (a newer "
                                "format version?)",
                                path, i, h[i]);
    unsigned long long max_tokens = (~0ull - RP_SHARD_HEADER_BYTES) / s->bytes_per_token;
    if (s->n_tokens > max_tokens)
        return rp_error_set(err, RP_ERR_FORMAT, "%s: token count %llu in the header is impossible",
                            path, (unsigned long long)s->n_tokens);
    unsigned long long expected = RP_SHARD_HEADER_BYTES + s->n_tokens * s->bytes_per_token;
    if (file_bytes < expected)
        return rp_error_set(err, RP_ERR_FORMAT,
                            "%s: truncated: the header says %llu tokens of %u bytes (%llu bytes "
                            "in all) but the file has %llu bytes, %llu missing",
                            path, (unsigned long long)s->n_tokens, s->bytes_per_token, expected,
                            file_bytes, expected - file_bytes);
    if (file_bytes > expected)
        return rp_error_set(err, RP_ERR_FORMAT,
                            "%s: size mismatch: the header says %llu tokens of %u bytes (%llu "
                            "bytes in all) but the file has %llu bytes, %llu too many",
                            path, (unsigned long long)s->n_tokens, s->bytes_per_token, expected,
                            file_bytes, file_bytes - expected);
    if (s->n_documents > s->n_tokens)
        return rp_error_set(err, RP_ERR_FORMAT,
                            "%s: header counts %llu documents in %llu tokens (each document "
                            "ends with a token)",
                            path, (unsigned long long)s->n_documents,
                            (unsigned long long)s->n_tokens);
    return RP_OK;
}

/* Token value of little-endian bytes p (2 or 4 of them). */
static uint32_t decode_token(const uint8_t *p, uint32_t bytes_per_token) {
    if (bytes_per_token == 2) return (uint32_t)p[0] | (uint32_t)p[1] << 8;
    return get_u32(p);
}

/* Reads bytes [offset, offset + n) of the shard's file into buf. A short read
 * re-checks the file's size: the usual cause is a shard truncated after it
 * was opened, and the message says so with both sizes. */
static rp_status shard_pread(const rp_shard *s, uint8_t *buf, size_t n, uint64_t offset,
                             rp_error *err) {
    size_t done = 0;
    while (done < n) {
        ssize_t k = pread(s->fd, buf + done, n - done, (off_t)(offset + done));
        if (k < 0 && errno == EINTR) continue;
        if (k < 0)
            return rp_error_set(err, RP_ERR_IO, "%s: cannot read %zu bytes at byte offset %llu: %s",
                                s->path, n - done, (unsigned long long)(offset + done),
                                strerror(errno));
        if (k == 0) break;
        done += (size_t)k;
    }
    if (done == n) return RP_OK;
    struct stat sb;
    unsigned long long end = (unsigned long long)(offset + n);
    if (fstat(s->fd, &sb) == 0 && (uint64_t)sb.st_size < s->file_bytes)
        return rp_error_set(err, RP_ERR_IO,
                            "shard %s was truncated to %llu bytes while training (it had %llu); "
                            "the read of bytes [%llu, %llu) failed: restore the shard (or "
                            "re-tokenize) and resume from the last checkpoint",
                            s->path, (unsigned long long)sb.st_size,
                            (unsigned long long)s->file_bytes, (unsigned long long)offset, end);
    return rp_error_set(err, RP_ERR_IO,
                        "%s: the file ended at byte offset %llu while reading bytes [%llu, %llu) "
                        "(it had %llu bytes when opened)",
                        s->path, (unsigned long long)(offset + done), (unsigned long long)offset,
                        end, (unsigned long long)s->file_bytes);
}

#define VALIDATE_CHUNK_BYTES (1u << 20)

/* One linear pass over every token: a corrupt token is reported here, not as
 * a wrong embedding row (or an out-of-bounds read) somewhere in training. */
static rp_status validate_tokens(const rp_shard *s, rp_error *err) {
    uint8_t *buf = rp_malloc(VALIDATE_CHUNK_BYTES, "shard validation buffer", err);
    if (!buf) return RP_ERR_NOMEM;
    const uint64_t per_chunk = VALIDATE_CHUNK_BYTES / s->bytes_per_token;
    rp_status st = RP_OK;
    for (uint64_t first = 0; first < s->n_tokens && st == RP_OK; first += per_chunk) {
        uint64_t n = s->n_tokens - first < per_chunk ? s->n_tokens - first : per_chunk;
        st = shard_pread(s, buf, (size_t)(n * s->bytes_per_token),
                         RP_SHARD_HEADER_BYTES + first * s->bytes_per_token, err);
        if (st != RP_OK) break;
        uint32_t max = 0;
        for (uint64_t i = 0; i < n; i++) {
            uint32_t t = decode_token(buf + i * s->bytes_per_token, s->bytes_per_token);
            max = t > max ? t : max;
        }
        if (max < s->n_ids) continue;
        for (uint64_t i = 0; i < n; i++) {
            uint32_t t = decode_token(buf + i * s->bytes_per_token, s->bytes_per_token);
            if (t < s->n_ids) continue;
            uint64_t pos = first + i;
            st = rp_error_set(err, RP_ERR_FORMAT,
                              "%s: token %u at position %llu (byte offset %llu) is outside the "
                              "vocabulary [0, %u) of the header; the file is corrupt",
                              s->path, t, (unsigned long long)pos,
                              (unsigned long long)(RP_SHARD_HEADER_BYTES +
                                                   pos * s->bytes_per_token),
                              s->n_ids);
            break;
        }
    }
    free(buf);
    return st;
}

rp_status rp_shard_open(rp_shard *shard, const char *path, rp_error *err) {
    memset(shard, 0, sizeof *shard);
    shard->fd = -1;
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        int e = errno;
        return rp_error_set(err, RP_ERR_IO, "%s: cannot open token shard: %s%s", path,
                            strerror(e),
                            e == EMFILE ? " (every shard stays open while training: raise the "
                                          "limit with `ulimit -n` or use fewer, larger shards)"
                                        : "");
    }
    struct stat sb;
    if (fstat(fd, &sb) != 0) {
        rp_status st = rp_error_set(err, RP_ERR_IO, "%s: cannot stat: %s", path, strerror(errno));
        close(fd);
        return st;
    }
    if (!S_ISREG(sb.st_mode)) {
        close(fd);
        return rp_error_set(err, RP_ERR_IO, "%s: not a regular file", path);
    }
    unsigned long long file_bytes = (unsigned long long)sb.st_size;
    if (file_bytes < RP_SHARD_HEADER_BYTES) {
        close(fd);
        return rp_error_set(err, RP_ERR_FORMAT,
                            "%s: truncated: %llu bytes, shorter than the %u-byte token shard "
                            "header",
                            path, file_bytes, RP_SHARD_HEADER_BYTES);
    }
    shard->fd = fd;
    shard->file_bytes = file_bytes;
    shard->path = strdup(path);
    if (!shard->path) {
        close(fd);
        shard->fd = -1;
        return rp_error_set(err, RP_ERR_NOMEM, "%s: out of memory", path);
    }
    uint8_t h[RP_SHARD_HEADER_BYTES];
    rp_status st = shard_pread(shard, h, sizeof h, 0, err);
    if (st == RP_OK) st = check_header(shard, path, h, file_bytes, err);
    if (st == RP_OK) {
        posix_fadvise(fd, 0, 0, POSIX_FADV_SEQUENTIAL);
        st = validate_tokens(shard, err);
        posix_fadvise(fd, 0, 0, POSIX_FADV_RANDOM);
    }
    if (st != RP_OK) rp_shard_close(shard);
    return st;
}

rp_status rp_shard_read(const rp_shard *s, uint64_t start, size_t n, int32_t *out, rp_error *err) {
    if (start > s->n_tokens || n > s->n_tokens - start)
        return rp_error_set(err, RP_ERR_ARG, "%s: tokens [%llu, %llu) are outside the shard's %llu",
                            s->path, (unsigned long long)start, (unsigned long long)(start + n),
                            (unsigned long long)s->n_tokens);
    if (n == 0) return RP_OK;
    /* The raw tokens land in out itself (4 bytes per token there, at most 4
     * per token in the file) and are widened in place from the last one
     * down, so no token is overwritten before it is decoded. */
    const uint32_t bpt = s->bytes_per_token;
    uint8_t *raw = (uint8_t *)out;
    rp_status st = shard_pread(s, raw, n * bpt, RP_SHARD_HEADER_BYTES + start * bpt, err);
    if (st != RP_OK) return st;
    uint32_t max = 0;
    for (size_t i = n; i-- > 0;) {
        uint32_t t = decode_token(raw + i * bpt, bpt);
        out[i] = (int32_t)t;
        max = t > max ? t : max;
    }
    /* Validated at open; a file rewritten since must not index past the
     * embedding. */
    if (max >= s->n_ids)
        for (size_t i = 0; i < n; i++)
            if ((uint32_t)out[i] >= s->n_ids)
                return rp_error_set(err, RP_ERR_FORMAT,
                                    "%s: token %u at position %llu is outside the vocabulary "
                                    "[0, %u): the shard was overwritten while training",
                                    s->path, (uint32_t)out[i], (unsigned long long)(start + i),
                                    s->n_ids);
    return RP_OK;
}
