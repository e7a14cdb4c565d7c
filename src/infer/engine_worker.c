/* The stage side of the generation engine (engine.h): the command stream
 * each stage follows (units, slot and session commands, shutdown), the
 * compute of one unit on this stage's layers, and the last stage's sampling.
 * Every byte between stages goes through the transport (pipe/transport.h):
 * commands and results as variable-size messages, x / v_first as transfers
 * tagged with the unit, session states as RP_MSG_STATE messages. */
#include <math.h>
#include <omp.h>
#include <stdlib.h>
#include <string.h>

#include "infer/engine_internal.h"
#include "text/json_mask.h"
#include "core/clock.h"

static float *slot_state(rp_engine *e, int slot) {
    return e->state.data + (size_t)slot * e->state.floats_per_slot;
}

/* A unit's id in a transfer tag (tags wrap; at most P units are in flight). */
static int unit_tag(uint64_t unit_id) { return (int)(unit_id % RP_TRANSPORT_TAG_SPAN); }

/* ---- commands ---- */

static size_t pack_command(rp_engine_outgoing *o, const rp_engine_command *c) {
    size_t n = rwkvpipe__engine_command__get_packed_size(c);
    if (n > o->packed_cap) {
        uint8_t *grown = realloc(o->packed, n);
        if (!grown) return 0;
        o->packed = grown;
        o->packed_cap = n;
    }
    rwkvpipe__engine_command__pack(c, o->packed);
    return n;
}

static rp_status wait_outgoing(rp_engine *e, rp_engine_outgoing *o, rp_error *err) {
    rp_status first = RP_OK;
    /* Every transfer is completed or cancelled before the slot is reused. */
    for (int i = 0; i < 3; i++) {
        rp_status st = rp_transport_wait(&e->tp, &o->xfer[i], first == RP_OK ? err : NULL);
        if (first == RP_OK) first = st;
    }
    return first;
}

rp_status rp_engine_flush(rp_engine *e, rp_error *err) {
    rp_status st = RP_OK;
    for (int i = 0; st == RP_OK && e->has_tp && i < e->n_out; i++)
        st = wait_outgoing(e, &e->out[i], err);
    return st;
}

rp_status rp_engine_forward(rp_engine *e, const rp_engine_command *c, const float *x,
                            const float *v, size_t rows, rp_error *err) {
    if (e->is_last || !e->has_tp) return RP_OK;
    rp_engine_outgoing *o = &e->out[e->out_next];
    e->out_next = (e->out_next + 1) % e->n_out;
    rp_status st = wait_outgoing(e, o, err);
    if (st != RP_OK) return st;
    size_t n = pack_command(o, c);
    if (n == 0 && rwkvpipe__engine_command__get_packed_size(c) != 0)
        return rp_error_set(err, RP_ERR_NOMEM, "engine command buffer");
    const int next = e->stage + 1;
    st = rp_transport_post_send_message(&e->tp, o->packed, n, next, RP_MSG_CONTROL, 0,
                                        &o->xfer[0], err);
    if (st != RP_OK || !x) return st;
    const size_t bytes = rows * (size_t)e->m->cfg.n_embd * sizeof(float);
    e->be->copy(e->be, o->x, x, bytes);
    e->be->copy(e->be, o->v, v, bytes);
    const int mb = unit_tag(c->unit_id);
    st = rp_transport_post_send(&e->tp, o->x, bytes, next, RP_MSG_ACT, mb, &o->xfer[1], err);
    if (st == RP_OK)
        st = rp_transport_post_send(&e->tp, o->v, bytes, next, RP_MSG_ACT_VFIRST, mb,
                                    &o->xfer[2], err);
    return st;
}

/* Waits for the next command from the previous stage. Idle servers wait
 * forever (no watchdog), polling slowly so they cost little. */
static rp_engine_command *receive_command(rp_engine *e, rp_error *err) {
    void *buf;
    size_t count;
    if (rp_transport_recv_message(&e->tp, e->stage - 1, RP_MSG_CONTROL, 0, RP_MSG_WAIT_IDLE,
                                  &buf, &count, NULL, err) != RP_OK)
        return NULL;
    rp_engine_command *c = rwkvpipe__engine_command__unpack(NULL, count, buf);
    free(buf);
    if (!c)
        rp_error_set(err, RP_ERR_FORMAT, "stage %d: undecodable engine command from stage %d",
                     e->stage, e->stage - 1);
    return c;
}

