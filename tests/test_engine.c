/* The generation engine (src/infer/engine.h), run as one process or under
 * mpirun -np P (tests/test_engine.sh: P = 1, 2, 3, 4): ranks other than 0 serve
 * their stage; rank 0 drives jobs and checks that
 * - greedy and seeded jobs give exactly the tokens of rp_generate on the
 *   whole model (the single-process reference), whatever the stage count;
 * - 16 jobs of different prompt lengths, started at different times, each
 *   give the tokens they give alone (batch composition changes nothing);
 * - 14 jobs decoding in one group (more than the old cap of 8) give the
 *   tokens and logprobs, bit for bit, they give alone (greedy and seeded);
 * - stop tokens, max_tokens (also 0), cancellation and unknown sessions end
 *   a job with the right reason and free its slot;
 * - a session continued over two jobs gives the tokens of reading the whole
 *   history at once, and survives save -> delete -> load (any stage count);
 * - a prompt shared by n jobs (rp_job_share_prompt) is prefilled once and
 *   each job gives its tokens alone;
 * - a session's state exported and imported under another name is the same,
 *   bit for bit, gathered from every stage.
 * Waits are bounded by wall-clock time (STEP_DEADLINE_S of CLOCK_MONOTONIC),
 * not by a count of engine steps, which a loaded machine can exhaust.
 * Prints each check; exits 1 at the first failure. */
#include <mpi.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "cpu/cpu_backend.h"
#include "infer/generate.h"
#include "model/model.h"
#include "pipe/grid.h"
#include "infer/engine.h"
#include "infer/engine_internal.h"
#include "infer/session_file.h"
#include "core/clock.h"

static int rank, size;
static rp_engine *engine;
static rp_model whole;  /* rank 0: the reference model (all layers) */
static int reference_model; /* the golden tiny model (trained-like weights) */
/* RP_TEST_PREFIX_CACHE: "off" (default), "big" (room for every state) or
 * "tiny" (room for one state: the LRU evicts at every store). */
static const char *prefix_mode = "off";

#define CHECK(cond, ...)                                                        \
    do {                                                                        \
        if (!(cond)) {                                                          \
            fprintf(stderr, "FAIL (%s:%d): ", __FILE__, __LINE__);              \
            fprintf(stderr, __VA_ARGS__);                                       \
            fprintf(stderr, "\n");                                              \
            MPI_Abort(MPI_COMM_WORLD, 1);                                       \
        }                                                                       \
    } while (0)

/* Generous: under ASan on a loaded 2-core machine a step can take long. */
#define STEP_DEADLINE_S 120.0

/* One engine round; fails the test once `deadline` (now_s) has passed. */
static void step(double deadline, const char *what) {
    rp_error err;
    rp_status st;
    rp_engine_step(engine, &err, &st);
    CHECK(st == RP_OK, "engine step: %s", err.msg);
    CHECK(rp_now_seconds() < deadline, "%s: not done after %.0f s", what, STEP_DEADLINE_S);
}

/* Runs one job to the end; returns its tokens (malloc) and count. */
static int32_t *run_job(const int32_t *prompt, int n, const rp_gen_params *p, const char *start,
                        const char *store, int *n_out, rp_finish_reason *finish) {
    rp_error err;
    rp_job *j = rp_job_create(prompt, n, p, start, store, &err);
    CHECK(j, "job: %s", err.msg);
    CHECK(rp_engine_submit(engine, j, &err) == RP_OK, "submit: %s", err.msg);
    int32_t *out = malloc(sizeof(int32_t) * (size_t)(p->max_tokens + 1));
    *n_out = 0;
    const double deadline = rp_now_seconds() + STEP_DEADLINE_S;
    for (;;) {
        step(deadline, "a job");
        rp_finish_reason f;
        *n_out += rp_job_read(j, out + *n_out, p->max_tokens + 1 - *n_out, 0, &f);
        if (f != RP_FINISH_NONE) {
            *finish = f;
            break;
        }
    }
    rp_job_release(j);
    return out;
}

typedef struct {
    int32_t *tokens;
    int n;
} collected;

static int collect(int32_t token, void *user) {
    collected *c = user;
    c->tokens[c->n++] = token;
    return 0;
}

/* rp_generate on the whole model from the zero state. */
static int32_t *reference(const int32_t *prompt, int n, const rp_gen_params *p, int *n_out) {
    rp_error err;
    rp_state st;
    CHECK(rp_state_alloc_host(&st, &whole.cfg, 0, whole.cfg.n_layer, 1, &err) == RP_OK, "state");
    rp_generate_options o = {.max_new_tokens = p->max_tokens, .prefill_chunk = 64,
                             .sampler = p->sampler};
    collected c = {malloc(sizeof(int32_t) * (size_t)(p->max_tokens + 1)), 0};
    CHECK(rp_generate(&whole, &st, prompt, n, &o, collect, &c, NULL, &err) == RP_OK,
          "rp_generate: %s", err.msg);
    rp_state_free_host(&st);
    *n_out = c.n;
    return c.tokens;
}

static void same(const int32_t *a, int na, const int32_t *b, int nb, const char *what) {
    CHECK(na == nb, "%s: %d tokens vs %d", what, na, nb);
    for (int i = 0; i < na; i++) CHECK(a[i] == b[i], "%s: token %d is %d vs %d", what, i, a[i], b[i]);
}

/* A session to a file and back, as the server does it: the engine moves the
 * state, the caller does the file I/O. */
static rp_status save_session(const char *name, const char *path, rp_error *err) {
    float *state = malloc(rp_engine_session_floats(engine) * sizeof(float));
    CHECK(state, "session buffer");
    uint64_t tokens;
    rp_status st = rp_engine_session_export(engine, name, state, &tokens, err);
    if (st == RP_OK) st = rp_session_file_write(path, &whole.cfg, tokens, state, err);
    free(state);
    return st;
}

