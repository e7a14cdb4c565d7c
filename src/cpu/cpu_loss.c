/* Loss and optimizer ops of the CPU backend (semantics in backend.h):
 * cross_entropy, row_max, l2wrap, the fused head_cross_entropy, sum_squares
 * and adamw. Row-parallel with
 * OpenMP; reductions in a fixed order so results do not depend on the
 * thread count. The CUDA twin is cuda/cuda_loss.cu. */
#include "config.h"

#include <math.h>
#include <omp.h>

#include "cpu/cpu_internal.h"

/* forward and backward at once: losses [R] = logsumexp(z) - z[target],
 * dlogits = (softmax(z) - onehot(target)) scale; rows with target < 0 give
 * 0 and 0. Exponentials by the vectorised cpu_expf (over a 65536-token
 * vocabulary libm's exp was most of the op's time), their sum in double. */
static void cpu_cross_entropy(rp_backend *be, float *losses, float *dlogits, const float *logits,
                              const int32_t *targets, int R, int V, float scale) {
    int nt = cpu_team(be, (size_t)R * V);
#pragma omp parallel for num_threads(nt) if (nt > 1) schedule(static)
    for (int r = 0; r < R; r++) {
        const float *z = logits + (size_t)r * V;
        float *d = dlogits ? dlogits + (size_t)r * V : NULL; /* may alias z */
        const int t = targets[r];
        if (t < 0) {
            losses[r] = 0.0f;
            if (d)
                for (int i = 0; i < V; i++) d[i] = 0.0f;
            continue;
        }
        float mx = z[0];
#pragma omp simd reduction(max : mx)
        for (int i = 1; i < V; i++) mx = z[i] > mx ? z[i] : mx;
        double sum = 0.0;
#pragma omp simd reduction(+ : sum)
        for (int i = 0; i < V; i++) sum += (double)cpu_expf(z[i] - mx);
        const float lse = mx + (float)log(sum);
        losses[r] = lse - z[t];
        if (d) {
#pragma omp simd
            for (int i = 0; i < V; i++) d[i] = cpu_expf(z[i] - lse) * scale;
            d[t] -= scale;
        }
    }
}

static void cpu_row_max(rp_backend *be, float *row_max, int32_t *argmax, const float *x, int R,
                        int V) {
    int nt = cpu_team(be, (size_t)R * V);
#pragma omp parallel for num_threads(nt) if (nt > 1) schedule(static)
    for (int r = 0; r < R; r++) {
        const float *z = x + (size_t)r * V;
        int best = 0;
        for (int i = 1; i < V; i++)
            if (z[i] > z[best]) best = i;
        row_max[r] = z[best];
        argmax[r] = best;
    }
}

static void cpu_l2wrap(rp_backend *be, float *dlogits, const float *row_max, const int32_t *argmax,
                       const int32_t *targets, int R, int V, float factor) {
    for (int r = 0; r < R; r++)
        if (targets[r] >= 0) dlogits[(size_t)r * V + argmax[r]] += factor * row_max[r];
}

/* The fused head (backend.h head_cross_entropy): per row chunk, the same
 * vtable ops on the chunk as the unfused path on the whole batch. The row
 * maxima are backend (= host) memory at the end of the scratch. */
static void cpu_head_cross_entropy(rp_backend *be, float *losses, float *dx, float *dhead,
                                   float *scratch, const float *x, const float *head,
                                   const int32_t *targets, int R, int C, int V, float scale,
                                   float l2wrap_factor, int chunk_rows) {
    if (R <= 0 || V <= 0 || C <= 0 || chunk_rows <= 0) return;
    float *logits = scratch, *row_max = scratch + (size_t)chunk_rows * V;
    int32_t *argmax = (int32_t *)(row_max + chunk_rows);
    for (int r0 = 0; r0 < R; r0 += chunk_rows) {
        const int rows = R - r0 < chunk_rows ? R - r0 : chunk_rows;
        const float *xc = x + (size_t)r0 * C;
        be->matmul_linear(be, logits, xc, head, rows, V, C, 0.0f);
        if (l2wrap_factor > 0) be->row_max(be, row_max, argmax, logits, rows, V);
        be->cross_entropy(be, losses + r0, logits, logits, targets + r0, rows, V, scale);
        if (l2wrap_factor > 0)
            be->l2wrap(be, logits, row_max, argmax, targets + r0, rows, V, l2wrap_factor);
        be->matmul_linear_backward_beta(be, dx + (size_t)r0 * C, dhead, logits, xc, head, rows, V,
                                        C, 0.0f);
    }
}

/* Fixed blocks summed in block order: the same bits for any thread count.
 * The partial sums of SUM_SQUARES_PASS blocks at a time live on the stack
 * (ops allocate nothing) and the total adds them in block order across
 * passes: the same additions as one pass over all blocks. */
#define SUM_SQUARES_PASS 512
static double cpu_sum_squares(rp_backend *be, const float *x, size_t n) {
    const size_t block = 4096, n_blocks = (n + block - 1) / block;
    double partial[SUM_SQUARES_PASS];
    int nt = cpu_team(be, n);
    double total = 0.0;
    for (size_t b0 = 0; b0 < n_blocks; b0 += SUM_SQUARES_PASS) {
        const size_t nb = n_blocks - b0 < SUM_SQUARES_PASS ? n_blocks - b0 : SUM_SQUARES_PASS;
#pragma omp parallel for num_threads(nt) if (nt > 1) schedule(static)
        for (size_t p = 0; p < nb; p++) {
            const size_t b = b0 + p;
            double s = 0.0;
            const size_t end = (b + 1) * block < n ? (b + 1) * block : n;
            for (size_t i = b * block; i < end; i++) s += (double)x[i] * x[i];
            partial[p] = s;
        }
        for (size_t p = 0; p < nb; p++) total += partial[p];
    }
    return total;
}

static void cpu_adamw(rp_backend *be, float *param, const float *grad, float *m, float *v,
                      size_t n, float lr, float beta1, float beta2, float eps, float weight_decay,
                      float grad_scale, float bias_correction1, float bias_correction2) {
    const float inv_bc1 = 1.0f / bias_correction1, inv_bc2 = 1.0f / bias_correction2;
    int nt = cpu_team(be, n);
#pragma omp parallel for simd num_threads(nt) if (nt > 1) schedule(static)
    for (size_t i = 0; i < n; i++) {
        const float g = grad[i] * grad_scale;
        const float mi = beta1 * m[i] + (1.0f - beta1) * g;
        const float vi = beta2 * v[i] + (1.0f - beta2) * g * g;
        m[i] = mi;
        v[i] = vi;
        const float update = (mi * inv_bc1) / (sqrtf(vi * inv_bc2) + eps) + weight_decay * param[i];
        param[i] -= lr * update;
    }
}

void cpu_loss_install(rp_backend *be) {
    be->cross_entropy = cpu_cross_entropy;
    be->row_max = cpu_row_max;
    be->l2wrap = cpu_l2wrap;
    be->head_cross_entropy = cpu_head_cross_entropy;
    be->sum_squares = cpu_sum_squares;
    be->adamw = cpu_adamw;
}
