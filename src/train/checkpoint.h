/* Training checkpoints (docs/checkpoints.md). One directory per saved step,
 *   DIR/step-00000100/{weights,adam_m,adam_v}[-SSSSS-of-NNNNN].safetensors + manifest.pb
 * with DIR/latest and DIR/best pointer files (one line: a step directory's name).
 * Every file is written to a temp name, fsync'ed and renamed; manifest.pb
 * (CheckpointManifest, proto/rwkvpipe.proto) goes last, so a directory without
 * one is an interrupted save. Loading checks every file's size and SHA-256
 * before using it. Callers: the trainer, `rwkvpipe info`, later each pipeline
 * stage (it writes the shards of the layers it owns; see rp_ckpt_write_shard). */
#ifndef RP_TRAIN_CHECKPOINT_H
#define RP_TRAIN_CHECKPOINT_H

#include <stdint.h>
#include <stdio.h>

#include "core/error.h"
#include "core/sha256.h"
#include "model/model.h"
#include "optim/optim.h"

#define RP_CKPT_FORMAT_VERSION 1
#define RP_CKPT_MANIFEST_NAME "manifest.pb"
#define RP_CKPT_PATH_MAX 4096
/* Bounds a manifest's counters are checked against when it is read (those
 * of `rwkvpipe train`: --steps, --batch, --ctx-len). */
#define RP_CKPT_MAX_STEP (UINT64_C(1) << 40)
#define RP_CKPT_MAX_BATCH (UINT64_C(1) << 20)
#define RP_CKPT_MAX_CTX (UINT64_C(1) << 20)
/* Files per shard: weights, adam_m, adam_v, and with state tuning
 * "tuned" (the tuned initial WKV states and their AdamW moments), with LoRA
 * tuning "lora" (the adapters and their moments). */
#define RP_CKPT_ROLES 5

/* The scalar training state; integers only, so a resume is exact. */
typedef struct {
    uint64_t step;            /* optimizer steps completed = 0-based index of the next step */
    uint64_t tokens_seen;
    uint64_t seed;            /* data order and synthetic samples (counter-based RNG) */
    uint64_t data_epoch;      /* rp_loader_position.epoch */
    uint64_t data_index;      /* rp_loader_position.index */
    uint64_t data_samples;    /* rp_loader_position.samples */
    uint64_t data_n_windows;  /* rp_loader_position.n_windows (checked on restore) */
    uint64_t lr_step;         /* step the LR schedule is evaluated at next; normally == step */
} rp_train_progress;

typedef struct {
    const rp_model *weights;          /* required; its config goes into the manifest */
    const rp_model *adam_m, *adam_v;  /* same layout as weights, stored F32; NULL: weights only */
    rp_train_progress progress;       /* progress.step names the directory */
    const rp_optim_config *optim;     /* recorded for `info` and resume checks; NULL: not */
    const char *const *extra_keys;    /* free-form manifest map, n_extra entries */
    const char *const *extra_values;
    int n_extra;
    int keep_last;                    /* keep the newest K complete checkpoints; 0: keep all */
    /* State tuning (NULL: none): host [weights' layers][H][N][N] each, the
     * tuned states, their adam_m and adam_v, written as the "tuned" file
     * (blocks.L.att.time_state, .time_state_adam_m, .time_state_adam_v). */
    const float *tuned[3];
    /* LoRA tuning (NULL: none): host [weights' layers][lora_floats_per_layer]
     * each, the adapters (model/lora.h layout), their adam_m and adam_v,
     * written as the "lora" file (blocks.L.lora, .lora_adam_m, .lora_adam_v)
     * with lora_meta (rank, alpha, targets) in its metadata. The weights
     * are the base weights, not W'. */
    const float *lora[3];
    size_t lora_floats_per_layer;
    const char *lora_meta;
} rp_ckpt_contents;

/* Saves c under dir (created if missing) as dir/step-NNNNNNNN/, points
 * dir/latest at it, then deletes the oldest complete step directories beyond
 * keep_last (never the one dir/best names) and interrupted ones older than
 * this step. Saving a step whose directory already exists replaces it: its
 * manifest is removed first, so until the new one is written it reads as
 * incomplete, never as a mix of two saves. Equivalent to rp_ckpt_begin,
 * rp_ckpt_write_shard(0 of 1), rp_ckpt_commit. */
rp_status rp_ckpt_save(const char *dir, const rp_ckpt_contents *c, rp_error *err);

/* path: a step directory, or a checkpoint directory (then its `latest`, or
 * without one its newest complete step directory). Verifies the size and
 * SHA-256 of every file it is about to read, checks the manifest's config
 * against weights->cfg, and fills the tensors the models own (any layer range:
 * each tensor is read by name from whichever shard holds it). adam_m and
 * adam_v may be NULL (weights-only load; their files are then not read);
 * models must be allocated, with identical layouts. progress may be NULL. */
