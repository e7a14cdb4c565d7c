/* safetensors reader (mmap, validates every size and offset before any pointer
 * into the mapping is formed) and writer (atomic through core/fileio.h).
 * Used by src/model for weights, src/cli for logits and by the tests; see
 * safetensors.h for the format. */
#include "core/safetensors.h"

#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "core/fileio.h"

/* A JSON header larger than this is certainly not a tensor index (the
 * reference implementation uses the same cap). */
#define ST_MAX_HEADER_BYTES ((uint64_t)100 * 1000 * 1000)
/* Elements read per chunk before their pages are released (4 MiB of f32):
 * small next to any model, large next to a page. */
#define ST_RELEASE_CHUNK_ELEMS ((size_t)1 << 20)
/* Elements converted per chunk when the writer changes dtype. */
#define ST_WRITE_CHUNK_ELEMS ((size_t)1 << 16)

static char *st_strdup(const char *s, const char *what, rp_error *err) {
    size_t n = strlen(s) + 1;
    char *p = rp_malloc(n, what, err);
    if (p) memcpy(p, s, n);
    return p;
}

/* ---------------------------------------------------------------- reader */

void rp_st_close(rp_st_file *f) {
    if (!f) return;
    if (f->map && f->map != MAP_FAILED) munmap(f->map, f->map_bytes);
    for (int i = 0; i < f->n_tensors; i++) free(f->tensors[i].name);
    free(f->tensors);
    for (int i = 0; i < f->n_meta; i++) {
        free(f->meta_keys[i]);
        free(f->meta_values[i]);
    }
    free(f->meta_keys);
    free(f->meta_values);
    free(f->path);
    memset(f, 0, sizeof *f);
}

/* Formats a shape as "[2, 3]" into buf (for messages). */
static const char *shape_str(const int64_t *shape, int ndim, char *buf, size_t cap) {
    size_t used = 0;
    used += (size_t)snprintf(buf + used, cap - used, "[");
    for (int i = 0; i < ndim && used < cap; i++)
        used += (size_t)snprintf(buf + used, cap - used, "%s%lld", i ? ", " : "",
                                 (long long)shape[i]);
    if (used < cap) snprintf(buf + used, cap - used, "]");
    return buf;
}

