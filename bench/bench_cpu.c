/* bench_cpu: RWKV-7 inference on the CPU backend against the machine's
 * ceilings measured in the same run and on the same thread count: step-mode
 * decode (batch 1 and 8) against the memory-bandwidth floor, sequence-mode
 * prefill (T = 512) against single-threaded-per-thread BLAS sgemm. Random fp32
 * weights in a built-in shape (default 0.1b). Prints one markdown table; see
 * bench/README.md and docs/perf/cpu.md. */
#include "config.h"

#include <errno.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "backend.h"
#include "cpu/cpu_backend.h"
#include "cpu_quant_table.h"
#include "harness.h"
#include "op_profile.h"
#include "model/model.h"

#define BENCH_MAX_THREAD_COUNTS 8
#define BENCH_DECODE_BATCH 8
#define BENCH_PREFILL_TOKENS 512
#define BENCH_WEIGHT_SCALE 0.02f
/* Larger than any last-level cache this runs on (32 MiB L3 here). */
#define BENCH_BANDWIDTH_BYTES ((size_t)1 << 30)

/* Goals from the CPU performance issue (docs/perf/cpu.md). */
#define GOAL_DECODE_OVER_FLOOR 1.15
#define GOAL_PREFILL_FRACTION 0.85
#define GOAL_BATCH8_SPEEDUP 4.0
/* Above this share of the machine used by other processes a column is
 * flagged: one compile job on a 2-core machine halves 2-thread numbers. */
#define NOISY_OTHER_CPU_FRACTION 0.10

typedef struct {
    int threads;
    double other_cpu_fraction; /* share of the machine other processes used meanwhile */
    double memory_gbps;  /* a separate 1 GiB buffer: reference */
    double weights_gbps; /* the decode's own weight buffers: the floor */
    double sgemm_gflops[3]; /* C x C, F x C, C x F linears at M = T */
    double sgemm_mix_gflops;
    double decode_b1_tokens_per_s, decode_b8_tokens_per_s;
    double decode_b1_over_floor, decode_b8_over_b1; /* medians of per-round ratios */
    double decode_b1_over_buffer_floor;              /* floor from memory_gbps */
    double prefill_tokens_per_s, prefill_over_mix; /* medians, the ratio per round */
} thread_result;

/* One rp_model_forward call: fresh random tokens for n_seq sequences of
 * seq_len tokens each, in slots 0..n_seq-1. */
typedef struct {
    const rp_model *model;
    rp_workspace *ws;
    rp_state *state;
    float *logits;
    int n_seq, seq_len;
    int32_t *tokens;
    int seq_lens[BENCH_DECODE_BATCH], slots[BENCH_DECODE_BATCH], row_begin[BENCH_DECODE_BATCH];
    rp_batch batch;
    unsigned long long rng;
    rp_error err;
} forward_ctx;

static rp_status forward_ctx_init(forward_ctx *c, const rp_model *m, rp_workspace *ws,
                                  rp_state *state, float *logits, int n_seq, int seq_len,
                                  rp_error *err) {
    *c = (forward_ctx){.model = m, .ws = ws, .state = state, .logits = logits, .n_seq = n_seq,
                       .seq_len = seq_len, .rng = 12345};
    for (int s = 0; s < n_seq; s++) {
        c->seq_lens[s] = seq_len;
        c->slots[s] = s;
    }
    rp_batch_init(&c->batch, n_seq, c->seq_lens, c->slots, c->row_begin);
    c->tokens = malloc((size_t)c->batch.n_rows * sizeof *c->tokens);
    if (!c->tokens)
        return rp_error_set(err, RP_ERR_NOMEM, "cannot allocate %d tokens", c->batch.n_rows);
    memset(state->data, 0, state->floats_per_slot * (size_t)n_seq * sizeof(float));
    return RP_OK;
}

static int forward_call(void *opaque) {
    forward_ctx *c = opaque;
    for (int i = 0; i < c->batch.n_rows; i++) {
        c->rng = c->rng * 6364136223846793005ull + 1442695040888963407ull;
        c->tokens[i] = (int32_t)((c->rng >> 33) % (unsigned long long)c->model->cfg.vocab_size);
    }
    /* Prefill starts every sequence from the zero state, as a new prompt does. */
    if (c->seq_len > 1)
        memset(c->state->data, 0, c->state->floats_per_slot * (size_t)c->n_seq * sizeof(float));
    return rp_model_forward(c->model, c->ws, c->tokens, &c->batch, c->state, RP_LOGITS_LAST,
                            c->logits, &c->err) != RP_OK;
}

