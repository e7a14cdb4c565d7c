/* Pipeline bubble and critical-path efficiency of the executor
 * (src/pipe/pipe_train.c) under MPI: P ranks run P stages (DP = 1); for
 * each schedule (gpipe, 1f1b, zb-h1, interleaved with v chunks per stage)
 * at several micro-batch counts M, the step time against the compute every
 * stage did (the measured idle share next to the theory (P-1)/(M+P-1),
 * interleaved (P-1)/(v*M+P-1), split into imbalance, update and rest),
 * and from every step's instruction trace its critical path and the
 * efficiency critical path / step span. One markdown table on rank 0; run
 * by hand, results in docs/perf/pipeline.md.
 *   mpirun -np 2 bench/bench_pipeline [options]   (--help) */
#include "config.h"

#include <math.h>
#include <mpi.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bench/harness.h"
#include "cpu/cpu_backend.h"
#include "model/model.h"
#include "model/backward.h"
#include "pipe/critical_path.h"
#include "pipe/grid.h"
#include "pipe/pipe_train.h"
#include "pipe/schedule.h"
#include "pipe/transport.h"
#include "optim/optim.h"
#include "core/clock.h"

#define MAX_MICRO_COUNTS 16
#define MAX_STEPS 1000
/* Another job on a 2-core machine slows one stage and not the other: a case
 * where others used more than this share of the CPUs is not worth reading. */
#define NOISY_OTHER_CPU_FRACTION 0.05

typedef struct {
    const char *model_config, *stage_layers;
    int ctx_len, micro_batch_size, steps, warmup, threads;
    int micro[MAX_MICRO_COUNTS], n_micro_counts;
    int kinds[RP_SCHEDULE_KIND_COUNT], n_kinds;
    unsigned long long seed;
    int trace_m;  /* print the timeline of one step of the cases with this M (0: none) */
    int n_virtual;  /* chunks per stage of the interleaved cases */
} options;

static int world_rank = 0, my_stage = -1; /* -1 until the grid is made */

static void usage(FILE *out) {
    fprintf(out,
            "usage: mpirun -np P bench/bench_pipeline [options]\n"
            "  P ranks run P pipeline stages (one data replica). For each schedule and\n"
            "  micro-batch count M: step time, per-stage compute, measured bubble\n"
            "  1 - sum(busy) / (P x step) and the theory (P-1)/(M+P-1).\n"
            "options:\n"
            "  --model-config NAME     built-in or L<layers>-C<n_embd>[-V<vocab>] (L8-C128-V256)\n"
            "  --ctx-len T             tokens per sequence (64)\n"
            "  --micro-batch-seqs S    sequences per micro-batch (4)\n"
            "  --micro-batches LIST    micro-batch counts M (1,2,4,8)\n"
            "  --schedules LIST        of gpipe,1f1b,zb-h1,interleaved (gpipe,1f1b);\n"
            "                          interleaved runs only the M that are multiples of P\n"
            "  --virtual-stages V      chunks of layers per stage for interleaved (2); the\n"
            "                          model's layers are split into P x V chunks\n"
            "  --stage-layers LIST     layers per stage, e.g. 5,3 (balanced partition)\n"
            "  --steps N               timed steps per case (15)\n"
            "  --warmup N              untimed steps per case first (2)\n"
            "  --threads K             CPU backend threads per rank (1)\n"
            "  --seed N                token and weight seed (1)\n"
            "  --trace M               after the table, one more step of each case with M\n"
            "                          micro-batches, every instruction's start and end per\n"
            "                          stage (ms from the step's barrier)\n");
}

/* Under MPI a fatal error ends every rank, naming this one. */
static void fatal(const char *what, const rp_error *err) {
    char stage[32] = "";
    if (my_stage >= 0) snprintf(stage, sizeof stage, " (stage %d)", my_stage);
    fprintf(stderr, "bench_pipeline: rank %d%s: %s%s%s\n", world_rank, stage, what,
            err ? ": " : "", err ? err->msg : "");
    MPI_Abort(MPI_COMM_WORLD, 1);
    exit(1);
}

static int parse_int(const char *text, int lo, int hi, int *out) {
    char *end;
    long v = strtol(text, &end, 10);
    if (end == text || *end || v < lo || v > hi) return 0;
    *out = (int)v;
    return 1;
}

