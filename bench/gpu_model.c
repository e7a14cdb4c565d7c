/* The analytic H100 cost model of the CUDA backend as it is built today (see
 * gpu_model.h): the op sequence of rp_block_forward (src/model/forward.c) and
 * its backward, each backend op one kernel launch (the cuda/ kernels; a
 * decode step replayed as one CUDA graph, cuda/cuda_graph.cu), fp32
 * activations between ops except the GEMM-only ones (backend.h gemm_only:
 * stored bf16 in place, no f32), bf16 GEMM operands: written as a second
 * bf16 output by the kernel that produces them where it can (issue 15),
 * else converted once per activation and shared by the GEMMs that read it
 * (rp_cuda_act16 in cuda/cuda_internal.h). Each launch costs
 * max(bytes / HBM bandwidth, FLOPs / peak, launch overhead); the shapes come
 * from rp_config_builtin, nothing here is a measured or hard-coded result. */
#include "config.h"

#include "gpu_model.h"

#include <math.h>
#include <string.h>

#include "backend.h"
#include "model/config.h"

/* H100 SXM: HBM3 bandwidth, dense bf16 tensor-core rate, fp32 CUDA-core rate
 * (the elementwise kernels, the decode GEMVs and WKV7 run on CUDA cores). */
#define HBM_BYTES_PER_S 3.35e12
#define BF16_TENSOR_FLOPS 990e12
#define FP32_FLOPS 67e12
/* Host cost of one kernel launch on a stream, and of one kernel node of a
 * replayed CUDA graph: the floor of every small kernel. */
#define LAUNCH_S 5e-6
#define GRAPH_LAUNCH_S 1e-6
/* Programmatic dependent launch (Hopper; cuda/cuda_internal.h, docs/gpu.md
 * "(issue 15) PDL"): the decode GEMVs and time_mix_heads are launched with
 * the programmatic stream serialization attribute and trigger their
 * dependents right after their own grid dependency sync. Assumed: a node
 * whose predecessor triggers it early launches and prefetches its weights
 * while that one runs (the CUDA programming guide, "Programmatic Dependent
 * Launch and Synchronization": the secondary's work that does not depend
 * on the primary overlaps it), so only the dependency wait and the
 * x-dependent part stay serial: the node's floor drops from GRAPH_LAUNCH_S
 * to PDL_NODE_S. 0.5 us is an assumption (half a graph node), not a
 * measurement; a node after a kernel that does not trigger (ln_shift_mix,
 * the step-input copy) keeps GRAPH_LAUNCH_S, and no
 * weight streaming is credited against a predecessor's idle bandwidth. */
#define PDL_NODE_S 0.5e-6
/* L2 to SM bandwidth, for what a kernel re-reads from L2 (the decode GEMVs'
 * LN prologue: every block reads the rows and LN/mix parameters again).
 * An assumption, about twice HBM (published H100 microbenchmarks measure
 * 5.5-7 TB/s); such a kernel costs at least (its HBM bytes + its L2
 * re-reads) / this, the W stream passing through L2 too. */
#define L2_BYTES_PER_S 5.5e12
/* SMs of an H100 SXM: the decode GEMVs' LN prologue runs one block per SM. */
#define H100_SMS 132
/* The training step modelled: one micro-batch of this many sequences. */
#define TRAIN_SEQS 8
#define TRAIN_T 4096
/* FLOPs per state element per token of the WKV7 recurrence (decay, the a/b
 * rank-1 update, v k^T, the read-out with r) and its backward: each chunk run
 * forward once without y (~7) plus the walk back (~29: G += dy r^T in two
 * views, five row/column sums, the inverted update, dd, da, dS in two views),
 * cuda/cuda_wkv7.cu. Before the step-back design: 2.5 recomputes, ~4.5x. */
#define WKV_FLOPS_PER_ELEM 10.0
#define WKV_BACKWARD_OVER_FORWARD 3.6
/* The chunked forward (fla's form, 16-token chunks), which every training
 * call of 64+ tokens runs (rp_cuda_wkv7_chunked_min_t): in fp32 math on FMA
 * loops, ~11.3 FLOPs per state element on the wave model's scale; in BF16
 * math (the training step modelled here) on bf16 wmma, 10 FLOPs per element
 * on tensor cores and ~900 of the FMA form's ~2900 instructions a thread and
 * chunk left on CUDA cores (the WKV7 wave-model section below). */
#define WKV_CHUNK_FLOPS_PER_ELEM 11.3
#define WKV_CHUNK_MMA_TC_FLOPS_PER_ELEM 10.0
#define WKV_CHUNK_MMA_CORE_FLOPS_PER_ELEM (WKV_CHUNK_FLOPS_PER_ELEM * 900.0 / 2900.0)
/* Its backward in BF16 math (wkv7_chunk_backward_mma_kernel, T >= 64): per
 * chunk 54 wmma a warp (216 a head: the L x L products and their gradients,
 * S0 At, dSA, dV, dS0, S0^T dY, S0^T dP, dSLg^T SA, dSLg^T V and the L x L
 * terms of dRt, dAt, dBh, dKh) = 27 FLOPs per state element on tensor cores;
 * on CUDA cores ~3300 instructions a thread and chunk (the substitution and
 * back substitution, dv's dP Uak^T, the staging and bf16 conversions, the
 * masks, the fragment loads and stores, and the per-channel chain of warps 0
 * and 1: as 11.3 x 3300 / 2900 FLOPs per element on the FMA form's scale). */
#define WKV_CHUNK_BWD_MMA_TC_FLOPS_PER_ELEM 27.0
#define WKV_CHUNK_BWD_MMA_CORE_FLOPS_PER_ELEM (WKV_CHUNK_FLOPS_PER_ELEM * 3300.0 / 2900.0)
/* Per-layer parameter tensors (AdamW launched one kernel per tensor before
 * adamw_multi). */
#define TENSORS_PER_LAYER 33
#define GLOBAL_TENSORS 6

typedef struct {
    const char *name;
    double launches, bytes, flops;
    double t_bound, t_plain, t_graph, t_pdl; /* seconds, summed over launches */
    double l2_bytes;                         /* re-read from L2 (not in bytes) */
} kernel;

typedef struct {
    kernel k[64];
    int n;
    double weight_bytes; /* bytes of weights read (decode floor) */
    int pdl_edge;        /* the next launches follow a kernel that triggers them early (PDL) */
} kernel_list;

/* count launches of one kernel, each moving bytes (HBM) and re-reading
 * l2_bytes from L2, doing flops. */
static void add_l2(kernel_list *l, const char *name, double count, double bytes,
                   double l2_bytes, double flops, int tensor) {
    if (count <= 0) return;
    kernel *k = NULL;
    for (int i = 0; i < l->n; i++)
        if (!strcmp(l->k[i].name, name)) k = &l->k[i];
    if (!k) {
        if (l->n == (int)(sizeof l->k / sizeof l->k[0])) return;
        k = &l->k[l->n++];
        memset(k, 0, sizeof *k);
        k->name = name;
    }
    const double t_hbm = bytes / HBM_BYTES_PER_S, t_l2 = (bytes + l2_bytes) / L2_BYTES_PER_S;
    const double t_mem = l2_bytes > 0 && t_l2 > t_hbm ? t_l2 : t_hbm;
    const double t_math = flops / (tensor ? BF16_TENSOR_FLOPS : FP32_FLOPS);
    const double bound = t_mem > t_math ? t_mem : t_math;
    k->launches += count;
    k->bytes += count * bytes;
    k->l2_bytes += count * l2_bytes;
    k->flops += count * flops;
    k->t_bound += count * bound;
    k->t_plain += count * (bound > LAUNCH_S ? bound : LAUNCH_S);
    const double node = bound > GRAPH_LAUNCH_S ? bound : GRAPH_LAUNCH_S;
    k->t_graph += count * node;
    k->t_pdl += count * (l->pdl_edge ? (bound > PDL_NODE_S ? bound : PDL_NODE_S) : node);
}

static void add(kernel_list *l, const char *name, double count, double bytes, double flops,
                int tensor) {
    add_l2(l, name, count, bytes, 0, flops, tensor);
}

/* An elementwise op over R rows of width W: `io` fp32 vectors read or
 * written per row, `params` fp32 parameter vectors of width W. A bf16
 * second output (a GEMM operand) counts as half a vector: BF16_OUT. */
#define BF16_OUT 0.5
static void ew(kernel_list *l, const char *name, double count, double R, double W, double io,
               double params, double flops_per_elem) {
    add(l, name, count, 4.0 * W * (R * io + params), flops_per_elem * R * W, 0);
}

/* Decode GEMV: y [R,N] (+)= x [R,K] W^T, W read once in bf16. */
static void gemv(kernel_list *l, const char *name, double count, double R, double N, double K,
                 int accumulate) {
    add(l, name, count, 2.0 * N * K + 4.0 * R * (K + N * (accumulate ? 2 : 1)),
        2.0 * R * N * K, 0);
    l->weight_bytes += count * 2.0 * N * K;
}

/* Bytes and FLOPs of that GEMV, added to a fused kernel's totals. */
static void gemv_part(kernel_list *l, double *bytes, double *flops, double R, double N, double K,
                      int accumulate) {
    *bytes += 2.0 * N * K + 4.0 * R * (K + N * (accumulate ? 2 : 1));
    *flops += 2.0 * R * N * K;
    l->weight_bytes += 2.0 * N * K;
}

