/* Model allocation, official init, loading (official and HF/fla names) and
 * saving of the weights a process owns (model.h). Loading converts each tensor
 * straight from the mmapped file into its place in the flat buffer: one copy. */
#include "model/model.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#include "core/dtype.h"
#include "core/version.h"
#include "model/init.h"

/* Upper limits on what a weights file may claim (docs/formats.md): checked
 * before any conversion to int and before anything is allocated. They match
 * rp_config_validate. */
#define RP_MAX_VOCAB (1 << 24)
#define RP_MAX_EMBD 65536
#define RP_MAX_LAYERS 4096
#define RP_MAX_FFN (1 << 20)
/* Elements per int8 block (cpu/cpu_quant.h's RP_Q8_BLOCK: the file format). */
#define RP_Q8_BLOCK_ELEMS 32

/* What every weights format shares: the checked config and layer range, the
 * model's fields, and its per-layer pointer arrays (NULL weights yet).
 * RP_ERR_NOMEM leaves m for rp_model_free. */
static rp_status model_begin(rp_model *m, const rp_config *cfg, int layer_begin, int layer_end,
                             int has_embed, int has_head, rp_backend *be, rp_error *err) {
    memset(m, 0, sizeof *m);
    rp_status st = rp_config_validate(cfg, err);
    if (st != RP_OK) return st;
    if (layer_begin < 0 || layer_end > cfg->n_layer || layer_begin > layer_end)
        return rp_error_set(err, RP_ERR_ARG, "layer range [%d, %d) is not inside [0, %d)",
                            layer_begin, layer_end, cfg->n_layer);
    m->cfg = *cfg;
    m->layer_begin = layer_begin;
    m->layer_end = layer_end;
    m->has_embed = has_embed;
    m->has_head = has_head;
    m->be = be;
    int n = layer_end - layer_begin;
    m->layer_flat = rp_calloc((size_t)n + 1, sizeof(float *), "layer pointers", err);
    m->layers = rp_calloc((size_t)n + 1, sizeof(rp_layer_weights), "layer weights", err);
    return m->layer_flat && m->layers ? RP_OK : RP_ERR_NOMEM;
}

rp_status rp_model_alloc(rp_model *m, const rp_config *cfg, int layer_begin, int layer_end,
                         int has_embed, int has_head, rp_backend *be, rp_error *err) {
    rp_status st = model_begin(m, cfg, layer_begin, layer_end, has_embed, has_head, be, err);
    if (st == RP_ERR_NOMEM) goto nomem;
    if (st != RP_OK) return st;
    rp_tensor_info table[RP_LAYER_N_TENSORS];
    m->layer_floats = rp_layer_layout(cfg, table);
    rp_tensor_info gtable[RP_GLOBAL_N_TENSORS];
    rp_global_layout(cfg, gtable, &m->embed_floats, &m->head_floats);

    int n = layer_end - layer_begin;
    for (int i = 0; i < n; i++) {
        m->layer_flat[i] = be->alloc(be, m->layer_floats * sizeof(float));
        if (!m->layer_flat[i]) goto nomem;
        rp_layer_bind(&m->layers[i], m->layer_flat[i], cfg);
    }
    if (has_embed && !(m->embed_flat = be->alloc(be, m->embed_floats * sizeof(float))))
        goto nomem;
    if (has_head && !(m->head_flat = be->alloc(be, m->head_floats * sizeof(float)))) goto nomem;
    rp_global_bind(&m->global, m->embed_flat, m->head_flat, cfg);
    return RP_OK;
nomem:
    rp_model_free(m);
    return rp_error_set(err, RP_ERR_NOMEM,
                        "cannot allocate weights for layers [%d, %d) of a C=%d model (%s backend)",
                        layer_begin, layer_end, cfg->n_embd, be->name);
}

/* Whether a bf16/int8 model keeps the tensor in the backend's storage (a
 * quantized matrix, or a LoRA factor in bf16) rather than in f32. */
static int backend_matrix(const char *suffix) {
    return rp_tensor_quantizable(suffix) || rp_tensor_lora_lowp(suffix);
}

/* How a bf16/int8 model stores a LoRA factor (transposed, [N,K], K its
 * input width): in an int8 model as int8 blocks along K when K is a whole
 * number of them (every built-in shape: ranks 32-128 and C), else bf16.
 * The file keeps them in bf16 either way (`quantize`), so files of any
 * version load the same; docs/perf/cpu.md, "Which tensors are quantized". */
static rp_weights_type lora_storage(rp_weights_type wtype, int64_t K) {
    const int int8 = wtype == RP_WEIGHTS_INT8 || wtype == RP_WEIGHTS_INT8ROW;
    return int8 && K % RP_Q8_BLOCK_ELEMS == 0 ? wtype : RP_WEIGHTS_BF16;
}

/* Forgets the backend storage of every quantized matrix of the model. */
static void destroy_qweights(rp_model *m) {
    if (!m->qkeys) return;
    rp_tensor_info table[RP_LAYER_N_TENSORS], gtable[RP_GLOBAL_N_TENSORS];
    rp_layer_layout(&m->cfg, table);
    rp_global_layout(&m->cfg, gtable, NULL, NULL);
    int n = m->layer_end - m->layer_begin;
    for (int i = 0; m->layers && i < n; i++)
        for (int t = 0; t < RP_LAYER_N_TENSORS; t++) {
            float *key = *rp_tensor_field(&m->layers[i], &table[t]);
            if (key && backend_matrix(table[t].suffix)) m->be->qweight_destroy(m->be, key);
        }
    for (int t = 0; t < RP_GLOBAL_N_TENSORS; t++) {
        float *key = *rp_tensor_field(&m->global, &gtable[t]);
        if (key && backend_matrix(gtable[t].suffix)) m->be->qweight_destroy(m->be, key);
    }
    munmap(m->qkeys, m->qkeys_bytes);
}

void rp_model_free(rp_model *m) {
    if (!m->be) return;
    destroy_qweights(m);
    int n = m->layer_end - m->layer_begin;
    if (m->layer_flat)
        for (int i = 0; i < n; i++) m->be->free(m->be, m->layer_flat[i]);
    m->be->free(m->be, m->embed_flat);
    m->be->free(m->be, m->head_flat);
    free(m->layer_flat);
    free(m->layers);
    memset(m, 0, sizeof *m);
}

/* Points the fields of one part at a packed f32 buffer (flat) or, for the
 * quantizable matrices, at keys taken from *keys, creating their backend
 * storage. Returns the f32 floats the part needs when flat is NULL. */
