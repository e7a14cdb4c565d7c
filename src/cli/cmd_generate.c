/* rwkvpipe generate: prompt -> streamed text. Prefill in sequence mode, then
 * one token per step; bytes reach stdout as soon as they form whole UTF-8
 * characters, and never a part of the stop string. */
#include <getopt.h>
#include <stdlib.h>
#include <string.h>

#include "cli/cli.h"
#include "infer/generate.h"
#include "infer/tokenizer.h"

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
            "  --stop STR            stop before this string is printed\n"
            "  --ban-eot             never sample the end-of-text token 0 (default: stop\n"
            "                        when it is sampled)\n"
            "Execution:\n"
            "  --threads N           CPU threads (default: all)\n"
            "  --chunk N             prompt tokens per sequence-mode call (default 256)\n"
            "  -q, --quiet           no progress or speed report on stderr\n"
            "  -h, --help            this text\n",
            rp_config_builtin_names());
}

typedef struct {
    const rp_tokenizer *tok;
    rp_utf8_stream utf8;
    const char *stop;
    size_t stop_len;
    char *text;        /* everything generated */
    size_t len, cap;
    size_t released;   /* bytes of text handed to the UTF-8 stream */
} stream_state;

static void release(stream_state *s, size_t upto) {
    if (upto <= s->released) return;
    size_t ready;
    rp_error err;
    if (rp_utf8_stream_push(&s->utf8, (const uint8_t *)s->text + s->released, upto - s->released,
                            &ready, &err) != RP_OK)
        return;
    s->released = upto;
    if (ready) {
        fwrite(rp_utf8_stream_data(&s->utf8), 1, ready, stdout);
        rp_utf8_stream_consume(&s->utf8, ready);
        fflush(stdout);
    }
}