/* Returns 0 to run, 1 for --help, 2 for a bad option (message in msg). */
static int parse_options(int argc, char **argv, options *o, char *msg, size_t msg_size) {
    *o = (options){.model_config = "L8-C128-V256", .ctx_len = 64, .micro_batch_size = 4,
                   .steps = 15, .warmup = 2, .threads = 1, .micro = {1, 2, 4, 8}, .n_micro_counts = 4,
                   .kinds = {RP_SCHEDULE_GPIPE, RP_SCHEDULE_1F1B}, .n_kinds = 2, .seed = 1,
                   .n_virtual = 2};
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (strcmp(a, "--help") == 0 || strcmp(a, "-h") == 0) return 1;
        if (i + 1 >= argc) {
            snprintf(msg, msg_size, "unknown option or missing value: %s", a);
            return 2;
        }
        const char *v = argv[++i];
        int ok = 1;
        if (strcmp(a, "--model-config") == 0) o->model_config = v;
        else if (strcmp(a, "--stage-layers") == 0) o->stage_layers = v;
        else if (strcmp(a, "--ctx-len") == 0) ok = parse_int(v, 1, 1 << 20, &o->ctx_len);
        else if (strcmp(a, "--micro-batch-seqs") == 0)
            ok = parse_int(v, 1, 1 << 16, &o->micro_batch_size);
        else if (strcmp(a, "--steps") == 0) ok = parse_int(v, 1, MAX_STEPS, &o->steps);
        else if (strcmp(a, "--warmup") == 0) ok = parse_int(v, 0, MAX_STEPS, &o->warmup);
        else if (strcmp(a, "--threads") == 0) ok = parse_int(v, 1, 1024, &o->threads);
        else if (strcmp(a, "--trace") == 0) ok = parse_int(v, 1, MAX_STEPS, &o->trace_m);
        else if (strcmp(a, "--virtual-stages") == 0)
            ok = parse_int(v, 2, RP_SCHEDULE_MAX_VIRTUAL, &o->n_virtual);
        else if (strcmp(a, "--seed") == 0) {
            char *end;
            o->seed = strtoull(v, &end, 10);
            ok = end != v && !*end;
        }
        else if (strcmp(a, "--micro-batches") == 0) {
            char buf[256];
            snprintf(buf, sizeof buf, "%s", v);
            o->n_micro_counts = 0;
            for (char *t = strtok(buf, ","); t && ok; t = strtok(NULL, ",")) {
                ok = o->n_micro_counts < MAX_MICRO_COUNTS &&
                     parse_int(t, 1, RP_SCHEDULE_MAX_MICRO, &o->micro[o->n_micro_counts++]);
            }
            ok = ok && o->n_micro_counts > 0;
        } else if (strcmp(a, "--schedules") == 0) {
            char buf[256];
            snprintf(buf, sizeof buf, "%s", v);
            o->n_kinds = 0;
            for (char *t = strtok(buf, ","); t && ok; t = strtok(NULL, ",")) {
                int k = rp_schedule_kind_from_name(t);
                ok = k >= 0 && o->n_kinds < RP_SCHEDULE_KIND_COUNT;
                if (ok) o->kinds[o->n_kinds++] = k;
            }
            ok = ok && o->n_kinds > 0;
        } else {
            snprintf(msg, msg_size, "unknown option %s", a);
            return 2;
        }
        if (!ok) {
            snprintf(msg, msg_size, "bad value '%s' for %s (see --help)", v, a);
            return 2;
        }
    }
    return 0;
}

/* Random tokens from a 64-bit LCG; targets are the next tokens of each sequence. */
static void fill_tokens(int32_t *inputs, int32_t *targets, int n_seqs, int T, int vocab,
                        unsigned long long seed) {
    unsigned long long s = seed * 6364136223846793005ULL + 1442695040888963407ULL;
    int32_t *row = malloc(sizeof(int32_t) * (size_t)(T + 1));
    if (!row) fatal("cannot allocate the token buffer", NULL);
    for (int b = 0; b < n_seqs; b++) {
        for (int t = 0; t <= T; t++) {
            s = s * 6364136223846793005ULL + 1442695040888963407ULL;
            row[t] = (int32_t)((s >> 33) % (unsigned long long)vocab);
        }
        memcpy(inputs + (size_t)b * T, row, sizeof(int32_t) * (size_t)T);
        memcpy(targets + (size_t)b * T, row + 1, sizeof(int32_t) * (size_t)T);
    }
    free(row);
}

static void format_per_stage(char *out, size_t size, const double *ms, int P, const char *fmt) {
    size_t used = 0;
    out[0] = '\0';
    for (int s = 0; s < P && used < size; s++) {
        if (s) used += (size_t)snprintf(out + used, size - used, " / ");
        if (used < size) used += (size_t)snprintf(out + used, size - used, fmt, ms[s]);
    }
}