static rp_status load_session(const char *name, const char *path, rp_error *err) {
    float *state = malloc(rp_engine_session_floats(engine) * sizeof(float));
    CHECK(state, "session buffer");
    uint64_t tokens;
    rp_status st = rp_session_file_read(path, &whole.cfg, &tokens, state, err);
    if (st == RP_OK) st = rp_engine_session_import(engine, name, state, tokens, err);
    free(state);
    return st;
}

/* ---- session operations from a client thread (engine_sessions.c) ---- */

/* The hook runs on the main thread at the start of each session operation:
 * slow (sleeps while `in_hook` is 1) or failing. */
static volatile int in_hook, hook_fails;
#define SLOW_CONTROL_S 2.0

static rp_status test_control_hook(rp_engine *e, rp_error *err) {
    (void)e;
    if (hook_fails) return rp_error_set(err, RP_ERR_MPI, "test hook: stage 9 stopped answering");
    __atomic_store_n(&in_hook, 1, __ATOMIC_SEQ_CST);
    struct timespec ts = {(time_t)SLOW_CONTROL_S, 0};
    nanosleep(&ts, NULL);
    __atomic_store_n(&in_hook, 0, __ATOMIC_SEQ_CST);
    return RP_OK;
}

typedef struct {
    const char *name;
    rp_status status;
    rp_error err;
    int done;
} export_call;

static void *export_thread(void *arg) {
    export_call *c = arg;
    float *state = malloc(rp_engine_session_floats(engine) * sizeof(float));
    uint64_t tokens = 0;
    c->status = rp_engine_session_export(engine, c->name, state, &tokens, &c->err);
    free(state);
    __atomic_store_n(&c->done, 1, __ATOMIC_SEQ_CST);
    return NULL;
}

/* While a slow session operation runs: how long another thread's metrics,
 * exists and submit take, and whether the operation was still running when
 * they had returned. */
typedef struct {
    double longest;
    int still_in_hook;
    rp_job *job;
} probe_call;

static void *probe_thread(void *arg) {
    probe_call *p = arg;
    const double deadline = rp_now_seconds() + STEP_DEADLINE_S;
    while (!__atomic_load_n(&in_hook, __ATOMIC_SEQ_CST) && rp_now_seconds() < deadline) {
        struct timespec ts = {0, 1000000};
        nanosleep(&ts, NULL);
    }
    rp_engine_metrics m;
    double t0 = rp_now_seconds();
    rp_engine_get_metrics(engine, &m);
    double t1 = rp_now_seconds();
    (void)rp_engine_session_exists(engine, "restored");
    double t2 = rp_now_seconds();
    rp_gen_params gp;
    rp_gen_params_defaults(&gp);
    gp.max_tokens = 2;
    int32_t prompt[3] = {1, 2, 3};
    rp_error err;
    p->job = rp_job_create(prompt, 3, &gp, NULL, NULL, &err);
    rp_status st = p->job ? rp_engine_submit(engine, p->job, &err) : RP_ERR_NOMEM;
    double t3 = rp_now_seconds();
    p->still_in_hook = __atomic_load_n(&in_hook, __ATOMIC_SEQ_CST) && st == RP_OK;
    p->longest = t1 - t0;
    if (t2 - t1 > p->longest) p->longest = t2 - t1;
    if (t3 - t2 > p->longest) p->longest = t3 - t2;
    return NULL;
}

/* Steps the engine (main thread) until c is answered. */
static void step_until_done(export_call *c, const char *what) {
    const double deadline = rp_now_seconds() + STEP_DEADLINE_S;
    while (!__atomic_load_n(&c->done, __ATOMIC_SEQ_CST)) {
        rp_error err;
        rp_status st;
        rp_engine_step(engine, &err, &st);
        if (st != RP_OK) break;  /* the failing case: checked by the caller */
        CHECK(rp_now_seconds() < deadline, "%s: not answered after %.0f s", what,
              STEP_DEADLINE_S);
    }
}

/* A session operation from a client thread runs on the main thread without
 * the engine's lock: during a slow one, other threads' submit, exists and
 * metrics return at once. A failure of the engine during one reaches both
 * its caller and rp_engine_step. Last: it leaves the engine failed. */
static void control_checks(void) {
    printf("check: a slow session operation does not block submit / metrics\n");
    rp_engine_control_test_hook = test_control_hook;
    export_call ex = {.name = "restored"};
    probe_call pr = {0};
    pthread_t a, b;
    CHECK(pthread_create(&b, NULL, probe_thread, &pr) == 0, "thread");
    CHECK(pthread_create(&a, NULL, export_thread, &ex) == 0, "thread");
    step_until_done(&ex, "a slow export");
    pthread_join(a, NULL);
    pthread_join(b, NULL);
    CHECK(ex.status == RP_OK, "slow export: %s", ex.err.msg);
    CHECK(pr.still_in_hook, "the probe's calls returned only after the slow operation");
    CHECK(pr.longest < SLOW_CONTROL_S / 2, "a call from another thread took %.2f s during a "
          "%.0f s session operation: it waited for the engine's lock", pr.longest,
          SLOW_CONTROL_S);
    const double deadline = rp_now_seconds() + STEP_DEADLINE_S;
    rp_finish_reason f = RP_FINISH_NONE;
    int32_t toks[4];
    while (f == RP_FINISH_NONE) {
        step(deadline, "the job submitted during the slow operation");
        rp_job_read(pr.job, toks, 4, 0, &f);
    }
    CHECK(f == RP_FINISH_LENGTH, "the job submitted during it ended with %s",
          rp_finish_reason_name(f));
    rp_job_release(pr.job);
    printf("  ok (longest call %.3f s)\n", pr.longest);

    printf("check: a session operation that fails the engine reports it to its caller\n");
    hook_fails = 1;
    export_call bad = {.name = "restored"};
    CHECK(pthread_create(&a, NULL, export_thread, &bad) == 0, "thread");
    rp_error err;
    rp_status st = RP_OK;
    const double until = rp_now_seconds() + STEP_DEADLINE_S;
    while (st == RP_OK) {
        rp_engine_step(engine, &err, &st);
        CHECK(rp_now_seconds() < until, "the failing operation did not fail the step");
    }
    pthread_join(a, NULL);
    CHECK(st == RP_ERR_MPI && strstr(err.msg, "stage 9 stopped"), "step: %s (%s)",
          rp_status_name(st), err.msg);
    CHECK(bad.status == RP_ERR_MPI && strstr(bad.err.msg, "the engine failed") &&
          strstr(bad.err.msg, "stage 9 stopped"), "the caller got %s: %s",
          rp_status_name(bad.status), bad.err.msg);
    rp_engine_control_test_hook = NULL;
    hook_fails = 0;
    printf("  ok: %s\n", bad.err.msg);
}