static size_t bind_packed(rp_model *m, void *weights, const rp_tensor_info *table, int n_tensors,
                          rp_param_part part, float *flat, char **keys, rp_status *st,
                          rp_error *err) {
    size_t off = 0;
    for (int i = 0; i < n_tensors; i++) {
        const rp_tensor_info *info = &table[i];
        if (info->part != part) continue;
        if (!backend_matrix(info->suffix)) {
            if (flat) *rp_tensor_field(weights, info) = flat + off;
            off += (size_t)info->numel;
            continue;
        }
        if (!flat || *st != RP_OK) continue;
        float *key = (float *)*keys;
        *keys += (size_t)info->numel * sizeof(float);
        /* A LoRA factor W [K,N] is stored transposed, [N,K] (lora_storage). */
        const int lora = rp_tensor_lora_lowp(info->suffix);
        *st = m->be->qweight_create(m->be, key, lora ? lora_storage(m->wtype, info->shape[0]) : m->wtype,
                                    (int)info->shape[lora ? 1 : 0], (int)info->shape[lora ? 0 : 1],
                                    err);
        if (*st == RP_OK) *rp_tensor_field(weights, info) = key;
    }
    return off;
}

rp_status rp_model_alloc_weights(rp_model *m, const rp_config *cfg, int layer_begin,
                                 int layer_end, int has_embed, int has_head,
                                 rp_weights_type wtype, rp_backend *be, rp_error *err) {
    if (wtype == RP_WEIGHTS_F32)
        return rp_model_alloc(m, cfg, layer_begin, layer_end, has_embed, has_head, be, err);
    memset(m, 0, sizeof *m);
    if (wtype != RP_WEIGHTS_BF16 && wtype != RP_WEIGHTS_INT8 && wtype != RP_WEIGHTS_INT8ROW)
        return rp_error_set(err, RP_ERR_ARG, "weights format %d is not f32, bf16, int8 or int8row",
                            (int)wtype);
    if (!be->qweight_create || !be->is_host_memory)
        return rp_error_set(err, RP_ERR_ARG,
                            "the %s backend runs f32 weights only: bf16/int8 weights run on "
                            "the CPU backend (--device cpu), or load with --weights-dtype f32",
                            be->name);
    rp_status st = model_begin(m, cfg, layer_begin, layer_end, has_embed, has_head, be, err);
    if (st == RP_ERR_NOMEM) goto nomem;
    if (st != RP_OK) return st;
    int n = layer_end - layer_begin;
    m->wtype = wtype;
    rp_tensor_info table[RP_LAYER_N_TENSORS], gtable[RP_GLOBAL_N_TENSORS];
    size_t full_layer = rp_layer_layout(cfg, table);
    rp_global_layout(cfg, gtable, &m->embed_floats, &m->head_floats);
    size_t full_head = m->head_floats;
    m->layer_floats = bind_packed(m, NULL, table, RP_LAYER_N_TENSORS, RP_PART_LAYER, NULL, NULL,
                                  &st, err);
    m->head_floats = bind_packed(m, NULL, gtable, RP_GLOBAL_N_TENSORS, RP_PART_HEAD, NULL, NULL,
                                 &st, err);
    /* Keys: one float address per element of the f32 matrix, never readable,
     * so an op other than the quantized matmul faults instead of reading
     * garbage. Address space only (PROT_NONE, no reserve). */
    m->qkeys_bytes = ((size_t)n * (full_layer - m->layer_floats) +
                      (has_head ? full_head - m->head_floats : 0)) * sizeof(float) + 64;
    m->qkeys = mmap(NULL, m->qkeys_bytes, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                    -1, 0);
    if (m->qkeys == MAP_FAILED) {
        m->qkeys = NULL;
        rp_model_free(m);
        return rp_error_set(err, RP_ERR_NOMEM, "cannot reserve %zu bytes of address space for "
                            "the weight keys", m->qkeys_bytes);
    }
    char *keys = m->qkeys;
    for (int i = 0; i < n && st == RP_OK; i++) {
        if (!(m->layer_flat[i] = be->alloc(be, m->layer_floats * sizeof(float)))) goto nomem;
        bind_packed(m, &m->layers[i], table, RP_LAYER_N_TENSORS, RP_PART_LAYER, m->layer_flat[i],
                    &keys, &st, err);
    }
    if (st == RP_OK && has_embed) {
        if (!(m->embed_flat = be->alloc(be, m->embed_floats * sizeof(float)))) goto nomem;
        rp_global_bind(&m->global, m->embed_flat, NULL, cfg);
    }
    if (st == RP_OK && has_head) {
        if (!(m->head_flat = be->alloc(be, m->head_floats * sizeof(float)))) goto nomem;
        bind_packed(m, &m->global, gtable, RP_GLOBAL_N_TENSORS, RP_PART_HEAD, m->head_flat,
                    &keys, &st, err);
    }
    if (st != RP_OK) rp_model_free(m);
    return st;
nomem:
    rp_model_free(m);
    return rp_error_set(err, RP_ERR_NOMEM,
                        "cannot allocate the f32 weights for layers [%d, %d) of a C=%d model",
                        layer_begin, layer_end, cfg->n_embd);
}

void rp_model_register_weights(rp_model *m) {
    rp_backend *be = m->be;
    if (!be || !be->register_weights || m->qkeys) return;
    for (int i = 0; i < m->layer_end - m->layer_begin; i++)
        be->register_weights(be, m->layer_flat[i], m->layer_floats);
    if (m->head_flat) be->register_weights(be, m->head_flat, m->head_floats);
}

rp_status rp_model_init_official(rp_model *m, uint64_t seed, rp_error *err) {
    rp_backend *be = m->be;
    if (m->qkeys)
        return rp_error_set(err, RP_ERR_ARG, "the official init makes f32 weights only");
    size_t staging_floats = m->layer_floats;
    if (m->embed_floats > staging_floats) staging_floats = m->embed_floats;
    if (m->head_floats > staging_floats) staging_floats = m->head_floats;
    float *host = rp_calloc(staging_floats, sizeof(float), "init staging buffer", err);
    if (!host) return RP_ERR_NOMEM;
    rp_status st = RP_OK;
    for (int l = m->layer_begin; l < m->layer_end && st == RP_OK; l++) {
        memset(host, 0, m->layer_floats * sizeof(float));
        st = rp_init_layer(host, &m->cfg, l, seed, err);
        if (st == RP_OK)
            be->copy_to_device(be, m->layer_flat[l - m->layer_begin], host,
                               m->layer_floats * sizeof(float));
    }
    if (st == RP_OK && m->has_embed) {
        memset(host, 0, m->embed_floats * sizeof(float));
        st = rp_init_global(host, NULL, &m->cfg, seed, err);
        if (st == RP_OK)
            be->copy_to_device(be, m->embed_flat, host, m->embed_floats * sizeof(float));
    }
    if (st == RP_OK && m->has_head) {
        memset(host, 0, m->head_floats * sizeof(float));
        st = rp_init_global(NULL, host, &m->cfg, seed, err);
        if (st == RP_OK)
            be->copy_to_device(be, m->head_flat, host, m->head_floats * sizeof(float));
    }
    free(host);
    return st;
}

