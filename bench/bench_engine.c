/* Serving engine benchmark (issue 5): the engine of `rwkvpipe serve` driven
 * directly (no HTTP), one process or mpirun -np P with the layers over P
 * stages. Two tables:
 *   1. decode throughput against the number of concurrent sequences, next
 *      to the sgemm ceiling of the shape (one pass of the model's matrices
 *      at M = 64 through cblas_sgemm on the same threads, as tokens/s);
 *   2. per-token decode latency against the context length already read
 *      (the RNN promise: flat), with the state memory per sequence.
 * usage: [mpirun -np P] bench/bench_engine [--model-config NAME | --model FILE]
 *        [--weights-dtype f32|bf16|int8] [--threads N]
 *        [--contexts 512,2048,8192,32768] [--concurrency 1,4,16,64]
 *        [--decode-tokens N] [--max-batch N] [--prefill-turn-rows N]
 *        [--prefill-prompts N] */
#include <cblas.h>
#include <getopt.h>
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bench/harness.h"
#include <omp.h>

#include "backend.h"
#include "cpu/cpu_backend.h"
#include "model/init.h"
#include "pipe/grid.h"
#include "infer/engine.h"
#include "core/clock.h"
#include "core/safetensors.h"
#include "model/model.h"

static int rank, size;

static void die(const char *what, const rp_error *err) {
    fprintf(stderr, "bench_engine [rank %d]: %s: %s\n", rank, what, err ? err->msg : "");
    MPI_Abort(MPI_COMM_WORLD, 1);
}

static int parse_list(const char *text, int *out, int max) {
    int n = 0;
    for (const char *p = text; *p && n < max;) {
        char *end;
        long v = strtol(p, &end, 10);
        if (end == p || v < 1) die("bad list", NULL);
        out[n++] = (int)v;
        p = *end == ',' ? end + 1 : end;
    }
    return n;
}

/* Runs jobs to completion; returns the seconds from submit to the last token. */
static double run_jobs(rp_engine *e, rp_job **jobs, int n) {
    rp_error err;
    const double t0 = rp_now_seconds();
    for (int i = 0; i < n; i++)
        if (rp_engine_submit(e, jobs[i], &err) != RP_OK) die("submit", &err);
    for (int done = 0; done < n;) {
        rp_status st;
        rp_engine_step(e, &err, &st);
        if (st != RP_OK) die("step", &err);
        done = 0;
        for (int i = 0; i < n; i++) {
            int32_t buf[256];
            rp_finish_reason f;
            while (rp_job_read(jobs[i], buf, 256, 0, &f) > 0) {
            }
            done += f != RP_FINISH_NONE;
        }
    }
    return rp_now_seconds() - t0;
}

/* One matrix of the ceiling pass: y [M,N] = x [M,K] . op(W). */
typedef struct {
    float *w;
    int N, K, lora; /* lora: W [K,N], else W [N,K] */
} ceil_matrix;

/* Tokens per second of one pass of every matrix of cfg (all layers and the
 * head) over M rows through cblas_sgemm, the columns of each split over the
 * OpenMP team as the CPU backend splits prefill (single-threaded BLAS per
 * thread): what a decode step of M sequences would cost at sgemm speed.
 * The best of several passes, after a warm-up. */
