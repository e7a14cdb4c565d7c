/* Session state files (session_file.h): the file image, the session
 * directory (openat / renameat relative to it), and the reader whose client
 * messages never quote the file. */
#include "infer/session_file.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "core/fileio.h"
#include "core/safetensors.h"
#include "core/version.h"
#include "model/config_pb.h"
#include "model/state.h"
#include "rwkvpipe.pb-c.h"

#define META_KEY "rwkvpipe.session"

/* ---- the file image (tensors + header metadata) ---- */

/* Buffers the writer points into: they live until the file is written. */
typedef struct {
    rp_state_tensors t;
    char *hex;
    char tokens[32];
    rp_st_writer w;
} file_image;

static void image_free(file_image *im) {
    rp_st_writer_free(&im->w);
    rp_state_tensors_free(&im->t);
    free(im->hex);
}

static rp_status image_build(file_image *im, const rp_config *cfg, uint64_t tokens,
                             const float *state, rp_error *err) {
    memset(im, 0, sizeof *im);
    rp_st_writer_init(&im->w);
    rp_state view;
    rp_state_geometry(&view, cfg, 0, cfg->n_layer, 1);
    view.data = (float *)state;
    if (rp_state_tensors_alloc(&im->t, cfg, err) != RP_OK) {
        image_free(im);
        return RP_ERR_NOMEM;
    }
    Rwkvpipe__ModelConfig mc;
    rp_config_to_pb(cfg, &mc);
    Rwkvpipe__SessionHeader h = RWKVPIPE__SESSION_HEADER__INIT;
    h.config = &mc;
    h.tokens = tokens;
    h.created_by = (char *)rp_build_description();
    size_t n = rwkvpipe__session_header__get_packed_size(&h);
    uint8_t *packed = malloc(n ? n : 1);
    im->hex = malloc(2 * n + 1);
    if (!packed || !im->hex) {
        free(packed);
        image_free(im);
        return rp_error_set(err, RP_ERR_NOMEM, "session file buffers");
    }
    rwkvpipe__session_header__pack(&h, packed);
    for (size_t i = 0; i < n; i++) snprintf(im->hex + 2 * i, 3, "%02x", packed[i]);
    im->hex[2 * n] = '\0';
    free(packed);
    rp_state_export(&view, 0, &im->t);
    snprintf(im->tokens, sizeof im->tokens, "%llu", (unsigned long long)tokens);
    rp_status st = rp_state_tensors_add(&im->t, &im->w, err);
    if (st == RP_OK) st = rp_st_writer_add_meta(&im->w, META_KEY, im->hex, err);
    if (st == RP_OK) st = rp_st_writer_add_meta(&im->w, "tokens", im->tokens, err);
    if (st != RP_OK) image_free(im);
    return st;
}

/* ---- reading ---- */

static int hex_value(char c) {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    return -1;
}

/* Sets the client's message and the log's (detail: the client's, or `lib`'s
 * when a library message, which may quote the file, says more). */
static rp_status fail_read(rp_error *err, rp_error *detail, const rp_error *lib, rp_status code,
                           const char *fmt, ...) __attribute__((format(printf, 5, 6)));
static rp_status fail_read(rp_error *err, rp_error *detail, const rp_error *lib, rp_status code,
                           const char *fmt, ...) {
    rp_error mine = {.code = code};
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(mine.msg, sizeof mine.msg, fmt, ap);
    va_end(ap);
    if (detail) {
        *detail = mine;
        if (lib) snprintf(detail->msg, sizeof detail->msg, "%.400s (%.600s)", mine.msg, lib->msg);
    }
    if (err) *err = mine;
    return code;
}

