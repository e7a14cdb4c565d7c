/* Official RWKV-7 (x070) initialisation (init.h, docs/rwkv7.md, Initialisation): a switch over the
 * parameter table's rp_init_kind, per-channel formulas computed in double,
 * orthogonal matrices by LAPACK QR in double. Random values depend only on
 * (seed, official tensor name, element index), never on who computes them. */
#include "model/init.h"

#include <limits.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "core/rng.h"
#include "model/params.h"

/* LAPACK from OpenBLAS (Fortran ABI: column-major, every argument by pointer,
 * 32-bit integers in the LP64 build configure links against). */
void dgeqrf_(const int *m, const int *n, double *a, const int *lda, double *tau, double *work,
             const int *lwork, int *info);
void dorgqr_(const int *m, const int *n, const int *k, double *a, const int *lda,
             const double *tau, double *work, const int *lwork, int *info);

/* ---- orthogonal ---------------------------------------------------------- */

rp_status rp_init_orthogonal(float *out, int64_t rows, int64_t cols, double gain, uint64_t key,
                             const char *name, rp_error *err) {
    if (rows < 1 || cols < 1)
        return rp_error_set(err, RP_ERR_SHAPE, "%s: orthogonal init needs a 2-D shape, got [%lld,%lld]",
                            name, (long long)rows, (long long)cols);
    /* Like torch, factor the tall orientation: A = G if rows >= cols, else G^T.
     * A is m x n (m >= n), stored column-major for LAPACK. */
    const int transposed = rows < cols;
    const int64_t m = transposed ? cols : rows, n = transposed ? rows : cols;
    if (m > INT_MAX)
        return rp_error_set(err, RP_ERR_SHAPE, "%s: [%lld,%lld] too large for LAPACK (32-bit ints)",
                            name, (long long)rows, (long long)cols);
    const size_t mn = (size_t)m * (size_t)n;
    double *a = rp_malloc(mn * sizeof(double), name, err);
    double *tau = rp_malloc((size_t)n * sizeof(double), name, err);
    double *column_scale = rp_malloc((size_t)n * sizeof(double), name, err);
    double *work = NULL;
    rp_status st = RP_OK;
    if (!a || !tau || !column_scale) {
        st = RP_ERR_NOMEM;
        goto done;
    }

    /* A(i,j) at a[j*m + i]; G(r,c) is normal element r*cols + c. Transposed:
     * A(i,j) = G(j,i), index j*cols + i = j*m + i, i.e. the same memory order. */
#pragma omp parallel for schedule(static)
    for (int64_t j = 0; j < n; j++)
        for (int64_t i = 0; i < m; i++)
            a[j * m + i] = rp_rng_normal(key, (uint64_t)(transposed ? j * m + i : i * cols + j));

    const int im = (int)m, in = (int)n;
    int info = 0, lwork = -1;
    double query_qr = 0.0, query_q = 0.0;
    dgeqrf_(&im, &in, a, &im, tau, &query_qr, &lwork, &info);
    if (info == 0) dorgqr_(&im, &in, &in, a, &im, tau, &query_q, &lwork, &info);
    if (info != 0) {
        st = rp_error_set(err, RP_ERR_INTERNAL, "%s: LAPACK workspace query failed (info %d)", name, info);
        goto done;
    }
    double query = query_qr > query_q ? query_qr : query_q;
    lwork = query > (double)n ? (int)query : (int)n;
    work = rp_malloc((size_t)lwork * sizeof(double), name, err);
    if (!work) {
        st = RP_ERR_NOMEM;
        goto done;
    }
    dgeqrf_(&im, &in, a, &im, tau, work, &lwork, &info);
    if (info != 0) {
        st = rp_error_set(err, RP_ERR_INTERNAL, "%s: LAPACK dgeqrf on [%d,%d] failed (info %d)", name,
                          im, in, info);
        goto done;
    }
    /* torch multiplies Q by sign(diag(R)) so the result is uniform over the
     * orthogonal group; R's diagonal is overwritten by dorgqr, keep it now. */
    for (int64_t j = 0; j < n; j++) column_scale[j] = a[j * m + j] < 0.0 ? -gain : gain;
    dorgqr_(&im, &in, &in, a, &im, tau, work, &lwork, &info);
    if (info != 0) {
        st = rp_error_set(err, RP_ERR_INTERNAL, "%s: LAPACK dorgqr on [%d,%d] failed (info %d)", name,
                          im, in, info);
        goto done;
    }

    if (transposed) {
        /* W = Q^T: W(r,c) = Q(c,r) = a[r*m + c] with m = cols, the same order. */
#pragma omp parallel for schedule(static)
        for (int64_t j = 0; j < n; j++)
            for (int64_t i = 0; i < m; i++) out[j * m + i] = (float)(a[j * m + i] * column_scale[j]);
    } else {
        /* W = Q: W(r,c) = a[c*m + r]; row-blocked so both sides stay in cache. */
        const int64_t block = 64;
#pragma omp parallel for schedule(static)
        for (int64_t r0 = 0; r0 < m; r0 += block) {
            int64_t r1 = r0 + block < m ? r0 + block : m;
            for (int64_t c = 0; c < n; c++)
                for (int64_t r = r0; r < r1; r++)
                    out[r * cols + c] = (float)(a[c * m + r] * column_scale[c]);
        }
    }

done:
    free(work);
    free(column_scale);
    free(tau);
    free(a);
    return st;
}