static int32_t *make_prompt(int n, int salt) {
    int32_t *p = malloc(sizeof(int32_t) * (size_t)n);
    for (int i = 0; i < n; i++) p[i] = (int32_t)((i * 7 + salt * 13 + 1) % whole.cfg.vocab_size);
    return p;
}

/* The prefix state cache: a chat's next turn (the first turn's prompt and
 * reply, then new text) resumes from the state after the first turn and
 * gives the tokens rp_generate gives from the zero state, greedy and seeded;
 * the same prompt again resumes from its prompt - 1 state (when the LRU
 * kept it). */
static void prefix_checks(const rp_gen_params *greedy) {
    printf("check: prefix cache (%s): a next turn resumes from the first, same tokens\n",
           prefix_mode);
    const int on = strcmp(prefix_mode, "off") != 0, big = strcmp(prefix_mode, "big") == 0;
    int32_t *base = make_prompt(70, 21), *more = make_prompt(30, 22);
    int n1, n_ref, n2;
    rp_finish_reason f;
    rp_engine_metrics m0, m1, m2, m3;
    int32_t *t1 = run_job(base, 70, greedy, NULL, NULL, &n1, &f);
    CHECK(n1 == greedy->max_tokens, "first turn: %d tokens", n1);
    const int n_turn = 70 + n1 + 30;
    int32_t *turn = malloc(sizeof(int32_t) * (size_t)n_turn);
    memcpy(turn, base, 70 * sizeof(int32_t));
    memcpy(turn + 70, t1, (size_t)n1 * sizeof(int32_t));
    memcpy(turn + 70 + n1, more, 30 * sizeof(int32_t));
    rp_gen_params seeded = *greedy;
    seeded.sampler.temperature = 1.0f;
    seeded.sampler.top_p = 0.9f;
    seeded.sampler.seed = 11;
    for (int k = 0; k < 2; k++) {
        const rp_gen_params *p = k ? &seeded : greedy;
        rp_engine_get_metrics(engine, &m0);
        int32_t *got = run_job(turn, n_turn, p, NULL, NULL, &n2, &f);
        rp_engine_get_metrics(engine, &m1);
        int32_t *ref = reference(turn, n_turn, p, &n_ref);
        same(ref, n_ref, got, n2, k ? "next turn, seeded" : "next turn, greedy");
        free(ref);
        free(got);
        /* the second run finds the first's prompt state (n_turn - 1), but
         * a tiny cache has evicted it for the first's end state */
        const long saved = m1.prefix_cache_tokens_saved - m0.prefix_cache_tokens_saved;
        const long want_saved = !on ? 0 : k == 0 ? 70 + n1 : big ? n_turn - 1 : 0;
        CHECK(m1.prefix_cache_hits - m0.prefix_cache_hits == (want_saved > 0),
              "next turn %d: %ld hits", k,
              m1.prefix_cache_hits - m0.prefix_cache_hits);
        CHECK(saved == want_saved, "next turn %d: %ld tokens saved, expected %ld", k, saved,
              want_saved);
        CHECK(m1.tokens_prefilled - m0.tokens_prefilled == n_turn - want_saved,
              "next turn %d: %ld tokens prefilled, expected %ld", k,
              m1.tokens_prefilled - m0.tokens_prefilled, n_turn - want_saved);
    }
    rp_engine_get_metrics(engine, &m2);
    CHECK(on == (m2.prefix_cache_bytes > 0), "prefix cache bytes %zu", m2.prefix_cache_bytes);
    if (on && !big)
        CHECK(m2.prefix_cache_bytes < 2 * rp_engine_session_floats(engine) * sizeof(float),
              "tiny prefix cache holds %zu bytes", m2.prefix_cache_bytes);
    /* the first prompt again: its prompt - 1 state, unless evicted since */
    int32_t *again = run_job(base, 70, greedy, NULL, NULL, &n2, &f);
    rp_engine_get_metrics(engine, &m3);
    same(t1, n1, again, n2, "the first prompt again");
    CHECK(m3.prefix_cache_hits - m2.prefix_cache_hits == big, "first prompt again: %ld hits",
          m3.prefix_cache_hits - m2.prefix_cache_hits);
    free(again);
    free(turn);
    free(t1);
    free(base);
    free(more);
    printf("  ok\n");
}

/* More sequences than the old cap of 8 decode in one group (the engine's
 * group size is the backend's, 64 on the CPU): each gives the tokens and the
 * logprobs, bit for bit, that it gives alone. Decode rows of any count keep
 * each row's arithmetic (backend.h, set_decode_rows); sgemm over the group
 * would change the logprobs' last bits. All at once, the prompts are also
 * prefilled several per unit: prefill rows are exact rows too. */