/* ---- naming ---- */

/* blocks.0.att.v0/v1/v2: the official trainer creates them but layer 0 never
 * reads them (it sets v_first = v), so files may lack them. */
static int is_unused_layer0_tensor(const char *suffix, int layer) {
    return layer == 0 && (strcmp(suffix, "att.v0") == 0 || strcmp(suffix, "att.v1") == 0 ||
                          strcmp(suffix, "att.v2") == 0);
}

/* How a file tensor maps onto an official one. */
typedef rp_hf_kind map_kind;
#define MAP_SAME RP_HF_SAME
#define MAP_RESHAPE RP_HF_RESHAPE
#define MAP_TRANSPOSE RP_HF_TRANSPOSE

/* The one official <-> HF/fla name table (docs/rwkv7.md, HF names). tools/rwkvpipe-convert.py
 * holds the same rows (Python cannot share C); tests/test_convert.sh checks
 * them equal through `rwkvpipe info --hf-names`. */
static const rp_hf_name hf_names[] = {
    {"emb.weight", "model.embeddings.weight", RP_HF_SAME, 0},
    {"blocks.0.ln0.weight", "model.layers.0.pre_norm.weight", RP_HF_SAME, 0},
    {"blocks.0.ln0.bias", "model.layers.0.pre_norm.bias", RP_HF_SAME, 0},
    {"ln_out.weight", "model.norm.weight", RP_HF_SAME, 0},
    {"ln_out.bias", "model.norm.bias", RP_HF_SAME, 0},
    {"head.weight", "lm_head.weight", RP_HF_SAME, 0},
    {"ln1.weight", "attn_norm.weight", RP_HF_SAME, 1},
    {"ln1.bias", "attn_norm.bias", RP_HF_SAME, 1},
    {"ln2.weight", "ffn_norm.weight", RP_HF_SAME, 1},
    {"ln2.bias", "ffn_norm.bias", RP_HF_SAME, 1},
    {"att.x_r", "attn.x_r", RP_HF_RESHAPE, 1},
    {"att.x_w", "attn.x_w", RP_HF_RESHAPE, 1},
    {"att.x_k", "attn.x_k", RP_HF_RESHAPE, 1},
    {"att.x_v", "attn.x_v", RP_HF_RESHAPE, 1},
    {"att.x_a", "attn.x_a", RP_HF_RESHAPE, 1},
    {"att.x_g", "attn.x_g", RP_HF_RESHAPE, 1},
    {"att.w0", "attn.w_lora.lora.2.bias", RP_HF_RESHAPE, 1},
    {"att.w1", "attn.w_lora.lora.0.weight", RP_HF_TRANSPOSE, 1},
    {"att.w2", "attn.w_lora.lora.2.weight", RP_HF_TRANSPOSE, 1},
    {"att.a0", "attn.a_lora.lora.2.bias", RP_HF_RESHAPE, 1},
    {"att.a1", "attn.a_lora.lora.0.weight", RP_HF_TRANSPOSE, 1},
    {"att.a2", "attn.a_lora.lora.2.weight", RP_HF_TRANSPOSE, 1},
    {"att.v0", "attn.v_lora.lora.2.bias", RP_HF_RESHAPE, 1},
    {"att.v1", "attn.v_lora.lora.0.weight", RP_HF_TRANSPOSE, 1},
    {"att.v2", "attn.v_lora.lora.2.weight", RP_HF_TRANSPOSE, 1},
    {"att.g1", "attn.g_lora.lora.0.weight", RP_HF_TRANSPOSE, 1},
    {"att.g2", "attn.g_lora.lora.2.weight", RP_HF_TRANSPOSE, 1},
    {"att.k_k", "attn.k_k", RP_HF_RESHAPE, 1},
    {"att.k_a", "attn.k_a", RP_HF_RESHAPE, 1},
    {"att.r_k", "attn.r_k", RP_HF_SAME, 1},
    {"att.receptance.weight", "attn.r_proj.weight", RP_HF_SAME, 1},
    {"att.key.weight", "attn.k_proj.weight", RP_HF_SAME, 1},
    {"att.value.weight", "attn.v_proj.weight", RP_HF_SAME, 1},
    {"att.output.weight", "attn.o_proj.weight", RP_HF_SAME, 1},
    {"att.ln_x.weight", "attn.g_norm.weight", RP_HF_SAME, 1},
    {"att.ln_x.bias", "attn.g_norm.bias", RP_HF_SAME, 1},
    {"ffn.x_k", "ffn.x_k", RP_HF_RESHAPE, 1},
    {"ffn.key.weight", "ffn.key.weight", RP_HF_SAME, 1},
    {"ffn.value.weight", "ffn.value.weight", RP_HF_SAME, 1},
};

const rp_hf_name *rp_hf_names(int *n) {
    *n = (int)(sizeof hf_names / sizeof hf_names[0]);
    return hf_names;
}

const char *rp_hf_kind_name(rp_hf_kind kind) {
    switch (kind) {
    case RP_HF_SAME: return "same";
    case RP_HF_RESHAPE: return "reshape";
    case RP_HF_TRANSPOSE: return "transpose";
    }
    return "?";
}

/* HF/fla name of an official tensor (official: a layer suffix when layer >= 0,
 * else a whole name). Returns the mapping kind, or -1 when the tensor has no
 * HF counterpart (layer 0's unused v-LoRA). */
static int hf_name_of(char *out, size_t size, const char *official, int layer) {
    if (layer >= 0 && is_unused_layer0_tensor(official, layer)) return -1;
    for (size_t i = 0; i < sizeof hf_names / sizeof hf_names[0]; i++) {
        const rp_hf_name *r = &hf_names[i];
        if (r->per_layer != (layer >= 0) || strcmp(r->official, official) != 0) continue;
        if (layer >= 0) snprintf(out, size, "model.layers.%d.%s", layer, r->hf);
        else snprintf(out, size, "%s", r->hf);
        return (int)r->kind;
    }
    return -1;
}

/* Finds the file tensor for an official tensor; *kind says how to map it.
 * Returns NULL when absent. */
