/* LoRA adapters (lora.h): init, W' = W + s B A with backend ops, the
 * adapters' gradients from d(W'), their AdamW step, and the adapter file
 * (save, and merge into a model at load). */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "core/rng.h"
#include "core/safetensors.h"
#include "model/lora.h"

static const char *const target_names[RP_LORA_N_TARGETS] = {
    "att.receptance", "att.key", "att.value", "att.output", "ffn.key", "ffn.value"};

const char *rp_lora_target_name(int target) {
    return target >= 0 && target < RP_LORA_N_TARGETS ? target_names[target] : "?";
}

rp_status rp_lora_parse_targets(const char *list, unsigned *mask, rp_error *err) {
    *mask = 0;
    const char *p = list;
    while (*p) {
        const char *end = strchr(p, ',');
        size_t len = end ? (size_t)(end - p) : strlen(p);
        int found = -1;
        for (int t = 0; t < RP_LORA_N_TARGETS; t++)
            if (strlen(target_names[t]) == len && strncmp(p, target_names[t], len) == 0) found = t;
        if (found < 0)
            return rp_error_set(err, RP_ERR_ARG, "LoRA target '%.*s' is not one of att.receptance, "
                                "att.key, att.value, att.output, ffn.key, ffn.value", (int)len, p);
        *mask |= 1u << found;
        p += len;
        if (*p == ',') p++;
    }
    if (!*mask) return rp_error_set(err, RP_ERR_ARG, "the LoRA target list '%s' is empty", list);
    return RP_OK;
}

void rp_lora_format_targets(unsigned mask, char *out, size_t size) {
    size_t used = 0;
    out[0] = '\0';
    for (int t = 0; t < RP_LORA_N_TARGETS; t++)
        if (mask & (1u << t))
            used += (size_t)snprintf(out + used, used < size ? size - used : 0, "%s%s",
                                     used ? "," : "", target_names[t]);
}

/* The target's weight in a layer and its nn.Linear shape [N,K]. */
static float **target_field(rp_layer_weights *w, int t) {
    switch (t) {
    case RP_LORA_ATT_RECEPTANCE: return &w->receptance;
    case RP_LORA_ATT_KEY: return &w->key;
    case RP_LORA_ATT_VALUE: return &w->value;
    case RP_LORA_ATT_OUTPUT: return &w->output;
    case RP_LORA_FFN_KEY: return &w->ffn_key;
    default: return &w->ffn_value;
    }
}

static void target_shape(const rp_config *c, int t, int *N, int *K) {
    *N = t == RP_LORA_FFN_KEY ? c->dim_ffn : c->n_embd;
    *K = t == RP_LORA_FFN_VALUE ? c->dim_ffn : c->n_embd;
}

static size_t layer_floats(const rp_config *c, int rank, unsigned targets) {
    size_t n = 0;
    for (int t = 0; t < RP_LORA_N_TARGETS; t++)
        if (targets & (1u << t)) {
            int N, K;
            target_shape(c, t, &N, &K);
            n += (size_t)rank * ((size_t)N + K);
        }
    return n;
}

