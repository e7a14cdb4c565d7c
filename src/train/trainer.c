/* Single-process training loop (trainer.h). */
#include "train/trainer.h"

#include <math.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "model/backward.h"
#include "model/lora.h"
#include "pipe/pipe_train.h"
#include "pipe/transport.h"
#include "train/checkpoint.h"
#include "optim/zero.h"
#include "pipe/pipe_zero.h"
#include "train/loader.h"
#include "core/clock.h"

void rp_train_options_defaults(rp_train_options *o) {
    memset(o, 0, sizeof *o);
    o->synthetic = 1;
    o->synth.task = RP_SYNTH_MQAR;
    o->ctx_len = 64;
    o->batch_size = 16;
    o->micro_batch_size = 16;
    o->loss_on_answers_only = 1;
    o->l2wrap = 1;
    rp_optim_defaults(&o->optim);
    o->steps = 200;
    o->eval_interval = 50;
    o->eval_batches = 4;
    o->log_interval = 10;
    o->seed = 1;
    o->pipe_schedule = RP_SCHEDULE_1F1B;
    o->comm_timeout = 300;
    o->halt_on_nan = 1;
}

void rp_train_options_add_data(rp_train_options *o, const char **paths, int *n_paths,
                               const char *arg) {
    int task = rp_synth_task_from_name(arg);
    if (task >= 0) {
        o->synthetic = 1;
        o->synth.task = (rp_synth_task)task;
    } else {
        o->synthetic = 0;
        paths[(*n_paths)++] = arg;
    }
}

/* ---- data ---- */

/* Tokens of one training sample: seq_len with time chunks, else ctx_len. */
static int sample_len(const rp_train_options *o) {
    return o->seq_len > 0 ? o->seq_len : o->ctx_len;
}

typedef struct {
    const rp_train_options *o;
    rp_synth_config synth;   /* resolved */
    rp_loader *loader;
    uint64_t synth_cursor;
} data_source;

static rp_status data_open(data_source *d, const rp_train_options *o, int vocab_size,
                           rp_error *err) {
    memset(d, 0, sizeof *d);
    d->o = o;
    if (o->synthetic) {
        d->synth = o->synth;
        d->synth.vocab_size = vocab_size;
        d->synth.ctx_len = sample_len(o);
        return rp_synth_resolve(&d->synth, err);
    }
    rp_status st = rp_loader_open(&d->loader, o->data_paths, (size_t)o->n_data_paths, sample_len(o),
                                  o->seed, RP_LOADER_DEFAULT_EVAL_FRACTION, err);
    if (st != RP_OK) return st;
    if ((int)rp_loader_n_ids(d->loader) > vocab_size) {
        rp_error_set(err, RP_ERR_ARG,
                     "the shards use %u token ids but the model's vocabulary has %d; create the "
                     "model with --vocab-size %u or more", rp_loader_n_ids(d->loader), vocab_size,
                     rp_loader_n_ids(d->loader));
        rp_loader_free(d->loader);
        d->loader = NULL;
        return RP_ERR_ARG;
    }
    if (rp_loader_n_train(d->loader) == 0 || rp_loader_n_eval(d->loader) == 0) {
        rp_error_set(err, RP_ERR_ARG,
                     "the shards hold %llu windows of %d tokens: too few for a train and an "
                     "eval split; use more data or a shorter --ctx-len",
                     (unsigned long long)rp_loader_n_windows(d->loader), sample_len(o));
        rp_loader_free(d->loader);
        d->loader = NULL;
        return RP_ERR_ARG;
    }
    return RP_OK;
}

static void data_get_position(const data_source *d, rp_train_progress *p) {
    if (d->loader) {
        rp_loader_position pos;
        rp_loader_get_position(d->loader, &pos);
        p->data_epoch = pos.epoch;
        p->data_index = pos.index;
        p->data_samples = pos.samples;
        p->data_n_windows = pos.n_windows;
    } else {
        p->data_epoch = 0;
        p->data_index = d->synth_cursor;
        p->data_samples = d->synth_cursor;
        p->data_n_windows = 0;
    }
}

static rp_status data_set_position(data_source *d, const rp_train_progress *p, rp_error *err) {
    if (!d->loader) {
        d->synth_cursor = p->data_samples;
        return RP_OK;
    }
    rp_loader_position pos = {.epoch = p->data_epoch, .index = p->data_index,
                              .samples = p->data_samples, .n_windows = p->data_n_windows};
    return rp_loader_set_position(d->loader, &pos, err);
}

static void data_close(data_source *d) {
    if (d->loader) rp_loader_free(d->loader);
    d->loader = NULL;
}

/* n samples: tokens [n][T+1], mask [n][T] (all 1 for text), T = sample_len. */
static rp_status data_train_batch(data_source *d, int n, int32_t *tokens, uint8_t *mask,
                                  rp_error *err) {
    const int T = sample_len(d->o);
    if (d->loader) {
        memset(mask, 1, (size_t)n * T);
        return rp_loader_next_batch(d->loader, n, tokens, NULL, 0, 1, err);
    }
    return rp_synth_next_batch(&d->synth, d->o->seed, RP_SYNTH_TRAIN, &d->synth_cursor, n, 0, 1,
                               tokens, mask, err);
}

static rp_status data_eval_batch(const data_source *d, int index, int n, int32_t *tokens,
                                 uint8_t *mask, rp_error *err) {
    const int T = sample_len(d->o);
    if (d->loader) {
        memset(mask, 1, (size_t)n * T);
        uint64_t n_eval = rp_loader_n_eval(d->loader);
        for (int i = 0; i < n; i++) {
            rp_status st = rp_loader_eval_window(d->loader, ((uint64_t)index * n + i) % n_eval,
                                                 tokens + (size_t)i * (T + 1), NULL, err);
            if (st != RP_OK) return st;
        }
        return RP_OK;
    }
    uint64_t cursor = (uint64_t)index * n;
    return rp_synth_next_batch(&d->synth, d->o->seed, RP_SYNTH_EVAL, &cursor, n, 0, 1, tokens,
                               mask, err);
}

/* inputs/targets [n*L] from n samples of L = sample_len tokens; targets -1
 * where no loss is taken. Chunk-major: time chunk c of the n sequences is
 * the rows [c*n*T, (c+1)*n*T) (T = ctx_len), sequence b's ctx_len tokens in
 * a row each, so each chunk is one micro-batch (one chunk: [n][T] as ever). */
static int split_samples(const rp_train_options *o, int n, const int32_t *tokens,
                         const uint8_t *mask, int32_t *inputs, int32_t *targets) {
    const int L = sample_len(o), T = o->ctx_len;
    int count = 0;
    for (int b = 0; b < n; b++)
        for (int p = 0; p < L; p++) {
            const int32_t *row = tokens + (size_t)b * (L + 1);
            int keep = !(o->synthetic && o->loss_on_answers_only) || mask[(size_t)b * L + p];
            const size_t at = ((size_t)(p / T) * n + b) * T + p % T;
            inputs[at] = row[p];
            targets[at] = keep ? row[p + 1] : -1;
            count += keep;
        }
    return count;
}

/* ---- the pipe: stage place and transport ---- */

static int stage_of(const rp_train_options *o) { return o->grid ? o->grid->stage : 0; }
static int stages_of(const rp_train_options *o) { return o->grid ? o->grid->pp : 1; }

/* A transport over the pipe when there is more than one stage; *tp = NULL
 * otherwise. It moves be's memory: on a GPU over NCCL where every stage has a
 * GPU of its own, else over MPI through host memory (rp_nccl_usable). */
static rp_status pipe_transport_open(const rp_train_options *o, rp_backend *be,
                                     rp_transport *storage, rp_transport **tp, rp_error *err) {
    *tp = NULL;
    if (stages_of(o) <= 1) return RP_OK;
    rp_status st = rp_transport_init(storage, o->grid->pipe_comm, o->comm_timeout, err);
    if (st != RP_OK) return st;
    rp_transport_use_backend(storage, be);
    if (!be->is_host_memory) {
        char why[160];
        const int nccl = rp_nccl_usable(o->grid->pipe_comm, be, why, sizeof why);
        if (nccl && (st = rp_transport_enable_nccl(storage, be, err)) != RP_OK) {
            rp_transport_free(storage);
            return st;
        }
        if (o->progress && o->grid->world_rank == 0)
            fprintf(o->progress, "stage transport: %s%s\n", nccl ? "NCCL" : "MPI through host "
                    "memory: ", nccl ? "" : why);
    }
    *tp = storage;
    return RP_OK;
}