static const rp_st_tensor *find_tensor(const rp_st_file *f, rp_naming naming,
                                       const rp_tensor_info *info, int layer, map_kind *kind,
                                       char *name, size_t name_size) {
    rp_tensor_name(name, name_size, info, layer);
    *kind = MAP_SAME;
    if (naming == RP_NAMING_OFFICIAL) return rp_st_find(f, name);
    int k = hf_name_of(name, name_size, info->suffix, info->part == RP_PART_LAYER ? layer : -1);
    if (k < 0) return NULL;
    *kind = (map_kind)k;
    return rp_st_find(f, name);
}

/* [C] vs [1,1,C]: equal once size-1 dimensions are dropped. */
static int same_dims_ignoring_ones(const int64_t *a, int na, const int64_t *b, int nb) {
    int i = 0, j = 0;
    for (;;) {
        while (i < na && a[i] == 1) i++;
        while (j < nb && b[j] == 1) j++;
        if (i == na || j == nb) return i == na && j == nb;
        if (a[i++] != b[j++]) return 0;
    }
}

/* Whether a file's int8 tensors are int8row's (one F32 scale per row):
 * its metadata names the scheme (`quantize`); files without it, and every
 * int8 file from before int8row, are blocks of 32 with F16 scales. */
static int int8row_file(const rp_st_file *f) {
    const char *q = rp_st_meta(f, "quantization");
    return q && strncmp(q, RP_INT8ROW_SCHEME_PREFIX, strlen(RP_INT8ROW_SCHEME_PREFIX)) == 0;
}

/* An int8 tensor (docs/formats.md, quantized files): one of the quantizable
 * matrices, [N,K] with K a multiple of the block, and its scales
 * "<name>.scales" beside it: F16 [N, K/32] (int8), or F32 [N, 1] in an
 * int8row file. */
static rp_status check_int8(const rp_st_file *f, const char *file_name, const rp_st_tensor *t,
                            const rp_tensor_info *info, map_kind kind, rp_error *err) {
    if (!rp_tensor_quantizable(info->suffix) || kind != MAP_SAME || t->ndim != 2)
        return rp_error_set(err, RP_ERR_FORMAT,
                            "%s: tensor '%s' has dtype I8, but only the nn.Linear matrices "
                            "(att receptance/key/value/output, ffn key/value, head) may be int8 "
                            "(docs/formats.md)", f->path, file_name);
    const int64_t K = t->shape[1];
    char name[300];
    snprintf(name, sizeof name, "%s.scales", file_name);
    const rp_st_tensor *sc = rp_st_find(f, name);
    if (K % RP_Q8_BLOCK_ELEMS != 0)
        return rp_error_set(err, RP_ERR_SHAPE,
                            "%s: int8 tensor '%s' has %lld columns, not a multiple of the "
                            "%d-element block", f->path, file_name, (long long)K,
                            RP_Q8_BLOCK_ELEMS);
    const int row = int8row_file(f);
    const rp_dtype sdt = row ? RP_DTYPE_F32 : RP_DTYPE_F16;
    const int64_t scols = row ? 1 : K / RP_Q8_BLOCK_ELEMS;
    if (!sc)
        return rp_error_set(err, RP_ERR_FORMAT,
                            "%s: int8 tensor '%s' has no scales tensor '%s' (%s [%lld, %lld]): "
                            "the file is truncated or not written by `rwkvpipe quantize`",
                            f->path, file_name, name, rp_dtype_name(sdt), (long long)t->shape[0],
                            (long long)scols);
    if (sc->dtype != sdt || sc->ndim != 2 || sc->shape[0] != t->shape[0] ||
        sc->shape[1] != scols)
        return rp_error_set(err, RP_ERR_SHAPE,
                            "%s: scales tensor '%s' is %s with %d dimensions [%lld, %lld]; "
                            "expected %s [%lld, %lld] for the %s tensor [%lld, %lld] "
                            "(metadata quantization '%s')",
                            f->path, name, rp_dtype_name(sc->dtype), sc->ndim,
                            (long long)sc->shape[0], (long long)(sc->ndim > 1 ? sc->shape[1] : 0),
                            rp_dtype_name(sdt), (long long)t->shape[0], (long long)scols,
                            row ? "int8row" : "int8", (long long)t->shape[0], (long long)K,
                            rp_st_meta(f, "quantization") ? rp_st_meta(f, "quantization") : "none");
    return RP_OK;
}

static rp_status check_shape(const rp_st_file *f, const char *file_name,
                             const rp_st_tensor *t, const rp_tensor_info *info, map_kind kind,
                             rp_error *err) {
    char want[96], got[96];
    int n = 0;
    for (int d = 0; d < info->ndim; d++)
        n += snprintf(want + n, sizeof want - n, "%s%lld", d ? "," : "", (long long)info->shape[d]);
    n = 0;
    got[0] = '\0';
    for (int d = 0; d < t->ndim; d++)
        n += snprintf(got + n, sizeof got - n, "%s%lld", d ? "," : "", (long long)t->shape[d]);
    int ok;
    if (kind == MAP_TRANSPOSE)
        ok = t->ndim == 2 && t->shape[0] == info->shape[1] && t->shape[1] == info->shape[0];
    else if (kind == MAP_RESHAPE)
        ok = same_dims_ignoring_ones(t->shape, t->ndim, info->shape, info->ndim);
    else {
        ok = t->ndim == info->ndim;
        for (int d = 0; ok && d < t->ndim; d++) ok = t->shape[d] == info->shape[d];
    }
    if (!ok)
        return rp_error_set(err, RP_ERR_SHAPE, "%s: tensor '%s' has shape [%s], expected [%s]%s",
                            f->path, file_name, got, want,
                            kind == MAP_TRANSPOSE ? " transposed (HF LoRA layout)" : "");
    if (t->dtype == RP_DTYPE_I8) return check_int8(f, file_name, t, info, kind, err);
    if (!rp_dtype_is_float(t->dtype))
        return rp_error_set(err, RP_ERR_FORMAT,
                            "%s: tensor '%s' has dtype %s, expected F32, F16 or BF16", f->path,
                            file_name, rp_dtype_name(t->dtype));
    return RP_OK;
}

/* ---- config from shapes ---- */

static rp_status need_2d(const rp_st_file *f, const char *name, const rp_st_tensor *t,
                         rp_error *err) {
    if (!t) return rp_error_set(err, RP_ERR_SHAPE, "%s: missing tensor '%s'", f->path, name);
    if (t->ndim != 2)
        return rp_error_set(err, RP_ERR_SHAPE, "%s: tensor '%s' has %d dimensions, expected 2",
                            f->path, name, t->ndim);
    return RP_OK;
}

/* A dimension read from a file, range-checked before it becomes an int: a
 * shape of 2^32 + 256 must fail, not read as 256. */
