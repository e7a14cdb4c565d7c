/* Tokenizers (see tokenizer.h): the byte-level one and the RWKV World one
 * parsed from rwkv_vocab_v20230424.txt (Python str/bytes literals, one token a
 * line), plus the streaming UTF-8 boundary keeper. Called by src/cli, the data
 * loader and the server. Encoding walks a byte trie whose edges live in one
 * open-addressing hash table, so a step costs one probe whatever the fan-out. */
#include "text/tokenizer.h"

#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

enum { RP_TOK_BYTES, RP_TOK_WORLD };

/* Ids are bounded so a typo like "4000000000" cannot make us allocate
 * gigabytes of per-id tables; real vocabularies are below 2^18. */
#define RP_TOK_MAX_ID (1 << 24)
/* Trie nodes are packed with their edge byte into a uint32 hash key. */
#define RP_TOK_MAX_NODES (1u << 24)
#define RP_TOK_NO_CHILD UINT32_MAX

struct rp_tokenizer {
    int kind;
    int n_ids;
    uint8_t *blob;          /* token bytes, concatenated */
    uint32_t *offset;       /* [n_ids] start of token id in blob */
    uint32_t *length;       /* [n_ids] byte length; 0 = id has no token */
    /* World only: trie. Node 0 is the root. node_id[n] is the token ending at
     * node n or -1. Edge (node, byte) -> child is stored under key
     * ((node << 8) | byte) + 1 (0 marks an empty slot). */
    int32_t *node_id;
    uint32_t n_nodes;
    uint32_t *edge_key;
    uint32_t *edge_child;
    uint32_t edge_mask;
    unsigned edge_bits;
    uint32_t root_child[256]; /* the root is hit once per token: no hashing */
};

/* Fibonacci hashing: the top bits of key * 2^32/phi. */
static inline uint32_t edge_slot(uint32_t key, unsigned bits) {
    return (key * 0x9E3779B1u) >> (32 - bits);
}

static uint32_t trie_child(const rp_tokenizer *tok, uint32_t node, uint8_t byte) {
    if (node == 0) return tok->root_child[byte];
    uint32_t key = ((node << 8) | byte) + 1;
    for (uint32_t s = edge_slot(key, tok->edge_bits);; s = (s + 1) & tok->edge_mask) {
        if (tok->edge_key[s] == key) return tok->edge_child[s];
        if (tok->edge_key[s] == 0) return RP_TOK_NO_CHILD;
    }
}

/* Returns the child, creating it (the caller sized the tables for the total
 * token bytes, so there is always room). */
static uint32_t trie_child_add(rp_tokenizer *tok, uint32_t node, uint8_t byte) {
    if (node == 0) {
        if (tok->root_child[byte] == RP_TOK_NO_CHILD) {
            tok->node_id[tok->n_nodes] = -1;
            tok->root_child[byte] = tok->n_nodes++;
        }
        return tok->root_child[byte];
    }
    uint32_t key = ((node << 8) | byte) + 1;
    uint32_t s = edge_slot(key, tok->edge_bits);
    for (;; s = (s + 1) & tok->edge_mask) {
        if (tok->edge_key[s] == key) return tok->edge_child[s];
        if (tok->edge_key[s] == 0) break;
    }
    tok->node_id[tok->n_nodes] = -1;
    tok->edge_key[s] = key;
    tok->edge_child[s] = tok->n_nodes;
    return tok->n_nodes++;
}

/* ---- UTF-8 --------------------------------------------------------------- */

/* Length of the valid UTF-8 sequence starting at p (at most avail bytes):
 * > 0 a complete valid character of that many bytes; 0 a valid prefix that
 * needs more bytes; -1 the lead byte can never start a valid character here. */
