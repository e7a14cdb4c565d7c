/* The driver of the generation engine (engine.h), on rank 0: the job queue,
 * admission into slots, the scheduler that keeps up to P units (prefill
 * chunks, decode groups) in the pipeline, the results that come back, and
 * the engine's creation, run loop, shutdown and metrics. The stage side is
 * engine_worker.c, sessions engine_sessions.c. */
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <omp.h>

#include "infer/engine_internal.h"
#include "core/clock.h"

void rp_engine_config_defaults(rp_engine_config *c) {
    memset(c, 0, sizeof *c);
    c->n_slots = 16;
    c->prefill_chunk = 256;
    c->max_queue = 64;
    c->session_budget_bytes = (size_t)256 << 20;
    c->comm_timeout = 300;
}

const rp_config *rp_engine_config_of(const rp_engine *e) { return &e->m->cfg; }

int rp_engine_group_size(int max_batch, const rp_backend *be) {
    if (max_batch > 0) return max_batch;
    return be && be->decode_group > 0 ? be->decode_group : RP_ENGINE_GROUP_DEFAULT;
}

/* The per-unit scratch of group_max entries (engine_internal.h), one block. */
static int group_buffers(rp_engine *e) {
    const size_t G = (size_t)e->group_max;
    char *p = e->g_mem = calloc(G, 10 * sizeof(int32_t) + sizeof(protobuf_c_boolean));
    if (!p) return 0;
    int32_t **i32[] = {&e->g_slots, &e->g_lengths, &e->g_tokens, &e->g_s_out,
                       &e->g_t_out, &e->g_res_slots, &e->g_res_tokens};
    for (size_t i = 0; i < sizeof i32 / sizeof i32[0]; i++, p += G * sizeof(int32_t))
        *i32[i] = (int32_t *)p;
    int **ints[] = {&e->g_seq_len, &e->g_slot, &e->g_row_begin};
    for (size_t i = 0; i < sizeof ints / sizeof ints[0]; i++, p += G * sizeof(int))
        *ints[i] = (int *)p;
    e->g_sample = (protobuf_c_boolean *)p;
    return 1;
}

/* ---- creation ---- */

rp_status rp_engine_create(rp_engine **out, const rp_model *model, const rp_grid *grid,
                           const rp_engine_config *cfg, rp_error *err) {
    *out = NULL;
    if (cfg->n_slots < 1 || cfg->prefill_chunk < 1 || cfg->max_queue < 0)
        return rp_error_set(err, RP_ERR_ARG, "engine: slots %d and prefill chunk %d must be >= 1",
                            cfg->n_slots, cfg->prefill_chunk);
    if (cfg->prefill_turn_rows < 0)
        return rp_error_set(err, RP_ERR_ARG, "engine: prefill rows per turn %d must be >= 0 "
                            "(0: the prefill chunk)", cfg->prefill_turn_rows);
    if (cfg->prefill_prompts < 0)
        return rp_error_set(err, RP_ERR_ARG, "engine: prompts per prefill unit %d must be >= 0 "
                            "(0: the decode group size, 1: one prompt per unit)",
                            cfg->prefill_prompts);
    if (cfg->max_batch < 0 || cfg->max_batch > RP_ENGINE_MAX_BATCH)
        return rp_error_set(err, RP_ERR_ARG, "engine: --max-batch %d must be between 1 and %d "
                            "(sequences per decode step; 0 or absent: the backend's default, %d)",
                            cfg->max_batch, RP_ENGINE_MAX_BATCH,
                            rp_engine_group_size(0, model->be));
    if (grid && grid->dp != 1)
        return rp_error_set(err, RP_ERR_ARG, "serving runs one pipeline: use -np equal to --pp "
                            "(got %d ranks for %d stages)", grid->world_size, grid->pp);
    rp_engine *e = calloc(1, sizeof *e);
    if (!e) return rp_error_set(err, RP_ERR_NOMEM, "engine");
    e->m = model;
    e->be = model->be;
    e->cfg = *cfg;
    e->stage = grid ? grid->stage : 0;
    e->n_stages = grid ? grid->pp : 1;
    e->is_last = e->stage == e->n_stages - 1;
    e->t_start = e->t_mark = rp_now_seconds();
    pthread_mutex_init(&e->mu, NULL);
    pthread_cond_init(&e->wake, NULL);
    e->owner = pthread_self();
    const rp_config *c = &model->cfg;
    e->group_max = rp_engine_group_size(cfg->max_batch, e->be);
    e->max_rows = (size_t)(cfg->prefill_chunk > e->group_max ? cfg->prefill_chunk
                                                              : e->group_max);
    rp_status st = rp_workspace_alloc(&e->ws, c, (int)e->max_rows, e->be, err);
    if (st != RP_OK) {
        free(e);
        return st;
    }
    rp_state_geometry(&e->state, c, model->layer_begin, model->layer_end, cfg->n_slots);
    e->state.data = e->be->alloc(e->be, e->state.floats_per_slot * (size_t)cfg->n_slots *
                                            sizeof(float));
    e->n_out = e->n_stages + 2;
    e->out = calloc((size_t)e->n_out, sizeof *e->out);
    e->slot_job = calloc((size_t)cfg->n_slots, sizeof *e->slot_job);
    e->slot_tokens = calloc((size_t)cfg->n_slots, sizeof *e->slot_tokens);
    e->busy_total = calloc((size_t)e->n_stages, sizeof(double));
    e->busy_mark = calloc((size_t)e->n_stages, sizeof(double));
    e->busy_frac = calloc((size_t)e->n_stages, sizeof(double));
    e->stage_layer_begin = calloc((size_t)e->n_stages, sizeof(int));
    e->stage_layer_end = calloc((size_t)e->n_stages, sizeof(int));
    /* Several prompts per prefill unit only where their rows are exact
     * rows (a prompt's bits must not depend on its neighbours), at most a
     * decode group's worth (the unit's per-sequence buffers). */
    e->prefill_prompts = !rp_model_prefill_rows_exact(model) ? 1
                         : cfg->prefill_prompts == 0 || cfg->prefill_prompts > e->group_max
                             ? e->group_max
                             : cfg->prefill_prompts;
    e->prefill_tokens = malloc(e->max_rows * sizeof(int32_t));
    int ok = group_buffers(e) && e->prefill_tokens && e->state.data && e->out && e->slot_job &&
             e->slot_tokens &&
             e->busy_total && e->busy_mark && e->busy_frac && e->stage_layer_begin && e->stage_layer_end;
    for (int s = 0; ok && s < e->n_stages; s++) {
        e->stage_layer_begin[s] = grid ? grid->layer_begin[s] : 0;
        e->stage_layer_end[s] = grid ? grid->layer_end[s] : c->n_layer;
    }
    /* Backend memory: the transport stages it through host memory when the
     * backend's is not host memory. */
    const size_t act_bytes = e->max_rows * c->n_embd * sizeof(float);
    for (int i = 0; ok && e->n_stages > 1 && i < e->n_out; i++) {
        e->out[i].x = e->be->alloc(e->be, act_bytes);
        e->out[i].v = e->be->alloc(e->be, act_bytes);
        ok = e->out[i].x && e->out[i].v;
    }
    if (ok && e->is_last) {
        const size_t V = (size_t)c->vocab_size;
        e->logits_dev = e->be->alloc(e->be, (size_t)e->group_max * V * sizeof(float));
        e->logits_host = malloc((size_t)e->group_max * V * sizeof(float));
        /* The backend's threads sit idle while the last stage samples (the
         * head's matmul is done): as many sample a unit's rows at once. */
        e->sample_threads = cfg->threads > 0 ? cfg->threads : omp_get_max_threads();
        if (e->sample_threads > RP_ENGINE_SAMPLE_THREADS_MAX)
            e->sample_threads = RP_ENGINE_SAMPLE_THREADS_MAX;
        if (e->sample_threads < 1) e->sample_threads = 1;
        /* a cache line apart, so threads never share one */
        e->sampler_scratch_stride = (rp_sampler_scratch_bytes(c->vocab_size) + 63) / 64 * 64;
        e->sampler_scratch = malloc(e->sampler_scratch_stride * (size_t)e->sample_threads);
        e->g_sampled = malloc((size_t)e->group_max * sizeof(int32_t));
        e->sampling = calloc((size_t)cfg->n_slots, sizeof *e->sampling);
        e->lp_row = malloc(V * sizeof(float));
        e->unit_lp = malloc((e->max_rows + (size_t)e->group_max) * sizeof *e->unit_lp);
        ok = e->logits_dev && e->logits_host && e->sampler_scratch && e->g_sampled &&
             e->sampling && e->lp_row &&
             e->unit_lp;
        for (int i = 0; ok && i < cfg->n_slots; i++)
            ok = (e->sampling[i].occ = calloc(V, sizeof(float))) != NULL;
    }
    if (!ok) {
        const size_t bytes = e->state.floats_per_slot * sizeof(float);
        rp_engine_free(e);
        return rp_error_set(err, RP_ERR_NOMEM,
                            "cannot allocate the engine: %d slots of %zu bytes of state",
                            cfg->n_slots, bytes);
    }
    if (grid && grid->pp > 1) {
        if ((st = rp_transport_init(&e->tp, grid->pipe_comm, cfg->comm_timeout, err)) != RP_OK) {
            rp_engine_free(e);
            return rp_error_prefix(err, "the engine's stage transport");
        }
        e->has_tp = 1;
        rp_transport_use_backend(&e->tp, e->be);
    }
    rp_prefix_cache_init(&e->prefix, cfg->prefix_cache_bytes,
                         rp_engine_session_floats(e) * sizeof(float));
    *out = e;
    return RP_OK;
}