static rp_status dim_to_int(const rp_st_file *f, const char *name, const rp_st_tensor *t, int d,
                            int64_t max, const char *what, int *out, rp_error *err) {
    int64_t v = t->shape[d];
    if (v < 1 || v > max)
        return rp_error_set(err, RP_ERR_SHAPE,
                            "%s: tensor '%s' has dimension %d = %lld, so %s would be %lld: out of "
                            "range [1, %lld] (see docs/formats.md, model limits)",
                            f->path, name, d, (long long)v, what, (long long)v, (long long)max);
    *out = (int)v;
    return RP_OK;
}

/* Every tensor of the whole model is present with the shape cfg implies and
 * a float dtype, checked from the header alone: loaders allocate only after
 * this, so a header that claims a huge embedding but lacks the rest (or a
 * head of another vocabulary) fails at once instead of after allocating
 * gigabytes. rp_st_open has already checked that each tensor's bytes lie
 * inside the file, so the weights to allocate are bounded by the file. */
static rp_status check_every_tensor(const rp_st_file *f, rp_naming naming, const rp_config *cfg,
                                    rp_error *err) {
    rp_tensor_info table[RP_LAYER_N_TENSORS], gtable[RP_GLOBAL_N_TENSORS];
    rp_layer_layout(cfg, table);
    rp_global_layout(cfg, gtable, NULL, NULL);
    char name[256];
    map_kind kind;
    /* The head first: its vocabulary must be the embedding's. */
    for (int pass = 0; pass < 2; pass++)
        for (int i = 0; i < RP_GLOBAL_N_TENSORS; i++) {
            const rp_tensor_info *info = &gtable[i];
            int is_head = strcmp(info->suffix, "head.weight") == 0;
            if (is_head != (pass == 0)) continue;
            const rp_st_tensor *t = find_tensor(f, naming, info, 0, &kind, name, sizeof name);
            if (!t) return rp_error_set(err, RP_ERR_SHAPE, "%s: missing tensor '%s'", f->path, name);
            rp_status st = check_shape(f, name, t, info, kind, err);
            if (st != RP_OK) return st;
        }
    for (int l = 0; l < cfg->n_layer; l++)
        for (int i = 0; i < RP_LAYER_N_TENSORS; i++) {
            const rp_tensor_info *info = &table[i];
            const rp_st_tensor *t = find_tensor(f, naming, info, l, &kind, name, sizeof name);
            if (!t) {
                if (is_unused_layer0_tensor(info->suffix, l)) continue;
                if (naming == RP_NAMING_HF && name[0] == '\0') rp_tensor_name(name, sizeof name, info, l);
                return rp_error_set(err, RP_ERR_SHAPE, "%s: missing tensor '%s'", f->path, name);
            }
            rp_status st = check_shape(f, name, t, info, kind, err);
            if (st != RP_OK) return st;
        }
    return RP_OK;
}

rp_status rp_config_from_safetensors(const rp_st_file *f, rp_config *cfg, rp_naming *naming_out,
                                     rp_error *err) {
    memset(cfg, 0, sizeof *cfg);
    rp_naming naming;
    if (rp_st_find(f, "emb.weight")) naming = RP_NAMING_OFFICIAL;
    else if (rp_st_find(f, "model.embeddings.weight")) naming = RP_NAMING_HF;
    else
        return rp_error_set(err, RP_ERR_SHAPE,
                            "%s: not an RWKV-7 model: neither 'emb.weight' (official names) nor "
                            "'model.embeddings.weight' (HF/fla names) is present", f->path);
    int hf = naming == RP_NAMING_HF;
    char name[256];
    const rp_st_tensor *emb = rp_st_find(f, hf ? "model.embeddings.weight" : "emb.weight");
    rp_status st = need_2d(f, hf ? "model.embeddings.weight" : "emb.weight", emb, err);
    if (st) return st;
    const char *emb_name = hf ? "model.embeddings.weight" : "emb.weight";
    if ((st = dim_to_int(f, emb_name, emb, 0, RP_MAX_VOCAB, "vocab_size", &cfg->vocab_size, err)) ||
        (st = dim_to_int(f, emb_name, emb, 1, RP_MAX_EMBD, "n_embd", &cfg->n_embd, err)))
        return st;

    /* Layers: count consecutive blocks.{l}.ln1.weight; any ln1 beyond the count
     * means a gap (inconsistent layer count). */
    int n_layer = 0;
    for (;;) {
        snprintf(name, sizeof name, hf ? "model.layers.%d.attn_norm.weight" : "blocks.%d.ln1.weight",
                 n_layer);
        if (!rp_st_find(f, name)) break;
        if (++n_layer > RP_MAX_LAYERS)
            return rp_error_set(err, RP_ERR_SHAPE,
                                "%s: more than %d layers: n_layer is out of range [1, %d]", f->path,
                                RP_MAX_LAYERS, RP_MAX_LAYERS);
    }
    if (n_layer == 0)
        return rp_error_set(err, RP_ERR_SHAPE, "%s: no layers found (missing '%s')", f->path,
                            hf ? "model.layers.0.attn_norm.weight" : "blocks.0.ln1.weight");
    const char *prefix = hf ? "model.layers." : "blocks.";
    for (int i = 0; i < f->n_tensors; i++) {
        const char *tn = f->tensors[i].name;
        if (strncmp(tn, prefix, strlen(prefix)) != 0) continue;
        long l = strtol(tn + strlen(prefix), NULL, 10);
        if (l >= n_layer)
            return rp_error_set(err, RP_ERR_SHAPE,
                                "%s: inconsistent layer count: tensor '%s' belongs to layer %ld "
                                "but layer %d has no %s", f->path, tn, l, n_layer,
                                hf ? "attn_norm.weight" : "ln1.weight");
    }
    cfg->n_layer = n_layer;

    snprintf(name, sizeof name, hf ? "model.layers.0.attn.r_k" : "blocks.0.att.r_k");
    const rp_st_tensor *rk = rp_st_find(f, name);
    if ((st = need_2d(f, name, rk, err))) return st;
    if ((st = dim_to_int(f, name, rk, 0, RP_MAX_EMBD, "n_head", &cfg->n_head, err)) ||
        (st = dim_to_int(f, name, rk, 1, RP_MAX_EMBD, "head_size", &cfg->head_size, err)))
        return st;

    snprintf(name, sizeof name, hf ? "model.layers.0.ffn.key.weight" : "blocks.0.ffn.key.weight");
    const rp_st_tensor *fk = rp_st_find(f, name);
    if ((st = need_2d(f, name, fk, err))) return st;
    if ((st = dim_to_int(f, name, fk, 0, RP_MAX_FFN, "dim_ffn", &cfg->dim_ffn, err))) return st;

    /* LoRA ranks: official w1 is [C, D]; HF lora.0.weight is [D, C]. The value
     * LoRA is read from layer 1 (layer 0 may not have one). */
    const char *lora[4] = {"w", "a", "v", "g"};
    int *ranks[4] = {&cfg->d_decay, &cfg->d_iclr, &cfg->d_value, &cfg->d_gate};
    for (int i = 0; i < 4; i++) {
        int layer = (i == 2 && n_layer > 1) ? 1 : 0;
        if (hf) snprintf(name, sizeof name, "model.layers.%d.attn.%s_lora.lora.0.weight", layer, lora[i]);
        else snprintf(name, sizeof name, "blocks.%d.att.%s1", layer, lora[i]);
        const rp_st_tensor *t = rp_st_find(f, name);
        if (!t && i == 2 && n_layer == 1) {
            *ranks[i] = 32; /* a one-layer model never uses the value LoRA */
            continue;
        }
        if ((st = need_2d(f, name, t, err))) return st;
        if ((st = dim_to_int(f, name, t, hf ? 0 : 1, 4 * (int64_t)cfg->n_embd, "a LoRA rank",
                             ranks[i], err)))
            return st;
    }
    if ((st = rp_config_validate(cfg, err)) != RP_OK) return rp_error_prefix(err, "%s", f->path);
    if ((st = check_every_tensor(f, naming, cfg, err)) != RP_OK) return st;
    if (naming_out) *naming_out = naming;
    return RP_OK;
}

