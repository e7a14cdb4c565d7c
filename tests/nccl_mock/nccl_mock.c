/* A mock NCCL (and the CUDA stream/event calls around it) for CPU builds, so
 * that src/pipe/transport_nccl.c runs unchanged under mpirun in make check
 * (README.md). Device memory is host memory; each rank's NCCL kernels are
 * queued on streams and, when they reach the head, post their transfers as
 * MPI_Issend / MPI_Irecv on MPI_COMM_WORLD: a send completes only once its
 * receive has started, as an NCCL send waits for its peer's kernel.
 *
 * NCCL does not promise to progress two communicators at once (a kernel
 * waiting for its peer may hold the GPU). By default (RP_NCCL_MOCK=serial)
 * the mock runs one kernel per rank at a time, to completion, in the order
 * they were issued (the kernels of one ncclGroupEnd start together): a
 * schedule that needs two communicators to progress together hangs here,
 * and the transport's --comm-timeout watchdog ends it. RP_NCCL_MOCK=
 * concurrent runs every stream's head kernel at once, as a roomy GPU might. */
#include "config.h"

#include <mpi.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cuda_runtime.h"
#include "nccl.h"

/* ---- streams, events and kernels ---- */

typedef struct {
    int is_recv;
    void *buf;
    size_t bytes;
    int peer;  /* rank in the communicator */
    MPI_Request req;
} mock_op;

typedef struct {
    struct mock_comm *comm;
    unsigned long launch;  /* kernels of one ncclGroupEnd share it */
    int started;
    int n_ops;
    mock_op *ops;
} mock_kernel;

enum { ITEM_COPY, ITEM_EVENT, ITEM_KERNEL };

typedef struct mock_item {
    int type;
    void *dst;
    const void *src;
    size_t bytes;
    struct mock_event *event;
    unsigned long generation;
    mock_kernel *kernel;
    struct mock_item *next;
} mock_item;

struct mock_stream {
    mock_item *head, *tail;
    struct mock_stream *next_stream;
};

struct mock_event {
    unsigned long recorded, reached;
};

struct mock_comm {
    int nranks, rank, tag;
    int *world;  /* [nranks] MPI_COMM_WORLD rank of each */
    ncclResult_t error;
    char last_error[160];
    unsigned long long sent_fp32, sent_bf16, sent_other;  /* bytes, for RP_NCCL_MOCK_STATS */
};

static struct mock_stream *all_streams;
static unsigned long next_launch = 1;
static int kernels_running;

static int serial_mode(void) {
    const char *m = getenv("RP_NCCL_MOCK");
    return !(m && strcmp(m, "concurrent") == 0);
}

static int world_rank(void) {
    int r = 0;
    MPI_Comm_rank(MPI_COMM_WORLD, &r);
    return r;
}

static void item_push(struct mock_stream *s, mock_item *it) {
    it->next = NULL;
    if (s->tail) s->tail->next = it;
    else s->head = it;
    s->tail = it;
}

static void item_pop(struct mock_stream *s) {
    mock_item *it = s->head;
    s->head = it->next;
    if (!s->head) s->tail = NULL;
    if (it->kernel) {
        free(it->kernel->ops);
        free(it->kernel);
    }
    free(it);
}

static void kernel_start(mock_kernel *k) {
    k->started = 1;
    kernels_running++;
    for (int i = 0; i < k->n_ops; i++) {
        mock_op *o = &k->ops[i];
        const int to = k->comm->world[o->peer];
        if (o->is_recv)
            MPI_Irecv(o->buf, (int)o->bytes, MPI_BYTE, to, k->comm->tag, MPI_COMM_WORLD, &o->req);
        else
            MPI_Issend(o->buf, (int)o->bytes, MPI_BYTE, to, k->comm->tag, MPI_COMM_WORLD,
                       &o->req);
    }
}

static int kernel_done(mock_kernel *k) {
    for (int i = 0; i < k->n_ops; i++) {
        if (k->ops[i].req == MPI_REQUEST_NULL) continue;
        int flag = 0;
        MPI_Test(&k->ops[i].req, &flag, MPI_STATUS_IGNORE);
        if (!flag) return 0;
    }
    return 1;
}

