/* Checkpoint directories (checkpoint.h, docs/checkpoints.md): shard files
 * written through rp_model_save (temp name, fsync, rename), a protobuf
 * manifest written last the same way, `latest`/`best` pointer files, rotation,
 * and a loader that verifies sizes and SHA-256 before reading tensors by name
 * from whichever shard holds them. */
#include "train/checkpoint.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "core/fileio.h"
#include "core/version.h"
#include "model/config_pb.h"
#include "rwkvpipe.pb-c.h"

#define POINTER_LATEST "latest"
#define POINTER_BEST "best"
/* A manifest lists a few files per stage; anything this large is not one. */
#define MANIFEST_MAX_BYTES (64u << 20)

typedef Rwkvpipe__CheckpointManifest manifest_t;

static const char *const role_names[RP_CKPT_ROLES] = {"weights", "adam_m", "adam_v", "tuned",
                                                      "lora"};
/* The roles that hold an rp_model (the first three). */
#define MODEL_ROLES 3
static const char *const tuned_suffix[3] = {"", "_adam_m", "_adam_v"};
#define ROLE_TUNED 3
#define ROLE_LORA 4

/* ------------------------------------------------------------ file helpers */

/* dir + "/" + name, without doubling a trailing slash of dir. */
static rp_status path_join(char *out, size_t size, const char *dir, const char *name,
                           rp_error *err) {
    size_t len = strlen(dir);
    while (len > 1 && dir[len - 1] == '/') len--;
    int n = snprintf(out, size, "%.*s/%s", (int)len, dir, name);
    if (n < 0 || (size_t)n >= size)
        return rp_error_set(err, RP_ERR_ARG, "path too long: %s/%s", dir, name);
    return RP_OK;
}

static int is_directory(const char *path) {
    struct stat sb;
    return stat(path, &sb) == 0 && S_ISDIR(sb.st_mode);
}

static int file_exists(const char *path) {
    struct stat sb;
    return stat(path, &sb) == 0;
}

/* Reads a whole (small) file into a malloc'ed buffer. *missing is set when it
 * does not exist (no error is set then). */
static rp_status read_whole_file(const char *path, size_t max_bytes, unsigned char **out,
                                 size_t *bytes, int *missing, rp_error *err) {
    *out = NULL;
    *bytes = 0;
    if (missing) *missing = 0;
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        if (errno == ENOENT && missing) {
            *missing = 1;
            return RP_ERR_IO;
        }
        return rp_error_set(err, RP_ERR_IO, "%s: cannot open: %s", path, strerror(errno));
    }
    struct stat sb;
    if (fstat(fd, &sb) != 0 || (uint64_t)sb.st_size > max_bytes) {
        close(fd);
        return rp_error_set(err, RP_ERR_FORMAT, "%s: %lld bytes, larger than the %zu allowed",
                            path, (long long)sb.st_size, max_bytes);
    }
    size_t size = (size_t)sb.st_size;
    unsigned char *buf = rp_malloc(size + 1, "file contents", err);
    if (!buf) {
        close(fd);
        return RP_ERR_NOMEM;
    }
    size_t got = 0;
    while (got < size) {
        ssize_t n = read(fd, buf + got, size - got);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) break;
        got += (size_t)n;
    }
    close(fd);
    if (got != size) {
        free(buf);
        return rp_error_set(err, RP_ERR_IO, "%s: short read (%zu of %zu bytes)", path, got, size);
    }
    buf[size] = '\0';
    *out = buf;
    *bytes = size;
    return RP_OK;
}

/* ------------------------------------------------------------ step names */

void rp_ckpt_step_name(char *out, size_t out_size, uint64_t step) {
    snprintf(out, out_size, "step-%08" PRIu64, step);
}

/* 1 when name is "step-" followed by decimal digits only. */
static int parse_step_name(const char *name, uint64_t *step) {
    if (strncmp(name, "step-", 5) != 0) return 0;
    const char *d = name + 5;
    size_t n = strspn(d, "0123456789");
    if (n == 0 || n > 19 || d[n] != '\0') return 0;
    *step = strtoull(d, NULL, 10);
    return 1;
}

typedef struct {
    char name[64];
    uint64_t step;
    int complete;   /* has manifest.pb */
} step_entry;

static int compare_step_entry(const void *a, const void *b) {
    uint64_t x = ((const step_entry *)a)->step, y = ((const step_entry *)b)->step;
    return x < y ? -1 : x > y;
}

/* The step-* directories of dir, sorted by step (oldest first). */
static rp_status list_step_dirs(const char *dir, step_entry **out, int *n_out, rp_error *err) {
    *out = NULL;
    *n_out = 0;
    DIR *d = opendir(dir);
    if (!d) return rp_error_set(err, RP_ERR_IO, "%s: cannot list: %s", dir, strerror(errno));
    step_entry *list = NULL;
    int n = 0, cap = 0;
    struct dirent *e;
    char path[RP_CKPT_PATH_MAX];
    rp_status st = RP_OK;
    while ((e = readdir(d)) != NULL) {
        uint64_t step;
        if (strlen(e->d_name) >= sizeof list[0].name || !parse_step_name(e->d_name, &step))
            continue;
        if ((st = path_join(path, sizeof path, dir, e->d_name, err)) != RP_OK) break;
        if (!is_directory(path)) continue;
        if (n == cap) {
            cap = cap ? 2 * cap : 16;
            step_entry *grown = realloc(list, (size_t)cap * sizeof *list);
            if (!grown) {
                st = rp_error_set(err, RP_ERR_NOMEM, "%s: cannot list step directories", dir);
                break;
            }
            list = grown;
        }
        snprintf(list[n].name, sizeof list[n].name, "%s", e->d_name);
        list[n].step = step;
        char manifest[RP_CKPT_PATH_MAX];
        if ((st = path_join(manifest, sizeof manifest, path, RP_CKPT_MANIFEST_NAME, err)) != RP_OK)
            break;
        list[n].complete = file_exists(manifest);
        n++;
    }
    closedir(d);
    if (st != RP_OK) {
        free(list);
        return st;
    }
    if (n) qsort(list, (size_t)n, sizeof *list, compare_step_entry);
    *out = list;
    *n_out = n;
    return RP_OK;
}

/* Reads dir/<pointer> ("latest", "best"): one line naming a step directory.
 * Returns 0 with name[0] == '\0' when the pointer does not exist. */
static rp_status read_pointer(const char *dir, const char *pointer, char *name, size_t size,
                              rp_error *err) {
    name[0] = '\0';
    char path[RP_CKPT_PATH_MAX];
    rp_status st = path_join(path, sizeof path, dir, pointer, err);
    if (st != RP_OK) return st;
    unsigned char *text;
    size_t bytes;
    int missing;
    st = read_whole_file(path, 4096, &text, &bytes, &missing, err);
    if (missing) return RP_OK;
    if (st != RP_OK) return st;
    size_t len = strcspn((const char *)text, "\r\n");
    uint64_t step;
    text[len] = '\0';
    if (len >= size || !parse_step_name((const char *)text, &step)) {
        st = rp_error_set(err, RP_ERR_FORMAT,
                          "%s: expected one line naming a step directory (step-NNNNNNNN), got "
                          "'%.64s'", path, (const char *)text);
    } else {
        memcpy(name, text, len + 1);
    }
    free(text);
    return st;
}

static rp_status write_pointer(const char *dir, const char *pointer, const char *name,
                               rp_error *err) {
    char path[RP_CKPT_PATH_MAX], line[96];
    rp_status st = path_join(path, sizeof path, dir, pointer, err);
    if (st != RP_OK) return st;
    int n = snprintf(line, sizeof line, "%s\n", name);
    return rp_file_write_atomic_bytes(path, line, (size_t)n, err);
}

/* Removes every plain file of a step directory, manifest first (so an
 * interrupted removal leaves an incomplete checkpoint, never a complete-looking
 * one with files missing), then the directory itself. */
