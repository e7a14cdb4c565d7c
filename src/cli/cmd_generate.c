/* rwkvpipe generate: prompt -> streamed text, through the same engine as
 * `rwkvpipe serve` (src/infer/engine.h): prefill in sequence mode, then one
 * token per step, in one process or with the layers split over --pp ranks.
 * Bytes reach stdout as soon as they form whole UTF-8 characters, and never a
 * part of the stop string. */
#include <getopt.h>
#include <mpi.h>
#include <stdlib.h>
#include <string.h>

#include "cli/cli.h"
#include "text/stream.h"
#include "text/tokenizer.h"
#include "model/init.h"
#include "pipe/grid.h"
#include "infer/engine.h"

static void generate_usage(FILE *out) {
    fprintf(out,
            "usage: rwkvpipe generate (--model M.safetensors | --model-config NAME)\n"
            "                         (--prompt TEXT | --prompt-file F) [options]\n"
            "Generates text after the prompt and streams it to standard output.\n"
            "Model:\n"
            "  --model FILE          safetensors weights (official or HF/fla names;\n"
            "                        convert .pth files with rwkvpipe-convert)\n"
            "  --model-config NAME   a built-in shape with the official init instead: %s\n"
            "  --init-seed S         seed of that init (default 1)\n"
            "  --vocab V             'bytes' or a World vocabulary file; default 'bytes'\n"
            "                        for models with at most 256 tokens\n"
            "Prompt:\n"
            "  --prompt TEXT         the prompt\n"
            "  --prompt-file FILE    read it from a file ('-' = stdin)\n"
            "Sampling (rwkv pip package order: top-p, top-k, then temperature):\n"
            "  --max-tokens N        tokens to generate (default 200)\n"
            "  --temperature T       0 = greedy (default 1.0)\n"
            "  --top-p P             nucleus mass in (0, 1] (default 0.85)\n"
            "  --top-k K             0 = off (default 0)\n"
            "  --seed S              sampling seed (default 42): same seed, same text\n"
            "  --stop STR            stop before this string (1-256 bytes) is printed\n"
            "  --ban-eot             never sample the end-of-text token 0 (default: stop\n"
            "                        when it is sampled)\n"
            "  --presence-penalty X  ChatRWKV repetition penalties (default 0 / 0;\n"
            "  --frequency-penalty X   decay per token --penalty-decay, default 0.996)\n"
            "  --penalty-decay X\n"
            "Execution:\n"
            "  --threads N           CPU threads (default: all / ranks on the node)\n"
            CLI_DEVICE_HELP
            CLI_WEIGHTS_HELP
            "  --chunk N             prompt tokens per sequence-mode call (default 256)\n"
            "  --pp P                split the layers over P pipeline stages (run under\n"
            "                        mpirun -np P); the text is the same as one process's\n"
            "  --stage-layers LIST   layers per stage (default: balanced by decode cost)\n"
            "  -q, --quiet           no progress or speed report on stderr\n"
            "  -h, --help            this text\n",
            rp_config_builtin_names());
}

typedef struct {
    const rp_tokenizer *tok;
    rp_text_stream text;  /* stop string and UTF-8 hold-back, shared with serve */
} stream_state;

/* Prints what the stream released; generate shows the model's bytes as they
 * are (keep_invalid), serve sanitizes them for JSON. */
static void print_released(stream_state *s) {
    size_t n;
    const char *t = rp_text_stream_take(&s->text, &n);
    if (n) {
        fwrite(t, 1, n, stdout);
        fflush(stdout);
    }
}

/* Returns 1 when a stop string has appeared (nothing of it is printed). */
static int on_token(int32_t token, stream_state *s) {
    size_t n;
    const uint8_t *bytes = rp_tokenizer_token_bytes(s->tok, token, &n);
    if (!bytes) return 0;  /* padding ids beyond the vocab decode to nothing */
    int r = rp_text_stream_push(&s->text, bytes, n);
    print_released(s);
    return r == 1;
}