/* A transport over every rank (the grid's world communicator) for the
 * stop request, when several ranks watch a stop signal; *tp = NULL
 * otherwise. Its ranks are named "rank N" in messages. */
static rp_status world_transport_open(const rp_train_options *o, rp_transport *storage,
                                      rp_transport **tp, rp_error *err) {
    *tp = NULL;
    if (!o->stop_signal || !o->grid || o->grid->world_size <= 1) return RP_OK;
    rp_status st = rp_transport_init(storage, o->grid->world_comm, o->comm_timeout, err);
    if (st != RP_OK) return st;
    snprintf(storage->what_buf, sizeof storage->what_buf, "rank %d", storage->rank);
    *tp = storage;
    return RP_OK;
}

/* ---- evaluation ---- */

/* train_data: the training run's open data (its eval windows are read, its
 * train cursor is left alone), so an evaluation neither re-reads and
 * re-validates every shard nor sees files changed since the run began; NULL
 * (rp_train_evaluate): open the data here. */
/* tuned (may be NULL): this stage's tuned initial WKV states (backend
 * memory, [layers][H][N][N]), the start of every sequence. */
static rp_status evaluate(const rp_model *model, const rp_train_options *o, rp_transport *tp,
                          const data_source *train_data, const float *tuned, int n_batches,
                          double *loss, double *accuracy, long *n_targets, rp_error *err) {
    rp_backend *be = model->be;
    /* Samples of L tokens, forwarded ctx_len (T) at a time carrying the state. */
    const int T = o->ctx_len, L = sample_len(o), n_chunks = L / T, n = o->micro_batch_size,
              V = model->cfg.vocab_size;
    const int stage = stage_of(o), n_stages = stages_of(o);
    data_source d;
    rp_status st = RP_OK;
    if (train_data) d = *train_data;
    else if ((st = data_open(&d, o, V, err)) != RP_OK) return st;
    rp_workspace ws;
    rp_state state = {0};
    /* Interleaved: a state per chunk, the head on the last stage's last chunk. */
    const int n_virtual = o->n_virtual > 1 ? o->n_virtual : 0;
    rp_state *states = n_virtual ? calloc((size_t)n_virtual, sizeof *states) : NULL;
    const int has_head = n_virtual ? o->chunks[n_virtual - 1].has_head : model->has_head;
    int32_t *tokens = malloc((size_t)n * (L + 1) * sizeof(int32_t));
    uint8_t *mask = malloc((size_t)n * L);
    int32_t *inputs = malloc((size_t)n * L * sizeof(int32_t));
    int32_t *targets = malloc((size_t)n * L * sizeof(int32_t));
    float *logits = has_head ? malloc((size_t)n * T * V * sizeof(float)) : NULL;
    float *logits_dev = has_head ? be->alloc(be, (size_t)n * T * V * sizeof(float)) : NULL;
    int *seq_len = malloc((size_t)n * sizeof(int)), *slot = malloc((size_t)n * sizeof(int));
    int *row_begin = malloc((size_t)n * sizeof(int));
    st = rp_workspace_alloc(&ws, &model->cfg, n * T, be, err);
    if (st == RP_OK) {
        rp_state_geometry(&state, &model->cfg, model->layer_begin, model->layer_end, n);
        state.data = be->alloc(be, state.floats_per_slot * (size_t)n * sizeof(float));
    }
    for (int c = 0; c < n_virtual && st == RP_OK && states; c++) {
        const rp_model *cm = &o->chunks[c];
        rp_state_geometry(&states[c], &cm->cfg, cm->layer_begin, cm->layer_end, n);
        if (!(states[c].data = be->alloc(be, states[c].floats_per_slot * (size_t)n *
                                                 sizeof(float))))
            st = rp_error_set(err, RP_ERR_NOMEM, "cannot allocate evaluation buffers");
    }
    if (st == RP_OK && n_virtual && !states)
        st = rp_error_set(err, RP_ERR_NOMEM, "cannot allocate evaluation buffers");
    if (st == RP_OK && (!state.data || (has_head && (!logits_dev || !logits))))
        st = rp_error_set(err, RP_ERR_NOMEM, "cannot allocate evaluation buffers");
    for (int i = 0; i < n; i++) {
        seq_len[i] = T;
        slot[i] = i;
    }
    rp_batch batch;
    rp_batch_init(&batch, n, seq_len, slot, row_begin);
    double loss_sum = 0;
    long correct = 0, count = 0;
    const uint64_t n_windows = d.loader ? rp_loader_n_windows(d.loader) : 0;
    const int all = o->eval_all_windows && d.loader;
    if (all) n_batches = (int)((n_windows + (uint64_t)n - 1) / (uint64_t)n);
    for (int bi = 0; bi < n_batches && st == RP_OK; bi++) {
        if (all) {
            /* Every window in order; the last batch's spare rows score nothing. */
            for (int i = 0; i < n && st == RP_OK; i++) {
                uint64_t w = (uint64_t)bi * n + i;
                st = rp_loader_window(d.loader, w < n_windows ? w : 0,
                                      tokens + (size_t)i * (L + 1), err);
            }
            memset(mask, 1, (size_t)n * L);
        } else {
            st = data_eval_batch(&d, bi, n, tokens, mask, err);
        }
        if (st != RP_OK) break;
        split_samples(o, n, tokens, mask, inputs, targets);
        for (int i = 0; all && i < n; i++)
            if ((uint64_t)bi * n + i >= n_windows)
                for (int t = 0; t < L; t++) targets[((size_t)(t / T) * n + i) * T + t % T] = -1;
        be->fill_zero(be, state.data, state.floats_per_slot * (size_t)n * sizeof(float));
        for (int c = 0; c < n_virtual; c++)
            be->fill_zero(be, states[c].data,
                          states[c].floats_per_slot * (size_t)n * sizeof(float));
        const size_t hnn = (size_t)state.n_head * state.head_size * state.head_size;
        for (int b = 0; tuned && !n_virtual && b < n; b++)
            for (int l = state.layer_begin; l < state.layer_end; l++)
                be->copy(be, rp_state_wkv(&state, b, l),
                         tuned + (size_t)(l - state.layer_begin) * hnn, hnn * sizeof(float));
        /* Interleaved: the chunks' tuned states one after the other. */
        const float *chunk_tuned = tuned;
        for (int c = 0; tuned && c < n_virtual; c++) {
            const rp_state *cs = &states[c];
            for (int b = 0; b < n; b++)
                for (int l = cs->layer_begin; l < cs->layer_end; l++)
                    be->copy(be, rp_state_wkv(cs, b, l),
                             chunk_tuned + (size_t)(l - cs->layer_begin) * hnn,
                             hnn * sizeof(float));
            chunk_tuned += (size_t)(cs->layer_end - cs->layer_begin) * hnn;
        }
        for (int c = 0; c < n_chunks && st == RP_OK; c++) {
            const int32_t *chunk_targets = targets + (size_t)c * n * T;
            st = n_virtual ? rp_pipe_forward_interleaved(o->chunks, n_virtual, tp, stage,
                                                         n_stages, &ws,
                                                         inputs + (size_t)c * n * T, &batch,
                                                         states, RP_LOGITS_ALL, logits_dev,
                                                         err)
                           : rp_pipe_forward(model, tp, stage, n_stages, &ws,
                                             inputs + (size_t)c * n * T, &batch, &state,
                                             RP_LOGITS_ALL, logits_dev, err);
            if (st != RP_OK || !has_head) continue;
            be->copy_to_host(be, logits, logits_dev, (size_t)n * T * V * sizeof(float));
            for (int r = 0; r < n * T; r++) {
                if (chunk_targets[r] < 0) continue;
                const float *z = logits + (size_t)r * V;
                int best = 0;
                for (int i = 1; i < V; i++)
                    if (z[i] > z[best]) best = i;
                double sum = 0;
                for (int i = 0; i < V; i++) sum += exp((double)z[i] - z[best]);
                loss_sum += log(sum) + z[best] - z[chunk_targets[r]];
                correct += best == chunk_targets[r];
                count++;
            }
        }
    }
    if (st == RP_OK && n_stages > 1) {
        /* The last stage scored; every stage reports the same numbers. */
        double v[3] = {loss_sum, (double)correct, (double)count};
        st = rp_transport_bcast(tp, v, sizeof v, n_stages - 1, "the evaluation result", err);
        loss_sum = v[0];
        correct = (long)v[1];
        count = (long)v[2];
    }
    if (st == RP_OK) {
        *loss = count ? loss_sum / count : 0.0;
        *accuracy = count ? (double)correct / count : 0.0;
        if (n_targets) *n_targets = count;
    }
    if (state.data) be->free(be, state.data);
    for (int c = 0; states && c < n_virtual; c++)
        if (states[c].data) be->free(be, states[c].data);
    free(states);
    if (logits_dev) be->free(be, logits_dev);
    rp_workspace_free(&ws, be);
    free(tokens);
    free(mask);
    free(inputs);
    free(targets);
    free(logits);
    free(seq_len);
    free(slot);
    free(row_begin);
    if (!train_data) data_close(&d);
    return st;
}

