/* Official RWKV-7 (x070) initialisation from a seed (docs/rwkv7.md, Initialisation). Every random
 * tensor draws from its own counter-based stream keyed by (seed, official
 * tensor name), so each pipeline rank initialises the layers and parts it owns
 * alone and gets the same bytes a single-process init would. Called by the
 * model-creation path (rank-local) and by tests. Host memory only. */
#ifndef RP_MODEL_INIT_H
#define RP_MODEL_INIT_H

#include <stdint.h>

#include "core/error.h"
#include "model/config.h"

/* Fills one layer's flat buffer (rp_layer_layout floats, padding zeroed) for
 * layer `layer` of cfg. */
rp_status rp_init_layer(float *flat, const rp_config *cfg, int layer, uint64_t seed,
                        rp_error *err);

/* Fills the embedding part (emb, ln0) and/or the head part (ln_out, head);
 * either pointer may be NULL when this stage does not own that part. */
rp_status rp_init_global(float *embed_flat, float *head_flat, const rp_config *cfg,
                         uint64_t seed, rp_error *err);

/* torch.nn.init.orthogonal_ for a row-major [rows, cols] matrix: QR of a
 * standard normal matrix drawn from stream `key` (element i*cols+j), signs
 * fixed by diag(R), times gain. Rows are orthonormal*gain if rows <= cols,
 * columns otherwise. `name` only labels error messages. */
rp_status rp_init_orthogonal(float *out, int64_t rows, int64_t cols, double gain, uint64_t key,
                             const char *name, rp_error *err);

#endif