void rp_engine_free(rp_engine *e) {
    if (!e) return;
    for (int i = 0; e->out && i < e->n_out; i++) {
        free(e->out[i].packed);
        if (e->out[i].x) e->be->free(e->be, e->out[i].x);
        if (e->out[i].v) e->be->free(e->be, e->out[i].v);
    }
    free(e->out);
    if (e->state.data) e->be->free(e->be, e->state.data);
    if (e->logits_dev) e->be->free(e->be, e->logits_dev);
    free(e->logits_host);
    if (e->logits_all_dev) e->be->free(e->be, e->logits_all_dev);
    free(e->logits_all_host);
    free(e->lp_row);
    free(e->unit_lp);
    free(e->sampler_scratch);
    free(e->g_sampled);
    for (int i = 0; e->sampling && i < e->cfg.n_slots; i++) {
        rp_slot_sampling_free(&e->sampling[i]);
    }
    rp_engine_grammars_free(e);
    free(e->sampling);
    for (int i = 0; i < e->n_sessions; i++) free(e->sessions[i].data);
    free(e->sessions);
    for (int i = 0; i < e->n_prefix_states; i++) free(e->prefix_states[i].data);
    free(e->prefix_states);
    rp_prefix_cache_free(&e->prefix);
    for (int i = 0; e->slot_job && i < e->cfg.n_slots; i++)
        if (e->slot_job[i]) rp_job_release(e->slot_job[i]);
    free(e->slot_job);
    free(e->slot_tokens);
    while (e->queue_head) {
        rp_job *j = e->queue_head;
        e->queue_head = j->next;
        rp_job_release(j);
    }
    free(e->busy_total);
    free(e->busy_mark);
    free(e->busy_frac);
    free(e->stage_layer_begin);
    free(e->stage_layer_end);
    for (int i = 0; i < e->units.cap; i++) free(e->units.r[i].slots);
    free(e->units.r);
    free(e->g_mem);
    free(e->prefill_tokens);
    rp_workspace_free(&e->ws, e->be);
    if (e->has_tp) rp_transport_free(&e->tp);
    pthread_mutex_destroy(&e->mu);
    pthread_cond_destroy(&e->wake);
    free(e);
}

/* ---- the driver (rank 0) ---- */

/* A slot counted in n_slots_used is free again. */
static void engine_slot_unused(rp_engine *e) {
    pthread_mutex_lock(&e->mu);
    e->n_slots_used--;
    pthread_mutex_unlock(&e->mu);
}

int rp_engine_waiting(rp_engine *e) {
    pthread_mutex_lock(&e->mu);
    int waiting = e->n_queued - (e->cfg.n_slots - e->n_slots_used);
    pthread_mutex_unlock(&e->mu);
    return waiting > 0 ? waiting : 0;
}

static rp_status job_check(const rp_engine *e, const rp_job *job, rp_error *err) {
    rp_status st = rp_gen_params_validate(&job->params, e->m->cfg.vocab_size, err);
    if (st != RP_OK) return st;
    for (int i = 0; i < job->n_prompt; i++)
        if (job->prompt[i] < 0 || job->prompt[i] >= e->m->cfg.vocab_size)
            return rp_error_set(err, RP_ERR_ARG, "prompt token %d at position %d is outside the "
                                "vocabulary [0, %d)", job->prompt[i], i, e->m->cfg.vocab_size);
    return RP_OK;
}

