/* ZeRO-1's collectives over the data replicas (pipe_zero.h). The sums are
 * ours, not MPI's: an all-to-all moves each replica's range of the buffer
 * to the replica that owns it, which adds the DP pieces in replica order. */
#include "pipe/pipe_zero.h"
#include "model/params.h"
#include "pipe/transport.h"

#include <limits.h>
#include <stdint.h>
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

/* One buffer's range of every replica to replica 0, through host buffers:
 * mine [count] (backend memory) -> full [n] (backend memory on the root). */
static rp_status gather_staged(MPI_Comm comm, rp_backend *be, const float *mine, size_t count,
                               float *full, size_t n, const int *counts, const int *displs,
                               float *host_mine, float *host_full, double timeout_s,
                               const char *what, rp_error *err) {
    if (count) be->copy_to_host(be, host_mine, mine, count * sizeof(float));
    MPI_Request req;
    rp_status st = started(MPI_Igatherv(host_mine, (int)count, MPI_FLOAT, host_full, counts,
                                        displs, MPI_FLOAT, 0, comm, &req), what, err);
    if (st == RP_OK) st = rp_comm_wait(&req, timeout_s, what, err);
    if (st == RP_OK && full) be->copy_to_device(be, full, host_full, n * sizeof(float));
    return st;
}

rp_status rp_zero_gather_moments(MPI_Comm comm, const rp_zero_shard *z, rp_model *adam_m,
                                 rp_model *adam_v, double timeout_s, rp_error *err) {
    static const char what[] = "the Adam moments' gather to replica 0 for the checkpoint "
                               "(--zero 1)";
    const int dp = z->dp, root = z->rank == 0, host = z->be->is_host_memory;
    if (root && host) rp_zero_put(z, adam_m, adam_v);
    if (dp == 1) {
        if (root && !host) rp_zero_put(z, adam_m, adam_v);
        return RP_OK;
    }
    int *counts = malloc(sizeof(int) * 2 * (size_t)dp);
    /* Device memory: staged through host buffers of the largest buffer. */
    size_t most = 1;
    for (int i = 0; i < z->n_buf; i++)
        if (z->full[i] > most) most = z->full[i];
    float *host_mine = host ? NULL : malloc(sizeof(float) * most);
    float *host_full = host || !root ? NULL : malloc(sizeof(float) * most);
    /* A replica without its host buffers stops here; the others' gather
     * then ends with the --comm-timeout watchdog. */
    rp_status st = RP_OK;
    if (!counts || (!host && (!host_mine || (root && !host_full))))
        st = rp_error_set(err, RP_ERR_NOMEM, "%s: host buffers of %zu floats", what, most);
    for (int i = 0; i < z->n_buf && st == RP_OK; i++) {
        if ((st = ranges(z->full[i], dp, counts, counts + dp, what, err)) != RP_OK) break;
        for (int which = 0; which < 2 && st == RP_OK; which++) {
            size_t n;
            float *full = root ? rp_zero_buffer(which ? adam_v : adam_m, i, &n) : NULL;
            float *mine = which ? z->v[i] : z->m[i];
            if (!host) {
                st = gather_staged(comm, z->be, mine, z->count[i], full, z->full[i], counts,
                                   counts + dp, host_mine, host_full, timeout_s, what, err);
                continue;
            }
            MPI_Request req;
            st = started(MPI_Igatherv(root ? MPI_IN_PLACE : mine, (int)z->count[i], MPI_FLOAT,
                                      full, counts, counts + dp, MPI_FLOAT, 0, comm, &req),
                         what, err);
            if (st == RP_OK) st = rp_comm_wait(&req, timeout_s, what, err);
        }
    }
    free(counts);
    free(host_mine);
    free(host_full);
    return st;
}

/* ---- backend memory (rp_zero_links) ---- */

