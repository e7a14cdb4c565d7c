/* rwkvpipe serve: the generation engine behind an OpenAI-compatible HTTP
 * service (docs/serving.md). Under mpirun with --pp P every rank loads its
 * stage's layers and runs the engine; rank 0 also serves HTTP (src/serve/
 * http.c) from its own threads while its main thread drives the engine.
 * SIGTERM / SIGINT: running requests end as cancelled, every stage shuts
 * down, the HTTP server answers 503 for --drain-seconds, then exit 0. */
#include <getopt.h>
#include <libgen.h>
#include <pthread.h>
#include <signal.h>
#include <time.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "cli/cli.h"
#include "core/clock.h"
#include "text/json_mask.h"
#include "text/tokenizer.h"
#include "model/init.h"
#include "pipe/grid.h"
#include "infer/engine.h"
#include "serve/http.h"

static void serve_usage(FILE *out) {
    fprintf(out,
            "usage: rwkvpipe serve (--model M.safetensors | --model-config NAME) [options]\n"
            "       mpirun -np P rwkvpipe serve --pp P --model M.safetensors [options]\n"
            "Serves the model over HTTP: POST /v1/completions, /v1/chat/completions (JSON or\n"
            "streamed as Server-Sent Events), GET /v1/models, /health, /metrics, and\n"
            "/v1/sessions/NAME/{save,load} (see docs/serving.md). Stops on SIGTERM/SIGINT.\n"
            "Model:\n"
            "  --model FILE             safetensors weights (official or HF/fla names)\n"
            "  --model-config NAME      a built-in shape with the official init instead: %s\n"
            "  --init-seed S            seed of that init (default 1)\n"
            "  --lora FILE              LoRA adapters (train --tune lora --lora-out) merged\n"
            "                           into the f32 weights at load\n"
            "  --vocab V                'bytes' or a World vocabulary file; default 'bytes'\n"
            "                           for models with at most 256 tokens\n"
            "  --model-id ID            the model's name in the API (default: the file name\n"
            "                           or the config name)\n"
            "HTTP:\n"
            "  --host H                 address to listen on (default 127.0.0.1)\n"
            "  --port P                 port (default 8000; 0 = any free port, printed)\n"
            "  --api-key K              require 'Authorization: Bearer K' (also from the\n"
            "                           RWKVPIPE_API_KEY environment variable)\n"
            "  --session-dir DIR        where session files go (default ./sessions; created,\n"
            "                           mode 0700, when missing); clients name a file in it:\n"
            "                           NAME.state, letters, digits, '_', '-', '.'\n"
            "  --session-overwrite      a save may replace a file that is not a session file\n"
            "                           (default: only session files are replaced)\n"
            "  --max-session-files N    session files the directory may hold; a save that\n"
            "                           would add one more gets 507 (default 1000; 0 = no cap)\n"
            "  -v, --verbose            one line per request on stderr, and why a session\n"
            "                           save or load failed (client text escaped as \\xHH)\n"
            "Limits:\n"
            "  --max-body-bytes N       request body size, 413 above (default 1048576)\n"
            "  --max-prompt-tokens N    prompt tokens per request, 400 above (default 16384)\n"
            "  --max-tokens-limit N     largest max_tokens a request may ask (default 4096)\n"
            "  --default-max-tokens N   max_tokens when a request gives none (default 256)\n"
            "  --max-connections N      open HTTP connections at once (default 256)\n"
            "  --max-connections-per-client N\n"
            "                           open connections from one client address (default\n"
            "                           max-connections / 4; 0 = no cap: behind a proxy)\n"
            "  --connection-timeout S   close a connection idle for S seconds (default 30;\n"
            "                           0 = never)\n"
            "  --request-timeout S      close a connection whose request (headers and body)\n"
            "                           has not arrived S seconds after it opened or after\n"
            "                           its previous reply (default 60; 0 = no deadline)\n"
            "  --http-threads N         threads serving HTTP connections (default 4)\n"
            "  --drain-seconds S        on SIGTERM/SIGINT, keep answering 503 with Retry-After\n"
            "                           for S seconds before closing (default 5)\n"
            "Engine:\n"
            "  --slots N                generations at once (default 16)\n"
            "  --state-budget-mb N      at most N MiB of running generations' state: fewer\n"
            "                           slots if the whole model's state per slot needs it\n"
            "  --max-queue N            requests waiting for a slot; more get 429 (default 64)\n"
            "  --max-batch N            sequences per decode step, 1-4096 (default: the\n"
            "                           backend's: CPU 64, CUDA 64); at most --slots run\n"
            "  --prefill-chunk N        prompt tokens per prefill unit (default 256)\n"
            "  --prefill-prompts N      most prompts read together in one prefill unit, one\n"
            "                           pass over the weights, 0-4096 (default 0: up to\n"
            "                           --max-batch; 1: one prompt per unit; f32 CPU only,\n"
            "                           one per unit elsewhere)\n"
            "  --session-budget-mb N    memory for stored session states per stage (default 256)\n"
            "  --prefix-cache-mb N      memory for the prefix state cache: the states after\n"
            "                           finished requests' prompts and replies, so a request\n"
            "                           that repeats or extends one (a chat resending its\n"
            "                           history) reads only the rest (default: 1/8 of physical\n"
            "                           memory, at most 4096; counts whole-model states, each\n"
            "                           stage holds its layers' share; 0 = off)\n"
            "  --comm-timeout S         fail when a stage waits S seconds on a peer (default 300)\n"
            "  --pp P                   pipeline stages (run under mpirun -np P)\n"
            "  --stage-layers LIST      layers per stage, e.g. 2,2 (default: balanced by decode\n"
            "                           cost: the head counts its sampling)\n"
            "  --threads N              CPU threads per rank (default: cores / ranks on the node)\n"
            CLI_DEVICE_HELP
            CLI_WEIGHTS_HELP
            "  -h, --help               this text\n",
            rp_config_builtin_names());
}

