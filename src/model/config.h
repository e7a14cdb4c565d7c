/* RWKV-7 (x070) hyper-parameters. All of them come from tensor shapes when a
 * model is loaded (never from file names, never hard-coded LoRA ranks); the
 * built-in configs are named shapes for creating new models. */
#ifndef RP_MODEL_CONFIG_H
#define RP_MODEL_CONFIG_H

#include "core/error.h"

#define RP_HEAD_SIZE 64

typedef struct {
    int n_layer;
    int n_embd;      /* C, a multiple of 64 */
    int n_head;      /* H = C / 64 */
    int head_size;   /* N = 64 */
    int vocab_size;  /* V */
    int dim_ffn;     /* F, 4C in released models */
    int d_decay;     /* LoRA rank of att.w1/w2 */
    int d_iclr;      /* att.a1/a2 */
    int d_value;     /* att.v1/v2 */
    int d_gate;      /* att.g1/g2 */
} rp_config;

/* Checks every field is in range and consistent (C % 64 == 0, H*N == C, ...). */
rp_status rp_config_validate(const rp_config *cfg, rp_error *err);

/* Built-in shapes: "tiny" (L2 C128 V256), "small" (L4 C256 V256, the quickstart
 * default), "0.1b" (L12 C768 V65536, ranks 64/64/32/128), "0.4b" (L24 C1024),
 * "1.5b" (L24 C2048). vocab_override > 0 replaces V. */
rp_status rp_config_builtin(rp_config *cfg, const char *name, int vocab_override, rp_error *err);
/* Comma-separated list of the built-in names, for --help texts. */
const char *rp_config_builtin_names(void);

/* LoRA ranks from the official suggestion formula for C (used by built-ins
 * without published ranks). */
void rp_config_default_ranks(rp_config *cfg);

/* Parameter count of the whole model, and of everything but emb/head. */
long long rp_config_param_count(const rp_config *cfg);
long long rp_config_param_count_non_embedding(const rp_config *cfg);
/* Floats of recurrent state per sequence per layer: 2C + H*N*N. */
long long rp_config_state_floats_per_layer(const rp_config *cfg);

#endif