struct rp_zero_links {
    MPI_Comm comm;
    int dp, me;
    rp_backend *be;
    rp_nccl_group *nccl;  /* device memory over NCCL; NULL: MPI */
    float *host;          /* MPI on device memory: a buffer's host copy [most] */
    float *scratch;       /* the pieces of my range: host (MPI) or device (NCCL) */
    size_t *at, *n;       /* [4 dp]: NCCL send/receive offsets and counts */
    double timeout_s;
    /* The bf16 all-gather (rp_zero_links_use_model): the stage's weights,
     * the [begin, end) float offsets of the GEMM matrices in a layer's and
     * in the head's flat buffer, the transfer list, and whether the other
     * replicas' fp32 of those matrices is stale (received as bf16 only). */
    const rp_model *model;
    size_t *layer_iv, *head_iv;  /* pairs, by offset */
    int n_layer_iv, n_head_iv;
    rp_nccl_xfer *xfer;
    int cap_xfer, stale;
    /* rp_zero_links_release_master: bytes given back; the save's host copy
     * of the whole fp32 (replica 0, on the caller's host backend). */
    size_t released;
    rp_model master;
    int has_master;
};

rp_status rp_zero_links_create(rp_zero_links **out, MPI_Comm comm, rp_backend *be,
                               rp_nccl_group *nccl, size_t most, double timeout_s,
                               rp_error *err) {
    *out = NULL;
    rp_zero_links *l = calloc(1, sizeof *l);
    if (!l) return rp_error_set(err, RP_ERR_NOMEM, "ZeRO-1 links");
    l->comm = comm;
    MPI_Comm_size(comm, &l->dp);
    MPI_Comm_rank(comm, &l->me);
    l->be = be;
    l->nccl = be->is_host_memory ? NULL : nccl;
    l->timeout_s = timeout_s;
    /* The reduce-scatter lands DP pieces of my range (<= most / DP + 1
     * floats each): at most most + DP floats. */
    const size_t scratch_floats = most + (size_t)l->dp + 1;
    const size_t bytes = sizeof(float) * scratch_floats;
    int ok = 1;
    if (l->nccl) {
        ok = (l->scratch = be->alloc(be, bytes)) != NULL &&
             (l->at = calloc(4 * (size_t)l->dp, sizeof *l->at)) != NULL;
        l->n = l->at ? l->at + 2 * l->dp : NULL;
    } else {
        ok = (l->scratch = malloc(bytes)) != NULL;
        if (ok && !be->is_host_memory) ok = (l->host = malloc(sizeof(float) * (most + 1))) != NULL;
    }
    if (!ok) {
        rp_zero_links_free(l);
        return rp_error_set(err, RP_ERR_NOMEM, "ZeRO-1: the reduce-scatter buffers of %zu floats "
                            "(%s memory)", scratch_floats, nccl && !be->is_host_memory ? "device"
                                                                                      : "host");
    }
    *out = l;
    return RP_OK;
}

void rp_zero_links_free(rp_zero_links *l) {
    if (!l) return;
    if (l->nccl) {
        if (l->scratch) l->be->free(l->be, l->scratch);
    } else {
        free(l->scratch);
    }
    free(l->host);
    free(l->at);
    free(l->layer_iv);
    free(l->head_iv);
    free(l->xfer);
    rp_zero_links_drop_master(l);
    free(l);
}

/* With a ranged refresh entry the all-gather keeps the backend's weight
 * copies current itself (rp_zero_links_allgather), so nothing bypasses it. */
int rp_zero_links_bypass_backend(const rp_zero_links *l) {
    return l && l->nccl && !l->be->refresh_weights;
}

const char *rp_zero_links_describe(const rp_zero_links *l) {
    if (!l || l->be->is_host_memory) return "MPI";
    if (!l->nccl) return "MPI through host memory";
    return l->model ? "NCCL; the GEMM matrices' weights all-gathered as bf16" : "NCCL";
}

