/* bench_contention: how the CPU backend's thread team degrades when every core
 * is shared with a busy process. For 1 and 2 threads, tokens/s of (a) training
 * steps (forward, backward, AdamW) and (b) batch-1 decode on a built-in model
 * (default the quick start's 'tiny'), alone and with one spinning process per
 * online CPU, which this program forks and kills itself; rounds interleaved.
 *   bench/bench_contention [--quick] [--model-config NAME] */
#include "config.h"

#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "backend.h"
#include "bench/harness.h"
#include "cpu/cpu_backend.h"
#include "model/model.h"
#include "bench/train_step.h"

#define MAX_SPINNERS 256
#define TRAIN_B 32 /* the quick start's --batch 32 --ctx-len 64 */
#define TRAIN_T 64
#define GOAL_RATIO 0.40

typedef struct {
    rp_model *model;
    rp_workspace *ws;
    rp_state *state;
    float *logits;
    int32_t token;
    rp_batch batch;
    int seq_len, slot, row_begin;
} decode_ctx;

static int decode_call(void *p) {
    decode_ctx *c = p;
    rp_error err;
    c->token = (c->token * 75 + 74) % c->model->cfg.vocab_size;
    if (rp_model_forward(c->model, c->ws, &c->token, &c->batch, c->state, RP_LOGITS_LAST,
                         c->logits, &err) != RP_OK) {
        fprintf(stderr, "bench_contention: %s\n", err.msg);
        return 1;
    }
    return 0;
}

/* One busy process per online CPU: children that spin until killed, forked
 * before the model is allocated (a fork later would make every page the
 * benchmark writes a copy-on-write fault) and stopped between busy phases. */
static pid_t spinner_pids[MAX_SPINNERS];
static int n_spinners;

static void spinners_signal(int sig) {
    for (int i = 0; i < n_spinners; i++) kill(spinner_pids[i], sig);
}

static void spinners_kill(void) {
    spinners_signal(SIGKILL);
    for (int i = 0; i < n_spinners; i++) waitpid(spinner_pids[i], NULL, 0);
    n_spinners = 0;
}

static int spinners_fork(int n) {
    for (int i = 0; i < n; i++) {
        pid_t pid = fork();
        if (pid < 0) return 1;
        if (pid == 0) {
            volatile unsigned long x = 0;
            for (;;) x++;
        }
        kill(pid, SIGSTOP);
        spinner_pids[n_spinners++] = pid;
    }
    return 0;
}

static void spinners_run(int on) {
    spinners_signal(on ? SIGCONT : SIGSTOP);
    struct timespec settle = {0, 20 * 1000 * 1000}; /* let the scheduler spread them */
    nanosleep(&settle, NULL);
}

/* Median tokens/s alone and with spinners, and the median of per-round
 * ratios; rounds alternate so that drift on a shared machine hits both. */
typedef struct {
    double solo, busy, ratio;
} contention_result;

static int measure(bench_call_fn fn, void *ctx, double tokens_per_call, int rounds,
                   double min_batch_s, contention_result *out) {
    double solo[BENCH_MAX_REPEATS], busy[BENCH_MAX_REPEATS], ratio[BENCH_MAX_REPEATS];
    long calls = bench_calls_per_batch(fn, ctx, 0.2, min_batch_s);
    if (calls < 0) return 1;
    for (int r = 0; r < rounds; r++) {
        double s = bench_batch_seconds(fn, ctx, calls);
        spinners_run(1);
        /* Under contention a call takes longer: fewer calls, same wall time. */
        long busy_calls = calls / 4 > 0 ? calls / 4 : 1;
        double b = bench_batch_seconds(fn, ctx, busy_calls);
        spinners_run(0);
        if (s < 0 || b < 0) return 1;
        solo[r] = tokens_per_call / s;
        busy[r] = tokens_per_call / b;
        ratio[r] = busy[r] / solo[r];
    }
    out->solo = bench_median(solo, rounds);
    out->busy = bench_median(busy, rounds);
    out->ratio = bench_median(ratio, rounds);
    return 0;
}