static rp_status remove_step_dir(const char *path, rp_error *err) {
    char file[RP_CKPT_PATH_MAX];
    rp_status st = path_join(file, sizeof file, path, RP_CKPT_MANIFEST_NAME, err);
    if (st != RP_OK) return st;
    if (unlink(file) == 0) {
        if ((st = rp_dir_fsync(path, err)) != RP_OK) return st;
    } else if (errno != ENOENT) {
        return rp_error_set(err, RP_ERR_IO, "%s: cannot remove: %s", file, strerror(errno));
    }
    DIR *d = opendir(path);
    if (!d) return rp_error_set(err, RP_ERR_IO, "%s: cannot list: %s", path, strerror(errno));
    struct dirent *e;
    while ((e = readdir(d)) != NULL) {
        if (strcmp(e->d_name, ".") == 0 || strcmp(e->d_name, "..") == 0) continue;
        if ((st = path_join(file, sizeof file, path, e->d_name, err)) != RP_OK) break;
        if (unlink(file) != 0) {
            st = rp_error_set(err, RP_ERR_IO, "%s: cannot remove: %s", file, strerror(errno));
            break;
        }
    }
    closedir(d);
    if (st != RP_OK) return st;
    if (rmdir(path) != 0)
        return rp_error_set(err, RP_ERR_IO, "%s: cannot remove directory: %s", path,
                            strerror(errno));
    return RP_OK;
}

/* ------------------------------------------------------------ config */

static void config_describe(char *out, size_t size, const rp_config *c) {
    snprintf(out, size, "L%d C%d H%d N%d V%d F%d, LoRA ranks %d/%d/%d/%d", c->n_layer, c->n_embd,
             c->n_head, c->head_size, c->vocab_size, c->dim_ffn, c->d_decay, c->d_iclr,
             c->d_value, c->d_gate);
}

static int config_equal(const rp_config *a, const rp_config *b) {
    return a->n_layer == b->n_layer && a->n_embd == b->n_embd && a->n_head == b->n_head &&
           a->head_size == b->head_size && a->vocab_size == b->vocab_size &&
           a->dim_ffn == b->dim_ffn && a->d_decay == b->d_decay && a->d_iclr == b->d_iclr &&
           a->d_value == b->d_value && a->d_gate == b->d_gate;
}

static int same_layout(const rp_model *a, const rp_model *b) {
    return config_equal(&a->cfg, &b->cfg) && a->layer_begin == b->layer_begin &&
           a->layer_end == b->layer_end && !a->has_embed == !b->has_embed &&
           !a->has_head == !b->has_head;
}

/* Moments must mirror the weights tensor for tensor. */
static rp_status check_model_layouts(const rp_model *w, const rp_model *m, const rp_model *v,
                                     rp_error *err) {
    if (!w || !w->be) return rp_error_set(err, RP_ERR_ARG, "checkpoint: no weights model given");
    const rp_model *moments[2] = {m, v};
    for (int i = 0; i < 2; i++) {
        if (!moments[i]) continue;
        if (!same_layout(w, moments[i]))
            return rp_error_set(err, RP_ERR_ARG,
                                "checkpoint: %s does not have the weights' layout (config, "
                                "layers [%d, %d), embed %d, head %d)",
                                role_names[i + 1], w->layer_begin, w->layer_end, w->has_embed,
                                w->has_head);
    }
    return RP_OK;
}

/* ------------------------------------------------------------ manifest */

static rp_status manifest_check_file_entry(const char *path, const manifest_t *man, size_t i,
                                           rp_error *err) {
    const Rwkvpipe__CheckpointFile *f = man->files[i];
    const char *name = f->name ? f->name : "";
    if (!*name || strchr(name, '/') || strcmp(name, ".") == 0 || strcmp(name, "..") == 0 ||
        strcmp(name, RP_CKPT_MANIFEST_NAME) == 0 ||
        strlen(name) >= sizeof ((rp_ckpt_file *)0)->name)
        return rp_error_set(err, RP_ERR_FORMAT,
                            "%s: file entry %zu has an invalid name '%.80s' (expected a plain "
                            "file name inside the step directory)", path, i, name);
    int known = 0;
    for (int r = 0; r < RP_CKPT_ROLES; r++) known |= f->role && strcmp(f->role, role_names[r]) == 0;
    if (!known)
        return rp_error_set(err, RP_ERR_FORMAT,
                            "%s: file '%s' has role '%.32s', expected weights, adam_m, adam_v, "
                            "tuned or lora",
                            path, name, f->role ? f->role : "");
    const char *h = f->sha256 ? f->sha256 : "";
    if (strlen(h) != RP_SHA256_HEX_LEN || strspn(h, "0123456789abcdef") != RP_SHA256_HEX_LEN)
        return rp_error_set(err, RP_ERR_FORMAT,
                            "%s: file '%s' has checksum '%.80s', expected 64 lowercase hex "
                            "digits (SHA-256)", path, name, h);
    if (f->layer_begin > f->layer_end || f->layer_end > man->config->n_layer)
        return rp_error_set(err, RP_ERR_FORMAT,
                            "%s: file '%s' covers layers [%u, %u), outside the model's %u", path,
                            name, f->layer_begin, f->layer_end, man->config->n_layer);
    return RP_OK;
}

static rp_status config_from_manifest(const char *path, const manifest_t *man, rp_config *cfg,
                                      rp_error *err) {
    const Rwkvpipe__ModelConfig *p = man->config;
    if (!p) return rp_error_set(err, RP_ERR_FORMAT, "%s: no model config", path);
    if (p->arch && *p->arch && strcmp(p->arch, "rwkv7") != 0)
        return rp_error_set(err, RP_ERR_FORMAT, "%s: architecture '%.32s', expected rwkv7", path,
                            p->arch);
    memset(cfg, 0, sizeof *cfg);
    if (p->n_layer > 1u << 20 || p->n_embd > 1u << 20 || p->head_size == 0 ||
        p->head_size > 1u << 20 || p->vocab_size > 1u << 30 || p->dim_ffn > 1u << 24 ||
        p->d_decay > 1u << 20 || p->d_iclr > 1u << 20 || p->d_value > 1u << 20 ||
        p->d_gate > 1u << 20)
        return rp_error_set(err, RP_ERR_FORMAT, "%s: model config out of range", path);
    cfg->n_layer = (int)p->n_layer;
    cfg->n_embd = (int)p->n_embd;
    cfg->head_size = (int)p->head_size;
    cfg->n_head = cfg->n_embd / cfg->head_size;
    cfg->vocab_size = (int)p->vocab_size;
    cfg->dim_ffn = (int)p->dim_ffn;
    cfg->d_decay = (int)p->d_decay;
    cfg->d_iclr = (int)p->d_iclr;
    cfg->d_value = (int)p->d_value;
    cfg->d_gate = (int)p->d_gate;
    rp_status st = rp_config_validate(cfg, err);
    if (st != RP_OK) return rp_error_prefix(err, "%s: model config", path);
    return RP_OK;
}

/* The counters of a manifest, checked when it is read: a corrupt or edited
 * step (2^64 - 1 once resumed "at step -1" with a negative learning rate)
 * must be refused with the value, not trained on. The bounds are those of
 * `rwkvpipe train` (--steps, --batch and --ctx-len at most 2^40, 2^20, 2^20);
 * the relations hold for any mix of batch sizes and context lengths across
 * resumes: every step draws at least one sample and every sample is at
 * least one token. */