rp_status rp_ckpt_load(const char *path, rp_model *weights, rp_model *adam_m, rp_model *adam_v,
                       rp_train_progress *progress, rp_error *err);

/* The tuned states of layers [layer_begin, layer_end) and their moments
 * (out[0..2], host [layers][H][N][N]) from a state-tuning checkpoint, any
 * layout; verified like rp_ckpt_load. RP_ERR_FORMAT when it has none. */
rp_status rp_ckpt_load_tuned(const char *path, const rp_config *cfg, int layer_begin,
                             int layer_end, float *out[3], rp_error *err);

/* The LoRA adapters of layers [layer_begin, layer_end) and their moments
 * (out[0..2], host [layers][floats_per_layer]). RP_ERR_FORMAT when it has
 * none; RP_ERR_ARG naming both when its lora_meta is not want_meta. */
rp_status rp_ckpt_load_lora(const char *path, const rp_config *cfg, int layer_begin,
                            int layer_end, size_t floats_per_layer, float *out[3],
                            const char *want_meta, rp_error *err);

/* What a checkpoint holds, from its manifest alone (no file is verified):
 * what a caller needs to allocate models before rp_ckpt_load. */
typedef struct {
    char step_dir[RP_CKPT_PATH_MAX];  /* the resolved step directory */
    rp_config cfg;
    rp_train_progress progress;
    int has_optim;                    /* optim is valid */
    rp_optim_config optim;
    int has_moments;                  /* adam_m and adam_v files are listed */
    int has_tuned;                    /* "tuned" files are listed (a state-tuning run) */
    int has_lora;                     /* "lora" files are listed (a LoRA run) */
    char created_by[128];
    uint64_t created_unix;
} rp_ckpt_info;

rp_status rp_ckpt_read_info(const char *path, rp_ckpt_info *info, rp_error *err);

/* Resolves path as rp_ckpt_load does (step directory, or dir -> latest). */
rp_status rp_ckpt_resolve(const char *path, char *step_dir, size_t step_dir_size, rp_error *err);

/* Checks size and SHA-256 of every file the manifest lists. */
rp_status rp_ckpt_verify(const char *path, rp_error *err);

/* Writes dir/best (atomically) naming step_dir, a complete step directory
 * inside dir given by name ("step-00000100") or path. Rotation never deletes
 * it. A pointer, not a copy: marking best costs nothing and no data is
 * duplicated. */
rp_status rp_ckpt_mark_best(const char *dir, const char *step_dir, rp_error *err);

/* Prints the manifest human-readably (`rwkvpipe info CKPT`), with each file's
 * presence and size checked (checksums are not: see rp_ckpt_verify). */
rp_status rp_ckpt_describe(const char *path, FILE *out, rp_error *err);

/* ---- sharded saves (pipeline stages) ----
 * The coordinator calls rp_ckpt_begin; then every stage writes its part with
 * rp_ckpt_write_shard (shard_index of shard_count, any layer ranges, as long
 * as together they cover the model); the coordinator gathers the rp_ckpt_file
 * entries (plain data: send them as bytes) and calls rp_ckpt_commit, which
 * writes the manifest, then `latest`, then rotates. */
typedef struct {
    char name[64];     /* relative to the step directory */
    char role[16];     /* "weights", "adam_m", "adam_v" */
    uint64_t bytes;
    char sha256[RP_SHA256_HEX_LEN + 1];
    int layer_begin, layer_end, has_embed, has_head;
    int shard_index, shard_count;
} rp_ckpt_file;

/* Creates dir/step-NNNNNNNN (emptying out a previous save of that step) and
 * returns its path. */
rp_status rp_ckpt_begin(const char *dir, uint64_t step, char *step_dir, size_t step_dir_size,
                        rp_error *err);
/* Writes c's models (the layers they own) as shard shard_index of shard_count
 * into step_dir and describes the files written in files_out (up to
 * RP_CKPT_ROLES; *n_files receives how many). */
rp_status rp_ckpt_write_shard(const char *step_dir, const rp_ckpt_contents *c, int shard_index,
                              int shard_count, rp_ckpt_file files_out[RP_CKPT_ROLES],
                              int *n_files, rp_error *err);
/* Checks that the files of each role cover the whole model, writes the
 * manifest of c (c's models are used only for their config), fsyncs, updates
 * dir/latest and applies c->keep_last. */
rp_status rp_ckpt_commit(const char *dir, const rp_ckpt_contents *c, const rp_ckpt_file *files,
                         int n_files, rp_error *err);

/* "step-00000100" for step 100 (wider past 8 digits). */
void rp_ckpt_step_name(char *out, size_t out_size, uint64_t step);

#endif
