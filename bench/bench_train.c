/* Training throughput of a ~10M-parameter RWKV-7 on the CPU backend: tokens/s
 * of full optimizer steps (forward, backward, AdamW) and the achieved GFLOP/s
 * (6 x params x tokens/s, plus the WKV recurrence) against the sgemm ceiling
 * measured in the same run, for 1 and 2 threads. Prints one markdown table.
 *   bench/bench_train [--quick] */
#include "config.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bench/harness.h"
#include "bench/train_step.h"
#include "cpu/cpu_backend.h"

int main(int argc, char **argv) {
    int quick = argc > 1 && strcmp(argv[1], "--quick") == 0;
    if (argc > 1 && !quick) {
        fprintf(stderr, "usage: bench/bench_train [--quick]\n");
        return strcmp(argv[1], "--help") == 0 ? 0 : 2;
    }
    rp_config cfg = {.n_layer = 6, .n_embd = 384, .n_head = 6, .head_size = 64,
                     .vocab_size = 256, .dim_ffn = 1536};
    rp_config_default_ranks(&cfg);
    const int B = 8, T = 256, R = B * T;
    const long long params = rp_config_param_count(&cfg);
    /* Weights that take part in a matmul per token: all but the embedding. */
    const long long matmul_params = params - (long long)cfg.vocab_size * cfg.n_embd;
    const double wkv_flops = 40.0 * 64 * 64 * cfg.n_head * cfg.n_layer; /* fwd + bwd, per token */
    const double flops_per_token = 6.0 * matmul_params + wkv_flops;
    bench_timing timing = {quick ? 0.3 : 1.0, quick ? 0.5 : 2.0, quick ? 3 : 5};

    char title[256];
    snprintf(title, sizeof title,
             "bench_train: RWKV-7 L%d C%d V%d (%.2f M parameters), batch %d x %d tokens, fp32",
             cfg.n_layer, cfg.n_embd, cfg.vocab_size, params / 1e6, B, T);
    bench_print_machine(stdout, title);
    printf("- a step = forward + backward (WKV checkpoints every 16 tokens) + clipping + AdamW; "
           "FLOPs per token = 6 x %lld matmul weights + %.2g for WKV7\n\n",
           matmul_params, wkv_flops);

    const char *cols[2] = {"1 thread", "2 threads"};
    char cells[5][2][64];
    for (int ti = 0; ti < 2; ti++) {
        int threads = ti + 1;
        rp_error err;
        rp_backend *be = rp_cpu_backend_create(threads, &err);
        rp_model model, grads, m, v;
        rp_backward_workspace tw;
        rp_state state;
        if (!be || rp_model_alloc(&model, &cfg, 0, cfg.n_layer, 1, 1, be, &err) ||
            rp_model_alloc(&grads, &cfg, 0, cfg.n_layer, 1, 1, be, &err) ||
            rp_model_alloc(&m, &cfg, 0, cfg.n_layer, 1, 1, be, &err) ||
            rp_model_alloc(&v, &cfg, 0, cfg.n_layer, 1, 1, be, &err) ||
            rp_model_init_official(&model, 1, &err) ||
            rp_backward_workspace_alloc(&tw, &model, R, B, &err) ||
            rp_state_alloc_host(&state, &cfg, 0, cfg.n_layer, B, &err)) {
            fprintf(stderr, "bench_train: %s\n", err.msg);
            return 1;
        }
        int32_t *inputs = malloc(R * sizeof(int32_t)), *targets = malloc(R * sizeof(int32_t));
        bench_train_tokens(inputs, targets, R, cfg.vocab_size);
        int seq_len[8], slot[8], row_begin[8];
        rp_batch batch;
        bench_train_batch(&batch, B, T, seq_len, slot, row_begin);
        rp_optim_config optim;
        rp_optim_defaults(&optim);
        bench_train_ctx ctx = {&model, &grads, &m, &v, &tw, &state, &batch, inputs, targets,
                               &optim, 0, "bench_train"};
        bench_cpu_sample s0, s1;
        bench_cpu_sample_take(&s0);
        double sec = bench_seconds_per_call(bench_train_call, &ctx, &timing);
        bench_cpu_sample_take(&s1);
        double sgemm = bench_sgemm_gflops(R, cfg.n_embd, cfg.n_embd, threads, &timing);
        double sgemm_ffn = bench_sgemm_gflops(R, cfg.dim_ffn, cfg.n_embd, threads, &timing);
        double ceiling = (4 * sgemm + 2 * sgemm_ffn * 4) / 12; /* 4 CxC : 8 CxC of FFN */
        double tok_s = R / sec, gflops = flops_per_token * tok_s * 1e-9;
        double other = bench_cpu_other_fraction(&s0, &s1);
        snprintf(cells[0][ti], 64, "%.0f%%", other < 0 ? 0 : 100 * other);
        snprintf(cells[1][ti], 64, "%.0f", tok_s);
        snprintf(cells[2][ti], 64, "%.1f", gflops);
        snprintf(cells[3][ti], 64, "%.1f", ceiling);
        snprintf(cells[4][ti], 64, "%.0f%% %s", 100 * gflops / ceiling,
                 gflops >= 0.5 * ceiling ? "✓" : "✗");
        free(inputs);
        free(targets);
        rp_state_free_host(&state);
        rp_backward_workspace_free(&tw, be);
        rp_model_free(&model);
        rp_model_free(&grads);
        rp_model_free(&m);
        rp_model_free(&v);
        rp_cpu_backend_destroy(be);
    }
    bench_table_header(stdout, "metric", cols, 2);
    const char *labels[5] = {"CPU used by other processes meanwhile", "training tokens/s",
                             "achieved GFLOP/s (6 N + WKV per token)",
                             "sgemm ceiling for the layer mix, GFLOP/s",
                             "achieved / ceiling (goal >= 50%)"};
    for (int r = 0; r < 5; r++) {
        const char *row[2] = {cells[r][0], cells[r][1]};
        bench_table_row(stdout, labels[r], row, 2);
    }
    return 0;
}