rp_status rp_engine_submit_all(rp_engine *e, rp_job *const *jobs, int n, rp_error *err) {
    for (int i = 0; i < n; i++) {
        rp_status st = job_check(e, jobs[i], err);
        if (st != RP_OK) return n > 1 ? rp_error_prefix(err, "choice %d of %d", i, n) : st;
    }
    pthread_mutex_lock(&e->mu);
    if (e->shutdown_requested) {
        pthread_mutex_unlock(&e->mu);
        return rp_error_set(err, RP_ERR_UNAVAILABLE, "the server is shutting down");
    }
    /* Only jobs that no free slot will take count against the limit: queued
     * jobs that free slots are about to take are not waiting. */
    int free_slots = e->cfg.n_slots - e->n_slots_used;
    int waiting = e->n_queued - (free_slots > 0 ? free_slots : 0);
    if (waiting + n - 1 >= e->cfg.max_queue) {
        pthread_mutex_unlock(&e->mu);
        return rp_error_set(err, RP_ERR_BUSY, "%d requests are already waiting for a slot "
                            "(--max-queue %d)%s; try again later", waiting < 0 ? 0 : waiting,
                            e->cfg.max_queue, n > 1 ? ", too few for all the choices" : "");
    }
    /* All in one critical section: the driver sees the choices of a request
     * together, so the ones that find free slots start together and a prompt
     * shared by them is read once (a choice queued after its first had
     * passed the prompt would read it again). */
    const double now = rp_now_seconds();
    for (int i = 0; i < n; i++) {
        rp_job *job = jobs[i];
        rp_job_retain(job);
        job->t_submit = now;
        job->next = NULL;
        if (e->queue_tail) e->queue_tail->next = job;
        else e->queue_head = job;
        e->queue_tail = job;
        e->n_queued++;
        e->requests_total++;
    }
    pthread_cond_broadcast(&e->wake);
    pthread_mutex_unlock(&e->mu);
    return RP_OK;
}

rp_status rp_engine_submit(rp_engine *e, rp_job *job, rp_error *err) {
    return rp_engine_submit_all(e, &job, 1, err);
}

rp_status rp_engine_issue(rp_engine *e, const rp_engine_command *c, rp_error *err) {
    rp_status st = rp_engine_apply(e, c, err);
    if (st == RP_OK && e->n_stages > 1) st = rp_engine_forward(e, c, NULL, NULL, 0, err);
    return st;
}

static void make_sampling(Rwkvpipe__EngineSampling *s, const rp_gen_params *p) {
    rwkvpipe__engine_sampling__init(s);
    s->temperature = p->sampler.temperature;
    s->top_p = p->sampler.top_p;
    s->top_k = p->sampler.top_k;
    s->seed = p->sampler.seed;
    s->presence_penalty = p->presence_penalty;
    s->frequency_penalty = p->frequency_penalty;
    s->penalty_decay = p->penalty_decay;
    s->n_banned = (size_t)p->n_banned;
    s->banned = (int32_t *)p->banned;
    s->logprobs = p->logprobs != 0;
    s->top_logprobs = p->top_logprobs;
    s->score_prompt = p->score_prompt != 0;
    s->n_bias_ids = s->n_bias_values = (size_t)p->n_bias;
    s->bias_ids = (int32_t *)p->bias_ids;
    s->bias_values = (float *)p->bias_values;
    s->grammar = p->grammar;
    s->grammar_schema = (char *)(p->grammar_schema ? p->grammar_schema : "");
    s->n_grammar_end = p->grammar ? (size_t)p->n_stop_tokens : 0;
    s->grammar_end = (int32_t *)p->stop_tokens;
}

/* Frees slot (stashing its state under the job's store_session if asked).
 * Without e->mu: the table functions take it for their changes. */
static rp_status prefix_keep(rp_engine *e, int slot, uint64_t origin, const int32_t *toks,
                             int len, rp_error *err);

static rp_status close_slot(rp_engine *e, int slot, int stash, rp_error *err) {
    rp_job *j = e->slot_job[slot];
    /* The prefix cache keeps the state after prompt + generated text, when
     * the slot has read exactly those tokens (not after a client's cancel). */
    if (j->prefix_on && !j->has_pending && j->prefilled == j->n_prompt &&
        rp_job_cancel_state(j) != RP_JOB_CANCEL_CLIENT) {
        pthread_mutex_lock(&j->mu);
        const int len = j->n_prompt + j->n_out;
        int32_t *key = (uint64_t)len == e->slot_tokens[slot] ? malloc(sizeof(int32_t) * (size_t)len)
                                                            : NULL;
        if (key) {
            memcpy(key, j->prompt, sizeof(int32_t) * (size_t)j->n_prompt);
            memcpy(key + j->n_prompt, j->out, sizeof(int32_t) * (size_t)j->n_out);
        }
        pthread_mutex_unlock(&j->mu);
        rp_status st = key ? prefix_keep(e, slot, j->prefix_origin, key, len, err) : RP_OK;
        free(key);
        if (st != RP_OK) return st;
    }
    rp_engine_command c = RWKVPIPE__ENGINE_COMMAND__INIT;
    c.kind = RWKVPIPE__ENGINE_COMMAND__KIND__FREE_SLOT;
    c.slot = slot;
    c.session = stash ? j->store_session : (char *)"";
    rp_status st = rp_engine_issue(e, &c, err);
    if (st == RP_OK && stash) {
        rp_engine_session *s = rp_engine_session_find(e, j->store_session);
        pthread_mutex_lock(&e->mu);
        if (s) {
            s->tokens = e->slot_tokens[slot];
            s->last_used = ++e->clock;
            s->version = ++e->session_versions;
        }
        pthread_mutex_unlock(&e->mu);
        /* LRU under the byte budget (whole-model bytes per session). */
        const size_t per = e->state.floats_per_layer * (size_t)e->m->cfg.n_layer * sizeof(float);
        while (st == RP_OK && e->n_sessions > 1 &&
               (size_t)e->n_sessions * per > e->cfg.session_budget_bytes) {
            int lru = -1;
            for (int i = 0; i < e->n_sessions; i++)
                if (strcmp(e->sessions[i].name, j->store_session) != 0 &&
                    (lru < 0 || e->sessions[i].last_used < e->sessions[lru].last_used))
                    lru = i;
            if (lru < 0) break;
            rp_engine_command d = RWKVPIPE__ENGINE_COMMAND__INIT;
            d.kind = RWKVPIPE__ENGINE_COMMAND__KIND__DROP;
            char name[RP_ENGINE_SESSION_NAME_MAX];
            snprintf(name, sizeof name, "%s", e->sessions[lru].name);
            d.session = name;
            st = rp_engine_issue(e, &d, err);
        }
    }
    if (j->has_deferred) rp_job_finish(j, j->deferred, NULL);
    e->slot_job[slot] = NULL;
    engine_slot_unused(e);
    rp_job_release(j);
    return st;
}

