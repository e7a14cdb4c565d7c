/* safetensors files: a mmapped reader that validates every size and offset
 * before use, and a writer that writes to a temporary name, fsyncs and renames
 * (a crash never leaves a truncated file under the final name).
 * Format: u64 little-endian header length N, N bytes of JSON
 * {"name": {"dtype": "F32", "shape": [..], "data_offsets": [begin, end]}, ...,
 *  "__metadata__": {"key": "value"}}, then the data; offsets are relative to
 * the end of the header. Called by src/model (weights), src/cli (logits), tests. */
#ifndef RP_CORE_SAFETENSORS_H
#define RP_CORE_SAFETENSORS_H

#include <stddef.h>
#include <stdint.h>

#include "core/dtype.h"
#include "core/error.h"

#define RP_ST_MAX_DIMS 8

typedef struct {
    char *name;
    rp_dtype dtype;
    int ndim;
    int64_t shape[RP_ST_MAX_DIMS];
    int64_t numel;
    const void *data;   /* points into the mapping; not necessarily aligned */
    size_t nbytes;
} rp_st_tensor;

typedef struct {
    char *path;
    void *map;            /* whole file, read-only mmap */
    size_t map_bytes;
    rp_st_tensor *tensors; /* sorted by name for rp_st_find */
    int n_tensors;
    char **meta_keys;     /* __metadata__ string map */
    char **meta_values;
    int n_meta;
} rp_st_file;

/* Opens and validates path: header length within the file, JSON well formed,
 * every entry with a known dtype, a shape whose element count times the dtype
 * size equals its byte range, ranges inside the data section and not
 * overlapping. On error f is left closed. */
rp_status rp_st_open(rp_st_file *f, const char *path, rp_error *err);
/* The same on a descriptor the caller opened (e.g. openat with O_NOFOLLOW);
 * takes it over (closed before return). Anything but a regular file is
 * refused before a byte is read; path only names the file in messages. */
rp_status rp_st_open_fd(rp_st_file *f, int fd, const char *path, rp_error *err);
void rp_st_close(rp_st_file *f);

/* NULL if absent. */
const rp_st_tensor *rp_st_find(const rp_st_file *f, const char *name);
/* NULL if absent. */
const char *rp_st_meta(const rp_st_file *f, const char *key);

/* Copies a float-typed tensor into dst as f32 (converting F16/BF16/F64).
 * expected_numel is checked; the message names the file and tensor. */
rp_status rp_st_read_f32(const rp_st_file *f, const rp_st_tensor *t, float *dst,
                         int64_t expected_numel, rp_error *err);

/* Drops the mapping's pages of [data, data + nbytes) (a tensor's bytes,
 * rounded out to whole pages) from this process's resident set: a loader
 * that has copied a tensor into its own buffer calls it so that the file's
 * pages and the copy never both count (a later read faults them back in). */
void rp_st_release(const rp_st_file *f, const void *data, size_t nbytes);

/* rp_st_read_f32, releasing the file's pages chunk by chunk as they are
 * converted: at most a few MiB of the tensor are resident twice. */
rp_status rp_st_read_f32_release(const rp_st_file *f, const rp_st_tensor *t, float *dst,
                                 int64_t expected_numel, rp_error *err);

/* Writer: collect tensors (data is copied at write time, not at add time, so it
 * must stay valid until rp_st_writer_write returns), then write atomically. */
typedef struct {
    char *name;
    rp_dtype dtype;      /* stored dtype */
    rp_dtype src_dtype;  /* dtype of data in memory (F32 may be converted to F16/BF16) */
    int ndim;
    int64_t shape[RP_ST_MAX_DIMS];
    const void *data;
} rp_st_entry;

typedef struct {
    rp_st_entry *entries;
    int n_entries, cap_entries;
    char **meta_keys;
    char **meta_values;
    int n_meta, cap_meta;
} rp_st_writer;

void rp_st_writer_init(rp_st_writer *w);
void rp_st_writer_free(rp_st_writer *w);
/* Adds a tensor stored as dtype whose memory holds elements of src_dtype.
 * Allowed: src_dtype == dtype, or src F32 -> dtype F16/BF16/F64. */
rp_status rp_st_writer_add(rp_st_writer *w, const char *name, rp_dtype dtype,
                           rp_dtype src_dtype, int ndim, const int64_t *shape,
                           const void *data, rp_error *err);
rp_status rp_st_writer_add_meta(rp_st_writer *w, const char *key, const char *value,
                                rp_error *err);
/* Writes path atomically (rp_file_write_atomic: a temporary name beside it,
 * fsync, rename, directory fsync). */
rp_status rp_st_writer_write(const rp_st_writer *w, const char *path, rp_error *err);
/* Writes the whole file to fd from its current offset; no fsync, rename or
 * close (for callers that place the file themselves, e.g. with renameat). */
rp_status rp_st_writer_write_fd(const rp_st_writer *w, int fd, const char *path, rp_error *err);

#endif