/* Collective: gathers every stage's trace of the step just run to rank 0
 * and computes there the critical path through it (critical_path.h).
 * Returns on rank 0 the critical path and, in *span, the traced step's span
 * (seconds); 0 elsewhere. */
enum { TRACE_CAP = 1024 };
static double gather_critical_path(const rp_pipe_trainer *t, int P, double *span) {
    static double flat[5 * TRACE_CAP];
    static double *all;
    static struct rp_pipe_trace_entry *per_stage;
    if (!all && world_rank == 0) {
        all = malloc(sizeof(double) * 5 * TRACE_CAP * (size_t)P);
        per_stage = malloc(sizeof *per_stage * TRACE_CAP * (size_t)P);
        if (!all || !per_stage) fatal("cannot allocate the traces", NULL);
    }
    for (int k = 0; k < TRACE_CAP; k++) {
        const int used = k < t->trace_len;
        flat[5 * k] = used ? t->trace[k].op : -1;
        flat[5 * k + 1] = used ? t->trace[k].micro_batch : -1;
        flat[5 * k + 2] = used ? t->trace[k].start_s : 0;
        flat[5 * k + 3] = used ? t->trace[k].end_s : 0;
        flat[5 * k + 4] = used ? t->trace[k].chunk : 0;
    }
    MPI_Gather(flat, 5 * TRACE_CAP, MPI_DOUBLE, all, 5 * TRACE_CAP, MPI_DOUBLE, 0,
               MPI_COMM_WORLD);
    *span = 0;
    if (world_rank != 0) return 0;
    const struct rp_pipe_trace_entry *lists[RP_GRID_MAX_STAGES];
    int len[RP_GRID_MAX_STAGES];
    for (int s = 0; s < P; s++) {
        struct rp_pipe_trace_entry *e = per_stage + (size_t)s * TRACE_CAP;
        const double *f = all + (size_t)s * 5 * TRACE_CAP;
        len[s] = 0;
        for (int k = 0; k < TRACE_CAP && f[5 * k] >= 0; k++, len[s]++)
            e[k] = (struct rp_pipe_trace_entry){(int)f[5 * k], (int)f[5 * k + 1], f[5 * k + 2],
                                                f[5 * k + 3], (int)f[5 * k + 4]};
        lists[s] = e;
    }
    double cp;
    rp_error err;
    if (rp_pipe_critical_path(lists, len, P, &cp, span, &err) != RP_OK)
        fatal("critical path", &err);
    return cp;
}