/* The job is over: a job that stores its session reports its end only once
 * the session is stored (close_slot), so a client that continues or saves it
 * right after the reply finds it. */
static void job_end(rp_job *j, rp_finish_reason reason) {
    j->closing = 1;
    if (j->store_session[0] || j->prefix_on) {
        j->has_deferred = 1;
        j->deferred = reason;
    } else {
        rp_job_finish(j, reason, NULL);
    }
}

static int is_stop_token(const rp_job *j, int32_t t) {
    for (int i = 0; i < j->params.n_stop_tokens; i++)
        if (j->params.stop_tokens[i] == t) return 1;
    return 0;
}

/* A sampled token for slot (with its logprob when the job asked): emit
 * it, or finish the job. A stop token's logprob is kept too (OpenAI lists
 * the end-of-text token; lm-evaluation-harness drops the last entry). */
static void deliver(rp_engine *e, int slot, int32_t tok, const rp_token_logprob *lp) {
    rp_job *j = e->slot_job[slot];
    if (!j || j->closing) return;
    if (lp && tok >= 0 && j->params.logprobs) rp_job_push_logprob(j, lp);
    if (tok < 0) {
        rp_job_finish(j, RP_FINISH_ERROR, rp_sample_failure_message(tok, (uint64_t)j->n_generated));
        j->closing = 1;
        return;
    }
    if (is_stop_token(j, tok)) {
        job_end(j, RP_FINISH_STOP);
        return;
    }
    rp_job_push_token(j, tok);
    pthread_mutex_lock(&e->mu);
    e->tokens_generated++;
    pthread_mutex_unlock(&e->mu);
    j->n_generated++;
    j->has_pending = 1;
    j->pending = tok;
    if (j->n_generated >= j->params.max_tokens) job_end(j, RP_FINISH_LENGTH);
}

static void account_busy(rp_engine *e, const double *busy, size_t n) {
    pthread_mutex_lock(&e->mu);
    for (size_t s = 0; s < n && s < (size_t)e->n_stages; s++) e->busy_total[s] += busy[s];
    pthread_mutex_unlock(&e->mu);
}

/* A unit's results: its slots' sampled tokens and the logprobs the last
 * stage computed (lps, n_lps: prompt positions go to their job, a sampled
 * token's goes with it). */
static void finish_unit(rp_engine *e, const int32_t *unit_slots, int n_unit, const int32_t *slots,
                        const int32_t *tokens, int n_sampled, const rp_unit_logprob *lps,
                        int n_lps) {
    for (int i = 0; i < n_unit; i++)
        if (e->slot_job[unit_slots[i]]) e->slot_job[unit_slots[i]]->in_flight = 0;
    for (int k = 0; k < n_lps; k++) {
        rp_job *j = lps[k].slot >= 0 && lps[k].slot < e->cfg.n_slots ? e->slot_job[lps[k].slot]
                                                                       : NULL;
        if (j && lps[k].pos >= 0) rp_job_set_prompt_logprob(j, lps[k].pos, &lps[k].lp);
    }
    for (int i = 0; i < n_sampled; i++) {
        const rp_token_logprob *lp = NULL;
        for (int k = 0; k < n_lps && !lp; k++)
            if (lps[k].slot == slots[i] && lps[k].pos < 0) lp = &lps[k].lp;
        deliver(e, slots[i], tokens[i], lp);
    }
}

/* Where a job's prefill stops: one token early for a job others copy
 * their state from (until it passes that point), so that each then reads
 * the last prompt token and samples on its own. */
static int prefill_end(const rp_job *j) {
    return (j->fork_parent && !j->fork_passed) || (j->prefix_on && !j->prefix_passed)
               ? j->n_prompt - 1
               : j->n_prompt;
}

/* ---- the prefix state cache (the index: prefix_cache.h) ---- */

/* Keeps slot's state (it has read toks[0..len)) in the cache: every stage
 * stores its part under the entry's id; entries the LRU evicts are dropped
 * on every stage first. */
static rp_status prefix_keep(rp_engine *e, int slot, uint64_t origin, const int32_t *toks,
                             int len, rp_error *err) {
    uint64_t *evicted = malloc(sizeof(uint64_t) * ((size_t)e->prefix.n + 1));
    if (!evicted) return rp_error_set(err, RP_ERR_NOMEM, "prefix cache eviction list");
    uint64_t id;
    int is_new, n_evicted;
    pthread_mutex_lock(&e->mu);  /* the metrics read the byte count */
    rp_status st = rp_prefix_cache_insert(&e->prefix, origin, toks, len, &id, &is_new, evicted,
                                          e->prefix.n + 1, &n_evicted, err);
    pthread_mutex_unlock(&e->mu);
    for (int i = 0; st == RP_OK && i < n_evicted; i++) {
        rp_engine_command d = RWKVPIPE__ENGINE_COMMAND__INIT;
        d.kind = RWKVPIPE__ENGINE_COMMAND__KIND__PREFIX_DROP;
        d.prefix_id = evicted[i];
        st = rp_engine_issue(e, &d, err);
    }
    free(evicted);
    if (st != RP_OK || !is_new) return st;
    rp_engine_command c = RWKVPIPE__ENGINE_COMMAND__INIT;
    c.kind = RWKVPIPE__ENGINE_COMMAND__KIND__PREFIX_STORE;
    c.slot = slot;
    c.prefix_id = id;
    return rp_engine_issue(e, &c, err);
}

/* A job that keeps its prompt's state stops its prefill one token early:
 * the state there is stored (a prompt that repeats this one, or extends
 * it, resumes from it and still reads its own last token for the logits),
 * then the last prompt token goes through as a decode row. */
static rp_status prefix_points(rp_engine *e, rp_error *err) {
    for (int s = 0; s < e->cfg.n_slots; s++) {
        rp_job *j = e->slot_job[s];
        if (!j || !j->prefix_on || j->prefix_passed || j->in_flight || j->closing ||
            (j->fork_parent && !j->fork_passed) || j->prefilled != j->n_prompt - 1)
            continue;
        rp_status st = prefix_keep(e, s, j->prefix_origin, j->prompt, j->n_prompt - 1, err);
        if (st != RP_OK) return st;
        j->prefix_passed = 1;
        j->prefilled = j->n_prompt;
        j->has_pending = 1;
        j->pending = j->prompt[j->n_prompt - 1];
        pthread_mutex_lock(&e->mu);
        e->tokens_prefilled++;  /* the prompt's last token, read as a decode row */
        pthread_mutex_unlock(&e->mu);
        /* max_tokens 0: the last token is read (for the end's state), not sampled */
        if (j->params.max_tokens == 0) job_end(j, RP_FINISH_LENGTH);
    }
    return RP_OK;
}