/* ---- sampling (last stage) ---- */

void rp_engine_set_vocab(rp_engine *e, const struct rp_token_trie *trie) { e->trie = trie; }

/* A compiled grammar and its mask cache, shared by every job that asks for the same
 * response_format (kind, schema text, end tokens): a server answering many requests with one
 * schema computes each state's mask once, not once per request. The engine owns them; a
 * slot holds a reference while its job runs, and unreferenced ones are reused LRU. Sampling
 * runs on the last stage's main thread, one slot after another, for units with a grammar
 * (sample_rows), so the caches need no lock. */
struct rp_grammar_entry {
    int kind;
    char *text;
    int32_t end[RP_ENGINE_MAX_STOP_TOKENS];
    int n_end;
    rp_json_grammar *grammar;
    rp_json_mask *mask;
    int refs;
    uint64_t used;
};

/* Masks per grammar: the states a document passes through repeat (the same keys, the same
 * string contexts; a string with a maxLength has a state per length so far); a mask of a
 * 65536-token vocabulary is 8 KiB, allocated when its state first comes: at most 2 MiB. */
#define GRAMMAR_MASK_CACHE 256

static void grammar_entry_clear(rp_grammar_entry *g) {
    rp_json_mask_free(g->mask);
    rp_json_grammar_free(g->grammar);
    free(g->text);
    memset(g, 0, sizeof *g);
}

void rp_engine_grammars_free(rp_engine *e) {
    for (int i = 0; i < e->n_grammars; i++) grammar_entry_clear(&e->grammars[i]);
    free(e->grammars);
    e->grammars = NULL;
    e->n_grammars = 0;
}

static void grammar_close(rp_slot_sampling *s) {
    if (s->gentry) s->gentry->refs--;
    s->gentry = NULL;
    s->gmask = NULL;
    s->grammar = NULL;
    s->grammar_failed = 0;
}

void rp_slot_sampling_free(rp_slot_sampling *s) {
    grammar_close(s);
    free(s->occ);
    free(s->bias_ids);
    free(s->bias_values);
}

static int grammar_matches(const rp_grammar_entry *g, const Rwkvpipe__EngineSampling *p) {
    if (!g->grammar || g->kind != p->grammar || g->n_end != (int)p->n_grammar_end) return 0;
    if (p->grammar == RP_GRAMMAR_JSON_SCHEMA && strcmp(g->text, p->grammar_schema) != 0) return 0;
    for (int i = 0; i < g->n_end; i++)
        if (g->end[i] != p->grammar_end[i]) return 0;
    return 1;
}

/* The entry for p's grammar: a matching one, else a free or the least recently used
 * unreferenced one, compiled anew (the server checked the schema already, so a failure here
 * is out of memory or a missing vocabulary). NULL on failure. */
static rp_grammar_entry *grammar_entry(rp_engine *e, const Rwkvpipe__EngineSampling *p) {
    if (!e->trie || (p->grammar == RP_GRAMMAR_JSON_SCHEMA && !p->grammar_schema) ||
        p->n_grammar_end > RP_ENGINE_MAX_STOP_TOKENS)
        return NULL;
    if (!e->grammars) {
        /* each slot references at most one: n_slots + 4 always leave one to reuse */
        e->n_grammars = e->cfg.n_slots + 4;
        if (!(e->grammars = calloc((size_t)e->n_grammars, sizeof *e->grammars))) {
            e->n_grammars = 0;
            return NULL;
        }
    }
    rp_grammar_entry *victim = NULL;
    for (int i = 0; i < e->n_grammars; i++) {
        rp_grammar_entry *g = &e->grammars[i];
        if (grammar_matches(g, p)) return g;
        if (g->refs == 0 && (!victim || (victim->grammar && (!g->grammar || g->used < victim->used))))
            victim = g;
    }
    if (!victim) return NULL;
    grammar_entry_clear(victim);
    rp_status st = RP_ERR_ARG;
    if (p->grammar == RP_GRAMMAR_JSON_OBJECT) st = rp_json_grammar_object(&victim->grammar, NULL);
    else if (p->grammar == RP_GRAMMAR_JSON_SCHEMA &&
             (victim->text = strdup(p->grammar_schema)) != NULL)
        st = rp_json_grammar_schema(&victim->grammar, p->grammar_schema, strlen(p->grammar_schema), NULL);
    if (st == RP_OK)
        st = rp_json_mask_create(&victim->mask, victim->grammar, e->trie, e->m->cfg.vocab_size,
                                 p->grammar_end, (int)p->n_grammar_end, GRAMMAR_MASK_CACHE, NULL);
    if (st != RP_OK) {
        grammar_entry_clear(victim);
        return NULL;
    }
    victim->kind = p->grammar;
    victim->n_end = (int)p->n_grammar_end;
    for (int i = 0; i < victim->n_end; i++) victim->end[i] = p->grammar_end[i];
    return victim;
}