static int utf8_sequence(const uint8_t *p, size_t avail) {
    uint8_t b = p[0];
    int need;
    uint8_t lo = 0x80, hi = 0xBF; /* allowed range of the second byte */
    if (b < 0x80) return 1;
    if (b >= 0xC2 && b <= 0xDF) need = 2;
    else if (b >= 0xE0 && b <= 0xEF) {
        need = 3;
        if (b == 0xE0) lo = 0xA0;      /* overlong */
        else if (b == 0xED) hi = 0x9F; /* surrogates */
    } else if (b >= 0xF0 && b <= 0xF4) {
        need = 4;
        if (b == 0xF0) lo = 0x90;      /* overlong */
        else if (b == 0xF4) hi = 0x8F; /* > U+10FFFF */
    } else {
        return -1;
    }
    for (int i = 1; i < need; i++) {
        if ((size_t)i >= avail) return 0;
        uint8_t c = p[i];
        if (i == 1 ? (c < lo || c > hi) : (c < 0x80 || c > 0xBF)) return -1;
    }
    return need;
}

static int utf8_put(uint8_t *out, uint32_t cp) {
    if (cp < 0x80) {
        out[0] = (uint8_t)cp;
        return 1;
    }
    if (cp < 0x800) {
        out[0] = (uint8_t)(0xC0 | (cp >> 6));
        out[1] = (uint8_t)(0x80 | (cp & 0x3F));
        return 2;
    }
    if (cp < 0x10000) {
        out[0] = (uint8_t)(0xE0 | (cp >> 12));
        out[1] = (uint8_t)(0x80 | ((cp >> 6) & 0x3F));
        out[2] = (uint8_t)(0x80 | (cp & 0x3F));
        return 3;
    }
    out[0] = (uint8_t)(0xF0 | (cp >> 18));
    out[1] = (uint8_t)(0x80 | ((cp >> 12) & 0x3F));
    out[2] = (uint8_t)(0x80 | ((cp >> 6) & 0x3F));
    out[3] = (uint8_t)(0x80 | (cp & 0x3F));
    return 4;
}

/* ---- vocab file parsing -------------------------------------------------- */

static int hex_value(char c) {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
}

/* Parses a decimal field of the whole span [s, s+n); -1 if not a number or
 * larger than RP_TOK_MAX_ID. */
static long parse_decimal(const char *s, size_t n) {
    if (n == 0 || n > 9) return -1;
    long v = 0;
    for (size_t i = 0; i < n; i++) {
        if (s[i] < '0' || s[i] > '9') return -1;
        v = v * 10 + (s[i] - '0');
    }
    return v;
}

/* Decodes the Python literal lit[0..n) (str '...'/"..." or bytes b'...') into
 * out, which needs room for n bytes: nothing expands (\xHH in a str is 4
 * characters and at most 2 bytes, \uHHHH 6 and 3, \UHHHHHHHH 10 and 4, an
 * octal escape 2-4 and at most 2). On error writes a message (without
 * file:line) to why and returns -1. */