/* Runs what can run: copies and event records at a stream's head at once,
 * the kernels as the mode allows. */
static void progress(void) {
    for (int changed = 1; changed;) {
        changed = 0;
        for (struct mock_stream *s = all_streams; s; s = s->next_stream) {
            while (s->head) {
                mock_item *it = s->head;
                if (it->type == ITEM_COPY) {
                    memmove(it->dst, it->src, it->bytes);
                } else if (it->type == ITEM_EVENT) {
                    if (it->generation > it->event->reached) it->event->reached = it->generation;
                } else {
                    if (!it->kernel->started || !kernel_done(it->kernel)) break;
                    kernels_running--;
                }
                item_pop(s);
                changed = 1;
            }
        }
        if (serial_mode() && kernels_running > 0) continue;
        /* The oldest waiting launch (serial), or every stream's head. */
        unsigned long launch = 0;
        for (struct mock_stream *s = all_streams; s; s = s->next_stream)
            if (s->head && s->head->type == ITEM_KERNEL && !s->head->kernel->started &&
                (launch == 0 || s->head->kernel->launch < launch))
                launch = s->head->kernel->launch;
        for (struct mock_stream *s = all_streams; s; s = s->next_stream)
            if (s->head && s->head->type == ITEM_KERNEL && !s->head->kernel->started &&
                (!serial_mode() || s->head->kernel->launch == launch)) {
                kernel_start(s->head->kernel);
                changed = 1;
            }
    }
}

/* ---- CUDA runtime ---- */

cudaError_t cudaGetDeviceCount(int *count) {
    *count = 1;
    return cudaSuccess;
}

cudaError_t cudaSetDevice(int device) { return device == 0 ? cudaSuccess : cudaErrorInvalidValue; }

cudaError_t cudaGetDevice(int *device) {
    *device = 0;
    return cudaSuccess;
}

cudaError_t cudaGetDeviceProperties(struct cudaDeviceProp *prop, int device) {
    (void)device;
    memset(prop, 0, sizeof *prop);
    snprintf(prop->name, sizeof prop->name, "mock NCCL device");
    /* One "GPU" per rank: NCCL refuses two ranks on one. */
    const int r = world_rank();
    memcpy(prop->uuid.bytes, &r, sizeof r);
    return cudaSuccess;
}

cudaError_t cudaStreamCreateWithFlags(cudaStream_t *stream, unsigned flags) {
    (void)flags;
    struct mock_stream *s = calloc(1, sizeof *s);
    if (!s) return cudaErrorMemoryAllocation;
    s->next_stream = all_streams;
    all_streams = s;
    *stream = s;
    return cudaSuccess;
}

cudaError_t cudaStreamDestroy(cudaStream_t stream) {
    if (!stream) return cudaSuccess;
    for (struct mock_stream **p = &all_streams; *p; p = &(*p)->next_stream)
        if (*p == stream) {
            *p = stream->next_stream;
            break;
        }
    while (stream->head) {
        mock_item *it = stream->head;
        if (it->kernel && it->kernel->started) {
            kernels_running--;
            for (int i = 0; i < it->kernel->n_ops; i++)
                if (it->kernel->ops[i].req != MPI_REQUEST_NULL) {
                    MPI_Cancel(&it->kernel->ops[i].req);
                    MPI_Request_free(&it->kernel->ops[i].req);
                }
        }
        item_pop(stream);
    }
    free(stream);
    return cudaSuccess;
}

cudaError_t cudaStreamSynchronize(cudaStream_t stream) {
    while (stream && stream->head) progress();
    return cudaSuccess;
}

cudaError_t cudaMallocHost(void **p, size_t bytes) {
    return (*p = calloc(1, bytes ? bytes : 1)) ? cudaSuccess : cudaErrorMemoryAllocation;
}

cudaError_t cudaFreeHost(void *p) {
    free(p);
    return cudaSuccess;
}