/* The LN prologue of a decode GEMV group (cuda_decode.cu gemv_group_ln_kernel,
 * backend.h ln_mix_gemv_group) over R rows of width C with n_mix mixes, for
 * a group of `blocks` GEMV blocks in n_jobs jobs, run by min(blocks,
 * H100_SMS) blocks in contiguous runs. HBM: x and the old state read once,
 * the new state written once (the block that counts last), LN weight, bias
 * and the mus once. L2 (*l2): every block reads x and the old state of its
 * rows and the LN weight and bias again (2 R + 2 vectors of C floats; the
 * moments' second pass hits L1), and the mu of each job in its run (at most
 * one per block plus one per job boundary). */
static void ln_prologue(double *bytes, double *l2, double R, double C, double n_mix,
                        double blocks, double n_jobs) {
    const double grid = blocks < H100_SMS ? blocks : H100_SMS;
    *bytes += 4.0 * C * (3 * R + 2 + n_mix);
    *l2 += grid * 4.0 * C * (2 * R + 3) + n_jobs * 4.0 * C;
}

/* The rows and width the LN prologue takes (cuda_decode.cu: DEC_MAX_M rows,
 * DEC_LN_MAX_FLOATS floats of mixes in shared memory); above, the separate
 * ln_shift_mix kernel runs first. */
static int ln_fused(double R, double C) { return R <= 8 && R * C <= 8192; }

/* One decode layer with the fused ops (rp_block_forward's decode_time_mix
 * and channel_mix with ln_mix_gemv_group): 6 launches, layer 0 included
 * (8 where the rows do not fit the LN prologue: ln_fused). */
static void layer_decode(kernel_list *l, const rp_config *c, int layer, double R, double S) {
    const double C = c->n_embd, F = c->dim_ffn, N = c->head_size, H = c->n_head;
    const double ranks[4] = {c->d_decay, c->d_iclr, c->d_gate, c->d_value};
    const int loras = layer == 0 ? 3 : 4; /* layer 0 has no value LoRA */
    const double state = 4.0 * H * N * N;
    double bytes = 0, flops = 0, l2 = 0, blocks = 0;
    /* PDL edges: a GEMV or time_mix_heads after a kernel that triggers
     * (cuda_decode.cu, cuda_matmul.cu); layer 0's first group follows ln0
     * and a later layer's the FFN value GEMV, which both trigger (layernorm
     * at decode rows since issue 15). */
    const int fused = ln_fused(R, C);
    l->pdl_edge = 0;
    if (!fused) ew(l, "ln_shift_mix (time mix)", 1, R, C, 2 + 1 + 6, 2 + 6, 8 + 3 * 6);
    l->pdl_edge = fused;
    for (int i = 0; i < 3; i++) gemv_part(l, &bytes, &flops, R, C, C, 0);
    blocks += 3 * ceil(C / 8); /* a warp per column, 8 a block */
    for (int i = 0; i < loras; i++) {
        gemv_part(l, &bytes, &flops, R, ranks[i], C, 0);
        /* split-K over up to 8 blocks per 32 columns (cuda_decode.cu): the
         * slices' partial sums written and read back once */
        const double split = C / 64 > 8 ? 8 : C / 64;
        bytes += split > 1 ? 2 * 4.0 * split * R * ranks[i] : 0;
        blocks += ceil(ranks[i] / 32) * (split > 1 ? split : 1);
    }
    if (fused) {
        ln_prologue(&bytes, &l2, R, C, 6, blocks, 3 + loras);
        flops += (blocks < H100_SMS ? blocks : H100_SMS) * 8 * R * C + (3 + loras) * 3 * R * C;
        add_l2(l, "gemv_group (ln1 + mix, r, k, v, LoRA downs split-K)", 1, bytes, l2, flops,
               0);
    } else {
        add(l, "gemv_group (r, k, v, LoRA downs split-K)", 1, bytes, flops, 0);
    }
    l->pdl_edge = 1;
    bytes = flops = 0;
    for (int i = 0; i < loras; i++) {
        gemv_part(l, &bytes, &flops, R, C, ranks[i], 0);
        bytes += 4.0 * C; /* w0, a0, v0 */
    }
    add(l, "gemv_group (LoRA ups + bias/act)", 1, bytes, flops, 0);
    /* value residual, key prepare, WKV7 step, groupnorm, bonus/gate: reads
     * r w_raw k v a g nu v_first, writes out y kk k v; k_k k_a r_k ln_x */
    add(l, "time_mix_heads", 1, 4.0 * C * (13 * R + 5) + 2 * S * state,
        WKV_FLOPS_PER_ELEM * R * C * N + 30 * R * C, 0);
    gemv(l, "GEMV C x C (output)", 1, R, C, C, 1);
    if (fused) {
        bytes = flops = l2 = 0;
        gemv_part(l, &bytes, &flops, R, F, C, 0);
        blocks = ceil(F / 8);
        ln_prologue(&bytes, &l2, R, C, 1, blocks, 1);
        flops += (blocks < H100_SMS ? blocks : H100_SMS) * 11 * R * C;
        add_l2(l, "gemv_group (ln2 + mix, FFN key + relu^2)", 1, bytes, l2, flops, 0);
    } else {
        l->pdl_edge = 0;
        ew(l, "ln_shift_mix (channel mix)", 1, R, C, 2 + 1 + 1, 2 + 1, 8 + 3);
        gemv(l, "gemv_group (FFN key + relu^2)", 1, R, F, C, 0);
        l->pdl_edge = 1;
    }
    gemv(l, "GEMV FFN value (F -> C)", 1, R, C, F, 1);
    l->pdl_edge = 1; /* ln_out (or the next layer) follows a triggering kernel */
}

/* fp32 -> bf16 conversion kernel of an R x W activation. */
static void to_bf16(kernel_list *l, double count, double R, double W) {
    add(l, "to_bf16 (GEMM operands)", count, 6.0 * R * W, 0, 0);
}

/* One training GEMM: cuBLAS reads bf16 A [R,K] and W [N,K], writes fp32 C;
 * A converted first unless its producer wrote it in bf16 (x16). */
static void gemm(kernel_list *l, const char *name, double count, double R, double N, double K,
                 int x16) {
    if (!x16) to_bf16(l, count, R, K);
    add(l, name, count, 2.0 * R * K + 2.0 * N * K + 4.0 * R * N, 2.0 * R * N * K, 1);
}

/* A GEMM whose output only GEMMs read (backend.h gemm_only): C written in
 * bf16 in place, half the bytes, and no conversion for its consumers. */
static void gemm_c16(kernel_list *l, const char *name, double count, double R, double N,
                     double K) {
    add(l, name, count, 2.0 * R * K + 2.0 * N * K + 2.0 * R * N, 2.0 * R * N * K, 1);
}

/* A GEMM that adds onto the residual stream (x += y W^T, beta 1: the
 * output and FFN value projections): C read and written in fp32. */
static void gemm_accumulate(kernel_list *l, const char *name, double count, double R, double N,
                            double K) {
    add(l, name, count, 2.0 * R * K + 2.0 * N * K + 8.0 * R * N, 2.0 * R * N * K, 1);
}

/* Backward of that GEMM: dX = dY W and dW += X^T dY, dY converted once for
 * both unless its producer wrote it in bf16 (dy16), X unless it still has a
 * valid bf16 copy (x16: recomputed just before). */
static void gemm_backward(kernel_list *l, const char *name, double count, double R, double N,
                          double K, int dy16, int x16) {
    if (!dy16) to_bf16(l, count, R, N);
    if (!x16) to_bf16(l, count, R, K);
    /* x16 == 2: dX written in bf16 in place (GEMM-only, backend.h gemm_only,
     * or a mix gradient only shift_mix_ln_backward reads) */
    add(l, name, count, 2.0 * R * N + 2.0 * N * K + (x16 == 2 ? 2.0 : 4.0) * R * K,
        2.0 * R * N * K, 1);
    add(l, name, count, 2.0 * R * N + 2.0 * R * K + 8.0 * N * K, 2.0 * R * N * K, 1);
}

/* One launch of a kernel with both CUDA-core FLOPs (fp32 rate) and tensor-
 * core FLOPs (bf16 rate), issued side by side: its math time is their sum
 * (a WKV7 chunk kernel's tile products wait on its scalar phases). */
static void add_wkv_chunk_mma(kernel_list *l, const char *name, double bytes, double core_flops,
                              double tc_flops) {
    /* add() prices FLOPs at one rate: pass the fp32-rate equivalent, then
     * put the FLOP count itself back */
    add(l, name, 1, bytes, core_flops + tc_flops * FP32_FLOPS / BF16_TENSOR_FLOPS, 0);
    for (int i = 0; i < l->n; i++)
        if (!strcmp(l->k[i].name, name))
            l->k[i].flops += tc_flops * (1.0 - FP32_FLOPS / BF16_TENSOR_FLOPS);
}

/* WKV7's output y as the groupnorm reads it: bf16 in place (BF16_OUT; the
 * WKV7 forward writes it so under forward.c's wkv_only hint, the fused
 * kernels take either, cuda_elementwise.cu / cuda_backward.cu). */