static int on_token(int32_t token, void *user) {
    stream_state *s = user;
    size_t n;
    const uint8_t *bytes = rp_tokenizer_token_bytes(s->tok, token, &n);
    if (!bytes) return 0;  /* padding ids beyond the vocab decode to nothing */
    if (s->len + n + 1 > s->cap) {
        s->cap = (s->len + n + 1) * 2;
        s->text = realloc(s->text, s->cap);
    }
    memcpy(s->text + s->len, bytes, n);
    s->len += n;
    s->text[s->len] = '\0';
    if (s->stop_len) {
        /* The stop string may have started in earlier tokens. */
        size_t from = s->released > s->stop_len ? s->released - s->stop_len : 0;
        char *hit = memmem(s->text + from, s->len - from, s->stop, s->stop_len);
        if (hit) {
            release(s, (size_t)(hit - s->text));
            return 1;
        }
        /* Hold back a tail that could still become the stop string. */
        size_t hold = s->stop_len - 1 < s->len ? s->stop_len - 1 : s->len;
        while (hold > 0 && memcmp(s->text + s->len - hold, s->stop, hold) != 0) hold--;
        release(s, s->len - hold);
    } else {
        release(s, s->len);
    }
    return 0;
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
        {"chunk", required_argument, 0, 'C'},      {"quiet", no_argument, 0, 'q'},
        {"help", no_argument, 0, 'h'},             {0, 0, 0, 0}};
    cli_model_options mo = {.init_seed = 1};
    const char *vocab = NULL, *prompt = NULL, *prompt_file = NULL, *stop = NULL;
    rp_generate_options opt = {.max_new_tokens = 200, .prefill_chunk = 256, .stop_at_eot = 1};
    rp_sampler_defaults(&opt.sampler);
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
        case 'n': opt.max_new_tokens = (int)cli_parse_int(cli, "--max-tokens", optarg, 0, 1 << 30); break;
        case 'T': opt.sampler.temperature = (float)cli_parse_double(cli, "--temperature", optarg, 0, 100); break;
        case 'u': opt.sampler.top_p = (float)cli_parse_double(cli, "--top-p", optarg, 1e-9, 1); break;
        case 'k': opt.sampler.top_k = (int)cli_parse_int(cli, "--top-k", optarg, 0, 1 << 24); break;
        case 's': opt.sampler.seed = cli_parse_u64(cli, "--seed", optarg); break;
        case 'S': stop = optarg; break;
        case 'B': ban_eot = 1; break;
        case 'j': mo.threads = (int)cli_parse_int(cli, "--threads", optarg, 1, 4096); break;
        case 'C': opt.prefill_chunk = (int)cli_parse_int(cli, "--chunk", optarg, 1, 1 << 20); break;
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
    if (cli->mpi_size > 1)
        cli_fatal(cli, "pipelined generation over %d ranks is not available yet; run with -np 1",
                  cli->mpi_size);
    rp_cli quiet_cli = *cli;
    if (quiet) quiet_cli.mpi_rank = -1;  /* cli_info prints on rank 0 only */

    rp_backend *be;
    rp_model model;
    cli_load_model(&quiet_cli, &mo, &be, &model);
    const rp_config *cfg = &model.cfg;
    if (!vocab) {
        if (cfg->vocab_size > 256)
            cli_fatal(cli, "this model has a %d-token vocabulary: pass --vocab with its vocabulary "
                      "file (e.g. rwkv_vocab_v20230424.txt)", cfg->vocab_size);
        vocab = "bytes";
    }
    rp_tokenizer *tok;
    rp_error err;
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
    opt.eot_id = eot;
    if (ban_eot) {
        opt.banned = &eot;
        opt.n_banned = 1;
        opt.stop_at_eot = 0;
    }
    cli_info(&quiet_cli,
             "model: %d layers, C=%d, V=%d (%.1f M params) on %s; prompt: %zu tokens; "
             "sampling: temperature %g, top-p %g, top-k %d, seed %llu",
             cfg->n_layer, cfg->n_embd, cfg->vocab_size, rp_config_param_count(cfg) / 1e6,
             be->name, n_ids, opt.sampler.temperature, opt.sampler.top_p, opt.sampler.top_k,
             (unsigned long long)opt.sampler.seed);

    rp_state state;
    rp_state_geometry(&state, cfg, 0, cfg->n_layer, 1);
    state.data = be->alloc(be, state.floats_per_slot * sizeof(float));
    if (!state.data) cli_fatal(cli, "cannot allocate the recurrent state");

    stream_state stream = {.tok = tok, .stop = stop, .stop_len = stop ? strlen(stop) : 0};
    rp_utf8_stream_init(&stream.utf8);
    rp_generate_stats stats;
    if (rp_generate(&model, &state, ids, (int)n_ids, &opt, on_token, &stream, &stats, &err) !=
        RP_OK)
        cli_fatal_error(cli, &err);
    if (stats.stopped_by != 2) release(&stream, stream.len);
    size_t rest = rp_utf8_stream_finish(&stream.utf8);
    fwrite(rp_utf8_stream_data(&stream.utf8), 1, rest, stdout);
    rp_utf8_stream_consume(&stream.utf8, rest);
    fputc('\n', stdout);
    fflush(stdout);
    static const char *why[] = {"max tokens", "end of text", "stop string"};
    cli_info(&quiet_cli,
             "prefill: %d tokens in %.3f s (%.1f tok/s); decode: %d tokens in %.3f s "
             "(%.1f tok/s); stopped by %s",
             stats.prompt_tokens, stats.prefill_seconds,
             stats.prefill_seconds > 0 ? stats.prompt_tokens / stats.prefill_seconds : 0.0,
             stats.generated_tokens, stats.decode_seconds,
             stats.decode_seconds > 0 ? stats.generated_tokens / stats.decode_seconds : 0.0,
             why[stats.stopped_by]);

    rp_utf8_stream_free(&stream.utf8);
    free(stream.text);
    be->free(be, state.data);
    free(ids);
    free(prompt_text);
    rp_tokenizer_free(tok);
    rp_model_free(&model);
    rp_cpu_backend_destroy(be);
    return 0;
}