rp_status rp_zero_links_reduce_scatter(rp_zero_links *l, float *buf, size_t n, rp_error *err) {
    static const char what[] = "the gradient reduce-scatter over the data replicas (--zero 1, "
                               "NCCL)";
    rp_backend *be = l->be;
    if (l->dp == 1) return RP_OK;
    if (be->is_host_memory) return rp_zero_reduce_scatter(l->comm, buf, n, l->scratch,
                                                          l->timeout_s, err);
    size_t b, mine;
    rp_zero_range(n, l->dp, l->me, &b, &mine);
    if (!l->nccl) {
        /* The whole buffer to the host, the host path, my range back. */
        be->copy_to_host(be, l->host, buf, n * sizeof(float));
        rp_status st = rp_zero_reduce_scatter(l->comm, l->host, n, l->scratch, l->timeout_s, err);
        if (st == RP_OK && mine)
            be->copy_to_device(be, buf + b, l->host + b, mine * sizeof(float));
        return st;
    }
    /* From every replica k, my range lands at scratch[k * mine]; replica k
     * gets its range of mine. */
    size_t *send_at = l->at, *recv_at = l->at + l->dp, *send_n = l->n, *recv_n = l->n + l->dp;
    for (int k = 0; k < l->dp; k++) {
        rp_zero_range(n, l->dp, k, &send_at[k], &send_n[k]);
        recv_at[k] = (size_t)k * mine;
        recv_n[k] = mine;
    }
    send_n[l->me] = recv_n[l->me] = 0;  /* my own piece: a device copy */
    float *out = buf + b;
    if (mine) be->copy(be, l->scratch + (size_t)l->me * mine, out, mine * sizeof(float));
    be->synchronize(be);  /* the backward's gradients and that copy are written */
    rp_status st = rp_nccl_group_exchange(l->nccl, buf, send_at, send_n, l->scratch, recv_at,
                                          recv_n, what, err);
    if (st != RP_OK || !mine) return st;
    /* g0 + g1 + ... + g(DP-1), as rp_zero_reduce_scatter adds them. */
    be->copy(be, out, l->scratch, mine * sizeof(float));
    for (int k = 1; k < l->dp; k++) be->add(be, out, l->scratch + (size_t)k * mine, mine);
    return be->status(be, err);
}

/* The matrices' [begin, end) float offsets (pairs, sorted) among table's
 * tensors of part: the nn.Linear weights that the backend's GEMMs read
 * through their bf16 copies (rp_tensor_quantizable). */
static int matrix_table(const rp_tensor_info *t, int nt, rp_param_part part, size_t *iv) {
    int n = 0;
    for (int i = 0; i < nt; i++) {
        if (t[i].part != part || !rp_tensor_quantizable(t[i].suffix)) continue;
        int j = n++;
        for (; j > 0 && iv[2 * (j - 1)] > t[i].flat_offset; j--) {
            iv[2 * j] = iv[2 * (j - 1)];
            iv[2 * j + 1] = iv[2 * (j - 1) + 1];
        }
        iv[2 * j] = t[i].flat_offset;
        iv[2 * j + 1] = t[i].flat_offset + (size_t)t[i].numel;
    }
    return n;
}

rp_status rp_zero_links_use_model(rp_zero_links *l, const rp_model *m, rp_error *err) {
    if (!l || !l->nccl || !l->be->weight_copy || !l->be->refresh_weights || l->dp == 1)
        return RP_OK;
    rp_tensor_info table[RP_LAYER_N_TENSORS], gtable[RP_GLOBAL_N_TENSORS];
    rp_layer_layout(&m->cfg, table);
    rp_global_layout(&m->cfg, gtable, NULL, NULL);
    l->layer_iv = malloc(sizeof(size_t) * 2 * RP_LAYER_N_TENSORS);
    l->head_iv = malloc(sizeof(size_t) * 2 * RP_GLOBAL_N_TENSORS);
    if (!l->layer_iv || !l->head_iv)
        return rp_error_set(err, RP_ERR_NOMEM, "ZeRO-1: the matrices' tables");
    l->n_layer_iv = matrix_table(table, RP_LAYER_N_TENSORS, RP_PART_LAYER, l->layer_iv);
    l->n_head_iv = matrix_table(gtable, RP_GLOBAL_N_TENSORS, RP_PART_HEAD, l->head_iv);
    /* Per peer: my range sent and its range received, each cut into at most
     * 2 * matrices + 1 pieces. */
    const int most = l->n_layer_iv > l->n_head_iv ? l->n_layer_iv : l->n_head_iv;
    l->cap_xfer = 2 * (2 * most + 1) * l->dp;
    if (!(l->xfer = malloc(sizeof *l->xfer * (size_t)l->cap_xfer)))
        return rp_error_set(err, RP_ERR_NOMEM, "ZeRO-1: the all-gather's transfer list");
    /* Every replica must cut the ranges alike: the bf16 all-gather only if
     * every replica keeps a copy of every layer and head buffer (CUDA keeps
     * none where the copy found no room). */
    int have = 1, all = 0;
    for (int i = 0; i < m->layer_end - m->layer_begin; i++)
        if (!l->be->weight_copy(l->be, m->layer_flat[i], m->layer_floats)) have = 0;
    if (m->head_flat && !l->be->weight_copy(l->be, m->head_flat, m->head_floats)) have = 0;
    static const char what[] = "the data replicas' check of their bf16 weight copies (--zero 1)";
    MPI_Request req;
    rp_status st = started(MPI_Iallreduce(&have, &all, 1, MPI_INT, MPI_MIN, l->comm, &req), what,
                           err);
    if (st == RP_OK) st = rp_comm_wait(&req, l->timeout_s, what, err);
    if (st == RP_OK && all) l->model = m;
    return st;
}