static rp_status manifest_check_progress(const char *path, const manifest_t *man,
                                         rp_error *err) {
    const uint64_t step = man->step, tokens = man->tokens_seen, lr_step = man->lr_schedule_step;
    const Rwkvpipe__DataPosition *d = man->data;
    const uint64_t samples = d->samples;
    const char *fix = "the manifest is corrupt or was edited; resume from another step directory";
    if (step > RP_CKPT_MAX_STEP)
        return rp_error_set(err, RP_ERR_FORMAT,
                            "%s: step %" PRIu64 " is out of range [0, 2^40 = %" PRIu64
                            "] (the largest --steps); %s", path, step, RP_CKPT_MAX_STEP, fix);
    if (lr_step > RP_CKPT_MAX_STEP)
        return rp_error_set(err, RP_ERR_FORMAT,
                            "%s: LR schedule step %" PRIu64 " is out of range [0, 2^40]; %s", path,
                            lr_step, fix);
    if ((step == 0) != (samples == 0) || (step == 0) != (tokens == 0))
        return rp_error_set(err, RP_ERR_FORMAT,
                            "%s: step %" PRIu64 " with %" PRIu64 " samples and %" PRIu64
                            " tokens seen: a run has all three zero or none; %s", path, step,
                            samples, tokens, fix);
    if (samples < step || samples / RP_CKPT_MAX_BATCH > step)
        return rp_error_set(err, RP_ERR_FORMAT,
                            "%s: %" PRIu64 " samples drawn in %" PRIu64 " steps: not between 1 "
                            "and 2^20 (the largest --batch) per step; %s", path, samples, step,
                            fix);
    if (tokens < samples || tokens / RP_CKPT_MAX_CTX > samples)
        return rp_error_set(err, RP_ERR_FORMAT,
                            "%s: %" PRIu64 " tokens seen in %" PRIu64 " samples: not between 1 "
                            "and 2^20 (the largest --ctx-len) per sample; %s", path, tokens,
                            samples, fix);
    if (d->epoch > samples)
        return rp_error_set(err, RP_ERR_FORMAT,
                            "%s: data epoch %" PRIu64 " after only %" PRIu64 " samples; %s", path,
                            d->epoch, samples, fix);
    if (d->n_windows == 0 ? d->epoch != 0 || d->index != samples : d->index > d->n_windows)
        return rp_error_set(err, RP_ERR_FORMAT,
                            "%s: data position index %" PRIu64 " (epoch %" PRIu64 ", %" PRIu64
                            " windows, %" PRIu64 " samples) is impossible; %s", path, d->index,
                            d->epoch, d->n_windows, samples, fix);
    return RP_OK;
}

/* Reads and validates step_dir/manifest.pb. Free with
 * rwkvpipe__checkpoint_manifest__free_unpacked(man, NULL). */
static rp_status manifest_read(const char *step_dir, manifest_t **out, rp_config *cfg,
                               rp_error *err) {
    *out = NULL;
    if (!is_directory(step_dir))
        return rp_error_set(err, RP_ERR_IO, "%s: no such checkpoint directory", step_dir);
    char path[RP_CKPT_PATH_MAX];
    rp_status st = path_join(path, sizeof path, step_dir, RP_CKPT_MANIFEST_NAME, err);
    if (st != RP_OK) return st;
    unsigned char *data;
    size_t bytes;
    int missing;
    st = read_whole_file(path, MANIFEST_MAX_BYTES, &data, &bytes, &missing, err);
    if (missing)
        return rp_error_set(err, RP_ERR_FORMAT,
                            "%s: incomplete checkpoint (no %s): it was interrupted while being "
                            "written; resume from an earlier step directory", step_dir,
                            RP_CKPT_MANIFEST_NAME);
    if (st != RP_OK) return st;
    manifest_t *man = rwkvpipe__checkpoint_manifest__unpack(NULL, bytes, data);
    free(data);
    if (!man)
        return rp_error_set(err, RP_ERR_FORMAT,
                            "%s: not a valid CheckpointManifest (protobuf decoding failed): the "
                            "file is corrupted", path);
    if (man->format_version == 0)
        st = rp_error_set(err, RP_ERR_FORMAT,
                          "%s: format_version is missing: not a checkpoint manifest, or corrupted",
                          path);
    else if (man->format_version > RP_CKPT_FORMAT_VERSION)
        st = rp_error_set(err, RP_ERR_FORMAT,
                          "%s: checkpoint format version %u is newer than this rwkvpipe reads "
                          "(%d): upgrade rwkvpipe", path, man->format_version,
                          RP_CKPT_FORMAT_VERSION);
    else if (!man->data)
        st = rp_error_set(err, RP_ERR_FORMAT, "%s: no data position", path);
    else if (man->n_files == 0)
        st = rp_error_set(err, RP_ERR_FORMAT, "%s: lists no files", path);
    if (st == RP_OK) st = config_from_manifest(path, man, cfg, err);
    if (st == RP_OK) st = manifest_check_progress(path, man, err);
    for (size_t i = 0; st == RP_OK && i < man->n_files; i++)
        st = manifest_check_file_entry(path, man, i, err);
    if (st != RP_OK) {
        rwkvpipe__checkpoint_manifest__free_unpacked(man, NULL);
        return st;
    }
    *out = man;
    return RP_OK;
}

static void progress_from_manifest(const manifest_t *man, rp_train_progress *p) {
    memset(p, 0, sizeof *p);
    p->step = man->step;
    p->tokens_seen = man->tokens_seen;
    p->seed = man->seed;
    p->lr_step = man->lr_schedule_step;
    p->data_epoch = man->data->epoch;
    p->data_index = man->data->index;
    p->data_samples = man->data->samples;
    p->data_n_windows = man->data->n_windows;
}

static void file_from_manifest(const Rwkvpipe__CheckpointFile *f, rp_ckpt_file *out) {
    memset(out, 0, sizeof *out);
    snprintf(out->name, sizeof out->name, "%s", f->name);
    snprintf(out->role, sizeof out->role, "%s", f->role);
    snprintf(out->sha256, sizeof out->sha256, "%s", f->sha256);
    out->bytes = f->bytes;
    out->layer_begin = (int)f->layer_begin;
    out->layer_end = (int)f->layer_end;
    out->has_embed = f->has_embed != 0;
    out->has_head = f->has_head != 0;
    out->shard_index = (int)f->shard_index;
    out->shard_count = (int)f->shard_count;
}

/* ------------------------------------------------------------ resolve */

rp_status rp_ckpt_resolve(const char *path, char *step_dir, size_t step_dir_size, rp_error *err) {
    if (!path || !*path) return rp_error_set(err, RP_ERR_ARG, "checkpoint: empty path");
    struct stat sb;
    if (stat(path, &sb) != 0)
        return rp_error_set(err, RP_ERR_IO, "%s: cannot open checkpoint: %s", path,
                            strerror(errno));
    if (!S_ISDIR(sb.st_mode))
        return rp_error_set(err, RP_ERR_ARG,
                            "%s: not a checkpoint directory (a checkpoint is a directory with "
                            "%s, or one holding step-* directories and `latest`)",
                            path, RP_CKPT_MANIFEST_NAME);
    char probe[RP_CKPT_PATH_MAX];
    rp_status st = path_join(probe, sizeof probe, path, RP_CKPT_MANIFEST_NAME, err);
    if (st != RP_OK) return st;
    if (file_exists(probe)) goto self;

    char name[64];
    if ((st = read_pointer(path, POINTER_LATEST, name, sizeof name, err)) != RP_OK) return st;
    if (name[0]) return path_join(step_dir, step_dir_size, path, name, err);

    /* No `latest` (a crash between the manifest and the pointer of the very
     * first save): the newest complete step directory. */
    step_entry *list;
    int n;
    if ((st = list_step_dirs(path, &list, &n, err)) != RP_OK) return st;
    int newest = -1;
    for (int i = 0; i < n; i++)
        if (list[i].complete) newest = i;
    if (newest >= 0) {
        st = path_join(step_dir, step_dir_size, path, list[newest].name, err);
        free(list);
        return st;
    }
    if (n > 0) {
        st = rp_error_set(err, RP_ERR_FORMAT,
                          "%s: no complete checkpoint: %d step director%s (newest %s) without "
                          "%s, interrupted while being written", path, n, n == 1 ? "y" : "ies",
                          list[n - 1].name, RP_CKPT_MANIFEST_NAME);
        free(list);
        return st;
    }
    free(list);
    /* Neither a parent nor complete: a step directory whose save was cut
     * short (manifest_read reports it), unless nothing here is a checkpoint. */
    const char *base = strrchr(path, '/');
    base = base ? base + 1 : path;
    uint64_t step;
    int looks_like_step = parse_step_name(base, &step);
    DIR *d = opendir(path);
    if (d) {
        struct dirent *e;
        while ((e = readdir(d)) != NULL)
            if (strstr(e->d_name, ".safetensors")) looks_like_step = 1;
        closedir(d);
    }
    if (!looks_like_step)
        return rp_error_set(err, RP_ERR_FORMAT,
                            "%s: not a checkpoint: no %s, no `latest` pointer and no step-* "
                            "directories", path, RP_CKPT_MANIFEST_NAME);
self:
    if (snprintf(step_dir, step_dir_size, "%s", path) >= (int)step_dir_size)
        return rp_error_set(err, RP_ERR_ARG, "path too long: %s", path);
    return RP_OK;
}