/* response_format: the job's grammar; a failure ends the job at its first token. */
static void grammar_open(rp_engine *e, rp_slot_sampling *s, const Rwkvpipe__EngineSampling *p) {
    grammar_close(s);
    if (!p || p->grammar == RP_GRAMMAR_NONE) return;
    rp_grammar_entry *g = grammar_entry(e, p);
    if (!g) {
        s->grammar_failed = 1;
        return;
    }
    g->refs++;
    g->used = ++e->grammar_clock;
    s->gentry = g;
    s->grammar = g->grammar;
    s->gmask = g->mask;
    rp_json_start(s->grammar, &s->gstate);
}

static void sampling_open(rp_engine *e, int slot, const Rwkvpipe__EngineSampling *p) {
    rp_slot_sampling *s = &e->sampling[slot];
    grammar_open(e, s, p);
    s->sampler.temperature = p ? p->temperature : 1.0f;
    s->sampler.top_p = p ? p->top_p : 1.0f;
    s->sampler.top_k = p ? p->top_k : 0;
    s->sampler.seed = p ? p->seed : 0;
    s->presence = p ? p->presence_penalty : 0;
    s->frequency = p ? p->frequency_penalty : 0;
    s->decay = p ? p->penalty_decay : 1;
    s->n_banned = 0;
    for (size_t i = 0; p && i < p->n_banned && i < RP_ENGINE_MAX_BANNED; i++)
        s->banned[s->n_banned++] = p->banned[i];
    s->step = 0;
    s->penalized = s->presence != 0 || s->frequency != 0;
    if (s->penalized) memset(s->occ, 0, sizeof(float) * (size_t)e->m->cfg.vocab_size);
    s->logprobs = p && p->logprobs;
    s->top_logprobs = p ? p->top_logprobs : 0;
    if (s->top_logprobs < 0) s->top_logprobs = 0;
    if (s->top_logprobs > RP_LOGPROBS_MAX) s->top_logprobs = RP_LOGPROBS_MAX;
    s->score_prompt = p && p->score_prompt;
    free(s->bias_ids);
    free(s->bias_values);
    s->bias_ids = NULL;
    s->bias_values = NULL;
    s->n_bias = 0;
    size_t nb = p && p->n_bias_ids == p->n_bias_values ? p->n_bias_ids : 0;
    if (nb > 0) {
        s->bias_ids = malloc(nb * sizeof *s->bias_ids);
        s->bias_values = malloc(nb * sizeof *s->bias_values);
        if (s->bias_ids && s->bias_values) {
            memcpy(s->bias_ids, p->bias_ids, nb * sizeof *s->bias_ids);
            memcpy(s->bias_values, p->bias_values, nb * sizeof *s->bias_values);
            s->n_bias = (int)nb;
        }
    }
}

/* The log-softmax of a row of raw logits at token, in double with the
 * maximum subtracted, and the top most likely tokens (a partial selection:
 * top <= RP_LOGPROBS_MAX, one pass). */
static void row_logprob(const float *row, int V, int32_t token, int top, rp_token_logprob *out) {
    double mx = -INFINITY;
    for (int t = 0; t < V; t++)
        if (row[t] > mx) mx = row[t];
    double sum = 0;
    for (int t = 0; t < V; t++) sum += exp((double)row[t] - mx);
    const double lse = mx + log(sum);
    out->token = token;
    out->logprob = token >= 0 && token < V ? (float)((double)row[token] - lse) : 0.0f;
    out->n_top = 0;
    for (int t = 0; t < V && top > 0; t++) {
        int n = out->n_top;
        if (n == top && !(row[t] > row[out->top_ids[n - 1]])) continue;
        int k = n < top ? n : n - 1;  /* insertion point, dropping the last when full */
        while (k > 0 && row[t] > row[out->top_ids[k - 1]]) {
            out->top_ids[k] = out->top_ids[k - 1];
            k--;
        }
        out->top_ids[k] = t;
        if (n < top) out->n_top++;
    }
    for (int i = 0; i < out->n_top; i++)
        out->top_logprobs[i] = (float)((double)row[out->top_ids[i]] - lse);
}

