/* Shared CLI helpers (cli.h). */
#include "cli/cli.h"

#include <errno.h>
#include <limits.h>
#include <math.h>
#include <mpi.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>

#include "model/init.h"

static void vreport(const rp_cli *cli, const char *level, const char *fmt, va_list ap) {
    char msg[2048];
    vsnprintf(msg, sizeof msg, fmt, ap);
    if (cli->mpi_size > 1)
        fprintf(stderr, "rwkvpipe %s [rank %d/%d]: %s%s\n", cli->command, cli->mpi_rank,
                cli->mpi_size, level, msg);
    else
        fprintf(stderr, "rwkvpipe %s: %s%s\n", cli->command, level, msg);
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
    int32_t *ids = malloc(cap * sizeof *ids);
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
        if (n == cap) ids = realloc(ids, (cap *= 2) * sizeof *ids);
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
    char *buf = malloc(cap + 1);
    for (;;) {
        if (n == cap) buf = realloc(buf, (cap *= 2) + 1);
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
    rp_error err;
    *be = rp_cpu_backend_create(opt->threads, &err);
    if (!*be) cli_fatal_error(cli, &err);
    if (opt->model_path) {
        cli_info(cli, "loading %s", opt->model_path);
        if (rp_model_load(model, opt->model_path, 0, -1, *be, &err) != RP_OK)
            cli_fatal_error(cli, &err);
        return;
    }
    rp_config cfg;
    if (rp_config_builtin(&cfg, opt->config_name, opt->vocab_override, &err) != RP_OK)
        cli_fatal_error(cli, &err);
    cli_info(cli, "creating built-in model '%s' with the official RWKV-7 init (seed %llu)",
             opt->config_name, (unsigned long long)opt->init_seed);
    if (rp_model_alloc(model, &cfg, 0, cfg.n_layer, 1, 1, *be, &err) != RP_OK ||
        rp_model_init_official(model, opt->init_seed, &err) != RP_OK)
        cli_fatal_error(cli, &err);
}
