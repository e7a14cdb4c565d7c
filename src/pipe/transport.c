/* MPI implementation of the stage-to-stage transport (transport.h), with
 * host staging for device buffers, and the dispatch of device transfers to
 * the NCCL links of transport_nccl.c when they are set up. In builds without
 * NCCL the NCCL entry points here only say so. */
#include "config.h"

#include "pipe/transport.h"

#include <limits.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "pipe/transport_nccl.h"
#include "core/clock.h"

const char *rp_msg_kind_name(rp_msg_kind k) {
    switch (k) {
    case RP_MSG_ACT: return "activations";
    case RP_MSG_ACT_VFIRST: return "v_first activations";
    case RP_MSG_GRAD: return "activation gradients";
    case RP_MSG_GRAD_VFIRST: return "v_first gradients";
    case RP_MSG_CONTROL: return "control message";
    case RP_MSG_RESULT: return "engine result";
    case RP_MSG_STATE: return "session state";
    default: return "unknown message";
    }
}

int rp_transport_tag(rp_msg_kind kind, int micro_batch) {
    return (int)kind * RP_TRANSPORT_TAG_SPAN + (micro_batch % RP_TRANSPORT_TAG_SPAN);
}

rp_status rp_transport_init(rp_transport *t, MPI_Comm comm, double timeout_s, rp_error *err) {
    memset(t, 0, sizeof *t);
    t->timeout_s = timeout_s;
    if (MPI_Comm_dup(comm, &t->comm) != MPI_SUCCESS)
        return rp_error_set(err, RP_ERR_MPI, "MPI_Comm_dup failed for the stage transport");
    /* Errors (a truncated message above all) come back as codes we can name. */
    MPI_Comm_set_errhandler(t->comm, MPI_ERRORS_RETURN);
    MPI_Comm_rank(t->comm, &t->rank);
    MPI_Comm_size(t->comm, &t->size);
    int tag_ub_ok = 0, *tag_ub = NULL;
    MPI_Comm_get_attr(t->comm, MPI_TAG_UB, &tag_ub, &tag_ub_ok);
    /* The largest tag is the last kind's last micro-batch. */
    if (tag_ub_ok && *tag_ub < RP_MSG_KIND_COUNT * RP_TRANSPORT_TAG_SPAN - 1) {
        int ub = *tag_ub;
        rp_transport_free(t);
        return rp_error_set(err, RP_ERR_MPI, "this MPI allows message tags up to %d; the "
                            "transport needs %d", ub,
                            RP_MSG_KIND_COUNT * RP_TRANSPORT_TAG_SPAN - 1);
    }
    snprintf(t->what_buf, sizeof t->what_buf, "stage %d", t->rank);
    t->what = t->what_buf;
    /* Every rank's node, so that the error about a dead or cut-off peer
     * names the node (a rank number alone sends users to the rank map). */
    rp_transport_peer self = {.world_rank = 0};
    MPI_Comm_rank(MPI_COMM_WORLD, &self.world_rank);
    gethostname(self.host, sizeof self.host - 1);
    t->peers = calloc((size_t)t->size, sizeof *t->peers);
    if (!t->peers) {
        rp_transport_free(t);
        return rp_error_set(err, RP_ERR_NOMEM, "the stage transport's table of %d ranks",
                            t->size);
    }
    if (MPI_Allgather(&self, (int)sizeof self, MPI_BYTE, t->peers, (int)sizeof self, MPI_BYTE,
                      t->comm) != MPI_SUCCESS) {
        rp_transport_free(t);
        return rp_error_set(err, RP_ERR_MPI, "MPI_Allgather of the ranks' host names failed");
    }
    return RP_OK;
}

const char *rp_transport_peer_where(const rp_transport *t, int peer, char *buf, size_t size) {
    if (!t->peers || peer < 0 || peer >= t->size)
        snprintf(buf, size, "%s", "");
    else
        snprintf(buf, size, " (rank %d on %s)", t->peers[peer].world_rank, t->peers[peer].host);
    return buf;
}

