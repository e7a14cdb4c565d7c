/* WKV7 for training on the CPU backend: wkv7_forward_train (the forward with
 * a state checkpoint before every RP_WKV_CHUNK-th token) and wkv7_backward,
 * which recomputes each chunk's states from its checkpoint and walks them
 * backwards. Both run the forward recurrence through cpu_wkv7 itself
 * (cpu_recurrence.c), so the training output and the recomputed states are
 * bit-identical to inference. Installed by cpu_backward_install. */
#include "config.h"

#include <omp.h>
#include <stdlib.h>
#include <string.h>

#include "cpu/cpu_backend.h"

#define WKV_SCALE 0.6065306597126334f /* e^-0.5: d = exp(-e^-0.5 sigmoid(w_raw)) */

/* Per (sequence, head) with state S [N,N] (row i = value, column j = key):
 *   d = exp(-e^-0.5 sigmoid(w_raw)), a = -kk, b = kk * iclr,
 *   sa_i = sum_j S[i,j] a_j;  S'[i,j] = S[i,j] d_j + sa_i b_j + v_i k_j;
 *   y_i = sum_j S'[i,j] r_j. */

/* Team for n_rows tokens of C channels: one token of one head is ~N^2
 * multiply-adds, so a few rows of a few heads are worth the fork. */
static int wkv_team(rp_backend *be, const rp_batch *batch, int C) {
    return (size_t)batch->n_rows * C * 8 < RP_CPU_PARALLEL_MIN_WORK ? 1 : cpu_threads(be);
}

/* First checkpoint block of every sequence (rp_wkv_checkpoint_offset is a
 * prefix sum; this is it for all s at once). */
static size_t *checkpoint_blocks(const rp_batch *batch) {
    size_t *first = malloc(((size_t)batch->n_seq + 1) * sizeof *first);
    if (!first) return NULL;
    first[0] = 0;
    for (int s = 0; s < batch->n_seq; s++)
        first[s + 1] = first[s] + (size_t)(batch->seq_len[s] + RP_WKV_CHUNK - 1) / RP_WKV_CHUNK;
    return first;
}

/* y, state [R,C] -> y [R,C], state; checkpoints [blocks, H, N, N].
 * In rounds of one chunk: copy the state of every sequence still running
 * into its checkpoint, then cpu_wkv7 over the next <= RP_WKV_CHUNK tokens
 * of each (a sequence fed in pieces gives the same bits as in one call). */
static void cpu_wkv7_forward_train(rp_backend *be, float *y, const float *r, const float *w_raw,
                                   const float *k, const float *v, const float *kk,
                                   const float *a, float *state_base, size_t state_stride,
                                   float *checkpoints, const rp_batch *batch, int C, int N) {
    const int n_seq = batch->n_seq, H = C / N;
    const size_t NN = (size_t)N * N, HNN = (size_t)H * NN;
    size_t *first = checkpoint_blocks(batch);
    int *part = malloc(3 * (size_t)(n_seq ? n_seq : 1) * sizeof *part);
    if (!first || !part) abort(); /* a few ints per sequence */
    int *len = part, *begin = part + n_seq, *slot = part + 2 * n_seq;
    int max_len = 0;
    for (int s = 0; s < n_seq; s++)
        if (batch->seq_len[s] > max_len) max_len = batch->seq_len[s];
    const int nt = wkv_team(be, batch, C);
    for (int t0 = 0; t0 < max_len; t0 += RP_WKV_CHUNK) {
        int n = 0, rows = 0;
        for (int s = 0; s < n_seq; s++) {
            const int rest = batch->seq_len[s] - t0;
            if (rest <= 0) continue;
            len[n] = rest < RP_WKV_CHUNK ? rest : RP_WKV_CHUNK;
            begin[n] = batch->row_begin[s] + t0;
            slot[n] = batch->slot[s];
            rows += len[n];
            n++;
        }
        /* checkpoint copies, one head per iteration */
#pragma omp parallel for collapse(2) num_threads(nt) if (nt > 1) schedule(static)
        for (int s = 0; s < n_seq; s++)
            for (int h = 0; h < H; h++) {
                if (batch->seq_len[s] <= t0) continue;
                memcpy(checkpoints + (first[s] + (size_t)(t0 / RP_WKV_CHUNK)) * HNN + h * NN,
                       state_base + (size_t)batch->slot[s] * state_stride + h * NN,
                       NN * sizeof(float));
            }
        const rp_batch round = {n, rows, len, begin, slot};
        cpu_wkv7(be, y, r, w_raw, k, v, kk, a, state_base, state_stride, &round, C, N);
    }
    free(part);
    free(first);
}

/* One token of one head: S (in place) <- the token's update, through cpu_wkv7
 * on a one-token, one-head batch (for a single token the row stride C does
 * not matter, so C = N selects the head). y_scratch [N] gets y. */
static void wkv_step(rp_backend *be, float *S, float *y_scratch, const float *r,
                     const float *w_raw, const float *k, const float *v, const float *kk,
                     const float *a, int N) {
    static const int one = 1, zero = 0;
    const rp_batch token = {1, 1, &one, &zero, &zero};
    cpu_wkv7(be, y_scratch, r, w_raw, k, v, kk, a, S, 0, &token, N, N);
}

