/* State geometry and host allocation (state.h). */
#include "model/state.h"

#include <stdlib.h>

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