#define GN_Y_IO BF16_OUT

/* WKV7's input gradient dy as groupnorm_bonus_gate_backward writes it and
 * the WKV7 backward reads it: bf16 in place (backward.c's wkv_only hint; the
 * chunked backward rounded it to bf16 for its products anyway). */
#define GN_DY_IO BF16_OUT

/* r, k, v and g as WKV7 and the fused groupnorm read them, and k_pre,
 * v_pre, nu as key_prepare_from, value_residual_from and the tail read
 * them: bf16 in place past layer 0 (forward.c's rkv_only hints, model.h
 * rp_rkv_only_layer: their GEMMs, key_prepare_from and value_residual_from
 * write them so); layer 0 keeps f32 (its v becomes v_first, which stays f32:
 * it crosses pipeline stages). In fp32 vectors per element. */
static double rkv_io(int layer) { return layer > 0 ? BF16_OUT : 1.0; }

static int mix_ln_fused(double C);

/* The forward ops of one layer (rp_block_forward), R rows of S sequences;
 * decode: the fused ops (layer_decode), else GEMMs and the checkpointing WKV7. */
static void layer_forward(kernel_list *l, const rp_config *c, int layer, double R, double S,
                          int decode) {
    const double C = c->n_embd, F = c->dim_ffn, N = c->head_size, H = c->n_head;
    const double ranks[4] = {c->d_decay, c->d_iclr, c->d_gate, c->d_value};
    const int loras = layer == 0 ? 3 : 4; /* layer 0 has no value LoRA */
    const double state = 4.0 * H * N * N;
    if (decode) {
        layer_decode(l, c, layer, R, S);
        return;
    }
    /* ln_shift_mix_train: ln1 (ln2) and the shift_mix that reads it in one
     * kernel (cuda_elementwise.cu): reads x, writes xa, mean/rstd and prev
     * for the backward and the mixes in bf16 in place (only GEMMs read
     * them); xa is not read back. The shift's value is the row above's
     * norm, formed again: its x row (moments' two passes and the values)
     * comes from L2, where its own block just read it. */
    /* (issue 15, mixes formed again) where the fused mix + LN backward
     * takes C, xa and prev are not written (prev's sequence-first rows only:
     * S rows) and the backward forms them from x, mean and rstd */
    /* the backward's saved residual stream, the layer's input x_in and
     * x_mid before the channel mix (forward.c): each ln_shift_mix_train
     * writes its x in the same pass that reads it (one f32 vector more, no
     * device copy) */
    const double io = mix_ln_fused(C) ? 1 : 3, first = mix_ln_fused(C) ? S : 0, save = 1;
    add_l2(l, "ln_shift_mix_train (x_in + ln1 + shift + 6 mixes, bf16)", 1,
           4.0 * C * (R * (io + save + 6 * BF16_OUT) + first + 2 + 6), 3 * 4.0 * R * C,
           (16 + 3 * 6) * R * C, 0);
    add_l2(l, "ln_shift_mix_train (x_mid + ln2 + shift + 1 mix, bf16)", 1,
           4.0 * C * (R * (io + save + BF16_OUT) + first + 2 + 1), 3 * 4.0 * R * C,
           (16 + 3) * R * C, 0);
    /* r, k, v, output (bonus_gate writes og in bf16); FFN key and value
     * below. Past layer 0 r, k_pre and v_pre are rkv_only: their GEMMs write
     * them bf16 in place. */
    if (layer > 0) {
        gemm_c16(l, "GEMM C x C (r, k, v, output)", 3, R, C, C);
    } else {
        gemm(l, "GEMM C x C (r, k, v, output)", 3, R, C, C, 1);
    }
    gemm_accumulate(l, "GEMM C x C (r, k, v, output)", 1, R, C, C);
    for (int i = 0; i < loras; i++) {
        /* every hidden is GEMM-only (backend.h gemm_only): the down GEMM
         * writes it in bf16 in place; tanh after w1, sigmoid after g1 run
         * on it in place, bf16 in and out (2 + 2 bytes an element) */
        gemm_c16(l, "GEMM LoRA down (C -> rank), bf16 C", 1, R, ranks[i], C);
        /* w_raw and a are stored bf16 in training (forward.c: gemm_only
         * with kk's wkv_only): the up GEMM writes them in bf16 in place,
         * bias_act runs on them so */
        /* nu likewise (rkv_only, past layer 0), its sigmoid in place; g
         * too (rkv_only, past layer 0: the fused groupnorm and its backward
         * its only readers) */
        /* w: w0 added in the GEMM's epilogue (cuBLASLt, the bias read once
         * in bf16: 2 C bytes), no bias_act pass over w_raw */
        if (i == 0)
            add(l, "GEMM LoRA up (w: rank -> C, + w0 epilogue), bf16 C", 1,
                2.0 * R * ranks[i] + 2.0 * C * ranks[i] + 2.0 * R * C + 2.0 * C,
                2.0 * R * C * ranks[i], 1);
        else if (i == 1) gemm_c16(l, "GEMM LoRA up (a: rank -> C), bf16 C", 1, R, C, ranks[i]);
        else if (i == 3) gemm_c16(l, "GEMM LoRA up (v: rank -> C), bf16 C", 1, R, C, ranks[i]);
        else if (layer > 0) gemm_c16(l, "GEMM LoRA up (g: rank -> C), bf16 C", 1, R, C, ranks[i]);
        else gemm(l, "GEMM LoRA up (rank -> C)", 1, R, C, ranks[i], 1);
        if (i == 0 || i == 2) {
            ew(l, "bias_act (LoRA hidden, bf16 in place)", 1, R, ranks[i], 1, 0, 4);
        }
    }
    /* layer 0: v from v_pre (no value_residual_from there), then v_first */
    /* (past layer 0 v written bf16 in place: rkv_only); nu's sigmoid (v0)
     * in the same pass, nu read as its pre-activation and written back
     * (bf16 in place): no bias_act pass over it */
    if (layer == 0) ew(l, "copy (v_first)", 2, R, C, 2, 0, 0);
    else ew(l, "value_residual (v_pre nu v bf16, + nu's v0 sigmoid)", 1, R, C,
            1 + 4 * rkv_io(layer), 1, 7);
    /* kk is WKV7-only (backend.h wkv_only): written in bf16 in place; a
     * read as its pre-activation and written back after its sigmoid (a0),
     * bf16 in place; k_pre read, k written (bf16 past layer 0) */
    ew(l, "key_prepare (kk bf16, a bf16 + a0 sigmoid, k_pre k bf16)", 1, R, C,
       2 * rkv_io(layer) + BF16_OUT + BF16_OUT + BF16_OUT, 3, 10);
    /* From T 64 on the chunked forward on bf16 wmma (BF16 math), fp32 I/O
     * but kk, w_raw, a and y (bf16 in place), and r, k, v past layer 0 */
    add_wkv_chunk_mma(l, "wkv7_forward_train (chunked, bf16 wmma, r k v kk w_raw a y bf16)",
                      (6.5 * 4 - 2 - 2 - 2 - 3 * 4 * (1 - rkv_io(layer))) * R * C +
                          2 * S * state + R / 16 * state,
                      WKV_CHUNK_MMA_CORE_FLOPS_PER_ELEM * R * C * N,
                      WKV_CHUNK_MMA_TC_FLOPS_PER_ELEM * R * C * N);
    /* groupnorm_bonus_gate: y, r, k, v, g read once (r, k, v, g bf16 past
     * layer 0), og written in bf16 only (in place, gemm_only: the output
     * GEMM and its weight gradient read it), mean/rstd [R,H]; the groupnorm
     * output stays in registers */
    add(l, "groupnorm_bonus_gate (og bf16 in place)", 1,
        4.0 * C * (R * (GN_Y_IO + 4 * rkv_io(layer) + BF16_OUT) + 3) + 8.0 * R * H,
        14.0 * R * C, 0);
    /* the key GEMM writes k in bf16 in place (gemm_only), relu^2 runs on
     * it in place, bf16 in and out; the value GEMM reads it there */
    gemm_c16(l, "GEMM FFN key (C -> F), bf16 C", 1, R, F, C);
    gemm_accumulate(l, "GEMM FFN value (F -> C)", 1, R, C, F);
    ew(l, "bias_act (relu^2, F, bf16 in place)", 1, R, F, 1, 0, 2);
}

/* shift_mix_backward of `terms` mix gradients [R,C]: the main kernel reads
 * them, x and prev and writes dx and the dmu partials of its row chunks
 * (rp_cuda_row_chunks: 64 rows each, at most 256); the finish kernel sums
 * the partials into the dmu. */
static void mix_backward(kernel_list *l, double R, double C, int terms) {
    double chunks = ceil(R / 64);
    if (chunks > 256) chunks = 256;
    if (chunks < 1) chunks = 1;
    add(l, "shift_mix_backward (dx + token shift + dmu partials)", 1,
        4.0 * C * (R * (terms + 3) + terms + terms * chunks), 6.0 * terms * R * C, 0);
    add(l, "shift_mix_backward finish (dmu sums, d state)", 1,
        4.0 * C * (terms * chunks + 2 * terms), terms * chunks * C, 0);
}