/* After a timed batch: the call's error, or non-finite logits (a broken
 * backend must not post a fast number). */
static rp_status forward_ctx_check(const forward_ctx *c, double seconds, rp_error *err) {
    if (seconds < 0.0) {
        *err = c->err;
        return err->code != RP_OK ? err->code : RP_ERR_INTERNAL;
    }
    const size_t n = (size_t)c->n_seq * c->model->cfg.vocab_size;
    for (size_t i = 0; i < n; i++)
        if (!isfinite(c->logits[i]))
            return rp_error_set(err, RP_ERR_INTERNAL,
                                "logit %zu of the %d x %d forward is %g: the backend computed "
                                "garbage, timings are meaningless",
                                i, c->n_seq, c->seq_len, c->logits[i]);
    return RP_OK;
}

/* The bandwidth ceiling of decode: a plain sum over the very buffers a
 * decode step streams (every layer's flat buffer and the head). On this
 * VM the read rate of a buffer depends on where it lies: in one process,
 * buffers of the same size, allocated the same way and filled with the
 * same kind of random data, read at rates up to 35% apart, the first ones
 * allocated (the model is allocated first) being the slow ones, so a
 * separate buffer would measure the machine's luck rather than how well
 * decode streams its weights (docs/perf/cpu.md, "Current: the decode floor
 * from the weights' own buffers"; bench/bench_memory). The separate 1 GiB
 * buffer stays as a reference row. */
typedef struct {
    bench_memory_read *parts; /* one per layer buffer, then the head */
    int n_parts;
} weights_read;

static int weights_read_call(void *opaque) {
    weights_read *w = opaque;
    for (int i = 0; i < w->n_parts; i++) bench_memory_read_call(&w->parts[i]);
    return 0;
}

static double weights_read_bytes(const weights_read *w) {
    double bytes = 0.0;
    for (int i = 0; i < w->n_parts; i++) bytes += bench_memory_read_bytes(&w->parts[i]);
    return bytes;
}

/* Decode at batch 1 and 8 and the two bandwidths (the weights' own
 * buffers, the floor; a separate buffer, the reference), interleaved round
 * by round: the ratios are taken within a round, so a host whose bandwidth
 * drifts between runs (tens of percent here) still gives a fair ratio. Rows
 * report medians over rounds. */