rp_status rp_lora_init(rp_lora *lo, rp_model *m, int rank, float alpha, unsigned targets,
                       uint64_t seed, rp_error *err) {
    memset(lo, 0, sizeof *lo);
    rp_backend *be = m->be;
    const rp_config *c = &m->cfg;
    if (rank < 1 || !(alpha > 0) || !targets || targets >= (1u << RP_LORA_N_TARGETS))
        return rp_error_set(err, RP_ERR_ARG, "LoRA rank %d and alpha %g must be positive, with "
                            "at least one target", rank, alpha);
    if (m->wtype != RP_WEIGHTS_F32)
        return rp_error_set(err, RP_ERR_ARG, "LoRA trains on f32 weights; this model holds "
                            "low-precision matrices: load the f32 file");
    lo->rank = rank;
    lo->alpha = alpha;
    lo->targets = targets;
    lo->model = m;
    const int n_layers = m->layer_end - m->layer_begin;
    int per_layer = 0, maxN = 1;
    for (int t = 0; t < RP_LORA_N_TARGETS; t++)
        if (targets & (1u << t)) per_layer++;
    lo->n = per_layer * n_layers;
    lo->floats_per_layer = layer_floats(c, rank, targets);
    lo->floats = lo->floats_per_layer * (size_t)n_layers;
    lo->ad = rp_calloc((size_t)lo->n + 1, sizeof *lo->ad, "LoRA adapters", err);
    if (!lo->ad) return RP_ERR_NOMEM;
    const size_t bytes = (lo->floats ? lo->floats : 1) * sizeof(float);
    lo->params = be->alloc(be, bytes);
    lo->grads = be->alloc(be, bytes);
    lo->adam_m = be->alloc(be, bytes);
    lo->adam_v = be->alloc(be, bytes);
    if (!lo->params || !lo->grads || !lo->adam_m || !lo->adam_v) goto nomem;
    float *host = calloc(lo->floats ? lo->floats : 1, sizeof(float));
    if (!host) goto nomem;
    size_t off = 0;
    int i = 0;
    for (int l = m->layer_begin; l < m->layer_end; l++)
        for (int t = 0; t < RP_LORA_N_TARGETS; t++) {
            if (!(targets & (1u << t))) continue;
            rp_lora_adapter *a = &lo->ad[i++];
            a->layer = l;
            a->target = t;
            target_shape(c, t, &a->N, &a->K);
            if (a->N > maxN) maxN = a->N;
            a->w = *target_field(&m->layers[l - m->layer_begin], t);
            a->A = lo->params + off;
            a->dA = lo->grads + off;
            /* Kaiming-uniform with a = sqrt(5) (nn.Linear's, peft's lora_A):
             * bound = 1 / sqrt(fan_in). */
            char name[96];
            snprintf(name, sizeof name, "blocks.%d.%s.lora_A", l, target_names[t]);
            const uint64_t key = rp_rng_key(seed, name);
            const double bound = 1.0 / sqrt((double)a->K);
            for (size_t k = 0; k < (size_t)rank * a->K; k++)
                host[off + k] = (float)((2.0 * rp_rng_uniform_f64(key, k) - 1.0) * bound);
            off += (size_t)rank * a->K;
            a->B = lo->params + off;
            a->dB = lo->grads + off;
            off += (size_t)a->N * rank;
            a->base = be->alloc(be, (size_t)a->N * a->K * sizeof(float));
            a->sB = be->alloc(be, (size_t)a->N * rank * sizeof(float));
            if (!a->base || !a->sB) {
                free(host);
                goto nomem;
            }
            be->copy(be, a->base, a->w, (size_t)a->N * a->K * sizeof(float));
        }
    be->copy_to_device(be, lo->params, host, lo->floats * sizeof(float));
    free(host);
    size_t max_nk = 1;
    for (int j = 0; j < lo->n; j++)
        if ((size_t)lo->ad[j].N * lo->ad[j].K > max_nk) max_nk = (size_t)lo->ad[j].N * lo->ad[j].K;
    lo->w_scratch = be->alloc(be, max_nk * sizeof(float));
    if (!lo->w_scratch) goto nomem;
    lo->zero = be->alloc(be, (size_t)maxN * rank * sizeof(float));
    lo->tmp = be->alloc(be, (size_t)maxN * rank * sizeof(float));
    lo->svec = be->alloc(be, (size_t)rank * sizeof(float));
    float *s = malloc((size_t)rank * sizeof(float));
    if (!lo->zero || !lo->tmp || !lo->svec || !s) {
        free(s);
        goto nomem;
    }
    for (int k = 0; k < rank; k++) s[k] = alpha / (float)rank;
    be->copy_to_device(be, lo->svec, s, (size_t)rank * sizeof(float));
    free(s);
    be->fill_zero(be, lo->zero, (size_t)maxN * rank * sizeof(float));
    be->fill_zero(be, lo->adam_m, bytes);
    be->fill_zero(be, lo->adam_v, bytes);
    rp_lora_apply(lo);
    return RP_OK;
nomem:
    rp_lora_free(lo);
    return rp_error_set(err, RP_ERR_NOMEM, "cannot allocate LoRA adapters of rank %d (%s backend)",
                        rank, be->name);
}