const char *rp_transport_others_where(const rp_transport *t, char *buf, size_t size) {
    snprintf(buf, size, "%s", "");
    if (!t || !t->peers) return buf;
    /* The ranks' word as transport_collective.c's messages use it. */
    const char *word = t->what && strncmp(t->what, "rank", 4) == 0 ? "rank" : "stage";
    size_t len = 0;
    for (int r = 0; r < t->size && len < size; r++) {
        if (r == t->rank) continue;
        char where[96];
        rp_transport_peer_where(t, r, where, sizeof where);
        int n = len ? snprintf(buf + len, size - len, ", %s %d%s", word, r, where)
                    : snprintf(buf, size, " (the other %ss: %s %d%s", word, word, r, where);
        if (n < 0) break;
        len += (size_t)n;
    }
    if (len > 0 && len + 1 < size) snprintf(buf + len, size - len, ")");
    return buf;
}

void rp_transport_free(rp_transport *t) {
#ifdef RP_HAVE_NCCL
    if (t->nccl) rp_nccl_links_free(t);
#endif
    t->nccl = NULL;
    for (int i = 0; i < t->n_staging; i++) free(t->staging[i].data);
    free(t->staging);
    t->staging = NULL;
    t->n_staging = 0;
    free(t->peers);
    t->peers = NULL;
    if (t->comm != MPI_COMM_NULL && t->comm != 0) MPI_Comm_free(&t->comm);
    t->comm = MPI_COMM_NULL;
}

void rp_transport_use_backend(rp_transport *t, rp_backend *be) {
    t->be = be && !be->is_host_memory ? be : NULL;
}

void rp_transport_pause_nccl(rp_transport *t, int paused) { t->nccl_paused = paused != 0; }

int rp_transport_nccl_active(const rp_transport *t) { return t->nccl && !t->nccl_paused; }

void rp_transport_group_begin(rp_transport *t) {
#ifdef RP_HAVE_NCCL
    if (t->nccl) rp_nccl_group_begin(t);
#else
    (void)t;
#endif
}

rp_status rp_transport_group_end(rp_transport *t, rp_error *err) {
#ifdef RP_HAVE_NCCL
    if (t->nccl) return rp_nccl_group_end(t, err);
#else
    (void)t;
    (void)err;
#endif
    return RP_OK;
}

/* ---- host staging of device buffers ---- */

/* A free staging buffer of at least bytes: the smallest free one that is
 * large enough, else a free one grown, else a new one. -1 when out of
 * memory. The pool only grows to the number of transfers ever in flight at
 * once (a handful per stash slot in the executor). */
static int staging_acquire(rp_transport *t, size_t bytes, rp_error *err) {
    int best = -1, any_free = -1;
    if (bytes == 0) bytes = 1;
    for (int i = 0; i < t->n_staging; i++) {
        if (t->staging[i].busy) continue;
        any_free = i;
        if (t->staging[i].bytes >= bytes &&
            (best < 0 || t->staging[i].bytes < t->staging[best].bytes))
            best = i;
    }
    if (best < 0 && any_free >= 0) {
        void *grown = malloc(bytes);
        if (grown) {
            free(t->staging[any_free].data);
            t->staging[any_free].data = grown;
            t->staging[any_free].bytes = bytes;
            best = any_free;
        }
    }
    if (best < 0) {
        rp_staging_buffer *list = realloc(t->staging, sizeof *list * (size_t)(t->n_staging + 1));
        void *data = list ? malloc(bytes) : NULL;
        if (list) t->staging = list;
        if (!data) {
            rp_error_set(err, RP_ERR_NOMEM, "%s: a host staging buffer of %zu bytes", t->what,
                         bytes);
            return -1;
        }
        best = t->n_staging++;
        t->staging[best] = (rp_staging_buffer){.data = data, .bytes = bytes};
    }
    t->staging[best].busy = 1;
    return best;
}

static void staging_release(rp_transport *t, rp_transfer *x) {
    if (x->staging >= 0) t->staging[x->staging].busy = 0;
    x->staging = -1;
}

static rp_status mpi_failed(rp_transport *t, int rc, const char *call, const rp_transfer *x,
                            rp_error *err) {
    char text[MPI_MAX_ERROR_STRING] = "";
    int len = 0;
    MPI_Error_string(rc, text, &len);
    char where[96];
    return rp_error_set(err, RP_ERR_MPI, "%s: %s of micro-batch %d %s stage %d%s failed in %s: %s",
                        t->what, rp_msg_kind_name(x->kind), x->micro_batch,
                        x->is_recv ? "from" : "to", x->peer,
                        rp_transport_peer_where(t, x->peer, where, sizeof where), call, text);
}