cudaError_t cudaMalloc(void **p, size_t bytes) { return cudaMallocHost(p, bytes); }

cudaError_t cudaFree(void *p) { return cudaFreeHost(p); }

cudaError_t cudaMemcpyAsync(void *dst, const void *src, size_t bytes, cudaMemcpyKind kind,
                            cudaStream_t stream) {
    (void)kind;
    if (!stream) {
        memmove(dst, src, bytes);
        return cudaSuccess;
    }
    mock_item *it = calloc(1, sizeof *it);
    if (!it) return cudaErrorMemoryAllocation;
    *it = (mock_item){.type = ITEM_COPY, .dst = dst, .src = src, .bytes = bytes};
    item_push(stream, it);
    return cudaSuccess;
}

cudaError_t cudaMemset(void *p, int value, size_t bytes) {
    memset(p, value, bytes);
    return cudaSuccess;
}

cudaError_t cudaDeviceSynchronize(void) {
    for (struct mock_stream *s = all_streams; s; s = s->next_stream) cudaStreamSynchronize(s);
    return cudaSuccess;
}

cudaError_t cudaMemcpy(void *dst, const void *src, size_t bytes, cudaMemcpyKind kind) {
    return cudaMemcpyAsync(dst, src, bytes, kind, NULL);
}

cudaError_t cudaEventCreateWithFlags(cudaEvent_t *event, unsigned flags) {
    (void)flags;
    return (*event = calloc(1, sizeof **event)) ? cudaSuccess : cudaErrorMemoryAllocation;
}

cudaError_t cudaEventDestroy(cudaEvent_t event) {
    free(event);
    return cudaSuccess;
}

cudaError_t cudaEventRecord(cudaEvent_t event, cudaStream_t stream) {
    event->recorded++;
    if (!stream) {
        event->reached = event->recorded;
        return cudaSuccess;
    }
    mock_item *it = calloc(1, sizeof *it);
    if (!it) return cudaErrorMemoryAllocation;
    *it = (mock_item){.type = ITEM_EVENT, .event = event, .generation = event->recorded};
    item_push(stream, it);
    return cudaSuccess;
}

cudaError_t cudaEventQuery(cudaEvent_t event) {
    progress();
    return event->reached >= event->recorded ? cudaSuccess : cudaErrorNotReady;
}

cudaError_t cudaPeekAtLastError(void) { return cudaSuccess; }

cudaError_t cudaGetLastError(void) { return cudaSuccess; }

const char *cudaGetErrorString(cudaError_t e) {
    switch (e) {
    case cudaSuccess: return "no error (mock)";
    case cudaErrorNotReady: return "not ready (mock)";
    case cudaErrorMemoryAllocation: return "out of memory (mock)";
    default: return "error (mock)";
    }
}

/* ---- NCCL ---- */

typedef struct {
    uint32_t magic;
    int32_t creator;  /* MPI_COMM_WORLD rank of the id's maker (rank 0 of the comm) */
    uint32_t serial;
} mock_id;

#define MOCK_ID_MAGIC 0x6e63636cu

/* Operations between ncclGroupStart and ncclGroupEnd. */
typedef struct {
    mock_op op;
    struct mock_comm *comm;
    struct mock_stream *stream;
} pending_op;

static int group_depth;
static pending_op *pending;
static int n_pending, cap_pending;

ncclResult_t ncclGetUniqueId(ncclUniqueId *id) {
    static uint32_t serial;
    memset(id, 0, sizeof *id);
    mock_id m = {MOCK_ID_MAGIC, world_rank(), ++serial};
    memcpy(id->internal, &m, sizeof m);
    return ncclSuccess;
}

/* Collective over the comm's ranks: each tells rank 0 its world rank, rank 0
 * hands the table out. Data on the comm travels with its own tag. */