void rp_lora_free(rp_lora *lo) {
    if (!lo->model) return;
    rp_backend *be = lo->model->be;
    for (int i = 0; lo->ad && i < lo->n; i++) {
        if (lo->ad[i].base) be->free(be, lo->ad[i].base);
        if (lo->ad[i].sB) be->free(be, lo->ad[i].sB);
    }
    float *bufs[] = {lo->params, lo->grads, lo->adam_m, lo->adam_v, lo->zero, lo->tmp, lo->svec,
                     lo->w_scratch};
    for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++)
        if (bufs[i]) be->free(be, bufs[i]);
    free(lo->ad);
    memset(lo, 0, sizeof *lo);
}

void rp_lora_apply(rp_lora *lo) {
    rp_backend *be = lo->model->be;
    const int r = lo->rank;
    for (int i = 0; i < lo->n; i++) {
        rp_lora_adapter *a = &lo->ad[i];
        /* sB = 0 + (B - 0) s: the scale through lerp, an op every backend has. */
        be->lerp(be, a->sB, lo->zero, a->B, lo->svec, a->N, r);
        /* W' is formed aside and copied in: a copy is a write that keeps a
         * backend's low-precision copy of registered weights current (CUDA
         * bf16 math), a GEMM's output is not. */
        const size_t bytes = (size_t)a->N * a->K * sizeof(float);
        be->copy(be, lo->w_scratch, a->base, bytes);
        be->matmul_lora(be, lo->w_scratch, a->sB, a->A, a->N, a->K, r, 1.0f);  /* += sB A */
        be->copy(be, a->w, lo->w_scratch, bytes);
    }
}

void rp_lora_unapply(rp_lora *lo) {
    rp_backend *be = lo->model->be;
    for (int i = 0; i < lo->n; i++)
        be->copy(be, lo->ad[i].w, lo->ad[i].base,
                 (size_t)lo->ad[i].N * lo->ad[i].K * sizeof(float));
}

void rp_lora_rebase(rp_lora *lo) {
    rp_backend *be = lo->model->be;
    for (int i = 0; i < lo->n; i++)
        be->copy(be, lo->ad[i].base, lo->ad[i].w,
                 (size_t)lo->ad[i].N * lo->ad[i].K * sizeof(float));
}

void rp_lora_describe(const rp_lora *lo, char *out, size_t size) {
    char targets[128];
    rp_lora_format_targets(lo->targets, targets, sizeof targets);
    snprintf(out, size, "rank=%d alpha=%.9g targets=%s", lo->rank, lo->alpha, targets);
}

double rp_lora_grads(rp_lora *lo, const rp_model *grads) {
    rp_backend *be = lo->model->be;
    const int r = lo->rank;
    be->fill_zero(be, lo->grads, lo->floats * sizeof(float));
    for (int i = 0; i < lo->n; i++) {
        rp_lora_adapter *a = &lo->ad[i];
        const float *g =
            *target_field(&grads->layers[a->layer - grads->layer_begin], a->target);
        /* W' = W + sB A as y = x w with x = sB [N,r], w = A [r,K], dy = dW':
         * dA += (sB)^T dW' = s B^T dW'; tmp = dW' A^T, and dB = s tmp. */
        be->matmul_lora_backward_beta(be, lo->tmp, a->dA, g, a->sB, a->A, a->N, a->K, r, 0.0f);
        be->lerp(be, a->dB, lo->zero, lo->tmp, lo->svec, a->N, r);
    }
    return be->sum_squares(be, lo->grads, lo->floats);
}

void rp_lora_step(rp_lora *lo, float lr, float beta1, float beta2, float eps,
                  float weight_decay, float grad_scale, long step) {
    rp_backend *be = lo->model->be;
    be->adamw(be, lo->params, lo->grads, lo->adam_m, lo->adam_v, lo->floats, lr, beta1, beta2,
              eps, weight_decay, grad_scale, (float)(1.0 - pow(beta1, (double)(step + 1))),
              (float)(1.0 - pow(beta2, (double)(step + 1))));
    rp_lora_apply(lo);
}

void rp_lora_to_host(const rp_lora *lo, float *host) {
    rp_backend *be = lo->model->be;
    be->copy_to_host(be, host, lo->params, lo->floats * sizeof(float));
}

void rp_lora_from_host(rp_lora *lo, const float *host) {
    rp_backend *be = lo->model->be;
    be->copy_to_device(be, lo->params, host, lo->floats * sizeof(float));
    rp_lora_apply(lo);
}

