/* rwkvpipe encode / decode: the tokenizers from the command line. */
#include <getopt.h>
#include <stdlib.h>
#include <string.h>

#include "cli/cli.h"
#include "text/tokenizer.h"

static rp_tokenizer *open_tokenizer(const rp_cli *cli, const char *spec) {
    if (!spec) cli_fatal(cli, "--vocab is required: 'bytes' or a rwkv_vocab_v20230424.txt file");
    rp_tokenizer *tok;
    rp_error err;
    if (rp_tokenizer_open(&tok, spec, &err) != RP_OK) cli_fatal_error(cli, &err);
    return tok;
}

static void encode_usage(FILE *out) {
    fprintf(out,
            "usage: rwkvpipe encode --vocab bytes|VOCAB_FILE [TEXT]\n"
            "Prints the token ids of TEXT (or of standard input when TEXT is absent),\n"
            "comma-separated, on one line.\n"
            "  --vocab V   'bytes' (id = byte value) or a World vocabulary file\n"
            "              (rwkv_vocab_v20230424.txt format)\n"
            "  -h, --help  this text\n");
}

int cmd_encode(rp_cli *cli, int argc, char **argv) {
    static const struct option longopts[] = {
        {"vocab", required_argument, 0, 'v'}, {"help", no_argument, 0, 'h'}, {0, 0, 0, 0}};
    const char *vocab = NULL;
    int c;
    optind = 1;
    while ((c = getopt_long(argc, argv, "hv:", longopts, NULL)) != -1) {
        switch (c) {
        case 'v': vocab = optarg; break;
        case 'h': encode_usage(stdout); return 0;
        default: encode_usage(stderr); return 2;
        }
    }
    if (argc - optind > 1) cli_fatal(cli, "expected at most one TEXT argument (quote it)");
    rp_tokenizer *tok = open_tokenizer(cli, vocab);
    size_t n;
    char *text = optind < argc ? strdup(argv[optind]) : cli_read_file(cli, "-", &n);
    if (optind < argc) n = strlen(text);
    int32_t *ids;
    size_t n_ids;
    rp_error err;
    if (rp_tokenizer_encode(tok, (const uint8_t *)text, n, &ids, &n_ids, &err) != RP_OK)
        cli_fatal_error(cli, &err);
    for (size_t i = 0; i < n_ids; i++) printf(i ? ",%d" : "%d", ids[i]);
    printf("\n");
    free(ids);
    free(text);
    rp_tokenizer_free(tok);
    return 0;
}

static void decode_usage(FILE *out) {
    fprintf(out,
            "usage: rwkvpipe decode --vocab bytes|VOCAB_FILE [IDS]\n"
            "Prints the text of comma- or space-separated token ids (or of ids read from\n"
            "standard input when IDS is absent). The bytes are written exactly, with no\n"
            "newline added.\n"
            "  --vocab V   'bytes' or a World vocabulary file\n"
            "  -h, --help  this text\n");
}

int cmd_decode(rp_cli *cli, int argc, char **argv) {
    static const struct option longopts[] = {
        {"vocab", required_argument, 0, 'v'}, {"help", no_argument, 0, 'h'}, {0, 0, 0, 0}};
    const char *vocab = NULL;
    int c;
    optind = 1;
    while ((c = getopt_long(argc, argv, "hv:", longopts, NULL)) != -1) {
        switch (c) {
        case 'v': vocab = optarg; break;
        case 'h': decode_usage(stdout); return 0;
        default: decode_usage(stderr); return 2;
        }
    }
    rp_tokenizer *tok = open_tokenizer(cli, vocab);
    char *text = NULL;
    if (optind < argc) {
        size_t total = 1;
        for (int i = optind; i < argc; i++) total += strlen(argv[i]) + 1;
        text = cli_calloc(cli, total, 1, "the joined text arguments");
        for (int i = optind; i < argc; i++) {
            strcat(text, argv[i]);
            strcat(text, " ");
        }
    } else {
        text = cli_read_file(cli, "-", NULL);
    }
    size_t n_ids;
    int32_t *ids = cli_parse_ids(cli, "IDS", text, &n_ids);
    uint8_t *bytes;
    size_t n_bytes;
    rp_error err;
    if (rp_tokenizer_decode(tok, ids, n_ids, &bytes, &n_bytes, &err) != RP_OK)
        cli_fatal_error(cli, &err);
    fwrite(bytes, 1, n_bytes, stdout);  /* exactly the bytes: no newline added */
    free(bytes);
    free(ids);
    free(text);
    rp_tokenizer_free(tok);
    return 0;
}