/* shift_mix_ln_backward (cuda_backward.cu; C a multiple of 128, at most
 * 2048): the mix backward of `terms` mix gradients and the backward of the
 * LayerNorm that made the mixes' x in one kernel per row chunk. It reads the
 * terms, x and prev, the norm's input, dx (+=, with its bf16 copy: the next
 * GEMM backward's dY) and writes the chunk partials of the dmu, dweight and
 * dbias; the d(LN out) [R,C] is never stored. The finish kernel sums the
 * partials in a fixed order and writes the slots' d(state). */
static int mix_ln_fused(double C) { return fmod(C, 128) == 0 && C <= 2048; }
static void mix_ln_backward(kernel_list *l, double R, double C, int terms) {
    if (!mix_ln_fused(C)) {
        mix_backward(l, R, C, terms);
        ew(l, "layernorm backward (dx + params)", 2, R, C, 4 + BF16_OUT / 2, 4, 12);
        return;
    }
    double chunks = ceil(R / 64);
    if (chunks > 256) chunks = 256;
    if (chunks < 1) chunks = 1;
    const double parts = terms + 2;
    /* xa and prev formed from x (mixes formed again): not read; the bias
     * read; the row above's x comes from L2 (the previous row's load). The
     * terms are their GEMMs' bf16 outputs in place (mix_grads16). */
    add_l2(l, "shift_mix_ln_backward (mix + shift + LN dx + partials)", 1,
           4.0 * C * (R * (terms * BF16_OUT + 3 + BF16_OUT) + terms + 2 + parts * chunks) +
               8.0 * R,
           4.0 * R * C, (6.0 * terms + 20.0) * R * C, 0);
    add(l, "shift_mix_ln_backward finish (param sums, d state)", 1,
        4.0 * C * (parts * chunks + 2 * parts), parts * chunks * C, 0);
}

/* groupnorm_bonus_gate_backward: one kernel reads d og, y, r, k, v, g and
 * mean/rstd once and writes dy, dr, dk, dv (first writes, beta 0), dg (its
 * bf16 copy alone: gemm_only, the gate LoRA's GEMMs its only readers) and
 * the r_k, ln_x weight and bias partials of its row chunks; the groupnorm
 * output and d(groupnorm out) stay in registers. The finish kernel sums the
 * three partials. */
static void gn_bonus_gate_backward(kernel_list *l, double R, double C, double H, int layer) {
    double chunks = ceil(R / 64);
    if (chunks > 256) chunks = 256;
    if (chunks < 1) chunks = 1;
    /* d og bf16 in place (the output GEMM's dX, gemm_only); dr, dk, dv and
     * r, k, v, g f32 or bf16 (rkv_io: past layer 0 dr, dk, dv are written
     * bf16 in place, backend.h drkv_only) */
    add(l, "groupnorm_bonus_gate backward (d og dy bf16, dg bf16 only, partials)", 1,
        4.0 * C * (R * (GN_Y_IO + BF16_OUT + 3 * rkv_io(layer) + 4 * rkv_io(layer) + GN_DY_IO +
                        BF16_OUT) + 3 +
                   3 * chunks) +
            8.0 * R * H,
        30.0 * R * C,
        0);
    add(l, "groupnorm_bonus_gate backward finish (ln_x, r_k sums)", 1,
        4.0 * C * (3 * chunks + 6), 3 * chunks * C, 0);
}

/* attention_tail_backward (cuda_backward.cu): the elementwise tail after
 * the WKV7 backward in one kernel per (head, row chunk). It reads dkk and
 * da (bf16 in place), k_pre, a, dk, dw_raw and, with the value residual
 * (layer > 0), dv, v_pre, v_first, nu, dv_first; layer 0 reads dv and
 * dv_first (dv += dv_first). It writes dk and dv as bf16 copies only (the
 * key and value GEMM backwards' dY), dv_first (layer > 0), d pre of a (over
 * da) and nu in bf16 only (the LoRA ups' dY; gemm_only) and the five parameter partials (k_k,
 * k_a, a0, w0, v0) of its row chunks; one finish kernel sums them. d pre
 * of w is dw_raw itself, which the WKV7 backward wrote in bf16 in place
 * (gemm_only): read as 2 bytes, not written. */
static void attention_tail_backward(kernel_list *l, double R, double C, int layer) {
    double chunks = ceil(R / 64);
    if (chunks > 256) chunks = 256;
    if (chunks < 1) chunks = 1;
    const double outs = layer > 0 ? 5 : 4;
    /* f32 vectors: dkk, a, dw_raw and da bf16 (a in place with kk and
     * w_raw; da as the WKV7 backward wrote it, rkv_only) + k_pre, dk (+ dv,
     * v_pre, v_first, nu, dv_first | dv, dv_first) read; dv_first written
     * (layer > 0), with the bf16 dk, dv (GEMM-only: the step without the W
     * pass writes no f32 of them, backward.c dkv_gemm_only), d pre of a
     * (over da) (+ nu) */
    /* past layer 0 k_pre, v_pre and nu bf16 in place (rkv_only), dk and dv
     * read and written bf16 in place (drkv_only) */
    const double io = layer > 0 ? 4 * BF16_OUT + 2 + 2 * rkv_io(layer) + 3 * rkv_io(layer) + 1 +
                                      4 * BF16_OUT
                                : 4 * BF16_OUT + 4 + 3 * BF16_OUT;
    add(l, "attention_tail backward (key prepare + a/w/v0 bias + value residual)", 1,
        4.0 * C * (R * io + 2 + 5 * chunks), (layer > 0 ? 25.0 : 17.0) * R * C, 0);
    add(l, "attention_tail backward finish (k_k, k_a, a0, w0, v0 sums)", 1,
        4.0 * C * (outs * chunks + 2 * outs), outs * chunks * C, 0);
}

/* Its backward: each GEMM two GEMMs, each elementwise op reading its inputs
 * and the output gradient and accumulating the input gradients (about twice
 * the forward's traffic), parameter gradients reduced over rows. */
static void layer_backward(kernel_list *l, const rp_config *c, int layer, double R, double S) {
    const double C = c->n_embd, F = c->dim_ffn, N = c->head_size, H = c->n_head;
    const double ranks[4] = {c->d_decay, c->d_iclr, c->d_gate, c->d_value};
    const int loras = layer == 0 ? 3 : 4;
    const double state = 4.0 * H * N * N;
    /* The six time-mix mixes formed again, bf16 in place, the GEMM
     * backwards' X: from ln1's input x, mean and rstd (ln_mix_again; the
     * row above's x from L2) where the fused mix + LN backward takes C, else
     * from the saved xa and prev (shift_mix). */
    if (mix_ln_fused(C))
        add_l2(l, "ln_mix_again (backward: the 6 mixes again, bf16)", 1,
               4.0 * C * (R * (1 + 6 * BF16_OUT) + 2 + 6) + 16.0 * R, 4.0 * R * C,
               (8 + 3 * 6) * R * C, 0);
    else
        ew(l, "shift_mix (backward: the 6 mixes again, bf16)", 1, R, C, 2 + 6 * BF16_OUT, 6,
           3 * 6);
    /* each mix backward (the time mix's 6 or 7 uses, the channel mix's 1)
     * with its LayerNorm's backward (ln1, ln2) in one shift_mix_ln_backward;
     * unfused (C not a multiple of 128 or above 2048) shift_mix_backward
     * writes d(LN out) with the token shift folded in and the layernorm
     * backward's dx kernel (writing dx in bf16 too: the dY of the FFN value
     * and output GEMM backwards) and params kernel read it */
    mix_ln_backward(l, R, C, 6 + (layer > 0));
    mix_ln_backward(l, R, C, 1);
    /* output: dy in bf16 from layernorm backward, the saved og bf16 in place;
     * value, key, receptance: dv, dk, dr with the bf16 copy that
     * attention_tail_backward (layer 0's dv too) and the WKV7 backward
     * write in the same pass (the receptance GEMM runs right after the WKV7
     * backward); their mix in bf16 in place (shift_mix) */
    /* The d mixes of receptance, key and value (and of the LoRA downs
     * below) are each one shift_mix_ln_backward term only, written by their
     * dX GEMM in bf16 in place (backward.c MIX_DX16, lora_backward's dx16)
     * where that op forms the mixes again; the output GEMM's dX (d og) is
     * bf16 in place too (gemm_only: the fused groupnorm backward alone reads
     * it) */
    const int mix_dx16 = mix_ln_fused(C) ? 2 : 1;
    gemm_backward(l, "GEMM backward C x C", 1, R, C, C, 1, 2);
    gemm_backward(l, "GEMM backward C x C", 3, R, C, C, 1, mix_dx16);
    for (int i = 0; i < loras; i++) {
        /* up: dy in bf16 from bias_act backward (w, a, v) or bonus_gate
         * backward (g), the saved hidden bf16 in place; every d hidden is
         * GEMM-only (gemm_only): its dX GEMM writes it in bf16 in place;
         * down: d hidden read there (after the activation backward in
         * place for w, g), the mix still valid */
        gemm_backward(l, "GEMM backward LoRA", 1, R, C, ranks[i], 1, 2);
        gemm_backward(l, "GEMM backward LoRA", 1, R, ranks[i], C, 1, mix_dx16);
        if (i == 0 || i == 2) {
            /* d hidden bf16 in and out in place, y read in bf16 */
            ew(l, "bias_act backward (LoRA hidden, bf16 in place)", 1, R, ranks[i],
               3 * BF16_OUT, 0, 4);
        }
    }
    /* key prepare, w0 (no activation), a0 and v0 (sigmoid) d pre and bias
     * gradients, the value residual (layer 0: dv += dv_first): one pass */
    attention_tail_backward(l, R, C, layer);
    /* dr, dk, dv accumulate (beta 1): read and written; from T 64 on the
     * chunked backward on bf16 wmma (BF16 math), fp32 I/O but kk, w_raw
     * and a read and dkk, dw_raw and da written in bf16 in place (wkv_only:
     * the tail alone reads dkk; gemm_only: the tail's w0 bias sums and the w
     * LoRA's GEMMs alone read dw_raw; rkv_only: the tail alone reads da):
     * six tensors 2 bytes an element; dr (gemm_only: the receptance GEMM
     * backward right after is its one reader) read as f32 but written as
     * its bf16 copy alone, the GEMM's dY; past layer 0 dr, dk, dv read and
     * written bf16 in place (drkv_only: the groupnorm backward wrote them
     * so, the tail and the GEMMs read them so) */
    add_wkv_chunk_mma(l, "wkv7_backward (chunked, bf16 wmma, r k v kk w_raw a dkk dw_raw da dy bf16, dr bf16 out)",
                      (16.0 * 4 - 3 * 2 - 2 - 2 - 2 - 4 - 4 * (1 - GN_DY_IO) -
                       3 * 4 * (1 - rkv_io(layer)) - 5 * 4 * (1 - rkv_io(layer))) * R * C +
                          2.0 * R * C + 2 * S * state + R / 16 * state,
                      WKV_CHUNK_BWD_MMA_CORE_FLOPS_PER_ELEM * R * C * N,
                      WKV_CHUNK_BWD_MMA_TC_FLOPS_PER_ELEM * R * C * N);
    gn_bonus_gate_backward(l, R, C, H, layer);
    /* key: d hidden bf16 in place (below), the saved kf bf16 in place
     * since shift_mix; value: dy's bf16 copy from the layer above's (or the
     * head's) LayerNorm backward, the saved relu^2 hidden bf16 in place
     * (gemm_only), its dX (d hidden, GEMM-only) written bf16 in place;
     * the key's dX (the channel mix's d mix) bf16 in place as the time
     * mix's (mix_dx16) */
    gemm_backward(l, "GEMM backward FFN", 1, R, F, C, 1, mix_dx16);
    gemm_backward(l, "GEMM backward FFN", 1, R, C, F, 1, 2);
    /* d hidden bf16 in and out in place, y read in bf16 */
    ew(l, "bias_act backward (relu^2, F, bf16 in place)", 1, R, F, 3 * BF16_OUT, 0, 3);
    /* First gradient writes take beta 0 (no fill_zero) and wkv7_backward
     * adds onto bonus_gate's dr, dk, dv (beta 1); layer 0's d v_first is
     * added in attention_tail_backward. */
}