rp_status rp_lora_save(const rp_config *cfg, int rank, float alpha, unsigned targets,
                       const float *host, const char *path, rp_error *err) {
    rp_st_writer w;
    rp_st_writer_init(&w);
    rp_status st = RP_OK;
    char names[2][128], value[128];
    const float *p = host;
    for (int l = 0; l < cfg->n_layer && st == RP_OK; l++)
        for (int t = 0; t < RP_LORA_N_TARGETS && st == RP_OK; t++) {
            if (!(targets & (1u << t))) continue;
            int N, K;
            target_shape(cfg, t, &N, &K);
            snprintf(names[0], sizeof names[0], "blocks.%d.%s.lora_A", l, target_names[t]);
            snprintf(names[1], sizeof names[1], "blocks.%d.%s.lora_B", l, target_names[t]);
            const int64_t sa[2] = {rank, K}, sb[2] = {N, rank};
            st = rp_st_writer_add(&w, names[0], RP_DTYPE_F32, RP_DTYPE_F32, 2, sa, p, err);
            p += (size_t)rank * K;
            if (st == RP_OK)
                st = rp_st_writer_add(&w, names[1], RP_DTYPE_F32, RP_DTYPE_F32, 2, sb, p, err);
            p += (size_t)N * rank;
        }
    snprintf(value, sizeof value, "%d", rank);
    if (st == RP_OK) st = rp_st_writer_add_meta(&w, "format", "rwkvpipe-lora", err);
    if (st == RP_OK) st = rp_st_writer_add_meta(&w, "lora_rank", value, err);
    snprintf(value, sizeof value, "%.9g", alpha);
    if (st == RP_OK) st = rp_st_writer_add_meta(&w, "lora_alpha", value, err);
    rp_lora_format_targets(targets, value, sizeof value);
    if (st == RP_OK) st = rp_st_writer_add_meta(&w, "lora_targets", value, err);
    if (st == RP_OK) st = rp_st_writer_write(&w, path, err);
    rp_st_writer_free(&w);
    return st;
}

/* ---- merge ---- */

/* Parses "blocks.L.<target>.lora_A|B"; 0 if the name is not one. */
static int parse_name(const char *name, int *layer, int *target, int *is_b) {
    int l, n = 0;
    if (sscanf(name, "blocks.%d.%n", &l, &n) != 1 || n == 0 || l < 0) return 0;
    const char *rest = name + n;
    for (int t = 0; t < RP_LORA_N_TARGETS; t++) {
        size_t len = strlen(target_names[t]);
        if (strncmp(rest, target_names[t], len) != 0) continue;
        if (strcmp(rest + len, ".lora_A") == 0 || strcmp(rest + len, ".lora_B") == 0) {
            *layer = l;
            *target = t;
            *is_b = rest[len + 6] == 'B';
            return 1;
        }
    }
    return 0;
}