ncclResult_t ncclCommInitRankConfig(ncclComm_t *out, int nranks, ncclUniqueId id, int rank,
                                    ncclConfig_t *config) {
    (void)config;
    mock_id m;
    memcpy(&m, id.internal, sizeof m);
    if (m.magic != MOCK_ID_MAGIC || nranks < 1 || rank < 0 || rank >= nranks)
        return ncclInvalidArgument;
    struct mock_comm *c = calloc(1, sizeof *c);
    if (!c || !(c->world = calloc((size_t)nranks, sizeof *c->world))) {
        free(c);
        return ncclSystemError;
    }
    c->nranks = nranks;
    c->rank = rank;
    c->tag = 1000 + (int)(((uint32_t)m.creator * 4099u + m.serial * 7u) % 30000u);
    c->world[0] = m.creator;
    if (rank == 0) {
        for (int i = 1; i < nranks; i++) {
            int msg[2];
            MPI_Recv(msg, 2, MPI_INT, MPI_ANY_SOURCE, c->tag, MPI_COMM_WORLD, MPI_STATUS_IGNORE);
            if (msg[0] > 0 && msg[0] < nranks) c->world[msg[0]] = msg[1];
        }
        for (int i = 1; i < nranks; i++)
            MPI_Send(c->world, nranks, MPI_INT, c->world[i], c->tag, MPI_COMM_WORLD);
    } else {
        int msg[2] = {rank, world_rank()};
        MPI_Send(msg, 2, MPI_INT, m.creator, c->tag, MPI_COMM_WORLD);
        MPI_Recv(c->world, nranks, MPI_INT, m.creator, c->tag, MPI_COMM_WORLD,
                 MPI_STATUS_IGNORE);
    }
    *out = c;
    return ncclSuccess;
}

ncclResult_t ncclCommGetAsyncError(ncclComm_t comm, ncclResult_t *state) {
    progress();
    *state = comm ? comm->error : ncclInvalidArgument;
    return ncclSuccess;
}

ncclResult_t ncclCommFinalize(ncclComm_t comm) { return comm ? ncclSuccess : ncclInvalidArgument; }

/* Drops the comm's queued kernels (cancelling the transfers of a running
 * one), as an abort frees a GPU a kernel waits on. */
static void comm_drop_kernels(ncclComm_t comm) {
    for (struct mock_stream *s = all_streams; s; s = s->next_stream)
        for (mock_item *it = s->head; it; it = it->next)
            if (it->kernel && it->kernel->comm == comm) {
                for (int i = 0; i < it->kernel->n_ops && it->kernel->started; i++)
                    if (it->kernel->ops[i].req != MPI_REQUEST_NULL) {
                        MPI_Cancel(&it->kernel->ops[i].req);
                        MPI_Request_free(&it->kernel->ops[i].req);
                    }
                if (!it->kernel->started) {
                    it->kernel->started = 1;
                    kernels_running++;
                }
                it->kernel->n_ops = 0;  /* done at the next progress */
            }
}

ncclResult_t ncclCommDestroy(ncclComm_t comm) {
    if (!comm) return ncclInvalidArgument;
    comm_drop_kernels(comm);
    progress();
    /* RP_NCCL_MOCK_STATS=1: what ncclSend moved by type (ZeRO-1's bf16
     * all-gather shows as bf16 bytes on the data replicas' communicator). */
    const char *stats = getenv("RP_NCCL_MOCK_STATS");
    if (stats && strcmp(stats, "1") == 0)
        fprintf(stderr, "nccl mock: communicator of %d ranks, rank %d sent %llu fp32 bytes, %llu "
                "bf16 bytes, %llu other bytes\n", comm->nranks, comm->rank, comm->sent_fp32,
                comm->sent_bf16, comm->sent_other);
    free(comm->world);
    free(comm);
    return ncclSuccess;
}

ncclResult_t ncclCommAbort(ncclComm_t comm) { return ncclCommDestroy(comm); }

const char *ncclGetErrorString(ncclResult_t r) {
    static const char *const names[] = {"no error", "unhandled cuda error", "system error",
                                        "internal error", "invalid argument", "invalid usage",
                                        "remote error", "operation in progress"};
    return (unsigned)r < sizeof names / sizeof names[0] ? names[r] : "unknown NCCL result";
}

const char *ncclGetLastError(ncclComm_t comm) { return comm ? comm->last_error : ""; }