/* Parses one tensor entry; data_bytes is the size of the data section. */
static rp_status parse_tensor(const char *path, const char *name, json_t *entry,
                              uint64_t data_bytes, const unsigned char *data,
                              rp_st_tensor *t, uint64_t *begin_out, rp_error *err) {
    if (!json_is_object(entry))
        return rp_error_set(err, RP_ERR_FORMAT,
                            "%s: tensor '%s' entry is not a JSON object; expected "
                            "{\"dtype\": ..., \"shape\": [...], \"data_offsets\": [begin, end]}",
                            path, name);

    json_t *jdtype = json_object_get(entry, "dtype");
    if (!json_is_string(jdtype))
        return rp_error_set(err, RP_ERR_FORMAT,
                            "%s: tensor '%s' has no \"dtype\" string; expected one of "
                            "F32, F16, BF16, F64, I32, I64, U8, I8",
                            path, name);
    if (rp_dtype_from_name(json_string_value(jdtype), &t->dtype) != 0)
        return rp_error_set(err, RP_ERR_FORMAT,
                            "%s: tensor '%s' has unknown dtype '%s'; expected one of "
                            "F32, F16, BF16, F64, I32, I64, U8, I8",
                            path, name, json_string_value(jdtype));

    json_t *jshape = json_object_get(entry, "shape");
    if (!json_is_array(jshape))
        return rp_error_set(err, RP_ERR_FORMAT,
                            "%s: tensor '%s' \"shape\" is not an array; expected a list of "
                            "non-negative integers such as [256, 128]",
                            path, name);
    size_t ndim = json_array_size(jshape);
    if (ndim > RP_ST_MAX_DIMS)
        return rp_error_set(err, RP_ERR_FORMAT,
                            "%s: tensor '%s' has %zu dimensions; at most %d are supported",
                            path, name, ndim, RP_ST_MAX_DIMS);
    t->ndim = (int)ndim;
    int64_t numel = 1;
    for (size_t d = 0; d < ndim; d++) {
        json_t *jdim = json_array_get(jshape, d);
        if (!json_is_integer(jdim))
            return rp_error_set(err, RP_ERR_FORMAT,
                                "%s: tensor '%s' shape dimension %zu is not an integer; expected "
                                "a non-negative integer",
                                path, name, d);
        if (json_integer_value(jdim) < 0)
            return rp_error_set(err, RP_ERR_FORMAT,
                                "%s: tensor '%s' shape dimension %zu is %lld; expected a "
                                "non-negative integer",
                                path, name, d, (long long)json_integer_value(jdim));
        int64_t dim = (int64_t)json_integer_value(jdim);
        if (dim != 0 && numel > INT64_MAX / dim)
            return rp_error_set(err, RP_ERR_FORMAT,
                                "%s: tensor '%s' shape has more elements than fit in 64 bits",
                                path, name);
        t->shape[d] = dim;
        numel *= dim;
    }
    t->numel = numel;
    uint64_t elem = rp_dtype_size(t->dtype);
    if ((uint64_t)numel > UINT64_MAX / elem)
        return rp_error_set(err, RP_ERR_FORMAT,
                            "%s: tensor '%s' byte size overflows 64 bits", path, name);
    uint64_t want_bytes = (uint64_t)numel * elem;

    json_t *joff = json_object_get(entry, "data_offsets");
    if (!json_is_array(joff) || json_array_size(joff) != 2 ||
        !json_is_integer(json_array_get(joff, 0)) || !json_is_integer(json_array_get(joff, 1)) ||
        json_integer_value(json_array_get(joff, 0)) < 0 ||
        json_integer_value(json_array_get(joff, 1)) < 0)
        return rp_error_set(err, RP_ERR_FORMAT,
                            "%s: tensor '%s' \"data_offsets\" is missing or malformed; expected "
                            "[begin, end] with non-negative integers",
                            path, name);
    uint64_t begin = (uint64_t)json_integer_value(json_array_get(joff, 0));
    uint64_t end = (uint64_t)json_integer_value(json_array_get(joff, 1));
    if (begin > end)
        return rp_error_set(err, RP_ERR_FORMAT,
                            "%s: tensor '%s' data_offsets [%llu, %llu] are reversed; expected "
                            "begin <= end",
                            path, name, (unsigned long long)begin, (unsigned long long)end);
    if (end > data_bytes)
        return rp_error_set(err, RP_ERR_FORMAT,
                            "%s: tensor '%s' data_offsets [%llu, %llu] run past the %llu-byte "
                            "data section; expected end <= %llu (file truncated?)",
                            path, name, (unsigned long long)begin, (unsigned long long)end,
                            (unsigned long long)data_bytes, (unsigned long long)data_bytes);
    if (end - begin != want_bytes) {
        char sbuf[256];
        return rp_error_set(err, RP_ERR_FORMAT,
                            "%s: tensor '%s' data_offsets [%llu, %llu] span %llu bytes; expected "
                            "%llu for %s shape %s",
                            path, name, (unsigned long long)begin, (unsigned long long)end,
                            (unsigned long long)(end - begin), (unsigned long long)want_bytes,
                            rp_dtype_name(t->dtype), shape_str(t->shape, t->ndim, sbuf, sizeof sbuf));
    }
    t->data = data + begin;
    t->nbytes = (size_t)want_bytes;
    *begin_out = begin;
    return RP_OK;
}

typedef struct {
    uint64_t begin, end;
    int index;
} st_range;

static int compare_range(const void *a, const void *b) {
    const st_range *x = a, *y = b;
    if (x->begin != y->begin) return x->begin < y->begin ? -1 : 1;
    if (x->end != y->end) return x->end < y->end ? -1 : 1;
    return 0;
}

static int compare_tensor_name(const void *a, const void *b) {
    return strcmp(((const rp_st_tensor *)a)->name, ((const rp_st_tensor *)b)->name);
}