rp_status rp_lora_merge_file(rp_model *m, const char *path, rp_lora_progress_fn progress,
                             void *ctx, rp_error *err) {
    const rp_config *c = &m->cfg;
    rp_backend *be = m->be;
    if (m->wtype != RP_WEIGHTS_F32)
        return rp_error_set(err, RP_ERR_ARG, "%s: a LoRA merges into f32 weights; this model holds "
                            "low-precision matrices (merge into the f32 file with `rwkvpipe "
                            "merge-lora`, then quantize)", path);
    rp_st_file f;
    rp_status st = rp_st_open(&f, path, err);
    if (st != RP_OK) return st;
    const char *fmt = rp_st_meta(&f, "format"), *rank_s = rp_st_meta(&f, "lora_rank"),
               *alpha_s = rp_st_meta(&f, "lora_alpha");
    char *end = NULL;
    const long rank = rank_s ? strtol(rank_s, &end, 10) : 0;
    const double alpha = alpha_s ? strtod(alpha_s, NULL) : 0;
    if (!fmt || strcmp(fmt, "rwkvpipe-lora") != 0 || rank < 1 || !(alpha > 0)) {
        rp_st_close(&f);
        return rp_error_set(err, RP_ERR_FORMAT, "%s is not a LoRA adapter file (its metadata needs "
                            "format=rwkvpipe-lora, lora_rank and lora_alpha > 0; `train --tune lora "
                            "--lora-out` writes one)", path);
    }
    const double s = alpha / (double)rank;
    /* Every tensor must be an adapter of this model, with its pair. */
    int total = 0;
    for (int i = 0; i < f.n_tensors && st == RP_OK; i++) {
        const rp_st_tensor *t = &f.tensors[i];
        int l, tg, is_b, N, K;
        if (!parse_name(t->name, &l, &tg, &is_b)) {
            st = rp_error_set(err, RP_ERR_FORMAT, "%s: tensor '%s' is not a LoRA adapter "
                              "(blocks.L.<target>.lora_A / lora_B)", path, t->name);
            break;
        }
        if (l >= c->n_layer) {
            st = rp_error_set(err, RP_ERR_ARG, "%s: '%s' is for layer %d but the model has %d "
                              "layers: the adapter was trained for another model", path, t->name,
                              l, c->n_layer);
            break;
        }
        target_shape(c, tg, &N, &K);
        const int64_t want0 = is_b ? N : rank, want1 = is_b ? rank : K;
        if (t->ndim != 2 || t->shape[0] != want0 || t->shape[1] != want1) {
            st = rp_error_set(err, RP_ERR_ARG, "%s: '%s' has shape [%lld, %lld] but the model's "
                              "blocks.%d.%s.weight is [%d, %d], which needs [%lld, %lld] at rank "
                              "%ld: the adapter was trained for another model", path, t->name,
                              (long long)t->shape[0], (long long)(t->ndim > 1 ? t->shape[1] : 0),
                              l, target_names[tg], N, K, (long long)want0, (long long)want1, rank);
            break;
        }
        char pair[128];
        snprintf(pair, sizeof pair, "blocks.%d.%s.lora_%c", l, target_names[tg], is_b ? 'A' : 'B');
        if (!rp_st_find(&f, pair)) {
            st = rp_error_set(err, RP_ERR_FORMAT, "%s: '%s' has no '%s'", path, t->name, pair);
            break;
        }
        if (!is_b && l >= m->layer_begin && l < m->layer_end) total++;
    }
    float *A = NULL, *B = NULL, *W = NULL;
    int done = 0;
    for (int i = 0; i < f.n_tensors && st == RP_OK; i++) {
        int l, tg, is_b, N, K;
        parse_name(f.tensors[i].name, &l, &tg, &is_b);
        if (is_b || l < m->layer_begin || l >= m->layer_end) continue;
        target_shape(c, tg, &N, &K);
        char bname[128];
        snprintf(bname, sizeof bname, "blocks.%d.%s.lora_B", l, target_names[tg]);
        A = realloc(A, (size_t)rank * K * sizeof(float));
        B = realloc(B, (size_t)N * rank * sizeof(float));
        W = realloc(W, (size_t)N * K * sizeof(float));
        if (!A || !B || !W) {
            st = rp_error_set(err, RP_ERR_NOMEM, "host buffers to merge %s", path);
            break;
        }
        if ((st = rp_st_read_f32(&f, &f.tensors[i], A, (int64_t)rank * K, err)) != RP_OK ||
            (st = rp_st_read_f32(&f, rp_st_find(&f, bname), B, (int64_t)N * rank, err)) != RP_OK)
            break;
        float *w = *target_field(&m->layers[l - m->layer_begin], tg);
        be->copy_to_host(be, W, w, (size_t)N * K * sizeof(float));
        for (int n = 0; n < N; n++)
            for (int k = 0; k < K; k++) {
                double sum = 0;
                for (int j = 0; j < rank; j++) sum += (double)B[(size_t)n * rank + j] * A[(size_t)j * K + k];
                W[(size_t)n * K + k] = (float)(W[(size_t)n * K + k] + s * sum);
            }
        be->copy_to_device(be, w, W, (size_t)N * K * sizeof(float));
        done++;
        if (progress) {
            char wname[96];
            snprintf(wname, sizeof wname, "blocks.%d.%s.weight", l, target_names[tg]);
            progress(ctx, wname, done, total);
        }
    }
    free(A);
    free(B);
    free(W);
    rp_st_close(&f);
    return st;
}