/* Per-thread scratch: the states of one chunk and the per-token vectors. */
typedef struct {
    float *states;                   /* [RP_WKV_CHUNK + 1, N, N]: S before token t0 + u */
    float *decay, *kern_a, *kern_b;  /* [N] each: d, a = -kk, b = kk iclr */
    float *sa, *dsa;                 /* [N] each: per row of S */
    float *acc_r, *acc_k, *acc_b, *acc_d, *acc_a; /* [N] each: column sums */
    float *y;                        /* [N]: the recomputed output, unused */
} wkv_scratch;

enum { WKV_SCRATCH_VECTORS = 11 };

static int wkv_scratch_alloc(wkv_scratch *w, int N) {
    w->states = malloc((RP_WKV_CHUNK + 1) * (size_t)N * N * sizeof(float));
    float *vec = malloc(WKV_SCRATCH_VECTORS * (size_t)N * sizeof(float));
    if (!w->states || !vec) {
        free(w->states);
        free(vec);
        return 0;
    }
    float **slots[WKV_SCRATCH_VECTORS] = {&w->decay, &w->kern_a, &w->kern_b, &w->sa,
                                          &w->dsa,   &w->acc_r,  &w->acc_k,  &w->acc_b,
                                          &w->acc_d, &w->acc_a,  &w->y};
    for (int i = 0; i < WKV_SCRATCH_VECTORS; i++) *slots[i] = vec + (size_t)i * N;
    return 1;
}

static void wkv_scratch_free(wkv_scratch *w) {
    free(w->states);
    free(w->decay); /* the vectors' block */
}

/* Backward of one token of one head. dS [N,N] holds d(state after the token)
 * from the later tokens and the final-state gradient; on return it holds
 * d(state before). Sp / St: the states before / after the token. Inputs and
 * gradients point at the head's channels of the token's row.
 *
 * With G = dS + dy r^T (the full gradient of S_t):
 *   dr_j = sum_i St[i,j] dy_i          dv_i = sum_j G[i,j] k_j
 *   dk_j = sum_i G[i,j] v_i            dsa_i = sum_j G[i,j] b_j
 *   db_j = sum_i G[i,j] sa_i           dd_j = sum_i G[i,j] Sp[i,j]
 *   da_j (kernel a) = sum_i dsa_i Sp[i,j]
 *   d(S before)[i,j] = G[i,j] d_j + dsa_i a_j
 * then a = -kk, b = kk * iclr and d = d(w_raw) give dkk, diclr, dw_raw.
 * Two passes: along rows for the row sums (sa, dv, dsa), then down strips
 * of 8 columns with the five column sums in registers (as N-vectors they
 * would be loaded and stored once per row). */
static void wkv_token_backward(wkv_scratch *w, float *restrict dS, const float *restrict Sp,
                               const float *restrict St, const float *restrict dy,
                               const float *restrict r, const float *restrict w_raw,
                               const float *restrict k, const float *restrict v,
                               const float *restrict kk, const float *restrict iclr,
                               float *restrict dr, float *restrict dw_raw, float *restrict dk,
                               float *restrict dv, float *restrict dkk, float *restrict diclr,
                               int N) {
    float *restrict decay = w->decay, *restrict ka = w->kern_a, *restrict kb = w->kern_b;
    float *restrict sa = w->sa, *restrict dsa = w->dsa;
    float *restrict acc_r = w->acc_r, *restrict acc_k = w->acc_k, *restrict acc_b = w->acc_b,
                    *restrict acc_d = w->acc_d, *restrict acc_a = w->acc_a;
#pragma omp simd
    for (int j = 0; j < N; j++) {
        decay[j] = cpu_decayf(w_raw[j]);
        ka[j] = -kk[j];
        kb[j] = kk[j] * iclr[j];
    }
    for (int i = 0; i < N; i++) {
        float *restrict G = dS + (size_t)i * N;
        const float *restrict Spi = Sp + (size_t)i * N;
        const float dy_i = dy[i];
        float sa_i = 0.0f, dv_i = 0.0f, dsa_i = 0.0f;
#pragma omp simd reduction(+ : sa_i, dv_i, dsa_i)
        for (int j = 0; j < N; j++) {
            const float g = G[j] + dy_i * r[j];
            G[j] = g;
            sa_i += Spi[j] * ka[j];
            dv_i += g * k[j];
            dsa_i += g * kb[j];
        }
        sa[i] = sa_i;
        dsa[i] = dsa_i;
        dv[i] = dv_i;
    }
    const int strips = N / 8 * 8;
    for (int j0 = 0; j0 < strips; j0 += 8) {
        cpu_v8 ar = {0}, ak = {0}, ab = {0}, ad = {0}, aa = {0};
        const cpu_v8 dec = CPU_V8_LOAD(decay + j0), kav = CPU_V8_LOAD(ka + j0);
        for (int i = 0; i < N; i++) {
            const size_t q = (size_t)i * N + j0;
            const cpu_v8 g = CPU_V8_LOAD(dS + q), sp = CPU_V8_LOAD(Sp + q);
            ar += dy[i] * CPU_V8_LOAD(St + q);
            ak += g * v[i];
            ab += g * sa[i];
            ad += g * sp;
            aa += dsa[i] * sp;
            CPU_V8_STORE(dS + q, g * dec + dsa[i] * kav);
        }
        CPU_V8_STORE(acc_r + j0, ar);
        CPU_V8_STORE(acc_k + j0, ak);
        CPU_V8_STORE(acc_b + j0, ab);
        CPU_V8_STORE(acc_d + j0, ad);
        CPU_V8_STORE(acc_a + j0, aa);
    }
    for (int j = strips; j < N; j++) { /* heads of a size not a multiple of 8 */
        float ar = 0.0f, ak = 0.0f, ab = 0.0f, ad = 0.0f, aa = 0.0f;
        for (int i = 0; i < N; i++) {
            const size_t q = (size_t)i * N + j;
            const float g = dS[q];
            ar += dy[i] * St[q];
            ak += g * v[i];
            ab += g * sa[i];
            ad += g * Sp[q];
            aa += dsa[i] * Sp[q];
            dS[q] = g * decay[j] + dsa[i] * ka[j];
        }
        acc_r[j] = ar;
        acc_k[j] = ak;
        acc_b[j] = ab;
        acc_d[j] = ad;
        acc_a[j] = aa;
    }
#pragma omp simd
    for (int j = 0; j < N; j++) {
        const float sig = cpu_sigmoidf(w_raw[j]);
        dr[j] = acc_r[j];
        dk[j] = acc_k[j];
        /* dd/dw_raw = d (-e^-0.5) sig (1 - sig) */
        dw_raw[j] = acc_d[j] * decay[j] * (-WKV_SCALE) * sig * (1.0f - sig);
        /* a = -kk and b = kk iclr both depend on kk */
        dkk[j] = acc_b[j] * iclr[j] - acc_a[j];
        diclr[j] = acc_b[j] * kk[j];
    }
}