rp_status rp_train_evaluate(const rp_model *model, const rp_train_options *o, int n_batches,
                            double *loss, double *accuracy, long *n_targets, rp_error *err) {
    rp_transport storage, *tp;
    rp_status st = pipe_transport_open(o, model->be, &storage, &tp, err);
    if (st != RP_OK) return st;
    st = evaluate(model, o, tp, NULL, NULL, n_batches, loss, accuracy, n_targets, err);
    if (tp) rp_transport_free(tp);
    return st;
}

/* ---- checkpoints and weights across stages ---- */

/* Fault injection for the crash tests (tests/test_pipeline_faults.sh):
 * RWKVPIPE_TEST_CRASH=POINT:STAGE:STEP kills this process with SIGKILL when
 * stage STAGE reaches POINT while saving step STEP, as a power cut would. */
static void crash_point_for_tests(const char *point, int stage, uint64_t step) {
    const char *spec = getenv("RWKVPIPE_TEST_CRASH");
    if (!spec) return;
    char want[32];
    int want_stage;
    unsigned long long want_step;
    if (sscanf(spec, "%31[^:]:%d:%llu", want, &want_stage, &want_step) == 3 &&
        strcmp(want, point) == 0 && want_stage == stage && want_step == step)
        raise(SIGKILL);
}

/* RWKVPIPE_TEST_STOP=POINT:STAGE stops (SIGSTOP) stage STAGE when it reaches
 * POINT, as a hung rank would: the others must give up after --comm-timeout
 * (tests/test_pipeline_faults.sh). */
static void stop_point_for_tests(const char *point, int stage) {
    const char *spec = getenv("RWKVPIPE_TEST_STOP");
    char want[32];
    int want_stage;
    if (spec && sscanf(spec, "%31[^:]:%d", want, &want_stage) == 2 && strcmp(want, point) == 0 &&
        want_stage == stage)
        raise(SIGSTOP);
}

/* Every stage of replica 0 writes its layers' shard; the manifest goes last,
 * from rank 0, once every stage has reported its files. Other replicas hold
 * the same numbers and write nothing. */
static rp_status save_checkpoint(const rp_train_options *o, rp_transport *tp,
                                 const rp_ckpt_contents *c, rp_error *err) {
    const rp_grid *g = o->grid;
    if (g && g->replica != 0) return RP_OK;
    if (!g || g->pp == 1) return rp_ckpt_save(o->ckpt_dir, c, err);
    stop_point_for_tests("ckpt-start", g->stage);
    char step_dir[RP_CKPT_PATH_MAX] = "";
    int ok = 1;
    rp_status st = RP_OK;
    if (g->stage == 0) {
        st = rp_ckpt_begin(o->ckpt_dir, c->progress.step, step_dir, sizeof step_dir, err);
        ok = st == RP_OK;
    }
    /* Everyone learns whether the directory exists before writing into it. */
    rp_error comm_err;
    rp_status comm = rp_transport_bcast(tp, &ok, sizeof ok, 0, "the checkpoint start", &comm_err);
    if (comm == RP_OK)
        comm = rp_transport_bcast(tp, step_dir, sizeof step_dir, 0, "the checkpoint start",
                                  &comm_err);
    if (comm != RP_OK) {
        *err = comm_err;
        return comm;
    }
    if (!ok)
        return g->stage == 0 ? st
                             : rp_error_set(err, RP_ERR_IO, "stage 0 could not create the "
                                            "checkpoint directory under %s", o->ckpt_dir);
    /* Interleaved: a shard per chunk (model chunk c*P + stage of v*P), the
     * same per-layer files a plain run writes, so either resumes the other. */
    const int V = o->n_virtual > 1 ? o->n_virtual : 1;
    rp_ckpt_file *mine = calloc((size_t)V * RP_CKPT_ROLES, sizeof *mine);
    if (!mine) return rp_error_set(err, RP_ERR_NOMEM, "checkpoint file list");
    int n_mine = 0;
    /* State tuning, LoRA: the chunks' tuned states, adapters one after the other. */
    size_t tuned_at = 0, lora_at = 0;
    for (int ch = 0; ch < V && st == RP_OK; ch++) {
        rp_ckpt_contents cc = *c;
        if (V > 1) {
            const rp_model *w = &o->chunks[ch];
            cc.weights = w;
            cc.adam_m = &c->adam_m[ch];
            cc.adam_v = &c->adam_v[ch];
            for (int k = 0; k < 3; k++) {
                if (c->tuned[k]) cc.tuned[k] = c->tuned[k] + tuned_at;
                if (c->lora[k]) cc.lora[k] = c->lora[k] + lora_at;
            }
            const size_t layers = (size_t)(w->layer_end - w->layer_begin);
            tuned_at += layers * w->cfg.n_head * w->cfg.head_size * w->cfg.head_size;
            lora_at += layers * c->lora_floats_per_layer;
        }
        int n_one = 0;
        st = rp_ckpt_write_shard(step_dir, &cc, ch * g->pp + g->stage, V * g->pp,
                                 mine + (size_t)ch * RP_CKPT_ROLES, &n_one, err);
        if (n_one != n_mine && ch > 0 && st == RP_OK)
            st = rp_error_set(err, RP_ERR_INTERNAL, "chunk %d wrote %d files", ch, n_one);
        n_mine = n_one;
    }
    crash_point_for_tests("ckpt-shard", g->stage, c->progress.step);
    /* A stage that failed reports zero files; stage 0 then refuses to commit,
     * so the previous checkpoint stays the latest. n_mine: files per chunk. */
    if (st != RP_OK) n_mine = -1;
    const size_t per_rank = (size_t)V * RP_CKPT_ROLES;
    rp_ckpt_file *all = g->stage == 0 ? calloc((size_t)g->pp * per_rank, sizeof *all) : NULL;
    int *counts = g->stage == 0 ? calloc((size_t)g->pp, sizeof(int)) : NULL;
    comm = rp_transport_gather(tp, &n_mine, counts, sizeof n_mine, 0,
                               "the checkpoint shard reports", &comm_err);
    if (comm == RP_OK)
        comm = rp_transport_gather(tp, mine, all, per_rank * sizeof *mine, 0,
                                   "the checkpoint shard reports", &comm_err);
    if (comm != RP_OK && st == RP_OK) {
        st = comm;
        *err = comm_err;
    }
    if (g->stage == 0 && st == RP_OK) {
        int n_files = 0;
        for (int s = 0; s < g->pp && st == RP_OK; s++) {
            if (counts[s] < 0) {
                st = rp_error_set(err, RP_ERR_IO, "stage %d failed to write its checkpoint "
                                  "shard in %s; the checkpoint was not committed", s, step_dir);
                break;
            }
        }
        /* In shard order (model chunk order when interleaved). */
        rp_ckpt_file *ordered = st == RP_OK ? calloc((size_t)g->pp * per_rank, sizeof *ordered)
                                            : NULL;
        if (st == RP_OK && !ordered) st = rp_error_set(err, RP_ERR_NOMEM, "checkpoint files");
        for (int k = 0; k < V * g->pp && st == RP_OK; k++)
            for (int f = 0; f < counts[k % g->pp]; f++)
                ordered[n_files++] = all[(size_t)(k % g->pp) * per_rank +
                                         (size_t)(k / g->pp) * RP_CKPT_ROLES + f];
        free(all);
        all = ordered;
        if (st == RP_OK) st = rp_ckpt_commit(o->ckpt_dir, c, all, n_files, err);
    }
    free(all);
    free(counts);
    free(mine);
    return st;
}

/* save_checkpoint with --zero 1: replica 0 of each stage gathers the whole
 * moments into buffers that live only while it writes them, so the file
 * has the layout of an unsharded run (any DP, PP or --zero resumes it). */