/* Set before the handlers are installed; the handler only calls the two
 * async-signal-safe stop functions. */
static rp_engine *volatile serve_engine;
static rp_http_server *volatile serve_http;
static volatile sig_atomic_t serve_signals;

static volatile sig_atomic_t first_signal_s;

/* A second signal at least 2 s after the first stops at once: the same
 * signal delivered twice in a row (a scheduler signals the tasks and the
 * launcher forwards it too) must not cut the graceful stop short. */
static void on_stop_signal(int sig) {
    (void)sig;
    const long now = (long)rp_now_seconds();  /* async-signal-safe */
    if (serve_signals++ == 0) first_signal_s = (sig_atomic_t)now;
    else if (now - first_signal_s < 2) return;
    if (serve_signals > 1) {
        static const char msg[] = "rwkvpipe serve: second signal, exiting now\n";
        ssize_t w = write(2, msg, sizeof msg - 1);
        (void)w;
        _exit(130);
    }
    if (serve_http) rp_http_begin_stop(serve_http);
    if (serve_engine) rp_engine_shutdown(serve_engine);
}

static void log_to_stderr(void *user, const char *line) {
    const rp_cli *cli = user;
    fprintf(stderr, "rwkvpipe %s: %s\n", cli->command, line);
}

int cmd_serve(rp_cli *cli, int argc, char **argv) {
    double state_budget_mb = 0;
    enum {
        O_MODEL = 1000, O_CONFIG, O_SEED, O_VOCAB, O_ID, O_HOST, O_PORT, O_KEY, O_SESSION_DIR,
        O_BODY, O_PROMPT, O_TOKENS, O_DEFAULT_TOKENS, O_CONNECTIONS, O_SLOTS, O_QUEUE, O_CHUNK,
        O_BUDGET, O_TIMEOUT, O_PP, O_STAGE_LAYERS, O_THREADS, O_STATE_BUDGET, O_PREFIX_CACHE, O_DEVICE, O_GPU_MATH,
        O_PER_CLIENT, O_CONN_TIMEOUT, O_REQ_TIMEOUT, O_HTTP_THREADS, O_DRAIN,
        O_SESSION_OVERWRITE, O_MAX_SESSION_FILES, O_WEIGHTS_DTYPE, O_LORA, O_MAX_BATCH,
        O_PREFILL_PROMPTS
    };
    static const struct option longopts[] = {
        {"model", required_argument, 0, O_MODEL},
        {"model-config", required_argument, 0, O_CONFIG},
        {"lora", required_argument, 0, O_LORA},
        {"init-seed", required_argument, 0, O_SEED},
        {"vocab", required_argument, 0, O_VOCAB},
        {"model-id", required_argument, 0, O_ID},
        {"host", required_argument, 0, O_HOST},
        {"port", required_argument, 0, O_PORT},
        {"api-key", required_argument, 0, O_KEY},
        {"session-dir", required_argument, 0, O_SESSION_DIR},
        {"session-overwrite", no_argument, 0, O_SESSION_OVERWRITE},
        {"max-session-files", required_argument, 0, O_MAX_SESSION_FILES},
        {"max-body-bytes", required_argument, 0, O_BODY},
        {"max-prompt-tokens", required_argument, 0, O_PROMPT},
        {"max-tokens-limit", required_argument, 0, O_TOKENS},
        {"default-max-tokens", required_argument, 0, O_DEFAULT_TOKENS},
        {"max-connections", required_argument, 0, O_CONNECTIONS},
        {"max-connections-per-client", required_argument, 0, O_PER_CLIENT},
        {"connection-timeout", required_argument, 0, O_CONN_TIMEOUT},
        {"request-timeout", required_argument, 0, O_REQ_TIMEOUT},
        {"http-threads", required_argument, 0, O_HTTP_THREADS},
        {"drain-seconds", required_argument, 0, O_DRAIN},
        {"slots", required_argument, 0, O_SLOTS},
        {"max-queue", required_argument, 0, O_QUEUE},
        {"max-batch", required_argument, 0, O_MAX_BATCH},
        {"prefill-chunk", required_argument, 0, O_CHUNK},
        {"prefill-prompts", required_argument, 0, O_PREFILL_PROMPTS},
        {"session-budget-mb", required_argument, 0, O_BUDGET},
        {"comm-timeout", required_argument, 0, O_TIMEOUT},
        {"pp", required_argument, 0, O_PP},
        {"stage-layers", required_argument, 0, O_STAGE_LAYERS},
        {"threads", required_argument, 0, O_THREADS},
        {"device", required_argument, 0, O_DEVICE},
        {"weights-dtype", required_argument, 0, O_WEIGHTS_DTYPE},
        {"gpu-math", required_argument, 0, O_GPU_MATH},
        {"state-budget-mb", required_argument, 0, O_STATE_BUDGET},
        {"prefix-cache-mb", required_argument, 0, O_PREFIX_CACHE},
        {"verbose", no_argument, 0, 'v'},
        {"help", no_argument, 0, 'h'},
        {0, 0, 0, 0}};
    cli_model_options mo = {.init_seed = 1, .for_decode = 1};
    const char *vocab = NULL, *model_id = NULL, *stage_layers = NULL;
    rp_http_config hc;
    rp_http_config_defaults(&hc);
    hc.api_key = getenv("RWKVPIPE_API_KEY");
    rp_engine_config ec;
    rp_engine_config_defaults(&ec);
    ec.comm_timeout = 300;
    int pp = 1;
    long long prefix_cache_mb = -1;  /* -1: sized from memory */
    int c;
    optind = 1;
    while ((c = getopt_long(argc, argv, "hv", longopts, NULL)) != -1) {
        switch (c) {
        case O_MODEL: mo.model_path = optarg; break;
        case O_LORA: mo.lora_path = optarg; break;
        case O_CONFIG: mo.config_name = optarg; break;
        case O_SEED: mo.init_seed = cli_parse_u64(cli, "--init-seed", optarg); break;
        case O_VOCAB: vocab = optarg; break;
        case O_ID: model_id = optarg; break;
        case O_HOST: hc.host = optarg; break;
        case O_PORT: hc.port = (int)cli_parse_int(cli, "--port", optarg, 0, 65535); break;
        case O_KEY: hc.api_key = optarg; break;
        case O_SESSION_DIR: hc.session_dir = optarg; break;
        case O_SESSION_OVERWRITE: hc.session_overwrite = 1; break;
        case O_MAX_SESSION_FILES:
            hc.max_session_files = (int)cli_parse_int(cli, "--max-session-files", optarg, 0, 1 << 24);
            break;
        case O_BODY:
            hc.max_body_bytes = (size_t)cli_parse_int(cli, "--max-body-bytes", optarg, 64, 1LL << 34);
            break;
        case O_PROMPT:
            hc.max_prompt_tokens = (int)cli_parse_int(cli, "--max-prompt-tokens", optarg, 1, 1 << 30);
            break;
        case O_TOKENS:
            hc.max_tokens_limit = (int)cli_parse_int(cli, "--max-tokens-limit", optarg, 0, 1 << 30);
            break;
        case O_DEFAULT_TOKENS:
            hc.default_max_tokens = (int)cli_parse_int(cli, "--default-max-tokens", optarg, 0, 1 << 30);
            break;
        case O_CONNECTIONS:
            hc.max_connections = (int)cli_parse_int(cli, "--max-connections", optarg, 1, 65536);
            break;
        case O_PER_CLIENT:
            hc.max_connections_per_client =
                (int)cli_parse_int(cli, "--max-connections-per-client", optarg, 0, 65536);
            break;
        case O_CONN_TIMEOUT:
            hc.connection_timeout_s = (int)cli_parse_int(cli, "--connection-timeout", optarg, 0, 86400);
            break;
        case O_REQ_TIMEOUT:
            hc.request_timeout_s = (int)cli_parse_int(cli, "--request-timeout", optarg, 0, 86400);
            break;
        case O_HTTP_THREADS:
            hc.http_threads = (int)cli_parse_int(cli, "--http-threads", optarg, 1, 1024);
            break;
        case O_DRAIN: hc.drain_seconds = cli_parse_double(cli, "--drain-seconds", optarg, 0, 3600); break;
        case O_SLOTS: ec.n_slots = (int)cli_parse_int(cli, "--slots", optarg, 1, 1 << 16); break;
        case O_QUEUE: ec.max_queue = (int)cli_parse_int(cli, "--max-queue", optarg, 0, 1 << 20); break;
        case O_MAX_BATCH:
            ec.max_batch = (int)cli_parse_int(cli, "--max-batch", optarg, 1, RP_ENGINE_MAX_BATCH);
            break;
        case O_CHUNK:
            ec.prefill_chunk = (int)cli_parse_int(cli, "--prefill-chunk", optarg, 1, 1 << 20);
            break;
        case O_PREFILL_PROMPTS:
            ec.prefill_prompts =
                (int)cli_parse_int(cli, "--prefill-prompts", optarg, 0, RP_ENGINE_MAX_BATCH);
            break;
        case O_BUDGET:
            ec.session_budget_bytes =
                (size_t)cli_parse_int(cli, "--session-budget-mb", optarg, 0, 1 << 24) << 20;
            break;
        case O_TIMEOUT: ec.comm_timeout = cli_parse_double(cli, "--comm-timeout", optarg, 0, 1e6); break;
        case O_PP: pp = (int)cli_parse_int(cli, "--pp", optarg, 1, RP_GRID_MAX_STAGES); break;
        case O_STAGE_LAYERS: stage_layers = optarg; break;
        case O_STATE_BUDGET:
            state_budget_mb = (double)cli_parse_int(cli, "--state-budget-mb", optarg, 1, 1 << 30);
            break;
        case O_PREFIX_CACHE:
            prefix_cache_mb = cli_parse_int(cli, "--prefix-cache-mb", optarg, 0, 1 << 24);
            break;
        case O_THREADS: mo.threads = (int)cli_parse_int(cli, "--threads", optarg, 1, 4096); break;
        case O_DEVICE: cli_parse_device(cli, &mo, optarg); break;
        case O_WEIGHTS_DTYPE: cli_parse_weights_dtype(cli, &mo, optarg); break;
        case O_GPU_MATH: cli_parse_gpu_math(cli, &mo, optarg); break;
        case 'v': hc.log_requests = 1; break;
        case 'h': serve_usage(stdout); return 0;
        default: serve_usage(stderr); return 2;
        }
    }
    if (optind < argc) cli_fatal(cli, "unexpected argument '%s'", argv[optind]);
    if (!mo.model_path == !mo.config_name)
        cli_fatal(cli, "give exactly one of --model FILE and --model-config NAME");
    if (cli->mpi_size != pp)
        cli_fatal(cli, "--pp %d needs exactly %d ranks (mpirun -np %d), got %d", pp, pp, pp,
                  cli->mpi_size);
    if (stage_layers && pp == 1) cli_fatal(cli, "--stage-layers needs --pp");
    if (hc.default_max_tokens > hc.max_tokens_limit) hc.default_max_tokens = hc.max_tokens_limit;
    if (prefix_cache_mb < 0) {
        /* 1/8 of physical memory, at most 4 GiB: room for hundreds of 0.1B
         * states (2.4 MB) or tens of 1.5B ones (13 MB) beside the model. */
        const long pages = sysconf(_SC_PHYS_PAGES), page = sysconf(_SC_PAGESIZE);
        const double phys = pages > 0 && page > 0 ? (double)pages * (double)page : 0;
        double bytes = phys / 8;
        if (bytes > 4096.0 * 1048576.0) bytes = 4096.0 * 1048576.0;
        ec.prefix_cache_bytes = (size_t)bytes;
    } else {
        ec.prefix_cache_bytes = (size_t)prefix_cache_mb << 20;
    }
    /* SIGINT/SIGTERM stay blocked in every thread started from here on
     * (compute and HTTP threads); the main thread takes them once it drives
     * the engine, so the handler never runs beside the code that frees what
     * it touches. */
    sigset_t stop_signals;
    sigemptyset(&stop_signals);
    sigaddset(&stop_signals, SIGINT);
    sigaddset(&stop_signals, SIGTERM);
    pthread_sigmask(SIG_BLOCK, &stop_signals, NULL);
    if (mo.threads == 0 && cli->mpi_size > 1) mo.threads = cli_threads_per_rank();
    ec.threads = mo.threads;

    /* This stage's part of the model (all of it for one process). */
    rp_backend *be;
    rp_model model;
    rp_error err;
    rp_grid grid;
    int have_grid = 0;
    if (pp > 1) {
        cli_load_stage_model(cli, &mo, pp, stage_layers, &grid, &be, &model);
        have_grid = 1;
        rp_grid_print_map(&grid, stderr);
        cli_rank_startup(cli, be, grid.stage, 0, grid.layer_begin[grid.stage],
                         grid.layer_end[grid.stage], mo.threads);
    } else {
        cli_load_model(cli, &mo, &be, &model);
    }
    const rp_config *cfg = &model.cfg;
    /* Admission: the slot count, and the memory their states take. */
    const double slot_bytes =
        (double)cfg->n_layer * (double)rp_config_state_floats_per_layer(cfg) * sizeof(float);
    if (state_budget_mb > 0) {
        const int fit = (int)(state_budget_mb * 1048576.0 / slot_bytes);
        if (fit < 1)
            cli_fatal(cli, "--state-budget-mb %.0f: one generation's state takes %.1f MiB", state_budget_mb,
                      slot_bytes / 1048576.0);
        if (fit < ec.n_slots) {
            cli_info(cli, "--state-budget-mb %.0f holds %d generations' state (%.2f MiB each): %d "
                     "slots instead of %d", state_budget_mb, fit, slot_bytes / 1048576.0, fit,
                     ec.n_slots);
            ec.n_slots = fit;
        }
    }

    /* Rank 0 talks to clients and the last stage samples (response_format masks tokens by
     * their bytes): both need the tokenizer. */
    rp_tokenizer *tok = NULL;
    rp_token_trie *trie = NULL;
    const int last_stage = !have_grid || grid.stage == grid.pp - 1;
    if (cli->mpi_rank == 0 || last_stage) {
        if (!vocab) {
            if (cfg->vocab_size > 256)
                cli_fatal(cli, "this model has a %d-token vocabulary: pass --vocab with its "
                          "vocabulary file (e.g. rwkv_vocab_v20230424.txt)", cfg->vocab_size);
            vocab = "bytes";
        }
        if (rp_tokenizer_open(&tok, vocab, &err) != RP_OK) cli_fatal_error(cli, &err);
        if (rp_tokenizer_n_ids(tok) > cfg->vocab_size)
            cli_fatal(cli, "vocabulary '%s' has %d ids but the model only %d", vocab,
                      rp_tokenizer_n_ids(tok), cfg->vocab_size);
        if (last_stage && rp_token_trie_build(&trie, tok, &err) != RP_OK) cli_fatal_error(cli, &err);
    }

    rp_engine *engine;
    if (rp_engine_create(&engine, &model, have_grid ? &grid : NULL, &ec, &err) != RP_OK)
        cli_fatal_error(cli, &err);
    rp_engine_set_vocab(engine, trie);

    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sigemptyset(&sa.sa_mask);
    sa.sa_handler = SIG_IGN;
    sigaction(SIGPIPE, &sa, NULL);
    if (cli->mpi_rank != 0) {
        /* Rank 0 orchestrates the shutdown: a stage that stopped on its own
         * would leave the pipeline hanging. */
        sigaction(SIGINT, &sa, NULL);
        sigaction(SIGTERM, &sa, NULL);
        rp_status st = rp_engine_run(engine, &err);
        if (st != RP_OK) cli_fatal_error(cli, &err);
        rp_engine_free(engine);
        rp_token_trie_free(trie);
        rp_tokenizer_free(tok);
        rp_model_free(&model);
        rp_backend_destroy(be);
        if (have_grid) rp_grid_free(&grid);
        return 0;
    }

    char id_buf[4096];
    if (!model_id) {
        if (mo.model_path) {
            snprintf(id_buf, sizeof id_buf, "%s", mo.model_path);
            model_id = basename(id_buf);
        } else {
            model_id = mo.config_name;
        }
    }
    hc.model_id = model_id;
    hc.log = log_to_stderr;
    hc.log_user = cli;
    rp_http_server *http;
    serve_engine = engine;
    if (rp_http_start(&http, engine, tok, &hc, &err) != RP_OK) cli_fatal_error(cli, &err);
    serve_http = http;
    sa.sa_handler = on_stop_signal;
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);
    pthread_sigmask(SIG_UNBLOCK, &stop_signals, NULL);

    int ipv6 = strchr(hc.host, ':') != NULL;
    cli_info(cli, "model '%s': %d layers, C=%d, V=%d (%.1f M params), %d stage%s, %d slots "
             "(%.1f MiB of state), vocab %s", model_id, cfg->n_layer, cfg->n_embd,
             cfg->vocab_size, rp_config_param_count(cfg) / 1e6, pp, pp == 1 ? "" : "s",
             ec.n_slots, ec.n_slots * slot_bytes / 1048576.0, rp_tokenizer_kind(tok));
    printf("rwkvpipe serve: listening on http://%s%s%s:%d (pid %ld)\n", ipv6 ? "[" : "", hc.host,
           ipv6 ? "]" : "", rp_http_port(http), (long)getpid());
    fflush(stdout);

    rp_status st = rp_engine_run(engine, &err);
    rp_http_begin_stop(http);
    serve_http = NULL;
    /* The drain (docs/serving.md, Stopping): every stage has stopped and the
     * generations were cancelled; new requests still get 503 for a while so
     * that clients and load balancers learn the server is going. */
    if (st == RP_OK) rp_http_drain(http);
    else rp_http_fail(http, err.msg);
    rp_http_stop(http);
    if (st != RP_OK) cli_fatal_error(cli, &err);
    cli_info(cli, "stopped");
    serve_engine = NULL;
    rp_engine_free(engine);
    rp_token_trie_free(trie);
    rp_tokenizer_free(tok);
    rp_model_free(&model);
    rp_backend_destroy(be);
    if (have_grid) rp_grid_free(&grid);
    return 0;
}