/* Checks that no two non-empty byte ranges share a byte. */
static rp_status check_overlap(const rp_st_file *f, const uint64_t *begins, rp_error *err) {
    int n = f->n_tensors;
    if (n < 2) return RP_OK;
    st_range *ranges = rp_malloc((size_t)n * sizeof *ranges, "tensor ranges", err);
    if (!ranges) return RP_ERR_NOMEM;
    int m = 0;
    for (int i = 0; i < n; i++) {
        if (f->tensors[i].nbytes == 0) continue; /* an empty tensor owns no byte */
        ranges[m].begin = begins[i];
        ranges[m].end = begins[i] + f->tensors[i].nbytes;
        ranges[m].index = i;
        m++;
    }
    if (m > 1) qsort(ranges, (size_t)m, sizeof *ranges, compare_range);
    rp_status st = RP_OK;
    for (int i = 1; i < m; i++) {
        if (ranges[i].begin < ranges[i - 1].end) {
            const st_range *a = &ranges[i - 1], *b = &ranges[i];
            st = rp_error_set(err, RP_ERR_FORMAT,
                              "%s: tensors '%s' data_offsets [%llu, %llu] and '%s' [%llu, %llu] "
                              "overlap; expected disjoint byte ranges",
                              f->path, f->tensors[a->index].name, (unsigned long long)a->begin,
                              (unsigned long long)a->end, f->tensors[b->index].name,
                              (unsigned long long)b->begin, (unsigned long long)b->end);
            break;
        }
    }
    free(ranges);
    return st;
}

static rp_status parse_metadata(rp_st_file *f, json_t *meta, rp_error *err) {
    if (!json_is_object(meta))
        return rp_error_set(err, RP_ERR_FORMAT,
                            "%s: \"__metadata__\" is not a JSON object; expected a map of "
                            "string keys to string values",
                            f->path);
    size_t n = json_object_size(meta);
    f->meta_keys = rp_calloc(n, sizeof *f->meta_keys, "metadata keys", err);
    f->meta_values = rp_calloc(n, sizeof *f->meta_values, "metadata values", err);
    if (!f->meta_keys || !f->meta_values) return RP_ERR_NOMEM;
    const char *key;
    json_t *value;
    json_object_foreach(meta, key, value) {
        if (!json_is_string(value))
            return rp_error_set(err, RP_ERR_FORMAT,
                                "%s: \"__metadata__\" value of '%s' is not a string; safetensors "
                                "metadata maps strings to strings",
                                f->path, key);
        char *k = st_strdup(key, "metadata key", err);
        if (!k) return RP_ERR_NOMEM;
        char *v = st_strdup(json_string_value(value), "metadata value", err);
        if (!v) {
            free(k);
            return RP_ERR_NOMEM;
        }
        f->meta_keys[f->n_meta] = k;
        f->meta_values[f->n_meta] = v;
        f->n_meta++;
    }
    return RP_OK;
}

static rp_status parse_header(rp_st_file *f, const char *json_text, size_t json_bytes,
                              uint64_t data_bytes, const unsigned char *data, rp_error *err) {
    json_error_t jerr;
    json_t *root = json_loadb(json_text, json_bytes, JSON_REJECT_DUPLICATES, &jerr);
    if (!root) {
        if (json_error_code(&jerr) == json_error_duplicate_key)
            return rp_error_set(err, RP_ERR_FORMAT,
                                "%s: duplicate key in header JSON (%s, byte %d); expected each "
                                "tensor name (and each field) once",
                                f->path, jerr.text, jerr.position);
        return rp_error_set(err, RP_ERR_FORMAT,
                            "%s: header is not valid JSON: %s (line %d, column %d); expected a "
                            "safetensors JSON object",
                            f->path, jerr.text, jerr.line, jerr.column);
    }
    rp_status st = RP_OK;
    uint64_t *begins = NULL;
    if (!json_is_object(root)) {
        st = rp_error_set(err, RP_ERR_FORMAT,
                          "%s: header JSON is not an object; expected "
                          "{\"tensor name\": {\"dtype\": ..., \"shape\": ..., \"data_offsets\": ...}}",
                          f->path);
        goto done;
    }
    size_t n_entries = json_object_size(root);
    if (n_entries > (size_t)INT32_MAX) {
        st = rp_error_set(err, RP_ERR_FORMAT, "%s: header has %zu entries; too many", f->path,
                          n_entries);
        goto done;
    }
    f->tensors = rp_calloc(n_entries, sizeof *f->tensors, "tensor table", err);
    begins = rp_calloc(n_entries, sizeof *begins, "tensor offsets", err);
    if (!f->tensors || !begins) {
        st = RP_ERR_NOMEM;
        goto done;
    }
    const char *key;
    json_t *value;
    json_object_foreach(root, key, value) {
        if (strcmp(key, "__metadata__") == 0) {
            st = parse_metadata(f, value, err);
            if (st != RP_OK) goto done;
            continue;
        }
        rp_st_tensor *t = &f->tensors[f->n_tensors];
        st = parse_tensor(f->path, key, value, data_bytes, data, t, &begins[f->n_tensors], err);
        if (st != RP_OK) goto done;
        t->name = st_strdup(key, "tensor name", err);
        if (!t->name) {
            st = RP_ERR_NOMEM;
            goto done;
        }
        f->n_tensors++;
    }
    st = check_overlap(f, begins, err);
    if (st != RP_OK) goto done;
    if (f->n_tensors > 1)
        qsort(f->tensors, (size_t)f->n_tensors, sizeof *f->tensors, compare_tensor_name);
done:
    free(begins);
    json_decref(root);
    return st;
}