/* The bf16 copy of flat buffer buf [n] of the model and its matrices'
 * offsets, or NULL (no bf16 all-gather for it: the embedding, fp32 math,
 * no copy kept). */
static uint16_t *bf16_copy(const rp_zero_links *l, const float *buf, size_t n,
                           const size_t **iv, int *niv) {
    const rp_model *m = l->model;
    if (!m) return NULL;
    *iv = NULL;
    if (m->head_flat && buf == m->head_flat && n == m->head_floats) {
        *iv = l->head_iv;
        *niv = l->n_head_iv;
    }
    for (int i = 0; !*iv && i < m->layer_end - m->layer_begin; i++)
        if (buf == m->layer_flat[i] && n == m->layer_floats) {
            *iv = l->layer_iv;
            *niv = l->n_layer_iv;
        }
    if (!*iv || !*niv) return NULL;
    return (uint16_t *)l->be->weight_copy(l->be, buf, n);
}

static void push(rp_zero_links *l, int *nx, int peer, int recv, int bf16, void *p,
                 size_t count) {
    l->xfer[(*nx)++] = (rp_nccl_xfer){peer, recv, bf16, p, count};
}

/* The transfers of [lo, hi) of buf to (recv 0) or from peer: the matrices'
 * pieces as bf16 from or into copy, the rest as fp32. Both ends cut a range
 * the same way, so the sends and receives pair up in order. */
static void add_pieces(rp_zero_links *l, int *nx, int peer, int recv, float *buf, uint16_t *copy,
                       size_t lo, size_t hi, const size_t *iv, int niv) {
    size_t at = lo;
    for (int i = 0; i < niv && at < hi; i++) {
        const size_t b = iv[2 * i] > at ? iv[2 * i] : at;
        const size_t e = iv[2 * i + 1] < hi ? iv[2 * i + 1] : hi;
        if (b >= e) continue;
        if (b > at) push(l, nx, peer, recv, 0, buf + at, b - at);
        push(l, nx, peer, recv, 1, copy + b, e - b);
        at = e;
    }
    if (at < hi) push(l, nx, peer, recv, 0, buf + at, hi - at);
}

/* The all-gather over NCCL with the matrices as bf16 straight into the
 * other replicas' copies (half their bytes). Their fp32 there goes stale:
 * the GEMMs read only the copies, AdamW only the own range's fp32, and
 * rp_zero_links_gather_master makes the fp32 whole before it is read. */
static rp_status allgather_bf16(rp_zero_links *l, float *buf, size_t n, uint16_t *copy,
                                const size_t *iv, int niv, const char *what, rp_error *err) {
    rp_backend *be = l->be;
    size_t b, mine;
    rp_zero_range(n, l->dp, l->me, &b, &mine);
    int nx = 0;
    for (int k = 0; k < l->dp; k++) {
        if (k == l->me) continue;
        size_t kb, kn;
        rp_zero_range(n, l->dp, k, &kb, &kn);
        add_pieces(l, &nx, k, 0, buf, copy, b, b + mine, iv, niv);
        add_pieces(l, &nx, k, 1, buf, copy, kb, kb + kn, iv, niv);
    }
    be->synchronize(be);  /* the AdamW step on my range and its copy are written */
    rp_status st = rp_nccl_group_run(l->nccl, l->xfer, nx, what, err);
    if (st != RP_OK) return st;
    l->stale = 1;
    /* The fp32 pieces received (norms, mixes, LoRA factors) have copies too. */
    for (int i = 0; i < nx; i++)
        if (l->xfer[i].recv && !l->xfer[i].bf16)
            be->refresh_weights(be, l->xfer[i].p, l->xfer[i].count);
    return be->status(be, err);
}

/* The fp32 all-gather over NCCL of buf [n], in place; the received ranges'
 * copies are converted again. */