static void unit_logprob(rp_engine *e, int slot, int pos, const float *row, int32_t token,
                         int top) {
    rp_unit_logprob *u = &e->unit_lp[e->n_unit_lp++];
    u->slot = slot;
    u->pos = pos;
    row_logprob(row, e->m->cfg.vocab_size, token, top, &u->lp);
}

/* Samples slot's next token from its row of logits (changed in place).
 * scratch: rp_sampler_scratch_bytes. Touches only the slot's own sampling
 * state, except with logprobs (e->lp_row, e->unit_lp) or a grammar (its
 * shared mask cache): sample_rows runs those on one thread. */
static int32_t sample_slot(rp_engine *e, int slot, float *logits, void *scratch) {
    rp_slot_sampling *s = &e->sampling[slot];
    const int V = e->m->cfg.vocab_size;
    /* logprobs are of the raw logits: kept before penalties and bias change them */
    if (s->logprobs) memcpy(e->lp_row, logits, sizeof(float) * (size_t)V);
    if (s->grammar_failed) return RP_SAMPLE_NONE;
    if (s->grammar) {
        /* Tokens that cannot continue the document get -inf before anything else: bias and
         * penalties add finite amounts, so they stay out. */
        const uint64_t *allowed = rp_json_mask_get(s->gmask, &s->gstate);
        if (!allowed) return RP_SAMPLE_NONE;
        for (int w = 0; w * 64 < V; w++) {
            uint64_t bits = allowed[w];
            if (bits == ~0ull) continue;
            const int end = w * 64 + 64 < V ? w * 64 + 64 : V;
            for (int t = w * 64; t < end; t++)
                if (!((bits >> (t & 63)) & 1)) logits[t] = -INFINITY;
        }
    }
    for (int i = 0; i < s->n_bias; i++) logits[s->bias_ids[i]] += s->bias_values[i];
    if (s->penalized)
        for (int t = 0; t < V; t++)
            if (s->occ[t] > 0) logits[t] -= s->presence + s->occ[t] * s->frequency;
    int tok = rp_sample(logits, V, &s->sampler, s->step, s->banned, s->n_banned, scratch);
    s->step++;
    /* An end token ends the job; any other advances the document (the mask allowed it). */
    if (s->grammar && tok >= 0 && rp_json_feed_token(s->grammar, e->trie, &s->gstate, tok) != RP_JSON_OK)
        rp_json_start(s->grammar, &s->gstate);
    if (s->penalized && tok >= 0) {
        for (int t = 0; t < V; t++) s->occ[t] *= s->decay;
        s->occ[tok] += 1;
    }
    if (s->logprobs && tok >= 0) unit_logprob(e, slot, -1, e->lp_row, tok, s->top_logprobs);
    return tok;
}

/* Samples the unit's rows that ask for it (logits [n_seq, V], changed in
 * place) into slots_out / tokens_out, in row order. Each row's token depends
 * on its row and its slot only, so the rows go to e->sample_threads threads
 * (64 rows of 65 536 logits: ~4 ms on one, while the backend's threads
 * wait) and the results are the same on any count. Rows with logprobs or a
 * grammar share engine buffers: a unit with any of them runs on one. */
static void sample_rows(rp_engine *e, const rp_engine_command *c, int n_seq, float *logits,
                        int32_t *slots_out, int32_t *tokens_out, int *n_sampled) {
    const size_t V = (size_t)e->m->cfg.vocab_size;
    const int *slot = e->g_slot;
    int rows = 0, shared = 0;
    for (int i = 0; i < n_seq; i++) {
        if (!(c->n_sample > (size_t)i && c->sample[i])) continue;
        const rp_slot_sampling *s = &e->sampling[slot[i]];
        rows++;
        shared |= s->logprobs || s->grammar != NULL;
    }
    int nt = shared || rows < 2 ? 1 : e->sample_threads;
    if (nt > rows) nt = rows;
    int32_t *tok = e->g_sampled;
    char *scratch = e->sampler_scratch;
    const size_t stride = e->sampler_scratch_stride;
#pragma omp parallel for schedule(dynamic, 1) num_threads(nt) if (nt > 1)
    for (int i = 0; i < n_seq; i++) {
        if (!(c->n_sample > (size_t)i && c->sample[i])) continue;
        tok[i] = sample_slot(e, slot[i], logits + (size_t)i * V,
                             scratch + (size_t)omp_get_thread_num() * stride);
    }
    for (int i = 0; i < n_seq; i++) {
        if (!(c->n_sample > (size_t)i && c->sample[i])) continue;
        slots_out[*n_sampled] = slot[i];
        tokens_out[(*n_sampled)++] = tok[i];
    }
}