static long parse_literal(const char *lit, size_t n, uint8_t *out, char *why, size_t why_len) {
    size_t i = 0;
    int is_bytes = 0;
    if (n > 0 && (lit[0] == 'b' || lit[0] == 'B')) {
        is_bytes = 1;
        i = 1;
    }
    if (i >= n || (lit[i] != '\'' && lit[i] != '"')) {
        snprintf(why, why_len, "literal must start with ', \" or b' (got '%.*s')", (int)(n < 20 ? n : 20), lit);
        return -1;
    }
    char quote = lit[i++];
    long len = 0;
    for (;;) {
        if (i >= n) {
            snprintf(why, why_len, "unterminated literal (no closing %c)", quote);
            return -1;
        }
        unsigned char c = (unsigned char)lit[i];
        if (c == (unsigned char)quote) {
            i++;
            break;
        }
        if (c != '\\') {
            if (is_bytes) {
                if (c >= 0x80) {
                    snprintf(why, why_len, "non-ASCII byte 0x%02x in a bytes literal (use \\x escapes)", c);
                    return -1;
                }
                out[len++] = c;
                i++;
                continue;
            }
            int k = utf8_sequence((const uint8_t *)lit + i, n - i);
            if (k <= 0) {
                snprintf(why, why_len, "invalid UTF-8 byte 0x%02x in str literal", c);
                return -1;
            }
            memcpy(out + len, lit + i, (size_t)k);
            len += k;
            i += (size_t)k;
            continue;
        }
        /* escape */
        if (i + 1 >= n) {
            snprintf(why, why_len, "unterminated literal (ends in a backslash)");
            return -1;
        }
        char e = lit[i + 1];
        i += 2;
        uint32_t value;
        int is_code_point = !is_bytes; /* numeric escapes: code point in str, byte in bytes */
        switch (e) {
        case '\\': value = '\\'; break;
        case '\'': value = '\''; break;
        case '"': value = '"'; break;
        case 'a': value = 0x07; break;
        case 'b': value = 0x08; break;
        case 'f': value = 0x0C; break;
        case 'n': value = 0x0A; break;
        case 'r': value = 0x0D; break;
        case 't': value = 0x09; break;
        case 'v': value = 0x0B; break;
        case '0': case '1': case '2': case '3': case '4': case '5': case '6': case '7': {
            value = (uint32_t)(e - '0');
            for (int d = 0; d < 2 && i < n && lit[i] >= '0' && lit[i] <= '7'; d++) value = value * 8 + (uint32_t)(lit[i++] - '0');
            if (is_bytes && value > 0xFF) {
                snprintf(why, why_len, "octal escape \\%o is over \\377 in a bytes literal", value);
                return -1;
            }
            break;
        }
        case 'x': case 'u': case 'U': {
            int digits = e == 'x' ? 2 : e == 'u' ? 4 : 8;
            if (e != 'x' && is_bytes) {
                snprintf(why, why_len, "bad escape \\%c: not allowed in a bytes literal", e);
                return -1;
            }
            value = 0;
            for (int d = 0; d < digits; d++) {
                int h = i < n ? hex_value(lit[i]) : -1;
                if (h < 0) {
                    snprintf(why, why_len, "bad escape \\%c: expected %d hex digits", e, digits);
                    return -1;
                }
                value = value * 16 + (uint32_t)h;
                i++;
            }
            if (is_code_point && (value > 0x10FFFF || (value >= 0xD800 && value <= 0xDFFF))) {
                snprintf(why, why_len, "bad escape \\%c: U+%04X is not encodable in UTF-8", e, value);
                return -1;
            }
            break;
        }
        default:
            if ((unsigned char)e >= 0x20 && (unsigned char)e < 0x7F)
                snprintf(why, why_len, "bad escape \\%c", e);
            else
                snprintf(why, why_len, "bad escape \\ followed by byte 0x%02x", (unsigned char)e);
            return -1;
        }
        if (is_code_point) len += utf8_put(out + len, value);
        else out[len++] = (uint8_t)value;
    }
    if (i != n) {
        snprintf(why, why_len, "unexpected text after the closing %c", quote);
        return -1;
    }
    return len;
}

typedef struct {
    int32_t id;
    uint32_t line;
    uint32_t offset, length;
} vocab_entry;

static rp_status read_file(const char *path, char **data, size_t *size, rp_error *err) {
    FILE *f = fopen(path, "rb");
    if (!f) return rp_error_set(err, RP_ERR_IO, "%s: cannot open vocab file: %s", path, strerror(errno));
    size_t cap = 1 << 20, n = 0;
    char *buf = rp_malloc(cap, "vocab file", err);
    if (!buf) {
        fclose(f);
        return RP_ERR_NOMEM;
    }
    for (;;) {
        if (n == cap) {
            char *grown = realloc(buf, cap * 2);
            if (!grown) {
                free(buf);
                fclose(f);
                return rp_error_set(err, RP_ERR_NOMEM, "%s: cannot allocate %zu bytes", path, cap * 2);
            }
            buf = grown;
            cap *= 2;
        }
        size_t got = fread(buf + n, 1, cap - n, f);
        n += got;
        if (got == 0) break;
    }
    int failed = ferror(f);
    fclose(f);
    if (failed) {
        free(buf);
        return rp_error_set(err, RP_ERR_IO, "%s: read error", path);
    }
    *data = buf;
    *size = n;
    return RP_OK;
}

