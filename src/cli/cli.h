/* Shared pieces of the rwkvpipe subcommands: fatal errors (the only place
 * that prints and exits; under MPI it ends every rank), strict number
 * parsing, and getting a model from a file or a built-in config. */
#ifndef RP_CLI_CLI_H
#define RP_CLI_CLI_H

#include <stdint.h>
#include <stdio.h>

#include "backend.h"
#include "core/error.h"
#include "model/model.h"
#include "pipe/grid.h"

typedef struct {
    const char *command;  /* "generate", ... for messages */
    int mpi_rank, mpi_size;
    int mpi_initialized;
    int has_stage, stage;  /* set once the rank knows its pipeline stage (messages name it) */
} rp_cli;

/* Messages from this rank name its pipeline stage from now on. */
void cli_set_stage(rp_cli *cli, int stage);
/* Start-up report of a parallel job: the rank's place on its node (local
 * rank from an MPI_COMM_TYPE_SHARED split), the device of its backend and
 * one line per rank on stderr: host, rank, stage, replica, device, threads,
 * MPI/CUDA/rwkvpipe versions. Collective over MPI_COMM_WORLD. */
void cli_rank_startup(const rp_cli *cli, const rp_backend *be, int stage, int replica,
                      int layer_begin, int layer_end, int threads);
/* --log-dir: ranks other than 0 send their stderr to DIR/rank-NNNNN.log;
 * rank 0 keeps the terminal and gets a FILE that writes progress lines to
 * both (returned; NULL on other ranks). DIR is created if missing. */
FILE *cli_open_rank_logs(const rp_cli *cli, const char *dir);

/* CPU threads for one rank: the cores this process may run on, shared with
 * the other ranks on the same node (collective over MPI_COMM_WORLD). */
int cli_threads_per_rank(void);

/* Prints "rwkvpipe COMMAND: error: MESSAGE" and ends the process (all ranks). */
void cli_fatal(const rp_cli *cli, const char *fmt, ...) __attribute__((format(printf, 2, 3), noreturn));
/* Same with an rp_error. */
void cli_fatal_error(const rp_cli *cli, const rp_error *err) __attribute__((noreturn));
/* calloc / realloc that end the process through cli_fatal, naming `what`
 * and the size, when memory is short (the CLI's only allocation failure
 * path: there is nothing to do after it but stop). */
void *cli_calloc(const rp_cli *cli, size_t count, size_t size, const char *what);
void *cli_realloc(const rp_cli *cli, void *p, size_t bytes, const char *what);

/* A rank whose error every rank found alike (a diverged run) waits here
 * for rank 0 to report it and end the job (collective over
 * MPI_COMM_WORLD, which rank 0 never joins: its cli_fatal aborts it). */