/* ---- load ---- */

/* Rows converted per step when a matrix streams from the file into another
 * format: enough to amortise a call, small next to any matrix. */
#define LOAD_CHUNK_BYTES ((size_t)4 << 20)

/* The F16 scales of an int8 tensor ("<name>.scales"), or NULL. */
static const rp_st_tensor *scales_of(const rp_st_file *f, const char *file_name) {
    char name[300];
    snprintf(name, sizeof name, "%s.scales", file_name);
    return rp_st_find(f, name);
}

rp_weights_type rp_file_weights_type(const rp_st_file *f) {
    for (int i = 0; i < f->n_tensors; i++)
        if (f->tensors[i].dtype == RP_DTYPE_I8)
            return int8row_file(f) ? RP_WEIGHTS_INT8ROW : RP_WEIGHTS_INT8;
    const char *q = rp_st_meta(f, "quantization");
    if (q && strncmp(q, "bf16", 4) == 0) return RP_WEIGHTS_BF16;
    return RP_WEIGHTS_F32;
}

/* Rows [r0, r0 + n) of an int8 tensor [N,K] widened to f32: q * scale, the
 * values the format holds (int8: exact in f32, 8-bit q times an 11-bit
 * fp16; int8row: q times its row's F32 scale rounded once, as
 * rp_qmatrix_row_f32 rounds it). */
static void dequant_rows(float *dst, const rp_st_tensor *t, const rp_st_tensor *scales, int64_t r0,
                         int64_t n) {
    const int64_t K = t->shape[1], B = K / RP_Q8_BLOCK_ELEMS;
    if (scales->dtype == RP_DTYPE_F32) { /* int8row: [N, 1] */
        const int8_t *q = (const int8_t *)t->data + r0 * K;
        for (int64_t r = 0; r < n; r++) {
            float s;
            memcpy(&s, (const unsigned char *)scales->data + (size_t)(r0 + r) * 4, 4);
            for (int64_t k = 0; k < K; k++) dst[r * K + k] = (float)q[r * K + k] * s;
        }
        return;
    }
    const int8_t *q = (const int8_t *)t->data + r0 * K;
    const unsigned char *sc = (const unsigned char *)scales->data + (size_t)(r0 * B) * 2;
    for (int64_t r = 0; r < n; r++)
        for (int64_t b = 0; b < B; b++) {
            const unsigned char *p = sc + (size_t)(r * B + b) * 2;
            float s = rp_f16_to_f32((uint16_t)(p[0] | (p[1] << 8)));
            for (int64_t k = 0; k < RP_Q8_BLOCK_ELEMS; k++)
                dst[r * K + b * RP_Q8_BLOCK_ELEMS + k] =
                    (float)q[r * K + b * RP_Q8_BLOCK_ELEMS + k] * s;
        }
}

/* Reads one tensor into dst (host memory, f32) applying the naming map;
 * the file's pages are released as they are copied. */
static rp_status read_tensor(const rp_st_file *f, const rp_st_tensor *t, const char *file_name,
                             const rp_tensor_info *info, map_kind kind, float *dst,
                             rp_error *err) {
    rp_status st = check_shape(f, file_name, t, info, kind, err);
    if (st != RP_OK) return st;
    if (t->dtype == RP_DTYPE_I8) { /* check_shape made sure of the scales */
        const rp_st_tensor *sc = scales_of(f, file_name);
        const int64_t N = t->shape[0], K = t->shape[1];
        int64_t step = (int64_t)(LOAD_CHUNK_BYTES / (size_t)K) + 1;
        for (int64_t r = 0; r < N; r += step) {
            int64_t n = N - r < step ? N - r : step;
            dequant_rows(dst + r * K, t, sc, r, n);
            rp_st_release(f, (const int8_t *)t->data + r * K, (size_t)(n * K));
        }
        rp_st_release(f, sc->data, sc->nbytes);
        return RP_OK;
    }
    if (kind != MAP_TRANSPOSE) return rp_st_read_f32_release(f, t, dst, info->numel, err);
    float *tmp = rp_malloc((size_t)info->numel * sizeof(float), "transpose buffer", err);
    if (!tmp) return RP_ERR_NOMEM;
    st = rp_st_read_f32_release(f, t, tmp, info->numel, err);
    if (st == RP_OK) {
        int64_t rows = t->shape[0], cols = t->shape[1];
        for (int64_t i = 0; i < rows; i++)
            for (int64_t j = 0; j < cols; j++) dst[j * rows + i] = tmp[i * cols + j];
    }
    free(tmp);
    return st;
}

/* Streams one quantizable [N,K] matrix into the backend storage under key,
 * in the model's format: rows already in it (BF16 for bf16, I8 + scales
 * for int8) are copied, others go through f32 rows that the backend
 * quantizes. A few MiB at a time, each chunk's file pages released. */