rp_status rp_st_open(rp_st_file *f, const char *path, rp_error *err) {
    if (!f || !path) return rp_error_set(err, RP_ERR_ARG, "rp_st_open: NULL file or path");
    /* Non-blocking: opening a FIFO (or a device) must not wait for a writer;
     * rp_st_open_fd then refuses anything that is not a regular file. */
    int fd = open(path, O_RDONLY | O_NONBLOCK | O_CLOEXEC);
    if (fd < 0) {
        memset(f, 0, sizeof *f);
        return rp_error_set(err, RP_ERR_IO, "%s: cannot open: %s", path, strerror(errno));
    }
    return rp_st_open_fd(f, fd, path, err);
}

rp_status rp_st_open_fd(rp_st_file *f, int fd, const char *path, rp_error *err) {
    if (!f || !path || fd < 0) {
        if (fd >= 0) close(fd);
        return rp_error_set(err, RP_ERR_ARG, "rp_st_open_fd: NULL file, path or descriptor");
    }
    memset(f, 0, sizeof *f);
    f->path = st_strdup(path, "file path", err);
    if (!f->path) {
        close(fd);
        return RP_ERR_NOMEM;
    }

    rp_status st = RP_OK;
    struct stat sb;
    if (fstat(fd, &sb) != 0) {
        st = rp_error_set(err, RP_ERR_IO, "%s: cannot stat: %s", path, strerror(errno));
        close(fd);
        goto fail;
    }
    if (!S_ISREG(sb.st_mode)) {
        st = rp_error_set(err, RP_ERR_IO, "%s: not a regular file; expected a safetensors file",
                          path);
        close(fd);
        goto fail;
    }
    /* A regular file: blocking reads are fine again (mmap ignores the flag). */
    int fl = fcntl(fd, F_GETFL);
    if (fl >= 0 && (fl & O_NONBLOCK)) fcntl(fd, F_SETFL, fl & ~O_NONBLOCK);
    uint64_t file_bytes = (uint64_t)sb.st_size;
    if (file_bytes == 0) {
        st = rp_error_set(err, RP_ERR_FORMAT,
                          "%s: file is empty (0 bytes); expected a safetensors file (8-byte "
                          "header length, JSON header, data)",
                          path);
        close(fd);
        goto fail;
    }
    if (file_bytes < 8) {
        st = rp_error_set(err, RP_ERR_FORMAT,
                          "%s: file is %llu bytes, shorter than the 8-byte header length; "
                          "expected a safetensors file",
                          path, (unsigned long long)file_bytes);
        close(fd);
        goto fail;
    }
    if (file_bytes > SIZE_MAX) {
        st = rp_error_set(err, RP_ERR_IO, "%s: %llu bytes do not fit in the address space", path,
                          (unsigned long long)file_bytes);
        close(fd);
        goto fail;
    }
    void *map = mmap(NULL, (size_t)file_bytes, PROT_READ, MAP_PRIVATE, fd, 0);
    int map_errno = errno;
    close(fd); /* the mapping keeps the file referenced */
    if (map == MAP_FAILED) {
        st = rp_error_set(err, RP_ERR_IO, "%s: cannot mmap %llu bytes: %s", path,
                          (unsigned long long)file_bytes, strerror(map_errno));
        goto fail;
    }
    f->map = map;
    f->map_bytes = (size_t)file_bytes;

    const unsigned char *bytes = map;
    uint64_t header_bytes = 0;
    for (int i = 7; i >= 0; i--) header_bytes = (header_bytes << 8) | bytes[i];
    if (header_bytes > file_bytes - 8) {
        st = rp_error_set(err, RP_ERR_FORMAT,
                          "%s: header length %llu runs beyond the end of the %llu-byte file; "
                          "expected at most %llu (file truncated or not safetensors?)",
                          path, (unsigned long long)header_bytes, (unsigned long long)file_bytes,
                          (unsigned long long)(file_bytes - 8));
        goto fail;
    }
    if (header_bytes > ST_MAX_HEADER_BYTES) {
        st = rp_error_set(err, RP_ERR_FORMAT,
                          "%s: header length %llu exceeds the %llu-byte limit; expected a "
                          "safetensors header",
                          path, (unsigned long long)header_bytes,
                          (unsigned long long)ST_MAX_HEADER_BYTES);
        goto fail;
    }
    const unsigned char *data = bytes + 8 + header_bytes;
    uint64_t data_bytes = file_bytes - 8 - header_bytes;
    st = parse_header(f, (const char *)bytes + 8, (size_t)header_bytes, data_bytes, data, err);
    if (st != RP_OK) goto fail;
    return RP_OK;
fail:
    rp_st_close(f);
    return st;
}

