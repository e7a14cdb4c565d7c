/* Shared CLI helpers (cli.h). */
#include "cli/cli.h"

#include "config.h"

#include <sched.h>

#include <errno.h>
#include <limits.h>
#include <math.h>
#include <mpi.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "core/fileio.h"
#include "core/version.h"
#include "cpu/cpu_backend.h"
#include "cpu/cpu_fake_device.h"
#include "cpu/cpu_wait.h"
#include "model/init.h"
#include "model/lora.h"
#ifdef RP_HAVE_CUDA
#include "cuda_backend.h"
#include "cuda_device.h"
#endif
#include "text/tokenizer.h"
#include "train/tokenize.h"

static void vreport(const rp_cli *cli, const char *level, const char *fmt, va_list ap) {
    char msg[2048];
    vsnprintf(msg, sizeof msg, fmt, ap);
    if (cli->mpi_size > 1 && cli->has_stage)
        fprintf(stderr, "rwkvpipe %s [rank %d/%d, stage %d]: %s%s\n", cli->command,
                cli->mpi_rank, cli->mpi_size, cli->stage, level, msg);
    else if (cli->mpi_size > 1)
        fprintf(stderr, "rwkvpipe %s [rank %d/%d]: %s%s\n", cli->command, cli->mpi_rank,
                cli->mpi_size, level, msg);
    else
        fprintf(stderr, "rwkvpipe %s: %s%s\n", cli->command, level, msg);
}

void *cli_calloc(const rp_cli *cli, size_t count, size_t size, const char *what) {
    void *p = calloc(count ? count : 1, size ? size : 1);
    if (!p) cli_fatal(cli, "out of memory for %s (%zu x %zu bytes)", what, count, size);
    return p;
}

void *cli_realloc(const rp_cli *cli, void *p, size_t bytes, const char *what) {
    void *q = realloc(p, bytes ? bytes : 1);
    if (!q) cli_fatal(cli, "out of memory for %s (%zu bytes)", what, bytes);
    return q;
}

void cli_fatal(const rp_cli *cli, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vreport(cli, "error: ", fmt, ap);
    va_end(ap);
    fflush(stdout);
    fflush(stderr);
    if (cli->mpi_initialized) {
        if (cli->mpi_size > 1) MPI_Abort(MPI_COMM_WORLD, 1);
        MPI_Finalize();
    }
    exit(1);
}

void cli_fatal_error(const rp_cli *cli, const rp_error *err) { cli_fatal(cli, "%s", err->msg); }

void cli_wait_for_job_end(const rp_cli *cli) {
    if (cli->mpi_initialized && cli->mpi_size > 1) MPI_Barrier(MPI_COMM_WORLD);
}

void cli_set_stage(rp_cli *cli, int stage) {
    cli->has_stage = 1;
    cli->stage = stage;
}

static int local_rank_and_size(int *local_size) {
    MPI_Comm node;
    int local = 0;
    *local_size = 1;
    if (MPI_Comm_split_type(MPI_COMM_WORLD, MPI_COMM_TYPE_SHARED, 0, MPI_INFO_NULL, &node) ==
        MPI_SUCCESS) {
        MPI_Comm_rank(node, &local);
        MPI_Comm_size(node, local_size);
        MPI_Comm_free(&node);
    }
    return local;
}