/* The buffers of a prefill chunk's every-row logits (a slot that scores its
 * prompt), allocated at the first such chunk. */
static rp_status logits_all_buffers(rp_engine *e, rp_error *err) {
    if (e->logits_all_dev) return RP_OK;
    const size_t bytes = e->max_rows * (size_t)e->m->cfg.vocab_size * sizeof(float);
    e->logits_all_dev = e->be->alloc(e->be, bytes);
    e->logits_all_host = malloc(bytes);
    if (e->logits_all_dev && e->logits_all_host) return RP_OK;
    if (e->logits_all_dev) e->be->free(e->be, e->logits_all_dev);
    free(e->logits_all_host);
    e->logits_all_dev = NULL;
    e->logits_all_host = NULL;
    return rp_error_set(err, RP_ERR_NOMEM, "stage %d: %zu bytes of logits for a prompt's "
                        "logprobs (lower --prefill-chunk)", e->stage, bytes);
}

/* ---- units ---- */

rp_status rp_engine_run_unit(rp_engine *e, const rp_engine_command *c, const int32_t *tokens,
                             int32_t *slots_out, int32_t *tokens_out, int *n_sampled,
                             double *busy, rp_error *err) {
    const rp_model *m = e->m;
    rp_backend *be = e->be;
    const int n_seq = (int)c->n_slots;
    int *seq_len = e->g_seq_len, *slot = e->g_slot, *row_begin = e->g_row_begin;
    if (n_seq < 1 || n_seq > e->group_max || c->n_lengths != c->n_slots)
        return rp_error_set(err, RP_ERR_INTERNAL, "stage %d: unit with %d slots", e->stage, n_seq);
    for (int i = 0; i < n_seq; i++) {
        seq_len[i] = c->lengths[i];
        slot[i] = c->slots[i];
    }
    rp_batch batch;
    rp_batch_init(&batch, n_seq, seq_len, slot, row_begin);
    const double t0 = rp_now_seconds();
    /* A prefill chunk of a slot that scores its prompt: every row's logits,
     * row r scoring the prompt token at target_pos + r. */
    const int scoring =
        m->has_head && n_seq == 1 && c->n_targets > 0 && e->sampling[slot[0]].score_prompt;
    int any = 0;
    for (int i = 0; !scoring && m->has_head && i < n_seq; i++)
        any |= c->n_sample > (size_t)i && c->sample[i];
    /* Embed, layers and (when sampling) the last rows' logits: a decode
     * step replays the backend's graph of it. */
    rp_status st = rp_model_step(m, &e->ws, tokens, &batch, &e->state, any ? e->logits_dev : NULL,
                                 err);
    if (st != RP_OK) return st;
    *n_sampled = 0;
    e->n_unit_lp = 0;
    if (scoring) {
        const int V = m->cfg.vocab_size;
        if ((st = logits_all_buffers(e, err)) != RP_OK) return st;
        rp_model_head(m, &e->ws, &batch, RP_LOGITS_ALL, e->logits_all_dev);
        be->copy_to_host(be, e->logits_all_host, e->logits_all_dev,
                         sizeof(float) * (size_t)seq_len[0] * V);
        const int top = e->sampling[slot[0]].top_logprobs;
        for (size_t r = 0; r < c->n_targets && r < (size_t)seq_len[0]; r++)
            unit_logprob(e, slot[0], c->target_pos + (int)r,
                         e->logits_all_host + r * (size_t)V, c->targets[r], top);
        if (c->n_sample > 0 && c->sample[0]) {
            slots_out[0] = slot[0];
            tokens_out[0] = sample_slot(e, slot[0],
                                        e->logits_all_host + (size_t)(seq_len[0] - 1) * V,
                                        e->sampler_scratch);
            *n_sampled = 1;
        }
    } else if (any) {
        const int V = m->cfg.vocab_size;
        /* Host-memory backends (CPU) sample the logits where the head wrote
         * them: the copy was 16 MiB a step at 64 rows of 65 536. Sampling
         * changes them in place; the next step's head rewrites them. */
        float *logits = e->logits_dev;
        if (!be->is_host_memory) {
            be->copy_to_host(be, e->logits_host, e->logits_dev,
                             sizeof(float) * (size_t)n_seq * V);
            logits = e->logits_host;
        }
        sample_rows(e, c, n_seq, logits, slots_out, tokens_out, n_sampled);
    }
    be->synchronize(be);
    *busy = rp_now_seconds() - t0;
    return be->status(be, err);
}