static int compare_key_tensor(const void *key, const void *elem) {
    return strcmp((const char *)key, ((const rp_st_tensor *)elem)->name);
}

const rp_st_tensor *rp_st_find(const rp_st_file *f, const char *name) {
    if (!f || !name || f->n_tensors <= 0) return NULL;
    return bsearch(name, f->tensors, (size_t)f->n_tensors, sizeof *f->tensors,
                   compare_key_tensor);
}

const char *rp_st_meta(const rp_st_file *f, const char *key) {
    if (!f || !key) return NULL;
    for (int i = 0; i < f->n_meta; i++)
        if (strcmp(f->meta_keys[i], key) == 0) return f->meta_values[i];
    return NULL;
}

rp_status rp_st_read_f32(const rp_st_file *f, const rp_st_tensor *t, float *dst,
                         int64_t expected_numel, rp_error *err) {
    const char *path = f && f->path ? f->path : "(safetensors)";
    if (!t) return rp_error_set(err, RP_ERR_ARG, "%s: rp_st_read_f32: NULL tensor", path);
    if (!rp_dtype_is_float(t->dtype))
        return rp_error_set(err, RP_ERR_FORMAT,
                            "%s: tensor '%s' has dtype %s; expected a float dtype "
                            "(F32, F16, BF16 or F64) to read as f32",
                            path, t->name, rp_dtype_name(t->dtype));
    if (t->numel != expected_numel) {
        char sbuf[256];
        return rp_error_set(err, RP_ERR_SHAPE,
                            "%s: tensor '%s' has %lld elements, expected %lld (its shape is %s)",
                            path, t->name, (long long)t->numel, (long long)expected_numel,
                            shape_str(t->shape, t->ndim, sbuf, sizeof sbuf));
    }
    if (!dst && t->numel > 0)
        return rp_error_set(err, RP_ERR_ARG, "%s: tensor '%s': NULL destination", path, t->name);
    rp_convert_to_f32(dst, t->data, t->dtype, (size_t)t->numel);
    return RP_OK;
}

rp_status rp_st_read_f32_release(const rp_st_file *f, const rp_st_tensor *t, float *dst,
                                 int64_t expected_numel, rp_error *err) {
    if (!t || t->numel != expected_numel || !rp_dtype_is_float(t->dtype) || !dst)
        return rp_st_read_f32(f, t, dst, expected_numel, err); /* its message */
    const size_t elem = rp_dtype_size(t->dtype), n = (size_t)t->numel;
    for (size_t i = 0; i < n; i += ST_RELEASE_CHUNK_ELEMS) {
        size_t k = n - i < ST_RELEASE_CHUNK_ELEMS ? n - i : ST_RELEASE_CHUNK_ELEMS;
        const unsigned char *src = (const unsigned char *)t->data + i * elem;
        rp_convert_to_f32(dst + i, src, t->dtype, k);
        rp_st_release(f, src, k * elem);
    }
    return RP_OK;
}

void rp_st_release(const rp_st_file *f, const void *data, size_t nbytes) {
    if (!f || !f->map || !data || nbytes == 0) return;
    const uintptr_t base = (uintptr_t)f->map, end_map = base + f->map_bytes;
    uintptr_t b = (uintptr_t)data, e = b + nbytes;
    if (b < base || e > end_map) return;
    /* Outward to whole pages: a neighbour sharing an edge page simply faults
     * it back in from the file when it is read. */
    const uintptr_t page = (uintptr_t)sysconf(_SC_PAGESIZE);
    b &= ~(page - 1);
    e = (e + page - 1) & ~(page - 1);
    if (e > end_map) e = end_map;
    (void)madvise((void *)b, (size_t)(e - b), MADV_DONTNEED);
}