void cli_rank_startup(const rp_cli *cli, const rp_backend *be, int stage, int replica,
                      int layer_begin, int layer_end, int threads) {
    int local_size;
    const int local = local_rank_and_size(&local_size);
    char host[64] = "";
    gethostname(host, sizeof host - 1);
    char mpi[MPI_MAX_LIBRARY_VERSION_STRING] = "";
    int len = 0;
    MPI_Get_library_version(mpi, &len);
    char *nl = strchr(mpi, '\n');
    if (nl) *nl = '\0';
    char *comma = strchr(mpi, ',');
    if (comma) *comma = '\0';  /* "Open MPI v4.1.4" without the package details */
    char device[512] = "cpu";
    if (be && strcmp(be->name, "fake-device") == 0)  /* RWKVPIPE_TEST_FAKE_DEVICE=1 */
        snprintf(device, sizeof device, "fake-device (CPU arithmetic, test hook)");
#ifdef RP_HAVE_CUDA
    if (be && strcmp(be->name, "cuda") == 0) {
        const int index = rp_cuda_backend_device(be);
        char desc[200], versions[100];
        rp_cuda_device_describe(index, desc, sizeof desc);
        rp_cuda_versions(versions, sizeof versions);
        snprintf(device, sizeof device, "gpu %d: %s, %s GEMMs, %s", index, desc,
                 rp_cuda_math_name(rp_cuda_backend_math(be)), versions);
    }
#endif
    fprintf(stderr, "rwkvpipe %s: rank %d/%d on %s (local %d/%d): stage %d (layers %d-%d), "
            "replica %d, device %s, %d thread%s, %s, %s, OpenMP wait: %s\n", cli->command,
            cli->mpi_rank, cli->mpi_size, host, local, local_size, stage, layer_begin,
            layer_end - 1, replica, device, threads, threads == 1 ? "" : "s", mpi,
            rp_build_description(), rp_cpu_wait_policy());
    fflush(stderr);
}

/* The node-local rank from the launcher (Open MPI, Slurm, MPICH/Hydra);
 * 0 when none says. Read from the environment so that choosing a GPU needs
 * no collective call. */
static int launcher_local_rank(void) {
    const char *names[] = {"OMPI_COMM_WORLD_LOCAL_RANK", "SLURM_LOCALID", "MPI_LOCALRANKID",
                           "PMI_LOCAL_RANK"};
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++) {
        const char *v = getenv(names[i]);
        if (v && *v) return atoi(v);
    }
    return 0;
}

void cli_parse_device(const rp_cli *cli, cli_model_options *opt, const char *text) {
    if (strcmp(text, "auto") && strcmp(text, "cpu") && strcmp(text, "cuda"))
        cli_fatal(cli, "--device: '%s' is not auto, cpu or cuda", text);
    opt->device = text;
}

void cli_parse_weights_dtype(const rp_cli *cli, cli_model_options *opt, const char *text) {
    if (strcmp(text, "f32") == 0 || strcmp(text, "fp32") == 0) opt->weights_dtype = RP_WEIGHTS_F32;
    else if (strcmp(text, "bf16") == 0) opt->weights_dtype = RP_WEIGHTS_BF16;
    else if (strcmp(text, "int8") == 0) opt->weights_dtype = RP_WEIGHTS_INT8;
    else if (strcmp(text, "int8row") == 0) opt->weights_dtype = RP_WEIGHTS_INT8ROW;
    else cli_fatal(cli, "--weights-dtype: '%s' is not f32, bf16, int8 or int8row", text);
    opt->weights_dtype_set = 1;
}

void cli_parse_gpu_math(const rp_cli *cli, cli_model_options *opt, const char *text) {
    if (strcmp(text, "bf16") && strcmp(text, "fp32"))
        cli_fatal(cli, "--gpu-math: '%s' is not bf16 or fp32", text);
    opt->gpu_math = text;
}

