/* rwkvpipe merge-lora: adds LoRA adapters (train --tune lora --lora-out)
 * into a copy of their base model, W += (alpha/r) B A for every adapted
 * matrix, and writes the result as f32 safetensors atomically (temp name,
 * fsync, rename). The base file is only read. */
#include <getopt.h>
#include <stdio.h>
#include <string.h>

#include "cli/cli.h"
#include "cpu/cpu_backend.h"
#include "model/lora.h"

static void merge_usage(FILE *out) {
    fprintf(out,
            "usage: rwkvpipe merge-lora BASE.safetensors LORA.safetensors -o OUT.safetensors\n"
            "Writes BASE with the adapters of LORA merged in: W += (alpha/r) B A on every\n"
            "matrix LORA adapts (its metadata gives rank, alpha and targets). OUT is f32\n"
            "(quantize it afterwards if wanted); serve --lora does the same at load.\n"
            "  -o, --output FILE   where to write (atomically: temp name, fsync, rename)\n"
            "  -q, --quiet         no progress on stderr\n"
            "  -h, --help          this text\n");
}

static void on_progress(void *ctx, const char *name, int done, int total) {
    const rp_cli *cli = ctx;
    cli_info(cli, "merged %s (%d/%d)", name, done, total);
}

int cmd_merge_lora(rp_cli *cli, int argc, char **argv) {
    static const struct option longopts[] = {{"output", required_argument, 0, 'o'},
                                             {"quiet", no_argument, 0, 'q'},
                                             {"help", no_argument, 0, 'h'},
                                             {0, 0, 0, 0}};
    const char *out = NULL;
    int quiet = 0, c;
    optind = 1;
    while ((c = getopt_long(argc, argv, "ho:q", longopts, NULL)) != -1) {
        switch (c) {
        case 'o': out = optarg; break;
        case 'q': quiet = 1; break;
        case 'h': merge_usage(stdout); return 0;
        default: merge_usage(stderr); return 2;
        }
    }
    if (argc - optind < 2)
        cli_fatal(cli, "BASE.safetensors and LORA.safetensors are required (rwkvpipe merge-lora "
                  "--help)");
    if (argc - optind > 2) cli_fatal(cli, "unexpected argument '%s'", argv[optind + 2]);
    if (!out) cli_fatal(cli, "-o OUT.safetensors is required");
    const char *base = argv[optind], *lora = argv[optind + 1];
    if (strcmp(out, base) == 0 || strcmp(out, lora) == 0)
        cli_fatal(cli, "-o %s would overwrite an input: write the merged model elsewhere", out);
    rp_error err;
    rp_backend *be = rp_cpu_backend_create(0, &err);
    if (!be) cli_fatal_error(cli, &err);
    rp_model model;
    const rp_load_options lo = {.wtype = -1, .for_training = 1};  /* f32 in memory */
    rp_cli quiet_cli = *cli;
    if (quiet) quiet_cli.mpi_rank = -1;
    cli_info(&quiet_cli, "loading %s", base);
    if (rp_model_load_as(&model, base, 0, -1, &lo, be, &err) != RP_OK) cli_fatal_error(cli, &err);
    if (rp_lora_merge_file(&model, lora, quiet ? NULL : on_progress, &quiet_cli, &err) != RP_OK)
        cli_fatal_error(cli, &err);
    if (rp_model_save(&model, out, RP_DTYPE_F32, &err) != RP_OK) cli_fatal_error(cli, &err);
    cli_info(&quiet_cli, "wrote %s", out);
    rp_model_free(&model);
    rp_backend_destroy(be);
    return 0;
}