static rp_status allgather_fp32(rp_zero_links *l, float *buf, size_t n, const char *what,
                                rp_error *err) {
    rp_backend *be = l->be;
    size_t b, mine;
    rp_zero_range(n, l->dp, l->me, &b, &mine);
    /* My range to every replica; replica k's range from it, in place. */
    size_t *send_at = l->at, *recv_at = l->at + l->dp, *send_n = l->n, *recv_n = l->n + l->dp;
    for (int k = 0; k < l->dp; k++) {
        send_at[k] = b;
        send_n[k] = k == l->me ? 0 : mine;
        rp_zero_range(n, l->dp, k, &recv_at[k], &recv_n[k]);
    }
    recv_n[l->me] = 0;
    be->synchronize(be);  /* the AdamW step on my range is written */
    rp_status st = rp_nccl_group_exchange(l->nccl, buf, send_at, send_n, buf, recv_at, recv_n,
                                          what, err);
    /* NCCL wrote the other replicas' ranges behind the backend: their
     * low-precision weight copies (CUDA, bf16 math) are converted again,
     * range by range; my range's copy was written by the AdamW step. Without
     * the entry the caller re-registers the whole stage
     * (rp_zero_links_bypass_backend). */
    if (st != RP_OK || !be->refresh_weights) return st;
    for (int k = 0; k < l->dp; k++)
        if (recv_n[k]) be->refresh_weights(be, buf + recv_at[k], recv_n[k]);
    return be->status(be, err);
}

rp_status rp_zero_links_allgather(rp_zero_links *l, float *buf, size_t n, rp_error *err) {
    static const char what[] = "the weight all-gather over the data replicas (--zero 1, NCCL)";
    rp_backend *be = l->be;
    if (l->dp == 1) return RP_OK;
    if (be->is_host_memory) return rp_zero_allgather(l->comm, buf, n, l->timeout_s, err);
    size_t b, mine;
    rp_zero_range(n, l->dp, l->me, &b, &mine);
    if (!l->nccl) {
        /* My range to the host, the host path, the other replicas' ranges
         * back (through copy_to_device: the backend refreshes its weight
         * copies of those ranges; my range and its copy are current from
         * the AdamW step). */
        if (mine) be->copy_to_host(be, l->host + b, buf + b, mine * sizeof(float));
        rp_status st = rp_zero_allgather(l->comm, l->host, n, l->timeout_s, err);
        for (int k = 0; k < l->dp && st == RP_OK; k++) {
            size_t kb, kn;
            rp_zero_range(n, l->dp, k, &kb, &kn);
            if (k != l->me && kn)
                be->copy_to_device(be, buf + kb, l->host + kb, kn * sizeof(float));
        }
        return st;
    }
    const size_t *iv;
    int niv;
    uint16_t *copy = bf16_copy(l, buf, n, &iv, &niv);
    if (copy) return allgather_bf16(l, buf, n, copy, iv, niv, what, err);
    return allgather_fp32(l, buf, n, what, err);
}

int rp_zero_links_bf16(const rp_zero_links *l) { return l && l->model; }

/* ---- the fp32 master weights' memory ---- */

/* The matrices' offsets of buffer buf [n] of m (a layer or the head), or
 * 0 intervals (the embedding: no matrix read through a copy). */
static int matrices_of(const rp_model *m, const float *buf, size_t n, size_t *iv) {
    rp_tensor_info table[RP_LAYER_N_TENSORS], gtable[RP_GLOBAL_N_TENSORS];
    if (m->head_flat && buf == m->head_flat && n == m->head_floats) {
        rp_global_layout(&m->cfg, gtable, NULL, NULL);
        return matrix_table(gtable, RP_GLOBAL_N_TENSORS, RP_PART_HEAD, iv);
    }
    if (buf == m->embed_flat) return 0;
    rp_layer_layout(&m->cfg, table);
    return matrix_table(table, RP_LAYER_N_TENSORS, RP_PART_LAYER, iv);
}

/* Byte offsets [lo, hi) of the whole pages of a buffer [n] that hold only
 * matrix floats outside [own_b, own_e): the pages nothing reads under the
 * bf16 all-gather. Adjacent matrices merge, so a page across the border of
 * two stale matrices goes too. Returns the count of runs (<= niv + 1). */