rp_backend *cli_backend_create(const rp_cli *cli, const cli_model_options *opt) {
    const char *device = opt->device ? opt->device : "auto";
    rp_error err;
    rp_backend *be = NULL;
    /* Test hook, like RWKVPIPE_TEST_CRASH: the CPU arithmetic on memory the
     * host cannot touch, so tests catch host dereferences of backend memory. */
    const char *fake = getenv("RWKVPIPE_TEST_FAKE_DEVICE");
    if (fake && strcmp(fake, "1") == 0 && strcmp(device, "cuda") != 0) {
        if (!(be = rp_fake_device_backend_create(opt->threads, &err)))
            cli_fatal_error(cli, &err);
        return be;
    }
#ifdef RP_HAVE_CUDA
    const int count = rp_cuda_device_count();
    if (strcmp(device, "cuda") == 0 && count == 0)
        cli_fatal(cli, "--device cuda: no CUDA device is visible (check CUDA_VISIBLE_DEVICES "
                  "and the driver with nvidia-smi), or use --device cpu");
    if (strcmp(device, "cpu") != 0 && count > 0) {
        const int index = count == 1 ? 0 : launcher_local_rank() % count;
        const int math = rp_cuda_math_parse(opt->gpu_math ? opt->gpu_math : "bf16");
        if (!(be = rp_cuda_backend_create(index, (rp_cuda_math)math, &err)))
            cli_fatal_error(cli, &err);
        return be;
    }
#else
    if (strcmp(device, "cuda") == 0)
        cli_fatal(cli, "--device cuda: this rwkvpipe was built without CUDA; rebuild with "
                  "launch/build cuda (configure --with-cuda, see docs/gpu.md) or use --device cpu");
    (void)launcher_local_rank;
#endif
    if (!(be = rp_cpu_backend_create(opt->threads, &err))) cli_fatal_error(cli, &err);
    return be;
}

/* A FILE that writes to two others (rank 0's progress: terminal and log). */
typedef struct {
    FILE *a, *b;
} tee_files;

static ssize_t tee_write(void *cookie, const char *buf, size_t size) {
    tee_files *t = cookie;
    fwrite(buf, 1, size, t->a);
    fflush(t->a);
    fwrite(buf, 1, size, t->b);
    fflush(t->b);
    return (ssize_t)size;
}

static int tee_close(void *cookie) {
    tee_files *t = cookie;
    fclose(t->b);
    free(t);
    return 0;
}

FILE *cli_open_rank_logs(const rp_cli *cli, const char *dir) {
    rp_error err;
    if (rp_mkdir_p(dir, 0777, &err) != RP_OK) cli_fatal(cli, "--log-dir: %s", err.msg);
    char path[4096];
    snprintf(path, sizeof path, "%s/rank-%05d.log", dir, cli->mpi_rank);
    if (cli->mpi_rank != 0) {
        if (!freopen(path, "a", stderr)) {
            /* stderr is gone; nothing left to report the problem on. */
            exit(1);
        }
        setvbuf(stderr, NULL, _IOLBF, 0);
        return NULL;
    }
    FILE *file = fopen(path, "a");
    if (!file) cli_fatal(cli, "--log-dir: cannot open %s: %s", path, strerror(errno));
    tee_files *t = cli_calloc(cli, 1, sizeof *t, "the --log-dir tee");
    t->a = stderr;
    t->b = file;
    cookie_io_functions_t io = {.write = tee_write, .close = tee_close};
    FILE *tee = fopencookie(t, "w", io);
    if (!tee) cli_fatal(cli, "--log-dir: fopencookie failed");
    setvbuf(tee, NULL, _IOLBF, 0);
    return tee;
}

int cli_threads_per_rank(void) {
    MPI_Comm node;
    int local = 1;
    if (MPI_Comm_split_type(MPI_COMM_WORLD, MPI_COMM_TYPE_SHARED, 0, MPI_INFO_NULL, &node) ==
        MPI_SUCCESS) {
        MPI_Comm_size(node, &local);
        MPI_Comm_free(&node);
    }
    long online = sysconf(_SC_NPROCESSORS_ONLN);
    int threads = (int)(online > 0 ? online : 1) / (local > 0 ? local : 1);
    /* mpirun may bind each rank to fewer cores than that. */
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof set, &set) == 0 && CPU_COUNT(&set) < threads)
        threads = CPU_COUNT(&set);
    return threads > 0 ? threads : 1;
}

void cli_info(const rp_cli *cli, const char *fmt, ...) {
    if (cli->mpi_rank != 0) return;
    va_list ap;
    va_start(ap, fmt);
    vreport(cli, "", fmt, ap);
    va_end(ap);
}