static double sum(const kernel_list *l, int field) {
    double s = 0;
    for (int i = 0; i < l->n; i++) {
        const kernel *k = &l->k[i];
        s += field == 0 ? k->launches
             : field == 1 ? k->bytes
             : field == 2 ? k->flops
             : field == 3 ? k->t_bound
             : field == 4 ? k->t_plain
             : field == 5 ? k->t_graph
                          : k->t_pdl;
    }
    return s;
}

/* decode: with the graph + PDL column. */
static void print_table(FILE *out, const kernel_list *l, double per, int decode) {
    fprintf(out, "| kernel | launches | MB moved | GFLOP | bound us | us (no graph) | us (graph) |%s\n"
                 "| --- | ---: | ---: | ---: | ---: | ---: | ---: |%s\n",
            decode ? " us (graph + PDL) |" : "", decode ? " ---: |" : "");
    for (int i = 0; i < l->n; i++) {
        const kernel *k = &l->k[i];
        fprintf(out, "| %s | %.0f | %.3f | %.3f | %.2f | %.2f | %.2f |", k->name,
                k->launches / per, k->bytes / per / 1e6, k->flops / per / 1e9,
                k->t_bound / per * 1e6, k->t_plain / per * 1e6, k->t_graph / per * 1e6);
        if (decode) fprintf(out, " %.2f |", k->t_pdl / per * 1e6);
        fprintf(out, "\n");
    }
    fprintf(out, "| **total** | %.0f | %.3f | %.3f | %.2f | %.2f | %.2f |", sum(l, 0) / per,
            sum(l, 1) / per / 1e6, sum(l, 2) / per / 1e9, sum(l, 3) / per * 1e6,
            sum(l, 4) / per * 1e6, sum(l, 5) / per * 1e6);
    if (decode) fprintf(out, " %.2f |", sum(l, 6) / per * 1e6);
    fprintf(out, "\n\n");
}

/* A decode step of G sequences (rp_model_step). Besides the kernels it has
 * one copy: the step inputs (tokens, batch arrays: 5 x 64 ints from the fixed
 * pinned buffer, cuda/cuda_graph.cu); the head reads the rows in place (row s
 * is sequence s: no gather). Replayed as one CUDA graph, each is a node. The
 * GEMVs read W once per step for all G rows (cuda_decode.cu). */
static void decode_step(kernel_list *l, const rp_config *c, double G) {
    const double C = c->n_embd, V = c->vocab_size;
    memset(l, 0, sizeof *l);
    add(l, "step inputs (pinned -> device copy)", 1, 5 * 64 * 4.0, 0, 0);
    add(l, "embedding", 1, 8.0 * G * C, 0, 0); /* after the copy: no PDL edge */
    /* ln0 after the embedding and ln_out after the FFN value GEMV, which
     * trigger; the head GEMV after ln_out, which triggers (PDL at decode
     * rows since issue 15) */
    l->pdl_edge = 1;
    ew(l, "layernorm", 2, G, C, 2, 2, 8); /* ln0, ln_out */
    for (int layer = 0; layer < c->n_layer; layer++) layer_forward(l, c, layer, G, G, 1);
    l->pdl_edge = 1;
    gemv(l, "GEMV head (C -> V)", 1, G, V, C, 0);
    l->pdl_edge = 0;
}

static void train_step(kernel_list *l, const rp_config *c, double R, double S) {
    const double C = c->n_embd, V = c->vocab_size;
    memset(l, 0, sizeof *l);
    /* forward: the table's rows read, x written; backward: dx read, the
     * table gradient's rows read and written (emulator-measured,
     * tests/cuda_emu/test_model_bytes.c) */
    add(l, "embedding (+ backward)", 1, 2 * 4.0 * R * C, 0, 0);
    add(l, "embedding (+ backward)", 1, 3 * 4.0 * R * C, 0, 0);
    /* ln0: x read, y written with its bf16 copy (rp_cuda_act16_for_rows) */
    ew(l, "layernorm", 1, R, C, 2 + BF16_OUT, 2, 8);
    for (int layer = 0; layer < c->n_layer; layer++) layer_forward(l, c, layer, R, S, 0);
    /* ln_out: its output is GEMM-only (gemm_only), written in bf16 only */
    ew(l, "layernorm (head input, bf16 out)", 1, R, C, 1 + BF16_OUT, 2, 8);
    /* The fused head (head_cross_entropy), per row chunk of the CUDA
     * backend's budget (RP_HEAD_CE_CHUNK_FLOATS_CUDA: 4096 rows at V =
     * 65536): the GEMM writes the chunk's logits in bf16 in place (backend.h
     * head_logits16), one loss kernel (softmax statistics, arg-max and
     * L2Wrap in one pass over the bf16 logits, a second pass writing the
     * bf16 gradient over them: the operand of the two backward GEMMs, no
     * conversion; the second read of a 128 KiB row is taken from L2, as
     * before), the two backward GEMMs, whose dW += reads and writes the fp32
     * [V, C] gradient once per chunk. The logits never exist as [R, V]; each
     * chunk still goes through HBM. */
    const int chunk = rp_head_ce_chunk_rows_budget((int)R, (int)V, RP_HEAD_CE_CHUNK_FLOATS_CUDA);
    const double chunks = (double)(((long long)R + chunk - 1) / chunk), Rc = R / chunks;
    gemm_c16(l, "GEMM head (C -> V, per row chunk, bf16 logits)", chunks, Rc, V, C);
    add(l, "head_cross_entropy loss kernel (bf16 logits in, + l2wrap, bf16 dlogits)", chunks,
        4.0 * Rc * V, 5.0 * Rc * V, 0);
    gemm_backward(l, "GEMM backward head", chunks, Rc, V, C, 1, 1);
    /* rp_backward_head: x_final, the head layernorm backward's input */
    ew(l, "copy (x_final for the head)", 1, R, C, 2, 0, 0);
    add(l, "fill_zero (d v_first, once)", 1, 4.0 * R * C, 0, 0);
    /* the state gradient of every sequence (model/backward.c dstate) */
    add(l, "fill_zero (d state, once)", 1,
        S * c->n_layer * (4.0 * c->n_head * c->head_size * c->head_size + 2 * 4.0 * C), 0, 0);
    for (int layer = c->n_layer - 1; layer >= 0; layer--) layer_backward(l, c, layer, R, S);
    /* ln_out and ln0: the dx kernel reads dy, x, mean/rstd and writes dx
     * with its bf16 copy; the params kernel reads dy, x, mean/rstd and
     * writes its row chunks' partials; sum_partials adds them onto the
     * weight and bias gradients (measured, test_model_bytes.c) */
    const double ln_chunks = fmin(fmax(ceil(R / 64), 1), 256);
    add(l, "layernorm backward (dx + params)", 2, 4.0 * C * (R * (3 + BF16_OUT) + 1) + 8.0 * R,
        8.0 * R * C, 0);
    add(l, "layernorm backward (dx + params)", 2, 4.0 * C * (2 * R + 2 * ln_chunks) + 8.0 * R,
        4.0 * R * C, 0);
    add(l, "layernorm backward finish (param sums)", 2 * 2, 4.0 * C * (ln_chunks + 2),
        ln_chunks * C, 0);
    const double params = (double)rp_config_param_count(c);
    /* AdamW: w, g, m, v read; w, m, v and the bf16 copy written. */
    /* adamw_multi: one launch per buffer (a layer's TENSORS_PER_LAYER tensors,
     * the embed part's, the head part's; all within RP_ADAMW_MULTI_MAX) */
    const double adamw_launches = c->n_layer + 2.0;
    add(l, "adamw (multi-tensor, a launch per layer / embed / head)", adamw_launches,
        30.0 * params / adamw_launches, 12.0 * params / adamw_launches, 0);
}