/* ---- session states between stages ---- */

/* SAVE on a stage > 0: its part goes to rank 0; an absent state is an empty
 * message (rank 0 reports it). */
static rp_status send_state(rp_engine *e, const rp_engine_session *s, rp_error *err) {
    rp_transfer x;
    const size_t bytes = s ? e->state.floats_per_slot * sizeof(float) : 0;
    rp_status st = rp_transport_post_send_message(&e->tp, s ? s->data : NULL, bytes, 0,
                                                  RP_MSG_STATE, 0, &x, err);
    return st != RP_OK ? st : rp_transport_wait(&e->tp, &x, err);
}

/* LOAD on a stage > 0: its part comes from rank 0. */
static rp_status receive_state(rp_engine *e, const char *name, rp_error *err) {
    const size_t want = e->state.floats_per_slot * sizeof(float);
    void *buf;
    size_t bytes;
    rp_status st = rp_transport_recv_message(&e->tp, 0, RP_MSG_STATE, 0, RP_MSG_WAIT, &buf,
                                             &bytes, NULL, err);
    if (st != RP_OK) return st;
    if (bytes != want) {
        free(buf);
        return rp_error_set(err, RP_ERR_INTERNAL, "stage %d: rank 0 sent %zu bytes of session "
                            "'%s', expected %zu", e->stage, bytes, name, want);
    }
    rp_engine_session *s = rp_engine_session_put(e, name);
    if (s) memcpy(s->data, buf, want);
    free(buf);
    return s ? RP_OK : rp_error_set(err, RP_ERR_NOMEM, "session '%s' state", name);
}

/* ---- the prefix state cache (this stage's part of each entry) ---- */

static rp_prefix_state *prefix_find(rp_engine *e, uint64_t id) {
    for (int i = 0; i < e->n_prefix_states; i++)
        if (e->prefix_states[i].id == id) return &e->prefix_states[i];
    return NULL;
}

static rp_status prefix_store(rp_engine *e, int slot, uint64_t id, rp_error *err) {
    const size_t fps = e->state.floats_per_slot;
    if (slot < 0 || slot >= e->cfg.n_slots || id == 0)
        return rp_error_set(err, RP_ERR_INTERNAL, "stage %d: prefix store of slot %d as %llu",
                            e->stage, slot, (unsigned long long)id);
    rp_prefix_state *p = prefix_find(e, id);
    if (!p) {
        if (e->n_prefix_states == e->cap_prefix_states) {
            int cap = e->cap_prefix_states ? 2 * e->cap_prefix_states : 16;
            rp_prefix_state *grown = realloc(e->prefix_states, sizeof *grown * (size_t)cap);
            if (!grown) return rp_error_set(err, RP_ERR_NOMEM, "prefix cache states");
            e->prefix_states = grown;
            e->cap_prefix_states = cap;
        }
        float *data = malloc(fps * sizeof(float));
        if (!data)
            return rp_error_set(err, RP_ERR_NOMEM, "prefix cache state (%zu bytes): lower "
                                "--prefix-cache-mb", fps * sizeof(float));
        p = &e->prefix_states[e->n_prefix_states++];
        p->id = id;
        p->data = data;
    }
    e->be->copy_to_host(e->be, p->data, slot_state(e, slot), fps * sizeof(float));
    return RP_OK;
}

static void prefix_drop(rp_engine *e, uint64_t id) {
    rp_prefix_state *p = prefix_find(e, id);
    if (!p) return;
    free(p->data);
    *p = e->prefix_states[--e->n_prefix_states];
}