long long cli_parse_int(const rp_cli *cli, const char *option, const char *text, long long min,
                        long long max) {
    char *end;
    errno = 0;
    long long v = strtoll(text, &end, 10);
    if (errno || end == text || *end != '\0')
        cli_fatal(cli, "%s: '%s' is not an integer", option, text);
    if (v < min || v > max)
        cli_fatal(cli, "%s: %lld is out of range [%lld, %lld]", option, v, min, max);
    return v;
}

double cli_parse_double(const rp_cli *cli, const char *option, const char *text, double min,
                        double max) {
    char *end;
    errno = 0;
    double v = strtod(text, &end);
    if (errno || end == text || *end != '\0' || !isfinite(v))
        cli_fatal(cli, "%s: '%s' is not a number", option, text);
    if (v < min || v > max) cli_fatal(cli, "%s: %g is out of range [%g, %g]", option, v, min, max);
    return v;
}

uint64_t cli_parse_u64(const rp_cli *cli, const char *option, const char *text) {
    char *end;
    errno = 0;
    if (text[0] == '-') cli_fatal(cli, "%s: '%s' must not be negative", option, text);
    unsigned long long v = strtoull(text, &end, 10);
    if (errno || end == text || *end != '\0')
        cli_fatal(cli, "%s: '%s' is not a non-negative integer", option, text);
    return (uint64_t)v;
}

int32_t *cli_parse_ids(const rp_cli *cli, const char *what, const char *text, size_t *n_ids) {
    size_t cap = 64, n = 0;
    int32_t *ids = cli_calloc(cli, cap, sizeof *ids, what);
    const char *p = text;
    for (;;) {
        while (*p == ',' || *p == ' ' || *p == '\n' || *p == '\t' || *p == '\r') p++;
        if (!*p) break;
        char *end;
        errno = 0;
        long v = strtol(p, &end, 10);
        if (end == p || errno || v < 0 || v > INT32_MAX) {
            int len = 0;
            while (p[len] && p[len] != ',' && p[len] != ' ' && p[len] != '\n' && len < 32) len++;
            cli_fatal(cli, "%s: '%.*s' (item %zu) is not a token id (a non-negative integer)",
                      what, len, p, n + 1);
        }
        if (*end && *end != ',' && *end != ' ' && *end != '\n' && *end != '\t' && *end != '\r')
            cli_fatal(cli, "%s: unexpected character '%c' after item %zu", what, *end, n + 1);
        if (n == cap) ids = cli_realloc(cli, ids, (cap *= 2) * sizeof *ids, what);
        ids[n++] = (int32_t)v;
        p = end;
    }
    *n_ids = n;
    return ids;
}

char *cli_read_file(const rp_cli *cli, const char *path, size_t *n_bytes) {
    FILE *f = strcmp(path, "-") == 0 ? stdin : fopen(path, "rb");
    if (!f) cli_fatal(cli, "cannot open %s: %s", path, strerror(errno));
    size_t cap = 1 << 16, n = 0;
    char *buf = cli_calloc(cli, cap + 1, 1, path);
    for (;;) {
        if (n == cap) buf = cli_realloc(cli, buf, (cap *= 2) + 1, path);
        size_t got = fread(buf + n, 1, cap - n, f);
        n += got;
        if (got == 0) break;
    }
    if (ferror(f)) cli_fatal(cli, "cannot read %s: %s", path, strerror(errno));
    if (f != stdin) fclose(f);
    buf[n] = '\0';
    if (n_bytes) *n_bytes = n;
    return buf;
}

void cli_load_model(const rp_cli *cli, const cli_model_options *opt, rp_backend **be,
                    rp_model *model) {
    rp_config cfg;
    cli_model_config(cli, opt, &cfg);
    *be = cli_backend_create(cli, opt);
    cli_load_model_part(cli, opt, &cfg, 0, cfg.n_layer, *be, model);
}