static rp_status build_trie(rp_tokenizer *tok, const char *path, const vocab_entry *entries,
                            size_t n_entries, size_t total_bytes, rp_error *err) {
    if (total_bytes + 1 >= RP_TOK_MAX_NODES)
        return rp_error_set(err, RP_ERR_FORMAT, "%s: %zu bytes of tokens, more than this tokenizer supports (%u)",
                            path, total_bytes, RP_TOK_MAX_NODES - 1);
    size_t max_nodes = total_bytes + 1;
    uint32_t slots = 1024;
    unsigned bits = 10;
    while (slots < 2 * max_nodes) {
        slots *= 2;
        bits++;
    }
    tok->node_id = rp_malloc(max_nodes * sizeof *tok->node_id, "tokenizer trie", err);
    tok->edge_key = rp_calloc(slots, sizeof *tok->edge_key, "tokenizer trie", err);
    tok->edge_child = rp_malloc((size_t)slots * sizeof *tok->edge_child, "tokenizer trie", err);
    if (!tok->node_id || !tok->edge_key || !tok->edge_child) return RP_ERR_NOMEM;
    tok->edge_mask = slots - 1;
    tok->edge_bits = bits;
    for (int b = 0; b < 256; b++) tok->root_child[b] = RP_TOK_NO_CHILD;
    tok->node_id[0] = -1;
    tok->n_nodes = 1;
    for (size_t e = 0; e < n_entries; e++) {
        uint32_t node = 0;
        const uint8_t *bytes = tok->blob + entries[e].offset;
        for (uint32_t k = 0; k < entries[e].length; k++) node = trie_child_add(tok, node, bytes[k]);
        if (tok->node_id[node] >= 0) {
            int32_t first = tok->node_id[node];
            uint32_t first_line = 0;
            for (size_t j = 0; j < e; j++)
                if (entries[j].id == first) first_line = entries[j].line;
            return rp_error_set(err, RP_ERR_FORMAT, "%s:%u: token %d has the same bytes as token %d (line %u)",
                                path, entries[e].line, entries[e].id, first, first_line);
        }
        tok->node_id[node] = entries[e].id;
    }
    return RP_OK;
}