static rp_status check_args(rp_transport *t, size_t bytes, int peer, rp_msg_kind kind,
                            int micro_batch, rp_error *err) {
    if (peer < 0 || peer >= t->size || peer == t->rank)
        return rp_error_set(err, RP_ERR_INTERNAL, "%s: transfer with peer %d of %d", t->what,
                            peer, t->size);
    if (kind < RP_MSG_ACT || kind >= RP_MSG_KIND_COUNT || micro_batch < 0)
        return rp_error_set(err, RP_ERR_INTERNAL, "%s: bad message kind %d / micro-batch %d",
                            t->what, (int)kind, micro_batch);
    return RP_OK;
}

static rp_status check_mpi_count(rp_transport *t, size_t bytes, rp_error *err) {
    if (bytes > (size_t)INT_MAX)
        return rp_error_set(err, RP_ERR_ARG,
                            "%s: a message of %zu bytes is over MPI's 2 GiB count limit; use "
                            "smaller micro-batches", t->what, bytes);
    return RP_OK;
}

#ifdef RP_HAVE_NCCL
/* Which NCCL link carries this transfer, or -1: MPI. */
static int nccl_link_for(const rp_transport *t, rp_msg_kind kind, int peer, int is_recv) {
    return t->be && rp_transport_nccl_active(t) ? rp_nccl_link_of(t, kind, peer, is_recv) : -1;
}
#endif

rp_status rp_transport_post_send(rp_transport *t, const void *buf, size_t bytes, int peer,
                                 rp_msg_kind kind, int micro_batch, rp_transfer *x,
                                 rp_error *err) {
    rp_status st = check_args(t, bytes, peer, kind, micro_batch, err);
    if (st != RP_OK) return st;
    *x = (rp_transfer){.active = 1, .is_recv = 0, .peer = peer, .kind = kind,
                       .micro_batch = micro_batch, .bytes = bytes, .staging = -1, .link = -1};
#ifdef RP_HAVE_NCCL
    if ((x->link = nccl_link_for(t, kind, peer, 0)) >= 0)
        return rp_nccl_post(t, (void *)buf, x, err);
#endif
    if ((st = check_mpi_count(t, bytes, err)) != RP_OK) {
        x->active = 0;
        return st;
    }
    const void *data = buf;
    if (t->be) {
        /* copy_to_host waits for the kernels that wrote buf (queued on the
         * backend's stream), then we send the host copy. */
        if ((x->staging = staging_acquire(t, bytes, err)) < 0) {
            x->active = 0;
            return RP_ERR_NOMEM;
        }
        data = t->staging[x->staging].data;
        t->be->copy_to_host(t->be, t->staging[x->staging].data, buf, bytes);
        if ((st = t->be->status(t->be, err)) != RP_OK) {
            staging_release(t, x);
            x->active = 0;
            return rp_error_prefix(err, "%s: staging the %s of micro-batch %d for stage %d",
                                   t->what, rp_msg_kind_name(kind), micro_batch, peer);
        }
    }
    int rc = MPI_Isend(data, (int)bytes, MPI_BYTE, peer, rp_transport_tag(kind, micro_batch), t->comm,
                       &x->request);
    if (rc != MPI_SUCCESS) {
        staging_release(t, x);
        x->active = 0;
        return mpi_failed(t, rc, "MPI_Isend", x, err);
    }
    return RP_OK;
}

rp_status rp_transport_post_recv(rp_transport *t, void *buf, size_t bytes, int peer,
                                 rp_msg_kind kind, int micro_batch, rp_transfer *x,
                                 rp_error *err) {
    rp_status st = check_args(t, bytes, peer, kind, micro_batch, err);
    if (st != RP_OK) return st;
    *x = (rp_transfer){.active = 1, .is_recv = 1, .peer = peer, .kind = kind,
                       .micro_batch = micro_batch, .bytes = bytes, .staging = -1, .link = -1};
#ifdef RP_HAVE_NCCL
    if ((x->link = nccl_link_for(t, kind, peer, 1)) >= 0) return rp_nccl_post(t, buf, x, err);
#endif
    if ((st = check_mpi_count(t, bytes, err)) != RP_OK) {
        x->active = 0;
        return st;
    }
    void *data = buf;
    if (t->be) {
        /* Lands in host memory; rp_transport_wait copies it to buf. */
        if ((x->staging = staging_acquire(t, bytes, err)) < 0) {
            x->active = 0;
            return RP_ERR_NOMEM;
        }
        data = t->staging[x->staging].data;
        x->device_buf = buf;
    }
    int rc = MPI_Irecv(data, (int)bytes, MPI_BYTE, peer, rp_transport_tag(kind, micro_batch), t->comm,
                       &x->request);
    if (rc != MPI_SUCCESS) {
        staging_release(t, x);
        x->active = 0;
        return mpi_failed(t, rc, "MPI_Irecv", x, err);
    }
    return RP_OK;
}