void cli_model_config(const rp_cli *cli, const cli_model_options *opt, rp_config *cfg) {
    rp_error err;
    if (opt->model_path) {
        rp_st_file f;
        rp_naming naming;
        if (rp_st_open(&f, opt->model_path, &err) != RP_OK ||
            rp_config_from_safetensors(&f, cfg, &naming, &err) != RP_OK)
            cli_fatal_error(cli, &err);
        rp_st_close(&f);
    } else if (rp_config_builtin(cfg, opt->config_name, opt->vocab_override, &err) != RP_OK) {
        cli_fatal_error(cli, &err);
    }
}

static void grid_create(rp_cli *cli, const rp_config *cfg, int pp, const char *stage_layers,
                        int for_decode, rp_grid *grid) {
    rp_error err;
    int *layers = cli_calloc(cli, (size_t)pp, sizeof(int), "the stage layer counts");
    if ((stage_layers  ? rp_partition_parse(stage_layers, cfg, pp, layers, &err)
         : for_decode ? rp_partition_balanced_decode(cfg, pp, layers, &err)
                      : rp_partition_balanced(cfg, pp, layers, &err)) != RP_OK ||
        rp_grid_create(grid, MPI_COMM_WORLD, pp, layers, &err) != RP_OK)
        cli_fatal_error(cli, &err);
    free(layers);
    cli_set_stage(cli, grid->stage);
}

/* --lora: the adapters added into this part's weights before the backend
 * is told about them (register_weights). */
static void merge_lora(const rp_cli *cli, const cli_model_options *opt, rp_model *model) {
    if (!opt->lora_path) return;
    rp_error err;
    cli_info(cli, "merging LoRA adapters %s", opt->lora_path);
    if (rp_lora_merge_file(model, opt->lora_path, NULL, NULL, &err) != RP_OK)
        cli_fatal_error(cli, &err);
}

void cli_grid_create(rp_cli *cli, const rp_config *cfg, int pp, const char *stage_layers,
                     rp_grid *grid) {
    grid_create(cli, cfg, pp, stage_layers, 0, grid);
}

void cli_load_model_part(const rp_cli *cli, const cli_model_options *opt, const rp_config *cfg,
                         int begin, int end, rp_backend *be, rp_model *model) {
    rp_error err;
    if (opt->model_path) {
        cli_info(cli, "loading %s", opt->model_path);
        const rp_load_options lo = {.wtype = opt->weights_dtype_set ? opt->weights_dtype : -1,
                                    .for_training = opt->for_training};
        if (rp_model_load_as(model, opt->model_path, begin, end, &lo, be, &err) != RP_OK)
            cli_fatal_error(cli, &err);
        merge_lora(cli, opt, model);
        rp_model_register_weights(model);
        return;
    }
    if (opt->weights_dtype_set && opt->weights_dtype != RP_WEIGHTS_F32)
        cli_fatal(cli, "--weights-dtype %s needs --model FILE: the built-in init makes f32 "
                  "weights (quantize a file with `rwkvpipe quantize`)",
                  opt->weights_dtype == RP_WEIGHTS_BF16    ? "bf16"
                  : opt->weights_dtype == RP_WEIGHTS_INT8ROW ? "int8row"
                                                             : "int8");
    cli_info(cli, "creating built-in model '%s' with the official RWKV-7 init (seed %llu)",
             opt->config_name, (unsigned long long)opt->init_seed);
    /* Counter-based init: every stage builds exactly its slice of one model. */
    if (rp_model_alloc(model, cfg, begin, end, begin == 0, end == cfg->n_layer, be, &err) !=
            RP_OK ||
        rp_model_init_official(model, opt->init_seed, &err) != RP_OK)
        cli_fatal_error(cli, &err);
    merge_lora(cli, opt, model);
    rp_model_register_weights(model);
}