int main(int argc, char **argv) {
    MPI_Init(&argc, &argv);
    int P;
    MPI_Comm_rank(MPI_COMM_WORLD, &world_rank);
    MPI_Comm_size(MPI_COMM_WORLD, &P);
    const int root = world_rank == 0;

    options o;
    char msg[256] = "";
    int parsed = parse_options(argc, argv, &o, msg, sizeof msg);
    if (parsed) {
        if (root) {
            if (parsed == 2) fprintf(stderr, "bench_pipeline: %s\n", msg);
            usage(parsed == 1 ? stdout : stderr);
        }
        MPI_Finalize();
        return parsed == 1 ? 0 : 2;
    }

    if (P > RP_GRID_MAX_STAGES) {
        if (root) fprintf(stderr, "bench_pipeline: %d ranks, at most %d stages\n", P,
                          RP_GRID_MAX_STAGES);
        MPI_Finalize();
        return 2;
    }
    rp_error err;
    rp_config cfg;
    if (rp_config_builtin(&cfg, o.model_config, 0, &err) != RP_OK) fatal("--model-config", &err);
    int *layers = calloc((size_t)P, sizeof(int));
    if (!layers) fatal("cannot allocate the partition", NULL);
    if ((o.stage_layers ? rp_partition_parse(o.stage_layers, &cfg, P, layers, &err)
                        : rp_partition_balanced(&cfg, P, layers, &err)) != RP_OK)
        fatal(o.stage_layers ? "--stage-layers" : "partition", &err);
    rp_grid grid;
    if (rp_grid_create(&grid, MPI_COMM_WORLD, P, layers, &err) != RP_OK) fatal("grid", &err);
    my_stage = grid.stage;
    const int lb = grid.layer_begin[grid.stage], le = grid.layer_end[grid.stage];
    rp_backend *be = rp_cpu_backend_create(o.threads, &err);
    if (!be) fatal("CPU backend", &err);
    rp_model model, grads, adam_m, adam_v;
    const int has_embed = lb == 0, has_head = le == cfg.n_layer;
    if (rp_model_alloc(&model, &cfg, lb, le, has_embed, has_head, be, &err) != RP_OK ||
        rp_model_init_official(&model, o.seed, &err) != RP_OK ||
        rp_model_alloc(&grads, &cfg, lb, le, has_embed, has_head, be, &err) != RP_OK ||
        rp_model_alloc(&adam_m, &cfg, lb, le, has_embed, has_head, be, &err) != RP_OK ||
        rp_model_alloc(&adam_v, &cfg, lb, le, has_embed, has_head, be, &err) != RP_OK)
        fatal("model slice", &err);
    /* The interleaved cases' model: the same layers in P x V chunks, chunk c
     * of this stage being model chunk c * P + stage (Megatron's layout). */
    const int V = o.n_virtual;
    int interleaved = 0;
    for (int k = 0; k < o.n_kinds; k++) interleaved |= o.kinds[k] == RP_SCHEDULE_INTERLEAVED;
    rp_model *chunk_models = NULL;  /* [4][V]: weights, gradients, AdamW m and v */
    if (interleaved) {
        if (P < 2) fatal("--schedules interleaved needs 2 or more ranks (stages)", NULL);
        int *chunk_layers = calloc((size_t)P * V, sizeof(int));
        chunk_models = calloc(4 * (size_t)V, sizeof *chunk_models);
        if (!chunk_layers || !chunk_models) fatal("cannot allocate the chunks", NULL);
        if (rp_partition_balanced(&cfg, P * V, chunk_layers, &err) != RP_OK)
            fatal("--virtual-stages: the layers in P x V chunks", &err);
        for (int c = 0; c < V; c++) {
            int b, e;
            rp_interleaved_chunk_layers(chunk_layers, P, V, grid.stage, c, &b, &e);
            for (int k = 0; k < 4; k++)
                if (rp_model_alloc(&chunk_models[k * V + c], &cfg, b, e, b == 0, e == cfg.n_layer,
                                   be, &err) != RP_OK)
                    fatal("interleaved chunk", &err);
            if (rp_model_init_official(&chunk_models[c], o.seed, &err) != RP_OK)
                fatal("interleaved chunk", &err);
        }
        free(chunk_layers);
    }
    rp_transport tp_storage, *tp = NULL;
    if (P > 1) {
        if (rp_transport_init(&tp_storage, grid.pipe_comm, 300.0, &err) != RP_OK)
            fatal("transport", &err);
        tp = &tp_storage;
    }
    rp_optim_config optim;
    rp_optim_defaults(&optim);
    optim.lr_init = optim.lr_final = 1e-5f; /* timing only: keep the weights where they are */
    optim.schedule = RP_LR_CONSTANT;
    optim.warmup_steps = 0;
    optim.total_steps = 1L << 30;
    if (rp_optim_validate(&optim, &err) != RP_OK) fatal("optimizer", &err);

    int max_m = 1;
    for (int i = 0; i < o.n_micro_counts; i++) max_m = o.micro[i] > max_m ? o.micro[i] : max_m;
    const int T = o.ctx_len, S = o.micro_batch_size, R = S * T;
    int32_t *inputs = malloc(sizeof(int32_t) * (size_t)max_m * R);
    int32_t *targets = malloc(sizeof(int32_t) * (size_t)max_m * R);
    if (!inputs || !targets) fatal("cannot allocate the batch", NULL);
    fill_tokens(inputs, targets, max_m * S, T, cfg.vocab_size, o.seed);

    /* rank 0's view of every case: per step, the step time and each stage's busy. */
    /* Interleaved runs M a multiple of P only. */
    int n_cases = 0;
    for (int ki = 0; ki < o.n_kinds; ki++)
        for (int mi = 0; mi < o.n_micro_counts; mi++)
            n_cases += o.kinds[ki] != RP_SCHEDULE_INTERLEAVED || o.micro[mi] % P == 0;
    if (n_cases == 0) fatal("no case to run (interleaved needs M a multiple of P)", NULL);
    double *step_s = malloc(sizeof(double) * (size_t)n_cases * o.steps);
    double *busy_s = malloc(sizeof(double) * (size_t)n_cases * o.steps * P);
    double *update_s = malloc(sizeof(double) * (size_t)n_cases * o.steps * P);
    double *fwd_s = malloc(sizeof(double) * (size_t)n_cases * o.steps * P);
    double *other = malloc(sizeof(double) * (size_t)n_cases);
    /* per step: the critical path of its trace and its efficiency */
    double *crit_s = malloc(sizeof(double) * (size_t)n_cases * o.steps);
    double *eff = malloc(sizeof(double) * (size_t)n_cases * o.steps);
    if (!crit_s || !eff) fatal("cannot allocate the results", NULL);
    if (!step_s || !busy_s || !update_s || !fwd_s || !other) fatal("cannot allocate the results", NULL);

    if (root) {
        char title[256];
        snprintf(title, sizeof title,
                 "bench_pipeline: RWKV-7 %s (L%d C%d V%d, %.2f M parameters), %d stages, "
                 "micro-batch %d x %d tokens, fp32, %d thread%s per rank",
                 o.model_config, cfg.n_layer, cfg.n_embd, cfg.vocab_size,
                 rp_config_param_count(&cfg) / 1e6, P, S, T, o.threads, o.threads == 1 ? "" : "s");
        bench_print_machine(stdout, title);
        printf("- command:");
        for (int i = 0; i < argc; i++) printf(" %s", argv[i]);
        printf(" (under mpirun -np %d)\n", P);
        printf("- partition: ");
        for (int s = 0; s < P; s++)
            printf("%sstage %d layers %d-%d%s%s", s ? ", " : "", s, grid.layer_begin[s],
                   grid.layer_end[s] - 1, s == 0 ? " + embedding" : "",
                   s == P - 1 ? " + head and loss" : "");
        printf("%s\n", o.stage_layers ? " (--stage-layers)" : " (rp_partition_balanced)");
        printf("- per case: %d warm-up steps, then %d timed steps, each after an MPI_Barrier, "
               "taken round-robin over the cases; random tokens (seed %llu), targets = next "
               "tokens\n\n", o.warmup, o.steps, o.seed);
        fflush(stdout);
    }

    /* Every case's trainer lives for the whole run and the timed steps go
     * round-robin over the cases: a slow phase of the shared host (its
     * bandwidth has modes that last seconds, docs/perf/cpu.md) then touches
     * every case alike instead of one case's whole sample. */
    rp_pipe_trainer *trainers = calloc((size_t)n_cases, sizeof *trainers);
    int *case_m = malloc(sizeof(int) * (size_t)n_cases);
    int *case_kind = malloc(sizeof(int) * (size_t)n_cases);
    /* /proc tick deltas per case: machine busy, machine total, this process */
    unsigned long long *ticks = calloc((size_t)n_cases * 3, sizeof *ticks);
    if (!trainers || !case_m || !case_kind || !ticks)
        fatal("cannot allocate the cases", NULL);
    for (int ki = 0, c = 0; ki < o.n_kinds; ki++)
        for (int mi = 0; mi < o.n_micro_counts; mi++) {
            if (o.kinds[ki] == RP_SCHEDULE_INTERLEAVED && o.micro[mi] % P) continue;
            case_m[c] = o.micro[mi];
            case_kind[c] = o.kinds[ki];
            rp_status st =
                case_kind[c] == RP_SCHEDULE_INTERLEAVED
                    ? rp_pipe_trainer_init_interleaved(&trainers[c], chunk_models,
                                                       chunk_models + V, chunk_models + 2 * V,
                                                       chunk_models + 3 * V, V, &grid, tp,
                                                       case_m[c], S, T, &err)
                    : rp_pipe_trainer_init(&trainers[c], &model, &grads, &adam_m, &adam_v, &grid,
                                           tp, (rp_schedule_kind)case_kind[c], case_m[c], S, T,
                                           &err);
            if (st != RP_OK) fatal("pipeline trainer", &err);
            trainers[c].trace = calloc(TRACE_CAP, sizeof *trainers[c].trace);
            trainers[c].trace_cap = TRACE_CAP;
            if (!trainers[c].trace) fatal("cannot allocate the trace", NULL);
            c++;
        }
    long step = 0;
    for (int round = -o.warmup; round < o.steps; round++) {
        for (int c = 0; c < n_cases; c++) {
            const float loss_scale = 1.0f / ((float)case_m[c] * R);
            bench_cpu_sample c0, c1;
            MPI_Barrier(MPI_COMM_WORLD);
            bench_cpu_sample_take(&c0);
            const double t0 = MPI_Wtime();
            rp_pipe_step_result res;
            if (rp_pipe_trainer_step(&trainers[c], inputs, targets, loss_scale,
                                     1e-4f * loss_scale, &optim, step++, &res, &err) != RP_OK)
                fatal("step", &err);
            double mine[4] = {MPI_Wtime() - t0, trainers[c].busy_seconds,
                              trainers[c].update_seconds, trainers[c].fwd_seconds};
            bench_cpu_sample_take(&c1);
            double all[4 * RP_GRID_MAX_STAGES];
            MPI_Gather(mine, 4, MPI_DOUBLE, all, 4, MPI_DOUBLE, 0, MPI_COMM_WORLD);
            double span;
            const double cp = gather_critical_path(&trainers[c], P, &span);
            if (round < 0) continue;
            if (root) {
                crit_s[(size_t)c * o.steps + round] = cp;
                eff[(size_t)c * o.steps + round] = span > 0 ? cp / span : 0;
            }
            if (c0.valid && c1.valid) {
                ticks[3 * c] += c1.machine_busy - c0.machine_busy;
                ticks[3 * c + 1] += c1.machine_total - c0.machine_total;
                ticks[3 * c + 2] += c1.self - c0.self;
            }
            if (!root) continue;
            double wall = 0;
            for (int s = 0; s < P; s++) {
                wall = all[4 * s] > wall ? all[4 * s] : wall;
                busy_s[((size_t)c * o.steps + round) * P + s] = all[4 * s + 1];
                update_s[((size_t)c * o.steps + round) * P + s] = all[4 * s + 2];
                fwd_s[((size_t)c * o.steps + round) * P + s] = all[4 * s + 3];
            }
            step_s[(size_t)c * o.steps + round] = wall;
        }
        if (root && round >= 0) fprintf(stderr, "bench_pipeline: round %d of %d done\n",
                                        round + 1, o.steps);
    }
    /* Other load = machine busy ticks minus every rank's own ticks. */
    unsigned long long *ticks_all = malloc(sizeof *ticks_all * (size_t)n_cases * 3);
    if (!ticks_all) fatal("cannot allocate the results", NULL);
    MPI_Reduce(ticks, ticks_all, 3 * n_cases, MPI_UNSIGNED_LONG_LONG, MPI_SUM, 0, MPI_COMM_WORLD);
    for (int c = 0; root && c < n_cases; c++) {
        /* Every rank read the same machine counters: keep one copy of them. */
        const double busy = (double)ticks_all[3 * c] / P, total = (double)ticks_all[3 * c + 1] / P;
        const double v = total > 0 ? (busy - (double)ticks_all[3 * c + 2]) / total : -1.0;
        other[c] = total > 0 ? (v < 0 ? 0 : v > 1 ? 1 : v) : -1.0;
    }

    if (root) {
        printf("Per step: busy_s = stage s's compute (the executor's busy_seconds: FWD, BWD "
               "and the weight update - gradient zeroing, local gradient norm, AdamW), "
               "update_s = its weight-update part, step = the slowest rank's time from the "
               "barrier to the end of rp_pipe_trainer_step; the table uses their medians over "
               "the timed steps.\n\n"
               "- **bubble** = 1 - sum_s busy_s / (P x step): the share of the stages' time "
               "spent idle, the issue's measure; **theory** = (P-1)/(M+P-1); **diff** = bubble "
               "- theory, percentage points, goal within 3 (interleaved with v chunks per "
               "stage: M reads v x M in theory and pipe_f below, each of its micro-batch "
               "passes being a chunk's)\n"
               "- diff = **imbalance** + **update** + **rest**, from the step a pipeline of "
               "these stages would take: with f_s = busy_s - update_s, pipe_f = sum_s f_s / M + "
               "(M-1) x max_s f_s / M (fill and drain pass every stage once, the steady state "
               "goes at the slowest stage's pace) and pipe = pipe_f + max_s update_s (every "
               "stage updates its weights at the end of the step, at once):\n"
               "  - imbalance = e_f - theory with e_f = 1 - sum_s f_s / (P x pipe_f) (0 when "
               "the stages cost the same, and for M = 1)\n"
               "  - update = e - e_f with e = 1 - sum_s busy_s / (P x pipe): the update is "
               "compute every stage does together, so it lowers the idle share (negative)\n"
               "  - rest = bubble - e: transfers, the latency of the executor's waits, "
               "variation between micro-batches (in ms of step time in brackets)\n"
               "- **pipeline idle** = 1 - sum_s f_s / (P x (step - max_s update_s)): the idle "
               "share of the pipelined phase alone (FWD/BWD against the step without its "
               "update), the quantity (P-1)/(M+P-1) describes; **diff** against theory\n"
               "- **critical path** = the longest path through the step's own trace "
               "(src/pipe/critical_path.h: program order per stage, SEND -> RECV, the "
               "OPT_STEP all-reduce; each instruction weighted by its measured work, waits "
               "excluded); **efficiency** = critical path / traced span of the same step, "
               "median and minimum over the timed steps, goal >= 0.97: what the executor "
               "loses to transfers, polling and bookkeeping, whatever the machine's speed "
               "did to the compute in that step\n\n");
        const char *cols[10] = {"M", "step ms", "busy ms per stage", "update ms per stage",
                                "bubble", "theory", "diff, pts", "imbalance, pts",
                                "update, pts", "rest, pts (ms)"};
        const char *cols_all[16];
        for (int k = 0; k < 10; k++) cols_all[k] = cols[k];
        cols_all[10] = "pipeline idle";
        cols_all[11] = "diff, pts";
        cols_all[12] = "other CPU load";
        cols_all[13] = "FWD ms per stage";
        cols_all[14] = "critical path ms";
        cols_all[15] = "efficiency";
        bench_table_header(stdout, "schedule", cols_all, 16);
        double *stage_s = malloc(sizeof(double) * (size_t)P);
        double *stage_u = malloc(sizeof(double) * (size_t)P);
        double *stage_fwd = malloc(sizeof(double) * (size_t)P);
        double *col = malloc(sizeof(double) * (size_t)o.steps);
        if (!stage_s || !stage_u || !col) fatal("cannot allocate the results", NULL);
        for (int c = 0; c < n_cases; c++) {
            const int il = case_kind[c] == RP_SCHEDULE_INTERLEAVED;
            const int M = case_m[c] * (il ? V : 1);
            double sum = 0, sum_f = 0, max_f = 0, max_u = 0;
            for (int s = 0; s < P; s++) {
                for (int i = 0; i < o.steps; i++)
                    col[i] = busy_s[((size_t)c * o.steps + i) * P + s];
                stage_s[s] = bench_median(col, o.steps);
                for (int i = 0; i < o.steps; i++)
                    col[i] = update_s[((size_t)c * o.steps + i) * P + s];
                stage_u[s] = bench_median(col, o.steps);
                for (int i = 0; i < o.steps; i++)
                    col[i] = fwd_s[((size_t)c * o.steps + i) * P + s];
                stage_fwd[s] = 1e3 * bench_median(col, o.steps);
                const double f = stage_s[s] - stage_u[s];
                sum += stage_s[s];
                sum_f += f;
                max_f = f > max_f ? f : max_f;
                max_u = stage_u[s] > max_u ? stage_u[s] : max_u;
            }
            for (int i = 0; i < o.steps; i++) col[i] = step_s[(size_t)c * o.steps + i];
            const double step_median = bench_median(col, o.steps);
            const double theory = (double)(P - 1) / (M + P - 1);
            const double bubble = 1 - sum / (P * step_median);
            const double pipe_f = sum_f / M + (M - 1) * max_f / M;
            const double pipe = pipe_f + max_u;
            const double e_f = 1 - sum_f / (P * pipe_f);
            const double e = 1 - sum / (P * pipe);
            double ms[RP_GRID_MAX_STAGES], ums[RP_GRID_MAX_STAGES];
            for (int s = 0; s < P; s++) {
                ms[s] = 1e3 * stage_s[s];
                ums[s] = 1e3 * stage_u[s];
            }
            char cells[16][96];
            snprintf(cells[0], 96, "%d", case_m[c]);
            snprintf(cells[1], 96, "%.1f", 1e3 * step_median);
            format_per_stage(cells[2], 96, ms, P, "%.1f");
            format_per_stage(cells[3], 96, ums, P, "%.1f");
            snprintf(cells[4], 96, "%.1f%%", 100 * bubble);
            snprintf(cells[5], 96, "%.1f%%", 100 * theory);
            snprintf(cells[6], 96, "%+.1f %s", 100 * (bubble - theory),
                     fabs(bubble - theory) <= 0.03 ? "✓" : "✗");
            snprintf(cells[7], 96, "%+.1f", 100 * (e_f - theory));
            snprintf(cells[8], 96, "%+.1f", 100 * (e - e_f));
            snprintf(cells[9], 96, "%+.1f (%.1f)", 100 * (bubble - e),
                     1e3 * (step_median - pipe));
            const double idle = 1 - sum_f / (P * (step_median - max_u));
            snprintf(cells[10], 96, "%.1f%%", 100 * idle);
            snprintf(cells[11], 96, "%+.1f %s", 100 * (idle - theory),
                     fabs(idle - theory) <= 0.03 ? "✓" : "✗");
            snprintf(cells[12], 96, other[c] < 0 ? "?" : "%.0f%%%s", 100 * other[c],
                     other[c] > NOISY_OTHER_CPU_FRACTION ? " (noisy: rerun)" : "");
            format_per_stage(cells[13], 96, stage_fwd, P, "%.1f");
            for (int i = 0; i < o.steps; i++) col[i] = crit_s[(size_t)c * o.steps + i];
            snprintf(cells[14], 96, "%.1f", 1e3 * bench_median(col, o.steps));
            double worst = 1;
            for (int i = 0; i < o.steps; i++) {
                col[i] = eff[(size_t)c * o.steps + i];
                worst = col[i] < worst ? col[i] : worst;
            }
            const double eff_median = bench_median(col, o.steps);
            snprintf(cells[15], 96, "%.3f (min %.3f) %s", eff_median, worst,
                     eff_median >= 0.97 ? "✓" : "✗");
            const char *row[16];
            for (int k = 0; k < 16; k++) row[k] = cells[k];
            char name[64];
            snprintf(name, sizeof name, il ? "%s v=%d" : "%s",
                     rp_schedule_kind_name((rp_schedule_kind)case_kind[c]), V);
            bench_table_row(stdout, name, row, 16);
        }
        free(stage_u);
        free(stage_fwd);
        free(stage_s);
        free(col);
    }
    for (int c = 0; c < n_cases && o.trace_m; c++) {
        if (case_m[c] != o.trace_m) continue;
        struct rp_pipe_trace_entry *tr = trainers[c].trace;
        double *flat = malloc(sizeof(double) * 5 * TRACE_CAP);
        double *all = root ? malloc(sizeof(double) * 5 * TRACE_CAP * (size_t)P) : NULL;
        if (!tr || !flat || (root && !all)) fatal("cannot allocate the trace", NULL);
        const float loss_scale = 1.0f / ((float)case_m[c] * R);
        MPI_Barrier(MPI_COMM_WORLD);
        const double t0 = rp_now_seconds();
        rp_pipe_step_result res;
        if (rp_pipe_trainer_step(&trainers[c], inputs, targets, loss_scale, 1e-4f * loss_scale,
                                 &optim, step++, &res, &err) != RP_OK)
            fatal("traced step", &err);
        for (int k = 0; k < TRACE_CAP; k++) {
            const int used = k < trainers[c].trace_len;
            flat[5 * k] = used ? tr[k].op : -1;
            flat[5 * k + 1] = used ? tr[k].micro_batch : -1;
            flat[5 * k + 2] = used ? 1e3 * (tr[k].start_s - t0) : 0;
            flat[5 * k + 3] = used ? 1e3 * (tr[k].end_s - t0) : 0;
            flat[5 * k + 4] = used ? tr[k].chunk : 0;
        }
        MPI_Gather(flat, 5 * TRACE_CAP, MPI_DOUBLE, all, 5 * TRACE_CAP, MPI_DOUBLE, 0,
                   MPI_COMM_WORLD);
        if (root) {
            printf("\n### timeline of one %s step, M = %d (ms from the barrier; instructions "
                   "that took under 0.05 ms left out)\n\n",
                   rp_schedule_kind_name((rp_schedule_kind)case_kind[c]), case_m[c]);
            for (int st = 0; st < P; st++) {
                printf("- stage %d:", st);
                for (int k = 0; k < TRACE_CAP; k++) {
                    const double *e = all + (size_t)st * 5 * TRACE_CAP + 5 * k;
                    if (e[0] < 0) break;
                    if (e[3] - e[2] < 0.05) continue;
                    const int op = (int)e[0];
                    char chunk[16] = "";  /* interleaved: ".c", the stage's chunk */
                    if (case_kind[c] == RP_SCHEDULE_INTERLEAVED)
                        snprintf(chunk, sizeof chunk, ".%.0f", e[4]);
                    printf(" %s%s%.0f%s %.1f-%.1f", k ? "," : "",
                           rp_pipe_opcode_name((rp_pipe_opcode)op), e[1], chunk, e[2], e[3]);
                }
                printf("\n");
            }
        }
        free(flat);
        free(all);
    }
    for (int c = 0; c < n_cases; c++) {
        free(trainers[c].trace);
        rp_pipe_trainer_free(&trainers[c]);
    }
    free(trainers);
    free(case_m);
    free(case_kind);
    free(ticks);
    free(ticks_all);
    free(update_s);
    free(fwd_s);
    free(step_s);
    free(busy_s);
    free(other);
    free(crit_s);
    free(eff);
    free(inputs);
    free(targets);
    if (tp) rp_transport_free(tp);
    rp_model_free(&model);
    rp_model_free(&grads);
    rp_model_free(&adam_m);
    rp_model_free(&adam_v);
    for (int k = 0; chunk_models && k < 4 * V; k++) rp_model_free(&chunk_models[k]);
    free(chunk_models);
    rp_cpu_backend_destroy(be);
    rp_grid_free(&grid);
    free(layers);
    MPI_Finalize();
    return 0;
}