/* ---------------------------------------------------------------- writer */

void rp_st_writer_init(rp_st_writer *w) {
    memset(w, 0, sizeof *w);
}

void rp_st_writer_free(rp_st_writer *w) {
    if (!w) return;
    for (int i = 0; i < w->n_entries; i++) free(w->entries[i].name);
    free(w->entries);
    for (int i = 0; i < w->n_meta; i++) {
        free(w->meta_keys[i]);
        free(w->meta_values[i]);
    }
    free(w->meta_keys);
    free(w->meta_values);
    memset(w, 0, sizeof *w);
}

/* jansson only stores valid UTF-8; checking here puts the error at the call
 * that introduced the bad string. */
static int is_valid_utf8(const char *s) {
    json_t *j = json_string(s);
    if (!j) return 0;
    json_decref(j);
    return 1;
}

rp_status rp_st_writer_add(rp_st_writer *w, const char *name, rp_dtype dtype,
                           rp_dtype src_dtype, int ndim, const int64_t *shape,
                           const void *data, rp_error *err) {
    if (!w || !name) return rp_error_set(err, RP_ERR_ARG, "rp_st_writer_add: NULL writer or name");
    if (strcmp(name, "__metadata__") == 0)
        return rp_error_set(err, RP_ERR_ARG,
                            "tensor name '__metadata__' is reserved by safetensors; choose "
                            "another name");
    if (!is_valid_utf8(name))
        return rp_error_set(err, RP_ERR_ARG, "tensor name '%s' is not valid UTF-8", name);
    if ((unsigned)dtype >= RP_DTYPE_COUNT || (unsigned)src_dtype >= RP_DTYPE_COUNT)
        return rp_error_set(err, RP_ERR_ARG, "tensor '%s': dtype %d / source dtype %d unknown",
                            name, (int)dtype, (int)src_dtype);
    int convertible = src_dtype == RP_DTYPE_F32 &&
                      (dtype == RP_DTYPE_F16 || dtype == RP_DTYPE_BF16 || dtype == RP_DTYPE_F64);
    if (src_dtype != dtype && !convertible)
        return rp_error_set(err, RP_ERR_ARG,
                            "tensor '%s': cannot store %s memory as %s; expected the same dtype "
                            "or F32 memory stored as F16, BF16 or F64",
                            name, rp_dtype_name(src_dtype), rp_dtype_name(dtype));
    if (ndim < 0 || ndim > RP_ST_MAX_DIMS)
        return rp_error_set(err, RP_ERR_ARG, "tensor '%s': %d dimensions; expected 0 to %d", name,
                            ndim, RP_ST_MAX_DIMS);
    if (ndim > 0 && !shape)
        return rp_error_set(err, RP_ERR_ARG, "tensor '%s': NULL shape for %d dimensions", name,
                            ndim);
    int64_t numel = 1;
    for (int d = 0; d < ndim; d++) {
        if (shape[d] < 0)
            return rp_error_set(err, RP_ERR_ARG,
                                "tensor '%s': shape dimension %d is %lld; expected >= 0", name, d,
                                (long long)shape[d]);
        if (shape[d] != 0 && numel > INT64_MAX / 8 / shape[d])
            return rp_error_set(err, RP_ERR_ARG, "tensor '%s': shape too large (byte size overflows)",
                                name);
        numel *= shape[d];
    }
    if (numel > 0 && !data)
        return rp_error_set(err, RP_ERR_ARG, "tensor '%s': NULL data for %lld elements", name,
                            (long long)numel);
    for (int i = 0; i < w->n_entries; i++)
        if (strcmp(w->entries[i].name, name) == 0)
            return rp_error_set(err, RP_ERR_ARG,
                                "tensor '%s' added twice; safetensors names must be unique", name);
    if (w->n_entries == w->cap_entries) {
        int cap = w->cap_entries ? 2 * w->cap_entries : 16;
        rp_st_entry *grown = realloc(w->entries, (size_t)cap * sizeof *grown);
        if (!grown)
            return rp_error_set(err, RP_ERR_NOMEM, "cannot grow the writer table to %d tensors",
                                cap);
        w->entries = grown;
        w->cap_entries = cap;
    }
    rp_st_entry *e = &w->entries[w->n_entries];
    memset(e, 0, sizeof *e);
    e->name = st_strdup(name, "tensor name", err);
    if (!e->name) return RP_ERR_NOMEM;
    e->dtype = dtype;
    e->src_dtype = src_dtype;
    e->ndim = ndim;
    for (int d = 0; d < ndim; d++) e->shape[d] = shape[d];
    e->data = data;
    w->n_entries++;
    return RP_OK;
}

