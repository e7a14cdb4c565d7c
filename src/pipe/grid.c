/* Process grid and layer partition (grid.h). */
#include "pipe/grid.h"

#include <float.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

double rp_partition_layer_cost(const rp_config *c) {
    double C = c->n_embd;
    return 4 * C * C + 2 * C * c->dim_ffn +
           2 * C * (double)(c->d_decay + c->d_iclr + c->d_value + c->d_gate);
}

double rp_partition_head_cost(const rp_config *c) { return (double)c->n_embd * c->vocab_size; }

double rp_partition_head_decode_cost(const rp_config *c) {
    return rp_partition_head_cost(c) + RP_PARTITION_SAMPLE_COST * c->vocab_size;
}

/* The balanced split with head cost hc on the last stage. */
static rp_status partition(const rp_config *cfg, int n_stages, double hc, int *layers,
                           rp_error *err) {
    const int L = cfg->n_layer, P = n_stages;
    if (P < 1 || P > L)
        return rp_error_set(err, RP_ERR_ARG,
                            "%d pipeline stages for a model of %d layers: every stage needs at "
                            "least one layer, so use 1 to %d stages", P, L, L);
    const double lc = rp_partition_layer_cost(cfg);
    /* best[s][l]: smallest possible maximum stage cost when stages 0..s hold
     * layers 0..l-1; cut[s][l]: where stage s starts in that optimum. */
    double *best = malloc(sizeof(double) * (size_t)P * (L + 1));
    int *cut = malloc(sizeof(int) * (size_t)P * (L + 1));
    if (!best || !cut) {
        free(best);
        free(cut);
        return rp_error_set(err, RP_ERR_NOMEM, "partition tables");
    }
    for (int s = 0; s < P; s++)
        for (int l = 0; l <= L; l++) {
            best[s * (L + 1) + l] = DBL_MAX;
            cut[s * (L + 1) + l] = -1;
        }
    for (int l = 1; l <= L; l++) best[l] = l * lc + (P == 1 ? hc : 0);
    for (int s = 1; s < P; s++)
        for (int l = s + 1; l <= L; l++)
            for (int k = s; k < l; k++) {
                double prev = best[(s - 1) * (L + 1) + k];
                if (prev == DBL_MAX) continue;
                double mine = (l - k) * lc + (s == P - 1 ? hc : 0);
                double v = prev > mine ? prev : mine;
                /* Strictly better only: ties keep the earliest cut (more
                 * layers on later stages, which hold fewer stashed batches). */
                if (v < best[s * (L + 1) + l]) {
                    best[s * (L + 1) + l] = v;
                    cut[s * (L + 1) + l] = k;
                }
            }
    int end = L;
    for (int s = P - 1; s > 0; s--) {
        int k = cut[s * (L + 1) + end];
        layers[s] = end - k;
        end = k;
    }
    layers[0] = end;
    free(best);
    free(cut);
    return RP_OK;
}

rp_status rp_partition_balanced(const rp_config *cfg, int n_stages, int *layers, rp_error *err) {
    return partition(cfg, n_stages, rp_partition_head_cost(cfg), layers, err);
}

rp_status rp_partition_balanced_decode(const rp_config *cfg, int n_stages, int *layers,
                                       rp_error *err) {
    return partition(cfg, n_stages, rp_partition_head_decode_cost(cfg), layers, err);
}

rp_status rp_partition_parse(const char *text, const rp_config *cfg, int n_stages, int *layers,
                             rp_error *err) {
    int n = 0, total = 0;
    const char *p = text;
    while (*p) {
        char *end;
        long v = strtol(p, &end, 10);
        if (end == p || v < 0 || v > 1000000)
            return rp_error_set(err, RP_ERR_ARG,
                                "--stage-layers '%s': item %d is not a layer count", text, n + 1);
        if (n >= n_stages)
            return rp_error_set(err, RP_ERR_ARG,
                                "--stage-layers '%s' lists more than the %d pipeline stages",
                                text, n_stages);
        if (v == 0)
            return rp_error_set(err, RP_ERR_ARG,
                                "--stage-layers '%s': stage %d has no layer; every stage needs "
                                "at least one", text, n);
        layers[n++] = (int)v;
        total += (int)v;
        p = end;
        if (*p == ',') p++;
        else if (*p)
            return rp_error_set(err, RP_ERR_ARG, "--stage-layers '%s': unexpected '%c'", text,
                                *p);
    }
    if (n != n_stages)
        return rp_error_set(err, RP_ERR_ARG,
                            "--stage-layers '%s' gives %d stage%s but the pipeline has %d (--pp)",
                            text, n, n == 1 ? "" : "s", n_stages);
    if (total != cfg->n_layer)
        return rp_error_set(err, RP_ERR_ARG,
                            "--stage-layers '%s' covers %d layers but the model has %d: every "
                            "layer must be owned by exactly one stage (%s %d)", text, total,
                            cfg->n_layer, total < cfg->n_layer ? "missing" : "over by",
                            abs(cfg->n_layer - total));
    return RP_OK;
}

