/* Structured-output benchmark (issue 14): decode cost with and without a response_format
 * mask, the engine driven directly (no HTTP), one process, random weights, the World
 * vocabulary. Per shape: ms per generated token unmasked, with json_object and with a JSON
 * schema (several documents, different seeds, so the per-slot mask cache warms as a server's
 * does), and the ratio masked / unmasked (goal <= 1.10).
 * usage: bench/bench_json [--model-config 0.1b] [--threads N] [--vocab FILE]
 *        [--decode-tokens N] [--documents N] */
#include <getopt.h>
#include <mpi.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "backend.h"
#include "bench/harness.h"
#include "core/clock.h"
#include "cpu/cpu_backend.h"
#include "infer/engine.h"
#include "model/init.h"
#include "text/json_mask.h"

static void die(const char *what, const rp_error *err) {
    fprintf(stderr, "bench_json: %s: %s\n", what, err ? err->msg : "");
    exit(1);
}

static const char *SCHEMA =
    "{\"type\":\"object\",\"properties\":{\"name\":{\"type\":\"string\",\"maxLength\":24},"
    "\"age\":{\"type\":\"integer\"},\"kind\":{\"enum\":[\"cat\",\"dog\",\"fish\"]},"
    "\"tags\":{\"type\":\"array\",\"items\":{\"type\":\"string\",\"maxLength\":8},\"maxItems\":4},"
    "\"owner\":{\"type\":\"object\",\"properties\":{\"id\":{\"type\":\"integer\"},"
    "\"note\":{\"type\":\"string\"}},\"required\":[\"id\",\"note\"]}},"
    "\"required\":[\"name\",\"age\",\"kind\",\"tags\",\"owner\"]}";

/* Runs `docs` jobs one after another; returns ms per generated token (decode only) and the
 * tokens generated, and how many ended with a complete document (finish stop). */
static double run(rp_engine *e, const rp_gen_params *gp, int docs, long *tokens, int *stopped) {
    rp_error err;
    double decode_s = 0;
    *tokens = 0;
    *stopped = 0;
    for (int d = 0; d < docs; d++) {
        rp_gen_params p = *gp;
        p.sampler.seed = (uint64_t)d + 1;
        int32_t prompt[16];
        for (int k = 0; k < 16; k++) prompt[k] = (int32_t)(1000 + k * 37 + d);
        rp_job *j = rp_job_create(prompt, 16, &p, NULL, NULL, &err);
        if (!j || rp_engine_submit(e, j, &err) != RP_OK) die("submit", &err);
        rp_finish_reason f = RP_FINISH_NONE;
        while (f == RP_FINISH_NONE) {
            rp_status st;
            rp_engine_step(e, &err, &st);
            if (st != RP_OK) die("step", &err);
            int32_t buf[256];
            while (rp_job_read(j, buf, 256, 0, &f) > 0) {
            }
        }
        if (f == RP_FINISH_ERROR) {
            char msg[512];
            rp_job_error(j, msg, sizeof msg);
            fprintf(stderr, "bench_json: job failed: %s\n", msg);
            exit(1);
        }
        rp_job_stats st;
        rp_job_get_stats(j, &st);
        if (st.completion_tokens > 1 && st.decode_tokens_per_second > 0) {
            decode_s += (st.completion_tokens - 1) / st.decode_tokens_per_second;
            *tokens += st.completion_tokens - 1;
        }
        *stopped += f == RP_FINISH_STOP;
        rp_job_release(j);
    }
    return *tokens ? decode_s * 1e3 / (double)*tokens : 0;
}