int gpu_model_train_rows(const rp_config *c, int R, int S, gpu_model_row *rows, int max_rows) {
    kernel_list l;
    train_step(&l, c, R, S);
    for (int i = 0; i < l.n && i < max_rows; i++) {
        rows[i].name = l.k[i].name;
        rows[i].launches = l.k[i].launches;
        rows[i].bytes = l.k[i].bytes;
    }
    return l.n;
}

/* ---- WKV7 alone: a wave model ----
 * The recurrence is serial in T, so a WKV7 kernel's time is T times the time
 * of one token on the busiest SM. One block per (sequence, head) (128
 * threads, 4 warps), or `split` blocks of 4 / split warps each owning 64 /
 * split of the head's value rows; an SM holds `slots` blocks at once
 * (registers and shared memory from `ptxas -v`, docs/gpu.md) and runs
 * ceil(blocks / SMs) of them in groups of `slots`. A token of a group of b
 * blocks costs max(latency, b * warps * instructions per thread / 4 schedulers) cycles:
 * the issue rate when enough warps are resident, the dependent chain (syncs,
 * shuffles, shared-memory round trips) when not. Instructions per thread per
 * token = 32 state elements x FLOPs per element / 2 (FMAs) x 1.3 (shared
 * loads, shuffles, addressing). The latencies are assumptions to calibrate
 * with the first GPU run (bench_gpu's wkv7 rows). */
#define SM_COUNT 132
#define SM_CLOCK_HZ 1.755e9
#define WKV_LAT_FWD_CYCLES 400.0
#define WKV_LAT_BWD_CYCLES 1200.0

typedef struct {
    const char *name;
    double flops_per_elem; /* per state element per token */
    int slots;             /* blocks per SM */
    double latency;        /* cycles per token, the dependent chain */
    double io_units;       /* [R,C] tensors read and written (inputs, y, gradients) */
    double io_bytes;       /* their element size: 4 (fp32 I/O) or 2 (bf16 I/O) */
    double extra_instr;    /* per thread per token beyond the 1.3 factor */
    int split;             /* blocks per (sequence, head); 0 is 1 */
    double partial_units;  /* fp32 [R,C] partial sums written + read per block of a head */
    double tc_flops_per_elem; /* on tensor cores (bf16 wmma), not in the issue count */
} wkv_kernel;

static int wkv_split(const wkv_kernel *k) { return k->split > 0 ? k->split : 1; }

/* The checkpoints: fp32 [64,64] per head every 16 tokens = N/16 = 4 [R,C]
 * fp32 units, written by the forward and read by the backward. */
#define WKV_CKPT_UNITS 4.0

static double wkv_kernel_bytes(const wkv_kernel *k, double R, double C) {
    return (k->io_units * k->io_bytes + WKV_CKPT_UNITS * 4.0 +
            k->partial_units * wkv_split(k) * 4.0) * R * C;
}

/* heads: (sequence, head) pairs; each runs as split blocks. */
static double wkv_kernel_seconds(const wkv_kernel *k, double heads, double T) {
    const double warps = 4.0 / wkv_split(k);
    const double per_sm = ceil(heads * wkv_split(k) / SM_COUNT);
    const double instr = 32.0 * k->flops_per_elem / 2.0 * 1.3 + k->extra_instr;
    double cycles = 0.0;
    for (double left = per_sm; left > 0; left -= k->slots) {
        const double b = left < k->slots ? left : k->slots;
        const double issue = b * warps * instr / 4.0;
        cycles += issue > k->latency ? issue : k->latency;
    }
    return cycles * T / SM_CLOCK_HZ;
}

static const wkv_kernel wkv_fwd_kernel = {"wkv7_forward_train per token (72 regs, 19 KB smem)",
                                          WKV_FLOPS_PER_ELEM, 7, WKV_LAT_FWD_CYCLES, 6 + 1, 4,
                                          0, 1, 0, 0};
/* The same with a head's rows over 2 blocks of 64 threads (67 registers,
 * 11 KB: 14 blocks an SM) or 4 of 32 (72 registers, 7 KB: 28): the same
 * work per thread and token, no partial sums (each block owns whole rows);
 * what grows is the shared vectors' reads (each block reads all 64
 * channels; L2 serves the repeats: not counted). */
static const wkv_kernel wkv_fwd2_kernel = {
    "wkv7_forward_train per token, rows over 2 blocks (67 regs, 11 KB smem)", WKV_FLOPS_PER_ELEM,
    14, WKV_LAT_FWD_CYCLES, 6 + 1, 4, 0, 2, 0, 0};
static const wkv_kernel wkv_fwd4_kernel = {
    "wkv7_forward_train per token, rows over 4 blocks (72 regs, 7 KB smem)", WKV_FLOPS_PER_ELEM,
    28, WKV_LAT_FWD_CYCLES, 6 + 1, 4, 0, 4, 0, 0};
/* The chunked forward (fla's form, 16-token chunks, FMA loops; 128 regs,
 * 45 KB smem, 4 blocks/SM), used from T >= 64 in fp32 math. Per chunk a
 * thread issues ~2900 instructions: S0 at and S0 rt (2 x 512), the state
 * update (1024), its share of the four L x L products (~300 unmasked), sa/y
 * substitution (~512), loads and the decay scan; ~180 per token, x 1.3 = as
 * 11.3 FLOPs per element. Its chain per chunk (5 barriers, one load burst,
 * the 16-step scan and substitution) is taken as ~250 cycles a token. */
#define WKV_LAT_CHUNK_CYCLES 250.0
static const wkv_kernel wkv_chunk_kernel = {
    "wkv7_forward_train chunked, FMA (128 regs, 45 KB smem)", WKV_CHUNK_FLOPS_PER_ELEM, 4,
    WKV_LAT_CHUNK_CYCLES, 6 + 1, 4, 0, 1, 0, 0};
/* The same chunk form in BF16 math (wkv7_chunk_forward_mma_kernel, built:
 * 128 regs, 47360 B smem, 4 blocks/SM): its tile products on bf16 wmma
 * (16x16x16). Per chunk and head, dense on tensor cores: the four L x L
 * products 4 x 2 x 16 x 16 x 64, S0 at^T and S0 rt^T 2 x 2 x 64 x 16 x 64,
 * the state update 2 x 2 x 64 x 64 x 16 = 655360 FLOPs = 10 per state element
 * per token (the masked halves of the L x L products included). Left on
 * CUDA cores per thread per chunk: the substitution for sa and y's in-chunk
 * sums (512 FMAs, both threads of a row pair), the decay scan and bf16
 * staging, S0 to bf16 and back through the state tile, the g_L scaling
 * (~900 instructions: as 11.3 x 900 / 2900 FLOPs per element on the
 * FMA-path scale). Same chain as the FMA form (two more barriers a chunk).
 * I/O: the six inputs' bf16 copies, y fp32 (group norm reads it) = 2 units. */
static const wkv_kernel wkv_chunk_mma_kernel = {
    "wkv7_forward_train chunked, bf16 math, tile products on bf16 wmma (128 regs, 46 KB smem)",
    WKV_CHUNK_MMA_CORE_FLOPS_PER_ELEM, 4, WKV_LAT_CHUNK_CYCLES, 6 + 2, 2, 0, 1, 0,
    WKV_CHUNK_MMA_TC_FLOPS_PER_ELEM};
/* The same kernel on fp32 inputs and y (TI = TO = float): what the model in
 * BF16 math runs today (the six bf16 input copies never all exist,
 * docs/gpu.md "bf16 I/O") and bench_gpu's fp32-I/O wkv7 rows time. */