static rp_status measure_decode(thread_result *r, const rp_model *m, rp_workspace *ws,
                                rp_state *state, float *logits, weights_read *weights,
                                bench_memory_read *memory, double decode_bytes_per_step,
                                const bench_timing *t, const bench_timing *ceiling_t,
                                rp_error *err) {
    forward_ctx b1, b8;
    rp_status st = forward_ctx_init(&b1, m, ws, state, logits, 1, 1, err);
    if (st != RP_OK) return st;
    st = forward_ctx_init(&b8, m, ws, state, logits, BENCH_DECODE_BATCH, 1, err);
    if (st != RP_OK) {
        free(b1.tokens);
        return st;
    }
    long memory_calls = bench_calls_per_batch(bench_memory_read_call, memory,
                                              ceiling_t->warmup_s, ceiling_t->min_batch_s);
    long weights_calls = bench_calls_per_batch(weights_read_call, weights, ceiling_t->warmup_s,
                                               ceiling_t->min_batch_s);
    long b1_calls = bench_calls_per_batch(forward_call, &b1, t->warmup_s, t->min_batch_s);
    st = forward_ctx_check(&b1, b1_calls < 0 ? -1.0 : 0.0, err);
    long b8_calls = st == RP_OK ? bench_calls_per_batch(forward_call, &b8, t->warmup_s,
                                                       t->min_batch_s)
                                : -1;
    if (st == RP_OK) st = forward_ctx_check(&b8, b8_calls < 0 ? -1.0 : 0.0, err);
    int rounds = t->repeats < 1 ? 1 : t->repeats > BENCH_MAX_REPEATS ? BENCH_MAX_REPEATS
                                                                     : t->repeats;
    double gbps[BENCH_MAX_REPEATS], weights_gbps[BENCH_MAX_REPEATS], b1_tps[BENCH_MAX_REPEATS],
        b8_tps[BENCH_MAX_REPEATS], over_floor[BENCH_MAX_REPEATS],
        over_buffer_floor[BENCH_MAX_REPEATS], speedup[BENCH_MAX_REPEATS];
    for (int i = 0; i < rounds && st == RP_OK; i++) {
        double weights_s = bench_batch_seconds(weights_read_call, weights, weights_calls);
        double memory_s = bench_batch_seconds(bench_memory_read_call, memory, memory_calls);
        double b1_s = bench_batch_seconds(forward_call, &b1, b1_calls);
        st = forward_ctx_check(&b1, b1_s, err);
        if (st != RP_OK) break;
        double b8_s = bench_batch_seconds(forward_call, &b8, b8_calls);
        st = forward_ctx_check(&b8, b8_s, err);
        if (st != RP_OK) break;
        gbps[i] = bench_memory_read_bytes(memory) / memory_s * 1e-9;
        weights_gbps[i] = weights_read_bytes(weights) / weights_s * 1e-9;
        b1_tps[i] = 1.0 / b1_s;
        b8_tps[i] = BENCH_DECODE_BATCH / b8_s;
        over_floor[i] = b1_s / (decode_bytes_per_step / (weights_gbps[i] * 1e9));
        over_buffer_floor[i] = b1_s / (decode_bytes_per_step / (gbps[i] * 1e9));
        speedup[i] = b8_tps[i] / b1_tps[i];
    }
    if (st == RP_OK) {
        r->memory_gbps = bench_median(gbps, rounds);
        r->weights_gbps = bench_median(weights_gbps, rounds);
        r->decode_b1_over_buffer_floor = bench_median(over_buffer_floor, rounds);
        r->decode_b1_tokens_per_s = bench_median(b1_tps, rounds);
        r->decode_b8_tokens_per_s = bench_median(b8_tps, rounds);
        r->decode_b1_over_floor = bench_median(over_floor, rounds);
        r->decode_b8_over_b1 = bench_median(speedup, rounds);
    }
    free(b1.tokens);
    free(b8.tokens);
    return st;
}

/* Prefill tokens/s (one sequence of T tokens from the zero state) and the
 * sgemm ceiling of the layer's mix, interleaved round by round like decode
 * and the bandwidth: the 2-thread ceiling alone moves by +-7% between runs
 * here, so the ratio is taken within a round. Rows report medians over
 * rounds. The mix: 2 T weight[s] flops of shape s, at that shape's rate. */
static rp_status measure_prefill(thread_result *r, const rp_model *m, rp_workspace *ws,
                                 rp_state *state, float *logits, int T, double prefill_flops,
                                 bench_sgemm *const sgemm[3], const double sgemm_weight[3],
                                 const bench_timing *t, const bench_timing *ceiling_t,
                                 rp_error *err) {
    forward_ctx c;
    rp_status st = forward_ctx_init(&c, m, ws, state, logits, 1, T, err);
    if (st != RP_OK) return st;
    long sgemm_calls[3];
    for (int s = 0; s < 3; s++)
        sgemm_calls[s] = bench_calls_per_batch(bench_sgemm_call, sgemm[s], ceiling_t->warmup_s,
                                               ceiling_t->min_batch_s);
    long calls = bench_calls_per_batch(forward_call, &c, t->warmup_s, t->min_batch_s);
    st = forward_ctx_check(&c, calls < 0 ? -1.0 : 0.0, err);
    int rounds = t->repeats < 1 ? 1 : t->repeats > BENCH_MAX_REPEATS ? BENCH_MAX_REPEATS
                                                                     : t->repeats;
    double gflops[3][BENCH_MAX_REPEATS], mix[BENCH_MAX_REPEATS], tps[BENCH_MAX_REPEATS],
        fraction[BENCH_MAX_REPEATS];
    for (int i = 0; i < rounds && st == RP_OK; i++) {
        double mix_flops = 0.0, mix_seconds = 0.0;
        for (int s = 0; s < 3; s++) {
            double secs = bench_batch_seconds(bench_sgemm_call, sgemm[s], sgemm_calls[s]);
            gflops[s][i] = bench_sgemm_flops(sgemm[s]) / secs * 1e-9;
            mix_flops += 2.0 * T * sgemm_weight[s];
            mix_seconds += 2.0 * T * sgemm_weight[s] / (gflops[s][i] * 1e9);
        }
        mix[i] = mix_flops / mix_seconds * 1e-9;
        double prefill_s = bench_batch_seconds(forward_call, &c, calls);
        if ((st = forward_ctx_check(&c, prefill_s, err)) != RP_OK) break;
        tps[i] = T / prefill_s;
        fraction[i] = prefill_flops / prefill_s * 1e-9 / mix[i];
    }
    if (st == RP_OK) {
        for (int s = 0; s < 3; s++) r->sgemm_gflops[s] = bench_median(gflops[s], rounds);
        r->sgemm_mix_gflops = bench_median(mix, rounds);
        r->prefill_tokens_per_s = bench_median(tps, rounds);
        r->prefill_over_mix = bench_median(fraction, rounds);
    }
    free(c.tokens);
    return st;
}