/* The model shape stored in the header must be the serving model's. */
static rp_status check_header(const rp_st_file *f, const char *label, const rp_config *cfg,
                              uint64_t *tokens, rp_error *err, rp_error *detail) {
    const char *hex = rp_st_meta(f, META_KEY);
    if (!hex)
        return fail_read(err, detail, NULL, RP_ERR_FORMAT, "not a session file: %s has no "
                         "\"%s\" metadata (not written by rwkvpipe)", label, META_KEY);
    size_t n = strlen(hex) / 2;
    uint8_t *packed = malloc(n ? n : 1);
    if (!packed) return fail_read(err, detail, NULL, RP_ERR_NOMEM, "session header of %s", label);
    for (size_t i = 0; i < n; i++) {
        int hi = hex_value(hex[2 * i]), lo = hex_value(hex[2 * i + 1]);
        if (hi < 0 || lo < 0) {
            free(packed);
            return fail_read(err, detail, NULL, RP_ERR_FORMAT, "not a session file: the "
                             "session header of %s is not hex", label);
        }
        packed[i] = (uint8_t)(hi * 16 + lo);
    }
    Rwkvpipe__SessionHeader *h = rwkvpipe__session_header__unpack(NULL, n, packed);
    free(packed);
    if (!h || !h->config) {
        if (h) rwkvpipe__session_header__free_unpacked(h, NULL);
        return fail_read(err, detail, NULL, RP_ERR_FORMAT, "not a session file: the session "
                         "header of %s does not decode", label);
    }
    const Rwkvpipe__ModelConfig *c = h->config;
    rp_status st = RP_OK;
    if ((int)c->n_layer != cfg->n_layer || (int)c->n_embd != cfg->n_embd ||
        (int)c->head_size != cfg->head_size || (int)c->vocab_size != cfg->vocab_size) {
        /* The file's numbers go to the log only. */
        rp_error lib;
        rp_error_set(&lib, RP_ERR_SHAPE, "the file's model: %u layers, C=%u, head size %u, V=%u",
                     c->n_layer, c->n_embd, c->head_size, c->vocab_size);
        st = fail_read(err, detail, &lib, RP_ERR_SHAPE, "%s holds the state of another model; "
                       "this server runs %d layers, C=%d, V=%d", label, cfg->n_layer,
                       cfg->n_embd, cfg->vocab_size);
    }
    *tokens = h->tokens;
    rwkvpipe__session_header__free_unpacked(h, NULL);
    return st;
}

static rp_status read_tensor(const rp_st_file *f, const char *label, const char *name,
                             int ndim, const int64_t *shape, float *dst, rp_error *err,
                             rp_error *detail) {
    const rp_st_tensor *t = rp_st_find(f, name);
    if (!t)
        return fail_read(err, detail, NULL, RP_ERR_FORMAT, "not a session file: %s has no "
                         "tensor %s", label, name);
    int64_t numel = 1;
    int same = t->ndim == ndim;
    for (int i = 0; i < ndim; i++) {
        numel *= shape[i];
        same = same && t->shape[i] == shape[i];
    }
    if (!same)
        return fail_read(err, detail, NULL, RP_ERR_SHAPE, "%s: %s has the wrong shape for this "
                         "model (expected %d dims, %lld elements)", label, name, ndim,
                         (long long)numel);
    rp_error lib;
    if (rp_st_read_f32(f, t, dst, numel, &lib) != RP_OK)
        return fail_read(err, detail, &lib, RP_ERR_FORMAT, "%s: tensor %s cannot be read as "
                         "float32", label, name);
    return RP_OK;
}