static const wkv_kernel wkv_chunk_mma32_kernel = {
    "wkv7_forward_train chunked, bf16 math, fp32 I/O (what BF16 math runs; 128 regs, 46 KB smem)",
    WKV_CHUNK_MMA_CORE_FLOPS_PER_ELEM, 4, WKV_LAT_CHUNK_CYCLES, 6 + 1, 4, 0, 1, 0,
    WKV_CHUNK_MMA_TC_FLOPS_PER_ELEM};
/* 128 registers (4 blocks/SM): the state column lives in shared memory,
 * 3 scalar accesses per element per token (32 per thread) more than with
 * it in registers; dr, dk, dv accumulate (beta 1): read and written. */
static const wkv_kernel wkv_bwd_kernel = {
    "wkv7_backward, step-back, beta 1 (128 regs, 41 KB smem)",
    WKV_BACKWARD_OVER_FORWARD * WKV_FLOPS_PER_ELEM, 4, WKV_LAT_BWD_CYCLES,
    1 + 6 + 6 + 3, 4, 3 * 32, 1, 0, 0};
/* The chunked backward in BF16 math (wkv7_chunk_backward_mma_kernel: 141
 * registers, 97.5 KB of dynamic shared memory, 2 blocks an SM), beta 1, fp32
 * I/O. Its chain per chunk: the substitution (240 dependent FMAs) and the
 * back substitution (120), the chain's scan over 16 tokens, 6 barriers and
 * the mma phases (up to 28 dependent wmma a warp), the staging's global
 * loads: ~5000 cycles, taken as 320 a token (a guess, as the others). */
#define WKV_LAT_CHUNK_BWD_CYCLES 320.0
static const wkv_kernel wkv_bwd_mma_kernel = {
    "wkv7_backward chunked, bf16 math, tile products on bf16 wmma, beta 1 (141 regs, 95 KiB smem)",
    WKV_CHUNK_BWD_MMA_CORE_FLOPS_PER_ELEM, 2, WKV_LAT_CHUNK_BWD_CYCLES, 1 + 6 + 6 + 3, 4, 0, 1,
    0, WKV_CHUNK_BWD_MMA_TC_FLOPS_PER_ELEM};
/* Not built: the backward with a head's rows over 2 blocks of 64 threads
 * (at 128 registers: 8 blocks an SM). The column sums dr, dk, db, dd, da run
 * over all 64 rows, so each block writes its 5 partial [R,C] sums and a
 * combining pass reads them back in split order (10 units per block). */
static const wkv_kernel wkv_bwd2_kernel = {
    "wkv7_backward, rows over 2 blocks + partial sums through HBM (not built)",
    WKV_BACKWARD_OVER_FORWARD * WKV_FLOPS_PER_ELEM, 8, WKV_LAT_BWD_CYCLES, 1 + 6 + 6 + 3, 4,
    3 * 32, 2, 10, 0};
/* bf16 I/O (the official kernel's dtypes, beta 0): the same code on half the
 * bytes; bf16 gradients need 168 registers (3 blocks/SM, ptxas). */
static const wkv_kernel wkv_fwd16_kernel = {
    "wkv7_forward_train chunked, bf16 I/O (128 regs, 45 KB smem)", WKV_CHUNK_FLOPS_PER_ELEM, 4,
    WKV_LAT_CHUNK_CYCLES, 6 + 1, 2, 0, 1, 0, 0};
static const wkv_kernel wkv_bwd16_kernel = {
    "wkv7_backward, bf16 I/O (168 regs, 41 KB smem)",
    WKV_BACKWARD_OVER_FORWARD * WKV_FLOPS_PER_ELEM, 3, WKV_LAT_BWD_CYCLES, 1 + 6 + 6, 2, 3 * 32,
    1, 0, 0};

/* The per-token forward's row split for a grid of `heads` (sequence, head)
 * pairs: cuda_wkv7.cu's wkv_rows_split, the same rule. No split below 2 heads
 * on the busiest SM (one head's issue, ~208 cycles a token, is about half
 * the latency); else the split with the least load on the busiest SM,
 * ties keeping fewer blocks. */
static int wkv_rows_split(double heads) {
    const double load1 = ceil(heads / SM_COUNT);
    if (load1 < 2) return 1;
    int best = 1;
    double best_load = load1;
    for (int split = 2; split <= 4; split *= 2) {
        const double load = ceil(heads * split / SM_COUNT) / split;
        if (load < best_load) {
            best = split;
            best_load = load;
        }
    }
    return best;
}

static const wkv_kernel *wkv_token_for(double heads) {
    const int split = wkv_rows_split(heads);
    return split == 4 ? &wkv_fwd4_kernel : split == 2 ? &wkv_fwd2_kernel : &wkv_fwd_kernel;
}

/* The forward kernel a call of length T runs in BF16 math (bench_gpu's
 * backend; cuda_wkv7.cu's threshold), fp32 I/O. */
static const wkv_kernel *wkv_forward_for(double T, double heads) {
    return T >= 64 ? &wkv_chunk_mma32_kernel : wkv_token_for(heads);
}

void gpu_model_wkv7(int B, int T, int C, double *fwd_s, double *bwd_s) {
    const double heads = (double)B * (C / 64);
    *fwd_s = wkv_kernel_seconds(wkv_forward_for(T, heads), heads, T);
    *bwd_s = wkv_kernel_seconds(T >= 64 ? &wkv_bwd_mma_kernel : &wkv_bwd_kernel, heads, T);
}

/* The per-token forward at T 4096 over grids of B x 64 heads (and two
 * grids just past one and two heads per SM): each split's predicted time
 * and the one wkv_rows_split picks. */
static void wkv_split_section(FILE *out) {
    static const double grids[] = {64, 128, 140, 192, 256, 320, 512, 1024};
    const double T = 4096;
    fprintf(out, "## WKV7 per-token forward: rows split over blocks, by grid\n\n"
                 "T=%.0f, %d SMs; predicted ms for each split (wave model) and the split "
                 "wkv_rows_split picks (cuda_wkv7.cu; the model uses the same rule).\n\n"
                 "| (sequence, head) blocks | heads per SM (busiest) | 1 block/head ms | "
                 "2 blocks/head ms | 4 blocks/head ms | picked |\n"
                 "| ---: | ---: | ---: | ---: | ---: | ---: |\n",
            T, SM_COUNT);
    for (size_t g = 0; g < sizeof grids / sizeof grids[0]; g++) {
        const double heads = grids[g];
        fprintf(out, "| %.0f | %.0f | %.2f | %.2f | %.2f | %d |\n", heads,
                ceil(heads / SM_COUNT), wkv_kernel_seconds(&wkv_fwd_kernel, heads, T) * 1e3,
                wkv_kernel_seconds(&wkv_fwd2_kernel, heads, T) * 1e3,
                wkv_kernel_seconds(&wkv_fwd4_kernel, heads, T) * 1e3, wkv_rows_split(heads));
    }
    fprintf(out, "\n");
}

static void wkv_section(FILE *out) {
    /* The official kernel's benchmark shape (RWKV-7 training kernels are
     * timed at batch 8, T 4096, model width 4096, head 64). */
    const double B = 8, T = 4096, C = 4096, N = 64, H = C / N, R = B * T;
    const double elems = R * C * N; /* state elements x tokens */
    const wkv_kernel ks[] = {
        wkv_chunk_kernel,
        wkv_bwd_kernel,
        wkv_fwd16_kernel,
        wkv_bwd16_kernel,
        wkv_fwd_kernel,
        wkv_chunk_mma_kernel,
        {"wkv7_backward, before: 2.5x recompute (166 regs, 70 KB smem)", 45.0, 3,
         WKV_LAT_BWD_CYCLES, 1 + 6 + 6, 4, 0, 1, 0, 0},
        wkv_fwd2_kernel,
        wkv_fwd4_kernel,
        wkv_bwd2_kernel,
        wkv_chunk_mma32_kernel,
        wkv_bwd_mma_kernel,
    };
    fprintf(out, "## WKV7 forward + backward at the official benchmark shape\n\n"
                 "B=%.0f T=%.0f C=%.0f H=%.0f (head %.0f), fp32 I/O unless marked bf16; %.0f blocks on %d SMs at "
                 "%.2f GHz. Wave model (gpu_model.c): per token max(latency, issue) on the "
                 "busiest SM.\n\n"
                 "| kernel | GB moved | GFLOP | blocks/SM | roofline ms | predicted ms |\n"
                 "| --- | ---: | ---: | ---: | ---: | ---: |\n",
            B, T, C, H, N, B * H, SM_COUNT, SM_CLOCK_HZ / 1e9);
    double t_new = 0.0, t_16 = 0.0, t_token = 0.0, t_old = 0.0, t_mma = 0.0;
    for (size_t i = 0; i < sizeof ks / sizeof ks[0]; i++) {
        const wkv_kernel *k = &ks[i];
        const double bytes = wkv_kernel_bytes(k, R, C);
        const double flops = (k->flops_per_elem + k->tc_flops_per_elem) * elems;
        const double t_mem = bytes / HBM_BYTES_PER_S;
        const double t_math = k->flops_per_elem * elems / FP32_FLOPS +
                              k->tc_flops_per_elem * elems / BF16_TENSOR_FLOPS;
        /* No kernel beats its HBM traffic (the mma row's issue time would). */
        double t = wkv_kernel_seconds(k, B * H, T);
        if (t < t_mem) t = t_mem;
        if (i == 0 || i == 1) t_new += t;
        if (i == 2 || i == 3) t_16 += t;
        if (i == 4 || i == 1) t_token += t;
        if (i == 4 || i == 6) t_old += t;
        if (i == 10 || i == 11) t_mma += t;
        fprintf(out, "| %s | %.2f | %.0f | %d | %.2f | %.2f |\n", k->name, bytes / 1e9,
                flops / 1e9, k->slots, (t_mem > t_math ? t_mem : t_math) * 1e3, t * 1e3);
    }
    fprintf(out, "\nPredicted fwd+bwd: %.1f ms with fp32 I/O, %.1f ms with bf16 I/O (the "
                 "official kernel's dtypes; with the per-token forward: %.1f ms; "
                 "before the step-back backward: %.1f ms); in BF16 math (both on bf16 wmma, "
                 "fp32 I/O): %.1f ms. "
                 "The official kernel (bf16 I/O) was estimated at ~7 ms on an H100 at this shape "
                 "(issue 15, not measured here); bench_gpu's wkv7 rows time this project's "
                 "kernels at the same shape.\n\n",
            t_new * 1e3, t_16 * 1e3, t_token * 1e3, t_old * 1e3, t_mma * 1e3);
}