/* ---- The guard (transport.h, rp_comm_guard_arm) ----
 * One armed wait at most; the guard thread looks every GUARD_POLL_NS. Arming
 * and disarming take an uncontended mutex (~50 ns); the message is formatted
 * only when the guard fires, from fields that live as long as the wait. */
#define GUARD_POLL_NS 200000000L

static struct {
    pthread_mutex_t lock;
    int armed;
    double deadline, timeout_s;
    const rp_transport *t;
    const char *who, *what;
    int micro_batch, peer;
} guard = {.lock = PTHREAD_MUTEX_INITIALIZER};
static pthread_once_t guard_once = PTHREAD_ONCE_INIT;
static int guard_running;

static void guard_fire(void) {
    char where[96] = "", line[512];
    if (guard.t && guard.peer >= 0)
        rp_transport_peer_where(guard.t, guard.peer, where, sizeof where);
    char mb[32] = "";
    if (guard.micro_batch >= 0) snprintf(mb, sizeof mb, " of micro-batch %d", guard.micro_batch);
    char from[160] = "";
    if (guard.peer >= 0) snprintf(from, sizeof from, ", peer stage %d%s", guard.peer, where);
    const int n = snprintf(line, sizeof line,
                           "rwkvpipe: error: %s waited %.0f s (--comm-timeout %.0f + %.0f) for "
                           "%s%s%s, inside an MPI call that did not return (MPI stuck handling a "
                           "peer that stopped or died); exiting with status 1 without MPI\n",
                           guard.who, guard.timeout_s + RP_COMM_GUARD_GRACE_S, guard.timeout_s,
                           RP_COMM_GUARD_GRACE_S, guard.what, mb, from);
    if (n > 0) {
        ssize_t w = write(STDERR_FILENO, line, (size_t)n < sizeof line ? (size_t)n : sizeof line - 1);
        (void)w;
    }
    /* No MPI_Abort: the thread is inside MPI and so may be its runtime.
     * The launcher (mpirun, srun) sees the exit and ends the other ranks. */
    _exit(1);
}

static void *guard_main(void *arg) {
    (void)arg;
    for (;;) {
        struct timespec ts = {0, GUARD_POLL_NS};
        nanosleep(&ts, NULL);
        pthread_mutex_lock(&guard.lock);
        if (guard.armed && rp_now_seconds() > guard.deadline) guard_fire();
        pthread_mutex_unlock(&guard.lock);
    }
    return NULL;
}

/* Signals stay with the other threads (SIGUSR1 / SIGTERM stop training via
 * handlers that expect to interrupt the main thread). */
static void guard_start(void) {
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    pthread_t th;
    if (pthread_create(&th, NULL, guard_main, NULL) == 0) {
        pthread_detach(th);
        guard_running = 1;
    } else {
        fprintf(stderr, "rwkvpipe: warning: cannot start the --comm-timeout guard thread: a "
                        "peer's death that blocks inside MPI will hang this rank\n");
    }
    pthread_sigmask(SIG_SETMASK, &old, NULL);
}

void rp_comm_guard_arm(double timeout_s, const rp_transport *t, const char *who,
                       const char *what, int micro_batch, int peer) {
    if (!(timeout_s > 0)) return;
    pthread_once(&guard_once, guard_start);
    pthread_mutex_lock(&guard.lock);
    guard.armed = guard_running;
    guard.timeout_s = timeout_s;
    guard.deadline = rp_now_seconds() + timeout_s + RP_COMM_GUARD_GRACE_S;
    guard.t = t;
    guard.who = who ? who : "this rank";
    guard.what = what ? what : "a peer";
    guard.micro_batch = micro_batch;
    guard.peer = peer;
    pthread_mutex_unlock(&guard.lock);
}

