/* rwkvpipe eval: loss, perplexity and next-token accuracy of a model on token
 * shards (every window) or on an embedded synthetic task (MQAR recall). */
#include <getopt.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "cli/cli.h"
#include "text/tokenizer.h"
#include "train/score.h"
#include "train/trainer.h"

static void eval_usage(FILE *out) {
    fprintf(out,
            "usage: rwkvpipe eval --model M.safetensors --data mqar|copy|SHARDS... [options]\n"
            "       rwkvpipe eval --model M.safetensors --last-word FILE.jsonl | --choice FILE.jsonl\n"
            "Scores a model: mean next-token cross-entropy, perplexity and accuracy\n"
            "(arg-max == next token). On token shards (from 'rwkvpipe tokenize') every\n"
            "window of --ctx-len + 1 tokens is scored from a zero state; on a synthetic\n"
            "task only the answer tokens are (MQAR: recall accuracy).\n"
            "  --model FILE       weights (safetensors, official or HF/fla names)\n"
            "  --data SRC         'mqar', 'copy', shard files / directories, or text /\n"
            "                     .jsonl files (tokenized with --vocab first); repeatable\n"
            "  --ctx-len T        tokens per window (default 64)\n"
            "  --batch N          windows per forward call (default 16)\n"
            "  --batches N        synthetic tasks: batches to score (default 16)\n"
            "  --mqar-pairs N     MQAR pairs (default ctx/4, as in training)\n"
            "  --seed S           synthetic samples (default 1)\n"
            "  --last-word FILE   LAMBADA-style JSON lines {\"text\": \"... word\"}: accuracy of\n"
            "                     greedy decoding of the last word after [0] + context,\n"
            "                     and its perplexity\n"
            "  --choice FILE      multiple choice JSON lines {\"context\": ..., \"choices\":\n"
            "                     [...], \"label\": k}: accuracy by summed log-likelihood,\n"
            "                     and per byte (acc_norm)\n"
            "  --vocab V          tokenizer for those files: 'bytes' (default for models of\n"
            "                     <= 256 tokens) or a World vocabulary file\n"
            "  --per-example      print each example's log-likelihood(s) to stdout\n"
            "  --threads N        CPU threads (default: all)\n"
            CLI_DEVICE_HELP
            CLI_WEIGHTS_HELP
            "  -h, --help         this text\n");
}