/* ------------------------------------------------------------ verification */

/* Size first (cheap, and names truncation as such), then SHA-256. Files are
 * hashed in parallel; the error reported is that of the first bad file in
 * list order, so messages do not depend on thread timing. */
static rp_status verify_files(const char *step_dir, const rp_ckpt_file *files, int n,
                              rp_error *err) {
    if (n <= 0) return RP_OK;
    rp_error *errs = rp_calloc((size_t)n, sizeof *errs, "verification errors", err);
    rp_status *status = rp_calloc((size_t)n, sizeof *status, "verification status", err);
    if (!errs || !status) {
        free(errs);
        free(status);
        return RP_ERR_NOMEM;
    }
#pragma omp parallel for schedule(dynamic, 1)
    for (int i = 0; i < n; i++) {
        char path[RP_CKPT_PATH_MAX];
        rp_status st = path_join(path, sizeof path, step_dir, files[i].name, &errs[i]);
        struct stat sb;
        memset(&sb, 0, sizeof sb);
        if (st == RP_OK && stat(path, &sb) != 0)
            st = rp_error_set(&errs[i], RP_ERR_IO, "%s: listed in %s but %s", path,
                              RP_CKPT_MANIFEST_NAME,
                              errno == ENOENT ? "missing" : strerror(errno));
        if (st == RP_OK && (uint64_t)sb.st_size != files[i].bytes)
            st = rp_error_set(&errs[i], RP_ERR_FORMAT,
                              "%s: %lld bytes, the manifest lists %" PRIu64
                              " (file truncated or replaced)",
                              path, (long long)sb.st_size, files[i].bytes);
        char hex[RP_SHA256_HEX_LEN + 1];
        uint64_t bytes = 0;
        if (st == RP_OK) st = rp_sha256_file(path, hex, &bytes, &errs[i]);
        if (st == RP_OK && (bytes != files[i].bytes || strcmp(hex, files[i].sha256) != 0))
            st = rp_error_set(&errs[i], RP_ERR_FORMAT,
                              "%s: sha256 mismatch (file corrupted or truncated): %s, the "
                              "manifest lists %s", path, hex, files[i].sha256);
        status[i] = st;
    }
    rp_status st = RP_OK;
    for (int i = 0; i < n && st == RP_OK; i++)
        if (status[i] != RP_OK) {
            st = status[i];
            if (err) *err = errs[i];
        }
    free(errs);
    free(status);
    return st;
}

static rp_status manifest_files(const manifest_t *man, rp_ckpt_file **out, rp_error *err) {
    *out = rp_calloc(man->n_files, sizeof **out, "checkpoint file list", err);
    if (!*out) return RP_ERR_NOMEM;
    for (size_t i = 0; i < man->n_files; i++) file_from_manifest(man->files[i], &(*out)[i]);
    return RP_OK;
}

rp_status rp_ckpt_verify(const char *path, rp_error *err) {
    char step_dir[RP_CKPT_PATH_MAX];
    rp_status st = rp_ckpt_resolve(path, step_dir, sizeof step_dir, err);
    if (st != RP_OK) return st;
    manifest_t *man;
    rp_config cfg;
    if ((st = manifest_read(step_dir, &man, &cfg, err)) != RP_OK) return st;
    rp_ckpt_file *files = NULL;
    st = manifest_files(man, &files, err);
    if (st == RP_OK) st = verify_files(step_dir, files, (int)man->n_files, err);
    free(files);
    rwkvpipe__checkpoint_manifest__free_unpacked(man, NULL);
    return st;
}

/* ------------------------------------------------------------ save */

static void shard_file_name(char *out, size_t size, const char *role, int index, int count) {
    if (count == 1) snprintf(out, size, "%s.safetensors", role);
    else snprintf(out, size, "%s-%05d-of-%05d.safetensors", role, index, count);
}

rp_status rp_ckpt_begin(const char *dir, uint64_t step, char *step_dir, size_t step_dir_size,
                        rp_error *err) {
    rp_status st = rp_mkdir_p(dir, 0755, err);
    if (st != RP_OK) return st;
    char name[64];
    rp_ckpt_step_name(name, sizeof name, step);
    if ((st = path_join(step_dir, step_dir_size, dir, name, err)) != RP_OK) return st;
    if (mkdir(step_dir, 0755) == 0) return rp_dir_fsync(dir, err);
    if (errno != EEXIST || !is_directory(step_dir))
        return rp_error_set(err, RP_ERR_IO, "%s: cannot create directory: %s", step_dir,
                            strerror(errno));
    /* A previous save of this step (complete or interrupted): empty it, the
     * manifest first. */
    if ((st = remove_step_dir(step_dir, err)) != RP_OK)
        return rp_error_prefix(err, "cannot replace the previous save of step %" PRIu64, step);
    if (mkdir(step_dir, 0755) != 0)
        return rp_error_set(err, RP_ERR_IO, "%s: cannot create directory: %s", step_dir,
                            strerror(errno));
    return rp_dir_fsync(dir, err);
}

/* The "tuned" file of a shard: per layer of m, the tuned state and its
 * moments (tuned[0..2], host, m's layers), F32 [H,N,N]. */
static rp_status write_tuned(const rp_model *m, const rp_ckpt_contents *c, int role,
                             const char *path, rp_error *err) {
    const rp_config *cfg = &m->cfg;
    const int is_lora = role == ROLE_LORA;
    const size_t per = is_lora ? c->lora_floats_per_layer
                               : (size_t)cfg->n_head * cfg->head_size * cfg->head_size;
    const int64_t shape[3] = {is_lora ? (int64_t)per : cfg->n_head, cfg->head_size,
                              cfg->head_size};
    const float *const *src = is_lora ? c->lora : c->tuned;
    rp_st_writer w;
    rp_st_writer_init(&w);
    rp_status st = RP_OK;
    for (int l = m->layer_begin; l < m->layer_end && st == RP_OK; l++)
        for (int k = 0; k < 3 && st == RP_OK; k++) {
            char name[96];
            snprintf(name, sizeof name, "blocks.%d.%s%s", l, is_lora ? "lora" : "att.time_state",
                     tuned_suffix[k]);
            st = rp_st_writer_add(&w, name, RP_DTYPE_F32, RP_DTYPE_F32, is_lora ? 1 : 3, shape,
                                  src[k] + per * (size_t)(l - m->layer_begin), err);
        }
    if (st == RP_OK && is_lora)
        st = rp_st_writer_add_meta(&w, "lora", c->lora_meta ? c->lora_meta : "", err);
    if (st == RP_OK) st = rp_st_writer_write(&w, path, err);
    rp_st_writer_free(&w);
    return st;
}