static double sgemm_ceiling(const rp_config *cfg, int M, int threads) {
    const int C = cfg->n_embd, F = cfg->dim_ffn;
    const int lora_n[4] = {cfg->d_decay, cfg->d_iclr, cfg->d_value, cfg->d_gate};
    const int per_layer = 6 + 8;
    const int n_mat = cfg->n_layer * per_layer + 1;
    ceil_matrix *mats = calloc((size_t)n_mat, sizeof *mats);
    int n = 0, maxk = cfg->vocab_size, maxn = cfg->vocab_size;
    for (int l = 0; l < cfg->n_layer; l++) {
        for (int i = 0; i < 4; i++) mats[n++] = (ceil_matrix){NULL, C, C, 0}; /* r k v o */
        mats[n++] = (ceil_matrix){NULL, F, C, 0};                             /* ffn key */
        mats[n++] = (ceil_matrix){NULL, C, F, 0};                             /* ffn value */
        for (int i = 0; i < 4; i++) {
            mats[n++] = (ceil_matrix){NULL, lora_n[i], C, 1}; /* down: [C, D] */
            mats[n++] = (ceil_matrix){NULL, C, lora_n[i], 1}; /* up: [D, C] */
        }
    }
    mats[n++] = (ceil_matrix){NULL, cfg->vocab_size, C, 0}; /* head */
    for (int i = 0; i < n; i++) {
        const size_t sz = (size_t)mats[i].N * mats[i].K;
        mats[i].w = malloc(sz * sizeof(float));
        if (!mats[i].w) die("sgemm ceiling: out of memory", NULL);
        for (size_t k = 0; k < sz; k++) mats[i].w[k] = (float)((k * 2654435761u) % 1000) * 2e-5f - 0.01f;
    }
    if (F > maxk) maxk = F;
    float *x = malloc(sizeof(float) * (size_t)M * maxk), *y = malloc(sizeof(float) * (size_t)M * maxn);
    if (!x || !y) die("sgemm ceiling: out of memory", NULL);
    for (size_t k = 0; k < (size_t)M * maxk; k++) x[k] = (float)(k % 97) * 1e-3f;
    const int nt = threads > 0 ? threads : omp_get_max_threads();
    double best = 1e30;
    const double t_start = rp_now_seconds();
    for (int pass = 0; pass < 12 && (pass < 3 || rp_now_seconds() - t_start < 2.0); pass++) {
        const double t0 = rp_now_seconds();
        for (int i = 0; i < n; i++) {
            const ceil_matrix *q = &mats[i];
#pragma omp parallel num_threads(nt)
            {
                const int parts = omp_get_num_threads(), part = omp_get_thread_num();
                int chunk = (q->N + parts - 1) / parts;
                chunk = (chunk + 15) / 16 * 16;
                const int b = chunk * part < q->N ? chunk * part : q->N;
                const int e = b + chunk < q->N ? b + chunk : q->N;
                if (e > b) {
                    if (q->lora)
                        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, M, e - b, q->K,
                                    1.0f, x, q->K, q->w + b, q->N, 0.0f, y + b, q->N);
                    else
                        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, M, e - b, q->K,
                                    1.0f, x, q->K, q->w + (size_t)b * q->K, q->K, 0.0f, y + b,
                                    q->N);
                }
            }
        }
        const double t = rp_now_seconds() - t0;
        if (pass > 0 && t < best) best = t; /* pass 0: warm-up */
    }
    for (int i = 0; i < n; i++) free(mats[i].w);
    free(mats);
    free(x);
    free(y);
    return M / best;
}