static rp_status load_quantized(const rp_st_file *f, const rp_st_tensor *t, const char *file_name,
                                const rp_tensor_info *info, map_kind kind, float *key,
                                rp_weights_type wtype, rp_backend *be, rp_error *err) {
    rp_status st = check_shape(f, file_name, t, info, kind, err);
    if (st != RP_OK) return st;
    const int64_t N = info->shape[0], K = info->shape[1];
    const rp_st_tensor *sc = t->dtype == RP_DTYPE_I8 ? scales_of(f, file_name) : NULL;
    const int row_file = int8row_file(f);
    const int raw = (wtype == RP_WEIGHTS_BF16 && t->dtype == RP_DTYPE_BF16) ||
                    (wtype == RP_WEIGHTS_INT8 && t->dtype == RP_DTYPE_I8 && !row_file) ||
                    (wtype == RP_WEIGHTS_INT8ROW && t->dtype == RP_DTYPE_I8 && row_file);
    /* bytes of scales per row in the file: F16 [N, K/32] or F32 [N, 1] */
    const size_t scale_row_bytes = row_file ? 4 : (size_t)(K / RP_Q8_BLOCK_ELEMS) * 2;
    const size_t elem = rp_dtype_size(t->dtype);
    int64_t step = (int64_t)(LOAD_CHUNK_BYTES / ((size_t)K * sizeof(float))) + 1;
    float *rows = raw ? NULL : rp_malloc((size_t)step * (size_t)K * sizeof(float),
                                         "conversion rows", err);
    if (!raw && !rows) return RP_ERR_NOMEM;
    for (int64_t r = 0; r < N; r += step) {
        int64_t n = N - r < step ? N - r : step;
        const unsigned char *src = (const unsigned char *)t->data + (size_t)(r * K) * elem;
        if (raw) {
            be->qweight_write(be, key, (int)r, (int)n, src, 0,
                              sc ? (const uint16_t *)((const unsigned char *)sc->data +
                                                      (size_t)r * scale_row_bytes)
                                 : NULL);
        } else {
            if (sc) dequant_rows(rows, t, sc, r, n);
            else rp_convert_to_f32(rows, src, t->dtype, (size_t)(n * K));
            be->qweight_write(be, key, (int)r, (int)n, rows, 1, NULL);
        }
        rp_st_release(f, src, (size_t)(n * K) * elem);
    }
    if (sc) rp_st_release(f, sc->data, sc->nbytes);
    free(rows);
    return be->status(be, err);
}

/* A LoRA factor of a bf16/int8 model (rp_tensor_lora_lowp): W [K,N] read
 * as f32 (the file's bf16 values, or f32 ones), transposed to [N,K] rows
 * that the backend stores as lora_storage says: bf16 (bf16 values
 * unchanged; f32 ones rounded once, as `quantize` rounds them) or int8
 * blocks quantized from the bf16 values (f32 ones rounded to bf16 first,
 * so that --weights-dtype int8 on an f32 file gives the bits of the int8
 * file, which holds them in bf16). Small: [C, r] or [r, C]. */
static rp_status load_lora_lowp(const rp_st_file *f, const rp_st_tensor *t, const char *file_name,
                                const rp_tensor_info *info, map_kind kind, float *key,
                                rp_weights_type wtype, rp_backend *be, rp_error *err) {
    const int64_t K = info->shape[0], N = info->shape[1];
    float *buf = rp_malloc(2 * (size_t)(K * N) * sizeof(float), "a LoRA factor", err);
    if (!buf) return RP_ERR_NOMEM;
    rp_status st = read_tensor(f, t, file_name, info, kind, buf, err);
    if (st == RP_OK) {
        const int via_bf16 = lora_storage(wtype, K) != RP_WEIGHTS_BF16;
        float *rows = buf + K * N;
        for (int64_t n = 0; n < N; n++)
            for (int64_t k = 0; k < K; k++)
                rows[n * K + k] = via_bf16 ? rp_bf16_to_f32(rp_f32_to_bf16(buf[k * N + n]))
                                           : buf[k * N + n];
        be->qweight_write(be, key, 0, (int)N, rows, 1, NULL);
        st = be->status(be, err);
    }
    free(buf);
    return st;
}

/* Fills the fields of one part (a layer, the embed part or the head part)
 * from the file: host memory at the field pointers (host_flat NULL), or
 * host_flat + flat_offset (a staging buffer for device memory, f32 only).
 * Tensors the file may lack (layer 0's unused v-LoRA) keep their values. */
static rp_status load_part(const rp_st_file *f, rp_naming naming, const rp_model *m,
                           void *weights, const rp_tensor_info *table, int n_tensors, int layer,
                           rp_param_part part, float *host_flat, rp_error *err) {
    char name[256];
    for (int i = 0; i < n_tensors; i++) {
        const rp_tensor_info *info = &table[i];
        if (info->part != part) continue;
        map_kind kind;
        const rp_st_tensor *t = find_tensor(f, naming, info, layer, &kind, name, sizeof name);
        if (!t) {
            if (is_unused_layer0_tensor(info->suffix, layer)) continue;
            if (naming == RP_NAMING_HF && name[0] == '\0') rp_tensor_name(name, sizeof name, info, layer);
            return rp_error_set(err, RP_ERR_SHAPE, "%s: missing tensor '%s'", f->path, name);
        }
        float *dst = host_flat ? host_flat + info->flat_offset : *rp_tensor_field(weights, info);
        rp_status st;
        if (m->qkeys && rp_tensor_lora_lowp(info->suffix))
            st = load_lora_lowp(f, t, name, info, kind, dst, m->wtype, m->be, err);
        else if (m->qkeys && rp_tensor_quantizable(info->suffix))
            st = load_quantized(f, t, name, info, kind, dst, m->wtype, m->be, err);
        else
            st = read_tensor(f, t, name, info, kind, dst, err);
        if (st != RP_OK) return st;
    }
    return RP_OK;
}

rp_status rp_model_load(rp_model *m, const char *path, int layer_begin, int layer_end,
                        rp_backend *be, rp_error *err) {
    const rp_load_options opt = {.wtype = -1, .for_training = 0};
    return rp_model_load_as(m, path, layer_begin, layer_end, &opt, be, err);
}