void cli_wait_for_job_end(const rp_cli *cli);
/* Progress/info on stderr (rank 0 only), prefixed with the command. */
void cli_info(const rp_cli *cli, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* Strict parsers: the whole string must be a number in [min, max]; otherwise
 * fatal with "OPTION: 'TEXT' is not ...". */
long long cli_parse_int(const rp_cli *cli, const char *option, const char *text, long long min,
                        long long max);
double cli_parse_double(const rp_cli *cli, const char *option, const char *text, double min,
                        double max);
uint64_t cli_parse_u64(const rp_cli *cli, const char *option, const char *text);

/* Parses "1,2,3" / "1 2 3" (commas, spaces, newlines) into a malloc'ed array. */
int32_t *cli_parse_ids(const rp_cli *cli, const char *what, const char *text, size_t *n_ids);
/* Reads a whole file (or "-" = stdin) into a malloc'ed NUL-terminated buffer. */
char *cli_read_file(const rp_cli *cli, const char *path, size_t *n_bytes);

/* Model from --model FILE or --model-config NAME (official init with seed). */
typedef struct {
    const char *model_path;    /* NULL: use config_name */
    const char *config_name;   /* built-in name */
    int vocab_override;        /* for built-ins, 0 = the config's */
    uint64_t init_seed;
    int threads;               /* CPU threads, 0 = default */
    const char *device;        /* --device auto|cpu|cuda; NULL = auto */
    const char *gpu_math;      /* --gpu-math bf16|fp32; NULL = bf16 */
    int weights_dtype;         /* --weights-dtype: rp_weights_type; -1 (or 0 in a zeroed
                                * struct that never saw the option: see weights_dtype_set) */
    int weights_dtype_set;     /* 0: the file's own format */
    int for_training;          /* train: refuse int8 files and --weights-dtype */
    const char *lora_path;     /* serve --lora: adapters merged into the weights at load */
    int for_decode;            /* serve, generate: --pp without --stage-layers weighs the
                                * head by its decode cost (rp_partition_balanced_decode) */
} cli_model_options;

/* Help lines and the parsing of --device / --gpu-math, shared by every
 * command that computes. */
#define CLI_DEVICE_HELP \
    "  --device auto|cpu|cuda  where to compute (default auto: the GPU when this build has\n" \
    "                        CUDA and one is visible; rank r takes GPU local-rank mod count)\n" \
    "  --gpu-math bf16|fp32  GPU GEMM precision (default bf16 with fp32 accumulation;\n" \
    "                        fp32 matches the CPU backend to ~1e-6, for checks)\n"
void cli_parse_device(const rp_cli *cli, cli_model_options *opt, const char *text);
/* --weights-dtype, shared by the commands that load weights for inference. */
#define CLI_WEIGHTS_HELP \
    "  --weights-dtype T     f32|bf16|int8|int8row: hold the big matrices in this format,\n" \
    "                        converted while loading (CPU only; default: the file's\n" \
    "                        own, docs/perf/cpu.md); `rwkvpipe quantize` writes files\n"
void cli_parse_weights_dtype(const rp_cli *cli, cli_model_options *opt, const char *text);
void cli_parse_gpu_math(const rp_cli *cli, cli_model_options *opt, const char *text);

/* This rank's backend from --device / --gpu-math / --threads (fatal with the
 * fix when CUDA is asked for but not built or not visible). Not collective:
 * the node-local rank comes from the launcher's environment. */
rp_backend *cli_backend_create(const rp_cli *cli, const cli_model_options *opt);

void cli_load_model(const rp_cli *cli, const cli_model_options *opt, rp_backend **be,
                    rp_model *model);

/* The config of --model FILE (from its tensor shapes) or of the built-in
 * --model-config. */
void cli_model_config(const rp_cli *cli, const cli_model_options *opt, rp_config *cfg);
/* The job's grid over MPI_COMM_WORLD: pp stages (layers from the
 * --stage-layers LIST or balanced by cost) x ranks / pp replicas. Messages of
 * cli name the stage from then on. Collective. */
void cli_grid_create(rp_cli *cli, const rp_config *cfg, int pp, const char *stage_layers,
                     rp_grid *grid);
/* Layers [begin, end) of the model (with the embedding / head when the range
 * starts at 0 / ends at n_layer): read from opt->model_path, or made with the
 * official init (counter-based: every stage builds exactly its slice). */
void cli_load_model_part(const rp_cli *cli, const cli_model_options *opt, const rp_config *cfg,
                         int begin, int end, rp_backend *be, rp_model *model);

/* Under mpirun with --pp P (> 1): the grid (P stages, layers from the
 * --stage-layers LIST or balanced by cost, ranks / P replicas), this rank's
 * backend (opt->threads, default cores / ranks on the node) and its stage's
 * part of the model, read from opt->model_path or made with the official
 * init (counter-based: every stage builds exactly its slice of one model).
 * Messages of cli name the stage from then on. Collective. */
void cli_load_stage_model(rp_cli *cli, cli_model_options *opt, int pp, const char *stage_layers,
                          rp_grid *grid, rp_backend **be, rp_model *model);

/* --data inputs that are text / JSON-lines files (not .tok shards) are
 * tokenized with `vocab` into a new temporary directory tmp_dir (prefix
 * `prefix`); their entries in the NULL-terminated paths[] are replaced by one
 * entry naming that directory. Returns the shards written (0: nothing to do). */
int cli_tokenize_text_inputs(const rp_cli *cli, const char **paths, int n_paths,
                             const char *vocab, char *tmp_dir, size_t tmp_size, char *prefix,
                             size_t prefix_size);
void cli_remove_tokenized(const char *tmp_dir, const char *prefix, int n_shards);

/* Subcommands. argv[0] is the subcommand name. */
int cmd_encode(rp_cli *cli, int argc, char **argv);
int cmd_decode(rp_cli *cli, int argc, char **argv);
int cmd_generate(rp_cli *cli, int argc, char **argv);
int cmd_logits(rp_cli *cli, int argc, char **argv);
int cmd_info(rp_cli *cli, int argc, char **argv);
int cmd_init(rp_cli *cli, int argc, char **argv);
int cmd_quantize(rp_cli *cli, int argc, char **argv);
int cmd_merge_lora(rp_cli *cli, int argc, char **argv);
int cmd_tokenize(rp_cli *cli, int argc, char **argv);
int cmd_train(rp_cli *cli, int argc, char **argv);
int cmd_eval(rp_cli *cli, int argc, char **argv);
int cmd_schedule(rp_cli *cli, int argc, char **argv);
int cmd_serve(rp_cli *cli, int argc, char **argv);

#endif
