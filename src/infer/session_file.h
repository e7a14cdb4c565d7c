/* Saved session states: one file holds the recurrent state of every layer
 * after reading `tokens` tokens, as safetensors with the official state names
 * (state.att_x_prev [L,C], state.ffn_x_prev [L,C], state.wkv [L,H,N,N], as
 * the `logits` command writes them) and, in the metadata key
 * "rwkvpipe.session", the hex of a SessionHeader (proto/rwkvpipe.proto) naming
 * the model's shape and the token count. The layout does not depend on the
 * number of pipeline stages that wrote it.
 *
 * Reading also accepts a state-tuning file: per-layer
 * `blocks.L.att.time_state` [H,N,N] (the tuned initial WKV state, row = value
 * channel, column = key channel, as state.wkv), with zero token shifts.
 *
 * The server (src/serve/http.c) reaches files only through an rp_session_dir:
 * plain names in one directory, opened relative to it without following
 * links, and a save never replaces a file that is not a session file. */
#ifndef RP_INFER_SESSION_FILE_H
#define RP_INFER_SESSION_FILE_H

#include <pthread.h>
#include <stdint.h>

#include "core/error.h"
#include "model/config.h"

#define RP_SESSION_FILE_SUFFIX ".state"
#define RP_SESSION_FILE_NAME_MAX 100  /* bytes of a file name, suffix included */

/* The directory session files live in. It is created (mode 0700, one
 * level) at the first save, then held open (O_DIRECTORY) so every file is
 * opened relative to it. Thread-safe. */
typedef struct {
    pthread_mutex_t mu;
    int fd;          /* -1 until first used */
    char *path;
    int overwrite;   /* a save may replace any regular file (--session-overwrite) */
    int max_files;   /* a save that would make more session files is refused; 0 = no cap */
} rp_session_dir;

/* No I/O yet: a server that never saves creates nothing. max_files bounds
 * what clients can put on the disk (files x one state's bytes). */
rp_status rp_session_dir_init(rp_session_dir *d, const char *path, int overwrite, int max_files,
                              rp_error *err);
void rp_session_dir_free(rp_session_dir *d);

/* 1 to max_len letters, digits, '_', '-' or '.', not starting with '.': a
 * name that can be neither a path nor a hidden file (session names and
 * session file names are both of this alphabet). */
int rp_session_plain_name(const char *name, size_t max_len);

/* A file name a client may give: 1 to RP_SESSION_FILE_NAME_MAX letters,
 * digits, '_', '-', '.', not starting with '.', ending in ".state" (so it can
 * never name the model, a hidden file or anything outside the directory). */
int rp_session_file_name_valid(const char *name);

/* Writes `name` in d atomically (a temporary name starting with '.', fsync,
 * renameat, directory fsync). RP_ERR_ARG when refused: a bad name, a
 * symbolic link or non-regular file under that name, or a regular file that
 * is not a session file (unless d->overwrite). RP_ERR_BUSY when a new file
 * would make more than d->max_files. RP_ERR_IO when writing fails.
 * state: the whole model's state in rp_state layout (1 slot, layers 0..L-1). */
rp_status rp_session_file_save(rp_session_dir *d, const char *name, const rp_config *cfg,
                               uint64_t tokens, const float *state, rp_error *err);
/* Reads `name` from d into state, checking its shapes against cfg. err's
 * message is for a client: it names the problem and the file, never bytes or
 * numbers read from the file; detail (may be NULL) gets the full message for
 * the server's log. A missing file is RP_ERR_IO; anything else wrong with
 * it RP_ERR_FORMAT / RP_ERR_SHAPE. */
rp_status rp_session_file_load(rp_session_dir *d, const char *name, const rp_config *cfg,
                               uint64_t *tokens, float *state, rp_error *err, rp_error *detail);

/* The same by path, for local files the caller trusts (tests, tools): the
 * write goes through rp_st_writer_write, err gets the detailed message. */
rp_status rp_session_file_write(const char *path, const rp_config *cfg, uint64_t tokens,
                                const float *state, rp_error *err);
rp_status rp_session_file_read(const char *path, const rp_config *cfg, uint64_t *tokens,
                               float *state, rp_error *err);

#endif