rp_status rp_engine_apply(rp_engine *e, const rp_engine_command *c, rp_error *err) {
    const size_t fps = e->state.floats_per_slot;
    switch (c->kind) {
    case RWKVPIPE__ENGINE_COMMAND__KIND__OPEN_SLOT: {
        if (c->slot < 0 || c->slot >= e->cfg.n_slots)
            return rp_error_set(err, RP_ERR_INTERNAL, "stage %d: slot %d", e->stage, c->slot);
        float *dst = slot_state(e, c->slot);
        if (c->prefix_id) {
            rp_prefix_state *p = prefix_find(e, c->prefix_id);
            if (!p)
                return rp_error_set(err, RP_ERR_INTERNAL, "stage %d has no prefix state %llu",
                                    e->stage, (unsigned long long)c->prefix_id);
            e->be->copy_to_device(e->be, dst, p->data, fps * sizeof(float));
        } else if (c->session && c->session[0]) {
            rp_engine_session *s = rp_engine_session_find(e, c->session);
            if (!s)
                return rp_error_set(err, RP_ERR_INTERNAL, "stage %d has no state for session "
                                    "'%s'", e->stage, c->session);
            e->be->copy_to_device(e->be, dst, s->data, fps * sizeof(float));
        } else {
            e->be->fill_zero(e->be, dst, fps * sizeof(float));
        }
        if (e->is_last) sampling_open(e, c->slot, c->sampling);
        return RP_OK;
    }
    case RWKVPIPE__ENGINE_COMMAND__KIND__FREE_SLOT:
        if (c->session && c->session[0]) {
            rp_engine_session *s = rp_engine_session_put(e, c->session);
            if (!s) return rp_error_set(err, RP_ERR_NOMEM, "session '%s' state", c->session);
            e->be->copy_to_host(e->be, s->data, slot_state(e, c->slot), fps * sizeof(float));
        }
        return RP_OK;
    case RWKVPIPE__ENGINE_COMMAND__KIND__COPY_SLOT:
        if (c->slot < 0 || c->slot >= e->cfg.n_slots || c->n_slots != 1 || c->slots[0] < 0 ||
            c->slots[0] >= e->cfg.n_slots)
            return rp_error_set(err, RP_ERR_INTERNAL, "stage %d: copy into slot %d", e->stage,
                                c->slot);
        e->be->copy(e->be, slot_state(e, c->slot), slot_state(e, c->slots[0]),
                    fps * sizeof(float));
        return RP_OK;
    case RWKVPIPE__ENGINE_COMMAND__KIND__DROP:
        rp_engine_session_drop(e, c->session);
        return RP_OK;
    case RWKVPIPE__ENGINE_COMMAND__KIND__PREFIX_STORE:
        return prefix_store(e, c->slot, c->prefix_id, err);
    case RWKVPIPE__ENGINE_COMMAND__KIND__PREFIX_DROP:
        prefix_drop(e, c->prefix_id);
        return RP_OK;
    case RWKVPIPE__ENGINE_COMMAND__KIND__SAVE:
        if (e->stage == 0) return RP_OK;  /* rank 0 reads its own part directly */
        return send_state(e, rp_engine_session_find(e, c->session), err);
    case RWKVPIPE__ENGINE_COMMAND__KIND__LOAD:
        if (e->stage == 0) return RP_OK;  /* rank 0 stored its part itself */
        return receive_state(e, c->session, err);
    default:
        return RP_OK;
    }
}

/* ---- the stage loop (ranks other than 0) ---- */

static rp_status send_result(rp_engine *e, const Rwkvpipe__EngineResult *r, rp_error *err) {
    size_t n = rwkvpipe__engine_result__get_packed_size(r);
    uint8_t *buf = malloc(n ? n : 1);
    if (!buf) return rp_error_set(err, RP_ERR_NOMEM, "engine result");
    rwkvpipe__engine_result__pack(r, buf);
    rp_transfer x;
    rp_status st = rp_transport_post_send_message(&e->tp, buf, n, 0, RP_MSG_RESULT, 0, &x, err);
    if (st == RP_OK) st = rp_transport_wait(&e->tp, &x, err);
    free(buf);
    return st;
}

/* A unit on a stage > 0: its x / v_first from the previous stage, this
 * stage's layers, then the result (last stage) or the next stage. */
