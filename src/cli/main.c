/* rwkvpipe: one binary, one subcommand per job. Initialises MPI (every
 * command works as one process or under mpirun/srun) and dispatches. */
#include "config.h"

#include <mpi.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>

#include "cli/cli.h"
#include "core/version.h"
#ifdef RP_HAVE_CUDA
#include "cuda_device.h"
#endif

typedef struct {
    const char *name;
    int (*run)(rp_cli *cli, int argc, char **argv);
    int needs_mpi;
    const char *summary;
} subcommand;

static const subcommand commands[] = {
    {"train", cmd_train, 1, "train a model (official RWKV-7 recipe) on shards or a synthetic task"},
    {"eval", cmd_eval, 1, "loss, perplexity and accuracy on token shards or a synthetic task"},
    {"generate", cmd_generate, 1, "generate text from a prompt (streams to stdout)"},
    {"serve", cmd_serve, 1, "serve a model over HTTP (OpenAI-compatible API, streaming, sessions)"},
    {"logits", cmd_logits, 1, "exact logits and final state for a token sequence"},
    {"info", cmd_info, 0, "print a model's config, parameter count and state size"},
    {"init", cmd_init, 0, "create a model with the official RWKV-7 initialisation"},
    {"quantize", cmd_quantize, 0, "write a copy of a weights file in bf16, int8 or int8row (CPU inference)"},
    {"merge-lora", cmd_merge_lora, 0, "merge LoRA adapters into a copy of their base model"},
    {"tokenize", cmd_tokenize, 0, "text / JSON-lines files -> token shards for training"},
    {"encode", cmd_encode, 0, "text -> token ids"},
    {"decode", cmd_decode, 0, "token ids -> text"},
    {"schedule", cmd_schedule, 0, "print a pipeline schedule and its simulated timeline"},
};

static void usage(FILE *out) {
    fprintf(out,
            "usage: rwkvpipe COMMAND [OPTIONS]   (or: mpirun -np N rwkvpipe COMMAND ...)\n"
            "\n"
            "Train and serve RWKV-7 language models with the layers split across MPI ranks\n"
            "(pipeline stages x data replicas: --pp P under mpirun -np N). Exact fp32 on the\n"
            "CPU; a CUDA backend (--device cuda) in builds made with --with-cuda.\n\ncommands:\n");
    for (size_t i = 0; i < sizeof commands / sizeof commands[0]; i++)
        fprintf(out, "  %-10s %s\n", commands[i].name, commands[i].summary);
    fprintf(out,
            "\n'rwkvpipe COMMAND --help' describes each command's options.\n"
            "  -h, --help      this text\n"
            "  -V, --version   version and build features\n");
}

int main(int argc, char **argv) {
    if (argc < 2) {
        usage(stderr);
        return 2;
    }
    if (strcmp(argv[1], "-h") == 0 || strcmp(argv[1], "--help") == 0 ||
        strcmp(argv[1], "help") == 0) {
        usage(stdout);
        return 0;
    }
    if (strcmp(argv[1], "-V") == 0 || strcmp(argv[1], "--version") == 0) {
        printf("%s\n", rp_build_description());
#ifdef RP_HAVE_CUDA
        int n_devices = rp_cuda_device_count();
        printf("CUDA devices visible: %d\n", n_devices);
        for (int i = 0; i < n_devices; i++) {
            char desc[256];
            rp_cuda_device_describe(i, desc, sizeof desc);
            printf("  %d: %s\n", i, desc);
        }
#endif
        return 0;
    }
    const subcommand *cmd = NULL;
    for (size_t i = 0; i < sizeof commands / sizeof commands[0]; i++)
        if (strcmp(argv[1], commands[i].name) == 0) cmd = &commands[i];
    if (!cmd) {
        fprintf(stderr, "rwkvpipe: unknown command '%s'\n\n", argv[1]);
        usage(stderr);
        return 2;
    }
    rp_cli cli = {.command = cmd->name, .mpi_rank = 0, .mpi_size = 1};
    /* Commands that never talk to other ranks skip MPI, so they work where no
     * MPI runtime can start (e.g. inside a minimal container). --help too. */
    int wants_help = 0;
    for (int i = 2; i < argc; i++)
        if (strcmp(argv[i], "--help") == 0 || strcmp(argv[i], "-h") == 0) wants_help = 1;
    if (cmd->needs_mpi && !wants_help) {
        int provided;
        if (MPI_Init_thread(&argc, &argv, MPI_THREAD_FUNNELED, &provided) != MPI_SUCCESS) {
            fprintf(stderr, "rwkvpipe %s: error: MPI_Init failed\n", cmd->name);
            return 1;
        }
        cli.mpi_initialized = 1;
        /* A peer node that dies breaks this rank's TCP connections to it: a
         * write would then kill the rank with SIGPIPE before it could say
         * which node and transfer failed. Ignored, the write fails, MPI
         * reports it and the error names the peer (docs/cluster.md). */
        signal(SIGPIPE, SIG_IGN);
        MPI_Comm_rank(MPI_COMM_WORLD, &cli.mpi_rank);
        MPI_Comm_size(MPI_COMM_WORLD, &cli.mpi_size);
    }
    int rc = cmd->run(&cli, argc - 1, argv + 1);
    if (cli.mpi_initialized) MPI_Finalize();
    return rc;
}
