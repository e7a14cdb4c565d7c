/* The CPU twins of the fused decode ops (gemv_group, gemv_chain, time_mix_heads): each
 * calls the backend's separate ops in the documented order (a quantized
 * group runs its products in one parallel region, with the same bits), so
 * CPU results are bit-identical with and without the fusion; the CUDA kernels
 * (cuda/cuda_decode.cu) are held to these by the emulator twin tests. */
#include "cpu/cpu_internal.h"
#include "cpu/cpu_quant.h"

/* A group whose every matrix is a low-precision one (cpu_qweights.c) of the
 * job's shape, run by decode rows: its products go through one OpenMP region
 * (rp_cpu_qmatmul_decode_group, the same bits as one matmul each), then the
 * epilogues. 0 (nothing done) for any other group. */
static int cpu_gemv_group_quantized(rp_backend *be, const rp_gemv_job *jobs, int n_jobs, int M) {
    rp_cpu_impl *impl = be->impl;
    if (n_jobs < 1 || n_jobs > RP_QGROUP_MAX || (M > RP_QMATMUL_DECODE_ROWS && !impl->decode_rows)) return 0;
    rp_qgroup_job q[RP_QGROUP_MAX] = {{0}};
    for (int j = 0; j < n_jobs; j++) {
        const rp_gemv_job *g = &jobs[j];
        const rp_qmatrix *w = cpu_qweight_find(be, g->w);
        if (!w || w->N != g->N || w->K != g->K) return 0;
        q[j] = (rp_qgroup_job){w, g->y, g->x, g->beta};
    }
    rp_cpu_qmatmul_decode_group(&impl->qx_ws, q, n_jobs, M, cpu_threads(be));
    for (int j = 0; j < n_jobs; j++) {
        const rp_gemv_job *g = &jobs[j];
        if (g->bias || g->act != RP_ACT_NONE) be->bias_act(be, g->y, g->bias, M, g->N, g->act);
    }
    return 1;
}

static void cpu_gemv_group(rp_backend *be, const rp_gemv_job *jobs, int n_jobs, int M) {
    if (cpu_gemv_group_quantized(be, jobs, n_jobs, M)) return;
    for (int j = 0; j < n_jobs; j++) {
        const rp_gemv_job *g = &jobs[j];
        if (g->w_in_out)
            be->matmul_lora(be, g->y, g->x, g->w, M, g->N, g->K, g->beta);
        else
            be->matmul_linear(be, g->y, g->x, g->w, M, g->N, g->K, g->beta);
        if (g->bias || g->act != RP_ACT_NONE) be->bias_act(be, g->y, g->bias, M, g->N, g->act);
    }
}

/* A chain of two quantized jobs run by decode rows (the FFN: key with
 * relu^2, then value reading its output) in one OpenMP region
 * (rp_cpu_qmatmul_decode_chain, the same bits as the jobs one by one);
 * any other chain, or a pair that does not fit, job by job. */
static void cpu_gemv_chain(rp_backend *be, const rp_gemv_job *jobs, int n_jobs, int M) {
    rp_cpu_impl *impl = be->impl;
    if (n_jobs == 2 && (M <= RP_QMATMUL_DECODE_ROWS || impl->decode_rows) && !jobs[0].bias &&
        (jobs[0].act == RP_ACT_NONE || jobs[0].act == RP_ACT_RELU_SQUARED) &&
        !jobs[0].w_in_out && !jobs[1].w_in_out) {
        const rp_qmatrix *w0 = cpu_qweight_find(be, jobs[0].w);
        const rp_qmatrix *w1 = cpu_qweight_find(be, jobs[1].w);
        if (w0 && w1 && w0->N == jobs[0].N && w0->K == jobs[0].K && w1->N == jobs[1].N &&
            w1->K == jobs[1].K) {
            const rp_qgroup_job q0 = {w0, jobs[0].y, jobs[0].x, jobs[0].beta};
            const rp_qgroup_job q1 = {w1, jobs[1].y, jobs[1].x, jobs[1].beta};
            if (rp_cpu_qmatmul_decode_chain(&impl->qx_ws, &q0, jobs[0].act == RP_ACT_RELU_SQUARED,
                                            &q1, M, cpu_threads(be))) {
                if (jobs[1].bias || jobs[1].act != RP_ACT_NONE)
                    be->bias_act(be, jobs[1].y, jobs[1].bias, M, jobs[1].N, jobs[1].act);
                return;
            }
        }
    }
    for (int j = 0; j < n_jobs; j++) cpu_gemv_group(be, &jobs[j], 1, M);
}

static void cpu_time_mix_heads(rp_backend *be, const rp_time_mix_heads *a,
                               const rp_batch *batch) {
    const int R = batch->n_rows, C = a->C, N = a->N;
    if (a->nu)
        be->value_residual(be, a->v, a->v_first, a->nu, R, C);
    else
        be->copy(be, a->v_first, a->v, (size_t)R * C * sizeof(float));
    be->key_prepare(be, a->kk, a->k, a->a, a->k_k, a->k_a, R, C, N);
    be->wkv7(be, a->y, a->r, a->w_raw, a->k, a->v, a->kk, a->a, a->state_base, a->state_stride,
             batch, C, N);
    be->groupnorm(be, a->out, NULL, NULL, a->y, a->ln_x_weight, a->ln_x_bias, R, C, N,
                  a->gn_eps);
    be->bonus_gate(be, a->out, a->r, a->k, a->v, a->r_k, a->g, R, C, N);
}

void cpu_decode_install(rp_backend *be) {
    be->gemv_group = cpu_gemv_group;
    be->gemv_chain = cpu_gemv_chain;
    be->time_mix_heads = cpu_time_mix_heads;
}
