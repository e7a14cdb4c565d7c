/* State geometry, host allocation and the export to named tensors (state.h):
 * the one place that knows how the flat per-slot layout maps to the
 * [L, C] / [L, H, N, N] tensors that files carry. */
#include "model/state.h"

#include <stdlib.h>
#include <string.h>

void rp_state_geometry(rp_state *s, const rp_config *cfg, int layer_begin, int layer_end,
                       int n_slots) {
    s->n_slots = n_slots;
    s->layer_begin = layer_begin;
    s->layer_end = layer_end;
    s->n_embd = cfg->n_embd;
    s->n_head = cfg->n_head;
    s->head_size = cfg->head_size;
    s->floats_per_layer = (size_t)rp_config_state_floats_per_layer(cfg);
    s->floats_per_slot = s->floats_per_layer * (size_t)(layer_end - layer_begin);
}

rp_status rp_state_alloc_host(rp_state *s, const rp_config *cfg, int layer_begin,
                              int layer_end, int n_slots, rp_error *err) {
    rp_state_geometry(s, cfg, layer_begin, layer_end, n_slots);
    s->data = rp_calloc((size_t)n_slots * s->floats_per_slot, sizeof(float), "recurrent state",
                        err);
    return s->data ? RP_OK : RP_ERR_NOMEM;
}

void rp_state_free_host(rp_state *s) {
    free(s->data);
    s->data = NULL;
}

rp_status rp_state_tensors_alloc(rp_state_tensors *t, const rp_config *cfg, rp_error *err) {
    memset(t, 0, sizeof *t);
    const int64_t L = cfg->n_layer, C = cfg->n_embd, H = cfg->n_head, N = cfg->head_size;
    t->shape_lc[0] = L;
    t->shape_lc[1] = C;
    t->shape_wkv[0] = L;
    t->shape_wkv[1] = H;
    t->shape_wkv[2] = N;
    t->shape_wkv[3] = N;
    t->att_x_prev = rp_calloc((size_t)(L * C), sizeof(float), "state.att_x_prev", err);
    if (t->att_x_prev)
        t->ffn_x_prev = rp_calloc((size_t)(L * C), sizeof(float), "state.ffn_x_prev", err);
    if (t->ffn_x_prev)
        t->wkv = rp_calloc((size_t)(L * H * N * N), sizeof(float), "state.wkv", err);
    if (!t->wkv) {
        rp_state_tensors_free(t);
        return RP_ERR_NOMEM;
    }
    return RP_OK;
}

void rp_state_tensors_free(rp_state_tensors *t) {
    free(t->att_x_prev);
    free(t->ffn_x_prev);
    free(t->wkv);
    t->att_x_prev = t->ffn_x_prev = t->wkv = NULL;
}

void rp_state_export(const rp_state *s, int slot, rp_state_tensors *t) {
    const size_t C = (size_t)t->shape_lc[1];
    const size_t HNN = (size_t)(t->shape_wkv[1] * t->shape_wkv[2] * t->shape_wkv[3]);
    for (int l = 0; l < (int)t->shape_lc[0]; l++) {
        memcpy(t->att_x_prev + l * C, rp_state_att_x_prev(s, slot, l), C * sizeof(float));
        memcpy(t->ffn_x_prev + l * C, rp_state_ffn_x_prev(s, slot, l), C * sizeof(float));
        memcpy(t->wkv + l * HNN, rp_state_wkv(s, slot, l), HNN * sizeof(float));
    }
}

void rp_state_import(rp_state *s, int slot, const rp_state_tensors *t) {
    const size_t C = (size_t)t->shape_lc[1];
    const size_t HNN = (size_t)(t->shape_wkv[1] * t->shape_wkv[2] * t->shape_wkv[3]);
    for (int l = 0; l < (int)t->shape_lc[0]; l++) {
        memcpy(rp_state_att_x_prev(s, slot, l), t->att_x_prev + l * C, C * sizeof(float));
        memcpy(rp_state_ffn_x_prev(s, slot, l), t->ffn_x_prev + l * C, C * sizeof(float));
        memcpy(rp_state_wkv(s, slot, l), t->wkv + l * HNN, HNN * sizeof(float));
    }
}

rp_status rp_state_tensors_add(const rp_state_tensors *t, rp_st_writer *w, rp_error *err) {
    rp_status st = rp_st_writer_add(w, RP_STATE_ATT_X_PREV, RP_DTYPE_F32, RP_DTYPE_F32, 2,
                                    t->shape_lc, t->att_x_prev, err);
    if (st == RP_OK)
        st = rp_st_writer_add(w, RP_STATE_FFN_X_PREV, RP_DTYPE_F32, RP_DTYPE_F32, 2, t->shape_lc,
                              t->ffn_x_prev, err);
    if (st == RP_OK)
        st = rp_st_writer_add(w, RP_STATE_WKV, RP_DTYPE_F32, RP_DTYPE_F32, 4, t->shape_wkv, t->wkv,
                              err);
    return st;
}