void rp_comm_guard_disarm(void) {
    pthread_mutex_lock(&guard.lock);
    guard.armed = 0;
    pthread_mutex_unlock(&guard.lock);
}

/* MPI_Test until the request completes, an MPI error, or timeout_s (> 0)
 * passes (*timed_out = 1, *waited = seconds). Polls with a growing sleep
 * capped at 50 us: a wait on the critical path then ends within 50 us of its
 * message (a 1 ms cap cost the pipeline ~1 bubble point per micro-batch), and
 * the watchdog can fire instead of hanging forever. Returns MPI_Test's code. */
static int test_until(MPI_Request *request, MPI_Status *status, double timeout_s,
                      int *timed_out, double *waited) {
    const double start = rp_now_seconds();
    long sleep_ns = 1000;
    *timed_out = 0;
    for (;;) {
        int done = 0;
        int rc = MPI_Test(request, &done, status);
        if (rc != MPI_SUCCESS || done) return rc;
        *waited = rp_now_seconds() - start;
        if (timeout_s > 0 && *waited > timeout_s) {
            *timed_out = 1;
            return MPI_SUCCESS;
        }
        struct timespec ts = {0, sleep_ns};
        nanosleep(&ts, NULL);
        if (sleep_ns < 50000) sleep_ns *= 2;
    }
}

/* The MPI part of rp_transport_wait (the request completes or is cancelled). */
static rp_status wait_mpi(rp_transport *t, rp_transfer *x, rp_error *err) {
    MPI_Status status;
    int timed_out;
    double waited = 0;
    /* Armed through the cancel too: MPI_Wait on a receive that had started
     * to arrive from the dead peer cannot end. */
    rp_comm_guard_arm(t->timeout_s, t, t->what, rp_msg_kind_name(x->kind), x->micro_batch,
                      x->peer);
    const int rc = test_until(&x->request, &status, t->timeout_s, &timed_out, &waited);
    if (timed_out) {
        /* A receive left posted could swallow a later message of that tag. */
        if (x->is_recv && MPI_Cancel(&x->request) == MPI_SUCCESS)
            MPI_Wait(&x->request, MPI_STATUS_IGNORE);
        else if (!x->is_recv)
            x->staging = -1;  /* MPI may still read it: never hand it out again */
        rp_comm_guard_disarm();
        char where[96];
        return rp_error_set(err, RP_ERR_MPI,
                            "%s waited %.0f s (--comm-timeout) to %s the %s of micro-batch "
                            "%d %s stage %d%s; that rank is stuck or dead", t->what, waited,
                            x->is_recv ? "receive" : "send", rp_msg_kind_name(x->kind),
                            x->micro_batch, x->is_recv ? "from" : "to", x->peer,
                            rp_transport_peer_where(t, x->peer, where, sizeof where));
    }
    rp_comm_guard_disarm();
    if (rc != MPI_SUCCESS) {
        int cls = 0;
        MPI_Error_class(rc == MPI_ERR_IN_STATUS ? status.MPI_ERROR : rc, &cls);
        if (cls == MPI_ERR_TRUNCATE)
            return rp_error_set(err, RP_ERR_MPI,
                                "%s: the %s of micro-batch %d from stage %d are larger than the "
                                "%zu bytes expected: the stages disagree on the batch shape",
                                t->what, rp_msg_kind_name(x->kind), x->micro_batch, x->peer,
                                x->bytes);
        return mpi_failed(t, rc, "MPI_Test", x, err);
    }
    if (x->is_recv) {
        int count = 0;
        MPI_Get_count(&status, MPI_BYTE, &count);
        if ((size_t)count != x->bytes)
            return rp_error_set(err, RP_ERR_MPI,
                                "%s: the %s of micro-batch %d from stage %d hold %d bytes, "
                                "expected %zu: the stages disagree on the batch shape", t->what,
                                rp_msg_kind_name(x->kind), x->micro_batch, x->peer, count,
                                x->bytes);
        /* Stream-ordered before the backend's next kernels; from pageable
         * memory the copy returns once the source is read, so the staging
         * buffer can go back to the pool right away. */
        if (x->staging >= 0)
            t->be->copy_to_device(t->be, x->device_buf, t->staging[x->staging].data, x->bytes);
    }
    return RP_OK;
}

