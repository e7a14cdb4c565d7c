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
 * channel, column = key channel, as state.wkv), with zero token shifts. */
#ifndef RP_SERVE_SESSION_FILE_H
#define RP_SERVE_SESSION_FILE_H

#include <stdint.h>

#include "core/error.h"
#include "model/config.h"

/* state: the whole model's state in rp_state layout (1 slot, layers 0..L-1). */
rp_status rp_session_file_write(const char *path, const rp_config *cfg, uint64_t tokens,
                                const float *state, rp_error *err);
/* Checks the file's shapes against cfg (a clear message names the mismatch). */
rp_status rp_session_file_read(const char *path, const rp_config *cfg, uint64_t *tokens,
                               float *state, rp_error *err);

#endif