int main(int argc, char **argv) {
    int quick = 0;
    const char *config_name = "tiny";
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--quick") == 0) {
            quick = 1;
        } else if (strcmp(argv[i], "--model-config") == 0 && i + 1 < argc) {
            config_name = argv[++i];
        } else {
            fprintf(stderr, "usage: bench/bench_contention [--quick] [--model-config NAME]\n");
            return strcmp(argv[i], "--help") == 0 ? 0 : 2;
        }
    }
    rp_error err = {0};
    rp_config cfg;
    if (rp_config_builtin(&cfg, config_name, 0, &err) != RP_OK) {
        fprintf(stderr, "bench_contention: --model-config: %s\n", err.msg);
        return 2;
    }
    long online = sysconf(_SC_NPROCESSORS_ONLN);
    int want = online > 0 ? (online < MAX_SPINNERS ? (int)online : MAX_SPINNERS) : 1;
    atexit(spinners_kill);
    if (spinners_fork(want)) {
        fprintf(stderr, "bench_contention: cannot fork %d busy processes\n", want);
        return 1;
    }
    const int rounds = quick ? 3 : 7;
    const double min_batch_s = quick ? 0.3 : 1.0;
    const int B = TRAIN_B, T = TRAIN_T, R = B * T;

    char title[256];
    snprintf(title, sizeof title,
             "bench_contention: RWKV-7 '%s' (L%d C%d V%d), training batch %d x %d and decode "
             "batch 1, alone and with %d busy processes",
             config_name, cfg.n_layer, cfg.n_embd, cfg.vocab_size, B, T, n_spinners);
    bench_print_machine(stdout, title);
    const char *spin = getenv("GOMP_SPINCOUNT"), *policy = getenv("OMP_WAIT_POLICY");
    printf("- OpenMP wait: OMP_WAIT_POLICY=%s GOMP_SPINCOUNT=%s (as this process saw them)\n",
           policy ? policy : "(unset)", spin ? spin : "(unset)");
    printf("- busy = one `for (;;)` process per online CPU; %d interleaved rounds of (alone >= "
           "%.1f s, busy); ratio = median of per-round busy / alone; goal >= %.2f\n\n",
           rounds, min_batch_s, GOAL_RATIO);

    const char *cols[2] = {"1 thread", "2 threads"};
    char cells[6][2][64];
    for (int ti = 0; ti < 2; ti++) {
        int threads = ti + 1;
        rp_backend *be = rp_cpu_backend_create(threads, &err);
        rp_model model, grads, m, v;
        rp_backward_workspace tw;
        rp_state state, dstate;
        rp_workspace ws;
        if (!be || rp_model_alloc(&model, &cfg, 0, cfg.n_layer, 1, 1, be, &err) ||
            rp_model_alloc(&grads, &cfg, 0, cfg.n_layer, 1, 1, be, &err) ||
            rp_model_alloc(&m, &cfg, 0, cfg.n_layer, 1, 1, be, &err) ||
            rp_model_alloc(&v, &cfg, 0, cfg.n_layer, 1, 1, be, &err) ||
            rp_model_init_official(&model, 1, &err) ||
            rp_backward_workspace_alloc(&tw, &model, R, B, &err) ||
            rp_state_alloc_host(&state, &cfg, 0, cfg.n_layer, B, &err) ||
            rp_workspace_alloc(&ws, &cfg, 1, be, &err) ||
            rp_state_alloc_host(&dstate, &cfg, 0, cfg.n_layer, 1, &err)) {
            fprintf(stderr, "bench_contention: %s\n", err.msg);
            return 1;
        }
        int32_t *inputs = malloc(R * sizeof(int32_t)), *targets = malloc(R * sizeof(int32_t));
        float *logits = malloc((size_t)cfg.vocab_size * sizeof(float));
        if (!inputs || !targets || !logits) {
            fprintf(stderr, "bench_contention: out of memory\n");
            return 1;
        }
        bench_train_tokens(inputs, targets, R, cfg.vocab_size);
        int seq_len[TRAIN_B], slot[TRAIN_B], row_begin[TRAIN_B];
        rp_batch batch;
        bench_train_batch(&batch, B, T, seq_len, slot, row_begin);
        rp_optim_config optim;
        rp_optim_defaults(&optim);
        bench_train_ctx tctx = {&model, &grads, &m, &v, &tw, &state, &batch, inputs, targets,
                                &optim, 0, "bench_contention"};
        decode_ctx dctx = {.model = &model, .ws = &ws, .state = &dstate, .logits = logits,
                           .token = 1, .seq_len = 1};
        rp_batch_init(&dctx.batch, 1, &dctx.seq_len, &dctx.slot, &dctx.row_begin);

        contention_result tr, dr;
        fprintf(stderr, "bench_contention: %d thread(s): training...\n", threads);
        if (measure(bench_train_call, &tctx, R, rounds, min_batch_s, &tr)) return 1;
        fprintf(stderr, "bench_contention: %d thread(s): decode...\n", threads);
        if (measure(decode_call, &dctx, 1, rounds, min_batch_s, &dr)) return 1;
        snprintf(cells[0][ti], 64, "%.0f", tr.solo);
        snprintf(cells[1][ti], 64, "%.0f", tr.busy);
        snprintf(cells[2][ti], 64, "%.2f %s", tr.ratio, tr.ratio >= GOAL_RATIO ? "✓" : "✗");
        snprintf(cells[3][ti], 64, "%.0f", dr.solo);
        snprintf(cells[4][ti], 64, "%.0f", dr.busy);
        snprintf(cells[5][ti], 64, "%.2f %s", dr.ratio, dr.ratio >= GOAL_RATIO ? "✓" : "✗");
        free(inputs);
        free(targets);
        free(logits);
        rp_state_free_host(&state);
        rp_state_free_host(&dstate);
        rp_workspace_free(&ws, be);
        rp_backward_workspace_free(&tw, be);
        rp_model_free(&model);
        rp_model_free(&grads);
        rp_model_free(&m);
        rp_model_free(&v);
        rp_cpu_backend_destroy(be);
    }
    bench_table_header(stdout, "metric", cols, 2);
    const char *labels[6] = {"training tokens/s, alone", "training tokens/s, busy",
                             "training busy / alone (goal >= 0.40)", "decode tokens/s, alone",
                             "decode tokens/s, busy", "decode busy / alone (goal >= 0.40)"};
    for (int r = 0; r < 6; r++) {
        const char *row[2] = {cells[r][0], cells[r][1]};
        bench_table_row(stdout, labels[r], row, 2);
    }
    return 0;
}