/* The copies of a prompt read once (rp_job_share_prompt): a job waiting in
 * its slot gets the state of its first job once that one has read all but
 * its last prompt token; the first goes on once none waits for it. A job
 * whose first is gone or past that point reads the prompt itself. */
static rp_status resolve_forks(rp_engine *e, rp_error *err) {
    const int S = e->cfg.n_slots;
    for (int s = 0; s < S; s++) {
        rp_job *k = e->slot_job[s];
        if (!k || !k->fork_wait) continue;
        rp_job *p = k->fork_of;
        const int alive = p->slot >= 0 && p->slot < S && e->slot_job[p->slot] == p &&
                          !p->closing && !p->fork_passed && p->prefilled <= p->n_prompt - 1;
        if (!alive || k->closing) {
            k->fork_wait = 0;
            continue;
        }
        if (p->in_flight || p->prefilled < p->n_prompt - 1) continue;
        rp_engine_command c = RWKVPIPE__ENGINE_COMMAND__INIT;
        int32_t src = p->slot;
        c.kind = RWKVPIPE__ENGINE_COMMAND__KIND__COPY_SLOT;
        c.slot = s;
        c.n_slots = 1;
        c.slots = &src;
        rp_status st = rp_engine_issue(e, &c, err);
        if (st != RP_OK) return st;
        e->slot_tokens[s] = e->slot_tokens[p->slot];
        k->fork_wait = 0;
        k->prefilled = k->n_prompt;
        k->has_pending = 1;
        k->pending = k->prompt[k->n_prompt - 1];
    }
    for (int s = 0; s < S; s++) {
        rp_job *p = e->slot_job[s];
        if (!p || !p->fork_parent || p->fork_passed || p->in_flight || p->closing ||
            p->prefilled != p->n_prompt - 1)
            continue;
        int waiting = 0;
        for (int k = 0; k < S; k++)
            waiting |= e->slot_job[k] && e->slot_job[k]->fork_wait && e->slot_job[k]->fork_of == p;
        if (waiting) continue;
        /* The copies have their state: the prompt's goes into the prefix
         * cache now (prefix_points waits for this point). */
        if (p->prefix_on && !p->prefix_passed) {
            rp_status st = prefix_keep(e, s, p->prefix_origin, p->prompt, p->n_prompt - 1, err);
            if (st != RP_OK) return st;
            p->prefix_passed = 1;
        }
        p->fork_passed = 1;
        p->prefilled = p->n_prompt;
        p->has_pending = 1;
        p->pending = p->prompt[p->n_prompt - 1];
    }
    return RP_OK;
}

/* Builds and launches the next unit, if any work is ready. Returns 1 if one
 * was launched. */
