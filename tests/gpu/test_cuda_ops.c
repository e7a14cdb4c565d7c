/* The CPU/CUDA twin test: every op of the rp_backend vtable (src/backend.h)
 * runs on the CPU backend (the fp32 reference) and on the CUDA backend with
 * identical inputs, and every output is compared by relative L2 error: fp32
 * math to 1e-5, the bf16 GEMM paths to 1e-2. A plain C11 program (the GPU
 * machine has no test libraries), run by tests/gpu/run.sh; exit 0 when all
 * pass, 1 on a failure, 77 when there is no CUDA device. See README.md. */
#include <limits.h>
#include <math.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "backend.h"
#include "core/dtype.h"
#include "core/rng.h"
#include "cpu/cpu_backend.h"
#include "cuda_backend.h"
#include "cuda_device.h"
#include "cuda_wkv7.h"

#define HEAD_SIZE 64     /* N: every RWKV-7 head (key_prepare assumes it) */
#define LN_EPS 1e-5f     /* model/forward.c RP_LN_EPS */
#define GN_EPS 64e-5f    /* model/forward.c RP_GN_EPS (ln_x) */
#define TOL_FP32 1e-5
#define TOL_BF16 1e-2
/* bf16 outputs: one rounding to nearest even per value (<= 2^-9 relative
 * each, ~1.3e-3 in relative L2 for these values); fp32 outputs from bf16
 * inputs are held to TOL_FP32, since both sides read the same rounded
 * inputs. */
#define TOL_BF16_IO 4e-3
#define MAX_SEQ 8

enum { MATH_FP32 = 1, MATH_BF16 = 2 };

/* ---- the two sides and the tally ---------------------------------------- */

/* One buffer on both backends. `before` is set for outputs that accumulate:
 * the common initial contents, so that the error is measured against what
 * the op added (||gpu - cpu|| / ||cpu - before||) instead of being hidden
 * under the random starting values. */
typedef struct {
    size_t n;      /* floats */
    float *cpu;    /* CPU backend memory (plain host memory) */
    float *gpu;    /* CUDA device memory */
    float *before; /* host copy of the initial contents, or NULL */
} tbuf;

typedef struct {
    rp_backend *cpu, *gpu;
    const char *math; /* "fp32" / "bf16", printed on every line */
    double tol;
    uint64_t seed, draws; /* every random tensor is its own stream */
    const char *op;       /* op under test, printed */
    char label[96];       /* its shape and case, printed */
    tbuf **bufs;          /* released after every case */
    int n_bufs, cap_bufs;
    int passed, failed;
} twin;

static void fatal(const char *fmt, ...) __attribute__((format(printf, 1, 2), noreturn));
static void fatal(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fputs("twin test: fatal: ", stdout);
    vprintf(fmt, ap);
    fputs("\n", stdout);
    va_end(ap);
    exit(1);
}

static void *xmalloc(size_t bytes) {
    void *p = malloc(bytes ? bytes : 1);
    if (!p) fatal("out of host memory (%zu bytes)", bytes);
    return p;
}