int cmd_generate(rp_cli *cli, int argc, char **argv) {
    static const struct option longopts[] = {
        {"model", required_argument, 0, 'm'},      {"model-config", required_argument, 0, 'c'},
        {"init-seed", required_argument, 0, 'I'},  {"vocab", required_argument, 0, 'v'},
        {"prompt", required_argument, 0, 'p'},     {"prompt-file", required_argument, 0, 'P'},
        {"max-tokens", required_argument, 0, 'n'}, {"temperature", required_argument, 0, 'T'},
        {"top-p", required_argument, 0, 'u'},      {"top-k", required_argument, 0, 'k'},
        {"seed", required_argument, 0, 's'},       {"stop", required_argument, 0, 'S'},
        {"ban-eot", no_argument, 0, 'B'},          {"threads", required_argument, 0, 'j'},
        {"device", required_argument, 0, 1001},
        {"weights-dtype", required_argument, 0, 1009},   {"gpu-math", required_argument, 0, 1002},
        {"chunk", required_argument, 0, 'C'},      {"quiet", no_argument, 0, 'q'},
        {"pp", required_argument, 0, 'N'},         {"stage-layers", required_argument, 0, 'L'},
        {"presence-penalty", required_argument, 0, 'a'},
        {"frequency-penalty", required_argument, 0, 'f'},
        {"penalty-decay", required_argument, 0, 'd'},
        {"help", no_argument, 0, 'h'},             {0, 0, 0, 0}};
    cli_model_options mo = {.init_seed = 1, .for_decode = 1};
    const char *vocab = NULL, *prompt = NULL, *prompt_file = NULL, *stop = NULL;
    rp_gen_params gp;
    rp_gen_params_defaults(&gp);
    gp.max_tokens = 200;
    gp.penalty_decay = 0.996f;
    int chunk = 256, pp = 1;
    const char *stage_layers = NULL;
    int ban_eot = 0, quiet = 0;
    int c;
    optind = 1;
    while ((c = getopt_long(argc, argv, "hq", longopts, NULL)) != -1) {
        switch (c) {
        case 'm': mo.model_path = optarg; break;
        case 'c': mo.config_name = optarg; break;
        case 'I': mo.init_seed = cli_parse_u64(cli, "--init-seed", optarg); break;
        case 'v': vocab = optarg; break;
        case 'p': prompt = optarg; break;
        case 'P': prompt_file = optarg; break;
        case 'n': gp.max_tokens = (int)cli_parse_int(cli, "--max-tokens", optarg, 0, 1 << 30); break;
        case 'T': gp.sampler.temperature = (float)cli_parse_double(cli, "--temperature", optarg, 0, 100); break;
        case 'u': gp.sampler.top_p = (float)cli_parse_double(cli, "--top-p", optarg, 1e-9, 1); break;
        case 'k': gp.sampler.top_k = (int)cli_parse_int(cli, "--top-k", optarg, 0, 1 << 24); break;
        case 's': gp.sampler.seed = cli_parse_u64(cli, "--seed", optarg); break;
        case 'a': gp.presence_penalty = (float)cli_parse_double(cli, "--presence-penalty", optarg, -10, 10); break;
        case 'f': gp.frequency_penalty = (float)cli_parse_double(cli, "--frequency-penalty", optarg, -10, 10); break;
        case 'd': gp.penalty_decay = (float)cli_parse_double(cli, "--penalty-decay", optarg, 0, 1); break;
        case 'N': pp = (int)cli_parse_int(cli, "--pp", optarg, 1, RP_GRID_MAX_STAGES); break;
        case 'L': stage_layers = optarg; break;
        case 'S': stop = optarg; break;
        case 'B': ban_eot = 1; break;
        case 'j': mo.threads = (int)cli_parse_int(cli, "--threads", optarg, 1, 4096); break;
        case 1001: cli_parse_device(cli, &mo, optarg); break;
        case 1009: cli_parse_weights_dtype(cli, &mo, optarg); break;
        case 1002: cli_parse_gpu_math(cli, &mo, optarg); break;
        case 'C': chunk = (int)cli_parse_int(cli, "--chunk", optarg, 1, 1 << 20); break;
        case 'q': quiet = 1; break;
        case 'h': generate_usage(stdout); return 0;
        default: generate_usage(stderr); return 2;
        }
    }
    if (optind < argc) cli_fatal(cli, "unexpected argument '%s'", argv[optind]);
    if (!mo.model_path == !mo.config_name)
        cli_fatal(cli, "give exactly one of --model FILE and --model-config NAME");
    if (!prompt == !prompt_file) cli_fatal(cli, "give exactly one of --prompt and --prompt-file");
    if (stop && !*stop) cli_fatal(cli, "--stop must not be empty");
    if (cli->mpi_size != pp)
        cli_fatal(cli, "--pp %d needs exactly %d ranks (mpirun -np %d), got %d", pp, pp, pp,
                  cli->mpi_size);
    rp_cli quiet_cli = *cli;
    if (quiet) quiet_cli.mpi_rank = -1;  /* cli_info prints on rank 0 only */
    rp_error err;

    /* The model: the whole of it, or this stage's layers. */
    rp_backend *be;
    rp_model model;
    rp_grid grid, *g = NULL;
    if (pp == 1) {
        cli_load_model(&quiet_cli, &mo, &be, &model);
    } else {
        cli_load_stage_model(cli, &mo, pp, stage_layers, &grid, &be, &model);
        g = &grid;
        cli_set_stage(&quiet_cli, grid.stage);
    }
    const rp_config *cfg = &model.cfg;
    rp_engine_config ec;
    rp_engine_config_defaults(&ec);
    ec.n_slots = 1;
    ec.max_queue = 1;
    ec.prefill_chunk = chunk;
    rp_engine *engine;
    if (rp_engine_create(&engine, &model, g, &ec, &err) != RP_OK) cli_fatal_error(cli, &err);
    if (cli->mpi_rank != 0) {
        /* Stages follow rank 0's commands until it shuts the engine down. */
        if (rp_engine_run(engine, &err) != RP_OK) cli_fatal_error(cli, &err);
        rp_engine_free(engine);
        rp_model_free(&model);
        rp_backend_destroy(be);
        rp_grid_free(&grid);
        return 0;
    }
    if (!vocab) {
        if (cfg->vocab_size > 256)
            cli_fatal(cli, "this model has a %d-token vocabulary: pass --vocab with its vocabulary "
                      "file (e.g. rwkv_vocab_v20230424.txt)", cfg->vocab_size);
        vocab = "bytes";
    }
    rp_tokenizer *tok;
    if (rp_tokenizer_open(&tok, vocab, &err) != RP_OK) cli_fatal_error(cli, &err);
    if (rp_tokenizer_n_ids(tok) > cfg->vocab_size)
        cli_fatal(cli, "vocabulary '%s' has %d ids but the model only %d", vocab,
                  rp_tokenizer_n_ids(tok), cfg->vocab_size);

    size_t prompt_len;
    char *prompt_text = prompt_file ? cli_read_file(cli, prompt_file, &prompt_len) : strdup(prompt);
    if (!prompt_file) prompt_len = strlen(prompt_text);
    int32_t *ids;
    size_t n_ids;
    if (rp_tokenizer_encode(tok, (const uint8_t *)prompt_text, prompt_len, &ids, &n_ids, &err) !=
        RP_OK)
        cli_fatal_error(cli, &err);
    if (n_ids == 0) cli_fatal(cli, "the prompt is empty");

    int32_t eot = rp_tokenizer_eot_id(tok);
    if (ban_eot) {
        gp.banned[gp.n_banned++] = eot;
    } else {
        gp.stop_tokens[gp.n_stop_tokens++] = eot;  /* end of text: stop, print nothing */
    }
    cli_info(&quiet_cli,
             "model: %d layers, C=%d, V=%d (%.1f M params) on %s%s; prompt: %zu tokens; "
             "sampling: temperature %g, top-p %g, top-k %d, seed %llu",
             cfg->n_layer, cfg->n_embd, cfg->vocab_size, rp_config_param_count(cfg) / 1e6,
             be->name, pp > 1 ? " (pipelined)" : "", n_ids, gp.sampler.temperature,
             gp.sampler.top_p, gp.sampler.top_k, (unsigned long long)gp.sampler.seed);

    stream_state stream = {.tok = tok};
    if (rp_text_stream_init(&stream.text, stop ? &stop : NULL, stop ? 1 : 0, &err) != RP_OK)
        cli_fatal_error(cli, &err);
    stream.text.keep_invalid = 1;
    rp_job *job = rp_job_create(ids, (int)n_ids, &gp, NULL, NULL, &err);
    if (!job || rp_engine_submit(engine, job, &err) != RP_OK) cli_fatal_error(cli, &err);
    rp_finish_reason finish = RP_FINISH_NONE;
    int stopped_by_string = 0;
    while (finish == RP_FINISH_NONE) {
        rp_status st;
        rp_engine_step(engine, &err, &st);
        if (st != RP_OK) cli_fatal_error(cli, &err);
        int32_t got[64];
        int n;
        while ((n = rp_job_read(job, got, 64, 0, &finish)) > 0)
            for (int i = 0; i < n && !stopped_by_string; i++)
                if (on_token(got[i], &stream)) {
                    stopped_by_string = 1;
                    rp_job_stop(job);
                }
    }
    if (finish == RP_FINISH_ERROR) {
        char msg[512];
        rp_job_error(job, msg, sizeof msg);
        cli_fatal(cli, "%s", msg);
    }
    rp_text_stream_finish(&stream.text);
    print_released(&stream);
    fputc('\n', stdout);
    fflush(stdout);
    rp_job_stats js;
    rp_job_get_stats(job, &js);
    rp_job_release(job);
    cli_info(&quiet_cli,
             "prompt: %d tokens, first token after %.3f s; decode: %d tokens (%.1f tok/s); "
             "stopped by %s", js.prompt_tokens, js.first_token_seconds, js.completion_tokens,
             js.decode_tokens_per_second,
             stopped_by_string ? "stop string"
             : finish == RP_FINISH_LENGTH ? "max tokens"
             : finish == RP_FINISH_STOP ? "end of text" : rp_finish_reason_name(finish));
    rp_engine_shutdown(engine);
    if (rp_engine_run(engine, &err) != RP_OK) cli_fatal_error(cli, &err);
    rp_engine_free(engine);
    if (g) rp_grid_free(g);

    rp_text_stream_free(&stream.text);
    free(ids);
    free(prompt_text);
    rp_tokenizer_free(tok);
    rp_model_free(&model);
    rp_backend_destroy(be);
    return 0;
}