/* --profile: `calls` forward calls of n_seq x seq_len through an op_profile
 * wrapper after two untimed ones, then its per-op table. */
static rp_status profile_forward(const rp_model *m, rp_workspace *ws, rp_state *state,
                                 float *logits, int n_seq, int seq_len, long calls,
                                 double unprofiled_ms, const char *title, rp_error *err) {
    op_profile prof;
    op_profile_wrap(&prof, m->be);
    rp_model view = *m;
    view.be = &prof.be;
    forward_ctx c;
    rp_status st = forward_ctx_init(&c, &view, ws, state, logits, n_seq, seq_len, err);
    if (st != RP_OK) return st;
    for (long i = 0; i < calls + 2 && st == RP_OK; i++) {
        if (i == 2) op_profile_reset(&prof);
        if (forward_call(&c)) st = rp_error_set(err, c.err.code, "%s", c.err.msg);
    }
    if (st == RP_OK) op_profile_print(stdout, &prof, title, calls, unprofiled_ms);
    free(c.tokens);
    return st;
}

static int parse_threads(const char *list, int *out, int *n_out) {
    const char *p = list;
    int n = 0;
    while (*p) {
        char *end;
        errno = 0;
        long v = strtol(p, &end, 10);
        if (end == p || errno || v < 1 || v > 1024 || (*end && *end != ',')) return -1;
        if (n == BENCH_MAX_THREAD_COUNTS) return -1;
        out[n++] = (int)v;
        p = *end ? end + 1 : end;
    }
    *n_out = n;
    return n > 0 ? 0 : -1;
}

static void usage(FILE *out) {
    fprintf(out,
            "usage: bench_cpu [--threads LIST] [--quick] [--model-config NAME] [--profile]\n"
            "       bench_cpu --quant [--threads LIST] [--quick]\n"
            "\n"
            "RWKV-7 inference on the CPU backend (random fp32 weights) against ceilings\n"
            "measured in the same run: decode tokens/s at batch 1 and %d against the\n"
            "memory-bandwidth floor, prefill tokens/s at T=%d against BLAS sgemm.\n"
            "Prints one markdown table (progress on stderr).\n"
            "\n"
            "  --threads LIST       comma-separated thread counts (default 1,2)\n"
            "  --quick              shorter timings (smoke test, noisier numbers)\n"
            "  --model-config NAME  built-in shape (default 0.1b; one of %s)\n"
            "  --profile            after the table, the time of every backend op in decode\n"
            "                       batch 1 and %d and in prefill (bench/op_profile.h)\n"
            "  --quant              instead: the quantized (bf16, int8) GEMV/GEMM kernels on\n"
            "                       the 0.1B matmul shapes at M = 1, 8, 512 against fp32 and\n"
            "                       the weight-bandwidth floor (RP_CPU_ISA caps the ISA)\n"
            "  --help               this text\n"
            "\n"
            "Set OPENBLAS_CORETYPE (e.g. Haswell) as for the tests.\n",
            BENCH_DECODE_BATCH, BENCH_PREFILL_TOKENS, rp_config_builtin_names(),
            BENCH_DECODE_BATCH);
}

static int fail(const char *what, const rp_error *err) {
    fprintf(stderr, "bench_cpu: %s: %s\n", what, err->msg);
    return 1;
}