static rp_status save_checkpoint_zero(const rp_train_options *o, rp_transport *tp,
                                      rp_ckpt_contents *c, const rp_zero_shard *z,
                                      rp_error *err) {
    if (!o->zero) return save_checkpoint(o, tp, c, err);
    const rp_model *w = c->weights;
    rp_model m, v;
    memset(&m, 0, sizeof m);
    memset(&v, 0, sizeof v);
    rp_status st = RP_OK;
    /* The moments' backend (w may be a host copy of the weights). */
    if (z->rank == 0 &&
        ((st = rp_model_alloc(&m, &w->cfg, w->layer_begin, w->layer_end, w->has_embed,
                              w->has_head, z->be, err)) != RP_OK ||
         (st = rp_model_alloc(&v, &w->cfg, w->layer_begin, w->layer_end, w->has_embed,
                              w->has_head, z->be, err)) != RP_OK)) {
        /* The other replicas wait in the gather: end the job from here. */
        rp_model_free(&m);
        rp_model_free(&v);
        return rp_error_prefix(err, "the checkpoint's Adam moments (--zero 1)");
    }
    if (z->dp > 1)
        st = rp_zero_gather_moments(o->grid->data_comm, z, z->rank == 0 ? &m : NULL,
                                    z->rank == 0 ? &v : NULL, o->comm_timeout, err);
    else
        rp_zero_put(z, &m, &v);
    if (st == RP_OK) {
        c->adam_m = &m;
        c->adam_v = &v;
        st = save_checkpoint(o, tp, c, err);
    }
    rp_model_free(&m);
    rp_model_free(&v);
    return st;
}

/* save_checkpoint_zero for interleaved stages: each chunk's moments
 * gathered from its shards (z [v]) to replica 0, then written as the
 * unsharded interleaved run writes them (one shard per model chunk). */
static rp_status save_checkpoint_zero_chunks(const rp_train_options *o, rp_transport *tp,
                                             rp_ckpt_contents *c, const rp_zero_shard *z,
                                             rp_error *err) {
    const int V = o->n_virtual, root = z[0].rank == 0;
    rp_model *m = calloc((size_t)V, sizeof *m), *v = calloc((size_t)V, sizeof *v);
    rp_status st = m && v ? RP_OK : rp_error_set(err, RP_ERR_NOMEM, "the chunks' moments");
    for (int ch = 0; ch < V && st == RP_OK && root; ch++) {
        const rp_model *w = &o->chunks[ch];
        if ((st = rp_model_alloc(&m[ch], &w->cfg, w->layer_begin, w->layer_end, w->has_embed,
                                 w->has_head, w->be, err)) == RP_OK)
            st = rp_model_alloc(&v[ch], &w->cfg, w->layer_begin, w->layer_end, w->has_embed,
                                w->has_head, w->be, err);
    }
    /* The other replicas wait in the gather: a failure ends the job from here. */
    if (st != RP_OK) rp_error_prefix(err, "the checkpoint's Adam moments (--zero 1)");
    for (int ch = 0; ch < V && st == RP_OK; ch++) {
        if (z[ch].dp > 1)
            st = rp_zero_gather_moments(o->grid->data_comm, &z[ch], root ? &m[ch] : NULL,
                                        root ? &v[ch] : NULL, o->comm_timeout, err);
        else
            rp_zero_put(&z[ch], &m[ch], &v[ch]);
    }
    if (st == RP_OK) {
        c->adam_m = m;
        c->adam_v = v;
        st = save_checkpoint(o, tp, c, err);
    }
    for (int ch = 0; ch < V; ch++) {
        if (m) rp_model_free(&m[ch]);
        if (v) rp_model_free(&v[ch]);
    }
    free(m);
    free(v);
    return st;
}

/* The start-up line of the fp32 weights backed by memory on this rank. */
static void print_fp32_memory(const rp_train_options *o, const rp_zero_memory *mem) {
    fprintf(o->progress, "fp32 weights per rank (rank 0, stage 0): %zu of %zu bytes backed, "
            "GEMM matrices %zu of %zu bytes", mem->fp32_backed, mem->fp32_bytes,
            mem->matrix_backed, mem->matrix_bytes);
    if (mem->page)
        fprintf(o->progress, " (own 1/DP range, %zu-byte pages)", mem->page);
    if (mem->bf16_bytes)
        fprintf(o->progress, "; bf16 copies %zu bytes\n", mem->bf16_bytes);
    else
        fprintf(o->progress, "; whole (fp32 GEMM math reads them, no bf16 copies)\n");
}

/* The start-up line of memory per rank (this rank: rank 0's, which is
 * printed). Optimizer: the two Adam moments, or their shard. */
static void print_memory(const rp_train_options *o, const rp_model *model, const rp_model *grads,
                         const rp_zero_shard *z, const struct rp_zero_links *links) {
    if (!o->progress) return;
    size_t n, weights = 0, grad_floats = 0;
    for (int i = 0; rp_zero_buffer(model, i, &n); i++) weights += n;
    for (int i = 0; rp_zero_buffer(grads, i, &n); i++) grad_floats += n;
    const size_t optim = 2 * (z ? z->shard_floats : grad_floats);
    const double mib = 1024.0 * 1024.0;
    fprintf(o->progress, "memory per rank (rank 0, stage 0): weights %.2f MiB, gradients %.2f "
            "MiB, optimizer %.2f MiB (%zu bytes: Adam moments%s)\n", weights * 4 / mib,
            grad_floats * 4 / mib, optim * 4 / mib, optim * 4,
            z && z->dp > 1 ? ", 1/DP shard (--zero 1)" : "");
    if (z && z->dp > 1)
        fprintf(o->progress, "zero: optimizer state sharded over %d data replicas (%s)\n",
                z->dp, rp_zero_links_describe(links));
    /* The fp32 master weights actually backed by memory (--zero 1 with the
     * bf16 all-gather gives back the other replicas' matrix pages). */
    rp_zero_memory mem;
    rp_zero_links_memory(z && z->dp > 1 ? links : NULL, model, &mem);
    print_fp32_memory(o, &mem);
}

/* print_memory for interleaved stages: the sums over the v chunks (z:
 * their shards, NULL without --zero). */
static void print_memory_chunks(const rp_train_options *o, const rp_model *grads,
                                const rp_zero_shard *z, const struct rp_zero_links *links) {
    if (!o->progress) return;
    size_t n, weights = 0, grad_floats = 0, shard = 0;
    for (int c = 0; c < o->n_virtual; c++) {
        for (int i = 0; rp_zero_buffer(&o->chunks[c], i, &n); i++) weights += n;
        for (int i = 0; rp_zero_buffer(&grads[c], i, &n); i++) grad_floats += n;
        if (z) shard += z[c].shard_floats;
    }
    const size_t optim = 2 * (z ? shard : grad_floats);
    const double mib = 1024.0 * 1024.0;
    fprintf(o->progress, "memory per rank (rank 0, stage 0, %d chunks): weights %.2f MiB, "
            "gradients %.2f MiB, optimizer %.2f MiB (%zu bytes: Adam moments%s)\n",
            o->n_virtual, weights * 4 / mib, grad_floats * 4 / mib, optim * 4 / mib, optim * 4,
            z && z->dp > 1 ? ", 1/DP shard (--zero 1)" : "");
    if (z && z->dp > 1)
        fprintf(o->progress, "zero: optimizer state sharded over %d data replicas (%s)\n",
                z->dp, rp_zero_links_describe(links));
    /* Interleaved chunks keep their fp32 whole (their all-gather is fp32). */
    rp_zero_memory sum = {0}, mem;
    for (int c = 0; c < o->n_virtual; c++) {
        rp_zero_links_memory(NULL, &o->chunks[c], &mem);
        sum.fp32_bytes += mem.fp32_bytes;
        sum.fp32_backed += mem.fp32_backed;
        sum.matrix_bytes += mem.matrix_bytes;
        sum.matrix_backed += mem.matrix_backed;
        sum.bf16_bytes += mem.bf16_bytes;
    }
    print_fp32_memory(o, &sum);
}

/* -o with several stages: replica 0's stages send their layers to rank 0
 * (the transport's slice gather), which writes one file with every tensor
 * under its official name. The layers travel through host buffers (backend
 * memory may be a GPU's). Each stage holds v chunks (1 but for interleaved
 * 1F1B): rank 0 takes the model chunks in model order (chunk k on stage
 * k % P, chunk_layers[k] layers), every other stage sends its chunks'
 * layers in chunk order, then the last stage the head. */
