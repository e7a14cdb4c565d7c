/* RWKV-7 hyper-parameters: validation, built-in shapes, sizes (config.h). */
#include "model/config.h"

#include <math.h>
#include <stdio.h>
#include <string.h>

rp_status rp_config_validate(const rp_config *c, rp_error *err) {
    if (c->n_layer < 1 || c->n_layer > 4096)
        return rp_error_set(err, RP_ERR_SHAPE, "n_layer %d out of range [1, 4096]", c->n_layer);
    if (c->head_size != RP_HEAD_SIZE)
        return rp_error_set(err, RP_ERR_SHAPE, "head_size %d unsupported: RWKV-7 uses %d",
                            c->head_size, RP_HEAD_SIZE);
    if (c->n_embd < RP_HEAD_SIZE || c->n_embd % RP_HEAD_SIZE != 0 || c->n_embd > 65536)
        return rp_error_set(err, RP_ERR_SHAPE,
                            "n_embd %d must be a positive multiple of %d (at most 65536)",
                            c->n_embd, RP_HEAD_SIZE);
    if (c->n_head * c->head_size != c->n_embd)
        return rp_error_set(err, RP_ERR_SHAPE, "n_head %d x head_size %d != n_embd %d",
                            c->n_head, c->head_size, c->n_embd);
    if (c->vocab_size < 2 || c->vocab_size > (1 << 24))
        return rp_error_set(err, RP_ERR_SHAPE, "vocab_size %d out of range [2, 16777216]",
                            c->vocab_size);
    if (c->dim_ffn < 1 || c->dim_ffn > 1 << 20)
        return rp_error_set(err, RP_ERR_SHAPE, "dim_ffn %d out of range", c->dim_ffn);
    const int ranks[4] = {c->d_decay, c->d_iclr, c->d_value, c->d_gate};
    const char *names[4] = {"decay (att.w1)", "iclr (att.a1)", "value (att.v1)", "gate (att.g1)"};
    for (int i = 0; i < 4; i++)
        if (ranks[i] < 1 || ranks[i] > c->n_embd * 4)
            return rp_error_set(err, RP_ERR_SHAPE, "LoRA rank %s = %d out of range [1, %d]",
                                names[i], ranks[i], c->n_embd * 4);
    return RP_OK;
}

static int round_rank(double x) {
    int r = (int)lround(x / 32.0) * 32;
    return r < 32 ? 32 : r;
}

void rp_config_default_ranks(rp_config *c) {
    /* The official training code's suggestion (docs/rwkv7.md, Hyper-parameters); loaded models always
     * take their ranks from tensor shapes instead. */
    double s = sqrt((double)c->n_embd);
    c->d_decay = round_rank(2.5 * s);
    c->d_iclr = round_rank(2.5 * s);
    c->d_value = round_rank(1.7 * s);
    c->d_gate = round_rank(5.0 * s);
}

typedef struct {
    const char *name;
    int n_layer, n_embd, vocab, d_decay, d_iclr, d_value, d_gate;
} builtin_shape;

/* Published ranks where they exist (docs/rwkv7.md, Hyper-parameters); 0 = suggestion formula. */
static const builtin_shape builtins[] = {
    {"tiny", 2, 128, 256, 0, 0, 0, 0},
    {"small", 4, 256, 256, 0, 0, 0, 0},
    {"0.1b", 12, 768, 65536, 64, 64, 32, 128},
    {"0.4b", 24, 1024, 65536, 64, 64, 32, 128},
    {"1.5b", 24, 2048, 65536, 96, 96, 64, 256},
};

const char *rp_config_builtin_names(void) {
    return "tiny, small, 0.1b, 0.4b, 1.5b, or explicit dims L<layers>-C<n_embd>[-V<vocab>][-F<ffn>]";
}

/* "L6-C384", "L6-C384-V65536-F1536": explicit dimensions, LoRA ranks from the
 * official suggestion formula. Returns 1 when name has this form. */
static int parse_explicit_shape(const char *name, rp_config *c) {
    int L = 0, C = 0, V = 256, F = 0, used = 0;
    if (sscanf(name, "L%d-C%d%n", &L, &C, &used) != 2) return 0;
    const char *p = name + used;
    while (*p) {
        int v = 0, n = 0;
        char key;
        if (sscanf(p, "-%c%d%n", &key, &v, &n) != 2) return 0;
        if (key == 'V') V = v;
        else if (key == 'F') F = v;
        else return 0;
        p += n;
    }
    memset(c, 0, sizeof *c);
    c->n_layer = L;
    c->n_embd = C;
    c->head_size = RP_HEAD_SIZE;
    c->n_head = C / RP_HEAD_SIZE;
    c->vocab_size = V;
    c->dim_ffn = F > 0 ? F : 4 * C;
    rp_config_default_ranks(c);
    return 1;
}

rp_status rp_config_builtin(rp_config *c, const char *name, int vocab_override, rp_error *err) {
    for (size_t i = 0; i < sizeof builtins / sizeof builtins[0]; i++) {
        const builtin_shape *b = &builtins[i];
        if (strcmp(b->name, name) != 0) continue;
        memset(c, 0, sizeof *c);
        c->n_layer = b->n_layer;
        c->n_embd = b->n_embd;
        c->head_size = RP_HEAD_SIZE;
        c->n_head = b->n_embd / RP_HEAD_SIZE;
        c->vocab_size = vocab_override > 0 ? vocab_override : b->vocab;
        c->dim_ffn = 4 * b->n_embd;
        if (b->d_decay) {
            c->d_decay = b->d_decay;
            c->d_iclr = b->d_iclr;
            c->d_value = b->d_value;
            c->d_gate = b->d_gate;
        } else {
            rp_config_default_ranks(c);
        }
        return rp_config_validate(c, err);
    }
    if (parse_explicit_shape(name, c)) {
        if (vocab_override > 0) c->vocab_size = vocab_override;
        rp_status st = rp_config_validate(c, err);
        return st == RP_OK ? st : rp_error_prefix(err, "model config '%s'", name);
    }
    return rp_error_set(err, RP_ERR_ARG, "unknown model config '%s' (built-ins: %s)", name,
                        rp_config_builtin_names());
}

long long rp_config_param_count_non_embedding(const rp_config *c) {
    long long C = c->n_embd, F = c->dim_ffn;
    long long ranks = c->d_decay + c->d_iclr + c->d_value + c->d_gate;
    /* per layer: 4 LN vectors, 6 lerps, w0 a0 v0 k_k k_a, r_k, ln_x (2), ffn x_k:
     * 4C + 6C + 5C + C + 2C + C = 19C; 4 C x C; LoRA pairs; FFN 2FC. */
    long long per_layer = 19 * C + 4 * C * C + 2 * C * ranks + 2 * F * C;
    return (long long)c->n_layer * per_layer + 2 * C /* ln0 */ + 2 * C /* ln_out */;
}

long long rp_config_param_count(const rp_config *c) {
    return rp_config_param_count_non_embedding(c) + 2LL * c->vocab_size * c->n_embd;
}

long long rp_config_state_floats_per_layer(const rp_config *c) {
    return 2LL * c->n_embd + (long long)c->n_head * c->head_size * c->head_size;
}