static void label(twin *t, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void label(twin *t, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(t->label, sizeof t->label, fmt, ap);
    va_end(ap);
}

/* One line per comparison: math, op, output, shape, error, tolerance
 * (0 = bitwise), verdict. */
static void report(twin *t, const char *what, double rel, double tol, int ok, const char *note) {
    char tol_text[16];
    if (tol > 0) snprintf(tol_text, sizeof tol_text, "%.0e", tol);
    else snprintf(tol_text, sizeof tol_text, "exact");
    printf("%-4s  %-23s %-16s %-40s rel %9.2e  tol %-5s  %s%s\n", t->math, t->op, what,
           t->label, rel, tol_text, ok ? "PASS" : "FAIL", note ? note : "");
    fflush(stdout);
    if (ok) t->passed++;
    else t->failed++;
}

/* Backend and pointer of side g (0 = CPU, 1 = GPU): each op is called once
 * per side with the same arguments. */
static rp_backend *side(const twin *t, int g) { return g ? t->gpu : t->cpu; }
static float *at(const tbuf *b, int g) { return g ? b->gpu : b->cpu; }

/* ---- random inputs (core/rng.h: counter-based, a pure function of --seed) */

static uint64_t next_key(twin *t) {
    char name[48];
    snprintf(name, sizeof name, "twin-test/%llu", (unsigned long long)t->draws++);
    return rp_rng_key(t->seed, name);
}

/* Uniform in [lo, hi): one Philox block gives four 24-bit values. */
static void fill_uniform(twin *t, float *x, size_t n, double lo, double hi) {
    const uint64_t key = next_key(t);
    uint32_t word[4];
    for (size_t i = 0; i < n; i++) {
        if (i % 4 == 0) rp_philox4x32(key, 0, i / 4, word);
        x[i] = (float)(lo + (hi - lo) * ((word[i % 4] >> 8) * (1.0 / 16777216.0)));
    }
}

/* Integers in [lo, hi). */
static void fill_ints(twin *t, int32_t *x, size_t n, int lo, int hi) {
    const uint64_t key = next_key(t);
    uint32_t word[4];
    for (size_t i = 0; i < n; i++) {
        if (i % 4 == 0) rp_philox4x32(key, 0, i / 4, word);
        x[i] = lo + (int32_t)(word[i % 4] % (uint32_t)(hi - lo));
    }
}

/* kk: unit L2 norm per head of HEAD_SIZE, as key_prepare leaves it. */
static void normalise_heads(float *x, size_t n) {
    for (size_t h0 = 0; h0 + HEAD_SIZE <= n; h0 += HEAD_SIZE) {
        double n2 = 0.0;
        for (int j = 0; j < HEAD_SIZE; j++) n2 += (double)x[h0 + j] * x[h0 + j];
        const float inv = (float)(1.0 / sqrt(n2 > 0 ? n2 : 1.0));
        for (int j = 0; j < HEAD_SIZE; j++) x[h0 + j] *= inv;
    }
}

/* ---- buffers ------------------------------------------------------------- */

static void poison_gpu(twin *t, tbuf *b);

/* Zeroed on both sides (alloc's contract), tracked for release. */
static tbuf *buf_zero(twin *t, size_t n) {
    tbuf *b = xmalloc(sizeof *b);
    b->n = n;
    b->before = NULL;
    const size_t bytes = (n ? n : 1) * sizeof(float);
    b->cpu = t->cpu->alloc(t->cpu, bytes);
    b->gpu = t->gpu->alloc(t->gpu, bytes);
    if (!b->cpu || !b->gpu) fatal("%s: alloc of %zu bytes failed", t->op, bytes);
    if (t->n_bufs == t->cap_bufs) {
        t->cap_bufs = t->cap_bufs ? 2 * t->cap_bufs : 64;
        t->bufs = realloc(t->bufs, (size_t)t->cap_bufs * sizeof *t->bufs);
        if (!t->bufs) fatal("out of host memory");
    }
    t->bufs[t->n_bufs++] = b;
    return b;
}

/* Both sides hold host[0..n). */
static tbuf *buf_from(twin *t, const float *host, size_t n) {
    tbuf *b = buf_zero(t, n);
    t->cpu->copy_to_device(t->cpu, b->cpu, host, n * sizeof(float));
    t->gpu->copy_to_device(t->gpu, b->gpu, host, n * sizeof(float));
    return b;
}

/* An input (or an in/out buffer): the same uniform values on both sides. */
static tbuf *buf_input(twin *t, size_t n, double lo, double hi) {
    float *host = xmalloc(n * sizeof *host);
    fill_uniform(t, host, n, lo, hi);
    tbuf *b = buf_from(t, host, n);
    free(host);
    return b;
}

/* An output the op overwrites: NaN bytes on the GPU side, so that any
 * element the kernel fails to write shows up (the CPU side stays zero). */
static tbuf *buf_output(twin *t, size_t n) {
    tbuf *b = buf_zero(t, n);
    poison_gpu(t, b);
    return b;
}

/* An output the op accumulates into: the same random start on both sides. */
static tbuf *buf_accum(twin *t, size_t n, double lo, double hi) {
    float *host = xmalloc(n * sizeof *host);
    fill_uniform(t, host, n, lo, hi);
    tbuf *b = buf_from(t, host, n);
    b->before = host;
    return b;
}

static void poison_gpu(twin *t, tbuf *b) {
    float *host = xmalloc(b->n * sizeof *host);
    memset(host, 0xFF, b->n * sizeof *host); /* 0xFFFFFFFF is a quiet NaN */
    t->gpu->copy_to_device(t->gpu, b->gpu, host, b->n * sizeof *host);
    free(host);
}

/* The GPU side takes the CPU side's contents: inputs that a CPU op computed
 * (norm statistics, checkpoints, activation outputs). */
static void buf_share_cpu(twin *t, tbuf *b) {
    t->gpu->copy_to_device(t->gpu, b->gpu, b->cpu, b->n * sizeof(float));
}

static void twin_release(twin *t) {
    for (int i = 0; i < t->n_bufs; i++) {
        tbuf *b = t->bufs[i];
        t->cpu->free(t->cpu, b->cpu);
        t->gpu->free(t->gpu, b->gpu);
        free(b->before);
        free(b);
    }
    t->n_bufs = 0;
}

/* ---- comparison ---------------------------------------------------------- */

/* rel = ||gpu - cpu|| / ||cpu - before|| (before NULL: ||cpu||), in double;
 * a non-finite value on either side fails. */
static void compare_values(twin *t, const char *what, const float *gpu, const float *cpu,
                           const float *before, size_t n, double tol) {
    double diff = 0.0, ref = 0.0;
    size_t bad_gpu = 0, bad_cpu = 0;
    for (size_t i = 0; i < n; i++) {
        if (!isfinite(cpu[i])) {
            bad_cpu++;
            continue;
        }
        if (!isfinite(gpu[i])) {
            bad_gpu++;
            continue;
        }
        const double d = (double)gpu[i] - cpu[i];
        const double r = before ? (double)cpu[i] - before[i] : cpu[i];
        diff += d * d;
        ref += r * r;
    }
    const double rel = ref > 0.0 ? sqrt(diff / ref) : sqrt(diff);
    char note[96] = "";
    if (bad_gpu) snprintf(note, sizeof note, "  (%zu of %zu GPU values not finite)", bad_gpu, n);
    else if (bad_cpu) snprintf(note, sizeof note, "  (%zu CPU values not finite)", bad_cpu);
    report(t, what, rel, tol, bad_gpu == 0 && bad_cpu == 0 && rel <= tol, note);
}

static float *download(twin *t, const tbuf *b) {
    float *host = xmalloc(b->n * sizeof *host);
    t->gpu->copy_to_host(t->gpu, host, b->gpu, b->n * sizeof *host);
    return host;
}

/* The buffer within the twin's tolerance. */
static void compare(twin *t, const char *what, const tbuf *b) {
    float *host = download(t, b);
    compare_values(t, what, host, b->cpu, b->before, b->n, t->tol);
    free(host);
}

/* a's GPU side bit for bit equal to b's (a fused op against its parts). */
static void compare_gpu_exact(twin *t, const char *what, const tbuf *a, const tbuf *b) {
    float *ha = download(t, a), *hb = download(t, b);
    size_t differ = 0;
    for (size_t i = 0; i < a->n && i < b->n; i++) differ += memcmp(ha + i, hb + i, sizeof(float)) != 0;
    char note[64] = "";
    if (differ) snprintf(note, sizeof note, "  (%zu of %zu floats differ)", differ, a->n);
    report(t, what, 0.0, 0.0, differ == 0 && a->n == b->n, note);
    free(ha);
    free(hb);
}

/* The buffer bit for bit (memory ops, untouched buffers). */
static void compare_exact(twin *t, const char *what, const tbuf *b) {
    float *host = download(t, b);
    size_t differ = 0;
    double diff = 0.0, ref = 0.0;
    for (size_t i = 0; i < b->n; i++) {
        if (memcmp(host + i, b->cpu + i, sizeof(float)) != 0) differ++;
        if (isfinite(host[i]) && isfinite(b->cpu[i])) {
            diff += ((double)host[i] - b->cpu[i]) * ((double)host[i] - b->cpu[i]);
            ref += (double)b->cpu[i] * b->cpu[i];
        }
    }
    char note[64] = "";
    if (differ) snprintf(note, sizeof note, "  (%zu of %zu floats differ)", differ, b->n);
    report(t, what, ref > 0 ? sqrt(diff / ref) : sqrt(diff), 0.0, differ == 0, note);
    free(host);
}

/* ---- shapes -------------------------------------------------------------- */

typedef struct {
    int n_seq;
    int len[MAX_SEQ];  /* each >= 1 */
    int slot[MAX_SEQ]; /* a permutation, with gaps: unused slots must stay untouched */
} seq_spec;

typedef struct {
    const char *name;
    int C, F, rank;      /* channels (H = C / 64 heads), FFN width, LoRA rank */
    int V_embed, V_loss; /* embedding rows, cross-entropy vocabulary */
    int n_slots;         /* recurrent state slots */
    seq_spec prefill;    /* sequence mode */
    seq_spec cont;       /* a second call continuing some of those sequences */
    seq_spec step;       /* step mode: every length 1 */
    size_t n_params;     /* sum_squares, adamw, memory ops */
} shape;

static const shape shapes[] = {
    /* R = 39: lengths below, at and above the 16-token checkpoint chunk; slot 3
     * unused by the first call, then started by the second. */
    {"small", 128, 512, 32, 300, 1000, 5,
     {4, {17, 1, 5, 16}, {2, 4, 0, 1}},
     {3, {20, 3, 2}, {1, 2, 3}},
     {4, {1, 1, 1, 1}, {3, 1, 4, 0}},
     1003},
    /* R = 300 ragged over 5 sequences (2 lengths not multiples of 16), the
     * widths of a 0.1B-0.4B model, a 65536-token vocabulary for the loss. */
    {"realistic", 512, 2048, 64, 1000, 65536, 6,
     {5, {128, 1, 37, 64, 70}, {3, 0, 5, 1, 4}},
     {4, {33, 16, 1, 50}, {4, 3, 2, 5}},
     {6, {1, 1, 1, 1, 1, 1}, {5, 2, 0, 4, 1, 3}},
     3000007},
};

typedef struct {
    int seq_len[MAX_SEQ], row_begin[MAX_SEQ], slot[MAX_SEQ];
    rp_batch batch;
} twin_batch;

/* rp_batch of spec (rows in sequence order: row_begin = prefix sums). */
static const rp_batch *batch_make(twin_batch *tb, const seq_spec *spec) {
    int rows = 0;
    for (int s = 0; s < spec->n_seq; s++) {
        tb->seq_len[s] = spec->len[s];
        tb->row_begin[s] = rows;
        tb->slot[s] = spec->slot[s];
        rows += spec->len[s];
    }
    tb->batch = (rp_batch){.n_seq = spec->n_seq, .n_rows = rows, .seq_len = tb->seq_len,
                           .row_begin = tb->row_begin, .slot = tb->slot};
    return &tb->batch;
}

static int spec_rows(const seq_spec *spec) {
    int rows = 0;
    for (int s = 0; s < spec->n_seq; s++) rows += spec->len[s];
    return rows;
}

/* One layer's state per slot as model/state.h lays it out:
 * { att_x_prev [C], wkv [H,N,N], ffn_x_prev [C] }, slots state_stride apart. */
static size_t state_stride(int C) { return (size_t)C * (2 + HEAD_SIZE); }
static size_t state_att_offset(int C) { (void)C; return 0; }
static size_t state_wkv_offset(int C) { return (size_t)C; }
static size_t state_ffn_offset(int C) { return (size_t)C * (1 + HEAD_SIZE); }

/* Realistic ids: many repeats of a few popular tokens, and both ends of the table. */
static void make_tokens(twin *t, int32_t *tokens, int R, int V) {
    fill_ints(t, tokens, (size_t)R, 0, V);
    for (int r = 0; r < R; r++)
        if (r % 2 == 1) tokens[r] = r % 3;
    if (R > 0) tokens[0] = V - 1;
}

/* Targets with every fifth row ignored (-1), including both ends of the
 * vocabulary; returns the number of rows that count. */
static int make_targets(twin *t, int32_t *targets, int R, int V) {
    fill_ints(t, targets, (size_t)R, 0, V);
    if (R > 1) targets[1] = V - 1;
    if (R > 2) targets[2] = 0;
    int valid = 0;
    for (int r = 0; r < R; r++) {
        if (r % 5 == 3) targets[r] = -1;
        valid += targets[r] >= 0;
    }
    return valid;
}

/* ---- memory -------------------------------------------------------------- */

/* alloc gives zeroed memory (also where the allocator hands back memory just
 * freed dirty); copies in and out at odd offsets and byte counts; fill_zero
 * of a sub-range; add. */
static void check_memory(twin *t, const shape *sh) {
    const size_t n = sh->n_params;
    label(t, "n=%zu", n);
    rp_backend *gpu = t->gpu;

    t->op = "alloc";
    {
        const size_t bytes = n * sizeof(float) + 3;
        unsigned char *host = xmalloc(bytes);
        void *dirty = gpu->alloc(gpu, bytes);
        if (!dirty) fatal("alloc of %zu bytes failed", bytes);
        memset(host, 0xA5, bytes);
        gpu->copy_to_device(gpu, dirty, host, bytes);
        gpu->free(gpu, dirty);
        void *fresh = gpu->alloc(gpu, bytes);
        if (!fresh) fatal("alloc of %zu bytes failed", bytes);
        gpu->copy_to_host(gpu, host, fresh, bytes);
        size_t nonzero = 0;
        for (size_t i = 0; i < bytes; i++) nonzero += host[i] != 0;
        char note[64] = "";
        if (nonzero) snprintf(note, sizeof note, "  (%zu of %zu bytes not zero)", nonzero, bytes);
        report(t, "zeroed", 0.0, 0.0, nonzero == 0, note);
        gpu->free(gpu, fresh);
        free(host);
    }

    t->op = "copy_to_device/host";
    {
        tbuf *b = buf_input(t, n, -1, 1); /* whole buffer in, read back whole */
        compare_exact(t, "round trip", b);
        /* a part at an odd float offset in, an odd byte count back out */
        float *part = xmalloc(n * sizeof *part);
        fill_uniform(t, part, n, -1, 1);
        const size_t off = 5, count = n / 2 + 1;
        for (int g = 0; g < 2; g++)
            side(t, g)->copy_to_device(side(t, g), at(b, g) + off, part, count * sizeof(float));
        compare_exact(t, "part in", b);
        const size_t bytes = 13 * sizeof(float) + 3;
        unsigned char *got = xmalloc(bytes);
        gpu->copy_to_host(gpu, got, b->gpu + 7, bytes);
        const int same = memcmp(got, b->cpu + 7, bytes) == 0;
        report(t, "part out", 0.0, 0.0, same, same ? NULL : "  (bytes differ)");
        free(got);
        free(part);
    }

    t->op = "copy";
    {
        tbuf *src = buf_input(t, n, -1, 1);
        tbuf *whole = buf_output(t, n), *part = buf_input(t, n, -1, 1);
        tbuf *bytes = buf_input(t, n, -1, 1);
        for (int g = 0; g < 2; g++) {
            rp_backend *be = side(t, g);
            be->copy(be, at(whole, g), at(src, g), n * sizeof(float));
            be->copy(be, at(part, g) + 3, at(src, g) + 11, (n - 20) * sizeof(float));
            /* byte granularity: 1 byte in, 2 bytes into the source, 4k+3 bytes */
            be->copy(be, (char *)at(bytes, g) + 1, (const char *)at(src, g) + 2,
                     (n / 2) * sizeof(float) + 3);
        }
        compare_exact(t, "whole", whole);
        compare_exact(t, "part, offsets", part);
        compare_exact(t, "odd bytes", bytes);
    }

    t->op = "fill_zero";
    {
        tbuf *b = buf_input(t, n, -1, 1);
        for (int g = 0; g < 2; g++)
            side(t, g)->fill_zero(side(t, g), at(b, g) + 9, (n / 2) * sizeof(float));
        compare_exact(t, "part", b);
    }

    t->op = "add";
    {
        tbuf *y = buf_accum(t, n, -1, 1), *x = buf_input(t, n, -1, 1);
        tbuf *y1 = buf_accum(t, n, -1, 1);
        for (int g = 0; g < 2; g++) {
            side(t, g)->add(side(t, g), at(y, g), at(x, g), n);
            side(t, g)->add(side(t, g), at(y1, g) + 1, at(x, g) + 2, n - 3); /* misaligned */
        }
        compare(t, "y", y);
        compare(t, "y (offsets)", y1);
    }
}

/* ---- position-wise forward and backward ---------------------------------- */

/* x [R,C] = emb [V,C] rows at tokens */
static void check_embedding(twin *t, const shape *sh) {
    const int R = spec_rows(&sh->prefill), C = sh->C, V = sh->V_embed;
    label(t, "R=%d C=%d V=%d", R, C, V);
    int32_t *tokens = xmalloc((size_t)R * sizeof *tokens);
    make_tokens(t, tokens, R, V);
    tbuf *emb = buf_input(t, (size_t)V * C, -1, 1), *x = buf_output(t, (size_t)R * C);
    for (int g = 0; g < 2; g++)
        side(t, g)->embedding(side(t, g), at(x, g), at(emb, g), tokens, R, C);
    compare(t, "x", x);
    free(tokens);
}

/* demb [V,C] += dx [R,C] rows at tokens (repeated tokens add up in row order) */
static void check_embedding_backward(twin *t, const shape *sh) {
    const int R = spec_rows(&sh->prefill), C = sh->C, V = sh->V_embed;
    label(t, "R=%d C=%d V=%d", R, C, V);
    int32_t *tokens = xmalloc((size_t)R * sizeof *tokens);
    make_tokens(t, tokens, R, V);
    tbuf *demb = buf_accum(t, (size_t)V * C, -1, 1), *dx = buf_input(t, (size_t)R * C, -1, 1);
    for (int g = 0; g < 2; g++)
        side(t, g)->embedding_backward(side(t, g), at(demb, g), at(dx, g), tokens, R, C);
    compare(t, "demb", demb);
    free(tokens);
}

/* y [R,C] = LN(x) w + b, mean/rstd [R]; the residual stream has a mean */
static void check_layernorm(twin *t, const shape *sh) {
    const int R = spec_rows(&sh->prefill), C = sh->C;
    const size_t n = (size_t)R * C;
    label(t, "R=%d C=%d", R, C);
    tbuf *x = buf_input(t, n, -1.5, 2.5), *w = buf_input(t, C, 0.5, 1.5);
    tbuf *b = buf_input(t, C, -0.5, 0.5);
    tbuf *y = buf_output(t, n), *mean = buf_output(t, R), *rstd = buf_output(t, R);
    tbuf *y_only = buf_output(t, n);
    for (int g = 0; g < 2; g++) {
        rp_backend *be = side(t, g);
        be->layernorm(be, at(y, g), at(mean, g), at(rstd, g), at(x, g), at(w, g), at(b, g), R,
                      C, LN_EPS);
        be->layernorm(be, at(y_only, g), NULL, NULL, at(x, g), at(w, g), at(b, g), R, C,
                      LN_EPS);
    }
    compare(t, "y", y);
    compare(t, "mean", mean);
    compare(t, "rstd", rstd);
    compare(t, "y (no stats)", y_only);
}

/* dx [R,C] +=, dweight [C] +=, dbias [C] += ; mean/rstd from the CPU forward */
static void check_layernorm_backward(twin *t, const shape *sh) {
    const int R = spec_rows(&sh->prefill), C = sh->C;
    const size_t n = (size_t)R * C;
    label(t, "R=%d C=%d", R, C);
    tbuf *x = buf_input(t, n, -1.5, 2.5), *w = buf_input(t, C, 0.5, 1.5);
    tbuf *b = buf_input(t, C, -0.5, 0.5);
    tbuf *y = buf_zero(t, n), *mean = buf_zero(t, R), *rstd = buf_zero(t, R);
    t->cpu->layernorm(t->cpu, y->cpu, mean->cpu, rstd->cpu, x->cpu, w->cpu, b->cpu, R, C,
                      LN_EPS);
    buf_share_cpu(t, mean);
    buf_share_cpu(t, rstd);
    tbuf *dy = buf_input(t, n, -1, 1), *dx = buf_accum(t, n, -1, 1);
    tbuf *dw = buf_accum(t, C, -1, 1), *db = buf_accum(t, C, -1, 1);
    for (int g = 0; g < 2; g++)
        side(t, g)->layernorm_backward(side(t, g), at(dx, g), at(dw, g), at(db, g), at(dy, g),
                                       at(x, g), at(mean, g), at(rstd, g), at(w, g), R, C);
    compare(t, "dx", dx);
    compare(t, "dweight", dw);
    compare(t, "dbias", db);
}

/* y [R,C] = GroupNorm(x; H heads of N) w + b, mean/rstd [R,H] */
static void check_groupnorm(twin *t, const shape *sh) {
    const int R = spec_rows(&sh->prefill), C = sh->C, N = HEAD_SIZE, H = C / N;
    const size_t n = (size_t)R * C;
    label(t, "R=%d C=%d N=%d", R, C, N);
    tbuf *x = buf_input(t, n, -2, 2), *w = buf_input(t, C, 0.5, 1.5);
    tbuf *b = buf_input(t, C, -0.5, 0.5);
    tbuf *y = buf_output(t, n), *mean = buf_output(t, (size_t)R * H);
    tbuf *rstd = buf_output(t, (size_t)R * H), *y_only = buf_output(t, n);
    for (int g = 0; g < 2; g++) {
        rp_backend *be = side(t, g);
        be->groupnorm(be, at(y, g), at(mean, g), at(rstd, g), at(x, g), at(w, g), at(b, g), R,
                      C, N, GN_EPS);
        be->groupnorm(be, at(y_only, g), NULL, NULL, at(x, g), at(w, g), at(b, g), R, C, N,
                      GN_EPS);
    }
    compare(t, "y", y);
    compare(t, "mean", mean);
    compare(t, "rstd", rstd);
    compare(t, "y (no stats)", y_only);
}

/* dx [R,C] overwrite, dweight/dbias [C] += */
static void check_groupnorm_backward(twin *t, const shape *sh) {
    const int R = spec_rows(&sh->prefill), C = sh->C, N = HEAD_SIZE, H = C / N;
    const size_t n = (size_t)R * C;
    label(t, "R=%d C=%d N=%d", R, C, N);
    tbuf *x = buf_input(t, n, -2, 2), *w = buf_input(t, C, 0.5, 1.5);
    tbuf *b = buf_input(t, C, -0.5, 0.5);
    tbuf *y = buf_zero(t, n), *mean = buf_zero(t, (size_t)R * H);
    tbuf *rstd = buf_zero(t, (size_t)R * H);
    t->cpu->groupnorm(t->cpu, y->cpu, mean->cpu, rstd->cpu, x->cpu, w->cpu, b->cpu, R, C, N,
                      GN_EPS);
    buf_share_cpu(t, mean);
    buf_share_cpu(t, rstd);
    tbuf *dy = buf_input(t, n, -1, 1), *dx = buf_output(t, n);
    tbuf *dw = buf_accum(t, C, -1, 1), *db = buf_accum(t, C, -1, 1);
    for (int g = 0; g < 2; g++)
        side(t, g)->groupnorm_backward(side(t, g), at(dx, g), at(dw, g), at(db, g), at(dy, g),
                                       at(x, g), at(mean, g), at(rstd, g), at(w, g), R, C, N);
    compare(t, "dx", dx);
    compare(t, "dweight", dw);
    compare(t, "dbias", db);
}

/* prev [R,C] = x shifted by one row inside each sequence, the slot vector
 * first; the slot vector becomes the last row. state_offset picks the att or
 * ffn vector inside the slot. */
static void token_shift_case(twin *t, const shape *sh, const seq_spec *spec, const char *mode,
                             size_t state_offset) {
    twin_batch tb;
    const rp_batch *batch = batch_make(&tb, spec);
    const int R = batch->n_rows, C = sh->C;
    const size_t stride = state_stride(C);
    label(t, "%s R=%d C=%d seqs=%d", mode, R, C, batch->n_seq);
    tbuf *x = buf_input(t, (size_t)R * C, -1, 1), *prev = buf_output(t, (size_t)R * C);
    tbuf *state = buf_input(t, sh->n_slots * stride, -1, 1);
    for (int g = 0; g < 2; g++)
        side(t, g)->token_shift(side(t, g), at(prev, g), at(x, g), at(state, g) + state_offset,
                                stride, batch, C);
    compare(t, "prev", prev);
    compare(t, "state", state);
}

static void check_token_shift(twin *t, const shape *sh) {
    token_shift_case(t, sh, &sh->prefill, "seq", state_att_offset(sh->C));
    token_shift_case(t, sh, &sh->step, "step", state_ffn_offset(sh->C));
}

/* dx [R,C] += dprev of the next row; the slot holds d(state after) on entry,
 * d(state before) on return */
static void token_shift_backward_case(twin *t, const shape *sh, const seq_spec *spec,
                                      const char *mode, size_t state_offset) {
    twin_batch tb;
    const rp_batch *batch = batch_make(&tb, spec);
    const int R = batch->n_rows, C = sh->C;
    const size_t stride = state_stride(C);
    label(t, "%s R=%d C=%d seqs=%d", mode, R, C, batch->n_seq);
    tbuf *dx = buf_accum(t, (size_t)R * C, -1, 1), *dprev = buf_input(t, (size_t)R * C, -1, 1);
    tbuf *dstate = buf_input(t, sh->n_slots * stride, -1, 1);
    for (int g = 0; g < 2; g++)
        side(t, g)->token_shift_backward(side(t, g), at(dx, g), at(dstate, g) + state_offset,
                                         stride, at(dprev, g), batch, C);
    compare(t, "dx", dx);
    compare(t, "dstate", dstate);
}

static void check_token_shift_backward(twin *t, const shape *sh) {
    token_shift_backward_case(t, sh, &sh->prefill, "seq", state_ffn_offset(sh->C));
    token_shift_backward_case(t, sh, &sh->step, "step", state_att_offset(sh->C));
}

/* y [R,C] = x + (prev - x) mu, mu [C] */
static void check_lerp(twin *t, const shape *sh) {
    const int R = spec_rows(&sh->prefill), C = sh->C;
    const size_t n = (size_t)R * C;
    label(t, "R=%d C=%d", R, C);
    tbuf *x = buf_input(t, n, -1, 1), *prev = buf_input(t, n, -1, 1);
    tbuf *mu = buf_input(t, C, 0, 1), *y = buf_output(t, n);
    for (int g = 0; g < 2; g++)
        side(t, g)->lerp(side(t, g), at(y, g), at(x, g), at(prev, g), at(mu, g), R, C);
    compare(t, "y", y);
}

/* dx, dprev [R,C] +=, dmu [C] += */
static void check_lerp_backward(twin *t, const shape *sh) {
    const int R = spec_rows(&sh->prefill), C = sh->C;
    const size_t n = (size_t)R * C;
    label(t, "R=%d C=%d", R, C);
    tbuf *x = buf_input(t, n, -1, 1), *prev = buf_input(t, n, -1, 1);
    tbuf *mu = buf_input(t, C, 0, 1), *dy = buf_input(t, n, -1, 1);
    tbuf *dx = buf_accum(t, n, -1, 1), *dprev = buf_accum(t, n, -1, 1);
    tbuf *dmu = buf_accum(t, C, -1, 1);
    for (int g = 0; g < 2; g++)
        side(t, g)->lerp_backward(side(t, g), at(dx, g), at(dprev, g), at(dmu, g), at(dy, g),
                                  at(x, g), at(prev, g), at(mu, g), R, C);
    compare(t, "dx", dx);
    compare(t, "dprev", dprev);
    compare(t, "dmu", dmu);
}

/* The n_mix mixes an op writes and their mu vectors (random in [0, 1]). */
typedef struct {
    int n_mix;
    tbuf *mu[RP_MIX_MAX], *mix[RP_MIX_MAX];
} mix_bufs;

static void mix_bufs_make(twin *t, mix_bufs *mb, int n_mix, size_t n, int C) {
    mb->n_mix = n_mix;
    for (int i = 0; i < n_mix; i++) {
        mb->mu[i] = buf_input(t, C, 0, 1);
        mb->mix[i] = buf_output(t, n);
    }
}

/* Side g's pointers, as the ops take them. */
static void mix_bufs_side(const mix_bufs *mb, int g, float **m, const float **u) {
    for (int i = 0; i < mb->n_mix; i++) {
        m[i] = at(mb->mix[i], g);
        u[i] = at(mb->mu[i], g);
    }
}

static void mix_bufs_compare(twin *t, const mix_bufs *mb) {
    for (int i = 0; i < mb->n_mix; i++) compare(t, "mix", mb->mix[i]);
}

/* shift_mix: token shift (shift 1; else prev is an input) and n_mix lerps */
static void shift_mix_case(twin *t, const shape *sh, const seq_spec *spec, const char *mode,
                           int n_mix, int shift) {
    twin_batch tb;
    const rp_batch *batch = batch_make(&tb, spec);
    const int R = batch->n_rows, C = sh->C;
    const size_t n = (size_t)R * C, stride = state_stride(C);
    label(t, "%s R=%d C=%d seqs=%d mixes=%d %s", mode, R, C, batch->n_seq, n_mix,
          shift ? "shift" : "prev given");
    tbuf *x = buf_input(t, n, -1, 1);
    tbuf *prev = shift ? buf_output(t, n) : buf_input(t, n, -1, 1);
    tbuf *state = buf_input(t, sh->n_slots * stride, -1, 1);
    mix_bufs mb;
    mix_bufs_make(t, &mb, n_mix, n, C);
    for (int g = 0; g < 2; g++) {
        float *m[RP_MIX_MAX];
        const float *u[RP_MIX_MAX];
        mix_bufs_side(&mb, g, m, u);
        side(t, g)->shift_mix(side(t, g), at(prev, g), m, u, n_mix, at(x, g),
                              shift ? at(state, g) + state_att_offset(C) : NULL, stride, batch,
                              C);
    }
    if (shift) compare(t, "prev", prev);
    compare(t, "state", state);
    mix_bufs_compare(t, &mb);
}

static void check_shift_mix(twin *t, const shape *sh) {
    shift_mix_case(t, sh, &sh->prefill, "seq", RP_MIX_MAX, 1);
    shift_mix_case(t, sh, &sh->prefill, "seq", RP_MIX_MAX, 0);
    shift_mix_case(t, sh, &sh->prefill, "seq", 1, 1);
    shift_mix_case(t, sh, &sh->step, "step", RP_MIX_MAX, 1);
}

/* ln_shift_mix_train (GPU, one kernel above RP_GEMV_MAX_M rows) against the
 * CPU's copy, layernorm then shift_mix (the ops the model runs without it):
 * x_save (the backward's x_in, written in the same pass: x bit for bit), xa,
 * mean, rstd, prev, the state slots and the mixes. */
static void ln_shift_mix_train_case(twin *t, const shape *sh, const seq_spec *spec,
                                    const char *mode, int n_mix) {
    twin_batch tb;
    const rp_batch *batch = batch_make(&tb, spec);
    const int R = batch->n_rows, C = sh->C;
    const size_t n = (size_t)R * C, stride = state_stride(C);
    label(t, "%s R=%d C=%d seqs=%d mixes=%d", mode, R, C, batch->n_seq, n_mix);
    tbuf *x = buf_input(t, n, -1.5, 2.5), *w = buf_input(t, C, 0.5, 1.5);
    tbuf *b = buf_input(t, C, -0.5, 0.5);
    tbuf *xa = buf_output(t, n), *mean = buf_output(t, R), *rstd = buf_output(t, R);
    tbuf *prev = buf_output(t, n), *x_save = buf_output(t, n);
    tbuf *state = buf_input(t, sh->n_slots * stride, -1, 1);
    mix_bufs mb;
    mix_bufs_make(t, &mb, n_mix, n, C);
    for (int g = 0; g < 2; g++) {
        rp_backend *be = side(t, g);
        float *m[RP_MIX_MAX];
        const float *u[RP_MIX_MAX];
        mix_bufs_side(&mb, g, m, u);
        float *st = at(state, g) + state_ffn_offset(C);
        if (g) {
            be->ln_shift_mix_train(be, at(x_save, g), at(xa, g), at(mean, g), at(rstd, g),
                                   at(prev, g), m, u, n_mix, at(x, g), at(w, g), at(b, g),
                                   LN_EPS, st, stride, batch, C);
        } else {
            be->copy(be, at(x_save, g), at(x, g), n * sizeof(float));
            be->layernorm(be, at(xa, g), at(mean, g), at(rstd, g), at(x, g), at(w, g),
                          at(b, g), R, C, LN_EPS);
            be->shift_mix(be, at(prev, g), m, u, n_mix, at(xa, g), st, stride, batch, C);
        }
    }
    compare_exact(t, "x_save", x_save);
    compare(t, "xa", xa);
    compare(t, "mean", mean);
    compare(t, "rstd", rstd);
    compare(t, "prev", prev);
    compare(t, "state", state);
    mix_bufs_compare(t, &mb);
}

static void check_ln_shift_mix_train(twin *t, const shape *sh) {
    ln_shift_mix_train_case(t, sh, &sh->prefill, "seq", RP_MIX_MAX);
    ln_shift_mix_train_case(t, sh, &sh->prefill, "seq", 1);
    ln_shift_mix_train_case(t, sh, &sh->cont, "cont", RP_MIX_MAX);
    ln_shift_mix_train_case(t, sh, &sh->step, "step", 1);
}

/* The mix terms of a shift_mix_backward-style case: mu [C], dmu [C] (+=)
 * and dmix [R,C] per term; with all six, terms 3 and 4 share mu and dmu (the
 * model's two uses of xv). */
typedef struct {
    int n_terms;
    tbuf *mu[RP_MIX_TERMS_MAX], *dmu[RP_MIX_TERMS_MAX], *dmix[RP_MIX_TERMS_MAX];
} mix_term_bufs;

static void mix_terms_make(twin *t, mix_term_bufs *mt, int n_terms, size_t n, int C) {
    mt->n_terms = n_terms;
    for (int j = 0; j < n_terms; j++) {
        const int shared = n_terms == RP_MIX_TERMS_MAX && j == 4;
        mt->mu[j] = shared ? mt->mu[3] : buf_input(t, C, 0, 1);
        mt->dmu[j] = shared ? mt->dmu[3] : buf_accum(t, C, -1, 1);
        mt->dmix[j] = buf_input(t, n, -1, 1);
    }
}

/* Side g's pointers, as the op takes them. */
static void mix_terms_side(const mix_term_bufs *mt, int g, float **d, const float **m,
                           const float **u) {
    for (int j = 0; j < mt->n_terms; j++) {
        d[j] = at(mt->dmu[j], g);
        m[j] = at(mt->dmix[j], g);
        u[j] = at(mt->mu[j], g);
    }
}

/* Each dmu once (the shared one is compared as term 3). */
static void mix_terms_compare(twin *t, const mix_term_bufs *mt) {
    for (int j = 0; j < mt->n_terms; j++)
        if (!(mt->n_terms == RP_MIX_TERMS_MAX && j == 4)) compare(t, "dmu", mt->dmu[j]);
}

/* shift_mix_backward: dx overwrite (with the token shift), dmu [C] += per
 * term (terms 3 and 4 share one, as the model's two uses of xv), the slot's
 * d(state after) in, d(state before) out */
static void shift_mix_backward_case(twin *t, const shape *sh, const seq_spec *spec,
                                    const char *mode, int n_terms) {
    twin_batch tb;
    const rp_batch *batch = batch_make(&tb, spec);
    const int R = batch->n_rows, C = sh->C;
    const size_t n = (size_t)R * C, stride = state_stride(C);
    label(t, "%s R=%d C=%d seqs=%d terms=%d", mode, R, C, batch->n_seq, n_terms);
    tbuf *x = buf_input(t, n, -1, 1), *prev = buf_input(t, n, -1, 1);
    tbuf *dstate = buf_input(t, sh->n_slots * stride, -1, 1);
    tbuf *dx = buf_output(t, n), *dprev = buf_output(t, n);
    mix_term_bufs mt;
    mix_terms_make(t, &mt, n_terms, n, C);
    for (int g = 0; g < 2; g++) {
        float *d[RP_MIX_TERMS_MAX];
        const float *m[RP_MIX_TERMS_MAX], *u[RP_MIX_TERMS_MAX];
        mix_terms_side(&mt, g, d, m, u);
        side(t, g)->shift_mix_backward(side(t, g), at(dx, g), at(dprev, g), d, m, u, n_terms,
                                       at(x, g), at(prev, g),
                                       at(dstate, g) + state_ffn_offset(C), stride, batch, C);
    }
    compare(t, "dx", dx);
    compare(t, "dstate", dstate);
    mix_terms_compare(t, &mt);
}

static void check_shift_mix_backward(twin *t, const shape *sh) {
    shift_mix_backward_case(t, sh, &sh->prefill, "seq", RP_MIX_TERMS_MAX);
    shift_mix_backward_case(t, sh, &sh->prefill, "seq", 1);
    shift_mix_backward_case(t, sh, &sh->step, "step", RP_MIX_TERMS_MAX);
}

/* "Mixes formed again" (backend.h ln_mix_again_fits, issue 15): training
 * stores no xa and a prev with only each sequence's first row (the state it
 * started from); ln_mix_again and shift_mix_ln_backward with xa NULL form xa
 * from x, mean, rstd, weight, bias and the rest of prev as xa's token shift.
 * The CPU reference is the stored form: the CPU's layernorm gives xa (and the
 * mean/rstd both sides read), prev is xa shifted by one row with the first
 * rows given. The GPU's prev is the compact form training keeps (backend.h:
 * [n_seq, C], row s = sequence s's first row) with NaN in the rows past
 * n_seq, so a kernel that reads prev at a row's own index fails the
 * comparison. compact 0: the stored form on both sides (xa and the full prev
 * on the GPU too). */
typedef struct {
    tbuf *x, *w, *b, *xa, *mean, *rstd;
    tbuf *prev; /* CPU: the full token shift; GPU: the same, or compact: [n_seq, C] first
                 * rows, NaN after */
} ln_again_bufs;

static void ln_again_make(twin *t, ln_again_bufs *la, const rp_batch *batch, int C,
                          int compact) {
    const int R = batch->n_rows;
    const size_t n = (size_t)R * C;
    la->x = buf_input(t, n, -1.5, 2.5);
    la->w = buf_input(t, C, 0.5, 1.5);
    la->b = buf_input(t, C, -0.5, 0.5);
    la->xa = buf_zero(t, n);
    la->mean = buf_zero(t, R);
    la->rstd = buf_zero(t, R);
    t->cpu->layernorm(t->cpu, la->xa->cpu, la->mean->cpu, la->rstd->cpu, la->x->cpu, la->w->cpu,
                      la->b->cpu, R, C, LN_EPS);
    if (!compact) buf_share_cpu(t, la->xa);
    buf_share_cpu(t, la->mean);
    buf_share_cpu(t, la->rstd);
    float *full = xmalloc(n * sizeof *full), *first = xmalloc(n * sizeof *first);
    fill_uniform(t, full, n, -1, 1); /* the first rows: the states the sequences start from */
    memset(first, 0xFF, n * sizeof *first);
    for (int s = 0; s < batch->n_seq; s++) {
        const size_t r0 = (size_t)batch->row_begin[s];
        memcpy(first + (size_t)s * C, full + r0 * C, (size_t)C * sizeof *first);
        for (size_t r = r0 + 1; r < r0 + (size_t)batch->seq_len[s]; r++)
            memcpy(full + r * C, la->xa->cpu + (r - 1) * C, (size_t)C * sizeof *full);
    }
    la->prev = buf_from(t, full, n);
    if (compact) t->gpu->copy_to_device(t->gpu, la->prev->gpu, first, n * sizeof *first);
    free(full);
    free(first);
}

/* 0 (and a note) when the GPU backend does not form xa again at this shape:
 * the model stores xa there, so there is nothing to compare. */
static int ln_again_fits(twin *t, const rp_batch *batch, int C) {
    if (t->gpu->ln_mix_again_fits(t->gpu, batch, C)) return 1;
    printf("      (skipped: ln_mix_again_fits refuses R=%d C=%d)\n", batch->n_rows, C);
    return 0;
}

/* shift_mix_ln_backward (GPU, fused) against the CPU's shift_mix_backward
 * then layernorm_backward (the ops the model runs without it): dx [R,C] +=,
 * dweight, dbias, the dmu += and the slots' d(state). mean/rstd from the CPU
 * forward of the norm's input. again: xa NULL on the GPU (formed again from
 * x, mean, rstd, weight, bias) and prev in its compact form. */
static void shift_mix_ln_backward_case(twin *t, const shape *sh, const seq_spec *spec,
                                       const char *mode, int n_terms, int again) {
    twin_batch tb;
    const rp_batch *batch = batch_make(&tb, spec);
    const int R = batch->n_rows, C = sh->C;
    const size_t n = (size_t)R * C, stride = state_stride(C);
    label(t, "%s R=%d C=%d seqs=%d terms=%d%s", mode, R, C, batch->n_seq, n_terms,
          again ? " xa NULL" : "");
    if (again && !ln_again_fits(t, batch, C)) return;
    ln_again_bufs la;
    ln_again_make(t, &la, batch, C, again);
    tbuf *dstate = buf_input(t, sh->n_slots * stride, -1, 1);
    tbuf *dxa = buf_output(t, n), *dprev = buf_output(t, n), *dx = buf_accum(t, n, -1, 1);
    tbuf *dw = buf_accum(t, C, -1, 1), *db = buf_accum(t, C, -1, 1);
    mix_term_bufs mt;
    mix_terms_make(t, &mt, n_terms, n, C);
    for (int g = 0; g < 2; g++) {
        rp_backend *be = side(t, g);
        float *d[RP_MIX_TERMS_MAX];
        const float *m[RP_MIX_TERMS_MAX], *u[RP_MIX_TERMS_MAX];
        mix_terms_side(&mt, g, d, m, u);
        float *ds = at(dstate, g) + state_att_offset(C);
        if (g) {
            be->shift_mix_ln_backward(be, at(dx, g), at(dw, g), at(db, g), at(dxa, g),
                                      at(dprev, g), d, m, u, n_terms, again ? NULL : at(la.xa, g),
                                      at(la.prev, g), ds, stride, at(la.x, g), at(la.mean, g),
                                      at(la.rstd, g), at(la.w, g), again ? at(la.b, g) : NULL,
                                      batch, C);
        } else {
            be->shift_mix_backward(be, at(dxa, g), at(dprev, g), d, m, u, n_terms, at(la.xa, g),
                                   at(la.prev, g), ds, stride, batch, C);
            be->layernorm_backward(be, at(dx, g), at(dw, g), at(db, g), at(dxa, g), at(la.x, g),
                                   at(la.mean, g), at(la.rstd, g), at(la.w, g), R, C);
        }
    }
    compare(t, "dx", dx);
    compare(t, "dweight", dw);
    compare(t, "dbias", db);
    compare(t, "dstate", dstate);
    mix_terms_compare(t, &mt);
}

static void check_shift_mix_ln_backward(twin *t, const shape *sh) {
    shift_mix_ln_backward_case(t, sh, &sh->prefill, "seq", RP_MIX_TERMS_MAX, 0);
    shift_mix_ln_backward_case(t, sh, &sh->prefill, "seq", 1, 0);
    shift_mix_ln_backward_case(t, sh, &sh->cont, "cont", 6, 0);
    shift_mix_ln_backward_case(t, sh, &sh->step, "step", RP_MIX_TERMS_MAX, 0);
}

/* ln_mix_again (GPU) against the CPU's shift_mix of the stored xa and prev. */
static void ln_mix_again_case(twin *t, const shape *sh, const seq_spec *spec, const char *mode,
                              int n_mix) {
    twin_batch tb;
    const rp_batch *batch = batch_make(&tb, spec);
    const int R = batch->n_rows, C = sh->C;
    const size_t n = (size_t)R * C;
    label(t, "%s R=%d C=%d seqs=%d mixes=%d", mode, R, C, batch->n_seq, n_mix);
    if (!ln_again_fits(t, batch, C)) return;
    ln_again_bufs la;
    ln_again_make(t, &la, batch, C, 1);
    mix_bufs mb;
    mix_bufs_make(t, &mb, n_mix, n, C);
    for (int g = 0; g < 2; g++) {
        rp_backend *be = side(t, g);
        float *m[RP_MIX_MAX];
        const float *u[RP_MIX_MAX];
        mix_bufs_side(&mb, g, m, u);
        if (g)
            be->ln_mix_again(be, m, u, n_mix, at(la.prev, g), at(la.x, g), at(la.mean, g),
                             at(la.rstd, g), at(la.w, g), at(la.b, g), batch, C);
        else
            be->shift_mix(be, at(la.prev, g), m, u, n_mix, at(la.xa, g), NULL, state_stride(C),
                          batch, C);
    }
    mix_bufs_compare(t, &mb);
}

static void check_ln_mix_again(twin *t, const shape *sh) {
    ln_mix_again_case(t, sh, &sh->prefill, "seq", RP_MIX_MAX);
    ln_mix_again_case(t, sh, &sh->prefill, "seq", 3); /* the channel mix's three */
    ln_mix_again_case(t, sh, &sh->cont, "cont", RP_MIX_MAX);
}

/* shift_mix_ln_backward with xa NULL (GPU) against the CPU's
 * shift_mix_backward on the stored xa and prev, then layernorm_backward. */
static void check_shift_mix_ln_backward_again(twin *t, const shape *sh) {
    shift_mix_ln_backward_case(t, sh, &sh->prefill, "seq", RP_MIX_TERMS_MAX, 1);
    shift_mix_ln_backward_case(t, sh, &sh->prefill, "seq", 3, 1);
    shift_mix_ln_backward_case(t, sh, &sh->cont, "cont", 6, 1);
}

/* The activations as the model uses them: after a C-wide bias, on a LoRA
 * hidden layer (width = rank, no bias), on the FFN hidden layer (width F). */
typedef struct {
    rp_activation act;
    int width; /* 0: C, 1: rank, 2: F */
    int with_bias;
} act_case;

static const act_case act_cases[] = {
    {RP_ACT_NONE, 0, 1},    {RP_ACT_TANH, 0, 1},    {RP_ACT_SIGMOID, 0, 1},
    {RP_ACT_RELU_SQUARED, 0, 1}, {RP_ACT_TANH, 1, 0}, {RP_ACT_SIGMOID, 1, 0},
    {RP_ACT_RELU_SQUARED, 2, 0},
};

static const char *act_name(rp_activation act) {
    switch (act) {
    case RP_ACT_NONE: return "none";
    case RP_ACT_TANH: return "tanh";
    case RP_ACT_SIGMOID: return "sigmoid";
    case RP_ACT_RELU_SQUARED: return "relu^2";
    }
    return "?";
}

static int act_width(const shape *sh, const act_case *c) {
    return c->width == 0 ? sh->C : c->width == 1 ? sh->rank : sh->F;
}

/* y [R,W] = act(y + bias), in place */
static void check_bias_act(twin *t, const shape *sh) {
    const int R = spec_rows(&sh->prefill);
    for (size_t i = 0; i < sizeof act_cases / sizeof act_cases[0]; i++) {
        const act_case *c = &act_cases[i];
        const int W = act_width(sh, c);
        label(t, "%s R=%d C=%d %s", act_name(c->act), R, W, c->with_bias ? "bias" : "no bias");
        tbuf *y = buf_input(t, (size_t)R * W, -3, 3);
        tbuf *bias = c->with_bias ? buf_input(t, W, -0.5, 0.5) : NULL;
        for (int g = 0; g < 2; g++)
            side(t, g)->bias_act(side(t, g), at(y, g), bias ? at(bias, g) : NULL, R, W, c->act);
        compare(t, "y", y);
        twin_release(t);
    }
}

/* dy [R,W] *= act'(from y) in place, dbias [W] += (optional); y is a real
 * forward output (the CPU's) */
static void check_bias_act_backward(twin *t, const shape *sh) {
    const int R = spec_rows(&sh->prefill);
    for (size_t i = 0; i < sizeof act_cases / sizeof act_cases[0]; i++) {
        const act_case *c = &act_cases[i];
        const int W = act_width(sh, c);
        label(t, "%s R=%d C=%d %s", act_name(c->act), R, W, c->with_bias ? "dbias" : "no dbias");
        tbuf *y = buf_input(t, (size_t)R * W, -3, 3);
        t->cpu->bias_act(t->cpu, y->cpu, NULL, R, W, c->act);
        buf_share_cpu(t, y);
        tbuf *dy = buf_input(t, (size_t)R * W, -1, 1);
        tbuf *dbias = c->with_bias ? buf_accum(t, W, -1, 1) : NULL;
        for (int g = 0; g < 2; g++)
            side(t, g)->bias_act_backward(side(t, g), at(dy, g), dbias ? at(dbias, g) : NULL,
                                          at(y, g), R, W, c->act);
        compare(t, "dy", dy);
        if (dbias) compare(t, "dbias", dbias);
        twin_release(t);
    }
}

/* v [R,C] += (v_first - v) nu, in place */
static void check_value_residual(twin *t, const shape *sh) {
    const int R = spec_rows(&sh->prefill), C = sh->C;
    const size_t n = (size_t)R * C;
    label(t, "R=%d C=%d", R, C);
    tbuf *v = buf_input(t, n, -1, 1), *v_first = buf_input(t, n, -1, 1);
    tbuf *nu = buf_input(t, n, 0, 1);
    tbuf *v_in = buf_from(t, v->cpu, n), *v_out = buf_output(t, n); /* v's values */
    for (int g = 0; g < 2; g++)
        side(t, g)->value_residual(side(t, g), at(v, g), at(v_first, g), at(nu, g), R, C);
    compare(t, "v", v);
    /* value_residual_from (out of place: training's copy of v_pre folded in)
     * against the in-place op on the same values, bit for bit */
    if (t->gpu->value_residual_from) {
        t->gpu->value_residual_from(t->gpu, v_out->gpu, v_in->gpu, v_first->gpu, nu->gpu, NULL,
                                    R, C);
        compare_gpu_exact(t, "v (from v_in) == v (in place)", v_out, v);
        compare_exact(t, "v_in untouched", v_in);
    }
}

/* dv in place, dv_first +=, dnu overwrite */
static void check_value_residual_backward(twin *t, const shape *sh) {
    const int R = spec_rows(&sh->prefill), C = sh->C;
    const size_t n = (size_t)R * C;
    label(t, "R=%d C=%d", R, C);
    tbuf *v = buf_input(t, n, -1, 1), *v_first = buf_input(t, n, -1, 1);
    tbuf *nu = buf_input(t, n, 0, 1), *dv = buf_input(t, n, -1, 1);
    tbuf *dv_first = buf_accum(t, n, -1, 1), *dnu = buf_output(t, n);
    for (int g = 0; g < 2; g++)
        side(t, g)->value_residual_backward(side(t, g), at(dv, g), at(dv_first, g), at(dnu, g),
                                            at(v, g), at(v_first, g), at(nu, g), R, C);
    compare(t, "dv", dv);
    compare(t, "dv_first", dv_first);
    compare(t, "dnu", dnu);
}

/* kk [R,C] = normalize_per_head(k k_k) (overwrite), k *= 1 + (a - 1) k_a in
 * place. Head 0 of row 0 is all zero: the norm's 1e-12 clamp must keep it 0. */
static void check_key_prepare(twin *t, const shape *sh) {
    const int R = spec_rows(&sh->prefill), C = sh->C;
    const size_t n = (size_t)R * C;
    label(t, "R=%d C=%d", R, C);
    float *k_host = xmalloc(n * sizeof *k_host);
    fill_uniform(t, k_host, n, -1, 1);
    memset(k_host, 0, HEAD_SIZE * sizeof *k_host);
    tbuf *k = buf_from(t, k_host, n), *a = buf_input(t, n, 0, 1);
    tbuf *k_k = buf_input(t, C, 0.5, 1.5), *k_a = buf_input(t, C, 0.5, 1.5);
    tbuf *kk = buf_output(t, n), *k_in = buf_from(t, k_host, n), *k_out = buf_output(t, n);
    tbuf *kk2 = buf_output(t, n);
    for (int g = 0; g < 2; g++)
        side(t, g)->key_prepare(side(t, g), at(kk, g), at(k, g), at(a, g), at(k_k, g),
                                at(k_a, g), R, C, HEAD_SIZE);
    compare(t, "kk", kk);
    compare(t, "k", k);
    /* key_prepare_from (k read from k_in: training's copy of k_pre folded
     * in) against the in-place op on the same values, bit for bit */
    if (t->gpu->key_prepare_from) {
        t->gpu->key_prepare_from(t->gpu, kk2->gpu, k_out->gpu, k_in->gpu, a->gpu, NULL, k_k->gpu,
                                 k_a->gpu, R, C, HEAD_SIZE);
        compare_gpu_exact(t, "kk (from k_in) == kk (in place)", kk2, kk);
        compare_gpu_exact(t, "k (from k_in) == k (in place)", k_out, k);
        compare_exact(t, "k_in untouched", k_in);
    }
    free(k_host);
}

/* dk in place (in: d k_out, out: d k), da +=, dk_k [C] +=, dk_a [C] += */
static void check_key_prepare_backward(twin *t, const shape *sh) {
    const int R = spec_rows(&sh->prefill), C = sh->C;
    const size_t n = (size_t)R * C;
    label(t, "R=%d C=%d", R, C);
    tbuf *k = buf_input(t, n, -1, 1), *a = buf_input(t, n, 0, 1);
    tbuf *k_k = buf_input(t, C, 0.5, 1.5), *k_a = buf_input(t, C, 0.5, 1.5);
    tbuf *dkk = buf_input(t, n, -1, 1), *dk = buf_input(t, n, -1, 1);
    tbuf *da = buf_accum(t, n, -1, 1), *dk_k = buf_accum(t, C, -1, 1);
    tbuf *dk_a = buf_accum(t, C, -1, 1);
    for (int g = 0; g < 2; g++)
        side(t, g)->key_prepare_backward(side(t, g), at(dk, g), at(da, g), at(dk_k, g),
                                         at(dk_a, g), at(dkk, g), at(k, g), at(a, g),
                                         at(k_k, g), at(k_a, g), R, C, HEAD_SIZE);
    compare(t, "dk", dk);
    compare(t, "da", da);
    compare(t, "dk_k", dk_k);
    compare(t, "dk_a", dk_a);
}

/* out [R,C] = (out + (sum_j r_j k_j r_k[h,j]) v_h) g, in place */
static void check_bonus_gate(twin *t, const shape *sh) {
    const int R = spec_rows(&sh->prefill), C = sh->C, N = HEAD_SIZE;
    const size_t n = (size_t)R * C;
    label(t, "R=%d C=%d N=%d", R, C, N);
    tbuf *out = buf_input(t, n, -1, 1), *r = buf_input(t, n, -1, 1);
    tbuf *k = buf_input(t, n, -1, 1), *v = buf_input(t, n, -1, 1);
    tbuf *g_in = buf_input(t, n, -1, 1), *r_k = buf_input(t, C, -1, 1);
    for (int g = 0; g < 2; g++)
        side(t, g)->bonus_gate(side(t, g), at(out, g), at(r, g), at(k, g), at(v, g),
                               at(r_k, g), at(g_in, g), R, C, N);
    compare(t, "out", out);
}

/* d_o, dg overwrite; dr, dk, dv [R,C] +=; dr_k [H,N] += */
static void check_bonus_gate_backward(twin *t, const shape *sh) {
    const int R = spec_rows(&sh->prefill), C = sh->C, N = HEAD_SIZE;
    const size_t n = (size_t)R * C;
    label(t, "R=%d C=%d N=%d", R, C, N);
    tbuf *o = buf_input(t, n, -1, 1), *r = buf_input(t, n, -1, 1);
    tbuf *k = buf_input(t, n, -1, 1), *v = buf_input(t, n, -1, 1);
    tbuf *g_in = buf_input(t, n, -1, 1), *r_k = buf_input(t, C, -1, 1);
    tbuf *dout = buf_input(t, n, -1, 1);
    tbuf *d_o = buf_output(t, n), *dg = buf_output(t, n);
    tbuf *dr = buf_accum(t, n, -1, 1), *dk = buf_accum(t, n, -1, 1);
    tbuf *dv = buf_accum(t, n, -1, 1), *dr_k = buf_accum(t, C, -1, 1);
    for (int g = 0; g < 2; g++)
        side(t, g)->bonus_gate_backward(side(t, g), at(d_o, g), at(dr, g), at(dk, g), at(dv, g),
                                        at(dr_k, g), at(dg, g), at(dout, g), at(o, g), at(r, g),
                                        at(k, g), at(v, g), at(r_k, g), at(g_in, g), R, C, N);
    compare(t, "d_o", d_o);
    compare(t, "dr", dr);
    compare(t, "dk", dk);
    compare(t, "dv", dv);
    compare(t, "dr_k", dr_k);
    compare(t, "dg", dg);
}

/* groupnorm_bonus_gate and its backward (backend.h; CUDA only): the CPU runs
 * the unfused ops (groupnorm, copy + bonus_gate; bonus_gate_backward_beta,
 * groupnorm_backward on its d_o), the GPU the fused op on y (y16: y in bf16
 * in place, as a bf16 WKV7 output, both sides reading the rounded values)
 * and the unfused ops on f32 y; the fused outputs within the twin's
 * tolerance of the CPU and bit for bit the GPU's unfused ones (dy: to 1e-6,
 * below). dr, dk, dv
 * accumulate (beta 1) or are overwritten (beta 0). */
static void buf_round_bf16(twin *t, tbuf *b);
static void dev_widen(twin *t, tbuf *b, const void *src);
/* rkv16 (BF16 math, with y16): r, k, v and g bf16 in place too for the fused
 * ops (training's rkv_only layout; both sides read the rounded values), and the
 * fused backward's dy written bf16 in place under a wkv_only hint, as
 * training has it (the kernels take r, k, v bf16 only with y and dy so):
 * read back widened, within one bf16 rounding of the unfused dy; its dg
 * GEMM-only (its bf16 copy alone), checked through the GEMM that reads it. */
static void groupnorm_bonus_gate_case(twin *t, const shape *sh, int y16, float beta, int rkv16) {
    const int R = spec_rows(&sh->prefill), C = sh->C, N = HEAD_SIZE, H = C / N;
    const size_t n = (size_t)R * C, nh = (size_t)R * H;
    rp_backend *gpu = t->gpu;
    label(t, "R=%d C=%d N=%d y %s%s beta %g", R, C, N, y16 ? "bf16" : "f32",
          rkv16 ? ", r k v g and dy bf16" : "", (double)beta);
    if (!gpu->groupnorm_bonus_gate || !gpu->groupnorm_bonus_gate_backward)
        fatal("%s: the CUDA backend has no groupnorm_bonus_gate", t->op);
    if (rkv16 && (!y16 || !gpu->wkv_only))
        fatal("%s: r, k, v, g bf16 need y bf16 and wkv_only", t->op);
    tbuf *y = buf_input(t, n, -2, 2);
    if (y16) buf_round_bf16(t, y);
    tbuf *y_in = buf_zero(t, n); /* the fused op's y: f32, or bf16 in place */
    t->cpu->copy(t->cpu, y_in->cpu, y->cpu, n * sizeof(float));
    gpu->copy(gpu, y_in->gpu, y->gpu, n * sizeof(float));
    if (y16 && !rp_cuda_backend_store_bf16_inplace(gpu, y_in->gpu, n))
        fatal("%s: storing y in bf16 failed", t->op);
    tbuf *lw = buf_input(t, C, 0.5, 1.5), *lb = buf_input(t, C, -0.5, 0.5);
    tbuf *r = buf_input(t, n, -1, 1), *k = buf_input(t, n, -1, 1), *v = buf_input(t, n, -1, 1);
    tbuf *gi = buf_input(t, n, -1, 1), *r_k = buf_input(t, C, -1, 1);
    tbuf *dout = buf_input(t, n, -1, 1);
    /* the fused ops' r, k, v, g: the same, or their bf16 values in place */
    tbuf *rkv[4] = {r, k, v, gi}, *rkv_in[4] = {r, k, v, gi};
    for (int i = 0; rkv16 && i < 4; i++) {
        buf_round_bf16(t, rkv[i]);
        rkv_in[i] = buf_zero(t, n);
        t->cpu->copy(t->cpu, rkv_in[i]->cpu, rkv[i]->cpu, n * sizeof(float));
        gpu->copy(gpu, rkv_in[i]->gpu, rkv[i]->gpu, n * sizeof(float));
        if (!rp_cuda_backend_store_bf16_inplace(gpu, rkv_in[i]->gpu, n))
            fatal("%s: storing r, k, v, g in bf16 failed", t->op);
    }
    /* forward: o (groupnorm out), og_u = unfused, og = fused on the GPU */
    tbuf *o = buf_output(t, n), *mean = buf_output(t, nh), *rstd = buf_output(t, nh);
    tbuf *og_u = buf_output(t, n), *og = buf_output(t, n);
    tbuf *mean_f = buf_output(t, nh), *rstd_f = buf_output(t, nh);
    for (int g = 0; g < 2; g++) {
        rp_backend *be = side(t, g);
        be->groupnorm(be, at(o, g), at(mean, g), at(rstd, g), at(y, g), at(lw, g), at(lb, g), R,
                      C, N, GN_EPS);
        be->copy(be, at(og_u, g), at(o, g), n * sizeof(float));
        be->bonus_gate(be, at(og_u, g), at(r, g), at(k, g), at(v, g), at(r_k, g), at(gi, g), R,
                       C, N);
        if (g) {
            be->groupnorm_bonus_gate(be, at(og, g), at(mean_f, g), at(rstd_f, g), at(y_in, g),
                                     at(lw, g), at(lb, g), at(rkv_in[0], g), at(rkv_in[1], g),
                                     at(rkv_in[2], g), at(r_k, g), at(rkv_in[3], g), R, C, N,
                                     GN_EPS);
        } else {
            be->copy(be, at(og, g), at(og_u, g), n * sizeof(float));
            be->copy(be, at(mean_f, g), at(mean, g), nh * sizeof(float));
            be->copy(be, at(rstd_f, g), at(rstd, g), nh * sizeof(float));
        }
    }
    compare(t, "out", og);
    compare(t, "mean", mean_f);
    compare(t, "rstd", rstd_f);
    compare_gpu_exact(t, "out = unfused", og, og_u);
    compare_gpu_exact(t, "mean = unfused", mean_f, mean);
    compare_gpu_exact(t, "rstd = unfused", rstd_f, rstd);
    /* backward, from each side's own mean/rstd (and o: the unfused ops) */
    tbuf *d_o = buf_output(t, n);
    tbuf *bk[2][8]; /* [unfused, fused] dy dr dk dv dg dln_w dln_b dr_k */
    for (int f = 0; f < 2; f++) {
        for (int i = 0; i < 5; i++)
            bk[f][i] = beta != 0.0f && i >= 1 && i <= 3 ? buf_accum(t, n, -1, 1) : buf_output(t, n);
        for (int i = 5; i < 8; i++) bk[f][i] = buf_accum(t, C, -1, 1);
    }
    /* the fused buffers start as the unfused ones */
    for (int i = 0; i < 8; i++) {
        tbuf *u = bk[0][i], *fb = bk[1][i];
        t->cpu->copy(t->cpu, fb->cpu, u->cpu, u->n * sizeof(float));
        if (u->before) memcpy(fb->before, u->before, u->n * sizeof(float));
        gpu->copy(gpu, fb->gpu, u->gpu, u->n * sizeof(float));
    }
    /* rkv16: dg GEMM-only as training hints it (the gate LoRA's backward
     * GEMMs alone read it): the up GEMM's backward from it (dX, dW) against
     * the CPU's, and the fused op's f32 dg not written */
    const int D = 64;
    tbuf *lx = buf_input(t, (size_t)R * D, -1, 1), *lw2 = buf_input(t, (size_t)C * D, -0.1, 0.1);
    tbuf *ldx = buf_output(t, (size_t)R * D), *ldw = buf_accum(t, (size_t)C * D, -1, 1);
    float *dg_before = download(t, bk[1][4]);
    for (int g = 0; g < 2; g++) {
        rp_backend *be = side(t, g);
        for (int f = 0; f < 1 + g; f++) {
            float *p[8];
            for (int i = 0; i < 8; i++) p[i] = at(bk[f][i], g);
            if (f) {
                if (rkv16) be->wkv_only(be, p[0], n);
                if (rkv16) be->gemm_only(be, p[4], n);
                be->groupnorm_bonus_gate_backward(be, p[0], p[5], p[6], p[1], p[2], p[3], p[7],
                                                  p[4], at(dout, g), at(y_in, g), at(mean, g),
                                                  at(rstd, g), at(lw, g), at(lb, g),
                                                  at(rkv_in[0], g), at(rkv_in[1], g),
                                                  at(rkv_in[2], g), at(r_k, g),
                                                  at(rkv_in[3], g), R, C, N, beta);
                continue;
            }
            be->bonus_gate_backward_beta(be, at(d_o, g), p[1], p[2], p[3], p[7], p[4],
                                         at(dout, g), at(o, g), at(r, g), at(k, g), at(v, g),
                                         at(r_k, g), at(gi, g), R, C, N, beta);
            be->groupnorm_backward(be, p[0], p[5], p[6], at(d_o, g), at(y, g), at(mean, g),
                                   at(rstd, g), at(lw, g), R, C, N);
        }
        if (!g) /* the CPU side of the fused buffers: the unfused results */
            for (int i = 0; i < 8; i++)
                be->copy(be, bk[1][i]->cpu, bk[0][i]->cpu, bk[0][i]->n * sizeof(float));
        if (rkv16)
            be->matmul_lora_backward_beta(be, at(ldx, g), at(ldw, g), at(bk[1][4], g),
                                          at(lx, g), at(lw2, g), R, C, D, 0.0f);
    }
    if (rkv16) {
        compare(t, "dX (gate LoRA up GEMM, bf16 dg)", ldx);
        compare(t, "dW (gate LoRA up GEMM)", ldw);
        float *dg_after = download(t, bk[1][4]);
        const int untouched = !memcmp(dg_before, dg_after, n * sizeof(float));
        report(t, "dg f32 not written", 0.0, 0.0, untouched, untouched ? "" : "  (written)");
        free(dg_after);
    }
    free(dg_before);
    static const char *names[8] = {"dy", "dr", "dk", "dv", "dg", "dln_w", "dln_b", "dr_k"};
    char what[48];
    if (rkv16) { /* dy bf16 in place: its widened values, one rounding off */
        tbuf *wide = buf_zero(t, n);
        dev_widen(t, wide, bk[1][0]->gpu);
        float *hw = download(t, wide), *hu = download(t, bk[0][0]);
        compare_values(t, "dy (bf16 in place)", hw, bk[0][0]->cpu, NULL, n, TOL_BF16_IO);
        compare_values(t, "dy (bf16 in place) ~ unfused", hw, hu, NULL, n, TOL_BF16_IO);
        free(hw);
        free(hu);
    }
    for (int i = 0; i < 8; i++) {
        if (rkv16 && (i == 0 || i == 4)) continue; /* compared above */
        compare(t, names[i], bk[1][i]);
        snprintf(what, sizeof what, "%s = unfused", names[i]);
        if (i) {
            compare_gpu_exact(t, what, bk[1][i], bk[0][i]);
            continue;
        }
        /* dy: the same expression, but where the compiler contracts a*b+c
         * (nvcc; the FMA build) the fused kernel's d = dz w, kept for the
         * sums, is not contracted into rs (d - mean_d - ...) as the
         * unfused kernel's reloaded product is: the last bits may differ */
        float *hf = download(t, bk[1][0]), *hu = download(t, bk[0][0]);
        compare_values(t, "dy ~ unfused", hf, hu, NULL, n, 1e-6);
        free(hf);
        free(hu);
    }
    twin_release(t);
}

static void check_groupnorm_bonus_gate(twin *t, const shape *sh) {
    groupnorm_bonus_gate_case(t, sh, 0, 1.0f, 0);
    groupnorm_bonus_gate_case(t, sh, 0, 0.0f, 0);
    groupnorm_bonus_gate_case(t, sh, 1, 0.0f, 0);
}

/* BF16 math, training's layout: y, r, k, v, g bf16 in place, dy written so */
static void check_groupnorm_bonus_gate_rkv16(twin *t, const shape *sh) {
    groupnorm_bonus_gate_case(t, sh, 1, 0.0f, 1);
    groupnorm_bonus_gate_case(t, sh, 1, 1.0f, 1);
}

/* The _beta ops with beta 0 (backend.h "first gradient writes"): the named
 * activation gradients start as NaN on the GPU (zero on the CPU) and are
 * overwritten; parameter gradients still accumulate. */
static void check_first_writes(twin *t, const shape *sh) {
    const int R = spec_rows(&sh->prefill), C = sh->C, F = sh->F, N = HEAD_SIZE;
    const size_t n = (size_t)R * C;
    label(t, "R=%d C=%d F=%d", R, C, F);
    tbuf *x = buf_input(t, n, -1, 1), *prev = buf_input(t, n, -1, 1);
    tbuf *mu = buf_input(t, C, 0, 1), *dy = buf_input(t, n, -1, 1);
    tbuf *hid = buf_input(t, (size_t)R * F, -1, 1), *dyf = buf_input(t, (size_t)R * F, -1, 1);
    const double s = 1.0 / sqrt((double)C);
    tbuf *w = buf_input(t, (size_t)F * C, -s, s);
    tbuf *mean = buf_input(t, R, -0.2, 0.2), *rstd = buf_input(t, R, 0.5, 2);
    tbuf *dx_lin = buf_output(t, n), *dx_lora = buf_output(t, (size_t)R * F);
    tbuf *dx_ln = buf_output(t, n), *dx_lerp = buf_output(t, n), *dp_lerp = buf_output(t, n);
    tbuf *dw_lin = buf_accum(t, (size_t)F * C, -1, 1), *dw_lora = buf_accum(t, (size_t)F * C, -1, 1);
    tbuf *dln_w = buf_accum(t, C, -1, 1), *dln_b = buf_accum(t, C, -1, 1);
    tbuf *dmu = buf_accum(t, C, -1, 1);
    tbuf *o = buf_input(t, n, -1, 1), *r = buf_input(t, n, -1, 1), *k = buf_input(t, n, -1, 1);
    tbuf *v = buf_input(t, n, -1, 1), *g_in = buf_input(t, n, -1, 1);
    tbuf *r_k = buf_input(t, C, -1, 1);
    tbuf *d_o = buf_output(t, n), *dg = buf_output(t, n), *dr = buf_output(t, n);
    tbuf *dk = buf_output(t, n), *dv = buf_output(t, n), *dr_k = buf_accum(t, C, -1, 1);
    for (int g = 0; g < 2; g++) {
        rp_backend *be = side(t, g);
        /* y [R,F] = x [R,C] W^T: dx [R,C] = dyf W */
        be->matmul_linear_backward_beta(be, at(dx_lin, g), at(dw_lin, g), at(dyf, g), at(x, g),
                                        at(w, g), R, F, C, 0.0f);
        /* y [R,C] = hid [R,F] W, W [F,C]: dx [R,F] = dy W^T */
        be->matmul_lora_backward_beta(be, at(dx_lora, g), at(dw_lora, g), at(dy, g), at(hid, g),
                                      at(w, g), R, C, F, 0.0f);
        be->layernorm_backward_beta(be, at(dx_ln, g), at(dln_w, g), at(dln_b, g), at(dy, g),
                                    at(x, g), at(mean, g), at(rstd, g), at(mu, g), R, C, 0.0f);
        be->lerp_backward_beta(be, at(dx_lerp, g), at(dp_lerp, g), at(dmu, g), at(dy, g),
                               at(x, g), at(prev, g), at(mu, g), R, C, 0.0f);
        be->bonus_gate_backward_beta(be, at(d_o, g), at(dr, g), at(dk, g), at(dv, g),
                                     at(dr_k, g), at(dg, g), at(dy, g), at(o, g), at(r, g),
                                     at(k, g), at(v, g), at(r_k, g), at(g_in, g), R, C, N, 0.0f);
    }
    compare(t, "linear dx", dx_lin);
    compare(t, "linear dw", dw_lin);
    compare(t, "lora dx", dx_lora);
    compare(t, "lora dw", dw_lora);
    compare(t, "layernorm dx", dx_ln);
    compare(t, "layernorm dweight", dln_w);
    compare(t, "layernorm dbias", dln_b);
    compare(t, "lerp dx", dx_lerp);
    compare(t, "lerp dprev", dp_lerp);
    compare(t, "lerp dmu", dmu);
    compare(t, "bonus_gate dr", dr);
    compare(t, "bonus_gate dk", dk);
    compare(t, "bonus_gate dv", dv);
    compare(t, "bonus_gate dr_k", dr_k);
}

/* ---- WKV7 ------------------------------------------------------------------ */

/* r, w_raw, k, v, kk, a [R,C] in realistic ranges: w_raw in [-3, 3] (decays
 * 0.56 .. 0.97), kk unit-norm per head, a (in-context rate) in (0, 1). */
typedef struct {
    tbuf *r, *w_raw, *k, *v, *kk, *a;
} wkv_inputs;

static void wkv_inputs_make_decay(twin *t, wkv_inputs *in, int R, int C, double w_lo,
                                  double w_hi) {
    const size_t n = (size_t)R * C;
    in->r = buf_input(t, n, -1, 1);
    in->w_raw = buf_input(t, n, w_lo, w_hi);
    in->k = buf_input(t, n, -1, 1);
    in->v = buf_input(t, n, -1, 1);
    in->a = buf_input(t, n, 0, 1);
    float *kk = xmalloc(n * sizeof *kk);
    fill_uniform(t, kk, n, -1, 1);
    normalise_heads(kk, n);
    in->kk = buf_from(t, kk, n);
    free(kk);
}

static void wkv_inputs_make(twin *t, wkv_inputs *in, int R, int C) {
    wkv_inputs_make_decay(t, in, R, C, -3, 3);
}

/* The six gradients of wkv7_backward, all overwritten. */
enum { WKV_GRADS = 6 };
static const char *const wkv_grad_names[WKV_GRADS] = {"dr", "dw_raw", "dk", "dv", "dkk", "da"};

static void wkv_grads_make(twin *t, tbuf *grad[WKV_GRADS], int R, int C) {
    for (int i = 0; i < WKV_GRADS; i++) grad[i] = buf_output(t, (size_t)R * C);
}

static size_t checkpoint_floats(const rp_batch *batch, int C) {
    return rp_wkv_checkpoint_offset(batch, batch->n_seq) * (size_t)C * HEAD_SIZE;
}

/* The states live inside the model's slot layout (wkv at +C, slots
 * state_stride apart): the att/ffn vectors and the unused slots around
 * them must come back untouched. */
static tbuf *wkv_state_make(twin *t, const shape *sh, double scale) {
    return buf_input(t, sh->n_slots * state_stride(sh->C), -scale, scale);
}

/* y [R,C] = S_t r_t over a ragged batch, states updated in place */
static void wkv7_case(twin *t, const shape *sh, const seq_spec *spec, const char *mode) {
    twin_batch tb;
    const rp_batch *batch = batch_make(&tb, spec);
    const int R = batch->n_rows, C = sh->C, N = HEAD_SIZE;
    const size_t stride = state_stride(C), wkv = state_wkv_offset(C);
    label(t, "%s R=%d C=%d seqs=%d", mode, R, C, batch->n_seq);
    wkv_inputs in;
    wkv_inputs_make(t, &in, R, C);
    tbuf *state = wkv_state_make(t, sh, 0.5), *y = buf_output(t, (size_t)R * C);
    for (int g = 0; g < 2; g++)
        side(t, g)->wkv7(side(t, g), at(y, g), at(in.r, g), at(in.w_raw, g), at(in.k, g),
                         at(in.v, g), at(in.kk, g), at(in.a, g), at(state, g) + wkv, stride,
                         batch, C, N);
    compare(t, "y", y);
    compare(t, "state", state);
    twin_release(t);
}

static void check_wkv7(twin *t, const shape *sh) {
    wkv7_case(t, sh, &sh->prefill, "seq");
    wkv7_case(t, sh, &sh->step, "step");
}

/* wkv7 plus checkpoints [blocks,H,N,N]: the state before every 16th token */
static void check_wkv7_forward_train(twin *t, const shape *sh) {
    twin_batch tb;
    const rp_batch *batch = batch_make(&tb, &sh->prefill);
    const int R = batch->n_rows, C = sh->C, N = HEAD_SIZE;
    const size_t stride = state_stride(C), wkv = state_wkv_offset(C);
    label(t, "R=%d C=%d seqs=%d", R, C, batch->n_seq);
    wkv_inputs in;
    wkv_inputs_make(t, &in, R, C);
    tbuf *state = wkv_state_make(t, sh, 0.5), *y = buf_output(t, (size_t)R * C);
    tbuf *ckpt = buf_output(t, checkpoint_floats(batch, C));
    for (int g = 0; g < 2; g++)
        side(t, g)->wkv7_forward_train(side(t, g), at(y, g), at(in.r, g), at(in.w_raw, g),
                                       at(in.k, g), at(in.v, g), at(in.kk, g), at(in.a, g),
                                       at(state, g) + wkv, stride, at(ckpt, g), batch, C, N);
    compare(t, "y", y);
    compare(t, "state", state);
    compare(t, "checkpoints", ckpt);
}

/* The backward alone: both sides read the CPU forward's checkpoints. The
 * slots hold d(final state) on entry and d(initial state) on return. w_raw
 * in [w_lo, w_hi]: the CUDA backward steps the state back by dividing by the
 * decay, so the strongest decays (w_raw -> +inf, d -> 0.545) are its worst
 * case for rounding error. beta 1 (wkv7_backward_beta): dr, dk and dv start
 * random on both sides and the op adds onto them. */
static void wkv7_backward_case_tol(twin *t, const shape *sh, double w_lo, double w_hi,
                                   float beta, double tol_dw_raw);
static void wkv7_backward_case(twin *t, const shape *sh, double w_lo, double w_hi, float beta) {
    wkv7_backward_case_tol(t, sh, w_lo, w_hi, beta, t->tol);
}

/* The same with dw_raw held to tol_dw_raw (the others to the twin's tol). */
static void wkv7_backward_case_tol(twin *t, const shape *sh, double w_lo, double w_hi,
                                   float beta, double tol_dw_raw) {
    twin_batch tb;
    const rp_batch *batch = batch_make(&tb, &sh->prefill);
    const int R = batch->n_rows, C = sh->C, N = HEAD_SIZE;
    const size_t n = (size_t)R * C, stride = state_stride(C), wkv = state_wkv_offset(C);
    label(t, "R=%d C=%d seqs=%d w_raw %g..%g beta %g", R, C, batch->n_seq, w_lo, w_hi,
          (double)beta);
    wkv_inputs in;
    wkv_inputs_make_decay(t, &in, R, C, w_lo, w_hi);
    tbuf *state = wkv_state_make(t, sh, 0.5), *y = buf_zero(t, n);
    tbuf *ckpt = buf_zero(t, checkpoint_floats(batch, C));
    t->cpu->wkv7_forward_train(t->cpu, y->cpu, in.r->cpu, in.w_raw->cpu, in.k->cpu, in.v->cpu,
                               in.kk->cpu, in.a->cpu, state->cpu + wkv, stride, ckpt->cpu,
                               batch, C, N);
    buf_share_cpu(t, ckpt);
    tbuf *dy = buf_input(t, n, -1, 1), *dstate = wkv_state_make(t, sh, 0.5);
    tbuf *grad[WKV_GRADS];
    wkv_grads_make(t, grad, R, C);
    if (beta != 0.0f)
        for (int i = 0; i < WKV_GRADS; i++)
            if (i == 0 || i == 2 || i == 3) grad[i] = buf_accum(t, n, -1, 1); /* dr dk dv */
    for (int g = 0; g < 2; g++) {
        rp_backend *be = side(t, g);
        if (beta != 0.0f)
            be->wkv7_backward_beta(be, at(grad[0], g), at(grad[1], g), at(grad[2], g),
                                   at(grad[3], g), at(grad[4], g), at(grad[5], g),
                                   at(dstate, g) + wkv, stride, at(dy, g), at(in.r, g),
                                   at(in.w_raw, g), at(in.k, g), at(in.v, g), at(in.kk, g),
                                   at(in.a, g), at(ckpt, g), batch, C, N, beta);
        else
            be->wkv7_backward(be, at(grad[0], g), at(grad[1], g), at(grad[2], g),
                              at(grad[3], g), at(grad[4], g), at(grad[5], g),
                              at(dstate, g) + wkv, stride, at(dy, g), at(in.r, g),
                              at(in.w_raw, g), at(in.k, g), at(in.v, g), at(in.kk, g),
                              at(in.a, g), at(ckpt, g), batch, C, N);
    }
    for (int i = 0; i < WKV_GRADS; i++) {
        if (i == 1) {
            float *host = download(t, grad[i]);
            compare_values(t, wkv_grad_names[i], host, grad[i]->cpu, grad[i]->before,
                           grad[i]->n, tol_dw_raw);
            free(host);
        } else {
            compare(t, wkv_grad_names[i], grad[i]);
        }
    }
    compare(t, "dstate", dstate);
}

static void check_wkv7_backward(twin *t, const shape *sh) {
    wkv7_backward_case(t, sh, -3, 3, 0.0f);
    twin_release(t);
    wkv7_backward_case(t, sh, 4, 8, 0.0f); /* every decay within 1% of the strongest */
}

/* dr, dk, dv added onto the model's earlier gradients (bonus_gate's). */
static void check_wkv7_backward_beta(twin *t, const shape *sh) {
    wkv7_backward_case(t, sh, -3, 3, 1.0f);
}

/* Two calls chained as a training step over a sequence cut in two: forward
 * A, forward B (continuing some of A's sequences, starting one new slot),
 * backward B, backward A, the state gradient carried between the backward
 * calls in the slots. Each side runs the whole chain on its own results. */
static void check_wkv7_chain(twin *t, const shape *sh) {
    twin_batch tba, tbb;
    const rp_batch *A = batch_make(&tba, &sh->prefill), *B = batch_make(&tbb, &sh->cont);
    const int C = sh->C, N = HEAD_SIZE;
    const size_t stride = state_stride(C), wkv = state_wkv_offset(C);
    const size_t nA = (size_t)A->n_rows * C, nB = (size_t)B->n_rows * C;
    label(t, "A R=%d + B R=%d C=%d", A->n_rows, B->n_rows, C);
    wkv_inputs ia, ib;
    wkv_inputs_make(t, &ia, A->n_rows, C);
    wkv_inputs_make(t, &ib, B->n_rows, C);
    tbuf *state = wkv_state_make(t, sh, 0.5), *dstate = wkv_state_make(t, sh, 0.5);
    tbuf *yA = buf_output(t, nA), *yB = buf_output(t, nB);
    tbuf *ckA = buf_output(t, checkpoint_floats(A, C));
    tbuf *ckB = buf_output(t, checkpoint_floats(B, C));
    tbuf *dyA = buf_input(t, nA, -1, 1), *dyB = buf_input(t, nB, -1, 1);
    tbuf *gA[WKV_GRADS], *gB[WKV_GRADS];
    wkv_grads_make(t, gA, A->n_rows, C);
    wkv_grads_make(t, gB, B->n_rows, C);
    for (int g = 0; g < 2; g++) {
        rp_backend *be = side(t, g);
        float *S = at(state, g) + wkv, *dS = at(dstate, g) + wkv;
        be->wkv7_forward_train(be, at(yA, g), at(ia.r, g), at(ia.w_raw, g), at(ia.k, g),
                               at(ia.v, g), at(ia.kk, g), at(ia.a, g), S, stride, at(ckA, g), A,
                               C, N);
        be->wkv7_forward_train(be, at(yB, g), at(ib.r, g), at(ib.w_raw, g), at(ib.k, g),
                               at(ib.v, g), at(ib.kk, g), at(ib.a, g), S, stride, at(ckB, g), B,
                               C, N);
        be->wkv7_backward(be, at(gB[0], g), at(gB[1], g), at(gB[2], g), at(gB[3], g),
                          at(gB[4], g), at(gB[5], g), dS, stride, at(dyB, g), at(ib.r, g),
                          at(ib.w_raw, g), at(ib.k, g), at(ib.v, g), at(ib.kk, g), at(ib.a, g),
                          at(ckB, g), B, C, N);
        be->wkv7_backward(be, at(gA[0], g), at(gA[1], g), at(gA[2], g), at(gA[3], g),
                          at(gA[4], g), at(gA[5], g), dS, stride, at(dyA, g), at(ia.r, g),
                          at(ia.w_raw, g), at(ia.k, g), at(ia.v, g), at(ia.kk, g), at(ia.a, g),
                          at(ckA, g), A, C, N);
    }
    compare(t, "A y", yA);
    compare(t, "B y", yB);
    compare(t, "state", state);
    compare(t, "A checkpoints", ckA);
    compare(t, "B checkpoints", ckB);
    char what[32];
    for (int i = 0; i < WKV_GRADS; i++) {
        snprintf(what, sizeof what, "B %s", wkv_grad_names[i]);
        compare(t, what, gB[i]);
    }
    for (int i = 0; i < WKV_GRADS; i++) {
        snprintf(what, sizeof what, "A %s", wkv_grad_names[i]);
        compare(t, what, gA[i]);
    }
    compare(t, "dstate", dstate);
}

/* ---- the chunked WKV7 forward (cuda_wkv7.cu) ------------------------------ */

/* forward_train (and wkv7) with every call on the chunked kernel (min_t 0),
 * w_raw in [w_lo, w_hi]: 4..8 puts every decay within 1% of the strongest,
 * where the chunk's cumulative decays reach 0.545^16 and their inverses
 * 1.6e4. Same tolerance as the per-token kernel (TOL_FP32). */
static void wkv7_chunked_case(twin *t, const shape *sh, double w_lo, double w_hi, int train) {
    twin_batch tb;
    const rp_batch *batch = batch_make(&tb, &sh->prefill);
    const int R = batch->n_rows, C = sh->C, N = HEAD_SIZE;
    const size_t stride = state_stride(C), wkv = state_wkv_offset(C);
    label(t, "%s R=%d C=%d seqs=%d w_raw %g..%g", train ? "train" : "seq", R, C, batch->n_seq,
          w_lo, w_hi);
    wkv_inputs in;
    wkv_inputs_make_decay(t, &in, R, C, w_lo, w_hi);
    tbuf *state = wkv_state_make(t, sh, 0.5), *y = buf_output(t, (size_t)R * C);
    tbuf *ckpt = buf_output(t, checkpoint_floats(batch, C));
    const int saved = rp_cuda_wkv7_chunked_min_t;
    rp_cuda_wkv7_chunked_min_t = 0;
    for (int g = 0; g < 2; g++) {
        rp_backend *be = side(t, g);
        if (train)
            be->wkv7_forward_train(be, at(y, g), at(in.r, g), at(in.w_raw, g), at(in.k, g),
                                   at(in.v, g), at(in.kk, g), at(in.a, g), at(state, g) + wkv,
                                   stride, at(ckpt, g), batch, C, N);
        else
            be->wkv7(be, at(y, g), at(in.r, g), at(in.w_raw, g), at(in.k, g), at(in.v, g),
                     at(in.kk, g), at(in.a, g), at(state, g) + wkv, stride, batch, C, N);
    }
    rp_cuda_wkv7_chunked_min_t = saved;
    compare(t, "y", y);
    compare(t, "state", state);
    if (train) compare(t, "checkpoints", ckpt);
    twin_release(t);
}

static void check_wkv7_chunked(twin *t, const shape *sh) {
    wkv7_chunked_case(t, sh, -3, 3, 1);
    wkv7_chunked_case(t, sh, 4, 8, 1);
    wkv7_chunked_case(t, sh, -8, -4, 1); /* weakest decays: d near 1 */
    wkv7_chunked_case(t, sh, -3, 3, 0);
}

/* ---- the per-token forward with rows split over blocks (cuda_wkv7.cu) ---- */

/* forward_train (train) or wkv7 on the per-token kernel (chunked_min_t
 * INT_MAX) with each head's 64 value rows over 1, 2 and 4 blocks
 * (rp_cuda_wkv7_rows_split): every split within the twin tolerance of the CPU
 * and the same bits as the unsplit kernel (a block owns whole rows: nothing
 * is summed across blocks). */
static void wkv7_rows_case(twin *t, const shape *sh, const seq_spec *spec, const char *mode,
                           int train) {
    twin_batch tb;
    const rp_batch *batch = batch_make(&tb, spec);
    const int R = batch->n_rows, C = sh->C, N = HEAD_SIZE;
    const size_t stride = state_stride(C), wkv = state_wkv_offset(C);
    const size_t n_state = sh->n_slots * stride;
    wkv_inputs in;
    wkv_inputs_make(t, &in, R, C);
    float *init = xmalloc(n_state * sizeof *init);
    fill_uniform(t, init, n_state, -0.5, 0.5);
    const int saved_min_t = rp_cuda_wkv7_chunked_min_t, saved_split = rp_cuda_wkv7_rows_split;
    rp_cuda_wkv7_chunked_min_t = INT_MAX;
    static const char *names[3] = {"y bits = split 1", "state bits = split 1",
                                   "checkpoints bits = split 1"};
    float *ref[3] = {NULL, NULL, NULL}; /* split 1's outputs as the GPU gave them */
    const int n_out = train ? 3 : 2;
    for (int split = 1; split <= 4; split *= 2) {
        label(t, "%s split %d R=%d C=%d seqs=%d", mode, split, R, C, batch->n_seq);
        rp_cuda_wkv7_rows_split = split;
        tbuf *state = buf_from(t, init, n_state), *y = buf_output(t, (size_t)R * C);
        tbuf *ckpt = buf_output(t, train ? checkpoint_floats(batch, C) : 1);
        for (int g = 0; g < 2; g++) {
            rp_backend *be = side(t, g);
            if (train)
                be->wkv7_forward_train(be, at(y, g), at(in.r, g), at(in.w_raw, g), at(in.k, g),
                                       at(in.v, g), at(in.kk, g), at(in.a, g),
                                       at(state, g) + wkv, stride, at(ckpt, g), batch, C, N);
            else
                be->wkv7(be, at(y, g), at(in.r, g), at(in.w_raw, g), at(in.k, g), at(in.v, g),
                         at(in.kk, g), at(in.a, g), at(state, g) + wkv, stride, batch, C, N);
        }
        compare(t, "y", y);
        compare(t, "state", state);
        if (train) compare(t, "checkpoints", ckpt);
        tbuf *out[3] = {y, state, ckpt};
        for (int o = 0; o < n_out; o++) {
            float *got = download(t, out[o]);
            if (split == 1) {
                ref[o] = got;
                continue;
            }
            size_t differ = 0;
            for (size_t e = 0; e < out[o]->n; e++)
                differ += memcmp(got + e, ref[o] + e, sizeof(float)) != 0;
            char note[64] = "";
            if (differ)
                snprintf(note, sizeof note, "  (%zu of %zu floats differ)", differ, out[o]->n);
            report(t, names[o], 0.0, 0.0, differ == 0, note);
            free(got);
        }
    }
    rp_cuda_wkv7_chunked_min_t = saved_min_t;
    rp_cuda_wkv7_rows_split = saved_split;
    for (int o = 0; o < 3; o++) free(ref[o]);
    free(init);
    twin_release(t);
}

static void check_wkv7_rows(twin *t, const shape *sh) {
    wkv7_rows_case(t, sh, &sh->prefill, "train", 1);
    wkv7_rows_case(t, sh, &sh->prefill, "seq", 0);
    wkv7_rows_case(t, sh, &sh->step, "step", 0);
}

/* BF16 math: the chunked forward's tile products on tensor cores (bf16
 * wmma operands, fp32 accumulate; wkv7_chunk_forward_mma_kernel) against the
 * exact CPU op, at the ranges above. Its error is the bf16 operands'
 * rounding (2^-9 relative a rounding): measured rel 2.0e-3..3.1e-3 (y, the
 * state, checkpoints) over these cases in the emulator (docs/gpu.md); a
 * dropped product gives rel 5.5e-3 (Uab, the smallest) to 0.93. */
#define TOL_WKV_MMA 4e-3
static void check_wkv7_chunked_mma(twin *t, const shape *sh) {
    const double saved = t->tol;
    t->tol = TOL_WKV_MMA;
    wkv7_chunked_case(t, sh, -3, 3, 1);
    wkv7_chunked_case(t, sh, 4, 8, 1);
    wkv7_chunked_case(t, sh, -8, -4, 1);
    wkv7_chunked_case(t, sh, -3, 3, 0);
    t->tol = saved;
}

/* BF16 math: the chunked backward's tile products on tensor cores
 * (wkv7_chunk_backward_mma_kernel, every call chunked: min_t 0) against the
 * exact CPU op, both on the CPU forward's checkpoints, at the decay ranges
 * above and with beta 1. Its error is the bf16 operands' rounding: over these
 * cases in the emulator rel 1.8e-3..4.4e-3 (dr, dk, dv, dkk, da, dstate) and
 * dw_raw 2.8e-3..6.4e-3, 7.7e-3 and 1.05e-2 at the strongest decays (its scan sums
 * terms of 1/g_t that cancel); a dropped product fails (docs/gpu.md
 * "Chunked backward on tensor cores"). */
#define TOL_WKV_MMA_BWD 6e-3
#define TOL_WKV_MMA_BWD_DW 2e-2
static void check_wkv7_backward_mma(twin *t, const shape *sh) {
    const double saved = t->tol;
    const int saved_min_t = rp_cuda_wkv7_chunked_min_t;
    t->tol = TOL_WKV_MMA_BWD;
    rp_cuda_wkv7_chunked_min_t = 0;
    wkv7_backward_case_tol(t, sh, -3, 3, 0.0f, TOL_WKV_MMA_BWD_DW);
    twin_release(t);
    wkv7_backward_case_tol(t, sh, 4, 8, 0.0f, TOL_WKV_MMA_BWD_DW);
    twin_release(t);
    wkv7_backward_case_tol(t, sh, -8, -4, 0.0f, TOL_WKV_MMA_BWD_DW);
    twin_release(t);
    wkv7_backward_case_tol(t, sh, -3, 3, 1.0f, TOL_WKV_MMA_BWD_DW);
    rp_cuda_wkv7_chunked_min_t = saved_min_t;
    t->tol = saved;
    twin_release(t);
}

/* ---- WKV7 with bf16 I/O (cuda_wkv7.h) ------------------------------------ */


static float round_bf16(float x) {
    uint32_t u;
    memcpy(&u, &x, sizeof u);
    u = (u + 0x7FFFu + ((u >> 16) & 1u)) & 0xFFFF0000u; /* finite inputs only */
    memcpy(&x, &u, sizeof x);
    return x;
}

/* Both sides (and `before`) hold the bf16-rounded values of the CPU side. */
static void buf_round_bf16(twin *t, tbuf *b) {
    for (size_t i = 0; i < b->n; i++) {
        b->cpu[i] = round_bf16(b->cpu[i]);
        if (b->before) b->before[i] = round_bf16(b->before[i]);
    }
    buf_share_cpu(t, b);
}

/* attention_tail_backward's operands, drawn for its twin rows: the
 * activations, dkk and the incoming gradients, dv_first and the five
 * parameter sums accumulated into, dnu written. */
typedef struct {
    tbuf *k, *a, *v, *vf, *nu, *k_k, *k_a, *dkk, *dk, *da, *dw, *dv, *dvf, *dnu, *sums[5];
} tail_bufs;
static tail_bufs tail_bufs_make(twin *t, size_t n, int C) {
    if (!t->gpu->attention_tail_backward)
        fatal("%s: the CUDA backend has no attention_tail_backward", t->op);
    tail_bufs b;
    b.k = buf_input(t, n, -1, 1), b.a = buf_input(t, n, 0, 1), b.v = buf_input(t, n, -1, 1);
    b.vf = buf_input(t, n, -1, 1), b.nu = buf_input(t, n, 0, 1);
    b.k_k = buf_input(t, C, 0.5, 1.5), b.k_a = buf_input(t, C, 0.5, 1.5);
    b.dkk = buf_input(t, n, -1, 1), b.dk = buf_input(t, n, -1, 1);
    b.da = buf_input(t, n, -1, 1), b.dw = buf_input(t, n, -1, 1), b.dv = buf_input(t, n, -1, 1);
    b.dvf = buf_accum(t, n, -1, 1), b.dnu = buf_output(t, n);
    for (int i = 0; i < 5; i++) b.sums[i] = buf_accum(t, C, -1, 1);
    return b;
}

/* attention_tail_backward (backend.h; CUDA only): the CPU runs the separate
 * ops in sequence (key_prepare_backward, bias_act_backward of a, w and nu
 * with their bias gradients, value_residual_backward; layer 0: add), the GPU
 * the fused op and, with f32 inputs, the same separate ops: the fused
 * outputs within the twin's tolerance of the CPU and bit for bit the GPU's
 * separate ones. act16: k_pre, a, v_pre, v_first, nu stored bf16 in place
 * (both sides read the rounded values), 2: a alone (training's layout: a in
 * place with kk and w_raw); 3: training's layout past layer 0 (below).
 * grad16: da and dw_raw too (training's layout: the WKV7 backward writes
 * both bf16 in place), and the fused d pre of a comes back bf16 in place;
 * 2: dw_raw alone, the GPU's separate ops on the same rounded values, bit
 * for bit. */
static void attention_tail_case(twin *t, const shape *sh, int layer0, int act16, int grad16) {
    const int R = spec_rows(&sh->prefill), C = sh->C;
    const size_t n = (size_t)R * C, bytes = n * sizeof(float);
    rp_backend *gpu = t->gpu;
    label(t, "R=%d C=%d %s, activations %s, da dw_raw %s", R, C, layer0 ? "layer 0" : "layer 1",
          act16 == 3   ? "bf16 but v_first f32, dkk bf16"
          : act16 == 2 ? "f32 but a bf16"
          : act16      ? "bf16"
                       : "f32",
          grad16 == 2 ? "f32 / bf16" : grad16 ? "bf16" : "f32");
    const tail_bufs b = tail_bufs_make(t, n, C);
    tbuf *k = b.k, *a = b.a, *v = b.v, *vf = b.vf, *nu = b.nu, *k_k = b.k_k, *k_a = b.k_a;
    tbuf *dkk = b.dkk, *dk = b.dk, *da = b.da, *dw = b.dw, *dv = b.dv, *dvf = b.dvf;
    tbuf *dnu = b.dnu, *const *sums = b.sums;
    /* act16 3: training's layout past layer 0 (k_pre, v_pre, nu rkv_only,
     * a with kk, dkk wkv_only; v_first f32: it crosses pipeline stages) */
    const int act16_of[4][5] = {{0, 0, 0, 0, 0}, {1, 1, 1, 1, 1}, {0, 1, 0, 0, 0},
                                {1, 1, 1, 0, 1}};
    if (act16) {
        tbuf *acts[5] = {k, a, v, vf, nu};
        for (int i = 0; i < 5; i++)
            if (act16_of[act16][i]) buf_round_bf16(t, acts[i]);
        if (act16 == 3) buf_round_bf16(t, dkk);
    }
    if (grad16 == 1) buf_round_bf16(t, da);
    if (grad16) buf_round_bf16(t, dw);
    /* the GPU's separate ops on copies of the in/out buffers */
    tbuf *io[11] = {dk, da, dw, dv, dvf, dnu, sums[0], sums[1], sums[2], sums[3], sums[4]};
    tbuf *sep[11];
    for (int i = 0; i < 11; i++) {
        sep[i] = buf_zero(t, io[i]->n);
        gpu->copy(gpu, sep[i]->gpu, io[i]->gpu, io[i]->n * sizeof(float));
    }
    const int with_separate = !act16 && grad16 != 1;
    for (int g = 0; g < 2 + with_separate; g++) {
        rp_backend *be = side(t, g > 0);
        tbuf *const *o = g == 2 ? sep : io;
        const int s = g > 0;
        if (g == 1) continue; /* the fused op below */
        be->key_prepare_backward(be, at(o[0], s), at(o[1], s), at(o[6], s), at(o[7], s),
                                 at(dkk, s), at(k, s), at(a, s), at(k_k, s), at(k_a, s), R, C,
                                 HEAD_SIZE);
        if (be->gemm_only) be->gemm_only(be, at(o[1], s), n);
        be->bias_act_backward(be, at(o[1], s), at(o[8], s), at(a, s), R, C, RP_ACT_SIGMOID);
        if (be->gemm_only) be->gemm_only(be, at(o[2], s), n);
        be->bias_act_backward(be, at(o[2], s), at(o[9], s), at(a, s), R, C, RP_ACT_NONE);
        if (layer0) {
            be->add(be, at(o[3], s), at(o[4], s), n);
            continue;
        }
        be->value_residual_backward(be, at(o[3], s), at(o[4], s), at(o[5], s), at(v, s),
                                    at(vf, s), at(nu, s), R, C);
        if (be->gemm_only) be->gemm_only(be, at(o[5], s), n);
        be->bias_act_backward(be, at(o[5], s), at(o[10], s), at(nu, s), R, C, RP_ACT_SIGMOID);
    }
    if (act16) {
        tbuf *acts[5] = {k, a, v, vf, nu};
        for (int i = 0; i < 5; i++)
            if (act16_of[act16][i] && !rp_cuda_backend_store_bf16_inplace(gpu, acts[i]->gpu, n))
                fatal("%s: storing an activation in bf16 failed", t->op);
        if (act16 == 3 && !rp_cuda_backend_store_bf16_inplace(gpu, dkk->gpu, n))
            fatal("%s: storing dkk in bf16 failed", t->op);
    }
    if ((grad16 == 1 && !rp_cuda_backend_store_bf16_inplace(gpu, da->gpu, n)) ||
        (grad16 && !rp_cuda_backend_store_bf16_inplace(gpu, dw->gpu, n)))
        fatal("%s: storing da / dw_raw in bf16 failed", t->op);
    gpu->attention_tail_backward(gpu, dk->gpu, da->gpu, dw->gpu, dv->gpu, dvf->gpu, dnu->gpu,
                                 sums[0]->gpu, sums[1]->gpu, sums[2]->gpu, sums[3]->gpu,
                                 sums[4]->gpu, dkk->gpu, k->gpu, a->gpu, v->gpu, vf->gpu,
                                 layer0 ? NULL : nu->gpu, k_k->gpu, k_a->gpu, R, C, HEAD_SIZE,
                                 0);
    static const char *const names[11] = {"dk",   "da",  "dw_raw", "dv",  "dv_first", "dnu",
                                          "dk_k", "dk_a", "da0",   "dw0", "dv0"};
    for (int i = 0; i < 11; i++) {
        if (i == 2 || (layer0 && i == 5)) continue; /* dw_raw read only; layer 0: no dnu */
        if (i == 1 && grad16 == 1) {               /* d pre of a, bf16 in place */
            uint16_t *h16 = xmalloc(bytes);
            gpu->copy_to_host(gpu, h16, da->gpu, bytes);
            float *wide = xmalloc(bytes);
            for (size_t j = 0; j < n; j++) {
                const uint32_t u = (uint32_t)h16[j] << 16;
                memcpy(wide + j, &u, sizeof u);
            }
            compare_values(t, "da (bf16 in place)", wide, da->cpu, NULL, n, TOL_BF16_IO);
            free(wide);
            free(h16);
            continue;
        }
        if (layer0 && i == 10) {
            compare_exact(t, "dv0 untouched (layer 0)", io[i]);
            continue;
        }
        compare(t, names[i], io[i]);
        if (with_separate) {
            char what[64];
            snprintf(what, sizeof what, "%s fused == separate", names[i]);
            compare_gpu_exact(t, what, io[i], sep[i]);
        }
    }
    if (!grad16) compare_exact(t, "dw_raw untouched", dw);
}

static void check_attention_tail_backward(twin *t, const shape *sh) {
    attention_tail_case(t, sh, 0, 0, 0);
    attention_tail_case(t, sh, 1, 0, 0);
    attention_tail_case(t, sh, 0, 1, 0);
    attention_tail_case(t, sh, 0, 2, 0);
    attention_tail_case(t, sh, 1, 2, 0);
    attention_tail_case(t, sh, 0, 0, 1);
    attention_tail_case(t, sh, 0, 1, 1);
    attention_tail_case(t, sh, 1, 1, 1);
    attention_tail_case(t, sh, 0, 0, 2);
    attention_tail_case(t, sh, 0, 2, 2);
    attention_tail_case(t, sh, 1, 2, 2);
    attention_tail_case(t, sh, 0, 3, 1);
    attention_tail_case(t, sh, 1, 3, 2);
    attention_tail_case(t, sh, 1, 2, 1);
}

/* dkv_gemm_only (BF16 math, training's step without the W pass): the fused
 * tail writes dk and dv as their GEMM backwards' bf16 operands alone, no
 * f32. The key and value GEMM backwards that follow (dX and dW) match the
 * CPU's separate ops and f32 GEMMs within the twin's tolerance, and the
 * GPU's f32 dk and dv still hold what they held before the tail (a tail
 * that wrote them, or GEMMs that read that f32, fail). */
static void check_attention_tail_dkv16(twin *t, const shape *sh) {
    const int R = spec_rows(&sh->prefill), C = sh->C;
    const size_t n = (size_t)R * C, cc = (size_t)C * C;
    label(t, "R=%d C=%d layer 1, dk dv GEMM-only", R, C);
    const tail_bufs b = tail_bufs_make(t, n, C);
    tbuf *x[2] = {buf_input(t, n, -1, 1), buf_input(t, n, -1, 1)};
    tbuf *w[2] = {buf_input(t, cc, -0.1, 0.1), buf_input(t, cc, -0.1, 0.1)};
    tbuf *dx[2] = {buf_output(t, n), buf_output(t, n)};
    tbuf *dwt[2] = {buf_accum(t, cc, -1, 1), buf_accum(t, cc, -1, 1)};
    float *dk_before = download(t, b.dk), *dv_before = download(t, b.dv);
    for (int g = 0; g < 2; g++) {
        rp_backend *be = side(t, g);
        rp_attention_tail_backward_fn *tail =
            g ? be->attention_tail_backward : rp_attention_tail_backward_separate;
        tail(be, at(b.dk, g), at(b.da, g), at(b.dw, g), at(b.dv, g), at(b.dvf, g),
             at(b.dnu, g), at(b.sums[0], g), at(b.sums[1], g), at(b.sums[2], g),
             at(b.sums[3], g), at(b.sums[4], g), at(b.dkk, g), at(b.k, g), at(b.a, g),
             at(b.v, g), at(b.vf, g), at(b.nu, g), at(b.k_k, g), at(b.k_a, g), R, C,
             HEAD_SIZE, g);
        tbuf *const dy[2] = {b.dk, b.dv};
        for (int j = 0; j < 2; j++)
            be->matmul_linear_backward_beta(be, at(dx[j], g), at(dwt[j], g), at(dy[j], g),
                                            at(x[j], g), at(w[j], g), R, C, C, 0.0f);
    }
    static const char *const names[2][2] = {{"dX (key GEMM, bf16 dk)", "dW (key GEMM)"},
                                            {"dX (value GEMM, bf16 dv)", "dW (value GEMM)"}};
    for (int j = 0; j < 2; j++) {
        compare(t, names[j][0], dx[j]);
        compare(t, names[j][1], dwt[j]);
    }
    compare(t, "dv_first", b.dvf);
    float *dk_after = download(t, b.dk), *dv_after = download(t, b.dv);
    const int untouched = !memcmp(dk_before, dk_after, n * sizeof(float)) &&
                          !memcmp(dv_before, dv_after, n * sizeof(float));
    report(t, "dk, dv f32 not written", 0.0, 0.0, untouched, untouched ? "" : "  (written)");
    free(dk_before);
    free(dv_before);
    free(dk_after);
    free(dv_after);
    twin_release(t);
}

/* A bf16 device copy of b's GPU side (exact: b holds rounded values). */
static void *dev_bf16(twin *t, const tbuf *b) {
    tbuf *h = buf_zero(t, (b->n + 1) / 2);
    if (!rp_cuda_bf16_from_f32(t->gpu, h->gpu, b->gpu, b->n)) fatal("%s: to bf16 failed", t->op);
    return h->gpu;
}

/* b's GPU side <- the bf16 device array src, widened. */
static void dev_widen(twin *t, tbuf *b, const void *src) {
    if (!rp_cuda_f32_from_bf16(t->gpu, b->gpu, src, b->n)) fatal("%s: from bf16 failed", t->op);
}

/* The sigmoid of nu (v0) and a (a0) inside value_residual_from and
 * key_prepare_from, training's layout (BF16 math: v_pre, nu, k_pre, a bf16
 * in place; v, k, kk written bf16 under their hints): against the CPU's
 * bias_act then the in-place op (nu, a, v, k, kk within one bf16 rounding),
 * and on the GPU bit for bit against bias_act in place then the op without
 * the bias (the forward before the fusion). */
static void check_bias_in_from16(twin *t, const shape *sh) {
    const int R = spec_rows(&sh->prefill), C = sh->C, N = HEAD_SIZE;
    const size_t n = (size_t)R * C;
    rp_backend *gpu = t->gpu;
    label(t, "R=%d C=%d", R, C);
    if (!gpu->value_residual_from || !gpu->key_prepare_from || !gpu->rkv_only || !gpu->wkv_only)
        fatal("%s: the CUDA backend has no value_residual_from / key_prepare_from hints", t->op);
    tbuf *v_pre = buf_input(t, n, -1, 1), *v_first = buf_input(t, n, -1, 1);
    tbuf *k_pre = buf_input(t, n, -1, 1), *k_k = buf_input(t, C, 0.5, 1.5);
    tbuf *k_a = buf_input(t, C, 0.5, 1.5), *v0 = buf_input(t, C, -1, 1), *a0 = buf_input(t, C, -1, 1);
    tbuf *pre[2] = {buf_input(t, n, -3, 3), buf_input(t, n, -3, 3)}; /* nu, a before sigmoid */
    tbuf *v_pre2 = buf_zero(t, n), *k_pre2 = buf_zero(t, n);
    tbuf *pre2[2] = {buf_zero(t, n), buf_zero(t, n)};
    tbuf *out[2][3]; /* [fused, separate] x {v, k, kk} on the GPU */
    for (int j = 0; j < 2; j++)
        for (int i = 0; i < 3; i++) out[j][i] = buf_zero(t, n);
    tbuf *const in16[4] = {v_pre, k_pre, pre[0], pre[1]};
    tbuf *const in16b[4] = {v_pre2, k_pre2, pre2[0], pre2[1]};
    for (int i = 0; i < 4; i++) {
        buf_round_bf16(t, in16[i]);
        gpu->copy(gpu, in16b[i]->gpu, in16[i]->gpu, n * sizeof(float));
        if (!rp_cuda_backend_store_bf16_inplace(gpu, in16[i]->gpu, n) ||
            !rp_cuda_backend_store_bf16_inplace(gpu, in16b[i]->gpu, n))
            fatal("%s: storing the inputs in bf16 failed", t->op);
    }
    /* GPU, fused: the sigmoid in the ops' pass */
    gpu->rkv_only(gpu, out[0][0]->gpu, n);
    gpu->value_residual_from(gpu, out[0][0]->gpu, v_pre->gpu, v_first->gpu, pre[0]->gpu,
                             v0->gpu, R, C);
    gpu->wkv_only(gpu, out[0][2]->gpu, n);
    gpu->rkv_only(gpu, out[0][1]->gpu, n);
    gpu->key_prepare_from(gpu, out[0][2]->gpu, out[0][1]->gpu, k_pre->gpu, pre[1]->gpu,
                          a0->gpu, k_k->gpu, k_a->gpu, R, C, N);
    /* GPU, separate: bias_act in place, then the ops without a bias */
    gpu->bias_act(gpu, pre2[0]->gpu, v0->gpu, R, C, RP_ACT_SIGMOID);
    gpu->rkv_only(gpu, out[1][0]->gpu, n);
    gpu->value_residual_from(gpu, out[1][0]->gpu, v_pre2->gpu, v_first->gpu, pre2[0]->gpu, NULL,
                             R, C);
    gpu->bias_act(gpu, pre2[1]->gpu, a0->gpu, R, C, RP_ACT_SIGMOID);
    gpu->wkv_only(gpu, out[1][2]->gpu, n);
    gpu->rkv_only(gpu, out[1][1]->gpu, n);
    gpu->key_prepare_from(gpu, out[1][2]->gpu, out[1][1]->gpu, k_pre2->gpu, pre2[1]->gpu, NULL,
                          k_k->gpu, k_a->gpu, R, C, N);
    /* CPU: bias_act, then the in-place ops on copies */
    rp_backend *cpu = t->cpu;
    for (int i = 0; i < 2; i++)
        cpu->bias_act(cpu, pre[i]->cpu, i ? a0->cpu : v0->cpu, R, C, RP_ACT_SIGMOID);
    memcpy(out[0][0]->cpu, v_pre->cpu, n * sizeof(float));
    cpu->value_residual(cpu, out[0][0]->cpu, v_first->cpu, pre[0]->cpu, R, C);
    memcpy(out[0][1]->cpu, k_pre->cpu, n * sizeof(float));
    cpu->key_prepare(cpu, out[0][2]->cpu, out[0][1]->cpu, pre[1]->cpu, k_k->cpu, k_a->cpu, R, C,
                     N);
    cpu->synchronize(cpu);
    static const char *const names[5] = {"nu (bf16 in place)", "a (bf16 in place)",
                                         "v (bf16 in place)", "k (bf16 in place)",
                                         "kk (bf16 in place)"};
    tbuf *const fused[5] = {pre[0], pre[1], out[0][0], out[0][1], out[0][2]};
    tbuf *const sep[5] = {pre2[0], pre2[1], out[1][0], out[1][1], out[1][2]};
    tbuf *wide = buf_zero(t, n), *wide2 = buf_zero(t, n);
    for (int i = 0; i < 5; i++) {
        dev_widen(t, wide, fused[i]->gpu);
        float *host = download(t, wide);
        compare_values(t, names[i], host, fused[i]->cpu, NULL, n, TOL_BF16_IO);
        free(host);
        dev_widen(t, wide2, sep[i]->gpu);
        char what[64];
        snprintf(what, sizeof what, "%.2s fused == separate", names[i]);
        compare_gpu_exact(t, what, wide, wide2);
    }
}

/* forward_train then backward (beta 0 or 1) on bf16 inputs, outputs bf16
 * (out16) or fp32; the CPU twin runs fp32 on the same rounded inputs. */
static void wkv7_bf16_case_tols(twin *t, const shape *sh, int out16, float beta, double tol_out,
                                double tol_dw_raw);
static void wkv7_bf16_case(twin *t, const shape *sh, int out16, float beta) {
    const double tol_out = out16 ? TOL_BF16_IO : TOL_FP32;
    wkv7_bf16_case_tols(t, sh, out16, beta, tol_out, tol_out);
}

/* The same with y and the gradients held to tol_out, dw_raw to tol_dw_raw
 * (state, checkpoints and dstate to the twin's tol). */
static void wkv7_bf16_case_tols(twin *t, const shape *sh, int out16, float beta, double tol_out,
                                double tol_dw_raw) {
    twin_batch tb;
    const rp_batch *batch = batch_make(&tb, &sh->prefill);
    const int R = batch->n_rows, C = sh->C, N = HEAD_SIZE;
    const size_t n = (size_t)R * C, stride = state_stride(C), wkv = state_wkv_offset(C);
    label(t, "R=%d C=%d out %s beta %g", R, C, out16 ? "bf16" : "fp32", (double)beta);
    wkv_inputs in;
    wkv_inputs_make(t, &in, R, C);
    tbuf *x[6] = {in.r, in.w_raw, in.k, in.v, in.kk, in.a};
    for (int i = 0; i < 6; i++) buf_round_bf16(t, x[i]);
    const rp_wkv7_bf16 in16 = {dev_bf16(t, in.r),  dev_bf16(t, in.w_raw), dev_bf16(t, in.k),
                               dev_bf16(t, in.v),  dev_bf16(t, in.kk),    dev_bf16(t, in.a)};
    tbuf *state = wkv_state_make(t, sh, 0.5), *y = buf_output(t, n);
    tbuf *ckpt = buf_output(t, checkpoint_floats(batch, C));
    t->cpu->wkv7_forward_train(t->cpu, y->cpu, in.r->cpu, in.w_raw->cpu, in.k->cpu, in.v->cpu,
                               in.kk->cpu, in.a->cpu, state->cpu + wkv, stride, ckpt->cpu,
                               batch, C, N);
    void *y16 = out16 ? buf_zero(t, (n + 1) / 2)->gpu : NULL;
    rp_cuda_wkv7_forward_train_bf16(t->gpu, out16 ? y16 : (void *)y->gpu, out16, &in16,
                                    state->gpu + wkv, stride, ckpt->gpu, batch, C, N);
    if (out16) dev_widen(t, y, y16);
    float *yh = download(t, y);
    compare_values(t, "y", yh, y->cpu, NULL, n, tol_out);
    free(yh);
    compare(t, "state", state);
    compare(t, "checkpoints", ckpt);

    /* the backward: each side on its own checkpoints */
    tbuf *dy = buf_input(t, n, -1, 1), *dstate = wkv_state_make(t, sh, 0.5);
    buf_round_bf16(t, dy);
    const void *dy16 = dev_bf16(t, dy);
    tbuf *grad[WKV_GRADS];
    wkv_grads_make(t, grad, R, C);
    if (beta != 0.0f)
        for (int i = 0; i < WKV_GRADS; i++)
            if (i == 0 || i == 2 || i == 3) { /* dr dk dv */
                grad[i] = buf_accum(t, n, -1, 1);
                if (out16) buf_round_bf16(t, grad[i]);
            }
    void *g[WKV_GRADS];
    for (int i = 0; i < WKV_GRADS; i++)
        g[i] = out16 ? (beta != 0.0f ? dev_bf16(t, grad[i]) : buf_zero(t, (n + 1) / 2)->gpu)
                     : (void *)grad[i]->gpu;
    t->cpu->wkv7_backward_beta(t->cpu, grad[0]->cpu, grad[1]->cpu, grad[2]->cpu, grad[3]->cpu,
                               grad[4]->cpu, grad[5]->cpu, dstate->cpu + wkv, stride, dy->cpu,
                               in.r->cpu, in.w_raw->cpu, in.k->cpu, in.v->cpu, in.kk->cpu,
                               in.a->cpu, ckpt->cpu, batch, C, N, beta);
    rp_cuda_wkv7_backward_bf16(t->gpu, g, out16, dstate->gpu + wkv, stride, dy16, &in16,
                               ckpt->gpu, batch, C, N, beta);
    for (int i = 0; i < WKV_GRADS; i++) {
        if (out16) dev_widen(t, grad[i], g[i]);
        float *host = download(t, grad[i]);
        compare_values(t, wkv_grad_names[i], host, grad[i]->cpu, grad[i]->before, n,
                       i == 1 ? tol_dw_raw : tol_out);
        free(host);
    }
    compare(t, "dstate", dstate);
    twin_release(t);
}

static void check_wkv7_bf16(twin *t, const shape *sh) {
    wkv7_bf16_case(t, sh, 0, 0.0f);
    wkv7_bf16_case(t, sh, 1, 0.0f);
    wkv7_bf16_case(t, sh, 1, 1.0f);
}

/* The same in BF16 math: both chunked kernels on bf16 wmma (every call
 * chunked), the backward on the GPU forward's own checkpoints, so the two
 * kernels' errors add, plus the bf16 outputs' rounding: measured in the
 * emulator rel 1.1e-3..2.9e-3 (y, state, checkpoints), 1.5e-3..4.3e-3 (the
 * gradients but dw_raw, dstate), dw_raw 5.8e-3..6.4e-3. */
#define TOL_WKV_MMA_BF16_IO 6e-3
static void check_wkv7_bf16_mma(twin *t, const shape *sh) {
    const double saved = t->tol;
    const int saved_min_t = rp_cuda_wkv7_chunked_min_t;
    t->tol = TOL_WKV_MMA;
    rp_cuda_wkv7_chunked_min_t = 0;
    wkv7_bf16_case_tols(t, sh, 0, 0.0f, TOL_WKV_MMA_BF16_IO, TOL_WKV_MMA_BWD_DW);
    wkv7_bf16_case_tols(t, sh, 1, 0.0f, TOL_WKV_MMA_BF16_IO, TOL_WKV_MMA_BWD_DW);
    wkv7_bf16_case_tols(t, sh, 1, 1.0f, TOL_WKV_MMA_BF16_IO, TOL_WKV_MMA_BWD_DW);
    rp_cuda_wkv7_chunked_min_t = saved_min_t;
    t->tol = saved;
}

/* BF16 math, the training chain with kk, dkk and y in bf16 in place
 * (backend.h wkv_only), w_raw and a too (gemm_only): key_prepare writes kk bf16 only, the chunked forward and
 * backward read it so, the backward writes dkk bf16 only and
 * key_prepare_backward reads it so, and dw_raw bf16 only (gemm_only), which
 * w0's bias_act_backward sums from, against the CPU's fp32 chain. kk and dkk
 * are read back as bf16 from their own memory (a backend that kept them f32
 * fails there). Each side's backward runs on its own checkpoints, beta 1.
 * The added error is kk's and dkk's one rounding each (2^-9 relative):
 * measured in the emulator (--quick) rel 1.7e-3 (kk), 2.2e-3..5.1e-3 (dkk,
 * with the backward's own error), the rest 0.9e-3..3.5e-3 on the chunked
 * kernels, 0.7e-4..4e-4 on the per-token ones, but dk_k (sum of du k over
 * rows, du from the rounded dkk) 2.2e-3..5.3e-3 (docs/gpu.md Precision). */
#define TOL_WKV_KK16 8e-3
#define TOL_WKV_KK16_DW 2e-2
/* w0's gradient: the sum over rows of the bf16 dw_raw; measured in the
 * emulator 1.1e-3..1.5e-3 on the per-token kernels (dw_raw's rounding), up
 * to 2.1e-2 on the chunked ones, whose dw_raw carries 1.1e-2 of its own */
#define TOL_WKV_KK16_DW0 3e-2
/* rkv16: r, k, v and dy bf16 in place too (training's rkv_only layout past
 * layer 0): key_prepare_from writes k bf16 out of a bf16 k_pre and
 * value_residual_from v out of bf16 v_pre and nu (and f32 v_first) under
 * rkv_only hints (read back widened: one rounding of the CPU's k and v), r
 * and dy as the receptance GEMM and the fused groupnorm's backward leave
 * them; the CPU reads the rounded k_pre, v_pre, nu, r, k, v, dy. The WKV7
 * kernels take all seven inputs bf16, and the backward writes da bf16 in
 * place under an rkv_only hint, as training has it. */
static void host_round_bf16(float *p, size_t n);
static void wkv7_kk16_case(twin *t, const shape *sh, double w_lo, double w_hi, int rkv16) {
    twin_batch tb;
    const rp_batch *batch = batch_make(&tb, &sh->prefill);
    const int R = batch->n_rows, C = sh->C, N = HEAD_SIZE;
    const size_t n = (size_t)R * C, stride = state_stride(C), wkv = state_wkv_offset(C);
    label(t, "R=%d C=%d seqs=%d w_raw %g..%g%s", R, C, batch->n_seq, w_lo, w_hi,
          rkv16 ? " r k v dy bf16" : "");
    if (!t->gpu->wkv_only) fatal("%s: the CUDA backend has no wkv_only", t->op);
    if (rkv16 && (!t->gpu->rkv_only || !t->gpu->key_prepare_from ||
                  !t->gpu->value_residual_from))
        fatal("%s: the CUDA backend has no rkv_only", t->op);
    wkv_inputs in;
    wkv_inputs_make_decay(t, &in, R, C, w_lo, w_hi);
    /* w_raw and a bf16 in place too, as training stores them (their LoRA up
     * GEMMs under gemm_only; the kernels take kk, w_raw and a in one type,
     * key_prepare and its backward read a so): both sides read their
     * rounded values (a kernel reading their memory as f32 fails y and
     * every gradient) */
    buf_round_bf16(t, in.w_raw);
    if (!rp_cuda_backend_store_bf16_inplace(t->gpu, in.w_raw->gpu, n))
        fatal("%s: storing w_raw in bf16 failed", t->op);
    buf_round_bf16(t, in.a);
    if (!rp_cuda_backend_store_bf16_inplace(t->gpu, in.a->gpu, n))
        fatal("%s: storing a in bf16 failed", t->op);
    tbuf *k_pre = buf_input(t, n, -1, 1), *k_k = buf_input(t, C, 0.5, 1.5);
    tbuf *k_a = buf_input(t, C, 0.5, 1.5), *kk = buf_output(t, n);
    tbuf *state = wkv_state_make(t, sh, 0.5), *y = buf_output(t, n);
    tbuf *ckpt = buf_output(t, checkpoint_floats(batch, C));
    tbuf *v_pre = buf_input(t, n, -1, 1), *v_first = buf_input(t, n, -1, 1);
    tbuf *nu = buf_input(t, n, 0, 1);
    tbuf *k_pre_in = k_pre; /* key_prepare_from's: bf16 in place with rkv16 */
    if (rkv16) {
        /* as their GEMMs leave them (key_prepare_backward reads k_pre f32:
         * the forward reads a bf16 copy) */
        buf_round_bf16(t, k_pre);
        k_pre_in = buf_zero(t, n);
        t->gpu->copy(t->gpu, k_pre_in->gpu, k_pre->gpu, n * sizeof(float));
        tbuf *const pre[4] = {in.r, k_pre_in, v_pre, nu};
        for (int i = 0; i < 4; i++) {
            if (i != 1) buf_round_bf16(t, pre[i]);
            if (!rp_cuda_backend_store_bf16_inplace(t->gpu, pre[i]->gpu, n))
                fatal("%s: storing r, k_pre, v_pre, nu in bf16 failed", t->op);
        }
        for (int g = 0; g < 2; g++) { /* v = v_pre + (v_first - v_pre) nu */
            rp_backend *be = side(t, g);
            if (g) {
                be->rkv_only(be, at(in.v, g), n);
                be->value_residual_from(be, at(in.v, g), at(v_pre, g), at(v_first, g),
                                        at(nu, g), NULL, R, C);
                continue;
            }
            be->copy(be, at(in.v, g), at(v_pre, g), n * sizeof(float));
            be->value_residual(be, at(in.v, g), at(v_first, g), at(nu, g), R, C);
        }
    }
    for (int g = 0; g < 2; g++) {
        rp_backend *be = side(t, g);
        if (g) be->wkv_only(be, at(kk, g), n);
        if (g && rkv16) {
            be->rkv_only(be, at(in.k, g), n);
            be->key_prepare_from(be, at(kk, g), at(in.k, g), at(k_pre_in, g), at(in.a, g), NULL,
                                 at(k_k, g), at(k_a, g), R, C, N);
        } else {
            be->copy(be, at(in.k, g), at(k_pre, g), n * sizeof(float));
            be->key_prepare(be, at(kk, g), at(in.k, g), at(in.a, g), at(k_k, g), at(k_a, g), R,
                            C, N);
        }
    }
    if (rkv16) {
        /* k and v as the GPU stores them: bf16 in place, checked here; the
         * CPU's are then rounded so for its WKV7 */
        tbuf *wide = buf_zero(t, n);
        tbuf *const kv[2] = {in.k, in.v};
        static const char *const kv_names[2] = {"k (bf16 in place)", "v (bf16 in place)"};
        t->cpu->synchronize(t->cpu);
        for (int i = 0; i < 2; i++) {
            dev_widen(t, wide, kv[i]->gpu);
            float *host = download(t, wide);
            compare_values(t, kv_names[i], host, kv[i]->cpu, NULL, n, TOL_BF16_IO);
            free(host);
            host_round_bf16(kv[i]->cpu, n);
        }
    }
    for (int g = 0; g < 2; g++) {
        rp_backend *be = side(t, g);
        if (g) be->wkv_only(be, at(y, g), n); /* y bf16 in place: the fused groupnorm's */
        be->wkv7_forward_train(be, at(y, g), at(in.r, g), at(in.w_raw, g), at(in.k, g),
                               at(in.v, g), at(kk, g), at(in.a, g), at(state, g) + wkv, stride,
                               at(ckpt, g), batch, C, N);
    }
    tbuf *wide = buf_zero(t, n);
    dev_widen(t, wide, kk->gpu);
    float *host = download(t, wide);
    compare_values(t, "kk (bf16 in place)", host, kk->cpu, NULL, n, TOL_BF16_IO);
    free(host);
    dev_widen(t, wide, y->gpu);
    host = download(t, wide);
    compare_values(t, "y (bf16 in place)", host, y->cpu, NULL, n, TOL_WKV_KK16);
    free(host);
    if (!rkv16) compare(t, "k", in.k); /* else bf16 in place: compared above */
    compare(t, "state", state);
    compare(t, "checkpoints", ckpt);

    tbuf *dy = buf_input(t, n, -1, 1), *dstate = wkv_state_make(t, sh, 0.5);
    if (rkv16) { /* as the fused groupnorm's backward writes it (wkv_only) */
        buf_round_bf16(t, dy);
        if (!rp_cuda_backend_store_bf16_inplace(t->gpu, dy->gpu, n))
            fatal("%s: storing dy in bf16 failed", t->op);
    }
    tbuf *grad[WKV_GRADS];
    wkv_grads_make(t, grad, R, C);
    for (int i = 0; i < WKV_GRADS; i++)
        if (i == 0 || i == 2 || i == 3) grad[i] = buf_accum(t, n, -1, 1); /* dr dk dv */
    tbuf *dk_k = buf_accum(t, C, -1, 1), *dk_a = buf_accum(t, C, -1, 1);
    tbuf *dw0 = buf_accum(t, C, -1, 1);
    float *cpu_da = xmalloc(n * sizeof(float)); /* the CPU's da after WKV7 (rkv16) */
    /* rkv16: dr GEMM-only as training hints it (the receptance GEMM
     * backward right after WKV7 its only reader): that GEMM's dX and dW
     * against the CPU's, and the GPU's f32 dr not written */
    tbuf *xr = buf_input(t, n, -1, 1), *wr = buf_input(t, (size_t)C * C, -0.1, 0.1);
    tbuf *dxr = buf_output(t, n), *dwr = buf_accum(t, (size_t)C * C, -1, 1);
    float *dr_before = download(t, grad[0]);
    for (int g = 0; g < 2; g++) {
        rp_backend *be = side(t, g);
        if (g) be->wkv_only(be, at(grad[4], g), n);
        /* dw_raw GEMM-only as training hints it: the backward writes it bf16
         * in place, w0's bias_act_backward sums its bias gradient from those */
        if (g && be->gemm_only) be->gemm_only(be, at(grad[1], g), n);
        /* rkv16: da rkv_only as training hints it (the fused tail alone
         * reads it): written bf16 in place */
        if (g && rkv16) be->rkv_only(be, at(grad[5], g), n);
        if (g && rkv16) be->gemm_only(be, at(grad[0], g), n);
        be->wkv7_backward_beta(be, at(grad[0], g), at(grad[1], g), at(grad[2], g),
                               at(grad[3], g), at(grad[4], g), at(grad[5], g),
                               at(dstate, g) + wkv, stride, at(dy, g), at(in.r, g),
                               at(in.w_raw, g), at(in.k, g), at(in.v, g), at(kk, g),
                               at(in.a, g), at(ckpt, g), batch, C, N, 1.0f);
        if (rkv16)
            be->matmul_linear_backward_beta(be, at(dxr, g), at(dwr, g), at(grad[0], g),
                                            at(xr, g), at(wr, g), R, C, C, 0.0f);
        if (g) { /* dkk as the backward left it, before key_prepare_backward */
            dev_widen(t, wide, grad[4]->gpu);
            host = download(t, wide);
            compare_values(t, "dkk (bf16 in place)", host, grad[4]->cpu, NULL, n,
                           TOL_WKV_KK16);
            free(host);
            dev_widen(t, wide, grad[1]->gpu);
            host = download(t, wide);
            compare_values(t, "dw_raw (bf16 in place)", host, grad[1]->cpu, NULL, n,
                           TOL_WKV_KK16_DW);
            free(host);
            if (rkv16) {
                dev_widen(t, wide, grad[5]->gpu);
                host = download(t, wide);
                compare_values(t, "da (bf16 in place)", host, cpu_da, NULL, n, TOL_WKV_KK16);
                free(host);
                /* widened back for key_prepare_backward, which reads f32
                 * (the fused tail reads it bf16: attention_tail_backward's
                 * rows); the copy drops its in-place record */
                be->copy(be, at(grad[5], g), wide->gpu, n * sizeof(float));
            }
        } else if (rkv16) { /* the CPU's da rounded as the GPU stores it */
            host_round_bf16(grad[5]->cpu, n);
            memcpy(cpu_da, grad[5]->cpu, n * sizeof(float)); /* before key_prepare's part */
        }
        if (g && be->gemm_only) be->gemm_only(be, at(grad[1], g), n);
        be->bias_act_backward(be, at(grad[1], g), at(dw0, g), at(in.w_raw, g), R, C,
                              RP_ACT_NONE);
        be->key_prepare_backward(be, at(grad[2], g), at(grad[5], g), at(dk_k, g), at(dk_a, g),
                                 at(grad[4], g), at(k_pre, g), at(in.a, g), at(k_k, g),
                                 at(k_a, g), R, C, N);
    }
    if (rkv16) {
        compare(t, "dX (receptance GEMM, bf16 dr)", dxr);
        compare(t, "dW (receptance GEMM)", dwr);
        float *dr_after = download(t, grad[0]);
        const int untouched = !memcmp(dr_before, dr_after, n * sizeof(float));
        report(t, "dr f32 not written", 0.0, 0.0, untouched, untouched ? "" : "  (written)");
        free(dr_after);
    }
    free(dr_before);
    for (int i = 0; i < WKV_GRADS; i++) {
        if (i == 1 || i == 4) continue; /* bf16 in place: compared above */
        if (i == 0 && rkv16) continue;  /* GEMM-only: checked through its GEMM */
        host = download(t, grad[i]);
        compare_values(t, wkv_grad_names[i], host, grad[i]->cpu, grad[i]->before, n,
                       TOL_WKV_KK16);
        free(host);
    }
    host = download(t, dw0);
    compare_values(t, "dw0 (from bf16 dw_raw)", host, dw0->cpu, dw0->before, C,
                   TOL_WKV_KK16_DW0);
    free(host);
    compare(t, "dk_k", dk_k);
    compare(t, "dk_a", dk_a);
    compare(t, "dstate", dstate);
    free(cpu_da);
    twin_release(t);
}

static void host_round_bf16(float *p, size_t n) {
    for (size_t i = 0; i < n; i++) p[i] = round_bf16(p[i]);
}

static void check_wkv7_kk16(twin *t, const shape *sh) {
    const double saved = t->tol;
    const int saved_min_t = rp_cuda_wkv7_chunked_min_t;
    t->tol = TOL_WKV_KK16;
    for (int chunked = 1; chunked >= 0; chunked--) {
        /* the chunked kernels on bf16 wmma, then the per-token ones */
        rp_cuda_wkv7_chunked_min_t = chunked ? 0 : INT_MAX;
        wkv7_kk16_case(t, sh, -3, 3, 0);
        wkv7_kk16_case(t, sh, 4, 8, 0);
        wkv7_kk16_case(t, sh, -3, 3, 1);
    }
    rp_cuda_wkv7_chunked_min_t = saved_min_t;
    t->tol = saved;
}

/* ---- loss ---------------------------------------------------------------- */

/* losses [R] = -log softmax(logits)[target], dlogits [R,V] = (softmax -
 * onehot) scale, ignored rows 0; with separate dlogits, without, and with
 * dlogits aliasing logits (the training path) */
static void check_cross_entropy(twin *t, const shape *sh) {
    const int R = spec_rows(&sh->prefill), V = sh->V_loss;
    const size_t n = (size_t)R * V;
    int32_t *targets = xmalloc((size_t)R * sizeof *targets);
    const int valid = make_targets(t, targets, R, V);
    const float scale = 1.0f / (float)(valid > 0 ? valid : 1);
    tbuf *logits = buf_input(t, n, -6, 6);
    tbuf *losses = buf_output(t, R), *dlogits = buf_output(t, n);
    tbuf *losses_only = buf_output(t, R);
    for (int g = 0; g < 2; g++) {
        rp_backend *be = side(t, g);
        be->cross_entropy(be, at(losses, g), at(dlogits, g), at(logits, g), targets, R, V, scale);
        be->cross_entropy(be, at(losses_only, g), NULL, at(logits, g), targets, R, V, scale);
    }
    label(t, "R=%d V=%d", R, V);
    compare(t, "losses", losses);
    compare(t, "dlogits", dlogits);
    compare(t, "losses (no grad)", losses_only);
    twin_release(t);

    label(t, "R=%d V=%d in place", R, V);
    tbuf *z = buf_input(t, n, -6, 6), *losses_alias = buf_output(t, R);
    for (int g = 0; g < 2; g++)
        side(t, g)->cross_entropy(side(t, g), at(losses_alias, g), at(z, g), at(z, g), targets, R,
                                  V, scale);
    compare(t, "losses", losses_alias);
    compare(t, "dlogits=logits", z);
    free(targets);
}

/* The fused head (head_cross_entropy): all rows in one chunk without
 * L2Wrap, then chunks of 7 rows with it (GEMV-sized: f32 logits), then
 * chunks of 10 with it, the logits bf16 (backend.h head_logits16, BF16
 * math) and f32: losses, dx (overwrite), dhead (+=). 20 rows and an odd V
 * of at most 1001 keep the emulated run short. */
static void check_head_cross_entropy(twin *t, const shape *sh) {
    const int rows = spec_rows(&sh->prefill), R = rows < 20 ? rows : 20, C = sh->C;
    const int V = sh->V_loss > 1001 ? 1001 : sh->V_loss;
    const int keep16[2] = {side(t, 0)->head_logits16, side(t, 1)->head_logits16};
    for (int mode = 0; mode < 4; mode++) {
        const int wrap = mode > 0, chunk = mode == 0 ? R : mode == 1 ? 7 : 10;
        const int logits16 = mode != 2;
        label(t, "R=%d C=%d V=%d chunk=%d%s%s", R, C, V, chunk, wrap ? " l2wrap" : "",
              logits16 ? "" : " f32 logits");
        const double s = 1.0 / sqrt((double)C);
        tbuf *x = buf_input(t, (size_t)R * C, -1, 1), *head = buf_input(t, (size_t)V * C, -s, s);
        int32_t *targets = xmalloc((size_t)R * sizeof *targets);
        make_targets(t, targets, R, V);
        tbuf *loss = buf_output(t, R), *dx = buf_output(t, (size_t)R * C);
        tbuf *dhead = buf_accum(t, (size_t)V * C, -1e-3, 1e-3);
        tbuf *scratch = buf_zero(t, rp_head_ce_scratch_floats(chunk, V));
        const float scale = 1.0f / R, factor = wrap ? 1e-4f / R : 0.0f;
        for (int g = 0; g < 2; g++) {
            side(t, g)->head_logits16 = logits16 && keep16[g];
            side(t, g)->head_cross_entropy(side(t, g), at(loss, g), at(dx, g), at(dhead, g),
                                           at(scratch, g), at(x, g), at(head, g), targets, R, C,
                                           V, scale, factor, chunk);
            side(t, g)->head_logits16 = keep16[g];
        }
        compare(t, "losses", loss);
        compare(t, "dx", dx);
        compare(t, "dhead", dhead);
        free(targets);
        twin_release(t);
    }
}

/* dlogits [R,V] += factor * row max at the row's arg-max, rows with a
 * target; row_max/argmax from the CPU's row_max (host arrays) */
static void check_l2wrap(twin *t, const shape *sh) {
    const int R = spec_rows(&sh->prefill), V = sh->V_loss;
    const size_t n = (size_t)R * V;
    label(t, "R=%d V=%d", R, V);
    int32_t *targets = xmalloc((size_t)R * sizeof *targets);
    int32_t *argmax = xmalloc((size_t)R * sizeof *argmax);
    float *row_max = xmalloc((size_t)R * sizeof *row_max);
    const int valid = make_targets(t, targets, R, V);
    tbuf *logits = buf_input(t, n, -6, 6);
    t->cpu->row_max(t->cpu, row_max, argmax, logits->cpu, R, V);
    const float factor = 1e-4f / (float)(valid > 0 ? valid : 1);
    tbuf *dlogits = buf_accum(t, n, -1e-5, 1e-5); /* softmax-sized */
    for (int g = 0; g < 2; g++)
        side(t, g)->l2wrap(side(t, g), at(dlogits, g), row_max, argmax, targets, R, V, factor);
    compare(t, "dlogits", dlogits);
    free(targets);
    free(argmax);
    free(row_max);
}

/* row_max [R], argmax [R] (host, first index on ties) of x [R,V]. Row 0 is
 * constant (arg-max 0), row 1 peaks at the last column, every third row
 * has its maximum twice. */
static void check_row_max(twin *t, const shape *sh) {
    const int R = spec_rows(&sh->prefill), V = sh->V_loss;
    const size_t n = (size_t)R * V;
    label(t, "R=%d V=%d", R, V);
    float *x = xmalloc(n * sizeof *x);
    fill_uniform(t, x, n, -6, 6);
    for (int j = 0; j < V; j++) x[j] = 0.25f;
    if (R > 1) x[(size_t)V + V - 1] = 7.0f;
    for (int r = 2; r < R; r += 3) {
        const int j1 = (r * 37) % (V / 2);
        x[(size_t)r * V + j1] = x[(size_t)r * V + j1 + V / 2] = 7.0f + (float)r;
    }
    tbuf *xb = buf_from(t, x, n);
    float *max_cpu = xmalloc((size_t)R * sizeof(float));
    float *max_gpu = xmalloc((size_t)R * sizeof(float));
    int32_t *arg_cpu = xmalloc((size_t)R * sizeof(int32_t));
    int32_t *arg_gpu = xmalloc((size_t)R * sizeof(int32_t));
    memset(max_gpu, 0xFF, (size_t)R * sizeof(float));
    for (int r = 0; r < R; r++) arg_gpu[r] = -7;
    t->cpu->row_max(t->cpu, max_cpu, arg_cpu, xb->cpu, R, V);
    t->gpu->row_max(t->gpu, max_gpu, arg_gpu, xb->gpu, R, V);
    compare_values(t, "row_max", max_gpu, max_cpu, NULL, (size_t)R, t->tol);
    int differ = 0;
    for (int r = 0; r < R; r++) differ += arg_gpu[r] != arg_cpu[r];
    char note[64] = "";
    if (differ) snprintf(note, sizeof note, "  (%d of %d rows differ)", differ, R);
    report(t, "argmax", 0.0, 0.0, differ == 0, note);
    free(x);
    free(max_cpu);
    free(max_gpu);
    free(arg_cpu);
    free(arg_gpu);
}

/* ---- optimizer ----------------------------------------------------------- */

/* sum of squares of x [n] in double; also from an odd float offset (the
 * gradient-norm loop runs over tensors inside one flat buffer) */
static void check_sum_squares(twin *t, const shape *sh) {
    const size_t n = sh->n_params;
    tbuf *x = buf_input(t, n, -1, 1);
    for (int offset = 0; offset <= 1; offset++) {
        const size_t count = n - 2 * (size_t)offset;
        label(t, "n=%zu at +%d", count, offset);
        const double c = t->cpu->sum_squares(t->cpu, x->cpu + offset, count);
        const double g = t->gpu->sum_squares(t->gpu, x->gpu + offset, count);
        const double rel = fabs(g - c) / (c > 0 ? c : 1.0);
        report(t, "sum", rel, t->tol, isfinite(g) && rel <= t->tol,
               isfinite(g) ? NULL : "  (GPU result not finite)");
    }
}

/* AdamW on n floats at step 10; param is compared by its update (the
 * params are small, so the update is not lost in their rounding) */
static void adamw_case(twin *t, size_t n, int offset) {
    const size_t count = n - 2 * (size_t)offset;
    label(t, "n=%zu at +%d", count, offset);
    tbuf *param = buf_accum(t, n, -0.02, 0.02), *grad = buf_input(t, n, -0.01, 0.01);
    tbuf *m = buf_input(t, n, -3e-3, 3e-3), *v = buf_input(t, n, 1e-6, 1e-4);
    const float beta1 = 0.9f, beta2 = 0.99f;
    const float bc1 = 1.0f - powf(beta1, 10), bc2 = 1.0f - powf(beta2, 10);
    for (int g = 0; g < 2; g++)
        side(t, g)->adamw(side(t, g), at(param, g) + offset, at(grad, g) + offset,
                          at(m, g) + offset, at(v, g) + offset, count, 1e-3f, beta1, beta2, 1e-8f,
                          0.1f, 0.5f, bc1, bc2);
    compare(t, "param update", param);
    compare(t, "m", m);
    compare(t, "v", v);
    twin_release(t);
}

static void check_adamw(twin *t, const shape *sh) {
    adamw_case(t, sh->n_params, 0);
    adamw_case(t, sh->n_params, 1);
}

/* ---- GEMMs (fp32 and bf16 math) ------------------------------------------ */

typedef struct {
    int M, N, K;
    float beta;  /* forward: 0 overwrite, 1 accumulate */
    int with_dx; /* backward: dx requested */
} gemm_case;

/* W scaled by 1/sqrt(K) as an initialised layer; y = x op(W) + beta y */
static void gemm_forward_case(twin *t, int lora, const gemm_case *c) {
    const size_t nx = (size_t)c->M * c->K, nw = (size_t)c->N * c->K, ny = (size_t)c->M * c->N;
    const double s = 1.0 / sqrt((double)c->K);
    label(t, "M=%d N=%d K=%d beta=%g", c->M, c->N, c->K, (double)c->beta);
    tbuf *x = buf_input(t, nx, -1, 1), *w = buf_input(t, nw, -s, s);
    tbuf *y = c->beta != 0.0f ? buf_accum(t, ny, -1, 1) : buf_output(t, ny);
    for (int g = 0; g < 2; g++) {
        rp_backend *be = side(t, g);
        if (lora) be->matmul_lora(be, at(y, g), at(x, g), at(w, g), c->M, c->N, c->K, c->beta);
        else be->matmul_linear(be, at(y, g), at(x, g), at(w, g), c->M, c->N, c->K, c->beta);
    }
    compare(t, "y", y);
    twin_release(t);
}

/* dx [M,K] += (optional), dw += */
static void gemm_backward_case(twin *t, int lora, const gemm_case *c) {
    const size_t nx = (size_t)c->M * c->K, nw = (size_t)c->N * c->K, ny = (size_t)c->M * c->N;
    const double s = 1.0 / sqrt((double)c->K);
    label(t, "M=%d N=%d K=%d %s", c->M, c->N, c->K, c->with_dx ? "dx" : "no dx");
    tbuf *x = buf_input(t, nx, -1, 1), *w = buf_input(t, nw, -s, s);
    tbuf *dy = buf_input(t, ny, -1, 1), *dw = buf_accum(t, nw, -1, 1);
    tbuf *dx = c->with_dx ? buf_accum(t, nx, -1, 1) : NULL;
    for (int g = 0; g < 2; g++) {
        rp_backend *be = side(t, g);
        float *dxp = dx ? at(dx, g) : NULL;
        if (lora)
            be->matmul_lora_backward(be, dxp, at(dw, g), at(dy, g), at(x, g), at(w, g), c->M,
                                     c->N, c->K);
        else
            be->matmul_linear_backward(be, dxp, at(dw, g), at(dy, g), at(x, g), at(w, g), c->M,
                                       c->N, c->K);
    }
    if (dx) compare(t, "dx", dx);
    compare(t, "dw", dw);
    twin_release(t);
}

/* The model's linear layers: C x C projections, the FFN pair (into the
 * residual: beta 1), decode rows (M = 1, 5, 8: the GEMV path) and an odd K. */
static int linear_cases(const shape *sh, gemm_case *out) {
    const int R = spec_rows(&sh->prefill), C = sh->C, F = sh->F;
    const gemm_case cases[] = {
        {R, C, C, 0.0f, 1}, {R, F, C, 0.0f, 0}, {R, C, F, 1.0f, 1},
        {1, C, C, 0.0f, 1}, {5, F, C, 1.0f, 0}, {8, C, F, 1.0f, 0}, {2, 70, 37, 1.0f, 0},
    };
    memcpy(out, cases, sizeof cases);
    return (int)(sizeof cases / sizeof cases[0]);
}

/* LoRA factors: down to the rank, back up to C (beta 0 and 1), decode. */
static int lora_cases(const shape *sh, gemm_case *out) {
    const int R = spec_rows(&sh->prefill), C = sh->C, D = sh->rank;
    const gemm_case cases[] = {
        {R, D, C, 0.0f, 1}, {R, C, D, 0.0f, 0}, {R, C, D, 1.0f, 1}, {1, D, C, 0.0f, 1},
        {5, C, D, 1.0f, 0}, {8, D, C, 0.0f, 0}, {3, 70, 37, 1.0f, 0},
    };
    memcpy(out, cases, sizeof cases);
    return (int)(sizeof cases / sizeof cases[0]);
}

static void check_matmul_linear(twin *t, const shape *sh) {
    gemm_case cases[8];
    const int n = linear_cases(sh, cases);
    for (int i = 0; i < n; i++) gemm_forward_case(t, 0, &cases[i]);
}

static void check_matmul_lora(twin *t, const shape *sh) {
    gemm_case cases[8];
    const int n = lora_cases(sh, cases);
    for (int i = 0; i < n; i++) gemm_forward_case(t, 1, &cases[i]);
}

static void check_matmul_linear_backward(twin *t, const shape *sh) {
    gemm_case cases[8];
    const int n = linear_cases(sh, cases);
    for (int i = 0; i < n; i++) gemm_backward_case(t, 0, &cases[i]);
}

static void check_matmul_lora_backward(twin *t, const shape *sh) {
    gemm_case cases[8];
    const int n = lora_cases(sh, cases);
    for (int i = 0; i < n; i++) gemm_backward_case(t, 1, &cases[i]);
}

/* A LoRA with its hidden rows GEMM-only (backend.h gemm_only; the CPU has
 * no hint): forward hid = act(x A), y = hid B; backward dhid = dy B^T
 * (GEMM-only too, then times act'(hid) in place), dB += hid^T dy, dx =
 * dhid A^T, dA += x^T dhid. In bf16 math the GPU keeps hid and dhid in
 * bf16 in place (a GEMM writing bf16 C, the activation and its backward
 * bf16 in and out, the backward reading bf16 hid); decode rows (R = 5)
 * keep the GEMV path forward (f32 hid), the backward GEMMs still write
 * dhid bf16. */
static void gemm_only_case(twin *t, int R, int C, int D, rp_activation act) {
    const double s = 1.0 / sqrt((double)C);
    label(t, "R=%d C=%d D=%d act=%d", R, C, D, (int)act);
    tbuf *x = buf_input(t, (size_t)R * C, -1, 1), *a = buf_input(t, (size_t)C * D, -s, s);
    tbuf *b = buf_input(t, (size_t)D * C, -s, s), *dy = buf_input(t, (size_t)R * C, -1, 1);
    tbuf *hid = buf_output(t, (size_t)R * D), *dhid = buf_output(t, (size_t)R * D);
    tbuf *y = buf_output(t, (size_t)R * C), *dx = buf_output(t, (size_t)R * C);
    tbuf *da = buf_accum(t, (size_t)C * D, -1, 1), *db = buf_accum(t, (size_t)D * C, -1, 1);
    for (int g = 0; g < 2; g++) {
        rp_backend *be = side(t, g);
        if (be->gemm_only) be->gemm_only(be, at(hid, g), (size_t)R * D);
        be->matmul_lora(be, at(hid, g), at(x, g), at(a, g), R, D, C, 0.0f);
        if (act != RP_ACT_NONE) be->bias_act(be, at(hid, g), NULL, R, D, act);
        be->matmul_lora(be, at(y, g), at(hid, g), at(b, g), R, C, D, 0.0f);
        if (be->gemm_only) be->gemm_only(be, at(dhid, g), (size_t)R * D);
        be->matmul_lora_backward_beta(be, at(dhid, g), at(db, g), at(dy, g), at(hid, g),
                                      at(b, g), R, C, D, 0.0f);
        if (act != RP_ACT_NONE) be->bias_act_backward(be, at(dhid, g), NULL, at(hid, g), R, D, act);
        be->matmul_lora_backward_beta(be, at(dx, g), at(da, g), at(dhid, g), at(x, g), at(a, g),
                                      R, D, C, 0.0f);
    }
    compare(t, "y", y);
    compare(t, "dx", dx);
    compare(t, "dA", da);
    compare(t, "dB", db);
    twin_release(t);
}

/* The two kernel outputs training marks GEMM-only besides the GEMM ones:
 * the head layernorm's y and bonus_gate_to's og, each then a GEMM's x (in
 * bf16 math the GPU writes them in bf16 in place, no f32); the CPU has
 * neither hint nor bonus_gate_to (copy + bonus_gate). R = 5: f32, GEMVs. */
static void gemm_only_kernel_case(twin *t, int R, int C, int N) {
    const size_t n = (size_t)R * C;
    const double s = 1.0 / sqrt((double)C);
    label(t, "R=%d C=%d layernorm, bonus_gate_to", R, C);
    tbuf *x = buf_input(t, n, -1, 1), *lw = buf_input(t, C, 0.5, 1.5);
    tbuf *lb = buf_input(t, C, -0.5, 0.5), *w = buf_input(t, (size_t)C * C, -s, s);
    tbuf *o = buf_input(t, n, -1, 1), *r = buf_input(t, n, -1, 1), *k = buf_input(t, n, -1, 1);
    tbuf *v = buf_input(t, n, -1, 1), *gi = buf_input(t, n, -1, 1), *r_k = buf_input(t, C, -1, 1);
    tbuf *ln = buf_output(t, n), *og = buf_output(t, n);
    tbuf *y1 = buf_output(t, n), *y2 = buf_output(t, n);
    for (int g = 0; g < 2; g++) {
        rp_backend *be = side(t, g);
        if (be->gemm_only) be->gemm_only(be, at(ln, g), n);
        be->layernorm(be, at(ln, g), NULL, NULL, at(x, g), at(lw, g), at(lb, g), R, C,
                      LN_EPS);
        be->matmul_linear(be, at(y1, g), at(ln, g), at(w, g), R, C, C, 0.0f);
        if (be->bonus_gate_to) {
            if (be->gemm_only) be->gemm_only(be, at(og, g), n);
            be->bonus_gate_to(be, at(og, g), at(o, g), at(r, g), at(k, g), at(v, g), at(r_k, g),
                              at(gi, g), R, C, N);
        } else {
            be->copy(be, at(og, g), at(o, g), n * sizeof(float));
            be->bonus_gate(be, at(og, g), at(r, g), at(k, g), at(v, g), at(r_k, g), at(gi, g), R,
                           C, N);
        }
        be->matmul_linear(be, at(y2, g), at(og, g), at(w, g), R, C, C, 0.0f);
    }
    compare(t, "x . layernorm", y1);
    compare(t, "x . bonus_gate_to", y2);
    twin_release(t);
}

/* Training's a (= sigmoid(a0 + hid B)): the up GEMM's output under
 * gemm_only, the a0 sigmoid in place, then the a0 bias backward reading it
 * as its y, with a bias gradient. In bf16 math the GPU keeps a in bf16 in
 * place (act' from the rounded a: 2^-8 relative at most); R = 5: f32, GEMVs. */
static void gemm_only_bias_case(twin *t, int R, int C, int D) {
    const double s = 1.0 / sqrt((double)D);
    const size_t n = (size_t)R * C;
    label(t, "R=%d C=%d D=%d sigmoid(a0 + .) and its bias backward", R, C, D);
    tbuf *hid = buf_input(t, (size_t)R * D, -1, 1), *b = buf_input(t, (size_t)D * C, -s, s);
    tbuf *bias = buf_input(t, C, -1, 1), *y = buf_output(t, n), *dy = buf_input(t, n, -1, 1);
    tbuf *dbias = buf_accum(t, C, -1, 1);
    for (int g = 0; g < 2; g++) {
        rp_backend *be = side(t, g);
        if (be->gemm_only) be->gemm_only(be, at(y, g), n);
        be->matmul_lora(be, at(y, g), at(hid, g), at(b, g), R, C, D, 0.0f);
        be->bias_act(be, at(y, g), at(bias, g), R, C, RP_ACT_SIGMOID);
        be->bias_act_backward(be, at(dy, g), at(dbias, g), at(y, g), R, C, RP_ACT_SIGMOID);
    }
    compare(t, "d pre", dy);
    compare(t, "dbias", dbias);
    twin_release(t);
}

/* y = hid W + bias (matmul_lora_bias; training's w_raw = w0 + ... W2), W
 * and bias registered weights: in BF16 math a GEMM-only y gets the bias in
 * the GEMM's epilogue (cuBLASLt; the bias's bf16 copy), read back widened
 * against the CPU's matmul_lora + bias_act, and against the GPU's f32
 * twin of the same values (the copies off: the GEMM in f32, then one
 * rounding of y + bf16(bias)) bit for bit; unhinted, or at decode rows, y
 * is f32 with the bits of matmul_lora + bias_act on the GPU. */
static void matmul_lora_bias_case(twin *t, int R, int C, int D) {
    const double s = 1.0 / sqrt((double)D);
    const size_t n = (size_t)R * C;
    rp_backend *gpu = t->gpu;
    label(t, "R=%d C=%d D=%d", R, C, D);
    if (!gpu->matmul_lora_bias) fatal("%s: the CUDA backend has no matmul_lora_bias", t->op);
    tbuf *flat = buf_input(t, (size_t)C + (size_t)D * C, -s, s); /* bias [C], W [D,C] */
    tbuf *hid = buf_input(t, (size_t)R * D, -1, 1);
    tbuf *y = buf_output(t, n), *y_off = buf_zero(t, n), *y_plain = buf_output(t, n);
    tbuf *y_two = buf_zero(t, n);
    if (gpu->register_weights) gpu->register_weights(gpu, flat->gpu, flat->n);
    const float *bias_g = flat->gpu, *w_g = flat->gpu + C;
    for (int g = 0; g < 2; g++) {
        rp_backend *be = side(t, g);
        const float *bias = at(flat, g), *w = at(flat, g) + C;
        if (g) {
            be->gemm_only(be, at(y, g), n);
            be->matmul_lora_bias(be, at(y, g), at(hid, g), w, bias, R, C, D);
        } else {
            be->matmul_lora(be, at(y, g), at(hid, g), w, R, C, D, 0.0f);
            be->bias_act(be, at(y, g), bias, R, C, RP_ACT_NONE);
        }
        /* unhinted: f32 y */
        if (g) {
            be->matmul_lora_bias(be, at(y_plain, g), at(hid, g), w, bias, R, C, D);
        } else {
            be->matmul_lora(be, at(y_plain, g), at(hid, g), w, R, C, D, 0.0f);
            be->bias_act(be, at(y_plain, g), bias, R, C, RP_ACT_NONE);
        }
    }
    compare(t, "y (f32, unhinted)", y_plain);
    gpu->matmul_lora(gpu, y_two->gpu, hid->gpu, w_g, R, C, D, 0.0f);
    gpu->bias_act(gpu, y_two->gpu, bias_g, R, C, RP_ACT_NONE);
    compare_gpu_exact(t, "y unhinted == matmul_lora + bias_act", y_plain, y_two);
    if (R <= 8) { /* decode rows: GEMV, f32 y whatever the hint */
        compare(t, "y (decode rows)", y);
        twin_release(t);
        return;
    }
    tbuf *wide = buf_zero(t, n);
    dev_widen(t, wide, y->gpu);
    float *host = download(t, wide);
    compare_values(t, "y (bf16 in place, + bias epilogue)", host, y->cpu, NULL, n,
                   t->tol > TOL_BF16_IO ? t->tol : TOL_BF16_IO);
    free(host);
    /* the copies off: the same values in f32 */
    rp_cuda_backend_set_act16(gpu, 0);
    gpu->gemm_only(gpu, y_off->gpu, n);
    gpu->matmul_lora_bias(gpu, y_off->gpu, hid->gpu, w_g, bias_g, R, C, D);
    rp_cuda_backend_set_act16(gpu, 1);
    compare_gpu_exact(t, "y bf16 == its copies-off twin", wide, y_off);
    twin_release(t);
}

static void check_matmul_lora_bias(twin *t, const shape *sh) {
    matmul_lora_bias_case(t, spec_rows(&sh->prefill), sh->C, sh->rank);
    matmul_lora_bias_case(t, 5, sh->C, sh->rank);
}

static void check_gemm_only(twin *t, const shape *sh) {
    static const rp_activation acts[3] = {RP_ACT_NONE, RP_ACT_TANH, RP_ACT_SIGMOID};
    for (int i = 0; i < 3; i++) {
        gemm_only_case(t, spec_rows(&sh->prefill), sh->C, sh->rank, acts[i]);
        gemm_only_case(t, 5, sh->C, sh->rank, acts[i]);
    }
    /* the FFN hidden: relu^2 over F = 4 C */
    gemm_only_case(t, spec_rows(&sh->prefill), sh->C, 4 * sh->C, RP_ACT_RELU_SQUARED);
    gemm_only_kernel_case(t, spec_rows(&sh->prefill), sh->C, HEAD_SIZE);
    gemm_only_kernel_case(t, 5, sh->C, HEAD_SIZE);
    gemm_only_bias_case(t, spec_rows(&sh->prefill), sh->C, sh->rank);
    gemm_only_bias_case(t, 5, sh->C, sh->rank);
}

/* GEMMs reading weights inside a registered range (register_weights: in
 * bf16 math a bf16 copy) after each kind of write through the backend. */
typedef struct {
    tbuf *flat;            /* [C] vector, then W [C,C] (linear), then Wl [C,D] (LoRA) */
    size_t w_off, l_off;   /* floats */
    tbuf *x, *y, *yl, *dx; /* x [R,C] -> y [R,C], yl [R,D]; dx [R,C] += dy W */
    tbuf *y2, *yl2;        /* the first 2 rows again: the decode (GEMV) path */
    tbuf *dy;
    int R, C, D;
} registered;

static void registered_gemms(twin *t, registered *rg, const char *stage) {
    label(t, "%s R=%d C=%d rank=%d", stage, rg->R, rg->C, rg->D);
    poison_gpu(t, rg->y);
    poison_gpu(t, rg->yl);
    poison_gpu(t, rg->y2);
    poison_gpu(t, rg->yl2);
    tbuf *dx = buf_accum(t, (size_t)rg->R * rg->C, -1, 1);
    tbuf *dw = buf_accum(t, (size_t)rg->C * rg->C, -1, 1);
    for (int g = 0; g < 2; g++) {
        rp_backend *be = side(t, g);
        const float *w = at(rg->flat, g) + rg->w_off, *wl = at(rg->flat, g) + rg->l_off;
        be->matmul_linear(be, at(rg->y, g), at(rg->x, g), w, rg->R, rg->C, rg->C, 0.0f);
        be->matmul_linear(be, at(rg->y2, g), at(rg->x, g), w, 2, rg->C, rg->C, 0.0f);
        be->matmul_lora(be, at(rg->yl2, g), at(rg->x, g), wl, 2, rg->D, rg->C, 0.0f);
        be->matmul_lora(be, at(rg->yl, g), at(rg->x, g), wl, rg->R, rg->D, rg->C, 0.0f);
        be->matmul_linear_backward(be, at(dx, g), at(dw, g), at(rg->dy, g), at(rg->x, g), w,
                                   rg->R, rg->C, rg->C);
    }
    compare(t, "y linear", rg->y);
    compare(t, "y linear, 2 rows", rg->y2);
    compare(t, "y lora, 2 rows", rg->yl2);
    compare(t, "y lora", rg->yl);
    compare(t, "dx linear", dx);
}

static void check_registered_weights(twin *t, const shape *sh) {
    registered rg;
    rg.R = spec_rows(&sh->prefill);
    rg.C = sh->C;
    rg.D = sh->rank;
    const int R = rg.R, C = rg.C, D = rg.D;
    rg.w_off = (size_t)C;
    rg.l_off = rg.w_off + (size_t)C * C;
    const size_t total = rg.l_off + (size_t)C * D;
    rg.flat = buf_input(t, total, -0.05, 0.05); /* written before registration */
    if (t->gpu->register_weights) t->gpu->register_weights(t->gpu, rg.flat->gpu, total);
    rg.x = buf_input(t, (size_t)R * C, -1, 1);
    rg.dy = buf_input(t, (size_t)R * C, -1, 1);
    rg.y = buf_output(t, (size_t)R * C);
    rg.yl = buf_output(t, (size_t)R * D);
    rg.y2 = buf_output(t, (size_t)2 * C);
    rg.yl2 = buf_output(t, (size_t)2 * D);
    registered_gemms(t, &rg, "registered");

    /* AdamW at step 1 moves every weight by ~lr: far more than bf16 rounding */
    tbuf *grad = buf_input(t, total, -1, 1), *m = buf_zero(t, total), *v = buf_zero(t, total);
    for (int g = 0; g < 2; g++)
        side(t, g)->adamw(side(t, g), at(rg.flat, g), at(grad, g), at(m, g), at(v, g), total,
                          0.02f, 0.9f, 0.99f, 1e-8f, 0.0f, 1.0f, 1.0f - 0.9f, 1.0f - 0.99f);
    registered_gemms(t, &rg, "after adamw");

    /* copy_to_device over the second half of W's rows */
    float *host = xmalloc((size_t)C * C * sizeof *host);
    fill_uniform(t, host, (size_t)C * C, -0.05, 0.05);
    const size_t half = (size_t)(C / 2) * C;
    for (int g = 0; g < 2; g++)
        side(t, g)->copy_to_device(side(t, g), at(rg.flat, g) + rg.w_off + half, host,
                                   half * sizeof(float));
    registered_gemms(t, &rg, "after copy_to_device");

    /* copy: the whole LoRA factor, and a stretch of W at an odd offset */
    tbuf *src = buf_input(t, (size_t)C * C, -0.05, 0.05);
    for (int g = 0; g < 2; g++) {
        rp_backend *be = side(t, g);
        be->copy(be, at(rg.flat, g) + rg.l_off, at(src, g), (size_t)C * D * sizeof(float));
        be->copy(be, at(rg.flat, g) + rg.w_off + 3, at(src, g) + 5,
                 (size_t)(3 * C + 1) * sizeof(float));
    }
    registered_gemms(t, &rg, "after copy");

    /* fill_zero of a stretch of W at an odd offset */
    for (int g = 0; g < 2; g++)
        side(t, g)->fill_zero(side(t, g), at(rg.flat, g) + rg.w_off + (size_t)5 * C + 3,
                              (size_t)(2 * C + 1) * sizeof(float));
    registered_gemms(t, &rg, "after fill_zero");
    free(host);

    /* refresh_weights after a write behind the copies' back (ZeRO-1's NCCL
     * all-gather): add stands in for the NCCL receive, since it is for
     * gradients and leaves the copies alone; a delta of ~1 on weights of
     * ~0.05 is far beyond bf16 rounding, so a stale copy fails. The range is
     * odd-sized at an odd offset and runs from W into the LoRA factor. */
    if (t->gpu->refresh_weights) {
        const size_t at0 = rg.w_off + (size_t)(C / 2) * C + 1, n = (size_t)(C / 2) * C + 7;
        tbuf *delta = buf_input(t, n, -1, 1);
        for (int g = 0; g < 2; g++) {
            rp_backend *be = side(t, g);
            be->add(be, at(rg.flat, g) + at0, at(delta, g), n);
            if (be->refresh_weights) be->refresh_weights(be, at(rg.flat, g) + at0, n);
        }
        registered_gemms(t, &rg, "after refresh_weights");
    }

    /* weight_copy (bf16 math): ZeRO-1's bf16 all-gather receives straight
     * into the copy and leaves the fp32 stale. bf16 written into the copy of
     * a stretch of W (odd offset and size); the CPU side gets the same
     * values in fp32. The GEMMs must read the new values (new ~1 against
     * stale ~0.05). Then the GPU's fp32 gets them too, so later checks start
     * from equal weights. */
    void *copy = t->gpu->weight_copy
                     ? t->gpu->weight_copy(t->gpu, rg.flat->gpu + rg.w_off + C + 3,
                                           (size_t)(C / 2) * C + 5)
                     : NULL;
    if (copy) {
        const size_t at0 = rg.w_off + (size_t)C + 3, n = (size_t)(C / 2) * C + 5;
        float *vals = xmalloc(n * sizeof *vals);
        uint16_t *bits = xmalloc(n * sizeof *bits);
        fill_uniform(t, vals, n, -1, 1);
        for (size_t i = 0; i < n; i++) {
            bits[i] = rp_f32_to_bf16(vals[i]);
            vals[i] = rp_bf16_to_f32(bits[i]);
        }
        t->gpu->copy_to_device(t->gpu, copy, bits, n * sizeof *bits);
        t->cpu->copy_to_device(t->cpu, rg.flat->cpu + at0, vals, n * sizeof *vals);
        registered_gemms(t, &rg, "after a write into weight_copy");
        t->gpu->copy_to_device(t->gpu, rg.flat->gpu + at0, vals, n * sizeof *vals);
        free(vals);
        free(bits);
    }

    /* free forgets the range: a buffer allocated in its place (allocators
     * reuse addresses) and written by a kernel is read as written, not
     * through a leftover bf16 copy */
    const uintptr_t old = (uintptr_t)rg.flat->gpu;
    t->gpu->free(t->gpu, rg.flat->gpu);
    rg.flat->gpu = t->gpu->alloc(t->gpu, total * sizeof(float));
    if (!rg.flat->gpu) fatal("%s: alloc of %zu bytes failed", t->op, total * sizeof(float));
    const int reused = (uintptr_t)rg.flat->gpu == old;
    tbuf *a = buf_input(t, total, -0.05, 0.05), *b = buf_input(t, total, -0.05, 0.05);
    tbuf *mu = buf_input(t, C, 0, 1);
    for (int g = 0; g < 2; g++) /* total = (1 + C + D) rows of C */
        side(t, g)->lerp(side(t, g), at(rg.flat, g), at(a, g), at(b, g), at(mu, g), 1 + C + D, C);
    registered_gemms(t, &rg, reused ? "freed, reused" : "freed");
}

/* ---- empty sizes ----------------------------------------------------------- */

/* Every op with R = 0 (n = 0, no sequences): nothing may change, nothing
 * may fail (a kernel launched with zero blocks is an error). */
static void check_empty(twin *t, const shape *sh) {
    const int C = sh->C, N = HEAD_SIZE, V = 64;
    label(t, "R=0 C=%d", C);
    enum { NB = 12 };
    tbuf *b[NB];
    for (int i = 0; i < NB; i++) b[i] = buf_input(t, (size_t)C * C, -1, 1);
    const seq_spec none = {0, {0}, {0}};
    twin_batch tb;
    const rp_batch *batch = batch_make(&tb, &none);
    int32_t ids[1] = {0};
    float host[1] = {0}, row_max[1] = {0};
    int32_t argmax[1] = {0};
    double sums[2] = {0, 0};
    for (int g = 0; g < 2; g++) {
        rp_backend *be = side(t, g);
        float *p[NB];
        for (int i = 0; i < NB; i++) p[i] = at(b[i], g);
        be->copy_to_device(be, p[0], host, 0);
        be->copy_to_host(be, host, p[0], 0);
        be->copy(be, p[0], p[1], 0);
        be->fill_zero(be, p[0], 0);
        be->add(be, p[0], p[1], 0);
        be->matmul_linear(be, p[0], p[1], p[2], 0, C, C, 0.0f);
        be->matmul_lora(be, p[0], p[1], p[2], 0, C, C, 1.0f);
        be->embedding(be, p[0], p[1], ids, 0, C);
        be->layernorm(be, p[0], p[1], p[2], p[3], p[4], p[5], 0, C, LN_EPS);
        be->token_shift(be, p[0], p[1], p[2], (size_t)C, batch, C);
        be->lerp(be, p[0], p[1], p[2], p[3], 0, C);
        be->bias_act(be, p[0], p[1], 0, C, RP_ACT_TANH);
        be->value_residual(be, p[0], p[1], p[2], 0, C);
        be->key_prepare(be, p[0], p[1], p[2], p[3], p[4], 0, C, N);
        be->groupnorm(be, p[0], p[1], p[2], p[3], p[4], p[5], 0, C, N, GN_EPS);
        be->bonus_gate(be, p[0], p[1], p[2], p[3], p[4], p[5], 0, C, N);
        be->wkv7(be, p[0], p[1], p[2], p[3], p[4], p[5], p[6], p[7], (size_t)C * N, batch, C, N);
        be->matmul_linear_backward(be, p[0], p[1], p[2], p[3], p[4], 0, C, C);
        be->matmul_lora_backward(be, p[0], p[1], p[2], p[3], p[4], 0, C, C);
        be->embedding_backward(be, p[0], p[1], ids, 0, C);
        be->layernorm_backward(be, p[0], p[1], p[2], p[3], p[4], p[5], p[6], p[7], 0, C);
        be->token_shift_backward(be, p[0], p[1], (size_t)C, p[2], batch, C);
        be->lerp_backward(be, p[0], p[1], p[2], p[3], p[4], p[5], p[6], 0, C);
        be->bias_act_backward(be, p[0], p[1], p[2], 0, C, RP_ACT_SIGMOID);
        be->value_residual_backward(be, p[0], p[1], p[2], p[3], p[4], p[5], 0, C);
        be->key_prepare_backward(be, p[0], p[1], p[2], p[3], p[4], p[5], p[6], p[7], p[8], 0, C,
                                 N);
        be->groupnorm_backward(be, p[0], p[1], p[2], p[3], p[4], p[5], p[6], p[7], 0, C, N);
        be->bonus_gate_backward(be, p[0], p[1], p[2], p[3], p[4], p[5], p[6], p[7], p[8], p[9],
                                p[10], p[11], p[0], 0, C, N);
        be->wkv7_forward_train(be, p[0], p[1], p[2], p[3], p[4], p[5], p[6], p[7],
                               (size_t)C * N, p[8], batch, C, N);
        be->wkv7_backward(be, p[0], p[1], p[2], p[3], p[4], p[5], p[6], (size_t)C * N, p[7],
                          p[8], p[9], p[10], p[11], p[0], p[1], p[2], batch, C, N);
        be->cross_entropy(be, p[0], p[1], p[2], ids, 0, V, 1.0f);
        be->l2wrap(be, p[0], row_max, argmax, ids, 0, V, 1.0f);
        be->row_max(be, row_max, argmax, p[0], 0, V);
        sums[g] = be->sum_squares(be, p[0], 0);
        be->adamw(be, p[0], p[1], p[2], p[3], 0, 1e-3f, 0.9f, 0.99f, 1e-8f, 0.1f, 1.0f, 0.1f,
                  0.01f);
    }
    size_t differ = 0;
    for (int i = 0; i < NB; i++) {
        float *back = download(t, b[i]);
        for (size_t j = 0; j < b[i]->n; j++)
            differ += memcmp(back + j, b[i]->cpu + j, sizeof(float)) != 0;
        free(back);
    }
    char note[64] = "";
    if (differ) snprintf(note, sizeof note, "  (%zu floats changed)", differ);
    report(t, "buffers", 0.0, 0.0, differ == 0, note);
    report(t, "sum_squares = 0", fabs(sums[1]), 0.0, sums[1] == 0.0, NULL);
}

/* ---- the table of checks ----------------------------------------------------- */

/* ---- fused decode ops ------------------------------------------------------ */

/* Decode row counts of the fused ops (the CUDA kernels take up to 8 rows;
 * 12 runs the separate ops). */
static const int decode_rows[] = {1, 3, 8, 12};

/* Seven GEMVs in one gemv_group: both weight layouts, every activation,
 * bias or none, overwrite and accumulate; the weights registered on the
 * CUDA side, so the bf16 backend reads their bf16 copies. */
static void check_gemv_group(twin *t, const shape *sh) {
    const int C = sh->C, F = sh->F, D = sh->rank;
    for (size_t ri = 0; ri < sizeof decode_rows / sizeof decode_rows[0]; ri++) {
        const int M = decode_rows[ri];
        label(t, "M=%d C=%d F=%d rank=%d", M, C, F, D);
        /* N, K, in_out, beta, bias, act */
        const struct {
            int N, K, in_out;
            float beta;
            int bias;
            rp_activation act;
        } spec[] = {
            {C, C, 0, 0.0f, 0, RP_ACT_NONE},         {F, C, 0, 0.0f, 0, RP_ACT_RELU_SQUARED},
            {D, C, 1, 0.0f, 0, RP_ACT_TANH},         {D, C, 1, 0.0f, 0, RP_ACT_SIGMOID},
            {C, D, 1, 0.0f, 1, RP_ACT_SIGMOID},      {C, D, 1, 0.0f, 1, RP_ACT_NONE},
            {C, F, 0, 1.0f, 0, RP_ACT_NONE},
        };
        enum { JOBS = sizeof spec / sizeof spec[0] };
        tbuf *x[JOBS], *w[JOBS], *y[JOBS], *bias[JOBS];
        for (int j = 0; j < JOBS; j++) {
            const double sc = 1.0 / sqrt((double)spec[j].K);
            x[j] = buf_input(t, (size_t)M * spec[j].K, -1, 1);
            w[j] = buf_input(t, (size_t)spec[j].N * spec[j].K, -sc, sc);
            y[j] = spec[j].beta != 0.0f ? buf_accum(t, (size_t)M * spec[j].N, -1, 1)
                                        : buf_output(t, (size_t)M * spec[j].N);
            bias[j] = spec[j].bias ? buf_input(t, spec[j].N, -1, 1) : NULL;
            if (t->gpu->register_weights)
                t->gpu->register_weights(t->gpu, w[j]->gpu, w[j]->n);
        }
        for (int g = 0; g < 2; g++) {
            rp_gemv_job jobs[JOBS];
            for (int j = 0; j < JOBS; j++)
                jobs[j] = (rp_gemv_job){at(y[j], g), at(x[j], g), at(w[j], g),
                                        bias[j] ? at(bias[j], g) : NULL, spec[j].N, spec[j].K,
                                        spec[j].in_out, spec[j].beta, spec[j].act};
            side(t, g)->gemv_group(side(t, g), jobs, JOBS, M);
        }
        for (int j = 0; j < JOBS; j++) {
            char what[32];
            snprintf(what, sizeof what, "y job %d", j);
            compare(t, what, y[j]);
        }
        twin_release(t);
    }
}

/* One time_mix_heads call of n_seq one-row sequences (or the ragged spec)
 * in permuted slots; nu NULL is layer 0 (v_first written). Every output
 * and the whole state array compared. */
static void time_mix_heads_case(twin *t, const shape *sh, const seq_spec *spec, int layer0,
                                const char *mode) {
    twin_batch tb;
    const rp_batch *batch = batch_make(&tb, spec);
    const int R = batch->n_rows, C = sh->C, N = HEAD_SIZE;
    const size_t n = (size_t)R * C, stride = state_stride(C);
    label(t, "%s R=%d C=%d seqs=%d%s", mode, R, C, batch->n_seq, layer0 ? " layer 0" : "");
    wkv_inputs in;
    wkv_inputs_make(t, &in, R, C);
    tbuf *g_in = buf_input(t, n, 0, 1), *nu = buf_input(t, n, 0, 1);
    tbuf *v_first = layer0 ? buf_output(t, n) : buf_input(t, n, -1, 1);
    tbuf *k_k = buf_input(t, C, 0.5, 1.5), *k_a = buf_input(t, C, 0.5, 1.5);
    tbuf *r_k = buf_input(t, C, -1, 1), *lw = buf_input(t, C, 0.5, 1.5);
    tbuf *lb = buf_input(t, C, -0.5, 0.5);
    tbuf *state = buf_input(t, MAX_SEQ * stride, -0.5, 0.5);
    tbuf *out = buf_output(t, n), *y = buf_output(t, n), *kk = buf_output(t, n);
    for (int g = 0; g < 2; g++) {
        const rp_time_mix_heads a = {
            at(out, g), at(y, g), at(kk, g), at(in.k, g), at(in.v, g), at(v_first, g),
            layer0 ? NULL : at(nu, g), at(in.r, g), at(in.w_raw, g), at(in.a, g), at(g_in, g),
            at(k_k, g), at(k_a, g), at(r_k, g), at(lw, g), at(lb, g), GN_EPS,
            at(state, g) + state_wkv_offset(C), stride, C, N};
        side(t, g)->time_mix_heads(side(t, g), &a, batch);
    }
    compare(t, "out", out);
    compare(t, "y", y);
    compare(t, "kk", kk);
    compare(t, "k", in.k);
    compare(t, "v", in.v);
    compare(t, "v_first", v_first);
    compare(t, "state", state);
    twin_release(t);
}

static void check_time_mix_heads(twin *t, const shape *sh) {
    for (size_t ri = 0; ri < 3; ri++) {  /* 1, 3, 8 sequences of one row */
        seq_spec spec = {decode_rows[ri], {0}, {0}};
        for (int s = 0; s < spec.n_seq; s++) {
            spec.len[s] = 1;
            spec.slot[s] = (s * 3 + 1) % MAX_SEQ;
        }
        time_mix_heads_case(t, sh, &spec, 0, "step");
        time_mix_heads_case(t, sh, &spec, 1, "step");
    }
    time_mix_heads_case(t, sh, &sh->prefill, 0, "prefill");
}

typedef struct {
    const char *op;
    void (*run)(twin *t, const shape *sh);
    unsigned maths; /* MATH_FP32 | MATH_BF16: which CUDA backends it runs on */
    int once;       /* only with the first shape */
} twin_check;

static const twin_check checks[] = {
    {"memory", check_memory, MATH_FP32, 0},
    {"embedding", check_embedding, MATH_FP32, 0},
    {"embedding_backward", check_embedding_backward, MATH_FP32, 0},
    {"layernorm", check_layernorm, MATH_FP32, 0},
    {"layernorm_backward", check_layernorm_backward, MATH_FP32, 0},
    {"groupnorm", check_groupnorm, MATH_FP32, 0},
    {"groupnorm_backward", check_groupnorm_backward, MATH_FP32, 0},
    {"token_shift", check_token_shift, MATH_FP32, 0},
    {"token_shift_backward", check_token_shift_backward, MATH_FP32, 0},
    {"lerp", check_lerp, MATH_FP32, 0},
    {"lerp_backward", check_lerp_backward, MATH_FP32, 0},
    {"shift_mix", check_shift_mix, MATH_FP32, 0},
    {"ln_shift_mix_train", check_ln_shift_mix_train, MATH_FP32, 0},
    {"shift_mix_backward", check_shift_mix_backward, MATH_FP32, 0},
    {"shift_mix_ln_backward", check_shift_mix_ln_backward, MATH_FP32, 0},
    {"ln_mix_again", check_ln_mix_again, MATH_FP32, 0},
    {"shift_mix_ln_backward xa again", check_shift_mix_ln_backward_again, MATH_FP32, 0},
    {"bias_act", check_bias_act, MATH_FP32, 0},
    {"bias_act_backward", check_bias_act_backward, MATH_FP32, 0},
    {"value_residual", check_value_residual, MATH_FP32, 0},
    {"value_residual_backward", check_value_residual_backward, MATH_FP32, 0},
    {"key_prepare", check_key_prepare, MATH_FP32, 0},
    {"key_prepare_backward", check_key_prepare_backward, MATH_FP32, 0},
    {"bias in value_residual/key_prepare", check_bias_in_from16, MATH_BF16, 0},
    {"attention_tail_backward", check_attention_tail_backward, MATH_FP32, 0},
    {"attention_tail_backward dkv16", check_attention_tail_dkv16, MATH_BF16, 0},
    {"bonus_gate", check_bonus_gate, MATH_FP32, 0},
    {"bonus_gate_backward", check_bonus_gate_backward, MATH_FP32, 0},
    {"groupnorm_bonus_gate", check_groupnorm_bonus_gate, MATH_FP32, 0},
    {"groupnorm_bonus_gate rkv16", check_groupnorm_bonus_gate_rkv16, MATH_BF16, 0},
    {"first writes (beta 0)", check_first_writes, MATH_FP32, 0},
    {"wkv7", check_wkv7, MATH_FP32, 0},
    {"wkv7_forward_train", check_wkv7_forward_train, MATH_FP32, 0},
    {"wkv7_backward", check_wkv7_backward, MATH_FP32, 0},
    {"wkv7_backward_beta", check_wkv7_backward_beta, MATH_FP32, 0},
    {"wkv7 chained", check_wkv7_chain, MATH_FP32, 0},
    {"wkv7 bf16 I/O", check_wkv7_bf16, MATH_FP32, 0},
    {"wkv7 chunked forward", check_wkv7_chunked, MATH_FP32, 0},
    {"wkv7 rows split", check_wkv7_rows, MATH_FP32, 0},
    {"wkv7 chunked mma", check_wkv7_chunked_mma, MATH_BF16, 0},
    {"wkv7 chunked backward mma", check_wkv7_backward_mma, MATH_BF16, 0},
    {"wkv7 chunked bf16 I/O mma", check_wkv7_bf16_mma, MATH_BF16, 0},
    {"wkv7 kk16 chain", check_wkv7_kk16, MATH_BF16, 0},
    {"cross_entropy", check_cross_entropy, MATH_FP32, 0},
    {"l2wrap", check_l2wrap, MATH_FP32, 0},
    {"head_cross_entropy", check_head_cross_entropy, MATH_FP32 | MATH_BF16, 0},
    {"row_max", check_row_max, MATH_FP32, 0},
    {"sum_squares", check_sum_squares, MATH_FP32, 0},
    {"adamw", check_adamw, MATH_FP32, 0},
    {"matmul_linear", check_matmul_linear, MATH_FP32 | MATH_BF16, 0},
    {"matmul_lora", check_matmul_lora, MATH_FP32 | MATH_BF16, 0},
    {"matmul_linear_backward", check_matmul_linear_backward, MATH_FP32 | MATH_BF16, 0},
    {"matmul_lora_backward", check_matmul_lora_backward, MATH_FP32 | MATH_BF16, 0},
    {"gemm_only", check_gemm_only, MATH_FP32 | MATH_BF16, 0},
    {"matmul_lora_bias", check_matmul_lora_bias, MATH_BF16, 0},
    {"register_weights", check_registered_weights, MATH_FP32 | MATH_BF16, 0},
    {"gemv_group", check_gemv_group, MATH_FP32 | MATH_BF16, 0},
    {"time_mix_heads", check_time_mix_heads, MATH_FP32, 0},
    /* last: an op that fails on empty sizes leaves the context unusable */
    {"empty sizes", check_empty, MATH_FP32, 1},
};

/* The GPU context's sticky error after a check; a failure ends the run of
 * this backend (every later op would fail too). */
static int status_ok(twin *t, const char *after) {
    rp_error err = {0};
    t->gpu->synchronize(t->gpu);
    if (t->gpu->status(t->gpu, &err) == RP_OK) return 1;
    t->op = "status";
    label(t, "after %s", after);
    report(t, "be->status", 0.0, 0.0, 0, NULL);
    printf("      %s: %s\n", rp_status_name(err.code), err.msg);
    return 0;
}

/* Every op the checks call is installed (register_weights is optional);
 * a missing one fails here instead of crashing the run. */
static int vtable_complete(twin *t) {
    const rp_backend *be = t->gpu;
#define OP(name) {#name, be->name != NULL}
    const struct {
        const char *name;
        int present;
    } ops[] = {
        OP(destroy), OP(alloc), OP(free), OP(copy_to_device), OP(copy_to_host), OP(copy),
        OP(fill_zero), OP(synchronize), OP(add), OP(status), OP(matmul_linear),
        OP(matmul_lora), OP(embedding), OP(layernorm), OP(token_shift), OP(lerp),
        OP(bias_act), OP(value_residual), OP(key_prepare), OP(groupnorm), OP(bonus_gate),
        OP(wkv7), OP(matmul_linear_backward), OP(matmul_lora_backward),
        OP(embedding_backward), OP(layernorm_backward), OP(token_shift_backward),
        OP(lerp_backward), OP(shift_mix), OP(ln_shift_mix_train), OP(shift_mix_backward), OP(shift_mix_ln_backward), OP(bias_act_backward), OP(value_residual_backward),
        OP(key_prepare_backward), OP(groupnorm_backward), OP(bonus_gate_backward),
        OP(wkv7_forward_train), OP(wkv7_backward), OP(wkv7_backward_beta), OP(cross_entropy),
        OP(l2wrap), OP(row_max), OP(sum_squares), OP(adamw), OP(gemv_group),
        OP(time_mix_heads), OP(groupnorm_bonus_gate), OP(groupnorm_bonus_gate_backward),
        OP(ln_mix_again_fits), OP(ln_mix_again), OP(attention_tail_backward),
    };
#undef OP
    int complete = 1;
    t->op = "vtable";
    label(t, "%s", be->name ? be->name : "(no name)");
    for (size_t i = 0; i < sizeof ops / sizeof ops[0]; i++)
        if (!ops[i].present) {
            report(t, ops[i].name, 0.0, 0.0, 0, "  (not installed)");
            complete = 0;
        }
    if (complete) report(t, "every op", 0.0, 0.0, 1, NULL);
    return complete;
}

static void run_checks(twin *t, unsigned math, int n_shapes, const char *only) {
    if (!vtable_complete(t)) return;
    for (size_t i = 0; i < sizeof checks / sizeof checks[0]; i++) {
        const twin_check *c = &checks[i];
        if (!(c->maths & math)) continue;
        if (only && strncmp(c->op, only, strlen(only)) != 0) continue;
        for (int s = 0; s < n_shapes && !(c->once && s > 0); s++) {
            t->op = c->op;
            t->label[0] = '\0';
            c->run(t, &shapes[s]);
            twin_release(t);
            if (!status_ok(t, c->op)) return;
        }
    }
    t->op = "status";
    label(t, "end of run");
    report(t, "be->status", 0.0, 0.0, 1, NULL);
}

/* ---- main ---------------------------------------------------------------- */

typedef struct {
    uint64_t seed;
    int device;
    int quick;
    const char *only; /* run only the checks whose name starts with this */
} options;

static void usage(FILE *out) {
    fputs("usage: test_cuda_ops [--seed N] [--device N] [--quick]\n"
          "  Runs every rp_backend op on the CPU and CUDA backends with the same random\n"
          "  inputs and compares the outputs (fp32 math 1e-5, bf16 GEMMs 1e-2).\n"
          "  --seed N    random inputs (default 1)\n"
          "  --device N  CUDA device (default 0)\n"
          "  --quick     the small shape only\n"
          "  --only OP   only the checks whose op name starts with OP (e.g. wkv7)\n"
          "  Exit status: 0 all passed, 1 a failure, 77 no CUDA device (skipped).\n",
          out);
}

static int parse_options(int argc, char **argv, options *opt) {
    *opt = (options){.seed = 1, .device = 0, .quick = 0, .only = NULL};
    for (int i = 1; i < argc; i++) {
        char *end = NULL;
        if (strcmp(argv[i], "--quick") == 0) {
            opt->quick = 1;
        } else if (strcmp(argv[i], "--only") == 0 && i + 1 < argc) {
            opt->only = argv[++i];
        } else if (strcmp(argv[i], "--seed") == 0 && i + 1 < argc) {
            opt->seed = strtoull(argv[++i], &end, 0);
            if (*end) return 0;
        } else if (strcmp(argv[i], "--device") == 0 && i + 1 < argc) {
            long d = strtol(argv[++i], &end, 0);
            if (*end || d < 0 || d > 1024) return 0;
            opt->device = (int)d;
        } else if (strcmp(argv[i], "--help") == 0 || strcmp(argv[i], "-h") == 0) {
            usage(stdout);
            exit(0);
        } else {
            return 0;
        }
    }
    return 1;
}

static rp_backend *create_cuda(int device, rp_cuda_math math) {
    rp_error err = {0};
    rp_backend *be = rp_cuda_backend_create(device, math, &err);
    if (!be) fatal("rp_cuda_backend_create(%d, %s): %s", device, rp_cuda_math_name(math), err.msg);
    return be;
}

int main(int argc, char **argv) {
    options opt;
    if (!parse_options(argc, argv, &opt)) {
        usage(stderr);
        return 2;
    }
    const int n_devices = rp_cuda_device_count();
    if (n_devices == 0) {
        printf("twin test: no CUDA device, skipped\n");
        return 77;
    }
    if (opt.device >= n_devices) fatal("--device %d: only %d CUDA devices", opt.device, n_devices);

    rp_error err = {0};
    rp_backend *cpu = rp_cpu_backend_create(0, &err);
    if (!cpu) fatal("rp_cpu_backend_create: %s", err.msg);
    if (!cpu->is_host_memory) fatal("the CPU backend must use host memory");
    rp_backend *gpu_fp32 = create_cuda(opt.device, RP_CUDA_MATH_FP32);
    rp_backend *gpu_bf16 = create_cuda(opt.device, RP_CUDA_MATH_BF16);
    /* Op scratch for the largest shape below (the CPU ops allocate nothing). */
    rp_backend *all[] = {cpu, gpu_fp32, gpu_bf16};
    for (int i = 0; i < 3; i++)
        if (all[i]->reserve(all[i], 4096, 64, 4096, HEAD_SIZE, &err) != RP_OK)
            fatal("reserve: %s", err.msg);

    char desc[256];
    rp_cuda_device_describe(opt.device, desc, sizeof desc);
    const int n_shapes = opt.quick ? 1 : (int)(sizeof shapes / sizeof shapes[0]);
    printf("twin test: device %d %s, seed %llu, shapes:", opt.device, desc,
           (unsigned long long)opt.seed);
    for (int s = 0; s < n_shapes; s++) printf(" %s (C=%d)", shapes[s].name, shapes[s].C);
    printf("\n");

    twin fp32 = {.cpu = cpu, .gpu = gpu_fp32, .math = "fp32", .tol = TOL_FP32, .seed = opt.seed};
    twin bf16 = {.cpu = cpu, .gpu = gpu_bf16, .math = "bf16", .tol = TOL_BF16, .seed = opt.seed};
    run_checks(&fp32, MATH_FP32, n_shapes, opt.only);
    run_checks(&bf16, MATH_BF16, n_shapes, opt.only);

    const int passed = fp32.passed + bf16.passed, failed = fp32.failed + bf16.failed;
    printf("twin test: %d passed, %d failed\n", passed, failed);
    free(fp32.bufs);
    free(bf16.bufs);
    rp_backend_destroy(gpu_bf16);
    rp_backend_destroy(gpu_fp32);
    rp_backend_destroy(cpu);
    return failed ? 1 : 0;
}