void cli_load_stage_model(rp_cli *cli, cli_model_options *opt, int pp, const char *stage_layers,
                          rp_grid *grid, rp_backend **be, rp_model *model) {
    rp_config full;
    cli_model_config(cli, opt, &full);
    grid_create(cli, &full, pp, stage_layers, opt->for_decode, grid);
    if (opt->threads == 0) opt->threads = cli_threads_per_rank();
    *be = cli_backend_create(cli, opt);
    cli_load_model_part(cli, opt, &full, grid->layer_begin[grid->stage],
                        grid->layer_end[grid->stage], *be, model);
}

/* Text and JSON-lines inputs given to --data are tokenized first, into a
 * temporary directory (removed at the end), so `train --data corpus.txt`
 * works without a separate `rwkvpipe tokenize` run. Returns the number of
 * shard files written; the text entries of paths[] (NULL-terminated) are
 * replaced by one entry naming the shards' directory. */
int cli_tokenize_text_inputs(const rp_cli *cli, const char **paths, int n_paths,
                                const char *vocab, char *tmp_dir, size_t tmp_size,
                                char *prefix, size_t prefix_size) {
    int n_text = 0;
    for (int i = 0; i < n_paths; i++) {
        size_t n = strlen(paths[i]);
        if (n < 4 || strcmp(paths[i] + n - 4, ".tok") != 0) {
            struct stat sb;
            if (stat(paths[i], &sb) == 0 && S_ISREG(sb.st_mode)) n_text++;
        }
    }
    if (n_text == 0) return 0;
    const char *base = getenv("TMPDIR");
    snprintf(tmp_dir, tmp_size, "%s/rwkvpipe-train.XXXXXX", base && *base ? base : "/tmp");
    if (!mkdtemp(tmp_dir)) cli_fatal(cli, "cannot create a temporary directory %s", tmp_dir);
    snprintf(prefix, prefix_size, "%s/text", tmp_dir);
    rp_tokenizer *tok;
    rp_error err;
    if (rp_tokenizer_open(&tok, vocab, &err) != RP_OK) cli_fatal_error(cli, &err);
    rp_tokenize_run *run;
    if (rp_tokenize_begin(&run, prefix, tok, NULL, &err) != RP_OK) cli_fatal_error(cli, &err);
    for (int i = 0; i < n_paths; i++) {
        size_t n = strlen(paths[i]);
        struct stat sb;
        if ((n >= 4 && strcmp(paths[i] + n - 4, ".tok") == 0) || stat(paths[i], &sb) != 0 ||
            !S_ISREG(sb.st_mode))
            continue;
        cli_info(cli, "tokenizing %s (vocab %s)", paths[i], vocab);
        if (rp_tokenize_add_file(run, paths[i], RP_INPUT_AUTO, &err) != RP_OK) {
            rp_tokenize_abort(run);
            cli_fatal_error(cli, &err);
        }
        paths[i] = NULL;
    }
    rp_tokenize_stats stats;
    if (rp_tokenize_finish(run, &stats, &err) != RP_OK) cli_fatal_error(cli, &err);
    rp_tokenizer_free(tok);
    /* Text inputs are replaced, in place of the first one, by the directory. */
    int j = 0, placed = 0;
    for (int i = 0; i < n_paths; i++) {
        if (paths[i]) paths[j++] = paths[i];
        else if (!placed) {
            paths[j++] = tmp_dir;
            placed = 1;
        }
    }
    for (int k = j; k < n_paths; k++) paths[k] = NULL;
    cli_info(cli, "tokenized %llu bytes into %llu tokens (%u shard%s)",
             (unsigned long long)stats.bytes, (unsigned long long)stats.tokens, stats.shards,
             stats.shards == 1 ? "" : "s");
    return (int)stats.shards;
}

void cli_remove_tokenized(const char *tmp_dir, const char *prefix, int n_shards) {
    char path[4096];
    for (int i = 0; i < n_shards; i++) unlink(rp_tokenize_shard_path(path, sizeof path, prefix, (uint32_t)i));
    rmdir(tmp_dir);
}