static void big_group_check(const rp_gen_params *greedy) {
    enum { G = 14, MAXT = 32 }; /* long enough to outlast the 14 prefills */
    printf("check: %d jobs decoding in one group give their solo tokens and logprobs\n", G);
    CHECK(engine->group_max > 8 && engine->cfg.n_slots >= G, "group %d, %d slots",
          engine->group_max, engine->cfg.n_slots);
    rp_error err;
    for (int bad = -1; bad <= RP_ENGINE_MAX_BATCH + 1; bad += RP_ENGINE_MAX_BATCH + 2) {
        rp_engine_config ec = engine->cfg;
        ec.max_batch = bad;
        rp_engine *e2 = NULL;
        CHECK(rp_engine_create(&e2, &whole, NULL, &ec, &err) == RP_ERR_ARG && !e2 &&
                  strstr(err.msg, "--max-batch"),
              "max_batch %d: %s", bad, e2 ? "accepted" : err.msg);
    }
    int32_t *prompts[G], toks[2][G][MAXT + 1];
    float lps[2][G][MAXT + 1];
    int lens[G], n_tok[2][G];
    rp_gen_params ps[G];
    for (int i = 0; i < G; i++) {
        lens[i] = 2 + i % 5;
        prompts[i] = make_prompt(lens[i], 40 + i);
        ps[i] = *greedy;
        ps[i].max_tokens = MAXT;
        ps[i].logprobs = 1;
        if (i % 2) { /* seeded sampling */
            ps[i].sampler.temperature = 1.0f;
            ps[i].sampler.top_p = 0.95f;
            ps[i].sampler.seed = (uint64_t)(100 + i);
        }
    }
    /* pass 0: one job at a time; pass 1: all at once */
    rp_engine_metrics m0, m1;
    for (int pass = 0; pass < 2; pass++) {
        rp_job *jobs[G];
        const int batch = pass == 0 ? 1 : G;
        rp_engine_get_metrics(engine, &m0);
        for (int first = 0; first < G; first += batch) {
            for (int i = first; i < first + batch; i++) {
                jobs[i] = rp_job_create(prompts[i], lens[i], &ps[i], NULL, NULL, &err);
                CHECK(jobs[i], "job: %s", err.msg);
                CHECK(rp_engine_submit(engine, jobs[i], &err) == RP_OK, "submit: %s", err.msg);
                n_tok[pass][i] = 0;
            }
            const double deadline = rp_now_seconds() + STEP_DEADLINE_S;
            for (int finished = 0; finished < batch;) {
                step(deadline, "a big group");
                finished = 0;
                for (int i = first; i < first + batch; i++) {
                    rp_finish_reason f;
                    n_tok[pass][i] += rp_job_read(jobs[i], toks[pass][i] + n_tok[pass][i],
                                                  MAXT + 1 - n_tok[pass][i], 0, &f);
                    finished += f != RP_FINISH_NONE;
                }
            }
            for (int i = first; i < first + batch; i++) {
                for (int t = 0; t < n_tok[pass][i]; t++) {
                    rp_token_logprob lp;
                    CHECK(rp_job_logprob(jobs[i], t, &lp), "job %d: no logprob %d", i, t);
                    lps[pass][i][t] = lp.logprob;
                }
                rp_job_release(jobs[i]);
            }
        }
        if (pass == 0) engine->largest_group = 0;
    }
    rp_engine_get_metrics(engine, &m1);
    /* The G short prompts (54 rows) fit one prefill turn (a chunk's rows),
     * so they are all prefilled before the first decode unit and every
     * decode unit of pass 1 holds all G (one prefill unit per decode unit,
     * the old turns, ramped the group up and down: mean 9.x). */
    const double mean_group =
        (double)(m1.decode_rows - m0.decode_rows) / (double)(m1.decode_units - m0.decode_units);
    CHECK(size > 1 || mean_group > G - 0.5, "mean decode group %.2f of %d jobs at once",
          mean_group, G);
    /* One stage: every ready slot joins the next unit. (With P stages the
     * P units in flight may split the slots into smaller groups.) */
    CHECK(size > 1 || engine->largest_group > 8, "the jobs decoded in groups of at most %d",
          engine->largest_group);
    /* Where prefill rows are exact rows the G prompts share prefill units
     * (engine.h, prefill_prompts), and each still gets its solo bits. (With
     * the prefix cache on, pass 1 resumes pass 0's stored prompts: no
     * prefill units.) */
    const long pf_units = m1.prefill_units - m0.prefill_units;
    const double mean_prompts =
        pf_units > 0 ? (double)(m1.prefill_seqs - m0.prefill_seqs) / (double)pf_units : 0.0;
    CHECK(!rp_model_prefill_rows_exact(&whole) || pf_units == 0 || mean_prompts > 2,
          "mean prompts per prefill unit %.2f of %d jobs at once", mean_prompts, G);
    for (int i = 0; i < G; i++) {
        char what[64];
        snprintf(what, sizeof what, "big group: job %d (%s)", i, i % 2 ? "seeded" : "greedy");
        same(toks[0][i], n_tok[0][i], toks[1][i], n_tok[1][i], what);
        for (int t = 0; t < n_tok[0][i]; t++)
            CHECK(memcmp(&lps[0][i][t], &lps[1][i][t], sizeof(float)) == 0,
                  "%s: token %d logprob %.9g alone, %.9g in the group", what, t, lps[0][i][t],
                  lps[1][i][t]);
        free(prompts[i]);
    }
    printf("  ok (largest decode group %d, mean %.2f; prompts per prefill unit %.2f)\n",
           engine->largest_group, mean_group, mean_prompts);
}

