// Decode steps as CUDA graphs (backend.h: step_begin / step_end / step_reset):
// per key (what the step's ops bake in: pointers, batch size) the first step
// runs eagerly (warm-up: scratch reaches its size), the second is captured,
// later ones replay it with one cudaGraphLaunch. The step's host inputs
// (tokens, batch arrays) go through one fixed pinned buffer and one fixed
// device buffer, so a replay reads the new ones and nothing allocates.
#include "cuda_internal.h"

#include <cstring>

// Sequences a step graph holds: the engine's CUDA decode group (a decode
// step's GEMMs of any row count run the GEMV kernels, cuda_decode.cu, and
// never cuBLAS, which may allocate); larger batches run op by op.
#define STEP_MAX_SEQ 64
#define STEP_GRAPHS 16    // keys kept (batch sizes x stages x buffers); oldest dropped
#define STEP_KEY_MAX 96
// Input arrays of a step, STEP_MAX_SEQ ints each, in the fixed buffers.
enum { IN_TOKENS = 0, IN_SEQ_LEN, IN_ROW_BEGIN, IN_SLOT, IN_CKPT, IN_COUNT };

enum step_mode { MODE_NONE = 0, MODE_EAGER, MODE_CAPTURE, MODE_REPLAY };

struct step_graph {
    unsigned char key[STEP_KEY_MAX];
    size_t key_bytes;
    int warm;                // the eager warm-up step ran
    cudaGraphExec_t exec;    // NULL until captured
    unsigned long long used; // last use, for dropping the oldest
};

struct rp_cuda_step {
    int32_t *pinned;      // [IN_COUNT * STEP_MAX_SEQ], refilled before each step
    int32_t *dev;         // the same on the device, copied inside the step (graph)
    cudaEvent_t consumed; // the last copy out of `pinned` is done
    int consumed_recorded;
    // the step in progress
    step_mode mode;
    int n;
    const int32_t *tokens;  // the caller's arrays the inputs came from
    const int *seq_len, *row_begin, *slot;
    step_graph *cur;
    step_graph g[STEP_GRAPHS];
    unsigned long long clock;
};

static rp_cuda_step *step_state(rp_cuda_ctx *cx) {
    if (cx->step) return cx->step;
    rp_cuda_step *st = (rp_cuda_step *)calloc(1, sizeof *st);
    if (!st) {
        rp_cuda_record(cx, cudaErrorMemoryAllocation, "step graph state", __FILE__, __LINE__);
        return NULL;
    }
    const size_t bytes = sizeof(int32_t) * IN_COUNT * STEP_MAX_SEQ;
    if (!RP_CUDA_OK(cx, cudaMallocHost(&st->pinned, bytes)) ||
        !RP_CUDA_OK(cx, cudaMalloc(&st->dev, bytes)) ||
        !RP_CUDA_OK(cx, cudaEventCreateWithFlags(&st->consumed, cudaEventDisableTiming))) {
        if (st->pinned) cudaFreeHost(st->pinned);
        if (st->dev) cudaFree(st->dev);
        free(st);
        return NULL;
    }
    cx->step = st;
    return st;
}

static void drop_graph(step_graph *g) {
    if (g->exec) cudaGraphExecDestroy(g->exec);
    memset(g, 0, sizeof *g);
}

void rp_cuda_step_drop(rp_cuda_ctx *cx) {
    if (!cx->step) return;
    for (int i = 0; i < STEP_GRAPHS; i++) drop_graph(&cx->step->g[i]);
}

void rp_cuda_step_destroy(rp_cuda_ctx *cx) {
    rp_cuda_step *st = cx->step;
    if (!st) return;
    rp_cuda_step_drop(cx);
    cudaFreeHost(st->pinned);
    cudaFree(st->dev);
    cudaEventDestroy(st->consumed);
    free(st);
    cx->step = NULL;
}

static step_graph *find_graph(rp_cuda_step *st, const void *key, size_t key_bytes) {
    step_graph *oldest = &st->g[0];
    for (int i = 0; i < STEP_GRAPHS; i++) {
        step_graph *g = &st->g[i];
        if (g->key_bytes == key_bytes && !memcmp(g->key, key, key_bytes)) return g;
        if (g->used < oldest->used) oldest = g;
    }
    drop_graph(oldest);
    memcpy(oldest->key, key, key_bytes);
    oldest->key_bytes = key_bytes;
    return oldest;
}

