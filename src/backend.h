/* The op interface the RWKV-7 block is written against. One vtable per
 * backend: src/cpu (BLAS + OpenMP, fp32, the reference twin) and cuda/
 * (cuBLAS + kernels). Pointers passed to ops are backend memory; the caller
 * owns every buffer (ops allocate nothing). Shapes in comments use
 * R = rows (tokens of all sequences in the call, ragged: see rp_batch),
 * C = channels, H heads of N (64 in RWKV-7 models). Constructors:
 * cpu/cpu_backend.h, cpu/cpu_fake_device.h, cuda/cuda_backend.h. */
#ifndef RP_BACKEND_H
#define RP_BACKEND_H

#include <stddef.h>
#include <stdint.h>

#include "core/error.h"

#ifdef __cplusplus
extern "C" {
#endif

/* A ragged batch: sequence s owns rows [row_begin[s], row_begin[s] + seq_len[s])
 * of every [R, ...] activation, in order, and its recurrent state lives in
 * state slot slot[s]. Step mode is the case seq_len[s] == 1 for all s. */
typedef struct {
    int n_seq;
    int n_rows;              /* sum of seq_len */
    const int *seq_len;      /* [n_seq], each >= 1 */
    const int *row_begin;    /* [n_seq] prefix sums of seq_len */
    const int *slot;         /* [n_seq] state slot of each sequence */
} rp_batch;

typedef enum { RP_ACT_NONE = 0, RP_ACT_TANH, RP_ACT_SIGMOID, RP_ACT_RELU_SQUARED } rp_activation;

typedef struct rp_backend rp_backend;

/* One job of rp_backend.gemv_group. */
#define RP_GEMV_JOBS_MAX 8
typedef struct rp_gemv_job {
    float *y;
    const float *x, *w, *bias;  /* bias [N] or NULL */
    int N, K;
    int w_in_out;               /* 0: W [N,K] (matmul_linear); 1: W [K,N] (matmul_lora) */
    float beta;                 /* 0 or 1 */
    rp_activation act;
} rp_gemv_job;

/* Arguments of rp_backend.time_mix_heads ([R,C] activations unless noted). */
typedef struct rp_time_mix_heads {
    float *out;                 /* groupnorm + bonus/gate output */
    float *y, *kk, *k, *v;      /* wkv7 output, removal key, key and value (updated) */
    float *v_first;             /* read (nu set) or written (nu NULL: layer 0) */
    const float *nu, *r, *w_raw, *a, *g;
    const float *k_k, *k_a;     /* [C] */
    const float *r_k;           /* [H,N] */
    const float *ln_x_weight, *ln_x_bias;  /* [C] */
    float gn_eps;
    float *state_base;          /* wkv7 state slots */
    size_t state_stride;
    int C, N;
} rp_time_mix_heads;

/* Run-time formats of the big weight matrices (issue 20; the values of
 * cpu/cpu_quant.h's rp_qtype, which defines them; docs/perf/cpu.md). */
typedef enum {
    RP_WEIGHTS_F32 = 0,
    RP_WEIGHTS_BF16 = 1,
    RP_WEIGHTS_INT8 = 2,    /* blocks of 32 along K, fp16 scale each */
    RP_WEIGHTS_INT8ROW = 3  /* one f32 scale per row */
} rp_weights_type;
/* The "quantization" metadata of the files `rwkvpipe quantize` writes
 * (docs/formats.md); an int8row file's starts with the prefix. */
#define RP_INT8_SCHEME "int8.q8_block32_f16scale.v1"
#define RP_INT8ROW_SCHEME "int8.q8_row_f32scale.v1"
#define RP_INT8ROW_SCHEME_PREFIX "int8.q8_row"

/* set_decode_rows modes (0: off, kernels by shape). */
enum { RP_ROWS_DECODE = 1, RP_ROWS_PREFILL = 2 };

/* Most mixes one ln_shift_mix call forms (the six of the time mix). */
#define RP_MIX_MAX 6
/* The arguments of one ln_shift_mix call, for rp_backend.ln_mix_gemv_group. */
typedef struct rp_ln_mix {
    float *xa, *prev;            /* [R,C] scratch (see ln_mix_gemv_group) */
    float *mix[RP_MIX_MAX];      /* [R,C] scratch; a job reads mix i as its x */
    const float *mu[RP_MIX_MAX]; /* [C] */
    int n_mix;
    const float *x, *weight, *bias;
    float eps;
    float *state_base;           /* token-shift state slots */
    size_t state_stride;
    int C;
} rp_ln_mix;

/* Most gradient terms one shift_mix_backward call takes: the six mixes of
 * the time mix, xv twice (its value GEMM and the value-residual LoRA). */
#define RP_MIX_TERMS_MAX 7

/* One tensor of an adamw_multi call: adamw's per-tensor arguments. */
typedef struct rp_adamw_tensor {
    float *param;
    const float *grad;
    float *m, *v;
    size_t n;
    float lr, weight_decay;
} rp_adamw_tensor;
/* Most tensors one adamw_multi call takes (a layer's 33 in one call). */
#define RP_ADAMW_MULTI_MAX 40

/* The type of rp_backend.attention_tail_backward, which
 * rp_attention_tail_backward_separate (below) shares. */
typedef void rp_attention_tail_backward_fn(rp_backend *be, float *dk, float *da, float *dw_raw,
                                           float *dv, float *dv_first, float *dnu, float *dk_k,
                                           float *dk_a, float *da0, float *dw0, float *dv0,
                                           const float *dkk, const float *k, const float *a,
                                           const float *v, const float *v_first,
                                           const float *nu, const float *k_k, const float *k_a,
                                           int R, int C, int N, int dkv_gemm_only);

struct rp_backend {
    const char *name;
    void *impl;  /* backend-private context (thread count, handles, streams) */
    int is_host_memory;  /* 1 when backend pointers are plain host pointers (CPU) */
    /* 1 (CUDA): shift_mix_ln_backward reads mix gradients that gemm_only
     * GEMMs stored as bf16 in place; where xa is formed again (ln_mix_again_fits)
     * the model then hints each dmix's GEMM (issue 15). 0: f32 dmix. */
    int mix_grads16;
    /* head_cross_entropy's row chunk: the logits floats one chunk may hold
     * (rp_head_ce_chunk_rows_for; 0: RP_HEAD_CE_CHUNK_FLOATS, the CPU's).
     * A GPU takes a larger budget: fewer chunks, so fewer passes of the
     * head's dW GEMM over the fp32 [V, C] gradient (issue 15). */
    size_t head_ce_chunk_floats;
    /* 1 (CUDA, BF16 math): head_cross_entropy's logits GEMM writes the
     * logits in bf16 in its scratch and the loss kernel reads them so (its
     * softmax statistics in fp32) and writes the bf16 dlogits in place:
     * half the logits bytes, no f32 logits. 0: fp32 logits (docs/gpu.md
     * "Precision"). Read per call: a workspace serves either. */
    int head_logits16;

    void (*destroy)(rp_backend *be);  /* the backend and its context */

    /* ---- memory ----
     * Ops take effect in call order. copy_to_host returns once host_dst holds
     * the data, i.e. after every op called before it; copy_to_device's
     * host_src may be reused as soon as it returns. */
    void *(*alloc)(rp_backend *be, size_t bytes);       /* zeroed; NULL on failure */
    void (*free)(rp_backend *be, void *ptr);
    void (*copy_to_device)(rp_backend *be, void *dst, const void *host_src, size_t bytes);
    void (*copy_to_host)(rp_backend *be, void *host_dst, const void *src, size_t bytes);
    /* dst and src must not overlap (a device copy with overlap is undefined). */
    void (*copy)(rp_backend *be, void *dst, const void *src, size_t bytes);
    void (*fill_zero)(rp_backend *be, void *dst, size_t bytes);
    void (*synchronize)(rp_backend *be);
    /* y [n] += x [n] (gradient accumulation). */
    void (*add)(rp_backend *be, float *y, const float *x, size_t n);
    /* The first device error since the backend was created (sticky: a GPU
     * fault leaves the context unusable), or RP_OK. Ops return nothing, so
     * callers ask here after synchronize at the end of a unit of work (a
     * training micro-batch, a decode step) and end the job with the message. */
    rp_status (*status)(rp_backend *be, rp_error *err);
    /* Optional (NULL where it means nothing, as on the CPU): [w, w + n) holds
     * weights the matmuls will read many times, so the backend may keep a
     * lower-precision copy for its GEMMs (CUDA, bf16 math: a bf16 copy that
     * every later write through the backend keeps current). A buffer freed
     * with free() is forgotten. */
    void (*register_weights)(rp_backend *be, const float *w, size_t n);
    /* Optional (NULL where register_weights keeps nothing): [w, w + n) was
     * written behind the backend's back (an NCCL receive, as ZeRO-1's weight
     * all-gather): make the lower-precision copies of that range current,
     * converting only the part of it that lies in registered weights (any
     * range, aligned or not; nothing when it lies in none). Ordered after
     * the ops called before it, like a copy. register_weights on the whole
     * buffer does the same by converting all of it. */
    void (*refresh_weights)(rp_backend *be, const float *w, size_t n);
    /* Optional (NULL where register_weights keeps nothing): the backend
     * memory of the bf16 copy of [w, w + n) (n bf16 values, element i the
     * copy of w[i]) when that range lies inside one registered weight, or
     * NULL (none kept: fp32 math, not registered, no room for the copy).
     * ZeRO-1's all-gather receives the other replicas' bf16 straight into
     * it (an NCCL write behind the backend's back, as refresh_weights's;
     * the fp32 of that range is then stale until an fp32 gather). */
    void *(*weight_copy)(rp_backend *be, const float *w, size_t n);
    /* Prepares the scratch the ops need for calls of up to `rows` rows in up
     * to `seqs` sequences of C channels in heads of N, so that no op
     * allocates: the training ops (wkv7_forward_train, wkv7_backward,
     * key_prepare_backward, bonus_gate_backward) need it first; model code
     * calls it where it sizes its workspace. Grows only (a call per shape is
     * fine). RP_ERR_NOMEM with err set when memory is short; the earlier
     * reservation stays. An op called beyond the reservation does nothing
     * and status reports it. */
    rp_status (*reserve)(rp_backend *be, int rows, int seqs, int C, int N, rp_error *err);

    /* ---- low-precision weights (optional: NULL = f32 weights only; issue 20) ----
     * A quantized [N,K] matrix (nn.Linear layout) is known to the ops by a
     * key: the float pointer the model passes where the f32 matrix would be.
     * The key is never dereferenced; matmul_linear and gemv_group (w_in_out 0)
     * run the low-precision kernel when w is a key, and any other op given a
     * key is a bug (the model points keys at memory that cannot be read).
     * qweight_create makes zeroed storage for key (RP_ERR_NOMEM / RP_ERR_ARG
     * with err set: K must suit the format); qweight_write fills rows
     * [row0, row0 + n_rows) from f32 rows [n_rows, K] (quantized here: the
     * format's rounding) when scales is NULL and src_is_f32, or copies rows
     * already in the format (data [n_rows, K] of the type, scales [n_rows,
     * K/32] fp16 for int8, [n_rows] f32 for int8row, passed as bytes);
     * qweight_destroy forgets key and frees its storage. */
    rp_status (*qweight_create)(rp_backend *be, const float *key, rp_weights_type type, int N,
                                int K, rp_error *err);
    void (*qweight_write)(rp_backend *be, const float *key, int row0, int n_rows,
                          const void *src, int src_is_f32, const uint16_t *scales);
    void (*qweight_destroy)(rp_backend *be, const float *key);

    /* ---- dense ---- */
    /* y [M,N] = x [M,K] . W^T + beta * y, W [N,K] (nn.Linear weight, row-major).
     * beta is 0 (overwrite) or 1 (accumulate: residual adds). */
    void (*matmul_linear)(rp_backend *be, float *y, const float *x, const float *w,
                          int M, int N, int K, float beta);
    /* y [M,N] = x [M,K] . W + beta * y, W [K,N] (LoRA factor, row-major). */
    void (*matmul_lora)(rp_backend *be, float *y, const float *x, const float *w,
                        int M, int N, int K, float beta);
    /* y [M,N] = x [M,K] . W + bias [N] (optional; NULL: matmul_lora then
     * bias_act(y, bias, M, N, RP_ACT_NONE); issue 15): matmul_lora with beta
     * 0, its pending hints for y consumed alike, then the bias added. Where
     * y is stored bf16 (a gemm_only y, BF16 math) the backend may add the
     * bias inside the GEMM before the output's one rounding (CUDA: a cuBLASLt
     * bias epilogue, which takes the bias rounded to bf16, as the weight's
     * bf16 copy holds it): within one bf16 rounding of the two ops, not
     * their bits; elsewhere the two ops' bits. */
    void (*matmul_lora_bias)(rp_backend *be, float *y, const float *x, const float *w,
                             const float *bias, int M, int N, int K);

    /* ---- position-wise ---- */
    /* x [R,C] = emb[tokens[r]] ; tokens are host memory, range-checked by the caller. */
    void (*embedding)(rp_backend *be, float *x, const float *emb, const int32_t *tokens,
                      int R, int C);
    /* y [R,C] = LayerNorm(x) * weight + bias, eps; mean/rstd [R] saved when non-NULL. */
    void (*layernorm)(rp_backend *be, float *y, float *mean, float *rstd, const float *x,
                      const float *weight, const float *bias, int R, int C, float eps);
    /* Token shift: prev [R,C] row r = x row r-1 inside a sequence, and for the
     * first row of sequence s the state vector state_base + slot[s]*state_stride.
     * Then that state vector becomes the last row of the sequence. */
    void (*token_shift)(rp_backend *be, float *prev, const float *x, float *state_base,
                        size_t state_stride, const rp_batch *batch, int C);
    /* y [R,C] = x + (prev - x) * mu, mu [C] (v6/v7 lerp: mu = 0 keeps x). */
    void (*lerp)(rp_backend *be, float *y, const float *x, const float *prev,
                 const float *mu, int R, int C);
    /* y [R,C] = act(y + bias); bias [C] may be NULL. */
    void (*bias_act)(rp_backend *be, float *y, const float *bias, int R, int C,
                     rp_activation act);
    /* v [R,C] = v + (v_first - v) * nu. */
    void (*value_residual)(rp_backend *be, float *v, const float *v_first, const float *nu,
                           int R, int C);
    /* kk [R,C] = L2normalize_per_head(k * k_k) over heads of N (eps 1e-12 on
     * the norm), then k = k * (1 + (a - 1) * k_a) in place. CUDA: N = 64. */
    void (*key_prepare)(rp_backend *be, float *kk, float *k, const float *a,
                        const float *k_k, const float *k_a, int R, int C, int N);
    /* y [R,C] = GroupNorm(x; H groups of N, eps) * weight + bias; mean/rstd [R,H]
     * saved when non-NULL. */
    void (*groupnorm)(rp_backend *be, float *y, float *mean, float *rstd, const float *x,
                      const float *weight, const float *bias, int R, int C, int N, float eps);
    /* out [R,C] = (out + (sum_j r_j k_j r_k[h,j]) * v_h) * g, per head h. */
    void (*bonus_gate)(rp_backend *be, float *out, const float *r, const float *k,
                       const float *v, const float *r_k, const float *g, int R, int C,
                       int N);

    /* Fused decode mix (optional: NULL falls back to the three ops): exactly
     * layernorm(xa, no mean/rstd, x, weight, bias, eps), then
     * token_shift(prev, xa, state...), then for i < n_mix (<= RP_MIX_MAX)
     * lerp(mix[i], xa, prev, mu[i]). mix and mu are host arrays of backend
     * pointers. The CUDA backend runs it as one kernel when every sequence has
     * one row (step mode), else as the three ops. */
    void (*ln_shift_mix)(rp_backend *be, float *xa, float *prev, float *const *mix,
                         const float *const *mu, int n_mix, const float *x,
                         const float *weight, const float *bias, float eps,
                         float *state_base, size_t state_stride, const rp_batch *batch,
                         int C);

    /* Fused training mix (optional: NULL = the model code calls token_shift
     * and one lerp per mix; issue 15): exactly token_shift(prev, x, state...)
     * when state_base is non-NULL (else prev is an input, as in the backward's
     * recomputation of the mixes from the saved prev), then for i < n_mix
     * (<= RP_MIX_MAX) lerp(mix[i], x, prev, mu[i]). mix and mu are host
     * arrays of backend pointers; the mixes must not overlap x or prev.
     * Only matmul ops may read a mix (as x, or as the x of a backward) until
     * something writes it again, as for gemm_only: CUDA runs one kernel
     * which in BF16 math writes the mixes as bf16 in place, no f32. */
    void (*shift_mix)(rp_backend *be, float *prev, float *const *mix, const float *const *mu,
                      int n_mix, const float *x, float *state_base, size_t state_stride,
                      const rp_batch *batch, int C);
    /* The training LayerNorm and the fused mix that reads it, in one op
     * (optional: NULL = the two ops; issue 15): exactly layernorm(xa, mean,
     * rstd, x, weight, bias, R, C, eps) then shift_mix(prev, mix, mu, n_mix,
     * xa, state_base, state_stride, batch, C), state_base non-NULL; the
     * mixes as shift_mix leaves them. xa must not overlap x. CUDA: one
     * kernel that forms the shift's value (the row above's norm, the
     * sequence's last row's for the state) from x again instead of reading
     * xa back, with the same bits. xa may be NULL where ln_mix_again_fits
     * says so (issue 15, "mixes formed again"): then xa is not written and
     * prev only at each sequence's first row (the state it started from),
     * stored compact: prev [n_seq, C], row s = sequence s's first row;
     * ln_mix_again and shift_mix_ln_backward form the rest from x, mean,
     * rstd, weight and bias with the same bits. x_save (may be NULL; must
     * not overlap x): copy(x_save, x) first, as the backward's saved x_in /
     * x_mid (CUDA: written in the same pass that reads x, no copy). */
    void (*ln_shift_mix_train)(rp_backend *be, float *x_save, float *xa, float *mean,
                               float *rstd, float *prev, float *const *mix,
                               const float *const *mu, int n_mix, const float *x,
                               const float *weight, const float *bias, float eps,
                               float *state_base, size_t state_stride, const rp_batch *batch,
                               int C);
    /* Nonzero when a training step of this batch shape and C may leave xa
     * and prev unstored (ln_shift_mix_train with xa NULL) and form them
     * again (ln_mix_again, shift_mix_ln_backward with xa NULL). Optional:
     * NULL = never; ln_mix_again is set with it. */
    int (*ln_mix_again_fits)(rp_backend *be, const rp_batch *batch, int C);
    /* The mixes again from the LayerNorm's input (optional; issue 15):
     * exactly shift_mix(prev', mix, mu, n_mix, xa', NULL, ...) with xa' =
     * layernorm of x by the saved mean/rstd and weight/bias (the bits
     * ln_shift_mix_train stored before) and prev' the token shift of xa'
     * whose sequences' first rows are read from prev ([n_seq, C], row s =
     * sequence s's first row, as ln_shift_mix_train leaves it without xa). */
    void (*ln_mix_again)(rp_backend *be, float *const *mix, const float *const *mu, int n_mix,
                         const float *prev, const float *x, const float *mean,
                         const float *rstd, const float *weight, const float *bias,
                         const rp_batch *batch, int C);
    /* Backward of shift_mix (optional: NULL = the ops below one by one), from
     * the gradients of n_terms (<= RP_MIX_TERMS_MAX) uses of the mixes: term j
     * is dmix[j] [R,C] with its mu[j] and dmu[j] [C] (a mix read by two
     * consumers is two terms with the same mu and dmu). Exactly: for j in
     * order, lerp_backward_beta(dx, dprev, dmu[j], dmix[j], x, prev, mu[j],
     * R, C, j ? 1 : 0), then token_shift_backward(dx, dstate..., dprev). dx
     * and dprev [R,C] are overwritten (dprev is scratch: a backend that
     * fuses may leave it unwritten); each dmu[j] += its fixed-order row sum,
     * term by term in order. */
    void (*shift_mix_backward)(rp_backend *be, float *dx, float *dprev, float *const *dmu,
                               const float *const *dmix, const float *const *mu, int n_terms,
                               const float *x, const float *prev, float *dstate_base,
                               size_t state_stride, const rp_batch *batch, int C);
    /* shift_mix_backward and the backward of the LayerNorm that made its x,
     * in one op (optional: NULL = the two ops; issue 15). Exactly
     * shift_mix_backward(dxa, dprev, dmu, dmix, mu, n_terms, xa, prev,
     * dstate..., batch, C), then layernorm_backward(dx, dweight, dbias, dxa,
     * x, mean, rstd, weight, R, C): dx [R,C] +=, the norm's input x and its
     * saved mean/rstd [R]. dxa and dprev [R,C] are scratch (a backend that
     * fuses may leave them unwritten); the parameter gradients are row sums
     * in a fixed order, not necessarily the two ops' order. xa NULL (only
     * where ln_mix_again_fits): xa and prev are formed from x, mean, rstd,
     * weight and bias as ln_mix_again forms them (prev: [n_seq, C], the
     * sequences' first rows). */
    void (*shift_mix_ln_backward)(rp_backend *be, float *dx, float *dweight, float *dbias,
                                  float *dxa, float *dprev, float *const *dmu,
                                  const float *const *dmix, const float *const *mu,
                                  int n_terms, const float *xa, const float *prev,
                                  float *dstate_base, size_t state_stride, const float *x,
                                  const float *mean, const float *rstd, const float *weight,
                                  const float *bias, const rp_batch *batch, int C);

    /* ---- fused decode (optional: NULL = the model code calls the ops one by
     * one; the CPU twins call exactly those ops in that order) ---- */
    /* Independent GEMVs in one call, job j (j < n_jobs <= RP_GEMV_JOBS_MAX):
     * matmul_linear (w_in_out 0, W [N,K]) or matmul_lora (w_in_out 1,
     * W [K,N]) of y [M,N] from x [M,K] with beta 0 or 1, then, when bias or
     * act is set, bias_act(y, bias, M, N, act). The outputs of a call must
     * not overlap any of its inputs. CUDA: one launch for M <= 8. */
    void (*gemv_group)(rp_backend *be, const struct rp_gemv_job *jobs, int n_jobs, int M);
    /* ln_shift_mix of pre (batch) then gemv_group(jobs, n_jobs, n_rows), the
     * jobs reading the mixes (each job's x one of pre->mix): the state and
     * the jobs' outputs are exactly those of the two calls; pre's xa, prev
     * and mix hold unspecified values afterwards (scratch that only these
     * jobs read). Optional (NULL: the model makes the two calls). CUDA: one
     * launch in step mode for few rows, each block forming the LN and the
     * mix its job reads, with the same bits (docs/gpu.md, issue 15). */
    void (*ln_mix_gemv_group)(rp_backend *be, const rp_ln_mix *pre, const rp_batch *batch,
                              const struct rp_gemv_job *jobs, int n_jobs);
    /* Dependent GEMVs (1 <= n_jobs <= RP_GEMV_JOBS_MAX): job j + 1 reads
     * job j's output after its bias/act (jobs[j + 1].x == jobs[j].y); the
     * same as gemv_group(be, jobs + j, 1, M) for j = 0, 1, ... in order.
     * NULL: the model makes those calls. CPU: a quantized pair (the decode
     * FFN) runs in one OpenMP region instead of two. */
    void (*gemv_chain)(rp_backend *be, const struct rp_gemv_job *jobs, int n_jobs, int M);
    /* The time mix after its projections, for batches of one row per sequence:
     * value_residual (or v_first = v where nu is NULL: layer 0), key_prepare,
     * wkv7, groupnorm (no mean/rstd) into out, bonus_gate on out, in that
     * order and with their arguments. CUDA: one launch when every seq_len is
     * 1 (else the separate ops). */
    void (*time_mix_heads)(rp_backend *be, const struct rp_time_mix_heads *a,
                           const rp_batch *batch);

    /* ---- recurrence ---- */
    /* WKV7 over a ragged batch. Inputs [R,C]: r, w_raw (decay pre-activation:
     * d = exp(-e^-0.5 * sigmoid(w_raw))), k (k_a-modified), v, kk (normalised
     * removal key), a (in-context rate). Kernel a = -kk, b = kk * a.
     * State of sequence s: state_base + slot[s]*state_stride, [H,N,N], row i =
     * value channel, column j = key channel, updated in place.
     * y [R,C] = S_t r_t with S_t the state after token t. */
    void (*wkv7)(rp_backend *be, float *y, const float *r, const float *w_raw,
                 const float *k, const float *v, const float *kk, const float *a,
                 float *state_base, size_t state_stride, const rp_batch *batch, int C,
                 int N);

    /* ---- backward (training) ----
     * Same argument order as the forward op, then gradients. Unless a comment
     * says "overwrite", gradient outputs ACCUMULATE (+=): an activation that
     * feeds several ops sums their gradients, and parameter gradients add up
     * over micro-batches. Parameter-gradient reductions over rows run in a
     * fixed order (results do not depend on the thread count). Any gradient
     * pointer documented as optional may be NULL. */

    /* y = x W^T, W [N,K]: dx [M,K] += dy . W (dx optional); dw [N,K] += dy^T . x (dw
     * optional in matmul_linear_backward_beta: the BWD_B of a zero-bubble schedule) */
    void (*matmul_linear_backward)(rp_backend *be, float *dx, float *dw, const float *dy,
                                   const float *x, const float *w, int M, int N, int K);
    /* y = x W, W [K,N]: dx [M,K] += dy . W^T (dx optional); dw [K,N] += x^T . dy */
    void (*matmul_lora_backward)(rp_backend *be, float *dx, float *dw, const float *dy,
                                 const float *x, const float *w, int M, int N, int K);
    /* demb [V,C]: row tokens[r] += dx row r, rows applied in order. */
    void (*embedding_backward)(rp_backend *be, float *demb, const float *dx,
                               const int32_t *tokens, int R, int C);
    /* y = LN(x) * weight + bias with mean/rstd saved by the forward:
     * dx += ..., dweight += sum_r dy * xhat, dbias += sum_r dy. */
    void (*layernorm_backward)(rp_backend *be, float *dx, float *dweight, float *dbias,
                               const float *dy, const float *x, const float *mean,
                               const float *rstd, const float *weight, int R, int C);
    /* Token shift: dx [R,C] += dprev of the next row inside each sequence. The
     * slot vector dstate_base + slot[s]*stride holds on entry the gradient
     * w.r.t. the state after the call (added to dx of the sequence's last row)
     * and on return the gradient w.r.t. the state before it (dprev of the
     * first row) - so chunks chain backwards. */
    void (*token_shift_backward)(rp_backend *be, float *dx, float *dstate_base,
                                 size_t state_stride, const float *dprev,
                                 const rp_batch *batch, int C);
    /* y = x + (prev - x) * mu: dx += dy (1 - mu), dprev += dy mu,
     * dmu [C] += sum_r dy (prev - x). */
    void (*lerp_backward)(rp_backend *be, float *dx, float *dprev, float *dmu, const float *dy,
                          const float *x, const float *prev, const float *mu, int R, int C);
    /* y = act(pre + bias) (y is the forward output): dy is turned in place into
     * d(pre) = dy * act'(.) computed from y; dbias [C] += sum_r d(pre) (optional). */
    void (*bias_act_backward)(rp_backend *be, float *dy, float *dbias, const float *y, int R,
                              int C, rp_activation act);
    /* v_out = v + (v_first - v) * nu, v = the input before the residual:
     * dv (in: d v_out, out: d v, in place), dv_first += dv_out nu,
     * dnu = dv_out (v_first - v) (overwrite). */
    void (*value_residual_backward)(rp_backend *be, float *dv, float *dv_first, float *dnu,
                                    const float *v, const float *v_first, const float *nu,
                                    int R, int C);
    /* kk = normalize_per_head(k * k_k), k_out = k * (1 + (a - 1) * k_a), k = the
     * input before key_prepare: dk (in: d k_out, out: d k including the path
     * through kk, in place), da += ..., dk_k [C] += ..., dk_a [C] += ... */
    void (*key_prepare_backward)(rp_backend *be, float *dk, float *da, float *dk_k,
                                 float *dk_a, const float *dkk, const float *k, const float *a,
                                 const float *k_k, const float *k_a, int R, int C, int N);
    /* GroupNorm with mean/rstd [R,H] saved: dx (overwrite), dweight +=, dbias +=. */
    void (*groupnorm_backward)(rp_backend *be, float *dx, float *dweight, float *dbias,
                               const float *dy, const float *x, const float *mean,
                               const float *rstd, const float *weight, int R, int C, int N);
    /* out = (o + (sum_j r_j k_j r_k[h,j]) v_h) * g, o = the input (groupnorm
     * output): d_o (overwrite), dr +=, dk +=, dv +=, dr_k [H,N] +=, dg (overwrite). */
    void (*bonus_gate_backward)(rp_backend *be, float *d_o, float *dr, float *dk, float *dv,
                                float *dr_k, float *dg, const float *dout, const float *o,
                                const float *r, const float *k, const float *v,
                                const float *r_k, const float *g, int R, int C, int N);
    /* WKV7 forward that also saves, per sequence, the state before every
     * RP_WKV_CHUNK-th token into checkpoints: sequence s uses
     * ceil(seq_len[s] / RP_WKV_CHUNK) blocks of [H,N,N] starting at block
     * rp_wkv_checkpoint_offset(batch, s). Otherwise identical to wkv7. */
    void (*wkv7_forward_train)(rp_backend *be, float *y, const float *r, const float *w_raw,
                               const float *k, const float *v, const float *kk,
                               const float *a, float *state_base, size_t state_stride,
                               float *checkpoints, const rp_batch *batch, int C, int N);
    /* Backward of wkv7_forward_train (recomputes each chunk from its
     * checkpoint): dr, dw_raw, dk, dv, dkk, da (all overwrite) and the state
     * gradient: dstate_base slots hold on entry d(final state) and on return
     * d(initial state), like token_shift_backward. */
    void (*wkv7_backward)(rp_backend *be, float *dr, float *dw_raw, float *dk, float *dv,
                          float *dkk, float *da, float *dstate_base, size_t state_stride,
                          const float *dy, const float *r, const float *w_raw, const float *k,
                          const float *v, const float *kk, const float *a,
                          const float *checkpoints, const rp_batch *batch, int C, int N);

    /* ---- first gradient writes (training) ----
     * The backward op of the same name without _beta, with beta (as cuBLAS's)
     * for the activation gradients named: 0 overwrites them - the first write
     * of that buffer in a step, so no fill_zero before it and no temporary +
     * add - and 1 accumulates exactly as that op (no other values).
     * Parameter gradients accumulate either way. */
    /* dx */
    void (*matmul_linear_backward_beta)(rp_backend *be, float *dx, float *dw, const float *dy,
                                        const float *x, const float *w, int M, int N, int K,
                                        float beta);
    /* dx */
    void (*matmul_lora_backward_beta)(rp_backend *be, float *dx, float *dw, const float *dy,
                                      const float *x, const float *w, int M, int N, int K,
                                      float beta);
    /* dx */
    void (*layernorm_backward_beta)(rp_backend *be, float *dx, float *dweight, float *dbias,
                                    const float *dy, const float *x, const float *mean,
                                    const float *rstd, const float *weight, int R, int C,
                                    float beta);
    /* dx and dprev */
    void (*lerp_backward_beta)(rp_backend *be, float *dx, float *dprev, float *dmu,
                               const float *dy, const float *x, const float *prev,
                               const float *mu, int R, int C, float beta);
    /* dr, dk and dv */
    void (*bonus_gate_backward_beta)(rp_backend *be, float *d_o, float *dr, float *dk, float *dv,
                                     float *dr_k, float *dg, const float *dout, const float *o,
                                     const float *r, const float *k, const float *v,
                                     const float *r_k, const float *g, int R, int C, int N,
                                     float beta);
    /* dr, dk and dv (optional: NULL = wkv7_backward into temporaries, then
     * add; dw_raw, dkk and da overwrite as in wkv7_backward). With beta 1
     * the model adds WKV7's gradients onto bonus_gate's with no add kernel. */
    void (*wkv7_backward_beta)(rp_backend *be, float *dr, float *dw_raw, float *dk, float *dv,
                               float *dkk, float *da, float *dstate_base, size_t state_stride,
                               const float *dy, const float *r, const float *w_raw,
                               const float *k, const float *v, const float *kk, const float *a,
                               const float *checkpoints, const rp_batch *batch, int C, int N,
                               float beta);

    /* Fused LM head + cross-entropy + L2Wrap (training), over row chunks of
     * chunk_rows so the [R, V] logits never exist whole. Per chunk, exactly:
     * matmul_linear(logits, x rows, head, beta 0), row_max, cross_entropy (in
     * place, scale), l2wrap (factor 0: none), then dx rows = dlogits . head
     * (overwrite) and dhead [V,C] += dlogits^T . x rows. losses [R]
     * overwrite; targets host (< 0: ignored); x, dx [R,C]; head [V,C];
     * scratch: rp_head_ce_scratch_floats(chunk_rows, V) floats. One chunk
     * gives the bits of those ops on the whole batch; more change only the
     * summation order of dhead (its sum over rows is split by chunk). */
    void (*head_cross_entropy)(rp_backend *be, float *losses, float *dx, float *dhead,
                               float *scratch, const float *x, const float *head,
                               const int32_t *targets, int R, int C, int V, float scale,
                               float l2wrap_factor, int chunk_rows);

    /* Cross-entropy over rows with target ids (host memory; target < 0 = row
     * ignored): losses [R] = -log softmax(logits)[target] (overwrite); when
     * dlogits is non-NULL it gets (softmax - onehot) * scale (overwrite; may
     * alias logits). Softmax in fp32 with max subtraction. */
    void (*cross_entropy)(rp_backend *be, float *losses, float *dlogits, const float *logits,
                          const int32_t *targets, int R, int V, float scale);
    /* L2Wrap (official RWKV trainer; row_max, argmax and targets are host
     * arrays): for every row with target >= 0, add
     * factor * max(logits row) to dlogits at the row's (first) arg-max.
     * logits_max/argmax [R] come from rp_backend.row_max, taken before
     * cross_entropy overwrote the logits. */
    void (*l2wrap)(rp_backend *be, float *dlogits, const float *row_max, const int32_t *argmax,
                   const int32_t *targets, int R, int V, float factor);
    /* row_max [R] and argmax [R] (first index on ties) of x [R,V]. Host outputs. */
    void (*row_max)(rp_backend *be, float *row_max, int32_t *argmax, const float *x, int R,
                    int V);

    /* ---- optimizer ---- */
    /* Sum of squares of x [n], accumulated in double in a fixed order (the
     * same result for any thread count). */
    double (*sum_squares)(rp_backend *be, const float *x, size_t n);
    /* AdamW (DeepSpeed FusedAdam, adam_w_mode) on n floats, with g = grad *
     * grad_scale: m = b1 m + (1-b1) g; v = b2 v + (1-b2) g^2;
     * p -= lr * ((m / bc1) / (sqrt(v / bc2) + eps) + wd * p), with the bias
     * corrections bc1 = 1 - b1^t, bc2 = 1 - b2^t given by the caller. */
    void (*adamw)(rp_backend *be, float *param, const float *grad, float *m, float *v, size_t n,
                  float lr, float beta1, float beta2, float eps, float weight_decay,
                  float grad_scale, float bias_correction1, float bias_correction2);
    /* Optional (NULL: adamw once per tensor; NULL on the CPU). adamw on
     * n_tensors (1..RP_ADAMW_MULTI_MAX) tensors in one pass, tensor i with
     * t[i]'s param, grad, m, v, n, lr and weight_decay: the same bits as
     * the adamw calls, one launch instead of n_tensors. */
    void (*adamw_multi)(rp_backend *be, const rp_adamw_tensor *t, int n_tensors, float beta1,
                        float beta2, float eps, float grad_scale, float bias_correction1,
                        float bias_correction2);

    /* ---- decode step graphs (optional; NULL: every step runs op by op, as
     * on the CPU) ----
     * A decode step (one token per sequence) may run as one replayable
     * device graph. rp_model_step calls step_begin with a key naming what
     * the step's ops bake in (model, workspace, state, logits buffer, batch
     * size) and the step's host inputs: tokens [n_seq] (NULL without the
     * embedding) and the batch arrays, which the backend stages through
     * fixed buffers so a replay reads the new ones. step_begin returns 1
     * when a graph of that key was launched (the caller skips the ops),
     * 0 when the caller runs the ops (eagerly: the key's first, warm-up
     * step; or under capture: its second). step_end follows every
     * step_begin (ends a capture and launches it). A key's graph is
     * dropped when the backend frees memory or registers weights, or by
     * step_reset. Errors are sticky in status. */
    int (*step_begin)(rp_backend *be, const void *key, size_t key_bytes, const int32_t *tokens,
                      const rp_batch *batch);
    void (*step_end)(rp_backend *be);
    void (*step_reset)(rp_backend *be);

    /* ---- decode rows (optional; NULL: matmuls choose kernels by shape) ----
     * set_decode_rows(be, RP_ROWS_DECODE) until set_decode_rows(be, 0):
     * every row of x in matmul_linear / matmul_lora is one sequence's decode
     * token, and the backend gives each row the bits it gives alone,
     * whatever M (the CPU streams W for any M instead of sgemm, whose bits
     * depend on M). rp_model_step sets it around a step whose sequences all
     * have one row. RP_ROWS_PREFILL (inference prefill: rp_model_step,
     * rp_model_forward, rp_model_head): the same promise for the f32
     * matrices only (low-precision ones keep their prefill kernels). */
    void (*set_decode_rows)(rp_backend *be, int on);
    /* ---- GEMM-only outputs (optional; NULL: nothing to do; issue 15) ----
     * gemm_only(be, p, n): the output p [n] that the next matmul op writes
     * (its y, or its dx), the next layernorm (its y) or bonus_gate_to or
     * groupnorm_bonus_gate (its out), is read only by
     * matmul ops (as x or dy) until something writes p again, except that
     * bias_act may run on p in place (bias NULL or not) and
     * bias_act_backward (without dbias) may read p as its y or run on p in
     * place as its dy (a gradient p: the dx of a matmul backward), the next
     * groupnorm_bonus_gate_backward may read p as its dout (the output
     * GEMM's dx, d og), and a
     * training step's w_raw (its bias_act in place, or matmul_lora_bias's
     * bias in the GEMM that writes it, then read by wkv7 ops as
     * w_raw, and passed as the y that bias_act_backward with RP_ACT_NONE
     * does not read) when its kk is wkv_only, and a training step's a (its
     * sigmoid bias_act in place, or key_prepare_from's with a0, then read by
     * key_prepare(_from), the wkv7
     * ops, key_prepare_backward and as y by the a0 bias_act_backward, with
     * dbias) under the same condition; the backend may keep p in its GEMM operand format instead of f32 (CUDA,
     * bf16 math: bf16 in place, so no conversion kernel; the activation and
     * its backward then read and write bf16). Any other read of p before then is undefined. The next
     * matmul op, layernorm, bonus_gate_to or groupnorm_bonus_gate consumes
     * the hint whether it uses it or not; so does a bias_act_backward with
     * dbias, when p is its dy (d pre, read only by matmul ops after it: CUDA
     * then keeps it only in the bf16 copy its GEMMs read; dbias is summed
     * from the f32 values), and wkv7_backward_beta, which takes two: its
     * dw_raw (read afterwards by the w0 bias_act_backward with RP_ACT_NONE
     * and matmul ops) and its dr. Hints given before a consumer stay pending
     * together (the two newest); the consumer drops them all. */
    void (*gemm_only)(rp_backend *be, const float *p, size_t n);
    /* ---- WKV7-only operands (optional; NULL: nothing to do; issue 15) ----
     * wkv_only(be, p, n): the output p [n] that the next key_prepare writes
     * as its kk, or the next wkv7_backward(_beta) as its dkk, or the next
     * wkv7_forward_train as its y, or the next groupnorm_bonus_gate_backward
     * as its dy, is read only by wkv7 ops (as kk, or dy in the backward),
     * key_prepare_backward (as dkk) or groupnorm_bonus_gate and its backward
     * (as y) until something writes p again; the backend may keep p in
     * bf16 in place (CUDA, bf16 math: half the bytes, the readers widen it).
     * Any other read of p before then is undefined. The next key_prepare,
     * wkv7_forward_train, wkv7 backward or groupnorm_bonus_gate_backward
     * consumes the hint whether it uses it or not. */
    void (*wkv_only)(rp_backend *be, const float *p, size_t n);
    /* ---- r, k, v read only by WKV7 and the fused groupnorm (optional;
     * NULL: nothing to do; issue 15) ----
     * rkv_only(be, p, n): the output p [n] that the next matmul_linear or
     * matmul_lora writes as its y (training's r, k_pre, v_pre, nu, g), the
     * next key_prepare_from as its k, or the next value_residual_from as its
     * v, is read only by the wkv7 ops (as r, k, v), groupnorm_bonus_gate and
     * its backward (as r, k, v, g), key_prepare_from (as k_in), value_residual_from
     * (as v_in, nu; with v0 its sigmoid in place), attention_tail_backward
     * (as k, v, nu) and, for nu, its sigmoid bias_act in place, until
     * something writes p again; the backend may keep p in bf16 in place
     * (CUDA, bf16 math: half the bytes, the readers widen it, as the
     * official training kernel takes r, k, v in bf16). Any other read of p
     * before then is undefined. The next matmul_linear or matmul_lora,
     * key_prepare_from or
     * value_residual_from consumes the hint whether it uses it or not.
     * key_prepare_from honours it only with its kk wkv_only and its a in
     * bf16 (training hints them together); it reads a bf16 k_in only for
     * a bf16 k, value_residual_from bf16 v_in and nu only for a bf16 v.
     * Before wkv7_backward_beta, p is its da: read only by the next
     * attention_tail_backward, which writes a's d pre over it in place
     * (GEMM-only from there, as after a gemm_only hint); that wkv7 op
     * consumes this hint too. */
    void (*rkv_only)(rp_backend *be, const float *p, size_t n);
    /* ---- dr, dk, dv through the attention backward in bf16 (optional;
     * NULL: nothing to do; issue 15) ----
     * drkv_only(be, dr, dk, dv, n): the dr, dk, dv [n] that the next
     * groupnorm_bonus_gate_backward writes (beta 0; its r, k, v rkv_only) are
     * read next only by wkv7_backward_beta (beta 1: it adds onto them, with
     * its r, k, v rkv_only and its dkk, dw_raw and da hinted as training
     * hints them); from there dr is read only by matmul ops (as dy), dk and
     * dv only by the next attention_tail_backward (dkv_gemm_only 1), whose
     * new dk and dv matmul ops alone read, until something writes them
     * again. The backend may keep the three in bf16 in place along that
     * chain (CUDA, bf16 math: half the bytes at each of the four ops, as the
     * official training kernel keeps them bf16). Any other read before then
     * is undefined. The next groupnorm_bonus_gate_backward consumes the hint
     * whether it uses it or not. */
    void (*drkv_only)(rp_backend *be, const float *dr, const float *dk, const float *dv,
                      size_t n);
    /* ---- bf16-only training activations, promised at allocation (optional;
     * NULL: every saved activation gets an fp32 buffer; issue 15) ----
     * store16_fits(be, max_rows): 1 when, for every batch of up to max_rows
     * rows, the backend keeps each saved activation that the model hints
     * (gemm_only / wkv_only / rkv_only: the FFN hidden, w_raw, a, kk, WKV7's y, og,
     * r, k, v, k_pre, v_pre, nu, g) in bf16
     * only whenever the batch has more than max_rows / 2 rows, and writes
     * the f32 of smaller batches only: so its buffer needs max_rows x cols / 2
     * floats. store16_promise(be, p, n, cap): p [n elements] got cap floats
     * (cap >= n / 2) on that promise; the backend refuses (sticky error,
     * nothing written) any f32 write or read of it past p + cap, e.g. after
     * its bf16 storage was switched off. The record ends when the memory is
     * freed. */
    int (*store16_fits)(rp_backend *be, int max_rows);
    void (*store16_promise)(rp_backend *be, const float *p, size_t n, size_t cap);
    /* ---- out-of-place value residual / key prepare (optional; NULL: copy +
     * the in-place op; issue 15) ----
     * value_residual_from(be, v, v_in, v_first, nu, v0, R, C) is copy(v,
     * v_in) + value_residual(v, v_first, nu), and key_prepare_from(be, kk, k,
     * k_in, a, a0, k_k, k_a, R, C, N) is copy(k, k_in) + key_prepare(kk, k,
     * a, ...) (a pending wkv_only hint for kk included), the same bits,
     * without the copy (training keeps v_in, k_in for the backward). v and k
     * overlap none of the inputs. v0 [C] (may be NULL): nu holds the
     * pre-activation, and the op first runs bias_act(nu, v0, R, C,
     * RP_ACT_SIGMOID) on it in place, the same bits (CUDA: in the same pass
     * where nu is bf16 in place, so nu is read once, not three times); a0
     * likewise for a. */
    void (*value_residual_from)(rp_backend *be, float *v, const float *v_in,
                                const float *v_first, float *nu, const float *v0, int R, int C);
    void (*key_prepare_from)(rp_backend *be, float *kk, float *k, const float *k_in, float *a,
                             const float *a0, const float *k_k, const float *k_a, int R, int C,
                             int N);
    /* ---- bonus + gate into its own buffer (optional; NULL: copy + bonus_gate) ----
     * bonus_gate_to(be, out, o, r, k, v, r_k, g, R, C, N): out = bonus_gate
     * applied to a copy of o [R,C] in out, the same bits; out overlaps none
     * of the inputs. It consumes a pending gemm_only hint for out (CUDA,
     * bf16 math: out written in bf16 in place, no f32; training's og, read
     * only by the output GEMM and its weight gradient). */
    void (*bonus_gate_to)(rp_backend *be, float *out, const float *o, const float *r,
                          const float *k, const float *v, const float *r_k, const float *g,
                          int R, int C, int N);
    /* ---- groupnorm + bonus/gate in one op each way (optional; NULL: the
     * ops below; issue 15) ----
     * groupnorm_bonus_gate(be, out, mean, rstd, y, ln_w, ln_b, r, k, v, r_k,
     * g, R, C, N, eps) = groupnorm(o, mean, rstd, y, ln_w, ln_b, R, C, N, eps)
     * then bonus_gate_to(out, o, r, k, v, r_k, g, R, C, N), the same bits,
     * with no o [R,C] stored (mean/rstd [R,H] are, either may be NULL). It
     * consumes a pending gemm_only hint for out as bonus_gate_to does; out
     * overlaps none of the inputs.
     * groupnorm_bonus_gate_backward(be, dy, dln_w, dln_b, dr, dk, dv, dr_k,
     * dg, dout, y, mean, rstd, ln_w, ln_b, r, k, v, r_k, g, R, C, N, beta) =
     * bonus_gate_backward_beta(d_o, dr, dk, dv, dr_k, dg, dout, o, ..., beta)
     * then groupnorm_backward(dy, dln_w, dln_b, d_o, y, mean, rstd, ln_w,
     * R, C, N), with o recomputed from y, mean, rstd and d_o never stored:
     * dy, dg =; dr, dk, dv = (beta 0) or += (beta 1); dln_w, dln_b, dr_k +=
     * (each may be NULL). It consumes a pending gemm_only hint for dg
     * (training's: the gate LoRA's backward GEMMs alone read it; CUDA then
     * keeps it only in the bf16 copy they read). A backend sets both or
     * neither: the unfused backward reads the o that the fused forward does
     * not store. */
    void (*groupnorm_bonus_gate)(rp_backend *be, float *out, float *mean, float *rstd,
                                 const float *y, const float *ln_w, const float *ln_b,
                                 const float *r, const float *k, const float *v,
                                 const float *r_k, const float *g, int R, int C, int N,
                                 float eps);
    void (*groupnorm_bonus_gate_backward)(rp_backend *be, float *dy, float *dln_w, float *dln_b,
                                          float *dr, float *dk, float *dv, float *dr_k,
                                          float *dg, const float *dout, const float *y,
                                          const float *mean, const float *rstd,
                                          const float *ln_w, const float *ln_b, const float *r,
                                          const float *k, const float *v, const float *r_k,
                                          const float *g, int R, int C, int N, float beta);
    /* ---- the backward's elementwise tail after WKV7 in one op (optional;
     * NULL: the ops below, rp_attention_tail_backward_separate; issue 15) ----
     * attention_tail_backward(be, dk, da, dw_raw, dv, dv_first, dnu, dk_k,
     * dk_a, da0, dw0, dv0, dkk, k, a, v, v_first, nu, k_k, k_a, R, C, N,
     * dkv_gemm_only) =
     *   key_prepare_backward(dk, da, dk_k, dk_a, dkk, k, a, k_k, k_a, R, C, N);
     *   gemm_only(da); bias_act_backward(da, da0, a, R, C, RP_ACT_SIGMOID);
     *   gemm_only(dw_raw); bias_act_backward(dw_raw, dw0, -, R, C, RP_ACT_NONE);
     *   nu non-NULL: value_residual_backward(dv, dv_first, dnu, v, v_first,
     *     nu, R, C); gemm_only(dnu); bias_act_backward(dnu, dv0, nu, R, C,
     *     RP_ACT_SIGMOID);
     *   nu NULL (layer 0, v is v_first): add(dv, dv_first) (v, dnu, dv0 unused),
     * the same bits, in one pass over [R,C]. So d pre of a, w and nu (da,
     * dw_raw, dnu) are GEMM-only afterwards, as the gemm_only hints above
     * promise (the caller gives none); dkk is consumed like
     * key_prepare_backward's. dkv_gemm_only 1: the new dk and dv are read
     * afterwards only by the key and value GEMM backwards, as their dY (no
     * f32 reader: backward.c's, unless the W pass copies them), so the
     * backend may keep them in bf16 only (CUDA, BF16 math: no f32 write,
     * the GEMMs' bf16 operands only); 0: f32 as always. */
    rp_attention_tail_backward_fn *attention_tail_backward;
    /* Sequences per decode group the engine forms by default (the backend's
     * measured sweet spot; 0: RP_ENGINE_GROUP_DEFAULT). serve --max-batch
     * overrides it. */
    int decode_group;

    /* ---- sparse weight buffers (optional: 0 / NULL = every buffer stays
     * backed whole; ZeRO-1, src/pipe/pipe_zero.c) ----
     * sparse_page: the bytes of a page (a power of two) that release_range
     * gives back (CUDA: the VMM allocation granularity, 2 MiB; the mock
     * device: the host page). alloc_sparse: like alloc (zeroed, every byte
     * backed, free() frees it) but page-aligned, and its pages can be given
     * back one by one. release_range(p, bytes): the whole pages inside
     * [p, p + bytes) of an alloc_sparse buffer stop being backed by memory
     * (any later read or write of them is a fault); returns the bytes given
     * back (0 when no whole page lies inside). It waits for the ops called
     * before it. The buffer's other pages keep their contents. */
    size_t sparse_page;
    void *(*alloc_sparse)(rp_backend *be, size_t bytes);
    size_t (*release_range)(rp_backend *be, void *p, size_t bytes);
};

/* head_cross_entropy: logits floats per row chunk on the CPU (256 MiB:
 * 1024 rows at V = 65536, each chunk's GEMMs still large), the rows per
 * chunk for a batch under a budget of chunk_floats (a multiple of 128 rows,
 * the CPU's GEMM tile, when there are several chunks), the rows a backend
 * takes (its head_ce_chunk_floats, else the CPU's budget), and the scratch
 * a chunk needs (logits, row max, arg-max). */
#define RP_HEAD_CE_CHUNK_FLOATS ((size_t)1 << 26)
/* The CUDA backend's budget (cuda_backend.cu; bench/gpu_model.c models it):
 * 1 GiB of f32 logits, 4096 rows at V = 65536. */
#define RP_HEAD_CE_CHUNK_FLOATS_CUDA ((size_t)1 << 28)
static inline int rp_head_ce_chunk_rows_budget(int R, int V, size_t chunk_floats) {
    size_t rows = chunk_floats / (size_t)(V > 0 ? V : 1);
    if (rows >= (size_t)R) return R > 0 ? R : 1;
    rows = rows >= 128 ? rows / 128 * 128 : (rows ? rows : 1);
    return (int)rows;
}
static inline int rp_head_ce_chunk_rows(int R, int V) {
    return rp_head_ce_chunk_rows_budget(R, V, RP_HEAD_CE_CHUNK_FLOATS);
}
static inline int rp_head_ce_chunk_rows_for(const rp_backend *be, int R, int V) {
    return rp_head_ce_chunk_rows_budget(
        R, V, be->head_ce_chunk_floats ? be->head_ce_chunk_floats : RP_HEAD_CE_CHUNK_FLOATS);
}
static inline size_t rp_head_ce_scratch_floats(int chunk_rows, int V) {
    return (size_t)chunk_rows * ((size_t)V + 2);
}

/* Tokens per WKV7 state checkpoint (the official training kernel's CHUNK_LEN). */
#define RP_WKV_CHUNK 16

/* First checkpoint block of sequence s: sum over earlier sequences of
 * ceil(seq_len / RP_WKV_CHUNK); with s = n_seq, the total block count. */
static inline size_t rp_wkv_checkpoint_offset(const rp_batch *batch, int s) {
    size_t blocks = 0;
    for (int i = 0; i < s; i++)
        blocks += (size_t)(batch->seq_len[i] + RP_WKV_CHUNK - 1) / RP_WKV_CHUNK;
    return blocks;
}

/* Destroys a backend of either kind (callers hold rp_backend pointers
 * without caring which). NULL is a no-op. */
static inline void rp_backend_destroy(rp_backend *be) {
    if (be) be->destroy(be);
}

/* attention_tail_backward's definition as the separate ops, in one place:
 * what the model's backward runs where a backend has no fused op, and what a
 * backend's fused op falls back to for inputs its kernel does not take
 * (cuda/cuda_backward.cu). The gemm_only hints make each d pre GEMM-only, as
 * the fused op leaves them. */
static inline void rp_attention_tail_backward_separate(
    rp_backend *be, float *dk, float *da, float *dw_raw, float *dv, float *dv_first, float *dnu,
    float *dk_k, float *dk_a, float *da0, float *dw0, float *dv0, const float *dkk,
    const float *k, const float *a, const float *v, const float *v_first, const float *nu,
    const float *k_k, const float *k_a, int R, int C, int N, int dkv_gemm_only) {
    const size_t n = (size_t)R * C;
    (void)dkv_gemm_only; /* f32 dk and dv serve GEMM-only readers too */
    be->key_prepare_backward(be, dk, da, dk_k, dk_a, dkk, k, a, k_k, k_a, R, C, N);
    if (be->gemm_only) be->gemm_only(be, da, n);
    be->bias_act_backward(be, da, da0, a, R, C, RP_ACT_SIGMOID);
    /* RP_ACT_NONE: d pre = dw_raw, only its bias sum; no y */
    if (be->gemm_only) be->gemm_only(be, dw_raw, n);
    be->bias_act_backward(be, dw_raw, dw0, NULL, R, C, RP_ACT_NONE);
    if (!nu) { /* layer 0: v is v_first */
        be->add(be, dv, dv_first, n);
        return;
    }
    be->value_residual_backward(be, dv, dv_first, dnu, v, v_first, nu, R, C);
    if (be->gemm_only) be->gemm_only(be, dnu, n);
    be->bias_act_backward(be, dnu, dv0, nu, R, C, RP_ACT_SIGMOID);
}

#ifdef __cplusplus
}
#endif

#endif