static int launch_unit(rp_engine *e, rp_unit_record *rec, rp_status *st, rp_error *err) {
    const int S = e->cfg.n_slots;
    int32_t *slots = e->g_slots, *lengths = e->g_lengths, *tokens_buf = e->g_tokens;
    protobuf_c_boolean *sample = e->g_sample;
    const int32_t *tokens = NULL;
    int n = 0;
    /* Candidates: decode-ready slots, and slots still prefilling (the
     * first e->prefill_prompts of them, g_res_slots as scratch). */
    int prefill_slot = -1, n_pf = 0;
    int32_t *pf = e->g_res_slots;
    /* Round robin from where the last unit stopped: with more ready slots
     * than fit in a group, the low-numbered ones must not always win. */
    const int start = e->rr_cursor;
    for (int i = 0; i < S; i++) {
        const int s = (start + i) % S;
        rp_job *j = e->slot_job[s];
        if (!j || j->in_flight) continue;
        if (j->fork_wait) continue;
        if (j->prefilled < prefill_end(j) && !j->closing) {
            if (prefill_slot < 0) prefill_slot = s;
            if (n_pf < e->prefill_prompts) pf[n_pf++] = s;
        } else if (j->has_pending && (!j->closing || j->store_session[0] || j->prefix_on) &&
                   !(j->closing && rp_job_cancel_state(j) == RP_JOB_CANCEL_CLIENT)) {
            if (n < e->group_max) {
                slots[n] = s;
                lengths[n] = 1;
                sample[n] = !j->closing;
                tokens_buf[n] = j->pending;
                n++;
            }
        }
    }
    /* Prefill and decode take turns so neither starves the other: after a
     * decode unit, prefill units run until they have read
     * prefill_turn_rows rows (default: one chunk's; at least one unit),
     * then the next decode unit goes. A short prompt alone is a pass over
     * every matrix for a few rows, so one prompt per turn (as before) kept
     * 64 jobs of 16-token prompts and 32 tokens in small decode groups
     * (bench_engine's mean decode group, docs/perf/serving.md); with the
     * row budget 16 such prompts go per turn, while a long prompt still
     * alternates chunk by chunk with decode, so a streaming sequence waits
     * about one chunk's rows of prefill between its tokens either way. */
    const int turn_rows =
        e->cfg.prefill_turn_rows > 0 ? e->cfg.prefill_turn_rows : e->cfg.prefill_chunk;
    int next_len = 0;
    if (prefill_slot >= 0) {
        const rp_job *j = e->slot_job[prefill_slot];
        next_len = prefill_end(j) - j->prefilled;
        if (next_len > e->cfg.prefill_chunk) next_len = e->cfg.prefill_chunk;
    }
    const int do_prefill =
        prefill_slot >= 0 && (n == 0 || e->prefill_rows_run == 0 ||
                              e->prefill_rows_run + next_len <= turn_rows);
    if (!do_prefill && n == 0) return 0;
    /* A prefill unit reads the first candidate's next chunk and then, in
     * round-robin order, the next chunks of other prompts while they fit in
     * the turn's rows and one chunk (the workspace): short prompts share
     * one pass over the weights. A prompt that scores itself (every row's
     * logits) goes alone. With no decode waiting the turn does not bind. */
    const int rows_left = n == 0 ? e->cfg.prefill_chunk : turn_rows - e->prefill_rows_run;
    const int unit_rows = rows_left < e->cfg.prefill_chunk ? rows_left : e->cfg.prefill_chunk;
    int rows = 0;
    rp_engine_command c = RWKVPIPE__ENGINE_COMMAND__INIT;
    int n_targets = 0;
    c.kind = RWKVPIPE__ENGINE_COMMAND__KIND__UNIT;
    c.unit_id = ++e->next_unit_id;
    if (do_prefill) {
        n = 0;
        for (int i = 0; i < n_pf; i++) {
            rp_job *j = e->slot_job[pf[i]];
            int len = prefill_end(j) - j->prefilled;
            if (len > e->cfg.prefill_chunk) len = e->cfg.prefill_chunk;
            if (n > 0 && (j->params.score_prompt || n_targets > 0 || rows + len > unit_rows))
                continue;
            slots[n] = pf[i];
            lengths[n] = len;
            /* The last chunk's last row gives the first token (unless max 0). */
            sample[n] = j->prefilled + len == j->n_prompt && j->params.max_tokens > 0;
            /* Scoring the prompt: row r predicts the prompt token after it. */
            if (j->params.score_prompt) {
                n_targets = j->n_prompt - (j->prefilled + 1);
                if (n_targets > len) n_targets = len;
                c.targets = (int32_t *)j->prompt + j->prefilled + 1;
                c.target_pos = j->prefilled + 1;
                if (n_targets == 0) n_targets = -1;  /* still alone */
            }
            n++;
            rows += len;
            if (n_targets != 0) break;
        }
        if (n == 1) {
            const rp_job *j = e->slot_job[slots[0]];
            tokens = j->prompt + j->prefilled;
        } else {
            for (int i = 0, r = 0; i < n; r += lengths[i++]) {
                const rp_job *j = e->slot_job[slots[i]];
                memcpy(e->prefill_tokens + r, j->prompt + j->prefilled,
                       (size_t)lengths[i] * sizeof(int32_t));
            }
            tokens = e->prefill_tokens;
        }
        for (int i = 0; i < n; i++) e->slot_job[slots[i]]->prefilled += lengths[i];
        pthread_mutex_lock(&e->mu);
        e->tokens_prefilled += rows;
        e->prefill_units++;
        e->prefill_seqs += n;
        pthread_mutex_unlock(&e->mu);
    } else {
        tokens = tokens_buf;
        if (n > e->largest_group) e->largest_group = n;
        pthread_mutex_lock(&e->mu);
        e->decode_units++;
        e->decode_rows += n;
        pthread_mutex_unlock(&e->mu);
    }
    e->prefill_rows_run = do_prefill ? e->prefill_rows_run + rows : 0;
    e->rr_cursor = (slots[n - 1] + 1) % S;
    for (int i = 0; i < n; i++) {
        rp_job *j = e->slot_job[slots[i]];
        j->in_flight = 1;
        if (!do_prefill) j->has_pending = 0;
        e->slot_tokens[slots[i]] += (uint64_t)lengths[i];
    }
    c.n_targets = (size_t)(n_targets > 0 ? n_targets : 0);
    if (c.n_targets == 0) c.targets = NULL;
    c.n_slots = c.n_lengths = c.n_sample = (size_t)n;
    c.slots = slots;
    c.lengths = lengths;
    c.sample = sample;
    int32_t *s_out = e->g_s_out, *t_out = e->g_t_out;
    int n_sampled = 0;
    double busy = 0;
    *st = rp_engine_run_unit(e, &c, tokens, s_out, t_out, &n_sampled, &busy, err);
    if (*st != RP_OK) return 0;
    if (e->n_stages == 1) {
        account_busy(e, &busy, 1);
        finish_unit(e, slots, n, s_out, t_out, n_sampled, e->unit_lp, e->n_unit_lp);
        return 1;
    }
    size_t unit_rows_sent = 0;
    for (int i = 0; i < n; i++) unit_rows_sent += (size_t)lengths[i];
    c.n_busy_seconds = 1;
    c.busy_seconds = &busy;
    if (!rec->slots && !(rec->slots = malloc(sizeof(int32_t) * (size_t)e->group_max))) {
        *st = rp_error_set(err, RP_ERR_NOMEM, "unit table");
        return 0;
    }
    rec->id = c.unit_id;
    rec->n = n;
    memcpy(rec->slots, slots, sizeof(int32_t) * (size_t)n);
    *st = rp_engine_forward(e, &c, e->ws.x, e->ws.v_first, unit_rows_sent, err);
    if (*st != RP_OK) return 0;
    e->units_in_flight++;
    return 1;
}

rp_status rp_engine_collect(rp_engine *e, int block, rp_error *err) {
    rp_unit_table *t = &e->units;
    while (e->units_in_flight > 0) {
        void *buf;
        size_t count;
        rp_status st = rp_transport_recv_message(&e->tp, e->n_stages - 1, RP_MSG_RESULT, 0,
                                                 block ? RP_MSG_WAIT : RP_MSG_POLL, &buf, &count,
                                                 NULL, err);
        if (st != RP_OK) return st;
        if (!buf) return RP_OK;
        Rwkvpipe__EngineResult *r = rwkvpipe__engine_result__unpack(NULL, count, buf);
        free(buf);
        if (!r) return rp_error_set(err, RP_ERR_FORMAT, "rank 0: undecodable engine result");
        int found = -1;
        for (int i = 0; i < t->n; i++)
            if (t->r[i].id == r->unit_id) found = i;
        if (found < 0) {
            rwkvpipe__engine_result__free_unpacked(r, NULL);
            return rp_error_set(err, RP_ERR_INTERNAL, "rank 0: result for unknown unit %llu",
                                (unsigned long long)r->unit_id);
        }
        account_busy(e, r->busy_seconds, r->n_busy_seconds);
        rp_unit_logprob *lps = r->n_logprobs ? calloc(r->n_logprobs, sizeof *lps) : NULL;
        int n_lps = 0;
        for (size_t k = 0; lps && k < r->n_logprobs; k++) {
            const Rwkvpipe__TokenLogprob *q = r->logprobs[k];
            rp_unit_logprob *u = &lps[n_lps++];
            u->slot = q->slot;
            u->pos = q->pos;
            u->lp.token = q->token;
            u->lp.logprob = q->logprob;
            size_t nt = q->n_top_ids < q->n_top_logprobs ? q->n_top_ids : q->n_top_logprobs;
            if (nt > RP_LOGPROBS_MAX) nt = RP_LOGPROBS_MAX;
            u->lp.n_top = (int)nt;
            if (nt > 0) { /* protobuf-c leaves empty arrays NULL */
                memcpy(u->lp.top_ids, q->top_ids, nt * sizeof(int32_t));
                memcpy(u->lp.top_logprobs, q->top_logprobs, nt * sizeof(float));
            }
        }
        finish_unit(e, t->r[found].slots, t->r[found].n, r->slots, r->tokens, (int)r->n_slots,
                    lps, n_lps);
        free(lps);
        /* Swapped, not overwritten: each record keeps its own slots buffer. */
        const rp_unit_record done = t->r[found];
        t->r[found] = t->r[--t->n];
        t->r[t->n] = done;
        e->units_in_flight--;
        rwkvpipe__engine_result__free_unpacked(r, NULL);
        block = 0;
    }
    return RP_OK;
}