static void cell(char *out, size_t size, double value, const char *fmt) {
    if (value < 0.0 || !isfinite(value))
        snprintf(out, size, "n/a");
    else
        snprintf(out, size, fmt, value);
}

static void cell_goal(char *out, size_t size, double value, const char *fmt, int met) {
    char number[48];
    cell(number, sizeof number, value, fmt);
    snprintf(out, size, "%s %s", number, met ? "✓" : "✗");
}

int main(int argc, char **argv) {
    int threads[BENCH_MAX_THREAD_COUNTS] = {1, 2}, n_counts = 2, quick = 0, profile = 0, quant = 0;
    const char *config_name = "0.1b";
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--help") || !strcmp(argv[i], "-h")) {
            usage(stdout);
            return 0;
        } else if (!strcmp(argv[i], "--quick")) {
            quick = 1;
        } else if (!strcmp(argv[i], "--quant")) {
            quant = 1;
        } else if (!strcmp(argv[i], "--profile")) {
            profile = 1;
        } else if (!strcmp(argv[i], "--threads") && i + 1 < argc) {
            if (parse_threads(argv[++i], threads, &n_counts)) {
                fprintf(stderr,
                        "bench_cpu: --threads '%s': expected up to %d comma-separated "
                        "integers in [1, 1024], e.g. 1,2\n", argv[i], BENCH_MAX_THREAD_COUNTS);
                return 2;
            }
        } else if (!strcmp(argv[i], "--model-config") && i + 1 < argc) {
            config_name = argv[++i];
        } else {
            fprintf(stderr, "bench_cpu: unknown or incomplete option '%s'\n", argv[i]);
            usage(stderr);
            return 2;
        }
    }

    /* A section of its own: the quantized kernels on the 0.1B matmul shapes. */
    if (quant) return bench_cpu_quant(threads, n_counts, quick);

    const bench_timing ceiling_timing = quick ? (bench_timing){0.05, 0.1, 3}
                                              : (bench_timing){0.2, 0.5, 5};
    const bench_timing decode_timing = quick ? (bench_timing){0.1, 0.25, 3}
                                             : (bench_timing){0.5, 1.5, 5};
    /* A 0.1b prefill call is about a second: warm up with one, then rounds
     * of one call (quick) or of >= 1 s. */
    const bench_timing prefill_timing = quick ? (bench_timing){0.0, 0.0, 2}
                                              : (bench_timing){0.0, 1.0, 5};

    rp_error err = {0};
    rp_config cfg;
    if (rp_config_builtin(&cfg, config_name, 0, &err) != RP_OK) return fail("--model-config", &err);
    const int C = cfg.n_embd, F = cfg.dim_ffn, V = cfg.vocab_size, T = BENCH_PREFILL_TOKENS;

    /* Weights live in host memory (the CPU backend's memory), so one model
     * serves every thread count: each run gets a shallow copy of the model
     * pointing at a backend with that team size. */
    rp_backend *alloc_be = rp_cpu_backend_create(threads[0], &err);
    if (!alloc_be) return fail("CPU backend", &err);
    rp_model model;
    if (rp_model_alloc(&model, &cfg, 0, cfg.n_layer, 1, 1, alloc_be, &err) != RP_OK)
        return fail("model", &err);
    fprintf(stderr, "bench_cpu: filling %.0f MB of random weights...\n",
            (double)(model.layer_floats * cfg.n_layer + model.embed_floats + model.head_floats) *
                4e-6);
    for (int l = 0; l < cfg.n_layer; l++)
        bench_fill_uniform(model.layer_flat[l], model.layer_floats, BENCH_WEIGHT_SCALE, 100 + l);
    bench_fill_uniform(model.embed_flat, model.embed_floats, BENCH_WEIGHT_SCALE, 1);
    bench_fill_uniform(model.head_flat, model.head_floats, BENCH_WEIGHT_SCALE, 2);

    rp_workspace ws;
    rp_state state;
    if (rp_workspace_alloc(&ws, &cfg, T > BENCH_DECODE_BATCH ? T : BENCH_DECODE_BATCH, alloc_be,
                           &err) != RP_OK)
        return fail("workspace", &err);
    if (rp_state_alloc_host(&state, &cfg, 0, cfg.n_layer, BENCH_DECODE_BATCH, &err) != RP_OK)
        return fail("state", &err);
    float *logits = alloc_be->alloc(alloc_be, (size_t)BENCH_DECODE_BATCH * V * sizeof(float));
    size_t bw_floats = BENCH_BANDWIDTH_BYTES / sizeof(float);
    float *bw_buf = malloc(BENCH_BANDWIDTH_BYTES);
    if (!logits || !bw_buf) {
        rp_error_set(&err, RP_ERR_NOMEM, "cannot allocate logits and the %zu MiB bandwidth buffer",
                     BENCH_BANDWIDTH_BYTES >> 20);
        return fail("buffers", &err);
    }
    int max_threads = 1;
    for (int i = 0; i < n_counts; i++) max_threads = threads[i] > max_threads ? threads[i] : max_threads;
    bench_fill_parallel(bw_buf, bw_floats, max_threads);

    /* Decode reads every weight once per step: all non-embedding parameters,
     * the head and one embedding row. */
    const long long non_embedding = rp_config_param_count_non_embedding(&cfg);
    const double decode_bytes_per_step = 4.0 * ((double)non_embedding + (double)V * C + C);
    /* Prefill: 2 flops per multiply-add of every non-embedding weight per
     * token, plus the head for the last row only (RP_LOGITS_LAST). */
    const double prefill_flops = 2.0 * (double)non_embedding * T + 2.0 * (double)V * C;
    const int sgemm_shape[3][2] = {{C, C}, {F, C}, {C, F}}; /* N, K at M = T */
    const double sgemm_weight[3] = {4.0 * C * C, (double)F * C, (double)C * F};

    weights_read weights = {.n_parts = cfg.n_layer + 1};
    weights.parts = calloc((size_t)weights.n_parts, sizeof *weights.parts);
    if (!weights.parts) {
        rp_error_set(&err, RP_ERR_NOMEM, "cannot allocate %d bandwidth parts", weights.n_parts);
        return fail("buffers", &err);
    }
    for (int l = 0; l < cfg.n_layer; l++)
        weights.parts[l] = (bench_memory_read){.buf = model.layer_flat[l],
                                               .floats = model.layer_floats};
    weights.parts[cfg.n_layer] =
        (bench_memory_read){.buf = model.head_flat, .floats = model.head_floats};

    thread_result results[BENCH_MAX_THREAD_COUNTS];
    for (int ti = 0; ti < n_counts; ti++) {
        thread_result *r = &results[ti];
        memset(r, 0, sizeof *r);
        r->threads = threads[ti];
        rp_backend *be = rp_cpu_backend_create(threads[ti], &err);
        if (!be) return fail("CPU backend", &err);
        rp_model view = model;
        view.be = be;
        bench_cpu_sample before, after;
        bench_cpu_sample_take(&before);

        fprintf(stderr, "bench_cpu: %d thread(s): memory bandwidth, decode batch 1 and %d...\n",
                r->threads, BENCH_DECODE_BATCH);
        bench_memory_read memory = {.buf = bw_buf, .floats = bw_floats, .threads = r->threads};
        for (int i = 0; i < weights.n_parts; i++) weights.parts[i].threads = r->threads;
        if (measure_decode(r, &view, &ws, &state, logits, &weights, &memory,
                           decode_bytes_per_step, &decode_timing, &ceiling_timing,
                           &err) != RP_OK)
            return fail("decode", &err);
        fprintf(stderr, "bench_cpu: %d thread(s): prefill T=%d and sgemm %dx{%dx%d, %dx%d, "
                "%dx%d}...\n", r->threads, T, T, sgemm_shape[0][0], sgemm_shape[0][1],
                sgemm_shape[1][0], sgemm_shape[1][1], sgemm_shape[2][0], sgemm_shape[2][1]);
        bench_sgemm *sgemm[3];
        for (int s = 0; s < 3; s++)
            if (!(sgemm[s] = bench_sgemm_create(T, sgemm_shape[s][0], sgemm_shape[s][1],
                                                r->threads))) {
                rp_error_set(&err, RP_ERR_NOMEM, "cannot allocate sgemm %dx%dx%d operands", T,
                             sgemm_shape[s][0], sgemm_shape[s][1]);
                return fail("sgemm ceiling", &err);
            }
        rp_status st = measure_prefill(r, &view, &ws, &state, logits, T, prefill_flops, sgemm,
                                       sgemm_weight, &prefill_timing, &ceiling_timing, &err);
        for (int s = 0; s < 3; s++) bench_sgemm_free(sgemm[s]);
        if (st != RP_OK) return fail("prefill", &err);
        bench_cpu_sample_take(&after);
        r->other_cpu_fraction = bench_cpu_other_fraction(&before, &after);
        rp_cpu_backend_destroy(be);
    }

    /* ---- the table ---- */
    char title[160];
    snprintf(title, sizeof title,
             "bench_cpu: RWKV-7 %s (L%d C%d F%d V%d), random fp32 weights, CPU backend",
             config_name, cfg.n_layer, C, F, V);
    bench_print_machine(stdout, title);
    printf("- timing: warm-up, then medians of %d rounds of (each bandwidth >= %.2g s, decode batch 1 "
           ">= %.2g s, decode batch %d >= %.2g s) and of %d rounds of (each sgemm shape >= %.2g "
           "s, prefill >= %.2g s or one call); ratios taken within a round%s\n",
           decode_timing.repeats, ceiling_timing.min_batch_s, decode_timing.min_batch_s,
           BENCH_DECODE_BATCH, decode_timing.min_batch_s, prefill_timing.repeats,
           ceiling_timing.min_batch_s, prefill_timing.min_batch_s,
           quick ? "; --quick: noisy" : "");
    printf("- decode reads %.1f MB of weights per step (non-embedding %lld params + head "
           "%dx%d + one embedding row, fp32); prefill does %.1f GFLOP per %d-token call\n\n",
           decode_bytes_per_step * 1e-6, non_embedding, V, C, prefill_flops * 1e-9, T);

    const char *columns[BENCH_MAX_THREAD_COUNTS + 1];
    char column_names[BENCH_MAX_THREAD_COUNTS][32];
    for (int i = 0; i < n_counts; i++) {
        snprintf(column_names[i], sizeof column_names[i], "%d thread%s", threads[i],
                 threads[i] == 1 ? "" : "s");
        columns[i] = column_names[i];
    }
    columns[n_counts] = "goal";
    bench_table_header(stdout, "metric", columns, n_counts + 1);

    char cells[BENCH_MAX_THREAD_COUNTS + 1][64];
    const char *cell_ptrs[BENCH_MAX_THREAD_COUNTS + 1];
    for (int i = 0; i <= n_counts; i++) cell_ptrs[i] = cells[i];
    char label[128];