static int stale_pages(const size_t *iv, int niv, size_t own_b, size_t own_e, size_t page,
                       size_t *runs) {
    int nr = 0;
    for (int i = 0; i < niv;) {
        size_t b = iv[2 * i], e = iv[2 * i + 1];
        for (i++; i < niv && iv[2 * i] == e; i++) e = iv[2 * i + 1];
        /* [b, e) minus the own range: up to two pieces. */
        const size_t piece[2][2] = {{b, e < own_b ? e : own_b}, {b > own_e ? b : own_e, e}};
        for (int k = 0; k < 2; k++) {
            const size_t lo = (piece[k][0] * sizeof(float) + page - 1) / page * page;
            const size_t hi = piece[k][1] * sizeof(float) / page * page;
            if (piece[k][0] < piece[k][1] && lo < hi) {
                runs[2 * nr] = lo;
                runs[2 * nr + 1] = hi;
                nr++;
            }
        }
    }
    return nr;
}

/* One buffer *buf [n] into a sparse buffer whose stale pages are given
 * back (when it has any). */
static rp_status make_sparse(rp_zero_links *l, const rp_model *m, float **buf, size_t n,
                             rp_error *err) {
    rp_backend *be = l->be;
    size_t iv[2 * RP_LAYER_N_TENSORS + 2 * RP_GLOBAL_N_TENSORS];
    size_t runs[4 * (RP_LAYER_N_TENSORS + RP_GLOBAL_N_TENSORS)];  /* 2 runs per matrix */
    const int niv = matrices_of(m, *buf, n, iv);
    size_t b, mine;
    rp_zero_range(n, l->dp, l->me, &b, &mine);
    const int nr = stale_pages(iv, niv, b, b + mine, be->sparse_page, runs);
    if (!nr) return RP_OK;  /* no whole stale page: the buffer stays as it is */
    float *sparse = be->alloc_sparse(be, n * sizeof(float));
    if (!sparse)
        return rp_error_set(err, RP_ERR_NOMEM, "ZeRO-1: a sparse weight buffer of %zu bytes "
                            "(%s); run without --zero or with fp32 GEMM math", n * sizeof(float),
                            be->name);
    be->copy(be, sparse, *buf, n * sizeof(float));
    be->free(be, *buf);  /* forgets its bf16 copy */
    *buf = sparse;
    /* The new buffer's copy, from its fp32 while every page is backed. */
    if (be->register_weights) be->register_weights(be, sparse, n);
    /* Without its copy the GEMMs and the all-gather would use the fp32 of
     * the pages given back. */
    if (!be->weight_copy(be, sparse, n))
        return rp_error_set(err, RP_ERR_NOMEM, "ZeRO-1: no room for the bf16 copy of a weight "
                            "buffer of %zu floats (%s) again after moving it into a sparse "
                            "buffer; run without --zero", n, be->name);
    for (int r = 0; r < nr; r++)
        l->released += be->release_range(be, (char *)sparse + runs[2 * r],
                                         runs[2 * r + 1] - runs[2 * r]);
    return be->status(be, err);
}

rp_status rp_zero_links_release_master(rp_zero_links *l, rp_model *m, rp_error *err) {
    if (!l || !l->model || l->model != m) return RP_OK;
    rp_backend *be = l->be;
    if (!be->sparse_page || !be->alloc_sparse || !be->release_range) return RP_OK;
    rp_status st = RP_OK;
    for (int i = 0; st == RP_OK && i < m->layer_end - m->layer_begin; i++) {
        st = make_sparse(l, m, &m->layer_flat[i], m->layer_floats, err);
        rp_layer_bind(&m->layers[i], m->layer_flat[i], &m->cfg);
    }
    if (st == RP_OK && m->head_flat) {
        st = make_sparse(l, m, &m->head_flat, m->head_floats, err);
        rp_global_bind(&m->global, m->embed_flat, m->head_flat, &m->cfg);
    }
    /* From now on a save gathers from the owners (rp_zero_links_gather_
     * master), even before the first bf16 all-gather: the same decision on
     * every replica (one backend kind), whatever each one gave back. */
    l->stale = 1;
    return st;
}