static rp_status load_world(rp_tokenizer *tok, const char *path, rp_error *err) {
    char *data = NULL;
    size_t size = 0;
    rp_status st = read_file(path, &data, &size, err);
    if (st != RP_OK) return st;

    /* A literal never decodes to more bytes than its source text (see
     * parse_literal), so the file size bounds the blob. */
    vocab_entry *entries = NULL;
    uint32_t *id_line = NULL; /* line that defined each id (0 = none yet) */
    size_t n_entries = 0, cap_entries = 0, id_line_cap = 0, blob_len = 0;
    long max_id = 0;
    tok->blob = rp_malloc(size + 1, "vocab token bytes", err);
    if (!tok->blob) {
        st = RP_ERR_NOMEM;
        goto done;
    }

    uint32_t line_no = 0;
    for (size_t pos = 0; pos < size;) {
        line_no++;
        const char *line = data + pos;
        const char *nl = memchr(line, '\n', size - pos);
        size_t n = nl ? (size_t)(nl - line) : size - pos;
        pos += n + (nl ? 1 : 0);
        if (n > 0 && line[n - 1] == '\r') n--; /* Python reads with universal newlines */

        const char *first_space = memchr(line, ' ', n);
        const char *last_space = NULL;
        for (size_t k = n; k > 0; k--)
            if (line[k - 1] == ' ') {
                last_space = line + k - 1;
                break;
            }
        if (!first_space || first_space == last_space) {
            st = rp_error_set(err, RP_ERR_FORMAT, "%s:%u: missing fields: expected '<id> <literal> <byte length>'",
                              path, line_no);
            goto done;
        }
        size_t id_len = (size_t)(first_space - line);
        long id = parse_decimal(line, id_len);
        if (id < 1 || id >= RP_TOK_MAX_ID) {
            st = rp_error_set(err, RP_ERR_FORMAT, "%s:%u: bad id '%.*s': expected an integer in 1..%d", path,
                              line_no, (int)(id_len < 32 ? id_len : 32), line, RP_TOK_MAX_ID - 1);
            goto done;
        }
        const char *len_text = last_space + 1;
        size_t len_text_n = (size_t)(line + n - len_text);
        long stated = parse_decimal(len_text, len_text_n);
        if (stated < 0) {
            st = rp_error_set(err, RP_ERR_FORMAT, "%s:%u: bad byte length '%.*s': expected a non-negative integer",
                              path, line_no, (int)(len_text_n < 32 ? len_text_n : 32), len_text);
            goto done;
        }
        char why[256];
        const char *lit = first_space + 1;
        size_t lit_n = (size_t)(last_space - lit);
        long got = parse_literal(lit, lit_n, tok->blob + blob_len, why, sizeof why);
        if (got < 0) {
            st = rp_error_set(err, RP_ERR_FORMAT, "%s:%u: %s", path, line_no, why);
            goto done;
        }
        if (got == 0) {
            st = rp_error_set(err, RP_ERR_FORMAT, "%s:%u: empty token (every token needs at least one byte)", path,
                              line_no);
            goto done;
        }
        if (got != stated) {
            st = rp_error_set(err, RP_ERR_FORMAT, "%s:%u: byte length %ld does not match literal (%ld bytes)", path,
                              line_no, stated, got);
            goto done;
        }
        if ((size_t)id >= id_line_cap) {
            size_t new_cap = id_line_cap ? id_line_cap : 1024;
            while (new_cap <= (size_t)id) new_cap *= 2;
            uint32_t *grown = realloc(id_line, new_cap * sizeof *grown);
            if (!grown) {
                st = rp_error_set(err, RP_ERR_NOMEM, "%s: cannot allocate the id table", path);
                goto done;
            }
            memset(grown + id_line_cap, 0, (new_cap - id_line_cap) * sizeof *grown);
            id_line = grown;
            id_line_cap = new_cap;
        }
        if (id_line[id]) {
            st = rp_error_set(err, RP_ERR_FORMAT, "%s:%u: duplicate id %ld (first defined on line %u)", path, line_no,
                              id, id_line[id]);
            goto done;
        }
        id_line[id] = line_no;
        if (n_entries == cap_entries) {
            size_t new_cap = cap_entries ? 2 * cap_entries : 4096;
            vocab_entry *grown = realloc(entries, new_cap * sizeof *grown);
            if (!grown) {
                st = rp_error_set(err, RP_ERR_NOMEM, "%s: cannot allocate the token table", path);
                goto done;
            }
            entries = grown;
            cap_entries = new_cap;
        }
        entries[n_entries++] = (vocab_entry){(int32_t)id, line_no, (uint32_t)blob_len, (uint32_t)got};
        blob_len += (size_t)got;
        if (id > max_id) max_id = id;
    }
    if (n_entries == 0) {
        st = rp_error_set(err, RP_ERR_FORMAT, "%s: no tokens in vocab file", path);
        goto done;
    }

    tok->n_ids = (int)max_id + 1;
    tok->offset = rp_calloc((size_t)tok->n_ids, sizeof *tok->offset, "token offsets", err);
    tok->length = rp_calloc((size_t)tok->n_ids, sizeof *tok->length, "token lengths", err);
    if (!tok->offset || !tok->length) {
        st = RP_ERR_NOMEM;
        goto done;
    }
    for (size_t e = 0; e < n_entries; e++) {
        tok->offset[entries[e].id] = entries[e].offset;
        tok->length[entries[e].id] = entries[e].length;
    }
    st = build_trie(tok, path, entries, n_entries, blob_len, err);

done:
    free(entries);
    free(id_line);
    free(data);
    return st;
}