static void checks(void) {
    rp_gen_params greedy;
    rp_gen_params_defaults(&greedy);
    greedy.sampler.temperature = 0;
    greedy.max_tokens = 24;
    prefix_checks(&greedy);
    big_group_check(&greedy);

    printf("check: greedy and seeded jobs equal rp_generate on the whole model\n");
    int32_t *prompt = make_prompt(100, 1);
    int n_ref, n_got;
    rp_finish_reason f;
    int32_t *ref = reference(prompt, 100, &greedy, &n_ref);
    int32_t *got = run_job(prompt, 100, &greedy, NULL, NULL, &n_got, &f);
    same(ref, n_ref, got, n_got, "greedy");
    CHECK(f == RP_FINISH_LENGTH, "finish %s", rp_finish_reason_name(f));
    free(ref);
    free(got);
    rp_gen_params seeded = greedy;
    seeded.sampler.temperature = 1.0f;
    seeded.sampler.top_p = 0.9f;
    seeded.sampler.seed = 7;
    ref = reference(prompt, 100, &seeded, &n_ref);
    got = run_job(prompt, 100, &seeded, NULL, NULL, &n_got, &f);
    same(ref, n_ref, got, n_got, "seeded sampling");
    free(got);
    got = run_job(prompt, 100, &seeded, NULL, NULL, &n_got, &f);
    same(ref, n_ref, got, n_got, "seeded sampling, again");
    free(ref);
    free(got);
    printf("  ok\n");

    printf("check: 16 jobs of different lengths, started at different times, give their solo tokens\n");
    enum { N = 16 };
    int32_t *prompts[N], *solo[N], *outs[N];
    int lens[N], n_solo[N], n_outs[N] = {0};
    rp_gen_params ps[N];
    for (int i = 0; i < N; i++) {
        lens[i] = 1 + (i * 37) % 150;
        prompts[i] = make_prompt(lens[i], i + 3);
        ps[i] = greedy;
        ps[i].max_tokens = 5 + (i * 5) % 20;
        if (i % 3 == 1) {
            ps[i].sampler.temperature = 0.8f;
            ps[i].sampler.seed = (uint64_t)i;
        }
        if (i % 4 == 2) {
            ps[i].presence_penalty = 0.5f;
            ps[i].frequency_penalty = 0.5f;
        }
        solo[i] = run_job(prompts[i], lens[i], &ps[i], NULL, NULL, &n_solo[i], &f);
        outs[i] = malloc(sizeof(int32_t) * 64);
    }
    rp_job *jobs[N];
    int submitted = 0, finished = 0;
    rp_error err;
    const double deadline = rp_now_seconds() + STEP_DEADLINE_S;
    for (int round = 0; finished < N; round++) {
        /* Two new jobs every three rounds. */
        while (submitted < N && submitted < 2 * (round / 3 + 1)) {
            jobs[submitted] = rp_job_create(prompts[submitted], lens[submitted], &ps[submitted],
                                            NULL, NULL, &err);
            CHECK(rp_engine_submit(engine, jobs[submitted], &err) == RP_OK, "%s", err.msg);
            submitted++;
        }
        step(deadline, "16 jobs");
        finished = 0;
        for (int i = 0; i < submitted; i++) {
            n_outs[i] += rp_job_read(jobs[i], outs[i] + n_outs[i], 64 - n_outs[i], 0, &f);
            finished += f != RP_FINISH_NONE;
        }
    }
    for (int i = 0; i < N; i++) {
        char what[64];
        snprintf(what, sizeof what, "job %d (%d prompt tokens)", i, lens[i]);
        same(solo[i], n_solo[i], outs[i], n_outs[i], what);
        rp_job_release(jobs[i]);
        free(prompts[i]);
        free(solo[i]);
        free(outs[i]);
    }
    printf("  ok\n");

    printf("check: stop tokens, max_tokens 0, cancellation, unknown session\n");
    ref = run_job(prompt, 100, &greedy, NULL, NULL, &n_ref, &f);
    rp_gen_params stop = greedy;
    stop.stop_tokens[0] = ref[4];
    stop.n_stop_tokens = 1;
    int first = 0;
    while (ref[first] != ref[4]) first++;
    got = run_job(prompt, 100, &stop, NULL, NULL, &n_got, &f);
    CHECK(f == RP_FINISH_STOP && n_got == first, "stop token: %s after %d tokens, want %d",
          rp_finish_reason_name(f), n_got, first);
    free(got);
    rp_gen_params none = greedy;
    none.max_tokens = 0;
    got = run_job(prompt, 100, &none, NULL, NULL, &n_got, &f);
    CHECK(f == RP_FINISH_LENGTH && n_got == 0, "max_tokens 0: %s, %d tokens",
          rp_finish_reason_name(f), n_got);
    free(got);
    rp_gen_params longer = greedy;
    longer.max_tokens = 100000;
    rp_job *j = rp_job_create(prompt, 100, &longer, NULL, NULL, &err);
    CHECK(rp_engine_submit(engine, j, &err) == RP_OK, "%s", err.msg);
    int32_t buf[64];
    int got_tokens = 0;
    double deadline_cancel = rp_now_seconds() + STEP_DEADLINE_S;
    while (got_tokens < 3) {
        step(deadline_cancel, "3 tokens of a long job");
        got_tokens += rp_job_read(j, buf, 64, 0, &f);
    }
    rp_job_cancel(j);
    for (f = RP_FINISH_NONE; f == RP_FINISH_NONE;) {
        step(deadline_cancel, "a cancelled job's end");
        rp_job_read(j, buf, 64, 0, &f);
    }
    CHECK(f == RP_FINISH_CANCELLED, "cancel: %s after %d tokens", rp_finish_reason_name(f), got_tokens);
    rp_job_release(j);
    /* The slot comes back once the cancelled job's last unit returns. */
    rp_engine_metrics m;
    for (rp_engine_get_metrics(engine, &m); m.slots_active != 0; rp_engine_get_metrics(engine, &m))
        step(deadline_cancel, "every slot free after every job ended");
    got = run_job(prompt, 10, &greedy, "no-such-session", NULL, &n_got, &f);
    CHECK(f == RP_FINISH_ERROR, "unknown session: %s", rp_finish_reason_name(f));
    free(got);
    free(ref);
    printf("  ok\n");

    printf("check: --max-queue counts only jobs that no free slot will take\n");
    {
        /* Submitted without a step between: every job is still queued, and
         * the free slots are about to take the first n_slots of them. */
        const int S = engine->cfg.n_slots, saved = engine->cfg.max_queue;
        enum { MAXJ = 64 };
        rp_job *qjobs[MAXJ];
        int nj = 0;
        CHECK(S + 2 <= MAXJ, "slots %d", S);
        engine->cfg.max_queue = 0;
        for (; nj < S; nj++) {
            qjobs[nj] = rp_job_create(prompt, 10, &greedy, NULL, NULL, &err);
            CHECK(rp_engine_submit(engine, qjobs[nj], &err) == RP_OK,
                  "max_queue 0, job %d of %d with free slots refused: %s", nj + 1, S, err.msg);
        }
        CHECK(rp_engine_waiting(engine) == 0, "waiting %d with %d slots", rp_engine_waiting(engine), S);
        rp_job *extra = rp_job_create(prompt, 10, &greedy, NULL, NULL, &err);
        CHECK(rp_engine_submit(engine, extra, &err) == RP_ERR_BUSY,
              "max_queue 0: job %d with every slot taken was accepted", S + 1);
        engine->cfg.max_queue = 1;
        CHECK(rp_engine_submit(engine, extra, &err) == RP_OK, "max_queue 1: %s", err.msg);
        qjobs[nj++] = extra;
        CHECK(rp_engine_waiting(engine) == 1, "waiting %d", rp_engine_waiting(engine));
        extra = rp_job_create(prompt, 10, &greedy, NULL, NULL, &err);
        CHECK(rp_engine_submit(engine, extra, &err) == RP_ERR_BUSY,
              "max_queue 1: a second waiting job was accepted");
        rp_job_release(extra);
        /* After admission the slots are held, not queued: still one may wait. */
        double dq = rp_now_seconds() + STEP_DEADLINE_S;
        for (rp_engine_get_metrics(engine, &m); m.slots_active < S; rp_engine_get_metrics(engine, &m))
            step(dq, "queued jobs take every slot");
        CHECK(rp_engine_waiting(engine) == 1, "waiting %d after admission", rp_engine_waiting(engine));
        extra = rp_job_create(prompt, 10, &greedy, NULL, NULL, &err);
        CHECK(rp_engine_submit(engine, extra, &err) == RP_ERR_BUSY,
              "max_queue 1 after admission: a second waiting job was accepted");
        rp_job_release(extra);
        for (int i = 0; i < nj; i++) {
            for (f = RP_FINISH_NONE; f == RP_FINISH_NONE;) {
                step(dq, "the queue-limit jobs end");
                rp_job_read(qjobs[i], buf, 64, 0, &f);
            }
            rp_job_release(qjobs[i]);
        }
        for (rp_engine_get_metrics(engine, &m); m.slots_active != 0; rp_engine_get_metrics(engine, &m))
            step(dq, "every slot free after the queue-limit jobs");
        CHECK(rp_engine_waiting(engine) == 0, "waiting %d when idle", rp_engine_waiting(engine));
        engine->cfg.max_queue = saved;
    }
    printf("  ok\n");

    printf("check: a session continued over two jobs equals reading the whole history\n");
    int32_t *p1 = make_prompt(40, 21), *p2 = make_prompt(30, 22);
    int n1, n2;
    int32_t *t1 = run_job(p1, 40, &greedy, NULL, "chat", &n1, &f);
    int32_t *t2 = run_job(p2, 30, &greedy, "chat", "chat", &n2, &f);
    int32_t *history = malloc(sizeof(int32_t) * (size_t)(40 + n1 + 30));
    memcpy(history, p1, 40 * sizeof(int32_t));
    memcpy(history + 40, t1, (size_t)n1 * sizeof(int32_t));
    memcpy(history + 40 + n1, p2, 30 * sizeof(int32_t));
    ref = reference(history, 40 + n1 + 30, &greedy, &n_ref);
    same(ref, n_ref, t2, n2, "second turn vs whole history");
    free(ref);
    printf("  ok\n");

    printf("check: a session exported and imported is the same state, bit for bit\n");
    {
        const size_t n = rp_engine_session_floats(engine);
        rp_state geometry;
        rp_state_geometry(&geometry, &whole.cfg, 0, whole.cfg.n_layer, 1);
        CHECK(n == geometry.floats_per_slot, "session floats %zu, the whole model's state %zu", n,
              geometry.floats_per_slot);
        float *a = malloc(n * sizeof(float)), *b = malloc(n * sizeof(float));
        CHECK(a && b, "buffers");
        memset(b, 0xff, n * sizeof(float));
        uint64_t ta = 0, tb = 0;
        CHECK(rp_engine_session_export(engine, "chat", a, &ta, &err) == RP_OK, "%s", err.msg);
        CHECK(ta == (uint64_t)(40 + n1 + 30 + n2), "the exported state read %llu tokens, "
              "expected %d", (unsigned long long)ta, 40 + n1 + 30 + n2);
        /* every layer's part is there, whichever stage holds it */
        geometry.data = a;
        for (int l = 0; l < whole.cfg.n_layer; l++) {
            const float *wkv = rp_state_wkv(&geometry, 0, l);
            int nonzero = 0;
            for (size_t i = 0; i < (size_t)whole.cfg.n_head * 64 * 64 && !nonzero; i++)
                nonzero = wkv[i] != 0;
            CHECK(nonzero, "layer %d's exported WKV state is all zero", l);
        }
        CHECK(rp_engine_session_import(engine, "copy", a, ta, &err) == RP_OK, "%s", err.msg);
        CHECK(rp_engine_session_export(engine, "copy", b, &tb, &err) == RP_OK, "%s", err.msg);
        CHECK(tb == ta, "tokens %llu after import, %llu before", (unsigned long long)tb,
              (unsigned long long)ta);
        CHECK(memcmp(a, b, n * sizeof(float)) == 0, "the imported state differs from the export");
        CHECK(rp_engine_session_export(engine, "no-such-session", b, &tb, &err) == RP_ERR_ARG,
              "export of an unknown session: %s", err.msg);
        CHECK(rp_engine_session_delete(engine, "copy", &err) == RP_OK, "%s", err.msg);
        free(a);
        free(b);
    }
    printf("  ok\n");

    printf("check: session save -> delete -> load continues identically\n");
    int32_t *p3 = make_prompt(12, 23);
    int n3a, n3b;
    char path[] = "/tmp/test_engine_session.XXXXXX";
    int fd = mkstemp(path);
    CHECK(fd >= 0, "mkstemp");
    close(fd);
    CHECK(save_session("chat", path, &err) == RP_OK, "save: %s", err.msg);
    int32_t *t3a = run_job(p3, 12, &greedy, "chat", NULL, &n3a, &f);
    CHECK(rp_engine_session_delete(engine, "chat", &err) == RP_OK, "delete: %s", err.msg);
    CHECK(!rp_engine_session_exists(engine, "chat"), "deleted session still exists");
    CHECK(rp_engine_session_delete(engine, "chat", &err) == RP_ERR_ARG, "second delete");
    CHECK(load_session("restored", path, &err) == RP_OK, "load: %s", err.msg);
    int32_t *t3b = run_job(p3, 12, &greedy, "restored", NULL, &n3b, &f);
    same(t3a, n3a, t3b, n3b, "after save/load");
    unlink(path);
    printf("  ok\n");

    /* A state-tuning file (per-layer blocks.L.att.time_state [H,N,N], zero
     * token shifts) loads as a start state: equal to a session file holding
     * the same WKV states with zero shifts. */
    printf("check: a state-tuning file (time_state) is a start state\n");
    {
        const rp_config *c = &whole.cfg;
        const int L = c->n_layer, H = c->n_head;
        const size_t HNN = (size_t)H * 64 * 64;
        float *ts = malloc(sizeof(float) * (size_t)L * HNN);
        for (size_t i = 0; i < (size_t)L * HNN; i++) ts[i] = 0.01f * (float)((i * 2654435761u) % 97) - 0.48f;
        char tuned[] = "/tmp/test_engine_tuned.XXXXXX", sess[] = "/tmp/test_engine_sess.XXXXXX";
        int fd1 = mkstemp(tuned), fd2 = mkstemp(sess);
        CHECK(fd1 >= 0 && fd2 >= 0, "mkstemp");
        close(fd1);
        close(fd2);
        rp_st_writer w;
        rp_st_writer_init(&w);
        char names[64][64];
        int64_t shape[3] = {H, 64, 64};
        for (int l = 0; l < L && l < 64; l++) {
            snprintf(names[l], sizeof names[l], "blocks.%d.att.time_state", l);
            CHECK(rp_st_writer_add(&w, names[l], RP_DTYPE_F32, RP_DTYPE_F32, 3, shape,
                                   ts + (size_t)l * HNN, &err) == RP_OK, "%s", err.msg);
        }
        CHECK(rp_st_writer_write(&w, tuned, &err) == RP_OK, "%s", err.msg);
        rp_st_writer_free(&w);
        rp_state full;
        CHECK(rp_state_alloc_host(&full, c, 0, L, 1, &err) == RP_OK, "state");
        for (int l = 0; l < L; l++) memcpy(rp_state_wkv(&full, 0, l), ts + (size_t)l * HNN, HNN * sizeof(float));
        CHECK(rp_session_file_write(sess, c, 0, full.data, &err) == RP_OK, "%s", err.msg);
        CHECK(load_session("tuned", tuned, &err) == RP_OK, "%s", err.msg);
        CHECK(load_session("same", sess, &err) == RP_OK, "%s", err.msg);
        int na, nb;
        /* One prompt token: the start state still matters for what follows. */
        int32_t *ta = run_job(p3, 1, &greedy, "tuned", NULL, &na, &f);
        int32_t *tb = run_job(p3, 1, &greedy, "same", NULL, &nb, &f);
        same(ta, na, tb, nb, "state-tuning file vs session file");
        /* and it is not the zero state's output */
        int nz;
        int32_t *tz = run_job(p3, 1, &greedy, NULL, NULL, &nz, &f);
        int differs = nz != na;
        for (int i = 0; !differs && i < na; i++) differs = ta[i] != tz[i];
        /* (A freshly initialised model's att.output is zero, so its state
         * cannot change the output: only the reference model is checked.) */
        CHECK(differs || !reference_model, "the tuned start state changed nothing");
        CHECK(load_session("bad", "/nonexistent/file", &err) != RP_OK,
              "a missing file loaded");
        free(ta);
        free(tb);
        free(tz);
        free(ts);
        rp_state_free_host(&full);
        unlink(tuned);
        unlink(sess);
        printf("  ok\n");
    }

    /* Files saved by runs with another stage count (tests/test_engine.sh
     * runs P = 1..4 with one directory) load and continue identically. */
    const char *dir = getenv("RP_ENGINE_SESSION_DIR");
    if (dir) {
        printf("check: session files written with 1..3 stages load on %d\n", size);
        char mine[4096], other[4096];
        snprintf(mine, sizeof mine, "%s/session-np%d.st", dir, size);
        CHECK(save_session("restored", mine, &err) == RP_OK, "%s", err.msg);
        for (int np = 1; np <= 4; np++) {
            snprintf(other, sizeof other, "%s/session-np%d.st", dir, np);
            if (access(other, R_OK) != 0) continue;
            CHECK(load_session("other", other, &err) == RP_OK, "%s", err.msg);
            int n3c;
            int32_t *t3c = run_job(p3, 12, &greedy, "other", NULL, &n3c, &f);
            char what[64];
            snprintf(what, sizeof what, "session saved with %d stage(s)", np);
            same(t3a, n3a, t3c, n3c, what);
            free(t3c);
            printf("  ok: %s\n", what);
        }
    }
    /* n > 1: three sh_jobs share one prompt (rp_job_share_prompt): it is read
     * once (one prefill of all but its last token) and each choice gives the
     * tokens it gives alone, on any number of stages. */
    {
        printf("check: a prompt shared by 3 seeded jobs is prefilled once, each as alone\n");
        int32_t *sh_prompt = make_prompt(40, 9);
        rp_gen_params sp;
        rp_gen_params_defaults(&sp);
        sp.max_tokens = 8;
        sp.n_stop_tokens = 0;
        rp_job *sh_jobs[3];
        rp_engine_metrics m0, m1;
        rp_engine_get_metrics(engine, &m0);
        for (int k = 0; k < 3; k++) {
            sp.sampler.seed = 100 + (uint64_t)k;
            sh_jobs[k] = rp_job_create(sh_prompt, 40, &sp, NULL, NULL, &err);
            CHECK(sh_jobs[k], "job: %s", err.msg);
            if (k > 0) rp_job_share_prompt(sh_jobs[k], sh_jobs[0]);
        }
        for (int k = 0; k < 3; k++)
            CHECK(rp_engine_submit(engine, sh_jobs[k], &err) == RP_OK, "submit: %s", err.msg);
        int32_t sh_got[3][9];
        int sh_n[3] = {0, 0, 0}, over = 0;
        const double sh_deadline = rp_now_seconds() + STEP_DEADLINE_S;
        while (over < 3) {
            step(sh_deadline, "shared prompt");
            over = 0;
            for (int k = 0; k < 3; k++) {
                rp_finish_reason fk;
                sh_n[k] += rp_job_read(sh_jobs[k], sh_got[k] + sh_n[k], 9 - sh_n[k], 0, &fk);
                over += fk != RP_FINISH_NONE;
            }
        }
        rp_engine_get_metrics(engine, &m1);
        CHECK(m1.tokens_prefilled - m0.tokens_prefilled == 39,
              "the shared prompt of 40 tokens: %ld tokens prefilled, expected 39",
              m1.tokens_prefilled - m0.tokens_prefilled);
        for (int k = 0; k < 3; k++) {
            sp.sampler.seed = 100 + (uint64_t)k;
            int nr;
            int32_t *r = reference(sh_prompt, 40, &sp, &nr);
            same(sh_got[k], sh_n[k], r, nr, "a choice of a shared prompt vs rp_generate");
            free(r);
            rp_job_release(sh_jobs[k]);
        }
        free(sh_prompt);
        printf("  ok\n");
    }
    free(p1);
    free(p2);
    free(p3);
    free(t1);
    free(t2);
    free(t3a);
    free(t3b);
    free(history);
    free(prompt);
    control_checks();
}