/* ---- per-tensor rules ---------------------------------------------------- */

/* Per-channel quantities of docs/rwkv7.md (Initialisation) for layer l of L, channel n of C. */
typedef struct {
    double r0, r1; /* l/(L-1) (0 if L == 1), 1 - l/L */
    int C;
} layer_ratios;

static double channel_p(const layer_ratios *q, int n) { return (double)n / q->C; }
static double channel_linear(const layer_ratios *q, int n) {
    return q->C > 1 ? (double)n / (q->C - 1) - 0.5 : -0.5;
}
static double channel_zigzag(int n) {
    const double half = (RP_HEAD_SIZE - 1) / 2.0;
    double z = ((n % RP_HEAD_SIZE) - half) / half;
    return z * fabs(z);
}
static double channel_www(const layer_ratios *q, int n) {
    double frac = q->C > 1 ? (double)n / (q->C - 1) : 0.0;
    return -6.0 + 6.0 * pow(frac, 1.0 + pow(q->r0, 0.3));
}

static void fill_constant(float *x, int64_t count, double value) {
    for (int64_t i = 0; i < count; i++) x[i] = (float)value;
}

/* 1 - p_n^exponent, the token-shift lerp profile. */
static void fill_lerp(float *x, const layer_ratios *q, double exponent) {
    for (int n = 0; n < q->C; n++) x[n] = (float)(1.0 - pow(channel_p(q, n), exponent));
}

static double lora2_gain(const rp_tensor_info *t) {
    double rows = (double)t->shape[0], cols = (double)t->shape[1];
    return 0.1 * (rows > cols ? sqrt(rows / cols) : 1.0);
}

static double head_gain(const rp_config *cfg) {
    double V = cfg->vocab_size, C = cfg->n_embd;
    return V > C ? 0.5 * sqrt(V / C) : 0.5;
}