/* ---- public API ---------------------------------------------------------- */

rp_status rp_tokenizer_open(rp_tokenizer **out, const char *spec, rp_error *err) {
    *out = NULL;
    if (!spec || !*spec)
        return rp_error_set(err, RP_ERR_ARG, "tokenizer: empty spec; expected \"bytes\" or a vocab file path");
    rp_tokenizer *tok = rp_calloc(1, sizeof *tok, "tokenizer", err);
    if (!tok) return RP_ERR_NOMEM;
    rp_status st = RP_OK;
    if (strcmp(spec, "bytes") == 0) {
        tok->kind = RP_TOK_BYTES;
        tok->n_ids = 256;
        tok->blob = rp_malloc(256, "byte tokens", err);
        tok->offset = rp_malloc(256 * sizeof *tok->offset, "byte tokens", err);
        tok->length = rp_malloc(256 * sizeof *tok->length, "byte tokens", err);
        if (!tok->blob || !tok->offset || !tok->length) {
            st = RP_ERR_NOMEM;
        } else {
            for (int b = 0; b < 256; b++) {
                tok->blob[b] = (uint8_t)b;
                tok->offset[b] = (uint32_t)b;
                tok->length[b] = 1;
            }
        }
    } else {
        tok->kind = RP_TOK_WORLD;
        st = load_world(tok, spec, err);
    }
    if (st != RP_OK) {
        rp_tokenizer_free(tok);
        return st;
    }
    *out = tok;
    return RP_OK;
}

void rp_tokenizer_free(rp_tokenizer *tok) {
    if (!tok) return;
    free(tok->blob);
    free(tok->offset);
    free(tok->length);
    free(tok->node_id);
    free(tok->edge_key);
    free(tok->edge_child);
    free(tok);
}

const char *rp_tokenizer_kind(const rp_tokenizer *tok) {
    return tok->kind == RP_TOK_BYTES ? "bytes" : "world";
}

int rp_tokenizer_n_ids(const rp_tokenizer *tok) { return tok->n_ids; }

int rp_tokenizer_eot_id(const rp_tokenizer *tok) {
    (void)tok;
    return 0;
}

rp_status rp_tokenizer_encode(const rp_tokenizer *tok, const uint8_t *bytes, size_t n,
                              int32_t **ids, size_t *n_ids, rp_error *err) {
    *ids = NULL;
    *n_ids = 0;
    /* Every token has at least one byte, so n ids always suffice. */
    int32_t *out = rp_malloc(n * sizeof *out, "token ids", err);
    if (!out) return RP_ERR_NOMEM;
    size_t count = 0;
    if (tok->kind == RP_TOK_BYTES) {
        for (size_t i = 0; i < n; i++) out[i] = bytes[i];
        count = n;
    } else {
        for (size_t i = 0; i < n;) {
            /* Walk as deep as the trie goes; remember the last node that ends
             * a token, since the walk may pass it and then dead-end. */
            uint32_t node = 0;
            size_t best_len = 0;
            int32_t best_id = -1;
            for (size_t j = i; j < n; j++) {
                node = trie_child(tok, node, bytes[j]);
                if (node == RP_TOK_NO_CHILD) break;
                if (tok->node_id[node] >= 0) {
                    best_id = tok->node_id[node];
                    best_len = j - i + 1;
                }
            }
            if (best_id < 0) {
                free(out);
                return rp_error_set(err, RP_ERR_ARG,
                                    "tokenizer: byte 0x%02x at offset %zu has no token (the vocab lacks that "
                                    "single byte)",
                                    bytes[i], i);
            }
            out[count++] = best_id;
            i += best_len;
        }
    }
    *ids = out;
    *n_ids = count;
    return RP_OK;
}