/* Reads an open file's state; label names it in messages. */
static rp_status read_state(const rp_st_file *f, const char *label, const rp_config *cfg,
                            uint64_t *tokens, float *state, rp_error *err, rp_error *detail) {
    rp_state view;
    rp_state_geometry(&view, cfg, 0, cfg->n_layer, 1);
    view.data = state;
    const int L = cfg->n_layer;
    memset(state, 0, view.floats_per_slot * sizeof(float));
    *tokens = 0;
    rp_status st = RP_OK;
    if (rp_st_find(f, RP_STATE_WKV)) {
        rp_state_tensors t;
        if (rp_state_tensors_alloc(&t, cfg, NULL) != RP_OK)
            return fail_read(err, detail, NULL, RP_ERR_NOMEM, "buffers to read %s", label);
        st = check_header(f, label, cfg, tokens, err, detail);
        if (st == RP_OK)
            st = read_tensor(f, label, RP_STATE_ATT_X_PREV, 2, t.shape_lc, t.att_x_prev, err,
                             detail);
        if (st == RP_OK)
            st = read_tensor(f, label, RP_STATE_FFN_X_PREV, 2, t.shape_lc, t.ffn_x_prev, err,
                             detail);
        if (st == RP_OK)
            st = read_tensor(f, label, RP_STATE_WKV, 4, t.shape_wkv, t.wkv, err, detail);
        if (st == RP_OK) rp_state_import(&view, 0, &t);
        rp_state_tensors_free(&t);
    } else {
        /* A state-tuning file: every layer's tuned WKV state. */
        int64_t shape[3] = {cfg->n_head, cfg->head_size, cfg->head_size};
        for (int l = 0; st == RP_OK && l < L; l++) {
            char name[64];
            snprintf(name, sizeof name, "blocks.%d.att.time_state", l);
            if (!rp_st_find(f, name))
                return fail_read(err, detail, NULL, RP_ERR_FORMAT, "not a session file: %s is "
                                 "neither a session file (state.wkv) nor a state-tuning file "
                                 "(%s is missing)", label, name);
            st = read_tensor(f, label, name, 3, shape, rp_state_wkv(&view, 0, l), err, detail);
        }
    }
    return st;
}

/* ---- the session directory ---- */

rp_status rp_session_dir_init(rp_session_dir *d, const char *path, int overwrite, int max_files,
                              rp_error *err) {
    memset(d, 0, sizeof *d);
    d->fd = -1;
    if (!path || !*path)
        return rp_error_set(err, RP_ERR_ARG, "the session directory needs a path");
    d->path = strdup(path);
    if (!d->path) return rp_error_set(err, RP_ERR_NOMEM, "session directory path");
    d->overwrite = overwrite;
    d->max_files = max_files > 0 ? max_files : 0;
    pthread_mutex_init(&d->mu, NULL);
    return RP_OK;
}

void rp_session_dir_free(rp_session_dir *d) {
    if (!d || !d->path) return;
    if (d->fd >= 0) close(d->fd);
    pthread_mutex_destroy(&d->mu);
    free(d->path);
    d->fd = -1;
    d->path = NULL;
}

/* The directory's descriptor, opened (and with create, made) on first use;
 * -1 with err set (detail: with the directory's path, for the log). */
static int dir_fd(rp_session_dir *d, int create, rp_error *err, rp_error *detail) {
    pthread_mutex_lock(&d->mu);
    if (d->fd < 0) {
        int made = create && mkdir(d->path, 0700) != 0 && errno != EEXIST ? errno : 0;
        if (!made) {
            d->fd = open(d->path, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
            if (d->fd < 0) made = errno;
        }
        if (made) {
            rp_error_set(err, RP_ERR_IO, "the session directory %s: %s",
                         create ? "cannot be created" : "cannot be opened", strerror(made));
            if (detail)
                rp_error_set(detail, RP_ERR_IO, "session directory '%s': %s (choose another "
                             "with --session-dir DIR)", d->path, strerror(made));
        }
    }
    int fd = d->fd;
    pthread_mutex_unlock(&d->mu);
    return fd;
}

int rp_session_plain_name(const char *name, size_t max_len) {
    size_t n = name ? strlen(name) : 0;
    if (n == 0 || n > max_len || name[0] == '.') return 0;
    for (size_t i = 0; i < n; i++) {
        char c = name[i];
        if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
              c == '_' || c == '-' || c == '.'))
            return 0;
    }
    return 1;
}

