/* rwkvpipe tokenize: text / JSON-lines files -> token shards (OUT-00000.tok,
 * ...) for training, streaming (src/train/tokenize.c), with progress on
 * stderr and a summary at the end. */
#include <getopt.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "cli/cli.h"
#include "text/tokenizer.h"
#include "train/shards.h"
#include "train/tokenize.h"
#include "core/clock.h"

static void tokenize_usage(FILE *out) {
    fprintf(out,
            "usage: rwkvpipe tokenize --vocab bytes|VOCAB_FILE IN [IN...] -o OUT_PREFIX [options]\n"
            "Tokenizes the inputs, in order, into token shards OUT_PREFIX-00000.tok,\n"
            "OUT_PREFIX-00001.tok, ... (format: docs/formats.md, \"Token shards\"). A plain\n"
            "text file is one document; a .jsonl/.json file holds one document per line,\n"
            "its \"text\" field. Every document is followed by token 0. Shards appear only\n"
            "when all inputs succeeded.\n"
            "  --vocab V            'bytes' (id = byte value) or a World vocabulary file\n"
            "                       (rwkv_vocab_v20230424.txt format)\n"
            "  -o, --output PREFIX  output prefix (a directory path must exist)\n"
            "  --shard-tokens N     tokens per shard (default 100000000)\n"
            "  --format F           auto (default: by extension), text or jsonl\n"
            "  --force              replace existing shards with this prefix\n"
            "  -q, --quiet          no progress, only errors\n"
            "  -h, --help           this text\n");
}

typedef struct {
    int quiet, tty;
    double start_s, last_report_s;
    uint64_t bytes_before;  /* of the inputs already done */
    uint64_t bytes_total;   /* of all inputs */
    int file_index, n_files;
} progress_state;

static void print_progress(progress_state *p, uint64_t done, uint64_t tokens, int final) {
    double elapsed = rp_now_seconds() - p->start_s;
    double all_done = (double)(p->bytes_before + done);
    double pct = p->bytes_total ? 100.0 * all_done / (double)p->bytes_total : 100.0;
    double mb_per_s = elapsed > 0 ? all_done / 1e6 / elapsed : 0.0;
    if (p->tty)
        fprintf(stderr, "\rrwkvpipe tokenize: %5.1f%% of %.1f MB (file %d/%d), %llu tokens, %.1f MB/s ",
                pct, (double)p->bytes_total / 1e6, p->file_index + 1, p->n_files,
                (unsigned long long)tokens, mb_per_s);
    else
        fprintf(stderr, "rwkvpipe tokenize: %.1f%% of %.1f MB (file %d/%d), %llu tokens, %.1f MB/s\n",
                pct, (double)p->bytes_total / 1e6, p->file_index + 1, p->n_files,
                (unsigned long long)tokens, mb_per_s);
    if (final && p->tty) fputc('\n', stderr);
    fflush(stderr);
}

static void on_progress(uint64_t done, uint64_t total, uint64_t tokens, void *user) {
    (void)total;
    progress_state *p = user;
    if (p->quiet) return;
    double t = rp_now_seconds();
    /* A terminal line is redrawn often; a log file gets a line every 5 s. */
    if (t - p->last_report_s < (p->tty ? 0.25 : 5.0)) return;
    p->last_report_s = t;
    print_progress(p, done, tokens, 0);
}