rp_status rp_grid_create(rp_grid *g, MPI_Comm world, int pp, const int *layers, rp_error *err) {
    memset(g, 0, sizeof *g);
    g->pipe_comm = g->data_comm = MPI_COMM_NULL;
    MPI_Comm_rank(world, &g->world_rank);
    MPI_Comm_size(world, &g->world_size);
    if (pp < 1 || pp > RP_GRID_MAX_STAGES || g->world_size % pp != 0)
        return rp_error_set(err, RP_ERR_ARG,
                            "--pp %d does not divide the %d ranks: the job needs a multiple of "
                            "the pipeline depth (ranks = stages x data replicas)", pp,
                            g->world_size);
    g->world_comm = world;
    g->pp = pp;
    g->dp = g->world_size / pp;
    g->stage = g->world_rank / g->dp;
    g->replica = g->world_rank % g->dp;
    g->layer_begin = malloc(sizeof(int) * (size_t)pp);
    g->layer_end = malloc(sizeof(int) * (size_t)pp);
    if (!g->layer_begin || !g->layer_end) {
        rp_grid_free(g);
        return rp_error_set(err, RP_ERR_NOMEM, "grid tables");
    }
    int at = 0;
    for (int s = 0; s < pp; s++) {
        g->layer_begin[s] = at;
        at += layers[s];
        g->layer_end[s] = at;
    }
    if (MPI_Comm_split(world, g->replica, g->stage, &g->pipe_comm) != MPI_SUCCESS ||
        MPI_Comm_split(world, g->stage, g->replica, &g->data_comm) != MPI_SUCCESS) {
        rp_grid_free(g);
        return rp_error_set(err, RP_ERR_MPI, "MPI_Comm_split failed building the %d x %d grid",
                            pp, g->world_size / pp);
    }
    return RP_OK;
}

void rp_grid_free(rp_grid *g) {
    if (g->pipe_comm != MPI_COMM_NULL) MPI_Comm_free(&g->pipe_comm);
    if (g->data_comm != MPI_COMM_NULL) MPI_Comm_free(&g->data_comm);
    free(g->layer_begin);
    free(g->layer_end);
    memset(g, 0, sizeof *g);
    g->pipe_comm = g->data_comm = MPI_COMM_NULL;
}

void rp_grid_print_map(const rp_grid *g, FILE *out) {
    char host[64] = "";
    gethostname(host, sizeof host - 1);
    char *all = g->world_rank == 0 ? malloc((size_t)g->world_size * sizeof host) : NULL;
    MPI_Gather(host, sizeof host, MPI_CHAR, all, sizeof host, MPI_CHAR, 0, g->world_comm);
    if (g->world_rank != 0 || !out) {
        free(all);
        return;
    }
    fprintf(out, "grid: %d ranks = %d pipeline stage%s x %d data replica%s\n", g->world_size,
            g->pp, g->pp == 1 ? "" : "s", g->dp, g->dp == 1 ? "" : "s");
    for (int r = 0; r < g->world_size; r++) {
        int s = r / g->dp, d = r % g->dp;
        fprintf(out, "  host %-16s rank %3d  stage %2d  layers %2d-%-2d (%d)%s%s  replica %d\n",
                all + (size_t)r * sizeof host, r, s, g->layer_begin[s], g->layer_end[s] - 1,
                g->layer_end[s] - g->layer_begin[s], s == 0 ? " +embedding" : "",
                s == g->pp - 1 ? " +head/loss" : "", d);
    }
    fflush(out);
    free(all);
}