rp_status rp_ckpt_write_shard(const char *step_dir, const rp_ckpt_contents *c, int shard_index,
                              int shard_count, rp_ckpt_file files_out[RP_CKPT_ROLES],
                              int *n_files, rp_error *err) {
    *n_files = 0;
    if (!c) return rp_error_set(err, RP_ERR_ARG, "checkpoint: no contents");
    rp_status st = check_model_layouts(c->weights, c->adam_m, c->adam_v, err);
    if (st != RP_OK) return st;
    if (shard_count < 1 || shard_count > 99999 || shard_index < 0 || shard_index >= shard_count)
        return rp_error_set(err, RP_ERR_ARG, "checkpoint: shard %d of %d is not a valid shard",
                            shard_index, shard_count);
    const rp_model *models[RP_CKPT_ROLES] = {c->weights, c->adam_m, c->adam_v,
                                             c->tuned[0] ? c->weights : NULL,
                                             c->lora[0] ? c->weights : NULL};
    int n = 0;
    for (int r = 0; r < RP_CKPT_ROLES; r++) {
        const rp_model *m = models[r];
        if (!m) continue;
        rp_ckpt_file *f = &files_out[n];
        memset(f, 0, sizeof *f);
        shard_file_name(f->name, sizeof f->name, role_names[r], shard_index, shard_count);
        snprintf(f->role, sizeof f->role, "%s", role_names[r]);
        f->layer_begin = m->layer_begin;
        f->layer_end = m->layer_end;
        f->has_embed = m->has_embed != 0;
        f->has_head = m->has_head != 0;
        f->shard_index = shard_index;
        f->shard_count = shard_count;
        char path[RP_CKPT_PATH_MAX];
        if ((st = path_join(path, sizeof path, step_dir, f->name, err)) != RP_OK) return st;
        /* F32 always: moments and master weights must round-trip bit for bit. */
        if ((st = r < MODEL_ROLES ? rp_model_save(m, path, RP_DTYPE_F32, err)
                                  : write_tuned(m, c, r, path, err)) != RP_OK)
            return st;
        n++;
    }
    /* Checksums of what is on disk now, hashed in parallel. */
    rp_error errs[RP_CKPT_ROLES];
    rp_status status[RP_CKPT_ROLES] = {RP_OK, RP_OK, RP_OK, RP_OK, RP_OK};
#pragma omp parallel for schedule(dynamic, 1)
    for (int i = 0; i < n; i++) {
        char path[RP_CKPT_PATH_MAX];
        status[i] = path_join(path, sizeof path, step_dir, files_out[i].name, &errs[i]);
        if (status[i] == RP_OK)
            status[i] = rp_sha256_file(path, files_out[i].sha256, &files_out[i].bytes, &errs[i]);
    }
    for (int i = 0; i < n; i++)
        if (status[i] != RP_OK) {
            if (err) *err = errs[i];
            return status[i];
        }
    *n_files = n;
    return RP_OK;
}

/* Every role that has files must cover layers [0, L), the embedding and the
 * head; weights must be present. */
static rp_status check_coverage(const rp_config *cfg, const rp_ckpt_file *files, int n_files,
                                rp_error *err) {
    unsigned char *covered = rp_calloc((size_t)cfg->n_layer + 2, 1, "coverage", err);
    if (!covered) return RP_ERR_NOMEM;
    rp_status st = RP_OK;
    for (int r = 0; r < RP_CKPT_ROLES && st == RP_OK; r++) {
        memset(covered, 0, (size_t)cfg->n_layer + 2);
        int any = 0;
        for (int i = 0; i < n_files; i++) {
            const rp_ckpt_file *f = &files[i];
            if (strcmp(f->role, role_names[r]) != 0) continue;
            any = 1;
            for (int l = f->layer_begin; l < f->layer_end && l < cfg->n_layer; l++) covered[l] = 1;
            if (f->has_embed) covered[cfg->n_layer] = 1;
            if (f->has_head) covered[cfg->n_layer + 1] = 1;
        }
        if (!any) {
            if (r == 0) st = rp_error_set(err, RP_ERR_ARG, "checkpoint: no weights file");
            continue;
        }
        for (int l = 0; l < cfg->n_layer + 2 && st == RP_OK; l++) {
            if (covered[l]) continue;
            if (l < cfg->n_layer)
                st = rp_error_set(err, RP_ERR_ARG, "checkpoint: no %s shard holds layer %d",
                                  role_names[r], l);
            else
                st = rp_error_set(err, RP_ERR_ARG, "checkpoint: no %s shard holds the %s",
                                  role_names[r], l == cfg->n_layer ? "embedding" : "head");
        }
    }
    free(covered);
    return st;
}

/* Deletes complete step directories beyond the newest keep_last (never the
 * current one or the one `best` names) and interrupted saves older than the
 * current step. */
static rp_status rotate(const char *dir, int keep_last, uint64_t current_step, rp_error *err) {
    step_entry *list;
    int n;
    rp_status st = list_step_dirs(dir, &list, &n, err);
    if (st != RP_OK) return st;
    char best[64];
    if ((st = read_pointer(dir, POINTER_BEST, best, sizeof best, err)) != RP_OK) {
        free(list);
        return rp_error_prefix(err, "not rotating checkpoints");
    }
    int kept = 0;
    for (int i = n - 1; i >= 0 && st == RP_OK; i--) {
        const step_entry *e = &list[i];
        int protect = e->step == current_step || strcmp(e->name, best) == 0;
        if (e->complete) {
            /* Newest first: the first keep_last complete ones stay. */
            if (keep_last == 0 || kept < keep_last) {
                kept++;
                continue;
            }
            if (protect) continue;
        } else if (protect || e->step >= current_step) {
            continue;  /* possibly still being written by someone else */
        }
        char path[RP_CKPT_PATH_MAX];
        if ((st = path_join(path, sizeof path, dir, e->name, err)) == RP_OK)
            st = remove_step_dir(path, err);
    }
    free(list);
    if (st == RP_OK) st = rp_dir_fsync(dir, err);
    if (st != RP_OK) return rp_error_prefix(err, "checkpoint saved, but rotation failed");
    return RP_OK;
}

rp_status rp_ckpt_commit(const char *dir, const rp_ckpt_contents *c, const rp_ckpt_file *files,
                         int n_files, rp_error *err) {
    if (!c || !c->weights)
        return rp_error_set(err, RP_ERR_ARG, "checkpoint: no contents or no weights model");
    if (c->keep_last < 0)
        return rp_error_set(err, RP_ERR_ARG,
                            "checkpoint: keep_last %d, expected >= 0 (0 keeps all)",
                            c->keep_last);
    const rp_config *cfg = &c->weights->cfg;
    rp_status st = check_coverage(cfg, files, n_files, err);
    if (st != RP_OK) return st;
    char name[64], step_dir[RP_CKPT_PATH_MAX], path[RP_CKPT_PATH_MAX];
    rp_ckpt_step_name(name, sizeof name, c->progress.step);
    if ((st = path_join(step_dir, sizeof step_dir, dir, name, err)) != RP_OK) return st;
    if ((st = path_join(path, sizeof path, step_dir, RP_CKPT_MANIFEST_NAME, err)) != RP_OK)
        return st;

    Rwkvpipe__ModelConfig pc;
    rp_config_to_pb(cfg, &pc);

    Rwkvpipe__DataPosition data = RWKVPIPE__DATA_POSITION__INIT;
    data.epoch = c->progress.data_epoch;
    data.index = c->progress.data_index;
    data.samples = c->progress.data_samples;
    data.n_windows = c->progress.data_n_windows;

    Rwkvpipe__OptimConfig optim = RWKVPIPE__OPTIM_CONFIG__INIT;
    if (c->optim) {
        optim.schedule = (char *)rp_lr_schedule_name(c->optim->schedule);
        optim.lr_init = c->optim->lr_init;
        optim.lr_final = c->optim->lr_final;
        optim.warmup_steps = (uint64_t)c->optim->warmup_steps;
        optim.total_steps = (uint64_t)c->optim->total_steps;
        optim.beta1 = c->optim->beta1;
        optim.beta2 = c->optim->beta2;
        optim.eps = c->optim->eps;
        optim.weight_decay = c->optim->weight_decay;
        optim.grad_clip = c->optim->grad_clip;
    }

    Rwkvpipe__CheckpointFile *file_msgs = rp_calloc((size_t)n_files, sizeof *file_msgs,
                                                    "manifest files", err);
    Rwkvpipe__CheckpointFile **file_ptrs = rp_calloc((size_t)n_files, sizeof *file_ptrs,
                                                     "manifest files", err);
    Rwkvpipe__CheckpointManifest__ExtraEntry *extra_msgs =
        rp_calloc((size_t)c->n_extra + 1, sizeof *extra_msgs, "manifest extras", err);
    Rwkvpipe__CheckpointManifest__ExtraEntry **extra_ptrs =
        rp_calloc((size_t)c->n_extra + 1, sizeof *extra_ptrs, "manifest extras", err);
    uint8_t *packed = NULL;
    if (!file_msgs || !file_ptrs || !extra_msgs || !extra_ptrs) {
        st = RP_ERR_NOMEM;
        goto done;
    }
    for (int i = 0; i < n_files; i++) {
        Rwkvpipe__CheckpointFile init = RWKVPIPE__CHECKPOINT_FILE__INIT;
        const rp_ckpt_file *f = &files[i];
        file_msgs[i] = init;
        file_msgs[i].name = (char *)f->name;
        file_msgs[i].bytes = f->bytes;
        file_msgs[i].sha256 = (char *)f->sha256;
        file_msgs[i].role = (char *)f->role;
        file_msgs[i].layer_begin = (uint32_t)f->layer_begin;
        file_msgs[i].layer_end = (uint32_t)f->layer_end;
        file_msgs[i].has_embed = f->has_embed != 0;
        file_msgs[i].has_head = f->has_head != 0;
        file_msgs[i].shard_index = (uint32_t)f->shard_index;
        file_msgs[i].shard_count = (uint32_t)f->shard_count;
        file_ptrs[i] = &file_msgs[i];
    }
    for (int i = 0; i < c->n_extra; i++) {
        Rwkvpipe__CheckpointManifest__ExtraEntry init =
            RWKVPIPE__CHECKPOINT_MANIFEST__EXTRA_ENTRY__INIT;
        extra_msgs[i] = init;
        extra_msgs[i].key = (char *)c->extra_keys[i];
        extra_msgs[i].value = (char *)c->extra_values[i];
        extra_ptrs[i] = &extra_msgs[i];
    }
    char created_by[64];
    snprintf(created_by, sizeof created_by, "rwkvpipe %s", rp_version());

    manifest_t man = RWKVPIPE__CHECKPOINT_MANIFEST__INIT;
    man.format_version = RP_CKPT_FORMAT_VERSION;
    man.config = &pc;
    man.step = c->progress.step;
    man.tokens_seen = c->progress.tokens_seen;
    man.lr_schedule_step = c->progress.lr_step;
    man.seed = c->progress.seed;
    man.data = &data;
    man.n_files = (size_t)n_files;
    man.files = file_ptrs;
    man.created_by = created_by;
    man.created_unix = (uint64_t)time(NULL);
    man.n_extra = (size_t)c->n_extra;
    man.extra = extra_ptrs;
    man.optim = c->optim ? &optim : NULL;

    size_t bytes = rwkvpipe__checkpoint_manifest__get_packed_size(&man);
    packed = rp_malloc(bytes ? bytes : 1, "packed manifest", err);
    if (!packed) {
        st = RP_ERR_NOMEM;
        goto done;
    }
    rwkvpipe__checkpoint_manifest__pack(&man, packed);
    /* The manifest makes the checkpoint complete: it goes last, atomically,
     * after every shard's rename was made durable by its writer. */
    if ((st = rp_file_write_atomic_bytes(path, packed, bytes, err)) != RP_OK) goto done;
    if ((st = write_pointer(dir, POINTER_LATEST, name, err)) != RP_OK) goto done;
    st = rotate(dir, c->keep_last, c->progress.step, err);
done:
    free(packed);
    free(file_msgs);
    free(file_ptrs);
    free(extra_msgs);
    free(extra_ptrs);
    return st;
}