int rp_session_file_name_valid(const char *name) {
    static const char suffix[] = RP_SESSION_FILE_SUFFIX;
    const size_t ns = sizeof suffix - 1;
    if (!rp_session_plain_name(name, RP_SESSION_FILE_NAME_MAX)) return 0;
    size_t n = strlen(name);
    return n > ns && strcmp(name + n - ns, suffix) == 0;
}

static rp_status bad_name(const char *name, rp_error *err) {
    (void)name;  /* not echoed: it may hold anything */
    return rp_error_set(err, RP_ERR_ARG, "a session file name is 1 to %d letters, digits, '_', "
                        "'-' or '.', not starting with '.', ending in \"%s\" (no directories)",
                        RP_SESSION_FILE_NAME_MAX, RP_SESSION_FILE_SUFFIX);
}

/* May a save replace what is under `name` now? */
static rp_status check_replace(const rp_session_dir *d, int dir, const char *name,
                               rp_error *err) {
    int fd = openat(dir, name, O_RDONLY | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC);
    if (fd < 0 && errno == ENOENT) return RP_OK;
    if (fd < 0 && errno == ELOOP)
        return rp_error_set(err, RP_ERR_ARG, "%s is a symbolic link in the session directory: "
                            "not replaced (choose another name)", name);
    if (fd < 0)
        return rp_error_set(err, RP_ERR_IO, "%s: cannot open in the session directory: %s",
                            name, strerror(errno));
    struct stat sb;
    if (fstat(fd, &sb) != 0 || !S_ISREG(sb.st_mode)) {
        close(fd);
        return rp_error_set(err, RP_ERR_ARG, "%s exists in the session directory and is not a "
                            "regular file: not replaced (choose another name)", name);
    }
    if (d->overwrite) {
        close(fd);
        return RP_OK;
    }
    rp_st_file f;
    rp_error ignored;
    int is_session = rp_st_open_fd(&f, fd, name, &ignored) == RP_OK;
    if (is_session) {
        const char *hex = rp_st_meta(&f, META_KEY);
        is_session = hex && rp_st_find(&f, RP_STATE_WKV);
        rp_st_close(&f);
    }
    if (!is_session)
        return rp_error_set(err, RP_ERR_ARG, "%s exists in the session directory and is not a "
                            "session file: not replaced (choose another name, or start the "
                            "server with --session-overwrite)", name);
    return RP_OK;
}

/* Session files in the directory, and saves in progress (their temporary
 * files): what a new save would add to. -1 when it cannot be read. */