int rp_engine_step(rp_engine *e, rp_error *err, rp_status *status) {
    *status = RP_OK;
    rp_status st = RP_OK;
    const int S = e->cfg.n_slots;
    rp_unit_table *t = &e->units;
    if (e->stage != 0) {
        *status = rp_error_set(err, RP_ERR_INTERNAL, "rp_engine_step runs on rank 0");
        return 0;
    }
    /* Shutdown: cancel everything queued or running. */
    if (e->shutdown_requested && !e->shutdown_started) {
        e->shutdown_started = 1;
        pthread_mutex_lock(&e->mu);
        while (e->queue_head) {
            rp_job *j = e->queue_head;
            e->queue_head = j->next;
            rp_job_finish(j, RP_FINISH_CANCELLED, NULL);
            rp_job_release(j);
        }
        e->queue_tail = NULL;
        e->n_queued = 0;
        pthread_mutex_unlock(&e->mu);
        for (int s = 0; s < S; s++)
            if (e->slot_job[s]) rp_job_cancel(e->slot_job[s]);
    }
    /* Session operations need an empty pipeline. */
    pthread_mutex_lock(&e->mu);
    int controls_waiting = e->controls != NULL;
    pthread_mutex_unlock(&e->mu);
    if (controls_waiting && e->units_in_flight == 0) {
        if ((st = rp_engine_run_controls(e, err)) != RP_OK) goto fail;
    }
    /* Admission: queued jobs take free slots. */
    for (int s = 0; s < S && !controls_waiting; s++) {
        if (e->slot_job[s]) continue;
        pthread_mutex_lock(&e->mu);
        rp_job *j = e->queue_head;
        if (j) {
            e->queue_head = j->next;
            if (!e->queue_head) e->queue_tail = NULL;
            e->n_queued--;
            e->n_slots_used++;  /* slot s is this job's from now on (or given back below) */
        }
        int known = j && (!j->start_session[0] || rp_engine_session_find(e, j->start_session));
        if (j && known && j->start_session[0])
            rp_engine_session_find(e, j->start_session)->last_used = ++e->clock;
        /* A job still closing may be about to store the session this one
         * starts from (a chat's next turn right after the previous one): wait. */
        int pending_store = 0;
        for (int k = 0; j && !known && k < S; k++)
            pending_store |= e->slot_job[k] && e->slot_job[k]->closing &&
                             strcmp(e->slot_job[k]->store_session, j->start_session) == 0;
        if (pending_store) {
            j->next = e->queue_head;
            e->queue_head = j;
            if (!e->queue_tail) e->queue_tail = j;
            e->n_queued++;
            e->n_slots_used--;
            j = NULL;
        }
        pthread_mutex_unlock(&e->mu);
        if (!j) break;
        if (rp_job_cancel_state(j)) {
            engine_slot_unused(e);
            rp_job_finish(j, RP_FINISH_CANCELLED, NULL);
            rp_job_release(j);
            s--;
            continue;
        }
        if (!known) {
            char msg[256];
            snprintf(msg, sizeof msg, "unknown session '%s'", j->start_session);
            engine_slot_unused(e);
            rp_job_finish(j, RP_FINISH_ERROR, msg);
            rp_job_release(j);
            s--;
            continue;
        }
        Rwkvpipe__EngineSampling sampling;
        make_sampling(&sampling, &j->params);
        rp_engine_command c = RWKVPIPE__ENGINE_COMMAND__INIT;
        c.kind = RWKVPIPE__ENGINE_COMMAND__KIND__OPEN_SLOT;
        c.slot = s;
        c.session = j->start_session;
        c.sampling = &sampling;
        rp_engine_session *from =
            j->start_session[0] ? rp_engine_session_find(e, j->start_session) : NULL;
        e->slot_tokens[s] = from ? from->tokens : 0;
        /* The prefix cache, keyed by the state a prompt starts from (zero,
         * or a stored session's current version): not for a session that
         * continues itself (its own state is the cache, and its version
         * changes every turn). A copy of a shared prompt gets its state from
         * the first, and a job that scores its prompt reads all of it: they
         * store their states but resume from none. */
        j->prefix_on = e->prefix.budget > 0 && j->n_prompt >= 2 &&
                       !(j->start_session[0] && j->store_session[0]);
        j->prefix_origin = from ? from->version : 0;
        int hit_len = 0;
        if (j->prefix_on && !j->params.score_prompt && !j->fork_of)
            c.prefix_id = rp_prefix_cache_lookup(&e->prefix, j->prefix_origin, j->prompt,
                                                 j->n_prompt - 1, &hit_len);
        st = rp_engine_issue(e, &c, err);
        if (st != RP_OK) goto fail;
        if (c.prefix_id) {
            j->prefilled = hit_len;
            e->slot_tokens[s] = (uint64_t)hit_len;
            pthread_mutex_lock(&e->mu);
            e->prefix_hits++;
            e->prefix_saved += hit_len;
            pthread_mutex_unlock(&e->mu);
        }
        pthread_mutex_lock(&j->mu);
        j->t_slot = rp_now_seconds();
        j->session_continued = from != NULL;
        j->cached_tokens = c.prefix_id ? hit_len : 0;
        pthread_mutex_unlock(&j->mu);
        j->slot = s;
        e->slot_job[s] = j;
        j->fork_wait = j->fork_of != NULL;
    }
    /* Cancelled and finished jobs give their slot back. */
    for (int s = 0; s < S; s++) {
        rp_job *j = e->slot_job[s];
        if (!j || j->in_flight) continue;
        rp_job_cancel_reason cancel = rp_job_cancel_state(j);
        if (!j->closing && cancel == RP_JOB_CANCEL_CLIENT) {
            rp_job_finish(j, RP_FINISH_CANCELLED, NULL);
            j->closing = 1;
        } else if (!j->closing && cancel == RP_JOB_CANCEL_STOP) {
            job_end(j, RP_FINISH_STOP);
        }
        if (!j->closing && j->prefilled == j->n_prompt && j->params.max_tokens == 0)
            job_end(j, RP_FINISH_LENGTH);
        if (!j->closing) continue;
        /* A job that keeps its session first reads its last emitted token. */
        const int ok_end = cancel != RP_JOB_CANCEL_CLIENT && j->prefilled == j->n_prompt;
        const int stash = j->store_session[0] && ok_end;
        /* it reads its last token first (for the prefix cache too) */
        if ((stash || (j->prefix_on && ok_end)) && j->has_pending) continue;
        st = close_slot(e, s, stash, err);
        if (st != RP_OK) goto fail;
    }
    if ((st = resolve_forks(e, err)) != RP_OK) goto fail;
    if ((st = prefix_points(e, err)) != RP_OK) goto fail;
    /* Keep up to P units in flight. */
    e->launched_any = 0;
    /* At most P launches per step, so admissions and cancels interleave
     * (with one stage every unit completes inside launch_unit). */
    for (int launches = 0; e->units_in_flight < e->n_stages && launches < e->n_stages;
         launches++) {
        if (t->n == t->cap) {
            int cap = t->cap ? 2 * t->cap : 8;
            rp_unit_record *grown = realloc(t->r, sizeof *grown * (size_t)cap);
            if (!grown) {
                st = rp_error_set(err, RP_ERR_NOMEM, "unit table");
                goto fail;
            }
            memset(grown + t->cap, 0, sizeof *grown * (size_t)(cap - t->cap));
            t->r = grown;
            t->cap = cap;
        }
        int launched = launch_unit(e, &t->r[t->n], &st, err);
        if (st != RP_OK) goto fail;
        if (!launched) break;
        e->launched_any = 1;
        if (e->n_stages > 1) t->n++;
        if ((st = rp_engine_collect(e, 0, err)) != RP_OK) goto fail;
    }
    if (e->n_stages > 1 && (st = rp_engine_collect(e, 0, err)) != RP_OK) goto fail;
    pthread_mutex_lock(&e->mu);
    int busy = e->n_queued > 0 || e->controls != NULL;
    pthread_mutex_unlock(&e->mu);
    for (int s = 0; s < S; s++) busy |= e->slot_job[s] != NULL;
    return busy || e->units_in_flight > 0;
fail:
    rp_engine_fail_controls(e, RP_ENGINE_STOP_FAILED, err ? err->msg : rp_status_name(st));
    *status = st;
    return 0;
}