int cmd_tokenize(rp_cli *cli, int argc, char **argv) {
    static const struct option longopts[] = {{"vocab", required_argument, 0, 'v'},
                                             {"output", required_argument, 0, 'o'},
                                             {"shard-tokens", required_argument, 0, 's'},
                                             {"format", required_argument, 0, 'F'},
                                             {"force", no_argument, 0, 'f'},
                                             {"quiet", no_argument, 0, 'q'},
                                             {"help", no_argument, 0, 'h'},
                                             {0, 0, 0, 0}};
    const char *vocab = NULL, *out = NULL;
    rp_tokenize_options opt = {0};
    rp_input_kind kind = RP_INPUT_AUTO;
    progress_state prog = {0};
    int c;
    optind = 1;
    while ((c = getopt_long(argc, argv, "ho:q", longopts, NULL)) != -1) {
        switch (c) {
        case 'v': vocab = optarg; break;
        case 'o': out = optarg; break;
        case 's':
            opt.shard_tokens = (uint64_t)cli_parse_int(cli, "--shard-tokens", optarg, 1, (long long)1 << 40);
            break;
        case 'F':
            if (strcmp(optarg, "auto") == 0) kind = RP_INPUT_AUTO;
            else if (strcmp(optarg, "text") == 0) kind = RP_INPUT_TEXT;
            else if (strcmp(optarg, "jsonl") == 0) kind = RP_INPUT_JSONL;
            else cli_fatal(cli, "--format: '%s' is not auto, text or jsonl", optarg);
            break;
        case 'f': opt.overwrite = 1; break;
        case 'q': prog.quiet = 1; break;
        case 'h': tokenize_usage(stdout); return 0;
        default: tokenize_usage(stderr); return 2;
        }
    }
    if (!vocab)
        cli_fatal(cli, "--vocab is required: 'bytes' or the path of a World vocabulary file "
                       "(rwkv_vocab_v20230424.txt)");
    if (strcmp(vocab, "world") == 0 && access(vocab, F_OK) != 0)
        cli_fatal(cli, "--vocab world: pass the path of the World vocabulary file "
                       "(rwkv_vocab_v20230424.txt) instead of the word 'world'");
    if (!out) cli_fatal(cli, "-o OUT_PREFIX is required (shards become OUT_PREFIX-00000.tok, ...)");
    if (optind >= argc) cli_fatal(cli, "no input files (give IN [IN...])");

    prog.n_files = argc - optind;
    for (int i = optind; i < argc; i++) {
        struct stat sb;
        if (stat(argv[i], &sb) != 0) cli_fatal(cli, "%s: cannot open input file", argv[i]);
        if (S_ISDIR(sb.st_mode)) cli_fatal(cli, "%s: is a directory; list its files", argv[i]);
        prog.bytes_total += (uint64_t)sb.st_size;
    }

    rp_error err;
    rp_tokenizer *tok;
    if (rp_tokenizer_open(&tok, vocab, &err) != RP_OK) cli_fatal_error(cli, &err);
    prog.tty = isatty(STDERR_FILENO);
    prog.start_s = prog.last_report_s = rp_now_seconds();
    opt.progress = on_progress;
    opt.progress_user = &prog;
    rp_tokenize_run *run;
    if (rp_tokenize_begin(&run, out, tok, &opt, &err) != RP_OK) cli_fatal_error(cli, &err);
    for (int i = optind; i < argc; i++) {
        prog.file_index = i - optind;
        if (rp_tokenize_add_file(run, argv[i], kind, &err) != RP_OK) {
            if (prog.tty && !prog.quiet) fputc('\n', stderr);
            rp_tokenize_abort(run);
            cli_fatal(cli, "%s (no shards were written)", err.msg);
        }
        struct stat sb;
        if (stat(argv[i], &sb) == 0) prog.bytes_before += (uint64_t)sb.st_size;
    }
    rp_tokenize_stats stats;
    rp_tokenize_get_stats(run, &stats);
    if (!prog.quiet && (prog.tty || rp_now_seconds() - prog.start_s >= 5.0))
        print_progress(&prog, 0, stats.tokens, 1);
    if (rp_tokenize_finish(run, &stats, &err) != RP_OK) cli_fatal_error(cli, &err);

    double elapsed = rp_now_seconds() - prog.start_s;
    char first[4096], last[4096];
    rp_tokenize_shard_path(first, sizeof first, out, 0);
    rp_tokenize_shard_path(last, sizeof last, out, stats.shards - 1);
    int n_ids = rp_tokenizer_n_ids(tok);
    if (!prog.quiet) {
        cli_info(cli, "wrote %u shard%s (%s%s%s): %llu tokens (%s, %s vocabulary of %d ids), "
                      "%llu document%s",
                 stats.shards, stats.shards == 1 ? "" : "s", first, stats.shards > 1 ? " .. " : "",
                 stats.shards > 1 ? last : "", (unsigned long long)stats.tokens,
                 n_ids <= 65536 ? "u16" : "u32", rp_tokenizer_kind(tok), n_ids,
                 (unsigned long long)stats.documents, stats.documents == 1 ? "" : "s");
        cli_info(cli, "read %llu file%s, %.1f MB in %.2f s (%.1f MB/s)",
                 (unsigned long long)stats.files, stats.files == 1 ? "" : "s",
                 (double)stats.bytes / 1e6, elapsed,
                 elapsed > 0 ? (double)stats.bytes / 1e6 / elapsed : 0.0);
        if (stats.removed_stale)
            cli_info(cli, "removed %u older shard%s beyond the new last one", stats.removed_stale,
                     stats.removed_stale == 1 ? "" : "s");
        if (stats.tokens == 0) cli_info(cli, "warning: the inputs held no text; the shard is empty");
    }
    rp_tokenizer_free(tok);
    return 0;
}