rp_status rp_ckpt_save(const char *dir, const rp_ckpt_contents *c, rp_error *err) {
    if (!dir || !*dir) return rp_error_set(err, RP_ERR_ARG, "checkpoint: empty directory name");
    if (!c) return rp_error_set(err, RP_ERR_ARG, "checkpoint: no contents");
    rp_status st = check_model_layouts(c->weights, c->adam_m, c->adam_v, err);
    if (st != RP_OK) return st;
    const rp_model *w = c->weights;
    if (w->layer_begin != 0 || w->layer_end != w->cfg.n_layer || !w->has_embed || !w->has_head)
        return rp_error_set(err, RP_ERR_ARG,
                            "checkpoint: rp_ckpt_save needs the whole model (this one owns "
                            "layers [%d, %d) of %d); stages save with rp_ckpt_write_shard",
                            w->layer_begin, w->layer_end, w->cfg.n_layer);
    char step_dir[RP_CKPT_PATH_MAX];
    if ((st = rp_ckpt_begin(dir, c->progress.step, step_dir, sizeof step_dir, err)) != RP_OK)
        return st;
    rp_ckpt_file files[RP_CKPT_ROLES];
    int n_files;
    if ((st = rp_ckpt_write_shard(step_dir, c, 0, 1, files, &n_files, err)) != RP_OK) return st;
    return rp_ckpt_commit(dir, c, files, n_files, err);
}

/* ------------------------------------------------------------ load */

static int file_overlaps_model(const rp_ckpt_file *f, const rp_model *m) {
    return (f->layer_begin < m->layer_end && m->layer_begin < f->layer_end) ||
           (m->has_embed && f->has_embed) || (m->has_head && f->has_head);
}

/* The tensor named name in the first shard that has it. */
static const rp_st_tensor *find_in_shards(const rp_st_file *shards, int n, const char *name,
                                          const rp_st_file **which) {
    for (int i = 0; i < n; i++) {
        const rp_st_tensor *t = rp_st_find(&shards[i], name);
        if (t) {
            *which = &shards[i];
            return t;
        }
    }
    return NULL;
}

static rp_status read_exact_tensor(const rp_st_file *shards, int n_shards, const char *role,
                                   const char *step_dir, const rp_tensor_info *info, int layer,
                                   float *dst, rp_error *err) {
    char name[256];
    rp_tensor_name(name, sizeof name, info, layer);
    const rp_st_file *f = NULL;
    const rp_st_tensor *t = find_in_shards(shards, n_shards, name, &f);
    if (!t)
        return rp_error_set(err, RP_ERR_FORMAT, "%s: tensor '%s' is in none of the %s shards",
                            step_dir, name, role);
    int same = t->ndim == info->ndim;
    for (int d = 0; same && d < t->ndim; d++) same = t->shape[d] == info->shape[d];
    if (!same)
        return rp_error_set(err, RP_ERR_SHAPE,
                            "%s: tensor '%s' has %d dimensions / %lld elements, expected the "
                            "shape of the model's config (%lld elements)",
                            f->path, name, t->ndim, (long long)t->numel, (long long)info->numel);
    if (t->dtype != RP_DTYPE_F32)
        return rp_error_set(err, RP_ERR_FORMAT,
                            "%s: tensor '%s' has dtype %s; checkpoints store F32 (exact resume)",
                            f->path, name, rp_dtype_name(t->dtype));
    return rp_st_read_f32(f, t, dst, info->numel, err);
}

/* Fills every tensor model m owns from the shards of one role. */
static rp_status load_role(const char *step_dir, const char *role, const rp_st_file *shards,
                           int n_shards, rp_model *m, rp_error *err) {
    rp_backend *be = m->be;
    rp_tensor_info table[RP_LAYER_N_TENSORS], gtable[RP_GLOBAL_N_TENSORS];
    rp_layer_layout(&m->cfg, table);
    rp_global_layout(&m->cfg, gtable, NULL, NULL);
    size_t staging_floats = 0;
    if (!be->is_host_memory) {
        staging_floats = m->layer_floats;
        if (m->embed_floats > staging_floats) staging_floats = m->embed_floats;
        if (m->head_floats > staging_floats) staging_floats = m->head_floats;
    }
    float *staging = staging_floats ? rp_malloc(staging_floats * sizeof(float), "staging", err)
                                    : NULL;
    if (staging_floats && !staging) return RP_ERR_NOMEM;
    rp_status st = RP_OK;
    for (int l = m->layer_begin; l < m->layer_end && st == RP_OK; l++) {
        float *flat = m->layer_flat[l - m->layer_begin];
        float *dst = staging ? staging : flat;
        for (int i = 0; i < RP_LAYER_N_TENSORS && st == RP_OK; i++)
            st = read_exact_tensor(shards, n_shards, role, step_dir, &table[i], l,
                                   dst + table[i].flat_offset, err);
        if (st == RP_OK && staging)
            be->copy_to_device(be, flat, staging, m->layer_floats * sizeof(float));
    }
    for (int part = RP_PART_EMBED; part <= RP_PART_HEAD && st == RP_OK; part++) {
        float *flat = part == RP_PART_EMBED ? m->embed_flat : m->head_flat;
        size_t floats = part == RP_PART_EMBED ? m->embed_floats : m->head_floats;
        if (!flat) continue;
        float *dst = staging ? staging : flat;
        for (int i = 0; i < RP_GLOBAL_N_TENSORS && st == RP_OK; i++) {
            if (gtable[i].part != (rp_param_part)part) continue;
            st = read_exact_tensor(shards, n_shards, role, step_dir, &gtable[i], 0,
                                   dst + gtable[i].flat_offset, err);
        }
        if (st == RP_OK && staging) be->copy_to_device(be, flat, staging, floats * sizeof(float));
    }
    free(staging);
    return st;
}