/* Backward of wkv7_forward_train: threads own whole (sequence, head) units,
 * so every result has one summation order whatever the thread count. */
static void cpu_wkv7_backward(rp_backend *be, float *dr, float *dw_raw, float *dk, float *dv,
                              float *dkk, float *da, float *dstate_base, size_t state_stride,
                              const float *dy, const float *r, const float *w_raw, const float *k,
                              const float *v, const float *kk, const float *a,
                              const float *checkpoints, const rp_batch *batch, int C, int N) {
    const int H = C / N;
    const size_t NN = (size_t)N * N, HNN = (size_t)H * NN;
    const long units = (long)batch->n_seq * H;
    size_t *first = checkpoint_blocks(batch);
    if (!first) abort();
    int nt = wkv_team(be, batch, C);
    if (units < nt) nt = units > 0 ? (int)units : 1;
#pragma omp parallel num_threads(nt) if (nt > 1)
    {
        wkv_scratch w;
        if (!wkv_scratch_alloc(&w, N)) abort(); /* ~280 KB per thread at N = 64 */
#pragma omp for schedule(dynamic, 1)
        for (long unit = 0; unit < units; unit++) {
            const int s = (int)(unit / H), h = (int)(unit % H), len = batch->seq_len[s];
            float *dS = dstate_base + (size_t)batch->slot[s] * state_stride + (size_t)h * NN;
            const float *ckpt = checkpoints + first[s] * HNN + (size_t)h * NN;
            for (int c = (len - 1) / RP_WKV_CHUNK; c >= 0; c--) {
                const int t0 = c * RP_WKV_CHUNK;
                const int t1 = t0 + RP_WKV_CHUNK < len ? t0 + RP_WKV_CHUNK : len;
                memcpy(w.states, ckpt + (size_t)c * HNN, NN * sizeof(float));
                for (int t = t0; t < t1; t++) {
                    const size_t o = (size_t)(batch->row_begin[s] + t) * C + (size_t)h * N;
                    float *next = w.states + (size_t)(t - t0 + 1) * NN;
                    memcpy(next, next - NN, NN * sizeof(float));
                    wkv_step(be, next, w.y, r + o, w_raw + o, k + o, v + o, kk + o, a + o, N);
                }
                for (int t = t1 - 1; t >= t0; t--) {
                    const size_t o = (size_t)(batch->row_begin[s] + t) * C + (size_t)h * N;
                    const float *Sp = w.states + (size_t)(t - t0) * NN;
                    wkv_token_backward(&w, dS, Sp, Sp + NN, dy + o, r + o, w_raw + o, k + o,
                                       v + o, kk + o, a + o, dr + o, dw_raw + o, dk + o, dv + o,
                                       dkk + o, da + o, N);
                }
            }
        }
        wkv_scratch_free(&w);
    }
    free(first);
}

void cpu_backward_wkv_install(rp_backend *be);

void cpu_backward_wkv_install(rp_backend *be) {
    be->wkv7_forward_train = cpu_wkv7_forward_train;
    be->wkv7_backward = cpu_wkv7_backward;
}
