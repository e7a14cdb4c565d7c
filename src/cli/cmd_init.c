/* rwkvpipe init: create a model with the official RWKV-7 initialisation and
 * write it as safetensors (official names). */
#include <getopt.h>
#include <string.h>

#include "cli/cli.h"

static void init_usage(FILE *out) {
    fprintf(out,
            "usage: rwkvpipe init --model-config NAME -o OUT.safetensors [options]\n"
            "Creates an RWKV-7 model with the official x070 initialisation (the same\n"
            "weights on every machine for the same seed) and writes it atomically.\n"
            "  --model-config NAME  built-in shape: %s\n"
            "  --vocab-size V       override the vocabulary size (e.g. 65536 for World)\n"
            "  --seed S             init seed (default 1)\n"
            "  --dtype D            f32 (default), bf16 or f16\n"
            "  -o, --output FILE    where to write\n"
            "  -h, --help           this text\n",
            rp_config_builtin_names());
}

int cmd_init(rp_cli *cli, int argc, char **argv) {
    static const struct option longopts[] = {{"model-config", required_argument, 0, 'c'},
                                             {"vocab-size", required_argument, 0, 'v'},
                                             {"seed", required_argument, 0, 's'},
                                             {"dtype", required_argument, 0, 'd'},
                                             {"output", required_argument, 0, 'o'},
                                             {"help", no_argument, 0, 'h'},
                                             {0, 0, 0, 0}};
    cli_model_options mo = {.config_name = NULL, .init_seed = 1};
    const char *out = NULL;
    rp_dtype dtype = RP_DTYPE_F32;
    int c;
    optind = 1;
    while ((c = getopt_long(argc, argv, "ho:", longopts, NULL)) != -1) {
        switch (c) {
        case 'c': mo.config_name = optarg; break;
        case 'v': mo.vocab_override = (int)cli_parse_int(cli, "--vocab-size", optarg, 2, 1 << 24); break;
        case 's': mo.init_seed = cli_parse_u64(cli, "--seed", optarg); break;
        case 'd':
            if (strcmp(optarg, "f32") == 0) dtype = RP_DTYPE_F32;
            else if (strcmp(optarg, "bf16") == 0) dtype = RP_DTYPE_BF16;
            else if (strcmp(optarg, "f16") == 0) dtype = RP_DTYPE_F16;
            else cli_fatal(cli, "--dtype: '%s' is not one of f32, bf16, f16", optarg);
            break;
        case 'o': out = optarg; break;
        case 'h': init_usage(stdout); return 0;
        default: init_usage(stderr); return 2;
        }
    }
    if (optind < argc) cli_fatal(cli, "unexpected argument '%s'", argv[optind]);
    if (!mo.config_name) cli_fatal(cli, "--model-config is required (one of %s)", rp_config_builtin_names());
    if (!out) cli_fatal(cli, "-o OUT.safetensors is required");
    rp_backend *be;
    rp_model model;
    cli_load_model(cli, &mo, &be, &model);
    rp_error err;
    if (rp_model_save(&model, out, dtype, &err) != RP_OK) cli_fatal_error(cli, &err);
    cli_info(cli, "wrote %s (%.2f M parameters, %s)", out,
             rp_config_param_count(&model.cfg) / 1e6, rp_dtype_name(dtype));
    rp_model_free(&model);
    rp_backend_destroy(be);
    return 0;
}