static rp_status gather_and_save(const rp_model *chunks, int v, const int *chunk_layers,
                                 const rp_train_options *o, rp_transport *tp, rp_error *err) {
    const rp_grid *g = o->grid;
    const int P = g->pp;
    const rp_model *m0 = &chunks[0];
    rp_backend *be = m0->be;
    const size_t layer_bytes = m0->layer_floats * sizeof(float);
    const size_t head_bytes = m0->head_floats * sizeof(float);
    const size_t host_bytes = layer_bytes > head_bytes ? layer_bytes : head_bytes;
    float *host = malloc(host_bytes);
    rp_status st = RP_OK;
    if (g->stage != 0) {
        /* Send even after a failed allocation (zeros), so rank 0 does not
         * wait for the timeout; the error still ends this rank's run. */
        float *zeros = host ? NULL : calloc(1, host_bytes);
        for (int c = 0; c < v && st == RP_OK; c++) {
            const rp_model *m = &chunks[c];
            for (int i = 0; i < m->layer_end - m->layer_begin && st == RP_OK; i++) {
                if (host) be->copy_to_host(be, host, m->layer_flat[i], layer_bytes);
                st = rp_transport_gather_slice(tp, g->stage, NULL, host ? host : zeros,
                                               layer_bytes, "layer weights", err);
            }
            if (m->has_head && st == RP_OK) {
                if (host) be->copy_to_host(be, host, m->head_flat, head_bytes);
                st = rp_transport_gather_slice(tp, g->stage, NULL, host ? host : zeros,
                                               head_bytes, "head weights", err);
            }
        }
        free(zeros);
        if (st == RP_OK && !host)
            st = rp_error_set(err, RP_ERR_NOMEM, "host buffer for the weights' gather");
        free(host);
        return st;
    }
    rp_model whole;
    memset(&whole, 0, sizeof whole);
    st = rp_model_alloc(&whole, &m0->cfg, 0, m0->cfg.n_layer, 1, 1, be, err);
    if (st == RP_OK && !host)
        st = rp_error_set(err, RP_ERR_NOMEM, "host buffer for the weights' gather");
    int l = 0;
    for (int k = 0; k < v * P && st == RP_OK; k++) {
        const int s = k % P, c = k / P;
        for (int i = 0; i < chunk_layers[k] && st == RP_OK; i++, l++) {
            if (s == 0) {
                be->copy(be, whole.layer_flat[l], chunks[c].layer_flat[i], layer_bytes);
                continue;
            }
            if ((st = rp_transport_gather_slice(tp, s, host, NULL, layer_bytes, "layer weights",
                                                err)) == RP_OK)
                be->copy_to_device(be, whole.layer_flat[l], host, layer_bytes);
        }
    }
    if (st == RP_OK)
        st = rp_transport_gather_slice(tp, P - 1, host, NULL, head_bytes, "head weights", err);
    if (st == RP_OK) {
        be->copy_to_device(be, whole.head_flat, host, head_bytes);
        be->copy(be, whole.embed_flat, m0->embed_flat, m0->embed_floats * sizeof(float));
        st = rp_model_save(&whole, o->save_path, RP_DTYPE_F32, err);
    }
    if (whole.be) rp_model_free(&whole);
    free(host);
    return st;
}

static rp_status save_weights(const rp_model *model, const rp_train_options *o,
                              rp_transport *tp, rp_error *err) {
    if (!o->grid || o->grid->pp == 1) {
        if (o->grid && o->grid->replica != 0) return RP_OK;
        return rp_model_save(model, o->save_path, RP_DTYPE_F32, err);
    }
    const rp_grid *g = o->grid;
    if (g->replica != 0) return RP_OK;
    stop_point_for_tests("save-weights", g->stage);
    int *stage_layers = malloc(sizeof(int) * (size_t)g->pp);
    if (!stage_layers) return rp_error_set(err, RP_ERR_NOMEM, "the weights' gather plan");
    for (int s = 0; s < g->pp; s++) stage_layers[s] = g->layer_end[s] - g->layer_begin[s];
    rp_status st = gather_and_save(model, 1, stage_layers, o, tp, err);
    free(stage_layers);
    return st;
}

static rp_status save_weights_interleaved(const rp_train_options *o, rp_transport *tp,
                                          rp_error *err) {
    if (o->grid->replica != 0) return RP_OK;
    return gather_and_save(o->chunks, o->n_virtual, o->chunk_layers, o, tp, err);
}

/* ---- state tuning ---- */

/* Gathers every stage's per-layer pieces (per_layer floats a layer; this
 * stage's in `mine`) into `all` [n_layer * per_layer] on stage 0, in model
 * order: piece k is stage k % P's (interleaved: its chunk k / P, the
 * chunks' pieces one after the other in its buffer). Collective over the
 * stages of one replica. */
static rp_status gather_layer_pieces(const rp_train_options *o, const rp_config *c,
                                     size_t per_layer, float *all, const float *mine,
                                     rp_transport *tp, const char *what, rp_error *err) {
    const rp_grid *g = o->grid;
    const int stage = g ? g->stage : 0, n_stages = g ? g->pp : 1;
    const int V = o->n_virtual > 1 ? o->n_virtual : 1;
    size_t at[RP_GRID_MAX_STAGES] = {0};  /* each stage's next piece in its buffer */
    int begin = 0;
    rp_status st = RP_OK;
    for (int k = 0; k < V * n_stages && st == RP_OK; k++) {
        const int s = k % n_stages;
        const int layers = V > 1 ? o->chunk_layers[k]
                           : g ? g->layer_end[s] - g->layer_begin[s] : c->n_layer;
        const size_t n = per_layer * (size_t)layers;
        if (s == 0 && stage == 0)
            memcpy(all + per_layer * (size_t)begin, mine + at[0], n * sizeof(float));
        else if (stage == 0 || stage == s)
            st = rp_transport_gather_slice(tp, s,
                                           stage == 0 ? all + per_layer * (size_t)begin : NULL,
                                           mine + at[s], n * sizeof(float), what, err);
        at[s] += n;
        begin += layers;
    }
    return st;
}

/* Writes the tuned states of every stage (pt->tuned, this stage's layers)
 * as a state-tuning file, blocks.L.att.time_state [H,N,N] F32, from rank 0;
 * the other stages send theirs there. Replica 0 only (the replicas agree). */
static rp_status save_tuned_states(const rp_model *model, const rp_pipe_trainer *pt,
                                   const rp_train_options *o, rp_transport *tp, rp_error *err) {
    const rp_grid *g = o->grid;
    if (g && g->replica != 0) return RP_OK;
    rp_backend *be = model->be;
    const rp_config *c = &model->cfg;
    const size_t hnn = (size_t)c->n_head * c->head_size * c->head_size;
    const int stage = g ? g->stage : 0;
    float *all = malloc(hnn * (size_t)c->n_layer * sizeof(float));
    float *mine = malloc((pt->tuned_floats ? pt->tuned_floats : 1) * sizeof(float));
    rp_status st = RP_OK;
    if (!all || !mine) st = rp_error_set(err, RP_ERR_NOMEM, "host buffer for the tuned states");
    else be->copy_to_host(be, mine, pt->tuned, pt->tuned_floats * sizeof(float));
    if (st == RP_OK) st = gather_layer_pieces(o, c, hnn, all, mine, tp, "tuned states", err);
    if (st == RP_OK && stage == 0) {
        rp_st_writer w;
        rp_st_writer_init(&w);
        const int64_t shape[3] = {c->n_head, c->head_size, c->head_size};
        for (int l = 0; l < c->n_layer && st == RP_OK; l++) {
            char name[48];
            snprintf(name, sizeof name, "blocks.%d.att.time_state", l);
            st = rp_st_writer_add(&w, name, RP_DTYPE_F32, RP_DTYPE_F32, 3, shape, all + hnn * l,
                                  err);
        }
        if (st == RP_OK) st = rp_st_writer_write(&w, o->state_out, err);
        rp_st_writer_free(&w);
    }
    free(all);
    free(mine);
    return st;
}

/* Writes every stage's adapters (replica 0's) as one adapter file from
 * rank 0, as save_tuned_states does with the states. */
static rp_status save_lora(const rp_model *model, const rp_lora *lo, const rp_train_options *o,
                           rp_transport *tp, rp_error *err) {
    const rp_grid *g = o->grid;
    if (g && g->replica != 0) return RP_OK;
    const rp_config *c = &model->cfg;
    const size_t per = lo->floats_per_layer;
    const int stage = g ? g->stage : 0;
    /* lo [V]: interleaved, one per chunk, their adapters one after the other. */
    const int V = o->n_virtual > 1 ? o->n_virtual : 1;
    size_t floats = 0;
    for (int ch = 0; ch < V; ch++) floats += lo[ch].floats;
    float *all = malloc((per * (size_t)c->n_layer + 1) * sizeof(float));
    float *mine = malloc((floats + 1) * sizeof(float));
    rp_status st = RP_OK;
    if (!all || !mine) st = rp_error_set(err, RP_ERR_NOMEM, "host buffer for the LoRA adapters");
    for (size_t ch = 0, at = 0; st == RP_OK && ch < (size_t)V; at += lo[ch].floats, ch++)
        rp_lora_to_host(&lo[ch], mine + at);
    if (st == RP_OK) st = gather_layer_pieces(o, c, per, all, mine, tp, "LoRA adapters", err);
    if (st == RP_OK && stage == 0)
        st = rp_lora_save(c, lo->rank, lo->alpha, lo->targets, all, o->lora_out, err);
    free(all);
    free(mine);
    return st;
}