/* What a load holds open: the manifest, its file list, the files this load
 * reads (used) and their open shards. Both loaders fill and release it the
 * same way. */
typedef struct {
    char step_dir[RP_CKPT_PATH_MAX];
    manifest_t *man;
    rp_config cfg;
    rp_ckpt_file *all, *used;
    rp_st_file *shards;
    int n_all, n_used, n_open;
} ckpt_reading;

/* Resolves path, reads the manifest and lists its files; on failure
 * reading_end still releases what was taken. */
static rp_status reading_begin(ckpt_reading *r, const char *path, rp_error *err) {
    memset(r, 0, sizeof *r);
    rp_status st = rp_ckpt_resolve(path, r->step_dir, sizeof r->step_dir, err);
    if (st != RP_OK) return st;
    if ((st = manifest_read(r->step_dir, &r->man, &r->cfg, err)) != RP_OK) return st;
    if ((st = manifest_files(r->man, &r->all, err)) != RP_OK) return st;
    r->n_all = (int)r->man->n_files;
    r->used = rp_calloc((size_t)r->n_all + 1, sizeof *r->used, "checkpoint files", err);
    r->shards = rp_calloc((size_t)r->n_all + 1, sizeof *r->shards, "checkpoint shards", err);
    return r->used && r->shards ? RP_OK : RP_ERR_NOMEM;
}

/* Verifies every used file (all before any is read), then opens them. */
static rp_status reading_open(ckpt_reading *r, rp_error *err) {
    rp_status st = verify_files(r->step_dir, r->used, r->n_used, err);
    for (int i = 0; i < r->n_used && st == RP_OK; i++) {
        char file[RP_CKPT_PATH_MAX];
        if ((st = path_join(file, sizeof file, r->step_dir, r->used[i].name, err)) != RP_OK) break;
        if ((st = rp_st_open(&r->shards[i], file, err)) == RP_OK) r->n_open++;
    }
    return st;
}

static void reading_end(ckpt_reading *r) {
    for (int i = 0; i < r->n_open; i++) rp_st_close(&r->shards[i]);
    free(r->shards);
    free(r->used);
    free(r->all);
    if (r->man) rwkvpipe__checkpoint_manifest__free_unpacked(r->man, NULL);
}

rp_status rp_ckpt_load(const char *path, rp_model *weights, rp_model *adam_m, rp_model *adam_v,
                       rp_train_progress *progress, rp_error *err) {
    rp_status st = check_model_layouts(weights, adam_m, adam_v, err);
    if (st != RP_OK) return st;
    ckpt_reading r;
    if ((st = reading_begin(&r, path, err)) != RP_OK) goto done;
    if (!config_equal(&r.cfg, &weights->cfg)) {
        char have[160], want[160];
        config_describe(have, sizeof have, &r.cfg);
        config_describe(want, sizeof want, &weights->cfg);
        st = rp_error_set(err, RP_ERR_SHAPE,
                          "%s: the checkpoint's model config (%s) does not match the model "
                          "being loaded (%s)", r.step_dir, have, want);
        goto done;
    }
    /* Only the files this load reads are verified (a weights-only load or a
     * pipeline stage skips the rest), but all of them before any is read. */
    rp_model *models[MODEL_ROLES] = {weights, adam_m, adam_v};
    int role_begin[MODEL_ROLES + 1];
    for (int k = 0; k < MODEL_ROLES; k++) {
        role_begin[k] = r.n_used;
        if (!models[k]) continue;
        int listed = 0;
        for (int i = 0; i < r.n_all; i++) {
            if (strcmp(r.all[i].role, role_names[k]) != 0) continue;
            listed = 1;
            if (file_overlaps_model(&r.all[i], models[k])) r.used[r.n_used++] = r.all[i];
        }
        if (!listed) {
            st = rp_error_set(err, RP_ERR_FORMAT,
                              "%s: the checkpoint has no %s files (a weights-only checkpoint "
                              "cannot resume training)", r.step_dir, role_names[k]);
            goto done;
        }
    }
    role_begin[MODEL_ROLES] = r.n_used;
    if ((st = reading_open(&r, err)) != RP_OK) goto done;
    for (int k = 0; k < MODEL_ROLES && st == RP_OK; k++) {
        if (!models[k]) continue;
        st = load_role(r.step_dir, role_names[k], r.shards + role_begin[k],
                       role_begin[k + 1] - role_begin[k], models[k], err);
    }
    if (st == RP_OK && progress) progress_from_manifest(r.man, progress);
done:
    reading_end(&r);
    return st;
}

static rp_status load_layer_extra(const char *path, const rp_config *cfg, int role,
                                  int layer_begin, int layer_end, size_t per, float *out[3],
                                  const char *want_meta, rp_error *err);

rp_status rp_ckpt_load_tuned(const char *path, const rp_config *cfg, int layer_begin,
                             int layer_end, float *out[3], rp_error *err) {
    return load_layer_extra(path, cfg, ROLE_TUNED, layer_begin, layer_end,
                            (size_t)cfg->n_head * cfg->head_size * cfg->head_size, out, NULL,
                            err);
}

rp_status rp_ckpt_load_lora(const char *path, const rp_config *cfg, int layer_begin,
                            int layer_end, size_t floats_per_layer, float *out[3],
                            const char *want_meta, rp_error *err) {
    return load_layer_extra(path, cfg, ROLE_LORA, layer_begin, layer_end, floats_per_layer, out,
                            want_meta, err);
}

/* The per-layer tensors of the "tuned" or "lora" files (write_tuned). */
static rp_status load_layer_extra(const char *path, const rp_config *cfg, int role,
                                  int layer_begin, int layer_end, size_t per, float *out[3],
                                  const char *want_meta, rp_error *err) {
    ckpt_reading r;
    rp_status st = reading_begin(&r, path, err);
    if (st != RP_OK) goto done;
    if (!config_equal(&r.cfg, cfg)) {
        st = rp_error_set(err, RP_ERR_SHAPE, "%s: the checkpoint's model config does not match "
                          "the model being tuned", r.step_dir);
        goto done;
    }
    int listed = 0;
    for (int i = 0; i < r.n_all; i++) {
        if (strcmp(r.all[i].role, role_names[role]) != 0) continue;
        listed = 1;
        if (r.all[i].layer_begin < layer_end && layer_begin < r.all[i].layer_end)
            r.used[r.n_used++] = r.all[i];
    }
    if (!listed) {
        st = rp_error_set(err, RP_ERR_FORMAT, "%s has no %s: it is not a checkpoint of a "
                          "--tune %s run", r.step_dir, role == ROLE_LORA ? "LoRA adapters" :
                          "tuned states", role == ROLE_LORA ? "lora" : "state");
        goto done;
    }
    if ((st = reading_open(&r, err)) != RP_OK) goto done;
    if (want_meta) {
        const char *v = r.n_open ? rp_st_meta(&r.shards[0], "lora") : NULL;
        if (!v || strcmp(v, want_meta) != 0) {
            st = rp_error_set(err, RP_ERR_ARG, "%s holds LoRA adapters of %s; this run asks for "
                              "%s: resume with the same --lora-rank / --lora-alpha / "
                              "--lora-targets", r.step_dir, v ? v : "(unknown)", want_meta);
            goto done;
        }
    }
    const size_t hnn = per;
    for (int l = layer_begin; l < layer_end && st == RP_OK; l++)
        for (int k = 0; k < 3 && st == RP_OK; k++) {
            char name[96];
            snprintf(name, sizeof name, "blocks.%d.%s%s", l,
                     role == ROLE_LORA ? "lora" : "att.time_state", tuned_suffix[k]);
            const rp_st_file *f = NULL;
            const rp_st_tensor *t = find_in_shards(r.shards, r.n_open, name, &f);
            if (!t) {
                st = rp_error_set(err, RP_ERR_FORMAT, "%s: tensor '%s' is in none of the tuned "
                                  "shards", r.step_dir, name);
                break;
            }
            if (t->dtype != RP_DTYPE_F32 || t->numel != (int64_t)hnn) {
                st = rp_error_set(err, RP_ERR_SHAPE, "%s: '%s' is not F32 with %zu elements "
                                  "(another LoRA rank or target list?)", f->path, name, hnn);
                break;
            }
            st = rp_st_read_f32(f, t, out[k] + hnn * (size_t)(l - layer_begin), (int64_t)hnn, err);
        }
done:
    reading_end(&r);
    return st;
}