ncclResult_t ncclGroupStart(void) {
    group_depth++;
    return ncclSuccess;
}

/* One kernel per (comm, stream) among the pending operations, all with one
 * launch number. */
ncclResult_t ncclGroupEnd(void) {
    if (group_depth <= 0) return ncclInvalidUsage;
    if (--group_depth > 0) return ncclSuccess;
    const unsigned long launch = next_launch++;
    for (int i = 0; i < n_pending; i++) {
        if (!pending[i].comm) continue;
        mock_kernel *k = calloc(1, sizeof *k);
        mock_item *it = calloc(1, sizeof *it);
        if (!k || !it || !(k->ops = calloc((size_t)n_pending, sizeof *k->ops))) {
            free(k);
            free(it);
            return ncclSystemError;
        }
        k->comm = pending[i].comm;
        k->launch = launch;
        struct mock_stream *s = pending[i].stream;
        for (int j = i; j < n_pending; j++)
            if (pending[j].comm == k->comm && pending[j].stream == s) {
                k->ops[k->n_ops++] = pending[j].op;
                pending[j].comm = NULL;
            }
        it->type = ITEM_KERNEL;
        it->kernel = k;
        item_push(s, it);
    }
    n_pending = 0;
    progress();
    return ncclSuccess;
}

static ncclResult_t enqueue(int is_recv, void *buf, size_t count, ncclDataType_t type, int peer,
                            ncclComm_t comm, cudaStream_t stream) {
    const size_t size = type == ncclFloat32 ? 4 : type == ncclBfloat16 ? 2 : 1;
    if (!comm || !stream || peer < 0 || peer >= comm->nranks) return ncclInvalidArgument;
    if (count * size > (size_t)0x7fffffff) {
        snprintf(comm->last_error, sizeof comm->last_error, "mock: over 2 GiB in one transfer");
        return ncclInvalidUsage;
    }
    if (n_pending == cap_pending) {
        int cap = cap_pending ? 2 * cap_pending : 16;
        pending_op *p = realloc(pending, (size_t)cap * sizeof *p);
        if (!p) return ncclSystemError;
        pending = p;
        cap_pending = cap;
    }
    if (!is_recv) {
        unsigned long long *sent = type == ncclFloat32    ? &comm->sent_fp32
                                   : type == ncclBfloat16 ? &comm->sent_bf16
                                                          : &comm->sent_other;
        *sent += count * size;
    }
    pending[n_pending++] = (pending_op){
        .op = {.is_recv = is_recv, .buf = buf, .bytes = count * size, .peer = peer,
               .req = MPI_REQUEST_NULL},
        .comm = comm, .stream = stream};
    if (group_depth == 0) {
        group_depth = 1;
        return ncclGroupEnd();
    }
    return ncclSuccess;
}

ncclResult_t ncclSend(const void *buf, size_t count, ncclDataType_t type, int peer,
                      ncclComm_t comm, cudaStream_t stream) {
    return enqueue(0, (void *)buf, count, type, peer, comm, stream);
}

ncclResult_t ncclRecv(void *buf, size_t count, ncclDataType_t type, int peer, ncclComm_t comm,
                      cudaStream_t stream) {
    return enqueue(1, buf, count, type, peer, comm, stream);
}

/* Only on a one-rank communicator (a copy): data replicas are not mocked. */
ncclResult_t ncclAllReduce(const void *send, void *recv, size_t count, ncclDataType_t type,
                           ncclRedOp_t op, ncclComm_t comm, cudaStream_t stream) {
    (void)op;
    if (!comm) return ncclInvalidArgument;
    if (comm->nranks != 1) {
        snprintf(comm->last_error, sizeof comm->last_error,
                 "the mock NCCL reduces over one rank only");
        return ncclInvalidUsage;
    }
    const size_t bytes = count * (type == ncclFloat32 ? 4 : 1);
    return cudaMemcpyAsync(recv, send, bytes, cudaMemcpyDeviceToDevice, stream) == cudaSuccess
               ? ncclSuccess
               : ncclSystemError;
}