void rp_zero_links_memory(const rp_zero_links *l, const rp_model *m, rp_zero_memory *out) {
    memset(out, 0, sizeof *out);
    rp_backend *be = m->be;
    size_t n, iv[2 * RP_LAYER_N_TENSORS + 2 * RP_GLOBAL_N_TENSORS];
    float *w;
    for (int i = 0; (w = rp_zero_buffer(m, i, &n)); i++) {
        out->fp32_bytes += n * sizeof(float);
        const int niv = matrices_of(m, w, n, iv);
        for (int k = 0; k < niv; k++) out->matrix_bytes += (iv[2 * k + 1] - iv[2 * k]) * 4;
        if (be->weight_copy && w != m->embed_flat && be->weight_copy(be, w, n))
            out->bf16_bytes += n * sizeof(uint16_t);
    }
    /* The pages given back hold matrix floats only (stale_pages). */
    const size_t released = l ? l->released : 0;
    out->fp32_backed = out->fp32_bytes - released;
    out->matrix_backed = out->matrix_bytes - released;
    out->page = l && l->model && be->release_range ? be->sparse_page : 0;
}

void rp_zero_links_drop_master(rp_zero_links *l) {
    if (!l || !l->has_master) return;
    rp_model_free(&l->master);
    l->has_master = 0;
}

rp_status rp_zero_links_gather_master(rp_zero_links *l, const rp_model *m, rp_backend *host_be,
                                      const rp_model **whole, rp_error *err) {
    static const char what[] = "the fp32 weights' gather to data replica 0 (--zero 1; for a "
                               "checkpoint or the -o file)";
    *whole = m;
    if (!l || !l->stale) return RP_OK;
    rp_zero_links_drop_master(l);
    const int root = l->me == 0;
    /* Every replica checks, so none waits in the gather for one that
     * refused (the same options on every rank). */
    if (!host_be || !host_be->is_host_memory)
        return rp_error_set(err, RP_ERR_ARG, "%s: the host backend for the copy is %s; the "
                            "caller sets rp_train_options.host_backend to a backend of host "
                            "memory (the CLI: the CPU backend)", what,
                            host_be ? host_be->name : "missing");
    rp_status st = RP_OK;
    /* Replica 0: the whole weights in host memory. The others: their range
     * of a buffer staged through a host buffer. */
    size_t most = 1, n;
    float *w;
    for (int i = 0; (w = rp_zero_buffer(m, i, &n)); i++)
        if (n > most) most = n;
    float *mine_host = NULL;
    int *counts = malloc(sizeof(int) * 2 * (size_t)l->dp);
    if (!counts) st = rp_error_set(err, RP_ERR_NOMEM, "%s: counts", what);
    if (st == RP_OK && root) {
        st = rp_model_alloc(&l->master, &m->cfg, m->layer_begin, m->layer_end, m->has_embed,
                            m->has_head, host_be, err);
        if (st == RP_OK) l->has_master = 1;
        else st = rp_error_prefix(err, "%s: host memory for the whole fp32 weights", what);
    }
    if (st == RP_OK && !root && !(mine_host = malloc(sizeof(float) * (most / l->dp + 1))))
        st = rp_error_set(err, RP_ERR_NOMEM, "%s: a host buffer of %zu floats", what,
                          most / l->dp + 1);
    /* A replica that failed stops here; the others' gather ends with the
     * --comm-timeout watchdog. */
    for (int i = 0; st == RP_OK && (w = rp_zero_buffer(m, i, &n)); i++) {
        if ((st = ranges(n, l->dp, counts, counts + l->dp, what, err)) != RP_OK) break;
        size_t b, cnt;
        rp_zero_range(n, l->dp, l->me, &b, &cnt);
        size_t nn;
        float *full = root ? rp_zero_buffer(&l->master, i, &nn) : NULL;
        float *stage = root ? full + b : mine_host;
        if (cnt) l->be->copy_to_host(l->be, stage, w + b, cnt * sizeof(float));
        MPI_Request req;
        st = started(MPI_Igatherv(root ? MPI_IN_PLACE : stage, (int)cnt, MPI_FLOAT, full, counts,
                                  counts + l->dp, MPI_FLOAT, 0, l->comm, &req), what, err);
        if (st == RP_OK) st = rp_comm_wait(&req, l->timeout_s, what, err);
    }
    free(counts);
    free(mine_host);
    if (st != RP_OK) {
        rp_zero_links_drop_master(l);
        return st;
    }
    *whole = root ? &l->master : NULL;
    return RP_OK;
}