static int count_files(int dir) {
    int fd = openat(dir, ".", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    DIR *listing = fd >= 0 ? fdopendir(fd) : NULL;
    if (!listing) {
        if (fd >= 0) close(fd);
        return -1;
    }
    int n = 0;
    for (struct dirent *ent; (ent = readdir(listing)) != NULL;)
        n += rp_session_file_name_valid(ent->d_name) ||
             (ent->d_name[0] == '.' && strstr(ent->d_name, RP_SESSION_FILE_SUFFIX ".tmp-"));
    closedir(listing);
    return n;
}

rp_status rp_session_file_save(rp_session_dir *d, const char *name, const rp_config *cfg,
                               uint64_t tokens, const float *state, rp_error *err) {
    if (!rp_session_file_name_valid(name)) return bad_name(name, err);
    rp_error detail;
    const int dir = dir_fd(d, 1, err, &detail);
    if (dir < 0) return RP_ERR_IO;
    rp_status st = check_replace(d, dir, name, err);
    if (st != RP_OK) return st;
    file_image im;
    if ((st = image_build(&im, cfg, tokens, state, err)) != RP_OK) return st;
    /* The temporary name starts with '.', outside the client's alphabet: it
     * can never be a name a client loads or saves. */
    rp_atomic_file file;
    /* The count and the temporary file under one lock: saves in flight
     * count, so concurrent saves cannot pass the cap together. */
    pthread_mutex_lock(&d->mu);
    if (d->max_files > 0) {
        struct stat sb;
        const int replacing = fstatat(dir, name, &sb, AT_SYMLINK_NOFOLLOW) == 0;
        const int n = replacing ? 0 : count_files(dir);
        if (n < 0 || n >= d->max_files) {
            pthread_mutex_unlock(&d->mu);
            image_free(&im);
            if (n < 0)
                return rp_error_set(err, RP_ERR_IO, "%s: cannot list the session directory: %s",
                                    name, strerror(errno));
            return rp_error_set(err, RP_ERR_BUSY, "the session directory holds %d session "
                                "files, the most this server keeps (--max-session-files): "
                                "replace or delete one", n);
        }
    }
    st = rp_atomic_file_open(&file, dir, name, 0600, 1, err);
    pthread_mutex_unlock(&d->mu);
    if (st == RP_OK) st = rp_st_writer_write_fd(&im.w, file.fd, name, err);
    if (st == RP_OK) st = rp_atomic_file_seal(&file, err);
    if (st == RP_OK) st = rp_atomic_file_commit(&file, err);
    rp_atomic_file_end(&file);
    image_free(&im);
    return st;
}

rp_status rp_session_file_load(rp_session_dir *d, const char *name, const rp_config *cfg,
                               uint64_t *tokens, float *state, rp_error *err, rp_error *detail) {
    if (!rp_session_file_name_valid(name)) {
        bad_name(name, err);
        if (detail && err) *detail = *err;
        return RP_ERR_ARG;
    }
    rp_error why;
    const int dir = dir_fd(d, 0, NULL, &why);
    if (dir < 0)
        return fail_read(err, detail, &why, RP_ERR_IO, "no session file %s in the session "
                         "directory", name);
    /* Non-blocking and without following links: a FIFO or a link under
     * the name is refused at once instead of blocking this thread. */
    int fd = openat(dir, name, O_RDONLY | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC);
    if (fd < 0 && errno == ENOENT)
        return fail_read(err, detail, NULL, RP_ERR_IO, "no session file %s in the session "
                         "directory", name);
    if (fd < 0 && errno == ELOOP)
        return fail_read(err, detail, NULL, RP_ERR_FORMAT, "not a session file: %s is a "
                         "symbolic link", name);
    if (fd < 0)
        return fail_read(err, detail, NULL, RP_ERR_IO, "%s: cannot open: %s", name,
                         strerror(errno));
    struct stat sb;
    if (fstat(fd, &sb) != 0 || !S_ISREG(sb.st_mode)) {
        close(fd);
        return fail_read(err, detail, NULL, RP_ERR_FORMAT, "not a session file: %s is not a "
                         "regular file", name);
    }
    rp_st_file f;
    rp_error lib;
    if (rp_st_open_fd(&f, fd, name, &lib) != RP_OK)
        return fail_read(err, detail, &lib, RP_ERR_FORMAT, "not a session file: %s is not a "
                         "valid safetensors file", name);
    rp_status st = read_state(&f, name, cfg, tokens, state, err, detail);
    rp_st_close(&f);
    return st;
}

/* ---- by path ---- */

rp_status rp_session_file_write(const char *path, const rp_config *cfg, uint64_t tokens,
                                const float *state, rp_error *err) {
    file_image im;
    rp_status st = image_build(&im, cfg, tokens, state, err);
    if (st != RP_OK) return st;
    st = rp_st_writer_write(&im.w, path, err);
    image_free(&im);
    return st;
}

rp_status rp_session_file_read(const char *path, const rp_config *cfg, uint64_t *tokens,
                               float *state, rp_error *err) {
    rp_st_file f;
    rp_status st = rp_st_open(&f, path, err);
    if (st != RP_OK) return st;
    rp_error detail;
    st = read_state(&f, path, cfg, tokens, state, NULL, &detail);
    if (st != RP_OK && err) *err = detail;
    rp_st_close(&f);
    return st;
}