rp_status rp_transport_wait(rp_transport *t, rp_transfer *x, rp_error *err) {
    if (!x->active) return RP_OK;
    x->active = 0;
#ifdef RP_HAVE_NCCL
    if (t->nccl && x->link >= 0) return rp_nccl_wait(t, x, err);
#endif
    rp_status st = wait_mpi(t, x, err);
    staging_release(t, x);
    return st;
}

rp_status rp_comm_wait(MPI_Request *request, double timeout_s, const char *what, rp_error *err) {
    int timed_out;
    double waited = 0;
    rp_comm_guard_arm(timeout_s, NULL, "this rank", what, -1, -1);
    const int rc = test_until(request, MPI_STATUS_IGNORE, timeout_s, &timed_out, &waited);
    rp_comm_guard_disarm();
    if (timed_out)
        return rp_error_set(err, RP_ERR_MPI,
                            "waited %.0f s (--comm-timeout) for %s; a rank is stuck or dead",
                            waited, what);
    if (rc != MPI_SUCCESS) {
        char text[MPI_MAX_ERROR_STRING] = "";
        int len = 0;
        MPI_Error_string(rc, text, &len);
        return rp_error_set(err, RP_ERR_MPI, "%s failed: %s", what, text);
    }
    return RP_OK;
}

rp_status rp_transport_send(rp_transport *t, const void *buf, size_t bytes, int peer,
                            rp_msg_kind kind, int micro_batch, rp_error *err) {
    rp_transfer x;
    rp_status st = rp_transport_post_send(t, buf, bytes, peer, kind, micro_batch, &x, err);
    return st != RP_OK ? st : rp_transport_wait(t, &x, err);
}

rp_status rp_transport_recv(rp_transport *t, void *buf, size_t bytes, int peer,
                            rp_msg_kind kind, int micro_batch, rp_error *err) {
    rp_transfer x;
    rp_status st = rp_transport_post_recv(t, buf, bytes, peer, kind, micro_batch, &x, err);
    return st != RP_OK ? st : rp_transport_wait(t, &x, err);
}

#ifndef RP_HAVE_NCCL
/* ---- builds without NCCL ---- */

rp_status rp_transport_enable_nccl(rp_transport *t, rp_backend *be, rp_error *err) {
    (void)be;
    return rp_error_set(err, RP_ERR_ARG, "%s: built without NCCL (configure --with-cuda "
                        "--with-nccl)", t->what);
}

int rp_nccl_usable(MPI_Comm comm, const rp_backend *be, char *why, size_t why_size) {
    (void)comm, (void)be;
    if (why && why_size) snprintf(why, why_size, "built without NCCL");
    return 0;
}

rp_status rp_nccl_group_create(rp_nccl_group **g, MPI_Comm comm, double timeout_s,
                               rp_error *err) {
    (void)comm, (void)timeout_s;
    *g = NULL;
    return rp_error_set(err, RP_ERR_ARG, "built without NCCL (configure --with-cuda --with-nccl)");
}

void rp_nccl_group_free(rp_nccl_group *g) { (void)g; }

rp_status rp_nccl_group_allreduce_sum(rp_nccl_group *g, float *buf, size_t n, const char *what,
                                      rp_error *err) {
    (void)g, (void)buf, (void)n;
    return rp_error_set(err, RP_ERR_ARG, "%s: built without NCCL", what);
}

rp_status rp_nccl_group_sendrecv(rp_nccl_group *g, const void *src, void *dst, size_t bytes,
                                 int peer, rp_error *err) {
    (void)g, (void)src, (void)dst, (void)bytes, (void)peer;
    return rp_error_set(err, RP_ERR_ARG, "NCCL send/receive: built without NCCL");
}

rp_status rp_nccl_group_exchange(rp_nccl_group *g, const float *src, const size_t *send_at,
                                 const size_t *send_n, float *dst, const size_t *recv_at,
                                 const size_t *recv_n, const char *what, rp_error *err) {
    (void)g, (void)src, (void)send_at, (void)send_n, (void)dst, (void)recv_at, (void)recv_n;
    return rp_error_set(err, RP_ERR_ARG, "%s: built without NCCL", what);
}

rp_status rp_nccl_group_run(rp_nccl_group *g, const rp_nccl_xfer *x, int n, const char *what,
                            rp_error *err) {
    (void)g, (void)x, (void)n;
    return rp_error_set(err, RP_ERR_ARG, "%s: built without NCCL", what);
}
#endif
