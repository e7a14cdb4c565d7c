/* Recurrent state of a batch of sequence slots for a range of layers.
 * Caller-owned flat f32 buffer (rwkv.cpp style): saving, restoring or forking
 * a sequence is a memcpy of one contiguous slot. Layout:
 *   [slot][layer - layer_begin] { att_x_prev [C], wkv [H, N, N], ffn_x_prev [C] }
 * which per layer is the official state[3l+0], state[3l+1], state[3l+2]:
 * att_x_prev / ffn_x_prev are the ln1 / ln2 outputs of the last token, and
 * wkv[h][i][j] has i = value row, j = key column. */
#ifndef RP_MODEL_STATE_H
#define RP_MODEL_STATE_H

#include <stddef.h>

#include "core/error.h"
#include "core/safetensors.h"
#include "model/config.h"

typedef struct {
    int n_slots;
    int layer_begin, layer_end;
    int n_embd, n_head, head_size;
    size_t floats_per_layer;  /* 2C + H*N*N */
    size_t floats_per_slot;   /* floats_per_layer * (layer_end - layer_begin) */
    float *data;              /* n_slots * floats_per_slot, backend memory */
} rp_state;

/* Fills the geometry fields (data untouched). */
void rp_state_geometry(rp_state *s, const rp_config *cfg, int layer_begin, int layer_end,
                       int n_slots);
/* Host allocation (zeroed) for the CPU backend and for tests. */
rp_status rp_state_alloc_host(rp_state *s, const rp_config *cfg, int layer_begin,
                              int layer_end, int n_slots, rp_error *err);
void rp_state_free_host(rp_state *s);

static inline float *rp_state_layer(const rp_state *s, int slot, int layer) {
    return s->data + (size_t)slot * s->floats_per_slot +
           (size_t)(layer - s->layer_begin) * s->floats_per_layer;
}
static inline float *rp_state_att_x_prev(const rp_state *s, int slot, int layer) {
    return rp_state_layer(s, slot, layer);
}
static inline float *rp_state_wkv(const rp_state *s, int slot, int layer) {
    return rp_state_layer(s, slot, layer) + s->n_embd;
}
static inline float *rp_state_ffn_x_prev(const rp_state *s, int slot, int layer) {
    return rp_state_layer(s, slot, layer) + s->n_embd +
           (size_t)s->n_head * s->head_size * s->head_size;
}

/* One sequence's whole-model state as the three named tensors of the logits
 * output and of session files (docs/formats.md):
 *   state.att_x_prev [L, C], state.ffn_x_prev [L, C], state.wkv [L, H, N, N]
 * with N the config's head size. Host memory, owned. */
#define RP_STATE_ATT_X_PREV "state.att_x_prev"
#define RP_STATE_FFN_X_PREV "state.ffn_x_prev"
#define RP_STATE_WKV "state.wkv"

typedef struct {
    float *att_x_prev, *ffn_x_prev, *wkv;
    int64_t shape_lc[2];  /* {L, C} */
    int64_t shape_wkv[4]; /* {L, H, N, N} */
} rp_state_tensors;

/* Allocates the three tensors for cfg (every layer). */
rp_status rp_state_tensors_alloc(rp_state_tensors *t, const rp_config *cfg, rp_error *err);
void rp_state_tensors_free(rp_state_tensors *t);
/* Copies slot `slot` of s (a host state holding every layer of t's model)
 * into t, and back. */
void rp_state_export(const rp_state *s, int slot, rp_state_tensors *t);
void rp_state_import(rp_state *s, int slot, const rp_state_tensors *t);
/* Adds the three tensors (float32, by reference: t must outlive w's write). */
rp_status rp_state_tensors_add(const rp_state_tensors *t, rp_st_writer *w, rp_error *err);

#endif