#define ROW(LABEL, GOAL, ...)                                                          \
    do {                                                                                \
        for (int i = 0; i < n_counts; i++) {                                            \
            const thread_result *r = &results[i];                                       \
            (void)r;                                                                    \
            __VA_ARGS__;                                                                \
        }                                                                               \
        snprintf(cells[n_counts], sizeof cells[n_counts], "%s", GOAL);                  \
        bench_table_row(stdout, LABEL, cell_ptrs, n_counts + 1);                        \
    } while (0)

    ROW("CPU used by other processes meanwhile, % of machine", "≈ 0", {
        cell(cells[i], sizeof cells[i], 100.0 * r->other_cpu_fraction, "%.0f%%");
        if (r->other_cpu_fraction > NOISY_OTHER_CPU_FRACTION)
            strncat(cells[i], " (noisy: rerun)", sizeof cells[i] - strlen(cells[i]) - 1);
    });
    snprintf(label, sizeof label, "memory read bandwidth, the decode's weight buffers (%.0f MB), GB/s",
             weights_read_bytes(&weights) * 1e-6);
    ROW(label, "ceiling", cell(cells[i], sizeof cells[i], r->weights_gbps, "%.1f"));
    snprintf(label, sizeof label, "memory read bandwidth, a separate %zu MiB buffer, GB/s",
             BENCH_BANDWIDTH_BYTES >> 20);
    ROW(label, "reference", cell(cells[i], sizeof cells[i], r->memory_gbps, "%.1f"));
    for (int s = 0; s < 3; s++) {
        snprintf(label, sizeof label, "sgemm M=%d N=%d K=%d, GFLOP/s", T, sgemm_shape[s][0],
                 sgemm_shape[s][1]);
        ROW(label, "ceiling", cell(cells[i], sizeof cells[i], r->sgemm_gflops[s], "%.1f"));
    }
    ROW("sgemm ceiling for the layer's mix (4 CxC + FxC + CxF), GFLOP/s", "ceiling",
        cell(cells[i], sizeof cells[i], r->sgemm_mix_gflops, "%.1f"));
    ROW("decode batch 1, tokens/s", "",
        cell(cells[i], sizeof cells[i], r->decode_b1_tokens_per_s, "%.2f"));
    ROW("decode bandwidth floor (weight bytes / weight buffers' bandwidth), tokens/s", "",
        cell(cells[i], sizeof cells[i], r->weights_gbps * 1e9 / decode_bytes_per_step, "%.2f"));
    ROW("decode batch 1, time / floor time", "≤ 1.15",
        cell_goal(cells[i], sizeof cells[i], r->decode_b1_over_floor, "%.2f",
                  r->decode_b1_over_floor <= GOAL_DECODE_OVER_FLOOR));
    snprintf(label, sizeof label,
             "decode batch 1, time / (weight bytes / the %zu MiB buffer's bandwidth)",
             BENCH_BANDWIDTH_BYTES >> 20);
    ROW(label, "reference",
        cell(cells[i], sizeof cells[i], r->decode_b1_over_buffer_floor, "%.2f"));
    snprintf(label, sizeof label, "decode batch %d, tokens/s", BENCH_DECODE_BATCH);
    ROW(label, "", cell(cells[i], sizeof cells[i], r->decode_b8_tokens_per_s, "%.2f"));
    snprintf(label, sizeof label, "decode batch %d / batch 1 tokens/s", BENCH_DECODE_BATCH);
    ROW(label, "≥ 4",
        cell_goal(cells[i], sizeof cells[i], r->decode_b8_over_b1, "%.2f",
                  r->decode_b8_over_b1 >= GOAL_BATCH8_SPEEDUP));
    snprintf(label, sizeof label, "prefill T=%d, tokens/s", T);
    ROW(label, "", cell(cells[i], sizeof cells[i], r->prefill_tokens_per_s, "%.1f"));
    ROW("prefill, GFLOP/s", "",
        cell(cells[i], sizeof cells[i], r->prefill_tokens_per_s / T * prefill_flops * 1e-9,
             "%.1f"));
    ROW("prefill / sgemm mix ceiling", "≥ 85%",
        cell_goal(cells[i], sizeof cells[i], 100.0 * r->prefill_over_mix, "%.0f%%",
                  r->prefill_over_mix >= GOAL_PREFILL_FRACTION));