int main(int argc, char **argv) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    MPI_Init(&argc, &argv);
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &size);
    const char *data = getenv("RP_TEST_DATA");
    char path[4096];
    snprintf(path, sizeof path, "%s/tiny_L2_C128_V256_s1.weights.safetensors",
             data ? data : "tests/data");
    if (argc > 1) snprintf(path, sizeof path, "%s", argv[1]);
    /* "init" after the path: a freshly initialised model (see above). */
    reference_model = !(argc > 2 && strcmp(argv[2], "init") == 0);
    rp_error err;
    rp_backend *be = rp_cpu_backend_create(1, &err);
    CHECK(be, "backend");
    rp_st_file f;
    rp_config cfg;
    rp_naming naming;
    CHECK(rp_st_open(&f, path, &err) == RP_OK && rp_config_from_safetensors(&f, &cfg, &naming, &err) == RP_OK,
          "%s", err.msg);
    rp_st_close(&f);
    rp_grid grid, *g = NULL;
    int begin = 0, end = cfg.n_layer;
    if (size > 1) {
        int layers[64];
        CHECK(rp_partition_balanced(&cfg, size, layers, &err) == RP_OK, "%s", err.msg);
        CHECK(rp_grid_create(&grid, MPI_COMM_WORLD, size, layers, &err) == RP_OK, "%s", err.msg);
        g = &grid;
        begin = grid.layer_begin[grid.stage];
        end = grid.layer_end[grid.stage];
    }
    rp_model stage;
    CHECK(rp_model_load(&stage, path, begin, end, be, &err) == RP_OK, "%s", err.msg);
    rp_engine_config ec;
    rp_engine_config_defaults(&ec);
    ec.prefill_chunk = 64;
    ec.comm_timeout = 60;
    if (getenv("RP_TEST_PREFIX_CACHE")) prefix_mode = getenv("RP_TEST_PREFIX_CACHE");
    if (strcmp(prefix_mode, "off") != 0) {
        rp_state whole_state;
        rp_state_geometry(&whole_state, &cfg, 0, cfg.n_layer, 1);
        const size_t one = whole_state.floats_per_slot * sizeof(float);
        ec.prefix_cache_bytes = strcmp(prefix_mode, "big") == 0 ? (size_t)64 << 20 : one + 4096;
    }
    CHECK(rp_engine_create(&engine, &stage, g, &ec, &err) == RP_OK, "%s", err.msg);
    if (rank == 0) {
        CHECK(rp_model_load(&whole, path, 0, -1, be, &err) == RP_OK, "%s", err.msg);
        printf("engine on %d stage%s, model %s\n", size, size == 1 ? "" : "s", path);
        checks();
        rp_engine_shutdown(engine);
        rp_model_free(&whole);
    }
    CHECK(rp_engine_run(engine, &err) == RP_OK, "rank %d: run: %s", rank, err.msg);
    rp_engine_free(engine);
    rp_model_free(&stage);
    if (g) rp_grid_free(g);
    rp_cpu_backend_destroy(be);
    if (rank == 0) printf("all engine checks passed\n");
    MPI_Finalize();
    return 0;
}