/* ---- training ---- */

static void format_duration(char *out, size_t size, double seconds) {
    long s = (long)(seconds + 0.5);
    if (s >= 3600) snprintf(out, size, "%ldh%02ldm", s / 3600, (s / 60) % 60);
    else if (s >= 60) snprintf(out, size, "%ldm%02lds", s / 60, s % 60);
    else snprintf(out, size, "%lds", s);
}

rp_status rp_train_run(rp_model *model, const rp_train_options *o, rp_train_result *result,
                       rp_error *err) {
    rp_backend *be = model->be;
    const rp_config *cfg = &model->cfg;
    const int T = o->ctx_len, L = sample_len(o), B = o->batch_size, MB = o->micro_batch_size;
    const int DP = o->grid ? o->grid->dp : 1, replica = o->grid ? o->grid->replica : 0;
    const int K = T > 0 ? L / T : 1;  /* time chunks per sequence */
    const int is_rank0 = !o->grid || o->grid->world_rank == 0;
    rp_train_result local = {0};
    if (!result) result = &local;
    memset(result, 0, sizeof *result);
    if (T < 1 || B < 1 || MB < 1 || B % (MB * DP) != 0)
        return rp_error_set(err, RP_ERR_ARG,
                            "batch %d must be a positive multiple of micro-batch %d x %d data "
                            "replica%s (ctx %d)", B, MB, DP, DP == 1 ? "" : "s", T);
    if (L % T != 0)
        return rp_error_set(err, RP_ERR_ARG, "--seq-len %d is not a multiple of --ctx-len %d",
                            L, T);
    /* Checked here, not at the first save after hours of training. */
    if (o->zero && (!o->host_backend || !o->host_backend->is_host_memory))
        return rp_error_set(err, RP_ERR_ARG, "--zero 1 needs a backend of host memory for the "
                            "save's gathered weights, and rp_train_options.host_backend is %s: "
                            "the caller sets it (the model's backend when that is host memory, "
                            "else a CPU backend)", o->host_backend ? o->host_backend->name
                                                                   : "NULL");
    /* Micro-batches per step on each replica: sequence groups x time chunks. */
    const int M = B / (MB * DP) * K;
    if (o->steps < 1) return rp_error_set(err, RP_ERR_ARG, "steps %ld must be >= 1", o->steps);
    rp_optim_config optim = o->optim;
    optim.total_steps = o->steps;
    rp_status st = rp_optim_validate(&optim, err);
    if (st != RP_OK) return st;

    data_source d;
    if ((st = data_open(&d, o, cfg->vocab_size, err)) != RP_OK) return st;
    rp_model grads, adam_m, adam_v;
    rp_zero_shard zero;
    memset(&zero, 0, sizeof zero);
    memset(&grads, 0, sizeof grads);
    memset(&adam_m, 0, sizeof adam_m);
    memset(&adam_v, 0, sizeof adam_v);
    rp_pipe_trainer pt;
    memset(&pt, 0, sizeof pt);
    /* Interleaved 1F1B: gradients and moments per chunk, the same executor. */
    const int V = o->n_virtual > 1 ? o->n_virtual : 0;
    rp_model *igrads = NULL, *iadam_m = NULL, *iadam_v = NULL;
    rp_zero_shard *izero = NULL;  /* --zero 1: one shard per chunk */
    /* LoRA: one per chunk (interleaved) or one; lora_floats: theirs summed. */
    const int n_lora = V ? V : 1;
    rp_lora *lora = calloc((size_t)n_lora, sizeof *lora);
    size_t lora_floats = 0;
    float *tuned_host[3] = {NULL, NULL, NULL};  /* state tuning: checkpoint staging */
    float *lora_host[3] = {NULL, NULL, NULL};   /* LoRA: checkpoint staging */
    rp_transport tp_storage, *tp = NULL;
    rp_transport world_storage, *world = NULL;  /* over every rank: the stop request */
    FILE *metrics = NULL;
    int32_t *tokens = malloc((size_t)B * (L + 1) * sizeof(int32_t));
    uint8_t *mask = malloc((size_t)B * L);
    int32_t *inputs = malloc((size_t)M * MB * T * sizeof(int32_t));
    int32_t *targets = malloc((size_t)M * MB * T * sizeof(int32_t));
    if (!tokens || !mask || !inputs || !targets || !lora) {
        st = rp_error_set(err, RP_ERR_NOMEM, "cannot allocate the batch buffers");
        goto done;
    }
    if (V) {
        /* What interleaving does not run yet is refused before any work. */
        const char *no = K > 1 ? "--seq-len longer than --ctx-len (time chunks)" : NULL;
        if (no) {
            st = rp_error_set(err, RP_ERR_ARG, "--pp-schedule interleaved does not run with %s "
                              "yet: use --pp-schedule 1f1b (or zb-h1) for it", no);
            goto done;
        }
        igrads = calloc((size_t)V, sizeof *igrads);
        iadam_m = calloc((size_t)V, sizeof *iadam_m);
        iadam_v = calloc((size_t)V, sizeof *iadam_v);
        izero = o->zero ? calloc((size_t)V, sizeof *izero) : NULL;
        if (!igrads || !iadam_m || !iadam_v || (o->zero && !izero)) {
            st = rp_error_set(err, RP_ERR_NOMEM, "the chunks' gradients");
            goto done;
        }
        /* --zero 1: each chunk's moments sharded as a stage's are; whole
         * ones only to read a checkpoint into (then freed). */
        for (int c = 0; c < V; c++) {
            const rp_model *cm = &o->chunks[c];
            rp_model *dst[3] = {&igrads[c], &iadam_m[c], &iadam_v[c]};
            const int n_alloc = o->zero && !o->resume_path ? 1 : 3;
            for (int k = 0; k < n_alloc; k++)
                if ((st = rp_model_alloc(dst[k], cfg, cm->layer_begin, cm->layer_end,
                                         cm->has_embed, cm->has_head, be, err)) != RP_OK)
                    goto done;
            if (o->zero && (st = rp_zero_shard_init(&izero[c], &igrads[c], DP, replica, err)) !=
                               RP_OK)
                goto done;
        }
        if ((st = pipe_transport_open(o, be, &tp_storage, &tp, err)) != RP_OK ||
            (st = world_transport_open(o, &world_storage, &world, err)) != RP_OK ||
            (st = rp_pipe_trainer_init_interleaved(&pt, o->chunks, igrads, iadam_m, iadam_v, V,
                                                   o->grid, tp, M, MB, T, err)) != RP_OK)
            goto done;
        /* Each stage's stash pool, printed by the first stage (ranked by
         * stage in pipe_comm): the schedule's peak of (micro-batch, chunk)
         * pairs in flight (tests/test_interleaved.sh compares it). */
        int slots[RP_GRID_MAX_STAGES] = {pt.n_stash};
        if (tp && (st = rp_transport_gather(tp, &pt.n_stash, slots, sizeof pt.n_stash, 0,
                                            "the stages' stash slot counts", err)) != RP_OK)
            goto done;
        for (int s = 0; o->grid->stage == 0 && o->progress && o->grid->replica == 0 &&
                        s < o->grid->pp; s++)
            fprintf(o->progress, "stage %d: %d activation stash slots shared by %d chunks\n", s,
                    slots[s], V);
    } else if ((st = rp_model_alloc(&grads, cfg, model->layer_begin, model->layer_end,
                                    model->has_embed, model->has_head, be, err)) != RP_OK ||
        /* --zero 1 keeps only this replica's shard of the moments; whole
         * ones exist only to read a checkpoint into (then freed). */
        (o->zero && (st = rp_zero_shard_init(&zero, &grads, DP, replica, err)) != RP_OK) ||
        ((!o->zero || o->resume_path) &&
         ((st = rp_model_alloc(&adam_m, cfg, model->layer_begin, model->layer_end,
                               model->has_embed, model->has_head, be, err)) != RP_OK ||
          (st = rp_model_alloc(&adam_v, cfg, model->layer_begin, model->layer_end,
                               model->has_embed, model->has_head, be, err)) != RP_OK)) ||
        (st = pipe_transport_open(o, be, &tp_storage, &tp, err)) != RP_OK ||
        (st = world_transport_open(o, &world_storage, &world, err)) != RP_OK ||
        (st = rp_pipe_trainer_init_time_chunks(&pt, model, &grads, &adam_m, &adam_v, o->grid,
                                               tp, o->pipe_schedule, M, MB, T, K, o->tbptt,
                                               err)) != RP_OK)
        goto done;
    pt.halt_on_nan = o->halt_on_nan;
    if (o->tune_state && (st = rp_pipe_trainer_tune_state(&pt, err)) != RP_OK) goto done;
    /* (Interleaved: every chunk's weights all-gathered as fp32; the bf16
     * all-gather follows one model's buffers.) */
    if (o->zero && ((st = rp_pipe_trainer_use_zero(&pt, V ? izero : &zero, err)) != RP_OK ||
                    (!V && (st = rp_zero_links_use_model(pt.zero_links, model, err)) != RP_OK)))
        goto done;
    for (int k = 0; o->tune_state && k < 3; k++)
        if (!(tuned_host[k] = malloc((pt.tuned_floats + 1) * sizeof(float)))) {
            st = rp_error_set(err, RP_ERR_NOMEM, "host buffers of the tuned states");
            goto done;
        }
    if (o->tune_lora) {
        /* Each adapter's initial values depend on its tensor's name only,
         * so the chunks' adapters are those of 1F1B's stages. */
        for (int c = 0; c < n_lora; c++) {
            if ((st = rp_lora_init(&lora[c], V ? &o->chunks[c] : model, o->lora_rank,
                                   o->lora_alpha, o->lora_targets, o->seed, err)) != RP_OK)
                goto done;
            lora_floats += lora[c].floats;
        }
        pt.lora = lora;
        for (int k = 0; k < 3; k++)
            if (!(lora_host[k] = malloc((lora_floats + 1) * sizeof(float)))) {
                st = rp_error_set(err, RP_ERR_NOMEM, "host buffers of the LoRA adapters");
                goto done;
            }
    }
    if (is_rank0 && o->metrics_path && !(metrics = fopen(o->metrics_path, "w"))) {
        st = rp_error_set(err, RP_ERR_IO, "cannot open the metrics log %s", o->metrics_path);
        goto done;
    }

    long first_step = 0;
    rp_train_progress progress = {.seed = o->seed};
    if (o->resume_path) {
        /* Every stage reads its own layers, whatever layout wrote them. */
        for (int c = 0; c < V && st == RP_OK; c++)
            st = rp_ckpt_load(o->resume_path, &o->chunks[c], &iadam_m[c], &iadam_v[c],
                              &progress, err);
        if (!V)
            st = rp_ckpt_load(o->resume_path, model, &adam_m, &adam_v, &progress, err);
        if (st != RP_OK) goto done;
        if (o->zero) {
            /* The checkpoint holds the whole moments whatever wrote it. */
            rp_zero_take(&zero, &adam_m, &adam_v);
            rp_model_free(&adam_m);
            rp_model_free(&adam_v);
        }
        for (int c = 0; o->zero && c < V; c++) {
            rp_zero_take(&izero[c], &iadam_m[c], &iadam_v[c]);
            rp_model_free(&iadam_m[c]);
            rp_model_free(&iadam_v[c]);
        }
        if (o->tune_state) {
            /* The states and moments continue exactly where the run stopped. */
            size_t at = 0;  /* interleaved: chunk after chunk */
            for (int c = 0; c < (V ? V : 1) && st == RP_OK; c++) {
                const rp_model *w = V ? &o->chunks[c] : model;
                float *out[3] = {tuned_host[0] + at, tuned_host[1] + at, tuned_host[2] + at};
                st = rp_ckpt_load_tuned(o->resume_path, cfg, w->layer_begin, w->layer_end, out,
                                        err);
                at += (size_t)(w->layer_end - w->layer_begin) * cfg->n_head * cfg->head_size *
                      cfg->head_size;
            }
            if (st != RP_OK) goto done;
            float *dev[3] = {pt.tuned, pt.tuned_m, pt.tuned_v};
            for (int k = 0; k < 3; k++)
                be->copy_to_device(be, dev[k], tuned_host[k], pt.tuned_floats * sizeof(float));
        }
        if (o->tune_lora) {
            /* The checkpoint holds the base weights: they become the base,
             * then the adapters and moments continue where the run stopped. */
            char want[192];
            rp_lora_describe(&lora[0], want, sizeof want);
            for (size_t c = 0, at = 0; c < (size_t)n_lora; at += lora[c].floats, c++) {
                rp_lora *lo = &lora[c];
                rp_lora_rebase(lo);
                float *out[3] = {lora_host[0] + at, lora_host[1] + at, lora_host[2] + at};
                if ((st = rp_ckpt_load_lora(o->resume_path, cfg, lo->model->layer_begin,
                                            lo->model->layer_end, lo->floats_per_layer, out,
                                            want, err)) != RP_OK)
                    goto done;
                float *dev[3] = {lo->params, lo->adam_m, lo->adam_v};
                for (int k = 0; k < 3; k++)
                    be->copy_to_device(be, dev[k], out[k], lo->floats * sizeof(float));
                rp_lora_apply(lo);
            }
        }
        if (progress.seed != o->seed) {
            st = rp_error_set(err, RP_ERR_ARG,
                              "%s was trained with --seed %llu, not %llu: resume with the same "
                              "seed so the data order continues", o->resume_path,
                              (unsigned long long)progress.seed, (unsigned long long)o->seed);
            goto done;
        }
        if ((st = data_set_position(&d, &progress, err)) != RP_OK) goto done;
        first_step = (long)progress.step;
        const long last = o->stop_after > 0 && o->stop_after < o->steps ? o->stop_after : o->steps;
        if (first_step >= last) {
            st = rp_error_set(err, RP_ERR_ARG,
                              "%s is already at step %ld and this run ends at step %ld: nothing "
                              "to train; give a larger --steps to continue it", o->resume_path,
                              first_step, last);
            goto done;
        }
        if (o->progress)
            fprintf(o->progress, "resumed from %s at step %ld (%llu tokens seen)\n",
                    o->resume_path, first_step, (unsigned long long)progress.tokens_seen);
    }
    /* --zero 1, bf16 all-gather: the other replicas' fp32 of the matrices
     * is read by nothing until a save, so its pages go (after the resume
     * wrote the whole weights). */
    if (o->zero && !V && (st = rp_zero_links_release_master(pt.zero_links, model, err)) != RP_OK)
        goto done;
    if (!V) print_memory(o, model, &grads, o->zero ? &zero : NULL, pt.zero_links);
    else print_memory_chunks(o, igrads, izero, pt.zero_links);
    double best_eval = INFINITY;

    const double t_start = rp_now_seconds();
    double t_window = t_start;
    long tokens_window = 0;
    const long end_step = o->stop_after > 0 && o->stop_after < o->steps ? o->stop_after : o->steps;
    for (long step = first_step; step < end_step; step++) {
        /* Every rank draws the whole global batch (cheap), so the data order
         * is the one of a single process; replica r takes its slice. */
        if ((st = data_train_batch(&d, B, tokens, mask, err)) != RP_OK) goto done;
        /* The loss is the mean over every target of the whole batch. */
        int n_targets_total = 0;
        for (int mb = 0; mb < B / MB; mb++) {
            int c = split_samples(o, MB, tokens + (size_t)mb * MB * (L + 1),
                                  mask + (size_t)mb * MB * L, inputs, targets);
            n_targets_total += c;
        }
        if (n_targets_total == 0) {
            st = rp_error_set(err, RP_ERR_ARG, "step %ld has no target to learn", step);
            goto done;
        }
        /* Group k's K chunks are micro-batches k*K .. k*K+K-1. */
        for (int k = 0; k < M / K; k++) {
            const size_t g = (size_t)replica * (M / K) + k;
            split_samples(o, MB, tokens + g * MB * (L + 1), mask + g * MB * L,
                          inputs + (size_t)k * MB * L, targets + (size_t)k * MB * L);
        }
        const float loss_scale = 1.0f / n_targets_total;
        rp_pipe_step_result sr;
        if ((st = rp_pipe_trainer_step(&pt, inputs, targets, loss_scale,
                                       o->l2wrap ? 1e-4f * loss_scale : 0.0f, &optim, step, &sr,
                                       err)) != RP_OK)
            goto done;
        if (sr.skipped) {
            result->skipped_steps++;
            if (o->progress)
                fprintf(o->progress, "step %ld: the gradient is not finite (loss %g); the update "
                        "was skipped (--no-halt-on-nan)\n", step + 1, sr.loss_sum / n_targets_total);
        }
        const double grad_norm = sr.grad_norm;
        const double loss = sr.loss_sum / n_targets_total;
        result->last_loss = loss;
        result->steps_done = step + 1;
        tokens_window += (long)B * L;
        progress.step = (uint64_t)step + 1;
        progress.lr_step = progress.step;
        progress.tokens_seen += (uint64_t)B * L;

        /* A stop request (preemption) is honoured by every rank at the same
         * step: the largest signal number seen by any rank wins. */
        int stop = 0;
        if (o->stop_signal) {
            stop = (int)*o->stop_signal;
            if (world &&
                (st = rp_transport_allreduce_int(world, &stop, 1, RP_REDUCE_MAX,
                                                 "the stop-request all-reduce", err)) != RP_OK)
                goto done;
        }
        const int last = step + 1 == end_step || stop;
        const int do_ckpt = o->ckpt_dir && (last || (o->ckpt_interval > 0 &&
                                                     (step + 1) % o->ckpt_interval == 0));
        /* Every checkpoint gets an evaluation, so `best` can be chosen; not
         * when preempted: the time left is for the checkpoint. */
        const int do_eval = !stop && (last || do_ckpt ||
                                      (o->eval_interval > 0 && (step + 1) % o->eval_interval == 0));
        const int do_log = last || (o->log_interval > 0 && (step + 1) % o->log_interval == 0);
        double eval_loss = NAN, eval_acc = NAN;
        if (do_eval) {
            if ((st = evaluate(model, o, tp, &d, pt.tuned, o->eval_batches, &eval_loss,
                               &eval_acc, NULL, err)) != RP_OK)
                goto done;
            result->eval_loss = eval_loss;
            result->eval_accuracy = eval_acc;
        }
        const double now = rp_now_seconds(), elapsed = now - t_start;
        const double tok_s = tokens_window / (now - t_window > 1e-9 ? now - t_window : 1e-9);
        if (do_log) {
            result->tokens_per_second = tok_s;
            if (o->progress) {
                char eta[32];
                format_duration(eta, sizeof eta,
                                elapsed / (step + 1 - first_step) * (o->steps - step - 1));
                fprintf(o->progress,
                        "step %ld/%ld | loss %.4f | lr %.2e | grad norm %.3f | %.0f tok/s | ETA %s",
                        step + 1, o->steps, loss, rp_lr_at(&optim, step), grad_norm, tok_s, eta);
                if (do_eval)
                    fprintf(o->progress, " | eval loss %.4f, accuracy %.2f%%", eval_loss,
                            100 * eval_acc);
                fprintf(o->progress, "\n");
                fflush(o->progress);
            }
            t_window = now;
            tokens_window = 0;
        }
        if (do_ckpt) {
            data_get_position(&d, &progress);
            /* Interleaved: adam_m / adam_v are the chunks' arrays (save_checkpoint). */
            rp_ckpt_contents c = {.weights = model, .adam_m = V ? iadam_m : &adam_m,
                                  .adam_v = V ? iadam_v : &adam_v,
                                  .progress = progress, .optim = &optim,
                                  .keep_last = o->keep_last};
            char lora_meta[192];
            if (o->tune_lora) {
                /* The adapters and their moments, over the base weights. */
                for (size_t ch = 0, at = 0; ch < (size_t)n_lora; at += lora[ch].floats, ch++) {
                    float *dev[3] = {lora[ch].params, lora[ch].adam_m, lora[ch].adam_v};
                    for (int k = 0; k < 3; k++)
                        be->copy_to_host(be, lora_host[k] + at, dev[k],
                                         lora[ch].floats * sizeof(float));
                    rp_lora_unapply(&lora[ch]);
                }
                for (int k = 0; k < 3; k++) c.lora[k] = lora_host[k];
                c.lora_floats_per_layer = lora[0].floats_per_layer;
                rp_lora_describe(&lora[0], lora_meta, sizeof lora_meta);
                c.lora_meta = lora_meta;
            }
            if (o->tune_state) {
                /* The tuned states and their moments go with it (host copies). */
                float *dev[3] = {pt.tuned, pt.tuned_m, pt.tuned_v};
                for (int k = 0; k < 3; k++) {
                    be->copy_to_host(be, tuned_host[k], dev[k], pt.tuned_floats * sizeof(float));
                    c.tuned[k] = tuned_host[k];
                }
            }
            /* --zero 1's bf16 all-gather left other ranges' fp32 stale (or
             * gave back their pages): replica 0 writes a gathered copy. */
            const rp_model *whole = model;
            if (o->zero && (st = rp_zero_links_gather_master(pt.zero_links, model,
                                                             o->host_backend, &whole, err)) !=
                               RP_OK)
                goto done;
            if (whole != model) c.weights = whole;
            st = V && o->zero ? save_checkpoint_zero_chunks(o, tp, &c, izero, err)
                              : save_checkpoint_zero(o, tp, &c, &zero, err);
            if (o->zero) rp_zero_links_drop_master(pt.zero_links);
            for (int ch = 0; o->tune_lora && ch < n_lora; ch++) rp_lora_apply(&lora[ch]);
            if (st != RP_OK) goto done;
            char name[64];
            rp_ckpt_step_name(name, sizeof name, progress.step);
            if (is_rank0 && eval_loss < best_eval) {
                best_eval = eval_loss;
                if ((st = rp_ckpt_mark_best(o->ckpt_dir, name, err)) != RP_OK) goto done;
            }
            if (o->progress)
                fprintf(o->progress, "checkpoint %s/%s%s\n", o->ckpt_dir, name,
                        best_eval == eval_loss ? " (best eval loss so far)" : "");
        }
        if (metrics) {
            fprintf(metrics,
                    "{\"step\": %ld, \"loss\": %.6f, \"lr\": %.6e, \"grad_norm\": %.6f, "
                    "\"tokens_per_s\": %.1f, \"elapsed_s\": %.3f",
                    step + 1, loss, rp_lr_at(&optim, step), grad_norm, tok_s, elapsed);
            if (do_eval)
                fprintf(metrics, ", \"eval_loss\": %.6f, \"eval_accuracy\": %.6f", eval_loss,
                        eval_acc);
            fprintf(metrics, "}\n");
            fflush(metrics);
        }
        if (stop) {
            result->stopped_by_signal = stop;
            break;
        }
    }
    result->seconds = rp_now_seconds() - t_start;
    /* The weights leave here whole in fp32 (--zero 1's bf16 all-gather: a
     * gathered copy on replica 0). */
    const rp_model *whole = model;
    if (o->zero && o->save_path && !result->stopped_by_signal)
        st = rp_zero_links_gather_master(pt.zero_links, model, o->host_backend, &whole, err);
    if (st == RP_OK && o->save_path && !result->stopped_by_signal)
        st = V ? save_weights_interleaved(o, tp, err)
               : save_weights(whole ? whole : model, o, tp, err);
    if (o->zero) rp_zero_links_drop_master(pt.zero_links);
    if (st == RP_OK && o->tune_state && o->state_out)
        st = save_tuned_states(model, &pt, o, tp, err);
    if (st == RP_OK && o->tune_lora && o->lora_out && !result->stopped_by_signal)
        st = save_lora(model, lora, o, tp, err);
done:
    for (int c = 0; lora && c < n_lora; c++) rp_lora_free(&lora[c]);
    free(lora);
    for (int k = 0; k < 3; k++) {
        free(tuned_host[k]);
        free(lora_host[k]);
    }
    if (metrics) fclose(metrics);
    rp_pipe_trainer_free(&pt);
    for (int c = 0; c < V; c++) {
        if (igrads) rp_model_free(&igrads[c]);
        if (iadam_m) rp_model_free(&iadam_m[c]);
        if (iadam_v) rp_model_free(&iadam_v[c]);
    }
    for (int c = 0; izero && c < V; c++) rp_zero_shard_free(&izero[c]);
    free(izero);
    free(igrads);
    free(iadam_m);
    free(iadam_v);
    if (tp) rp_transport_free(tp);
    if (world) rp_transport_free(world);
    rp_model_free(&grads);
    rp_model_free(&adam_m);
    rp_model_free(&adam_v);
    rp_zero_shard_free(&zero);
    free(tokens);
    free(mask);
    free(inputs);
    free(targets);
    data_close(&d);
    return st;
}