static int cuda_step_begin(rp_backend *be, const void *key, size_t key_bytes,
                           const int32_t *tokens, const rp_batch *batch) {
    rp_cuda_ctx *cx = rp_cuda_of(be);
    const int n = batch->n_seq;
    rp_cuda_step *st = cx->error.code == RP_OK && n >= 1 && n <= STEP_MAX_SEQ &&
                               key_bytes <= STEP_KEY_MAX ? step_state(cx) : NULL;
    if (!st) {
        if (cx->step) cx->step->mode = MODE_NONE;
        return 0;
    }
    // The last step's copy out of the pinned buffer is done before we refill
    // it: outside the step, and long done when the caller read its logits.
    if (st->consumed_recorded && !RP_CUDA_OK(cx, cudaEventSynchronize(st->consumed))) return 0;
    int32_t *in = st->pinned;
    int32_t blocks = 0;
    for (int s = 0; s < n; s++) {
        in[IN_TOKENS * STEP_MAX_SEQ + s] = tokens ? tokens[s] : 0;
        in[IN_SEQ_LEN * STEP_MAX_SEQ + s] = batch->seq_len[s];
        in[IN_ROW_BEGIN * STEP_MAX_SEQ + s] = batch->row_begin[s];
        in[IN_SLOT * STEP_MAX_SEQ + s] = batch->slot[s];
        in[IN_CKPT * STEP_MAX_SEQ + s] = blocks;
        blocks += (batch->seq_len[s] + RP_WKV_CHUNK - 1) / RP_WKV_CHUNK;
    }
    const size_t bytes = sizeof(int32_t) * IN_COUNT * STEP_MAX_SEQ;
    step_graph *g = find_graph(st, key, key_bytes);
    g->used = ++st->clock;
    st->cur = g;
    st->n = n;
    st->tokens = tokens;
    st->seq_len = batch->seq_len;
    st->row_begin = batch->row_begin;
    st->slot = batch->slot;
    if (g->exec) {
        st->mode = MODE_REPLAY;
        RP_CUDA_OK(cx, cudaGraphLaunch(g->exec, cx->stream));
        RP_CUDA_OK(cx, cudaEventRecord(st->consumed, cx->stream));
        st->consumed_recorded = 1;
        return 1;
    }
    if (!g->warm) {
        st->mode = MODE_EAGER;
    } else {
        st->mode = MODE_CAPTURE;
        // Thread-local: this thread's unsafe calls (a sync, an allocation)
        // break the capture; another thread's (a transport) do not.
        if (!RP_CUDA_OK(cx, cudaStreamBeginCapture(cx->stream,
                                                   cudaStreamCaptureModeThreadLocal))) {
            st->mode = MODE_NONE;
            return 0;
        }
    }
    RP_CUDA_OK(cx, cudaMemcpyAsync(st->dev, st->pinned, bytes, cudaMemcpyHostToDevice,
                                   cx->stream));
    return 0;
}

static void cuda_step_end(rp_backend *be) {
    rp_cuda_ctx *cx = rp_cuda_of(be);
    rp_cuda_step *st = cx->step;
    if (!st) return;
    const step_mode mode = st->mode;
    st->mode = MODE_NONE;
    if (mode == MODE_EAGER) {
        st->cur->warm = 1;
    } else if (mode == MODE_CAPTURE) {
        cudaGraph_t graph = NULL;
        cudaError_t rc = cudaStreamEndCapture(cx->stream, &graph);
        if (rc != cudaSuccess) {
            if (cx->error.code == RP_OK)
                rp_error_set(&cx->error, RP_ERR_INTERNAL,
                             "CUDA device %d: capturing the decode step of %d sequences as a "
                             "graph failed (%s): an op synchronized, allocated or copied "
                             "pageable memory inside the step (cuda/cuda_graph.cu)",
                             cx->device, st->n, cudaGetErrorString(rc));
            cudaGetLastError();
            return;
        }
        cudaGraphExec_t exec = NULL;
        if (RP_CUDA_OK(cx, cudaGraphInstantiate(&exec, graph, 0))) st->cur->exec = exec;
        cudaGraphDestroy(graph);
        if (!exec) return;
        RP_CUDA_OK(cx, cudaGraphLaunch(exec, cx->stream));
    } else {
        return;  // replayed (launched by step_begin) or not a graph step
    }
    RP_CUDA_OK(cx, cudaEventRecord(st->consumed, cx->stream));
    st->consumed_recorded = 1;
}

static void cuda_step_reset(rp_backend *be) { rp_cuda_step_drop(rp_cuda_of(be)); }

static int in_step(const rp_cuda_step *st) {
    return st && (st->mode == MODE_EAGER || st->mode == MODE_CAPTURE);
}

const int32_t *rp_cuda_step_input(rp_cuda_ctx *cx, const int32_t *host, size_t n) {
    const rp_cuda_step *st = cx->step;
    if (!in_step(st) || !host || host != st->tokens || n != (size_t)st->n) return NULL;
    return st->dev + IN_TOKENS * STEP_MAX_SEQ;
}

int rp_cuda_step_batch(rp_cuda_ctx *cx, const rp_batch *batch, rp_cuda_batch *out) {
    const rp_cuda_step *st = cx->step;
    if (!in_step(st) || batch->n_seq != st->n || batch->seq_len != st->seq_len ||
        batch->row_begin != st->row_begin || batch->slot != st->slot)
        return 0;
    memset(out, 0, sizeof *out);
    out->n_seq = batch->n_seq;
    out->n_rows = batch->n_rows;
    for (int s = 0; s < batch->n_seq; s++)
        if (batch->seq_len[s] > out->max_seq_len) out->max_seq_len = batch->seq_len[s];
    out->seq_len = st->dev + IN_SEQ_LEN * STEP_MAX_SEQ;
    out->row_begin = st->dev + IN_ROW_BEGIN * STEP_MAX_SEQ;
    out->slot = st->dev + IN_SLOT * STEP_MAX_SEQ;
    out->ckpt_block = st->dev + IN_CKPT * STEP_MAX_SEQ;
    return 1;
}

void rp_cuda_install_graph(rp_backend *be) {
    be->step_begin = cuda_step_begin;
    be->step_end = cuda_step_end;
    be->step_reset = cuda_step_reset;
}