int gpu_model_print(FILE *out) {
    static const char *shapes[] = {"0.1b", "0.4b", "1.5b"};
    fprintf(out,
            "# Analytic H100 model of the CUDA backend (bench_gpu --model-only)\n\n"
            "H100 SXM: %.2f TB/s HBM, %.0f TFLOP/s dense bf16 (tensor cores), %.0f TFLOP/s "
            "fp32; %.0f us per launch without CUDA graphs, %.0f us per node of a replayed "
            "graph. Each launch (or node) costs max(bytes / bandwidth, FLOPs / peak, "
            "launch). Shapes from rp_config_builtin; the op sequence of rp_block_forward, "
            "one kernel per backend op. A decode step of up to 64 sequences runs as one "
            "CUDA graph (cuda/cuda_graph.cu: warm-up, capture, then replays): its time is "
            "one cudaGraphLaunch (%.0f us) plus its nodes; the no-graph column is the "
            "same step op by op (larger batches, the first two steps of a batch size). "
            "Graph + PDL: the decode GEMVs and time_mix_heads launched with programmatic "
            "dependent launch; a node that a triggering kernel precedes costs max(bound, "
            "%.1f us) (an assumption, bench/gpu_model.c PDL_NODE_S), the others as in the "
            "graph.\n\n",
            HBM_BYTES_PER_S / 1e12, BF16_TENSOR_FLOPS / 1e12, FP32_FLOPS / 1e12,
            LAUNCH_S * 1e6, GRAPH_LAUNCH_S * 1e6, LAUNCH_S * 1e6, PDL_NODE_S * 1e6);
    static kernel_list l;
    fprintf(out, "## Decode, batch 1: predicted time per token against the weight floor\n\n"
                 "| shape | kernels + copies/token | weight MB | floor us | predicted us (no "
                 "graph) | x floor | predicted us (graph) | x floor | bound us (no launch cost) "
                 "| predicted us (graph + PDL) | x floor |\n"
                 "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n");
    for (int s = 0; s < 3; s++) {
        rp_config c;
        rp_error err;
        if (rp_config_builtin(&c, shapes[s], 0, &err) != RP_OK) {
            fprintf(stderr, "gpu_model: %s\n", err.msg);
            return 1;
        }
        decode_step(&l, &c, 1);
        /* The floor: every weight but the embedding read once per token, bf16. */
        const double wbytes =
            2.0 * (double)(rp_config_param_count_non_embedding(&c) +
                           (long long)c.vocab_size * c.n_embd);
        const double floor = wbytes / HBM_BYTES_PER_S;
        const double graph = LAUNCH_S + sum(&l, 5); /* one cudaGraphLaunch + its nodes */
        const double pdl = LAUNCH_S + sum(&l, 6);
        fprintf(out,
                "| %s (L%d C%d) | %.0f | %.1f | %.1f | %.1f | %.2f | %.1f | %.2f | %.1f | %.1f | "
                "%.2f |\n",
                shapes[s], c.n_layer, c.n_embd, sum(&l, 0), wbytes / 1e6, floor * 1e6,
                sum(&l, 4) * 1e6, sum(&l, 4) / floor, graph * 1e6, graph / floor,
                sum(&l, 3) * 1e6, pdl * 1e6, pdl / floor);
    }
    fprintf(out, "\nGoal: <= 1.3x the floor.\n\n");
    fprintf(out, "## Decode groups: aggregate tokens/s against the weight floor (graph)\n\n"
                 "A group of G sequences is one step (one graph, W read once for all G rows); "
                 "the floor is G tokens per weight read.\n\n"
                 "| shape | G | nodes/step | predicted us/step | tokens/s | floor tokens/s | "
                 "x floor | us/step (PDL) | x floor (PDL) |\n"
                 "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n");
    static const int groups[4] = {1, 8, 16, 64};
    for (int s = 0; s < 3; s++) {
        rp_config c;
        rp_error err;
        if (rp_config_builtin(&c, shapes[s], 0, &err) != RP_OK) return 1;
        const double floor = 2.0 *
                             (double)(rp_config_param_count_non_embedding(&c) +
                                      (long long)c.vocab_size * c.n_embd) / HBM_BYTES_PER_S;
        for (int g = 0; g < 4; g++) {
            decode_step(&l, &c, groups[g]);
            const double t = LAUNCH_S + sum(&l, 5), t_pdl = LAUNCH_S + sum(&l, 6);
            fprintf(out, "| %s | %d | %.0f | %.1f | %.0f | %.0f | %.2f | %.1f | %.2f |\n",
                    shapes[s], groups[g], sum(&l, 0), t * 1e6, groups[g] / t, groups[g] / floor,
                    t / floor, t_pdl * 1e6, t_pdl / floor);
        }
    }
    fprintf(out, "\n");
    fprintf(out, "## Training, one micro-batch of %d x T=%d: predicted step and MFU\n\n"
                 "MFU = 6 x (non-embedding parameters + head) x tokens / (time x %.0f TFLOP/s).\n\n"
                 "| shape | launches | GB moved | GFLOP (all kernels) | predicted ms | "
                 "GEMM ms | non-GEMM ms | tokens/s | MFU |\n"
                 "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n",
            TRAIN_SEQS, TRAIN_T, BF16_TENSOR_FLOPS / 1e12);
    for (int s = 0; s < 3; s++) {
        rp_config c;
        rp_error err;
        if (rp_config_builtin(&c, shapes[s], 0, &err) != RP_OK) {
            fprintf(stderr, "gpu_model: %s\n", err.msg);
            return 1;
        }
        const double R = (double)TRAIN_SEQS * TRAIN_T;
        train_step(&l, &c, R, TRAIN_SEQS);
        double gemm_t = 0;
        for (int i = 0; i < l.n; i++)
            if (!strncmp(l.k[i].name, "GEMM", 4)) gemm_t += l.k[i].t_plain;
        const double t = sum(&l, 4);
        const double model_flops =
            6.0 * (double)(rp_config_param_count_non_embedding(&c) +
                           (long long)c.vocab_size * c.n_embd) * R;
        fprintf(out, "| %s | %.0f | %.1f | %.0f | %.1f | %.1f | %.1f | %.0f | %.1f%% |\n",
                shapes[s], sum(&l, 0), sum(&l, 1) / 1e9, sum(&l, 2) / 1e9, t * 1e3,
                gemm_t * 1e3, (t - gemm_t) * 1e3, R / t,
                100.0 * model_flops / (t * BF16_TENSOR_FLOPS));
    }
    fprintf(out, "\nGoal: MFU >= 45%% (0.4b shape).\n\n");
    wkv_section(out);
    wkv_split_section(out);
    for (int s = 0; s < 3; s++) {
        rp_config c;
        rp_error err;
        if (rp_config_builtin(&c, shapes[s], 0, &err) != RP_OK) return 1;
        decode_step(&l, &c, 1);
        fprintf(out, "## Decode kernels per token, %s (L%d C%d F%d V%d)\n\n", shapes[s],
                c.n_layer, c.n_embd, c.dim_ffn, c.vocab_size);
        print_table(out, &l, 1, 1);
        fprintf(out, "Replayed as one CUDA graph, the step adds one cudaGraphLaunch (%.0f us): "
                     "%.2f us in all (%.2f us with PDL).\n\n",
                LAUNCH_S * 1e6, (LAUNCH_S + sum(&l, 5)) * 1e6, (LAUNCH_S + sum(&l, 6)) * 1e6);
    }
    for (int s = 1; s < 3; s++) {
        rp_config c;
        rp_error err;
        if (rp_config_builtin(&c, shapes[s], 0, &err) != RP_OK) return 1;
        train_step(&l, &c, (double)TRAIN_SEQS * TRAIN_T, TRAIN_SEQS);
        fprintf(out, "## Training kernels per step, %s, %d x T=%d (all layers)\n\n", shapes[s],
                TRAIN_SEQS, TRAIN_T);
        print_table(out, &l, 1, 0);
    }
    return 0;
}