rp_status rp_st_writer_add_meta(rp_st_writer *w, const char *key, const char *value,
                                rp_error *err) {
    if (!w || !key || !value)
        return rp_error_set(err, RP_ERR_ARG, "rp_st_writer_add_meta: NULL writer, key or value");
    if (!is_valid_utf8(key) || !is_valid_utf8(value))
        return rp_error_set(err, RP_ERR_ARG, "metadata '%s' key or value is not valid UTF-8", key);
    for (int i = 0; i < w->n_meta; i++)
        if (strcmp(w->meta_keys[i], key) == 0)
            return rp_error_set(err, RP_ERR_ARG, "metadata key '%s' added twice", key);
    if (w->n_meta == w->cap_meta) {
        int cap = w->cap_meta ? 2 * w->cap_meta : 8;
        char **keys = realloc(w->meta_keys, (size_t)cap * sizeof *keys);
        if (!keys) return rp_error_set(err, RP_ERR_NOMEM, "cannot grow the metadata table");
        w->meta_keys = keys;
        char **values = realloc(w->meta_values, (size_t)cap * sizeof *values);
        if (!values) return rp_error_set(err, RP_ERR_NOMEM, "cannot grow the metadata table");
        w->meta_values = values;
        w->cap_meta = cap;
    }
    char *k = st_strdup(key, "metadata key", err);
    if (!k) return RP_ERR_NOMEM;
    char *v = st_strdup(value, "metadata value", err);
    if (!v) {
        free(k);
        return RP_ERR_NOMEM;
    }
    w->meta_keys[w->n_meta] = k;
    w->meta_values[w->n_meta] = v;
    w->n_meta++;
    return RP_OK;
}

static int64_t entry_numel(const rp_st_entry *e) {
    int64_t n = 1;
    for (int d = 0; d < e->ndim; d++) n *= e->shape[d];
    return n;
}

/* Builds the header JSON (metadata first, then tensors in insertion order,
 * laid out back to back) and returns it padded with spaces to a multiple of 8
 * bytes, so the data section starts 8-byte aligned in the file. */
static char *build_header(const rp_st_writer *w, const char *path, size_t *padded_bytes,
                          rp_error *err) {
    json_t *root = json_object();
    if (!root) {
        rp_error_set(err, RP_ERR_NOMEM, "%s: cannot allocate the header", path);
        return NULL;
    }
    int ok = 1;
    if (w->n_meta > 0) {
        json_t *meta = json_object();
        ok = meta && json_object_set_new(root, "__metadata__", meta) == 0;
        for (int i = 0; ok && i < w->n_meta; i++)
            ok = json_object_set_new(meta, w->meta_keys[i], json_string(w->meta_values[i])) == 0;
    }
    uint64_t offset = 0;
    for (int i = 0; ok && i < w->n_entries; i++) {
        const rp_st_entry *e = &w->entries[i];
        uint64_t bytes = (uint64_t)entry_numel(e) * rp_dtype_size(e->dtype);
        /* Every *_new call takes ownership of its value even when it fails
         * (including on a NULL container), so nothing leaks on OOM. */
        int bad = 0;
        json_t *shape = json_array();
        for (int d = 0; d < e->ndim; d++)
            bad |= json_array_append_new(shape, json_integer(e->shape[d]));
        json_t *offsets = json_array();
        bad |= json_array_append_new(offsets, json_integer((json_int_t)offset));
        bad |= json_array_append_new(offsets, json_integer((json_int_t)(offset + bytes)));
        json_t *entry = json_object();
        bad |= json_object_set_new(entry, "dtype", json_string(rp_dtype_name(e->dtype)));
        bad |= json_object_set_new(entry, "shape", shape);
        bad |= json_object_set_new(entry, "data_offsets", offsets);
        bad |= json_object_set_new(root, e->name, entry);
        if (bad) ok = 0;
        offset += bytes;
    }
    char *text = ok ? json_dumps(root, JSON_COMPACT | JSON_PRESERVE_ORDER) : NULL;
    json_decref(root);
    if (!text) {
        rp_error_set(err, RP_ERR_NOMEM, "%s: cannot build the JSON header", path);
        return NULL;
    }
    size_t len = strlen(text);
    size_t padded = (len + 7) & ~(size_t)7;
    char *out = rp_malloc(padded, "safetensors header", err);
    if (out) {
        memcpy(out, text, len);
        memset(out + len, ' ', padded - len);
        *padded_bytes = padded;
    }
    free(text);
    return out;
}

