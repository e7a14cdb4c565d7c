/* Sharded Adam moments and the AdamW step on a shard (zero.h). */
#include "optim/zero.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

void rp_zero_range(size_t n, int dp, int r, size_t *begin, size_t *count) {
    /* n (< 2^40 floats) times r (< 2^20 replicas) stays below 2^64. */
    size_t b = n * (size_t)r / (size_t)dp, e = n * (size_t)(r + 1) / (size_t)dp;
    *begin = b;
    *count = e - b;
}

int rp_zero_n_buffers(const rp_model *m) {
    return m->layer_end - m->layer_begin + (m->embed_flat ? 1 : 0) + (m->head_flat ? 1 : 0);
}

float *rp_zero_buffer(const rp_model *m, int i, size_t *n) {
    const int nl = m->layer_end - m->layer_begin;
    if (i < nl) {
        *n = m->layer_floats;
        return m->layer_flat[i];
    }
    i -= nl;
    if (m->embed_flat && i-- == 0) {
        *n = m->embed_floats;
        return m->embed_flat;
    }
    if (m->head_flat && i == 0) {
        *n = m->head_floats;
        return m->head_flat;
    }
    *n = 0;
    return NULL;
}

void rp_zero_shard_free(rp_zero_shard *z) {
    for (int i = 0; i < z->n_buf; i++) {
        if (z->m && z->m[i]) z->be->free(z->be, z->m[i]);
        if (z->v && z->v[i]) z->be->free(z->be, z->v[i]);
    }
    free(z->full);
    free(z->begin);
    free(z->count);
    free(z->m);
    free(z->v);
    memset(z, 0, sizeof *z);
}

rp_status rp_zero_shard_init(rp_zero_shard *z, const rp_model *like, int dp, int rank,
                             rp_error *err) {
    memset(z, 0, sizeof *z);
    if (dp < 1 || rank < 0 || rank >= dp)
        return rp_error_set(err, RP_ERR_INTERNAL, "ZeRO shard %d of %d", rank, dp);
    z->dp = dp;
    z->rank = rank;
    z->be = like->be;
    z->n_buf = rp_zero_n_buffers(like);
    const size_t nb = (size_t)(z->n_buf ? z->n_buf : 1);
    z->full = calloc(nb, sizeof *z->full);
    z->begin = calloc(nb, sizeof *z->begin);
    z->count = calloc(nb, sizeof *z->count);
    z->m = calloc(nb, sizeof *z->m);
    z->v = calloc(nb, sizeof *z->v);
    if (!z->full || !z->begin || !z->count || !z->m || !z->v) {
        rp_zero_shard_free(z);
        return rp_error_set(err, RP_ERR_NOMEM, "ZeRO shard tables");
    }
    for (int i = 0; i < z->n_buf; i++) {
        rp_zero_buffer(like, i, &z->full[i]);
        rp_zero_range(z->full[i], dp, rank, &z->begin[i], &z->count[i]);
        const size_t bytes = (z->count[i] ? z->count[i] : 1) * sizeof(float);
        z->m[i] = z->be->alloc(z->be, bytes);
        z->v[i] = z->be->alloc(z->be, bytes);
        if (!z->m[i] || !z->v[i]) {
            rp_zero_shard_free(z);
            return rp_error_set(err, RP_ERR_NOMEM, "cannot allocate the Adam moments' shard "
                                "%d of %d (%zu floats)", rank + 1, dp, z->count[i]);
        }
        z->be->fill_zero(z->be, z->m[i], bytes);
        z->be->fill_zero(z->be, z->v[i], bytes);
        z->shard_floats += z->count[i];
    }
    return RP_OK;
}

/* Backend memory to backend memory, with the backend's own copy (a device
 * copy on a GPU: the moments never pass through the host). */
static void copy_floats(rp_backend *be, float *dst, const float *src, size_t n) {
    if (n) be->copy(be, dst, src, n * sizeof(float));
}

void rp_zero_take(rp_zero_shard *z, const rp_model *adam_m, const rp_model *adam_v) {
    size_t n;
    for (int i = 0; i < z->n_buf; i++) {
        copy_floats(z->be, z->m[i], rp_zero_buffer(adam_m, i, &n) + z->begin[i], z->count[i]);
        copy_floats(z->be, z->v[i], rp_zero_buffer(adam_v, i, &n) + z->begin[i], z->count[i]);
    }
}

void rp_zero_put(const rp_zero_shard *z, rp_model *adam_m, rp_model *adam_v) {
    size_t n;
    for (int i = 0; i < z->n_buf; i++) {
        copy_floats(z->be, rp_zero_buffer(adam_m, i, &n) + z->begin[i], z->m[i], z->count[i]);
        copy_floats(z->be, rp_zero_buffer(adam_v, i, &n) + z->begin[i], z->v[i], z->count[i]);
    }
}

double rp_zero_partial_sum_squares(const rp_model *grads, int dp, int d) {
    double total = 0.0;
    size_t n, b, c;
    const int nb = rp_zero_n_buffers(grads);
    for (int i = 0; i < nb; i++) {
        const float *p = rp_zero_buffer(grads, i, &n);
        rp_zero_range(n, dp, d, &b, &c);
        if (c) total += grads->be->sum_squares(grads->be, p + b, c);
    }
    return total;
}

void rp_zero_optim_step(rp_zero_shard *z, rp_model *weights, const rp_model *grads,
                        const rp_optim_config *c, long step, float grad_scale) {
    rp_backend *be = weights->be;
    const float lr = (float)rp_lr_at(c, step);
    const float bc1 = (float)(1.0 - pow(c->beta1, (double)(step + 1)));
    const float bc2 = (float)(1.0 - pow(c->beta2, (double)(step + 1)));
    rp_tensor_info table[RP_LAYER_N_TENSORS], gtable[RP_GLOBAL_N_TENSORS];
    rp_layer_layout(&weights->cfg, table);
    rp_global_layout(&weights->cfg, gtable, NULL, NULL);
    const int nl = weights->layer_end - weights->layer_begin;
    size_t n;
    for (int i = 0; i < z->n_buf; i++) {
        float *w = rp_zero_buffer(weights, i, &n);
        const float *g = rp_zero_buffer(grads, i, &n);
        const int part = i < nl ? RP_PART_LAYER
                         : (weights->embed_flat && i == nl) ? RP_PART_EMBED : RP_PART_HEAD;
        const rp_tensor_info *t = i < nl ? table : gtable;
        const int nt = i < nl ? RP_LAYER_N_TENSORS : RP_GLOBAL_N_TENSORS;
        rp_optim_step_range(be, w, g, z->m[i], z->v[i], z->begin[i], z->begin[i] + z->count[i],
                            t, nt, part, c, lr, grad_scale, bc1, bc2);
    }
}