#undef ROW

    for (int ti = 0; profile && ti < n_counts; ti++) {
        const thread_result *r = &results[ti];
        rp_backend *be = rp_cpu_backend_create(threads[ti], &err);
        if (!be) return fail("CPU backend", &err);
        rp_model view = model;
        view.be = be;
        char heading[128];
        const long steps = quick ? 5 : 40, prefills = quick ? 1 : 3;
        snprintf(heading, sizeof heading, "Per-op time: decode batch 1, %d thread%s", r->threads,
                 r->threads == 1 ? "" : "s");
        rp_status st = profile_forward(&view, &ws, &state, logits, 1, 1, steps,
                                       1e3 / r->decode_b1_tokens_per_s, heading, &err);
        snprintf(heading, sizeof heading, "Per-op time: decode batch %d, %d thread%s",
                 BENCH_DECODE_BATCH, r->threads, r->threads == 1 ? "" : "s");
        if (st == RP_OK)
            st = profile_forward(&view, &ws, &state, logits, BENCH_DECODE_BATCH, 1, steps,
                                 1e3 * BENCH_DECODE_BATCH / r->decode_b8_tokens_per_s, heading,
                                 &err);
        snprintf(heading, sizeof heading, "Per-op time: prefill T=%d, %d thread%s", T, r->threads,
                 r->threads == 1 ? "" : "s");
        if (st == RP_OK)
            st = profile_forward(&view, &ws, &state, logits, 1, T, prefills,
                                 1e3 * T / r->prefill_tokens_per_s, heading, &err);
        rp_cpu_backend_destroy(be);
        if (st != RP_OK) return fail("profile", &err);
    }

    free(bw_buf);
    free(weights.parts);
    alloc_be->free(alloc_be, logits);
    rp_state_free_host(&state);
    rp_workspace_free(&ws, alloc_be);
    rp_model_free(&model);
    rp_cpu_backend_destroy(alloc_be);
    return 0;
}