/* Writes one tensor's bytes, converting F32 memory in fixed-size chunks. */
static int write_entry_data(FILE *fp, const rp_st_entry *e, unsigned char *chunk) {
    size_t numel = (size_t)entry_numel(e);
    if (numel == 0) return 0;
    if (e->src_dtype == e->dtype) {
        size_t bytes = numel * rp_dtype_size(e->dtype);
        return fwrite(e->data, 1, bytes, fp) == bytes ? 0 : -1;
    }
    const float *src = e->data;
    size_t out_size = rp_dtype_size(e->dtype);
    for (size_t done = 0; done < numel;) {
        size_t n = numel - done < ST_WRITE_CHUNK_ELEMS ? numel - done : ST_WRITE_CHUNK_ELEMS;
        rp_convert_from_f32(chunk, e->dtype, src + done, n);
        if (fwrite(chunk, out_size, n, fp) != n) return -1;
        done += n;
    }
    return 0;
}

/* The whole file: length, header, every tensor's bytes. */
static int write_contents(FILE *fp, const rp_st_writer *w, const char *header,
                          size_t header_bytes, unsigned char *chunk) {
    unsigned char length_le[8];
    for (int i = 0; i < 8; i++) length_le[i] = (unsigned char)((uint64_t)header_bytes >> (8 * i));
    if (fwrite(length_le, 1, 8, fp) != 8 || fwrite(header, 1, header_bytes, fp) != header_bytes)
        return -1;
    for (int i = 0; i < w->n_entries; i++)
        if (write_entry_data(fp, &w->entries[i], chunk) != 0) return -1;
    return 0;
}

static rp_status write_to_fd(int fd, const char *path, void *user, rp_error *err) {
    return rp_st_writer_write_fd(user, fd, path, err);
}

rp_status rp_st_writer_write(const rp_st_writer *w, const char *path, rp_error *err) {
    if (!w || !path || !*path)
        return rp_error_set(err, RP_ERR_ARG, "rp_st_writer_write: NULL writer or empty path");
    return rp_file_write_atomic(path, 0644, write_to_fd, (void *)w, err);
}

rp_status rp_st_writer_write_fd(const rp_st_writer *w, int fd, const char *path, rp_error *err) {
    if (!w || fd < 0 || !path)
        return rp_error_set(err, RP_ERR_ARG, "rp_st_writer_write_fd: NULL writer, path or fd");
    size_t header_bytes = 0;
    char *header = build_header(w, path, &header_bytes, err);
    if (!header) return err ? err->code : RP_ERR_NOMEM;
    unsigned char *chunk = rp_malloc(ST_WRITE_CHUNK_ELEMS * 8, "conversion buffer", err);
    /* A FILE of its own (a dup), so the caller keeps fd to fsync and close. */
    int copy = chunk ? dup(fd) : -1;
    FILE *fp = copy >= 0 ? fdopen(copy, "wb") : NULL;
    rp_status st = RP_OK;
    if (!chunk) {
        st = RP_ERR_NOMEM;
    } else if (!fp) {
        st = rp_error_set(err, RP_ERR_IO, "%s: cannot write: %s", path, strerror(errno));
        if (copy >= 0) close(copy);
    } else {
        int bad = write_contents(fp, w, header, header_bytes, chunk) != 0 || fflush(fp) != 0;
        int saved_errno = errno;
        if (fclose(fp) != 0 && !bad) {
            bad = 1;
            saved_errno = errno;
        }
        if (bad)
            st = rp_error_set(err, RP_ERR_IO, "%s: cannot write: %s", path,
                              strerror(saved_errno ? saved_errno : EIO));
    }
    free(header);
    free(chunk);
    return st;
}