int main(int argc, char **argv) {
    MPI_Init(&argc, &argv);
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &size);
    const char *config_name = "L6-C512-V65536";
    const char *model_path = NULL; /* weights from a file instead of the official init */
    int wtype = -1;                /* --weights-dtype: the file's own format unless given */
    int threads = 0, decode_tokens = 64, max_batch = 0, turn_rows = 0, prefill_prompts = 0;
    int contexts[16] = {512, 2048, 8192, 32768}, n_contexts = 4;
    int conc[16] = {1, 4, 16, 64}, n_conc = 4;
    static const struct option opts[] = {{"model-config", required_argument, 0, 'c'},
                                         {"model", required_argument, 0, 'm'},
                                         {"weights-dtype", required_argument, 0, 'w'},
                                         {"threads", required_argument, 0, 't'},
                                         {"contexts", required_argument, 0, 'x'},
                                         {"concurrency", required_argument, 0, 'n'},
                                         {"decode-tokens", required_argument, 0, 'd'},
                                         {"max-batch", required_argument, 0, 'b'},
                                         {"prefill-turn-rows", required_argument, 0, 'p'},
                                         {"prefill-prompts", required_argument, 0, 'q'},
                                         {"help", no_argument, 0, 'h'},
                                         {0, 0, 0, 0}};
    int ch;
    while ((ch = getopt_long(argc, argv, "h", opts, NULL)) != -1) {
        switch (ch) {
        case 'c': config_name = optarg; break;
        case 'm': model_path = optarg; break;
        case 'w':
            if (!strcmp(optarg, "f32")) wtype = RP_WEIGHTS_F32;
            else if (!strcmp(optarg, "bf16")) wtype = RP_WEIGHTS_BF16;
            else if (!strcmp(optarg, "int8")) wtype = RP_WEIGHTS_INT8;
            else die("--weights-dtype is not f32, bf16 or int8", NULL);
            break;
        case 't': threads = atoi(optarg); break;
        case 'x': n_contexts = parse_list(optarg, contexts, 16); break;
        case 'n': n_conc = parse_list(optarg, conc, 16); break;
        case 'd': decode_tokens = atoi(optarg); break;
        case 'b': max_batch = atoi(optarg); break;
        case 'p': turn_rows = atoi(optarg); break;
        case 'q': prefill_prompts = atoi(optarg); break;
        case 'h':
            if (rank == 0)
                printf("usage: [mpirun -np P] bench_engine [--model-config NAME | --model FILE]\n"
                       "       [--weights-dtype f32|bf16|int8] [--threads N]\n"
                       "       [--contexts 512,2048,...] [--concurrency 1,4,16,64]\n"
                       "       [--decode-tokens N] [--max-batch N] [--prefill-turn-rows N]\n"
                       "       [--prefill-prompts N]\n");
            MPI_Finalize();
            return 0;
        default: MPI_Finalize(); return 2;
        }
    }
    rp_error err;
    rp_config cfg;
    if (model_path) {
        rp_st_file f;
        rp_naming naming;
        if (rp_st_open(&f, model_path, &err) != RP_OK) die("--model", &err);
        rp_status st = rp_config_from_safetensors(&f, &cfg, &naming, &err);
        rp_st_close(&f);
        if (st != RP_OK) die("--model", &err);
        config_name = model_path;
    } else if (wtype >= 0) {
        die("--weights-dtype needs --model FILE (the official init is f32)", NULL);
    } else if (rp_config_builtin(&cfg, config_name, 0, &err) != RP_OK) {
        die("config", &err);
    }
    rp_grid grid, *g = NULL;
    int begin = 0, end = cfg.n_layer;
    if (size > 1) {
        int layers[64];
        if (rp_partition_balanced(&cfg, size, layers, &err) != RP_OK ||
            rp_grid_create(&grid, MPI_COMM_WORLD, size, layers, &err) != RP_OK)
            die("grid", &err);
        g = &grid;
        begin = grid.layer_begin[grid.stage];
        end = grid.layer_end[grid.stage];
    }
    rp_backend *be = rp_cpu_backend_create(threads, &err);
    if (!be) die("backend", &err);
    rp_model m;
    if (model_path) {
        rp_load_options lo = {.wtype = wtype, .for_training = 0};
        if (rp_model_load_as(&m, model_path, begin, end, &lo, be, &err) != RP_OK)
            die("model", &err);
    } else if (rp_model_alloc(&m, &cfg, begin, end, begin == 0, end == cfg.n_layer, be, &err) !=
                   RP_OK ||
               rp_model_init_official(&m, 1, &err) != RP_OK) {
        die("model", &err);
    }
    int max_conc = 1;
    for (int i = 0; i < n_conc; i++) max_conc = conc[i] > max_conc ? conc[i] : max_conc;
    rp_engine_config ec;
    rp_engine_config_defaults(&ec);
    ec.n_slots = max_conc;
    ec.threads = threads; /* the sampler's threads too (0: OpenMP's default, as the backend) */
    ec.max_queue = max_conc;
    ec.max_batch = max_batch;
    ec.prefill_turn_rows = turn_rows; /* 1: one prefill unit per decode unit (the old turns) */
    ec.prefill_prompts = prefill_prompts; /* 1: one prompt per prefill unit (the old units) */
    rp_engine *e;
    if (rp_engine_create(&e, &m, g, &ec, &err) != RP_OK) die("engine", &err);
    if (rank != 0) {
        if (rp_engine_run(e, &err) != RP_OK) die("run", &err);
        rp_engine_free(e);
        MPI_Finalize();
        return 0;
    }
    bench_print_machine(stdout, "bench_engine: the serving engine without HTTP");
    static const char *const wnames[] = {"f32", "bf16", "int8"};
    printf("model %s (%.1f M parameters, %s matrices), %d pipeline stage%s, %d thread%s per "
           "rank\n",
           config_name, rp_config_param_count(&cfg) / 1e6, wnames[m.wtype], size,
           size == 1 ? "" : "s", threads ? threads : omp_get_max_threads(),
           threads == 1 ? "" : "s");
    rp_gen_params gp;
    rp_gen_params_defaults(&gp);
    gp.sampler.temperature = 0;
    gp.max_tokens = decode_tokens;

    /* The ceiling covers the whole model (every stage's layers) on this
     * rank's threads. */
    const int ceil_m = 64;
    const double ceiling = sgemm_ceiling(&cfg, ceil_m, threads);
    printf("\nsgemm ceiling: %.1f tok/s (one cblas_sgemm pass of every matrix at M = %d, "
           "%d thread%s)\ndecode groups: up to %d sequences (--max-batch; backend default %d)\n",
           ceiling, ceil_m, threads ? threads : omp_get_max_threads(), threads == 1 ? "" : "s",
           rp_engine_group_size(max_batch, be), rp_engine_group_size(0, be));
    printf("prefill turns: %d rows of prefill between decode units (--prefill-turn-rows; "
           "1: one prefill unit each)\n", turn_rows > 0 ? turn_rows : ec.prefill_chunk);
    printf("prefill units: up to %d prompts each (--prefill-prompts; 0: the decode group; "
           "1: one each; one where prefill rows are not exact rows)\n",
           prefill_prompts > 0 ? prefill_prompts : rp_engine_group_size(max_batch, be));
    printf("\n### decode throughput vs concurrent sequences (16-token prompts, %d new tokens "
           "each)\n\n| sequences | seconds | generated tok/s | per sequence tok/s | of sgemm "
           "ceiling | mean decode group | prompts per prefill unit |\n"
           "|---:|---:|---:|---:|---:|---:|---:|\n", decode_tokens);
    double rate16 = 0, rate64 = 0;
    for (int c = 0; c < n_conc; c++) {
        rp_job **jobs = calloc((size_t)conc[c], sizeof *jobs);
        for (int i = 0; i < conc[c]; i++) {
            int32_t prompt[16];
            for (int k = 0; k < 16; k++) prompt[k] = (int32_t)((i * 31 + k * 7 + 1) % cfg.vocab_size);
            jobs[i] = rp_job_create(prompt, 16, &gp, NULL, NULL, &err);
        }
        rp_engine_metrics m0, m1;
        rp_engine_get_metrics(e, &m0);
        double s = run_jobs(e, jobs, conc[c]);
        rp_engine_get_metrics(e, &m1);
        /* sequences per decode unit: how far the group grows towards conc[c] */
        const long units = m1.decode_units - m0.decode_units;
        const double mean_group = units > 0 ? (double)(m1.decode_rows - m0.decode_rows) / units : 0;
        const long pf_units = m1.prefill_units - m0.prefill_units;
        const double mean_prompts =
            pf_units > 0 ? (double)(m1.prefill_seqs - m0.prefill_seqs) / pf_units : 0;
        long total = 0;
        for (int i = 0; i < conc[c]; i++) {
            rp_job_stats st;
            rp_job_get_stats(jobs[i], &st);
            total += st.completion_tokens;
            rp_job_release(jobs[i]);
        }
        free(jobs);
        printf("| %d | %.2f | %.1f | %.1f | %.0f%% | %.1f | %.1f |\n", conc[c], s, total / s,
               total / s / conc[c], 100.0 * total / s / ceiling, mean_group, mean_prompts);
        if (conc[c] == 16) rate16 = total / s;
        if (conc[c] == 64) rate64 = total / s;
        fflush(stdout);
    }

    if (rate64 > 0)
        printf("\n64 sequences: %.2f of the sgemm ceiling (goal >= 0.5)", rate64 / ceiling);
    if (rate64 > 0 && rate16 > 0)
        printf("; %.2fx the 16-sequence rate (goal >= 1.5)", rate64 / rate16);
    if (rate64 > 0) printf("\n");

    const double state_bytes = (double)cfg.n_layer *
                               (2.0 * cfg.n_embd + (double)cfg.n_head * 64 * 64) * 4;
    printf("\n### per-token decode latency vs context length (one sequence; %d decode tokens "
           "after a prompt of N tokens)\n\n| context | prefill s | prefill tok/s | decode ms/token "
           "| state bytes per sequence |\n|---:|---:|---:|---:|---:|\n", decode_tokens);
    double first_latency = 0, last_latency = 0;
    for (int c = 0; c < n_contexts; c++) {
        int n = contexts[c];
        int32_t *prompt = malloc(sizeof(int32_t) * (size_t)n);
        for (int k = 0; k < n; k++) prompt[k] = (int32_t)((k * 7919 + 13) % cfg.vocab_size);
        rp_job *j = rp_job_create(prompt, n, &gp, NULL, NULL, &err);
        run_jobs(e, &j, 1);
        rp_job_stats st;
        rp_job_get_stats(j, &st);
        double ms = st.decode_tokens_per_second > 0 ? 1000.0 / st.decode_tokens_per_second : 0;
        printf("| %d | %.2f | %.0f | %.3f | %.0f |\n", n, st.first_token_seconds,
               n / st.first_token_seconds, ms, state_bytes);
        fflush(stdout);
        if (c == 0) first_latency = ms;
        last_latency = ms;
        rp_job_release(j);
        free(prompt);
    }
    if (n_contexts > 1)
        printf("\nlatency(%d) / latency(%d) = %.3f (goal <= 1.05)\n", contexts[n_contexts - 1],
               contexts[0], last_latency / first_latency);
    rp_engine_shutdown(e);
    if (rp_engine_run(e, &err) != RP_OK) die("shutdown", &err);
    rp_engine_free(e);
    MPI_Finalize();
    return 0;
}