rp_status rp_model_load_as(rp_model *m, const char *path, int layer_begin, int layer_end,
                           const rp_load_options *opt, rp_backend *be, rp_error *err) {
    rp_st_file f;
    rp_status st = rp_st_open(&f, path, err);
    if (st != RP_OK) return st;
    rp_config cfg;
    rp_naming naming;
    st = rp_config_from_safetensors(&f, &cfg, &naming, err);
    if (st != RP_OK) goto done;
    rp_weights_type file_type = rp_file_weights_type(&f);
    rp_weights_type wtype = opt && opt->wtype >= 0 ? (rp_weights_type)opt->wtype : file_type;
    if (opt && opt->for_training &&
        (file_type == RP_WEIGHTS_INT8 || file_type == RP_WEIGHTS_INT8ROW || wtype != RP_WEIGHTS_F32)) {
        st = rp_error_set(err, RP_ERR_ARG,
                          "%s: %s weights are for inference: train from an f32/bf16 file",
                          path, file_type == RP_WEIGHTS_F32 || file_type == RP_WEIGHTS_BF16
                                    ? "low-precision"
                                    : "int8");
        goto done;
    }
    if (layer_end < 0) layer_end = cfg.n_layer;
    st = rp_model_alloc_weights(m, &cfg, layer_begin, layer_end, layer_begin == 0,
                                layer_end == cfg.n_layer, wtype, be, err);
    if (st != RP_OK) goto done;

    rp_tensor_info table[RP_LAYER_N_TENSORS], gtable[RP_GLOBAL_N_TENSORS];
    rp_layer_layout(&cfg, table);
    rp_global_layout(&cfg, gtable, NULL, NULL);
    /* Backends whose memory is host memory are filled in place; others (f32
     * only) through one staging buffer. */
    size_t staging_floats = 0;
    if (!be->is_host_memory) {
        staging_floats = m->layer_floats;
        if (m->embed_floats > staging_floats) staging_floats = m->embed_floats;
        if (m->head_floats > staging_floats) staging_floats = m->head_floats;
    }
    float *staging = staging_floats ? rp_calloc(staging_floats, sizeof(float), "staging", err) : NULL;
    if (staging_floats && !staging) {
        st = RP_ERR_NOMEM;
        goto fail;
    }
    for (int l = layer_begin; l < layer_end && st == RP_OK; l++) {
        if (staging) memset(staging, 0, m->layer_floats * sizeof(float));
        st = load_part(&f, naming, m, &m->layers[l - layer_begin], table, RP_LAYER_N_TENSORS, l,
                       RP_PART_LAYER, staging, err);
        if (st == RP_OK && staging)
            be->copy_to_device(be, m->layer_flat[l - layer_begin], staging,
                               m->layer_floats * sizeof(float));
    }
    for (int part = RP_PART_EMBED; part <= RP_PART_HEAD && st == RP_OK; part++) {
        float *flat = part == RP_PART_EMBED ? m->embed_flat : m->head_flat;
        size_t floats = part == RP_PART_EMBED ? m->embed_floats : m->head_floats;
        if (!flat) continue;
        st = load_part(&f, naming, m, &m->global, gtable, RP_GLOBAL_N_TENSORS, 0,
                       (rp_param_part)part, staging, err);
        if (st == RP_OK && staging) be->copy_to_device(be, flat, staging, floats * sizeof(float));
    }
    free(staging);
fail:
    if (st != RP_OK) rp_model_free(m);
done:
    rp_st_close(&f);
    return st;
}

/* ---- save ---- */

rp_status rp_model_save(const rp_model *m, const char *path, rp_dtype dtype, rp_error *err) {
    if (dtype != RP_DTYPE_F32 && dtype != RP_DTYPE_F16 && dtype != RP_DTYPE_BF16)
        return rp_error_set(err, RP_ERR_ARG, "cannot save weights as %s: use F32, F16 or BF16",
                            rp_dtype_name(dtype));
    if (m->qkeys)
        return rp_error_set(err, RP_ERR_ARG,
                            "cannot save %s: the model holds %s weights (saving is for f32 "
                            "models; `rwkvpipe quantize` converts an f32 file)",
                            path, m->wtype == RP_WEIGHTS_BF16    ? "bf16"
                                  : m->wtype == RP_WEIGHTS_INT8ROW ? "int8row"
                                                                   : "int8");
    rp_backend *be = m->be;
    int n = m->layer_end - m->layer_begin;
    /* Host copies of the owned buffers (the writer reads them at write time). */
    size_t total = (size_t)n * m->layer_floats + (m->embed_flat ? m->embed_floats : 0) +
                   (m->head_flat ? m->head_floats : 0);
    float *host = rp_malloc(total * sizeof(float), "save buffer", err);
    if (!host) return RP_ERR_NOMEM;
    rp_st_writer w;
    rp_st_writer_init(&w);
    rp_tensor_info table[RP_LAYER_N_TENSORS], gtable[RP_GLOBAL_N_TENSORS];
    rp_layer_layout(&m->cfg, table);
    rp_global_layout(&m->cfg, gtable, NULL, NULL);
    char name[256];
    rp_status st = RP_OK;
    float *cursor = host;
    float *embed_host = NULL, *head_host = NULL;
    if (m->embed_flat) {
        embed_host = cursor;
        be->copy_to_host(be, embed_host, m->embed_flat, m->embed_floats * sizeof(float));
        cursor += m->embed_floats;
    }
    if (m->head_flat) {
        head_host = cursor;
        be->copy_to_host(be, head_host, m->head_flat, m->head_floats * sizeof(float));
        cursor += m->head_floats;
    }
    /* Official order: emb, blocks (ln0 first in block 0), ln_out, head. */
    for (int i = 0; i < RP_GLOBAL_N_TENSORS && st == RP_OK; i++) {
        if (gtable[i].part != RP_PART_EMBED || !embed_host) continue;
        st = rp_st_writer_add(&w, gtable[i].suffix, dtype, RP_DTYPE_F32, gtable[i].ndim,
                              gtable[i].shape, embed_host + gtable[i].flat_offset, err);
    }
    for (int l = m->layer_begin; l < m->layer_end && st == RP_OK; l++) {
        float *layer_host = cursor;
        be->copy_to_host(be, layer_host, m->layer_flat[l - m->layer_begin],
                         m->layer_floats * sizeof(float));
        cursor += m->layer_floats;
        for (int i = 0; i < RP_LAYER_N_TENSORS && st == RP_OK; i++) {
            rp_tensor_name(name, sizeof name, &table[i], l);
            st = rp_st_writer_add(&w, name, dtype, RP_DTYPE_F32, table[i].ndim, table[i].shape,
                                  layer_host + table[i].flat_offset, err);
        }
    }
    for (int i = 0; i < RP_GLOBAL_N_TENSORS && st == RP_OK; i++) {
        if (gtable[i].part != RP_PART_HEAD || !head_host) continue;
        st = rp_st_writer_add(&w, gtable[i].suffix, dtype, RP_DTYPE_F32, gtable[i].ndim,
                              gtable[i].shape, head_host + gtable[i].flat_offset, err);
    }
    if (st == RP_OK) st = rp_st_writer_add_meta(&w, "format", "pt", err);
    if (st == RP_OK) st = rp_st_writer_add_meta(&w, "arch", "rwkv7 x070", err);
    char created_by[64];
    snprintf(created_by, sizeof created_by, "rwkvpipe %s", rp_version());
    if (st == RP_OK) st = rp_st_writer_add_meta(&w, "created_by", created_by, err);
    if (st == RP_OK) st = rp_st_writer_write(&w, path, err);
    rp_st_writer_free(&w);
    free(host);
    return st;
}