const uint8_t *rp_tokenizer_token_bytes(const rp_tokenizer *tok, int32_t id, size_t *len) {
    if (id < 0 || id >= tok->n_ids || tok->length[id] == 0) {
        if (len) *len = 0;
        return NULL;
    }
    if (len) *len = tok->length[id];
    return tok->blob + tok->offset[id];
}

rp_status rp_tokenizer_decode(const rp_tokenizer *tok, const int32_t *ids, size_t n_ids,
                              uint8_t **bytes, size_t *n_bytes, rp_error *err) {
    *bytes = NULL;
    *n_bytes = 0;
    size_t total = 0;
    for (size_t i = 0; i < n_ids; i++) {
        size_t len;
        if (!rp_tokenizer_token_bytes(tok, ids[i], &len)) {
            if (ids[i] < 0 || ids[i] >= tok->n_ids)
                return rp_error_set(err, RP_ERR_ARG, "tokenizer: id %d at position %zu is out of range 0..%d (%s)",
                                    ids[i], i, tok->n_ids - 1, rp_tokenizer_kind(tok));
            return rp_error_set(err, RP_ERR_ARG, "tokenizer: id %d at position %zu has no bytes%s", ids[i], i,
                                ids[i] == 0 ? " (0 is end of text)" : "");
        }
        total += len;
    }
    uint8_t *out = rp_malloc(total + 1, "decoded bytes", err);
    if (!out) return RP_ERR_NOMEM;
    size_t pos = 0;
    for (size_t i = 0; i < n_ids; i++) {
        uint32_t len = tok->length[ids[i]];
        memcpy(out + pos, tok->blob + tok->offset[ids[i]], len);
        pos += len;
    }
    out[pos] = 0;
    *bytes = out;
    *n_bytes = total;
    return RP_OK;
}

/* ---- streaming UTF-8 ----------------------------------------------------- */

void rp_utf8_stream_init(rp_utf8_stream *s) {
    s->buf = NULL;
    s->len = s->cap = s->ready = 0;
}

void rp_utf8_stream_free(rp_utf8_stream *s) {
    free(s->buf);
    rp_utf8_stream_init(s);
}

rp_status rp_utf8_stream_push(rp_utf8_stream *s, const uint8_t *bytes, size_t n,
                              size_t *ready, rp_error *err) {
    if (s->len + n > s->cap) {
        size_t cap = s->cap ? s->cap : 64;
        while (cap < s->len + n) cap *= 2;
        uint8_t *grown = realloc(s->buf, cap);
        if (!grown) {
            if (ready) *ready = s->ready;
            return rp_error_set(err, RP_ERR_NOMEM, "utf8 stream: cannot grow buffer to %zu bytes", cap);
        }
        s->buf = grown;
        s->cap = cap;
    }
    if (n) memcpy(s->buf + s->len, bytes, n);
    s->len += n;
    /* Invalid bytes are released one at a time as they are: only a valid
     * prefix of a character can be held, and it is at most 3 bytes. */
    size_t p = s->ready;
    while (p < s->len) {
        int k = utf8_sequence(s->buf + p, s->len - p);
        if (k == 0) break;
        p += k > 0 ? (size_t)k : 1;
    }
    s->ready = p;
    if (ready) *ready = p;
    return RP_OK;
}

const uint8_t *rp_utf8_stream_data(const rp_utf8_stream *s) { return s->buf; }

void rp_utf8_stream_consume(rp_utf8_stream *s, size_t n) {
    if (n > s->ready) n = s->ready;
    if (n == 0) return;
    memmove(s->buf, s->buf + n, s->len - n);
    s->len -= n;
    s->ready -= n;
}

size_t rp_utf8_stream_finish(rp_utf8_stream *s) {
    s->ready = s->len;
    return s->len;
}
