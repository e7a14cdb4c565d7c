/* rwkvpipe info: a model's config, parameter count and state size, from the
 * tensor shapes of a file (no weights are read) or a built-in config. */
#include <getopt.h>
#include <string.h>

#include <sys/stat.h>

#include "cli/cli.h"
#include "model/model.h"
#include "train/checkpoint.h"

static void info_usage(FILE *out) {
    fprintf(out,
            "usage: rwkvpipe info MODEL.safetensors\n"
            "       rwkvpipe info CHECKPOINT_DIR [--verify]\n"
            "       rwkvpipe info --model-config NAME [--vocab-size V]\n"
            "Prints the RWKV-7 hyper-parameters (derived from tensor shapes), the\n"
            "parameter count and the recurrent state size per sequence.\n"
            "  --model-config NAME  a built-in shape: %s\n"
            "  --vocab-size V       override the built-in's vocabulary size\n"
            "  --verify             for a checkpoint: also check every file's SHA-256\n"
            "  -h, --help           this text\n",
            rp_config_builtin_names());
}

static void print_config(const rp_config *c) {
    long long params = rp_config_param_count(c);
    long long non_emb = rp_config_param_count_non_embedding(c);
    long long state_floats = rp_config_state_floats_per_layer(c) * c->n_layer;
    printf("arch         : RWKV-7 (x070)\n");
    printf("n_layer      : %d\n", c->n_layer);
    printf("n_embd       : %d (%d heads x %d)\n", c->n_embd, c->n_head, c->head_size);
    printf("vocab_size   : %d\n", c->vocab_size);
    printf("dim_ffn      : %d\n", c->dim_ffn);
    printf("LoRA ranks   : decay %d, iclr %d, value %d, gate %d\n", c->d_decay, c->d_iclr,
           c->d_value, c->d_gate);
    printf("parameters   : %lld (%.2f M; non-embedding %.2f M)\n", params, params / 1e6,
           non_emb / 1e6);
    printf("weights fp32 : %.1f MiB\n", params * 4.0 / (1 << 20));
    printf("state        : %lld floats = %.2f MiB per sequence (%d layers x (2 x %d + %d x %d x %d))\n",
           state_floats, state_floats * 4.0 / (1 << 20), c->n_layer, c->n_embd, c->n_head,
           c->head_size, c->head_size);
}

/* Hidden (for tests/test_convert.sh, which compares it with the converter's
 * table): the official <-> HF/fla name map, one tab-separated row each. */
static void print_hf_names(void) {
    int n;
    const rp_hf_name *map = rp_hf_names(&n);
    for (int i = 0; i < n; i++)
        printf("%s\t%s\t%s\t%s\n", map[i].per_layer ? "layer" : "global", map[i].official,
               map[i].hf, rp_hf_kind_name(map[i].kind));
}

int cmd_info(rp_cli *cli, int argc, char **argv) {
    static const struct option longopts[] = {{"model-config", required_argument, 0, 'c'},
                                             {"vocab-size", required_argument, 0, 'v'},
                                             {"verify", no_argument, 0, 'y'},
                                             {"hf-names", no_argument, 0, 'n'},
                                             {"help", no_argument, 0, 'h'},
                                             {0, 0, 0, 0}};
    const char *config_name = NULL;
    int vocab = 0, verify = 0;
    int c;
    optind = 1;
    while ((c = getopt_long(argc, argv, "h", longopts, NULL)) != -1) {
        switch (c) {
        case 'c': config_name = optarg; break;
        case 'v': vocab = (int)cli_parse_int(cli, "--vocab-size", optarg, 2, 1 << 24); break;
        case 'y': verify = 1; break;
        case 'n': print_hf_names(); return 0;
        case 'h': info_usage(stdout); return 0;
        default: info_usage(stderr); return 2;
        }
    }
    rp_error err;
    rp_config cfg;
    if (config_name) {
        if (optind < argc) cli_fatal(cli, "give either a model file or --model-config, not both");
        if (rp_config_builtin(&cfg, config_name, vocab, &err) != RP_OK) cli_fatal_error(cli, &err);
        printf("model        : built-in '%s'\n", config_name);
        print_config(&cfg);
        return 0;
    }
    if (optind != argc - 1) {
        info_usage(stderr);
        return 2;
    }
    struct stat sb;
    if (stat(argv[optind], &sb) == 0 && S_ISDIR(sb.st_mode)) {
        if (rp_ckpt_describe(argv[optind], stdout, &err) != RP_OK) cli_fatal_error(cli, &err);
        if (verify) {
            if (rp_ckpt_verify(argv[optind], &err) != RP_OK) cli_fatal_error(cli, &err);
            printf("verified     : every file's size and SHA-256 match the manifest\n");
        }
        return 0;
    }
    rp_st_file f;
    if (rp_st_open(&f, argv[optind], &err) != RP_OK) cli_fatal_error(cli, &err);
    rp_naming naming;
    if (rp_config_from_safetensors(&f, &cfg, &naming, &err) != RP_OK) cli_fatal_error(cli, &err);
    int dtype_count[RP_DTYPE_COUNT] = {0};
    for (int i = 0; i < f.n_tensors; i++) dtype_count[f.tensors[i].dtype]++;
    printf("model        : %s (%s names)\n", argv[optind],
           naming == RP_NAMING_OFFICIAL ? "official RWKV-LM" : "HF/fla");
    print_config(&cfg);
    printf("tensors      : %d (", f.n_tensors);
    int first = 1;
    for (int d = 0; d < RP_DTYPE_COUNT; d++)
        if (dtype_count[d]) {
            printf("%s%s %d", first ? "" : ", ", rp_dtype_name((rp_dtype)d), dtype_count[d]);
            first = 0;
        }
    printf(")\n");
    const char *creator = rp_st_meta(&f, "created_by");
    if (creator) printf("created by   : %s\n", creator);
    rp_st_close(&f);
    return 0;
}