rp_status rp_engine_run(rp_engine *e, rp_error *err) {
    if (e->stage != 0) return rp_engine_stage_loop(e, err);
    for (;;) {
        rp_status st;
        int active = rp_engine_step(e, err, &st);
        if (st != RP_OK) return st;
        if (e->shutdown_requested && !active) break;
        if (!active) {
            /* Idle: sleep until a client submits (or 20 ms pass). */
            pthread_mutex_lock(&e->mu);
            if (!e->queue_head && !e->controls && !e->shutdown_requested) {
                struct timespec until;
                clock_gettime(CLOCK_REALTIME, &until);
                until.tv_nsec += 20000000L;
                if (until.tv_nsec >= 1000000000L) {
                    until.tv_sec++;
                    until.tv_nsec -= 1000000000L;
                }
                pthread_cond_timedwait(&e->wake, &e->mu, &until);
            }
            pthread_mutex_unlock(&e->mu);
        } else if (e->units_in_flight > 0 &&
                   (e->units_in_flight >= e->n_stages || !e->launched_any)) {
            /* The pipe is full, or nothing else can start before a result
             * comes back: wait for it instead of spinning. */
            rp_status cst = rp_engine_collect(e, 1, err);
            if (cst != RP_OK) {
                rp_engine_fail_controls(e, RP_ENGINE_STOP_FAILED,
                                        err ? err->msg : rp_status_name(cst));
                return cst;
            }
        }
    }
    /* A control queued after the last step is answered, not left waiting. */
    rp_engine_fail_controls(e, RP_ENGINE_STOP_SHUTDOWN, "the server is shutting down");
    /* Every stage stops; the last one acknowledges, so none is left behind. */
    if (e->n_stages > 1) {
        rp_engine_command c = RWKVPIPE__ENGINE_COMMAND__INIT;
        c.kind = RWKVPIPE__ENGINE_COMMAND__KIND__SHUTDOWN;
        rp_status st = rp_engine_forward(e, &c, NULL, NULL, 0, err);
        if (st == RP_OK) st = rp_engine_flush(e, err);
        if (st != RP_OK) return st;
        /* The acknowledgement gets 30 s whatever --comm-timeout says: the
         * stages have nothing left to compute. */
        void *buf;
        size_t count;
        const double timeout = e->tp.timeout_s;
        e->tp.timeout_s = 30;
        st = rp_transport_recv_message(&e->tp, e->n_stages - 1, RP_MSG_RESULT, 0, RP_MSG_WAIT,
                                       &buf, &count, NULL, err);
        e->tp.timeout_s = timeout;
        if (st != RP_OK) return rp_error_prefix(err, "the last stage's shutdown acknowledgement");
        free(buf);
    }
    return RP_OK;
}

void rp_engine_shutdown(rp_engine *e) {
    e->shutdown_requested = 1;
    /* No lock here (async-signal-safe); the idle wait wakes within 20 ms. */
}

void rp_engine_get_metrics(rp_engine *e, rp_engine_metrics *m) {
    memset(m, 0, sizeof *m);
    pthread_mutex_lock(&e->mu);
    const double now = rp_now_seconds();
    m->requests_total = e->requests_total;
    m->requests_queued = e->n_queued;
    m->tokens_generated = e->tokens_generated;
    m->tokens_prefilled = e->tokens_prefilled;
    m->prefill_units = e->prefill_units;
    m->prefill_seqs = e->prefill_seqs;
    m->decode_units = e->decode_units;
    m->decode_rows = e->decode_rows;
    m->slots_total = e->cfg.n_slots;
    m->n_stages = e->n_stages;
    m->sessions_stored = e->n_sessions;
    m->prefix_cache_hits = e->prefix_hits;
    m->prefix_cache_tokens_saved = e->prefix_saved;
    m->prefix_cache_bytes = e->prefix.bytes;
    m->uptime_seconds = now - e->t_start;
    /* Rates over the time since the previous reading, once at least 1 s
     * has passed (a faster scraper sees the last values). */
    const double dt = now - e->t_mark;
    if (dt >= 1.0) {
        for (int s = 0; s < e->n_stages; s++) {
            e->busy_frac[s] = (e->busy_total[s] - e->busy_mark[s]) / dt;
            e->busy_mark[s] = e->busy_total[s];
        }
        e->tokens_rate = (double)(e->tokens_generated - e->tokens_mark) / dt;
        e->tokens_mark = e->tokens_generated;
        e->t_mark = now;
    }
    m->tokens_per_second = e->tokens_rate;
    for (int s = 0; s < e->n_stages && s < 64; s++) m->stage_busy[s] = e->busy_frac[s];
    pthread_mutex_unlock(&e->mu);
    /* Slots are the main thread's: a racy read is fine for a gauge. */
    for (int s = 0; s < e->cfg.n_slots; s++) m->slots_active += e->slot_job[s] != NULL;
    m->requests_active = m->slots_active;
}