int main(int argc, char **argv) {
    MPI_Init(&argc, &argv);
    const char *config_name = "0.1b", *vocab = NULL;
    int threads = 0, decode_tokens = 64, docs = 8;
    static const struct option opts[] = {{"model-config", required_argument, 0, 'c'},
                                         {"threads", required_argument, 0, 't'},
                                         {"vocab", required_argument, 0, 'v'},
                                         {"decode-tokens", required_argument, 0, 'd'},
                                         {"documents", required_argument, 0, 'n'},
                                         {"help", no_argument, 0, 'h'},
                                         {0, 0, 0, 0}};
    int ch;
    while ((ch = getopt_long(argc, argv, "h", opts, NULL)) != -1) {
        switch (ch) {
        case 'c': config_name = optarg; break;
        case 't': threads = atoi(optarg); break;
        case 'v': vocab = optarg; break;
        case 'd': decode_tokens = atoi(optarg); break;
        case 'n': docs = atoi(optarg); break;
        case 'h':
            printf("usage: bench_json [--model-config 0.1b] [--threads N] [--vocab FILE]\n"
                   "       [--decode-tokens N] [--documents N]\n");
            MPI_Finalize();
            return 0;
        default: MPI_Finalize(); return 2;
        }
    }
    char path[4096];
    if (!vocab) {
        const char *dir = getenv("RP_SHARED_DIR");
        snprintf(path, sizeof path, "%s/vocab/rwkv_vocab_v20230424.txt", dir ? dir : "../shared");
        vocab = path;
    }
    rp_error err;
    rp_tokenizer *tok;
    rp_token_trie *trie;
    if (rp_tokenizer_open(&tok, vocab, &err) != RP_OK) die("vocab (--vocab FILE)", &err);
    if (rp_token_trie_build(&trie, tok, &err) != RP_OK) die("trie", &err);
    rp_config cfg;
    if (rp_config_builtin(&cfg, config_name, 0, &err) != RP_OK) die("config", &err);
    if (cfg.vocab_size < rp_tokenizer_n_ids(tok)) die("the model's vocabulary is smaller than the tokenizer's", NULL);
    rp_backend *be = rp_cpu_backend_create(threads, &err);
    if (!be) die("backend", &err);
    rp_model m;
    if (rp_model_alloc(&m, &cfg, 0, cfg.n_layer, 1, 1, be, &err) != RP_OK ||
        rp_model_init_official(&m, 1, &err) != RP_OK)
        die("model", &err);
    rp_engine_config ec;
    rp_engine_config_defaults(&ec);
    ec.n_slots = 1;
    rp_engine *e;
    if (rp_engine_create(&e, &m, NULL, &ec, &err) != RP_OK) die("engine", &err);
    rp_engine_set_vocab(e, trie);

    bench_print_machine(stdout, "bench_json: decode with and without a response_format mask");
    printf("model %s (%.1f M parameters, random weights), World vocabulary (%d ids), %d thread%s, "
           "%d documents of at most %d tokens per row, temperature 1, top_p 0.85\n\n",
           config_name, rp_config_param_count(&cfg) / 1e6, rp_tokenizer_n_ids(tok),
           threads ? threads : omp_get_max_threads(), threads == 1 ? "" : "s", docs, decode_tokens);
    printf("| response_format | tokens | complete documents | ms / token | vs none |\n"
           "|---|---:|---:|---:|---:|\n");
    rp_gen_params gp;
    rp_gen_params_defaults(&gp);
    gp.max_tokens = decode_tokens;
    gp.stop_tokens[0] = rp_tokenizer_eot_id(tok);
    gp.n_stop_tokens = 1;
    static const char *names[] = {"none", "json_object", "json_schema (nested, enum, array, limits)"};
    double base = 0;
    for (int r = 0; r < 3; r++) {
        rp_gen_params p = gp;
        p.grammar = r;
        p.grammar_schema = r == RP_GRAMMAR_JSON_SCHEMA ? SCHEMA : NULL;
        long tokens;
        int stopped;
        run(e, &p, 1, &tokens, &stopped); /* warm-up */
        double ms = run(e, &p, docs, &tokens, &stopped);
        if (r == 0) base = ms;
        printf("| %s | %ld | %d of %d | %.3f | %.3fx |\n", names[r], tokens, r ? stopped : 0, docs, ms,
               base > 0 ? ms / base : 0);
        fflush(stdout);
    }
    rp_engine_shutdown(e);
    if (rp_engine_run(e, &err) != RP_OK) die("shutdown", &err);
    rp_engine_free(e);
    rp_model_free(&m);
    rp_backend_destroy(be);
    rp_token_trie_free(trie);
    rp_tokenizer_free(tok);
    MPI_Finalize();
    return 0;
}