int cmd_eval(rp_cli *cli, int argc, char **argv) {
    static const struct option longopts[] = {
        {"model", required_argument, 0, 'm'},      {"data", required_argument, 0, 'd'},
        {"ctx-len", required_argument, 0, 'T'},    {"batch", required_argument, 0, 'b'},
        {"batches", required_argument, 0, 'n'},    {"mqar-pairs", required_argument, 0, 'p'},
        {"seed", required_argument, 0, 's'},       {"threads", required_argument, 0, 'j'},
        {"device", required_argument, 0, 1001},
        {"weights-dtype", required_argument, 0, 1009},   {"gpu-math", required_argument, 0, 1002},
        {"last-word", required_argument, 0, 'W'},  {"choice", required_argument, 0, 'C'},
        {"vocab", required_argument, 0, 'v'},      {"per-example", no_argument, 0, 'P'},
        {"help", no_argument, 0, 'h'},             {0, 0, 0, 0}};
    rp_train_options o;
    rp_train_options_defaults(&o);
    o.eval_all_windows = 1;
    int batches = 16, have_data = 0, per_example = 0;
    const char *last_word = NULL, *choice = NULL, *vocab = NULL;
    cli_model_options mo = {0};
    const char **paths = cli_calloc(cli, (size_t)argc + 1, sizeof *paths, "the data paths");
    int n_paths = 0, c;
    optind = 1;
    while ((c = getopt_long(argc, argv, "h", longopts, NULL)) != -1) {
        switch (c) {
        case 'm': mo.model_path = optarg; break;
        case 'd':
            have_data = 1;
            rp_train_options_add_data(&o, paths, &n_paths, optarg);
            break;
        case 'T': o.ctx_len = (int)cli_parse_int(cli, "--ctx-len", optarg, 2, 1 << 20); break;
        case 'b':
            o.micro_batch_size = o.batch_size = (int)cli_parse_int(cli, "--batch", optarg, 1,
                                                                   1 << 16);
            break;
        case 'n': batches = (int)cli_parse_int(cli, "--batches", optarg, 1, 1 << 24); break;
        case 'p': o.synth.n_pairs = (int)cli_parse_int(cli, "--mqar-pairs", optarg, 1, 1 << 20); break;
        case 's': o.seed = cli_parse_u64(cli, "--seed", optarg); break;
        case 'j': mo.threads = (int)cli_parse_int(cli, "--threads", optarg, 1, 4096); break;
        case 1001: cli_parse_device(cli, &mo, optarg); break;
        case 1009: cli_parse_weights_dtype(cli, &mo, optarg); break;
        case 1002: cli_parse_gpu_math(cli, &mo, optarg); break;
        case 'W': last_word = optarg; break;
        case 'C': choice = optarg; break;
        case 'v': vocab = optarg; break;
        case 'P': per_example = 1; break;
        case 'h': eval_usage(stdout); free(paths); return 0;
        default: eval_usage(stderr); free(paths); return 2;
        }
    }
    if (optind < argc) cli_fatal(cli, "unexpected argument '%s'", argv[optind]);
    if (!mo.model_path) cli_fatal(cli, "--model is required");
    const int n_tasks = have_data + !!last_word + !!choice;
    if (n_tasks != 1)
        cli_fatal(cli, "give exactly one of --data ('mqar', 'copy' or token shards), --last-word "
                  "FILE and --choice FILE");
    if (cli->mpi_size > 1) cli_fatal(cli, "eval runs in one process for now; run it with -np 1");
    char tmp_dir[4096] = "", tmp_prefix[4096] = "";
    int n_tmp = have_data ? cli_tokenize_text_inputs(cli, paths, n_paths, vocab ? vocab : "bytes",
                                                     tmp_dir, sizeof tmp_dir, tmp_prefix,
                                                     sizeof tmp_prefix)
                          : 0;
    n_paths = 0;
    while (paths[n_paths]) n_paths++;
    o.data_paths = paths;
    o.n_data_paths = n_paths;
    rp_backend *be;
    rp_model model;
    cli_load_model(cli, &mo, &be, &model);
    rp_error err;
    if (last_word || choice) {
        const char *path = last_word ? last_word : choice;
        if (!vocab) {
            if (model.cfg.vocab_size > 256)
                cli_fatal(cli, "this model has a %d-token vocabulary: pass --vocab with its "
                          "vocabulary file", model.cfg.vocab_size);
            vocab = "bytes";
        }
        rp_tokenizer *tok;
        if (rp_tokenizer_open(&tok, vocab, &err) != RP_OK) cli_fatal_error(cli, &err);
        rp_score_result r;
        if (rp_score_file(&model, tok, last_word ? RP_SCORE_LAST_WORD : RP_SCORE_CHOICE, path,
                          per_example ? stdout : NULL, &r, &err) != RP_OK)
            cli_fatal_error(cli, &err);
        printf("task         : %s (%s)\n", last_word ? "last word" : "multiple choice", path);
        printf("examples     : %ld\n", r.examples);
        printf("accuracy     : %.4f%%\n", 100 * r.accuracy);
        if (last_word) printf("perplexity   : %.4f\n", r.perplexity);
        else printf("accuracy_norm: %.4f%%\n", 100 * r.accuracy_norm);
        rp_tokenizer_free(tok);
        rp_model_free(&model);
        rp_backend_destroy(be);
        free(paths);
        return 0;
    }
    double loss, accuracy;
    long n_targets;
    rp_status st = rp_train_evaluate(&model, &o, batches, &loss, &accuracy, &n_targets, &err);
    if (n_tmp) cli_remove_tokenized(tmp_dir, tmp_prefix, n_tmp);
    if (st != RP_OK) cli_fatal_error(cli, &err);
    printf("data         : %s\n", o.synthetic ? rp_synth_task_name(o.synth.task) : "token shards");
    printf("scored       : %ld tokens (windows of %d)\n", n_targets, o.ctx_len);
    printf("loss         : %.6f nats/token\n", loss);
    printf("perplexity   : %.4f\n", exp(loss));
    printf("accuracy     : %.4f%%%s\n", 100 * accuracy, o.synthetic ? " (answers)" : "");
    rp_model_free(&model);
    rp_backend_destroy(be);
    free(paths);
    return 0;
}