/* ------------------------------------------------------------ info */

static void optim_from_manifest(const Rwkvpipe__OptimConfig *p, rp_optim_config *o) {
    rp_optim_defaults(o);
    int schedule = rp_lr_schedule_from_name(p->schedule ? p->schedule : "");
    if (schedule >= 0) o->schedule = (rp_lr_schedule)schedule;
    o->lr_init = p->lr_init;
    o->lr_final = p->lr_final;
    o->warmup_steps = (long)p->warmup_steps;
    o->total_steps = (long)p->total_steps;
    o->beta1 = p->beta1;
    o->beta2 = p->beta2;
    o->eps = p->eps;
    o->weight_decay = p->weight_decay;
    o->grad_clip = p->grad_clip;
}

rp_status rp_ckpt_read_info(const char *path, rp_ckpt_info *info, rp_error *err) {
    memset(info, 0, sizeof *info);
    rp_status st = rp_ckpt_resolve(path, info->step_dir, sizeof info->step_dir, err);
    if (st != RP_OK) return st;
    manifest_t *man;
    if ((st = manifest_read(info->step_dir, &man, &info->cfg, err)) != RP_OK) return st;
    progress_from_manifest(man, &info->progress);
    if (man->optim) {
        info->has_optim = 1;
        optim_from_manifest(man->optim, &info->optim);
    }
    int has_m = 0, has_v = 0;
    for (size_t i = 0; i < man->n_files; i++) {
        has_m |= strcmp(man->files[i]->role, "adam_m") == 0;
        has_v |= strcmp(man->files[i]->role, "adam_v") == 0;
    }
    info->has_moments = has_m && has_v;
    for (size_t i = 0; i < man->n_files; i++)
        info->has_tuned |= strcmp(man->files[i]->role, "tuned") == 0,
        info->has_lora |= strcmp(man->files[i]->role, "lora") == 0;
    snprintf(info->created_by, sizeof info->created_by, "%s",
             man->created_by ? man->created_by : "");
    info->created_unix = man->created_unix;
    rwkvpipe__checkpoint_manifest__free_unpacked(man, NULL);
    return RP_OK;
}

rp_status rp_ckpt_mark_best(const char *dir, const char *step_dir, rp_error *err) {
    if (!dir || !step_dir) return rp_error_set(err, RP_ERR_ARG, "rp_ckpt_mark_best: NULL path");
    size_t len = strlen(step_dir);
    while (len > 1 && step_dir[len - 1] == '/') len--;
    size_t begin = len;
    while (begin > 0 && step_dir[begin - 1] != '/') begin--;
    char name[64];
    uint64_t step;
    if (len - begin >= sizeof name)
        return rp_error_set(err, RP_ERR_ARG, "%s: not a step directory name", step_dir);
    memcpy(name, step_dir + begin, len - begin);
    name[len - begin] = '\0';
    if (!parse_step_name(name, &step))
        return rp_error_set(err, RP_ERR_ARG,
                            "%s: not a step directory (expected step-NNNNNNNN inside %s)",
                            step_dir, dir);
    char path[RP_CKPT_PATH_MAX], manifest[RP_CKPT_PATH_MAX];
    rp_status st = path_join(path, sizeof path, dir, name, err);
    if (st == RP_OK) st = path_join(manifest, sizeof manifest, path, RP_CKPT_MANIFEST_NAME, err);
    if (st != RP_OK) return st;
    if (!file_exists(manifest))
        return rp_error_set(err, RP_ERR_ARG,
                            "%s: cannot mark as best: not a complete checkpoint (no %s)", path,
                            RP_CKPT_MANIFEST_NAME);
    return write_pointer(dir, POINTER_BEST, name, err);
}

rp_status rp_ckpt_describe(const char *path, FILE *out, rp_error *err) {
    char step_dir[RP_CKPT_PATH_MAX];
    rp_status st = rp_ckpt_resolve(path, step_dir, sizeof step_dir, err);
    if (st != RP_OK) return st;
    manifest_t *man;
    rp_config cfg;
    if ((st = manifest_read(step_dir, &man, &cfg, err)) != RP_OK) return st;

    char when[64] = "unknown time";
    time_t t = (time_t)man->created_unix;
    struct tm tm;
    if (man->created_unix && gmtime_r(&t, &tm))
        strftime(when, sizeof when, "%Y-%m-%d %H:%M:%S UTC", &tm);
    char desc[160];
    config_describe(desc, sizeof desc, &cfg);
    fprintf(out, "checkpoint   %s\n", step_dir);
    fprintf(out, "format       version %u, written by %s at %s\n", man->format_version,
            man->created_by && *man->created_by ? man->created_by : "(unknown)", when);
    fprintf(out, "model        rwkv7 %s (%lld parameters)\n", desc, rp_config_param_count(&cfg));
    fprintf(out, "step         %" PRIu64 " (LR schedule at step %" PRIu64 ")\n", man->step,
            man->lr_schedule_step);
    fprintf(out, "tokens seen  %" PRIu64 "\n", man->tokens_seen);
    fprintf(out, "seed         %" PRIu64 "\n", man->seed);
    fprintf(out, "data         epoch %" PRIu64 ", index %" PRIu64 ", %" PRIu64
                 " samples drawn, %" PRIu64 " windows\n",
            man->data->epoch, man->data->index, man->data->samples, man->data->n_windows);
    if (man->optim) {
        const Rwkvpipe__OptimConfig *o = man->optim;
        fprintf(out, "optimizer    %s lr %.7g -> %.7g, warmup %" PRIu64 ", total %" PRIu64
                     " steps, betas %.7g %.7g, eps %.7g, weight decay %.7g, clip %.7g\n",
                o->schedule, (double)o->lr_init, (double)o->lr_final, o->warmup_steps,
                o->total_steps, (double)o->beta1, (double)o->beta2, (double)o->eps,
                (double)o->weight_decay, (double)o->grad_clip);
    }
    fprintf(out, "files        (sizes checked here; SHA-256 checked on load)\n");
    for (size_t i = 0; i < man->n_files; i++) {
        rp_ckpt_file f;
        file_from_manifest(man->files[i], &f);
        char file[RP_CKPT_PATH_MAX];
        const char *state = "ok";
        struct stat sb;
        if (path_join(file, sizeof file, step_dir, f.name, NULL) != RP_OK) state = "bad name";
        else if (stat(file, &sb) != 0) state = "MISSING";
        else if ((uint64_t)sb.st_size != f.bytes) state = "SIZE MISMATCH";
        fprintf(out, "  %-8s %-36s %12" PRIu64 " bytes  layers [%d, %d)%s%s  sha256 %.16s...  %s\n",
                f.role, f.name, f.bytes, f.layer_begin, f.layer_end, f.has_embed ? " +embed" : "",
                f.has_head ? " +head" : "", f.sha256, state);
    }
    if (man->n_extra) {
        fprintf(out, "extra\n");
        for (size_t i = 0; i < man->n_extra; i++)
            fprintf(out, "  %s = %s\n", man->extra[i]->key, man->extra[i]->value);
    }
    rwkvpipe__checkpoint_manifest__free_unpacked(man, NULL);
    return RP_OK;
}