static rp_status init_tensor(float *base, const rp_tensor_info *t, const rp_config *cfg, int layer,
                             uint64_t seed, rp_error *err) {
    float *x = base + t->flat_offset;
    char name[128];
    rp_tensor_name(name, sizeof name, t, layer);
    const int L = cfg->n_layer;
    const layer_ratios q = {
        .r0 = L > 1 ? (double)layer / (L - 1) : 0.0,
        .r1 = 1.0 - (double)layer / L,
        .C = cfg->n_embd,
    };
    /* Per-channel rules apply to [C] or [1,1,C] tensors only. */
    const int per_channel = (t->init >= RP_INIT_X_R && t->init <= RP_INIT_K_A) ||
                            t->init == RP_INIT_FFN_X_K;
    if (per_channel && t->numel != cfg->n_embd)
        return rp_error_set(err, RP_ERR_INTERNAL, "%s: per-channel init on %lld elements, expected C = %d",
                            name, (long long)t->numel, cfg->n_embd);

    switch (t->init) {
    case RP_INIT_ONES: fill_constant(x, t->numel, 1.0); return RP_OK;
    case RP_INIT_ZEROS: fill_constant(x, t->numel, 0.0); return RP_OK;
    case RP_INIT_X_R: fill_lerp(x, &q, 0.2 * q.r1); return RP_OK;
    case RP_INIT_X_W: fill_lerp(x, &q, 0.9 * q.r1); return RP_OK;
    case RP_INIT_X_K: fill_lerp(x, &q, 0.7 * q.r1); return RP_OK;
    case RP_INIT_X_V: fill_lerp(x, &q, 0.7 * q.r1); return RP_OK;
    case RP_INIT_X_A: fill_lerp(x, &q, 0.9 * q.r1); return RP_OK;
    case RP_INIT_X_G: fill_lerp(x, &q, 0.2 * q.r1); return RP_OK;
    case RP_INIT_FFN_X_K: fill_lerp(x, &q, pow(q.r1, 4.0)); return RP_OK;
    case RP_INIT_W0:
        for (int n = 0; n < q.C; n++)
            x[n] = (float)(channel_www(&q, n) + 0.5 + 2.5 * channel_zigzag(n));
        return RP_OK;
    case RP_INIT_A0:
        for (int n = 0; n < q.C; n++)
            x[n] = (float)(-0.19 + 0.3 * channel_zigzag(n) + 0.4 * channel_linear(&q, n));
        return RP_OK;
    case RP_INIT_V0:
        for (int n = 0; n < q.C; n++) x[n] = (float)(0.73 - 0.4 * channel_linear(&q, n));
        return RP_OK;
    case RP_INIT_K_K:
        for (int n = 0; n < q.C; n++) x[n] = (float)(0.71 - 0.1 * channel_linear(&q, n));
        return RP_OK;
    case RP_INIT_K_A: fill_constant(x, t->numel, 1.02); return RP_OK;
    case RP_INIT_R_K: fill_constant(x, t->numel, -0.04); return RP_OK;
    case RP_INIT_LN_X: fill_constant(x, t->numel, pow((double)(layer + 1) / L, 0.7)); return RP_OK;
    case RP_INIT_EMB: {
        const uint64_t key = rp_rng_key(seed, name);
#pragma omp parallel for schedule(static)
        for (int64_t i = 0; i < t->numel; i++)
            x[i] = (float)(-1e-4 + 2e-4 * rp_rng_uniform_f64(key, (uint64_t)i));
        return RP_OK;
    }
    case RP_INIT_LORA2:
    case RP_INIT_ORTHO_1:
    case RP_INIT_ORTHO_01:
    case RP_INIT_HEAD: {
        if (t->ndim != 2)
            return rp_error_set(err, RP_ERR_INTERNAL, "%s: orthogonal init needs a 2-D tensor, got %d-D",
                                name, t->ndim);
        double gain = t->init == RP_INIT_LORA2   ? lora2_gain(t)
                      : t->init == RP_INIT_ORTHO_1 ? 1.0
                      : t->init == RP_INIT_ORTHO_01 ? 0.1
                                                     : head_gain(cfg);
        return rp_init_orthogonal(x, t->shape[0], t->shape[1], gain, rp_rng_key(seed, name), name,
                                  err);
    }
    }
    return rp_error_set(err, RP_ERR_INTERNAL, "%s: unknown init kind %d", name, (int)t->init);
}

/* ---- public entry points ------------------------------------------------- */

rp_status rp_init_layer(float *flat, const rp_config *cfg, int layer, uint64_t seed,
                        rp_error *err) {
    rp_status st = rp_config_validate(cfg, err);
    if (st != RP_OK) return st;
    if (layer < 0 || layer >= cfg->n_layer)
        return rp_error_set(err, RP_ERR_ARG, "init: layer %d out of range [0, %d)", layer,
                            cfg->n_layer);
    if (!flat) return rp_error_set(err, RP_ERR_ARG, "init: layer %d buffer is NULL", layer);
    rp_tensor_info table[RP_LAYER_N_TENSORS];
    size_t floats = rp_layer_layout(cfg, table);
    /* Alignment padding is zeroed too, so equal seeds give equal bytes. */
    memset(flat, 0, floats * sizeof(float));
    for (int i = 0; i < RP_LAYER_N_TENSORS; i++) {
        st = init_tensor(flat, &table[i], cfg, layer, seed, err);
        if (st != RP_OK) return st;
    }
    return RP_OK;
}

rp_status rp_init_global(float *embed_flat, float *head_flat, const rp_config *cfg,
                         uint64_t seed, rp_error *err) {
    rp_status st = rp_config_validate(cfg, err);
    if (st != RP_OK) return st;
    rp_tensor_info table[RP_GLOBAL_N_TENSORS];
    size_t embed_floats = 0, head_floats = 0;
    rp_global_layout(cfg, table, &embed_floats, &head_floats);
    if (embed_flat) memset(embed_flat, 0, embed_floats * sizeof(float));
    if (head_flat) memset(head_flat, 0, head_floats * sizeof(float));
    for (int i = 0; i < RP_GLOBAL_N_TENSORS; i++) {
        float *base = table[i].part == RP_PART_EMBED ? embed_flat : head_flat;
        if (!base) continue;
        st = init_tensor(base, &table[i], cfg, 0, seed, err);
        if (st != RP_OK) return st;
    }
    return RP_OK;
}