static rp_status stage_unit(rp_engine *e, rp_engine_command *c, rp_error *err) {
    const int C = e->m->cfg.n_embd;
    size_t rows = 0;
    for (size_t i = 0; i < c->n_lengths; i++) rows += (size_t)c->lengths[i];
    if (rows == 0 || rows > e->max_rows)
        return rp_error_set(err, RP_ERR_INTERNAL, "stage %d: unit of %zu rows", e->stage, rows);
    const size_t bytes = rows * (size_t)C * sizeof(float);
    const int mb = unit_tag(c->unit_id);
    rp_transfer rx[2];
    rp_status st = rp_transport_post_recv(&e->tp, e->ws.x, bytes, e->stage - 1, RP_MSG_ACT, mb,
                                          &rx[0], err);
    if (st != RP_OK) return st;
    st = rp_transport_post_recv(&e->tp, e->ws.v_first, bytes, e->stage - 1, RP_MSG_ACT_VFIRST,
                                mb, &rx[1], err);
    rp_status st0 = rp_transport_wait(&e->tp, &rx[0], st == RP_OK ? err : NULL);
    if (st == RP_OK) st = st0;
    if (st == RP_OK) st = rp_transport_wait(&e->tp, &rx[1], err);
    if (st != RP_OK) return st;
    int32_t *slots = e->g_res_slots, *tokens = e->g_res_tokens;
    int n_sampled = 0;
    double busy = 0;
    if ((st = rp_engine_run_unit(e, c, NULL, slots, tokens, &n_sampled, &busy, err)) != RP_OK)
        return st;
    /* This stage's compute time joins the list the unit carries. */
    double times[RP_GRID_MAX_STAGES < 64 ? RP_GRID_MAX_STAGES : 64];
    size_t nt = c->n_busy_seconds < 63 ? c->n_busy_seconds : 63;
    memcpy(times, c->busy_seconds, nt * sizeof(double));
    times[nt++] = busy;
    if (e->is_last) {
        Rwkvpipe__EngineResult r = RWKVPIPE__ENGINE_RESULT__INIT;
        r.unit_id = c->unit_id;
        r.n_slots = r.n_tokens = (size_t)n_sampled;
        r.slots = slots;
        r.tokens = tokens;
        r.n_busy_seconds = nt;
        r.busy_seconds = times;
        Rwkvpipe__TokenLogprob lps[e->n_unit_lp > 0 ? e->n_unit_lp : 1];
        Rwkvpipe__TokenLogprob *lpp[e->n_unit_lp > 0 ? e->n_unit_lp : 1];
        for (int i = 0; i < e->n_unit_lp; i++) {
            rp_unit_logprob *u = &e->unit_lp[i];
            rwkvpipe__token_logprob__init(&lps[i]);
            lps[i].slot = u->slot;
            lps[i].pos = u->pos;
            lps[i].token = u->lp.token;
            lps[i].logprob = u->lp.logprob;
            lps[i].n_top_ids = lps[i].n_top_logprobs = (size_t)u->lp.n_top;
            lps[i].top_ids = u->lp.top_ids;
            lps[i].top_logprobs = u->lp.top_logprobs;
            lpp[i] = &lps[i];
        }
        r.n_logprobs = (size_t)e->n_unit_lp;
        r.logprobs = lpp;
        return send_result(e, &r, err);
    }
    double *old = c->busy_seconds;
    size_t old_n = c->n_busy_seconds;
    c->busy_seconds = times;
    c->n_busy_seconds = nt;
    st = rp_engine_forward(e, c, e->ws.x, e->ws.v_first, rows, err);
    c->busy_seconds = old;
    c->n_busy_seconds = old_n;
    return st;
}

rp_status rp_engine_stage_loop(rp_engine *e, rp_error *err) {
    for (;;) {
        rp_engine_command *c = receive_command(e, err);
        if (!c) return RP_ERR_FORMAT;
        rp_status st = RP_OK;
        if (c->kind == RWKVPIPE__ENGINE_COMMAND__KIND__UNIT) {
            st = stage_unit(e, c, err);
        } else if (c->kind == RWKVPIPE__ENGINE_COMMAND__KIND__SHUTDOWN) {
            st = rp_engine_forward(e, c, NULL, NULL, 0, err);
            if (st == RP_OK) st = rp_engine_flush(e, err);
            if (st == RP_OK && e->is_last) {
                Rwkvpipe__EngineResult r = RWKVPIPE__ENGINE_RESULT__INIT;
                r.shutdown_ack = 1;
                st = send_result(e, &r, err);
            }
            rwkvpipe__engine_command__free_unpacked(c, NULL);
            return st;
        } else {
            st = rp_engine_apply(e, c, err);
            if (st == RP_OK) st = rp_engine_forward(e, c, NULL, NULL, 0, err);
        }
        rwkvpipe__engine_command__free_unpacked(c, NULL);
        if (st != RP_OK) return st;
    }
}
