/* ZeRO-1's collectives over the data replicas (pipe_zero.h). The sums are
 * ours, not MPI's: an all-to-all moves each replica's range of the buffer
 * to the replica that owns it, which adds the DP pieces in replica order. */
#include "pipe/pipe_zero.h"
#include "pipe/transport.h"

#include <limits.h>
#include <stdlib.h>
#include <string.h>

/* counts / displacements of buffer n split over dp (MPI's ints). */
static rp_status ranges(size_t n, int dp, int *counts, int *displs, const char *what,
                        rp_error *err) {
    if (n > (size_t)INT_MAX)
        return rp_error_set(err, RP_ERR_ARG, "%s: a buffer of %zu floats is more than MPI's "
                            "int counts (%d) can address with --zero 1; use more pipeline "
                            "stages (--pp) or drop --zero", what, n, INT_MAX);
    for (int d = 0; d < dp; d++) {
        size_t b, c;
        rp_zero_range(n, dp, d, &b, &c);
        counts[d] = (int)c;
        displs[d] = (int)b;
    }
    return RP_OK;
}

static rp_status started(int rc, const char *what, rp_error *err) {
    if (rc == MPI_SUCCESS) return RP_OK;
    char text[MPI_MAX_ERROR_STRING] = "";
    int len = 0;
    MPI_Error_string(rc, text, &len);
    return rp_error_set(err, RP_ERR_MPI, "%s could not start: %s", what, text);
}

rp_status rp_zero_reduce_scatter(MPI_Comm comm, float *buf, size_t n, float *scratch,
                                 double timeout_s, rp_error *err) {
    static const char what[] = "the gradient reduce-scatter over the data replicas (--zero 1)";
    int dp, me;
    MPI_Comm_size(comm, &dp);
    MPI_Comm_rank(comm, &me);
    if (dp == 1) return RP_OK;
    int *sc = malloc(sizeof(int) * 4 * (size_t)dp);
    if (!sc) return rp_error_set(err, RP_ERR_NOMEM, "%s: counts", what);
    int *sd = sc + dp, *rc = sc + 2 * dp, *rd = sc + 3 * dp;
    rp_status st = ranges(n, dp, sc, sd, what, err);
    if (st == RP_OK) {
        /* From every replica k, my range lands at scratch[k * mine]. */
        const int mine = sc[me];
        for (int k = 0; k < dp; k++) {
            rc[k] = mine;
            rd[k] = k * mine;
        }
        MPI_Request req;
        st = started(MPI_Ialltoallv(buf, sc, sd, MPI_FLOAT, scratch, rc, rd, MPI_FLOAT, comm,
                                    &req), what, err);
        if (st == RP_OK) st = rp_comm_wait(&req, timeout_s, what, err);
        if (st == RP_OK) {
            float *out = buf + sd[me];
            memcpy(out, scratch, sizeof(float) * (size_t)mine);
            for (int k = 1; k < dp; k++) {
                const float *in = scratch + (size_t)k * mine;
                for (int i = 0; i < mine; i++) out[i] += in[i];
            }
        }
    }
    free(sc);
    return st;
}

rp_status rp_zero_allgather(MPI_Comm comm, float *buf, size_t n, double timeout_s,
                            rp_error *err) {
    static const char what[] = "the weight all-gather over the data replicas (--zero 1)";
    int dp;
    MPI_Comm_size(comm, &dp);
    if (dp == 1) return RP_OK;
    int *counts = malloc(sizeof(int) * 2 * (size_t)dp);
    if (!counts) return rp_error_set(err, RP_ERR_NOMEM, "%s: counts", what);
    rp_status st = ranges(n, dp, counts, counts + dp, what, err);
    if (st == RP_OK) {
        MPI_Request req;
        st = started(MPI_Iallgatherv(MPI_IN_PLACE, 0, MPI_FLOAT, buf, counts, counts + dp,
                                     MPI_FLOAT, comm, &req), what, err);
        if (st == RP_OK) st = rp_comm_wait(&req, timeout_s, what, err);
    }
    free(counts);
    return st;
}

rp_status rp_zero_sum_partials(MPI_Comm comm, double partial, double *sum, double timeout_s,
                               rp_error *err) {
    static const char what[] = "the gradient-norm gather over the data replicas (--zero 1)";
    int dp;
    MPI_Comm_size(comm, &dp);
    double *all = malloc(sizeof(double) * (size_t)dp);
    if (!all) return rp_error_set(err, RP_ERR_NOMEM, "%s", what);
    MPI_Request req;
    rp_status st = started(MPI_Iallgather(&partial, 1, MPI_DOUBLE, all, 1, MPI_DOUBLE, comm,
                                          &req), what, err);
    if (st == RP_OK) st = rp_comm_wait(&req, timeout_s, what, err);
    if (st == RP_OK) {
        double s = 0.0;
        for (int d = 0; d < dp; d++) s += all[d];
        *sum = s;
    }
    free(all);
    return st;
}

rp_status rp_zero_gather_moments(MPI_Comm comm, const rp_zero_shard *z, rp_model *adam_m,
                                 rp_model *adam_v, double timeout_s, rp_error *err) {
    static const char what[] = "the Adam moments' gather to replica 0 for the checkpoint "
                               "(--zero 1)";
    const int dp = z->dp, root = z->rank == 0;
    if (root) rp_zero_put(z, adam_m, adam_v);
    if (dp == 1) return RP_OK;
    int *counts = malloc(sizeof(int) * 2 * (size_t)dp);
    if (!counts) return rp_error_set(err, RP_ERR_NOMEM, "%s: counts", what);
    rp_status st = RP_OK;
    for (int i = 0; i < z->n_buf && st == RP_OK; i++) {
        if ((st = ranges(z->full[i], dp, counts, counts + dp, what, err)) != RP_OK) break;
        for (int which = 0; which < 2 && st == RP_OK; which++) {
            size_t n;
            float *full = root ? rp_zero_buffer(which ? adam_v : adam_m, i, &n) : NULL;
            float *mine = which ? z->v[i] : z->m[i];
            MPI_Request req;
            st = started(MPI_Igatherv(root ? MPI_IN_PLACE : mine, (int)z->count[i], MPI_FLOAT,
                                      full, counts, counts + dp, MPI_FLOAT, 0, comm, &req),
                         what, err);
            if (st == RP_OK) st = rp_comm_wait(&req, timeout_s, what, err);
        }
    }
    free(counts);
    return st;
}
