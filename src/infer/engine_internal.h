/* Shared between the engine's files: engine_driver.c (rank 0's scheduler,
 * creation, metrics), engine_worker.c (every stage's command loop and unit
 * compute), engine_sessions.c (the session table and the session operations
 * client threads ask for), engine_job.c (the job object clients hold).
 * Not part of the public interface. */
#ifndef RP_INFER_ENGINE_INTERNAL_H
#define RP_INFER_ENGINE_INTERNAL_H

#include <pthread.h>
#include <signal.h>

#include "infer/engine.h"
#include "infer/prefix_cache.h"
#include "text/json_grammar.h"
#include "pipe/transport.h"
#include "rwkvpipe.pb-c.h"

/* Why a job was ended by its client (rp_job_cancel / rp_job_stop). */
typedef enum {
    RP_JOB_CANCEL_NONE = 0,
    RP_JOB_CANCEL_CLIENT,  /* rp_job_cancel: the client is gone; finish "cancelled" */
    RP_JOB_CANCEL_STOP     /* rp_job_stop: the client found a stop string; finish "stop" */
} rp_job_cancel_reason;

struct rp_job {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int refs;
    /* immutable after create */
    int32_t *prompt;
    int n_prompt;
    rp_gen_params params;
    char *grammar_copy;            /* params.grammar_schema's text (owned) */
    char start_session[RP_ENGINE_SESSION_NAME_MAX];
    char store_session[RP_ENGINE_SESSION_NAME_MAX];
    /* shared with clients (under mu) */
    int32_t *out;
    int n_out, cap_out, n_read;
    rp_token_logprob *lp;          /* params.logprobs: per generated token (+ a stop token) */
    int n_lp, cap_lp;
    rp_token_logprob *lp_prompt;   /* params.score_prompt: [n_prompt] */
    unsigned char *lp_prompt_set;  /* [n_prompt] */
    rp_finish_reason finish;
    char error[512];
    rp_job_cancel_reason cancel;
    double t_submit, t_slot, t_first, t_last;
    int session_continued;
    int cached_tokens;             /* prompt tokens resumed from the prefix cache */
    /* the client's wake-up hook (rp_job_set_notify): under notify_mu, held
     * while it runs so that clearing it waits for a call in progress */
    pthread_mutex_t notify_mu;
    void (*notify)(void *user);
    void *notify_user;
    /* engine main thread only */
    rp_job *next;                  /* queue link */
    int slot;                      /* -1 while queued */
    int prefilled;                 /* prompt tokens sent to the pipeline */
    int in_flight;                 /* a unit of this job is in the pipeline */
    int has_pending;               /* pending token sampled but not fed yet */
    int32_t pending;
    int n_generated;
    int closing;                   /* finished; feeding the last token before the stash */
    int has_deferred;              /* the end is reported once the session is stored */
    rp_finish_reason deferred;
    int closed;                    /* FREE_SLOT issued */
    /* a prompt read once for several jobs (rp_job_share_prompt) */
    rp_job *fork_of;               /* (a reference) the job this one copies its state from */
    int fork_wait;                 /* in a slot, waiting for fork_of to reach the copy point */
    int fork_parent;               /* others copy from this one: it stops one token early */
    int fork_passed;               /* past the copy point: later ones read the prompt */
    /* the prefix state cache (engine_driver.c, prefix_*) */
    int prefix_on;                 /* stores its prompt's and its end's state */
    int prefix_passed;             /* past the prompt's store point (n_prompt - 1) */
    uint64_t prefix_origin;        /* the state the prompt is read from (prefix_cache.h) */
};

/* Job helpers used by the engine (engine_job.c). */
void rp_job_retain(rp_job *job);
/* Appends a generated token and wakes readers. */
void rp_job_push_token(rp_job *job, int32_t token);
/* Records the logprob of the next generated (or stop) token; before the
 * token is pushed, so a reader who sees the token finds it. */
void rp_job_push_logprob(rp_job *job, const rp_token_logprob *lp);
void rp_job_set_prompt_logprob(rp_job *job, int pos, const rp_token_logprob *lp);
/* Sets the final state (first call wins) and wakes readers. */
void rp_job_finish(rp_job *job, rp_finish_reason reason, const char *error);
rp_job_cancel_reason rp_job_cancel_state(rp_job *job);

/* ---- the engine ---- */

typedef Rwkvpipe__EngineCommand rp_engine_command;

/* A message on its way to the next stage: packed command, and for a unit
 * copies of x and v_first in backend memory (the workspace is reused by the
 * next unit before the transfers complete). */
typedef struct {
    uint8_t *packed;
    size_t packed_cap;
    float *x, *v;
    rp_transfer xfer[3];
} rp_engine_outgoing;

/* The last stage's sampling state of one slot. */
typedef struct {
    rp_sampler_params sampler;
    float presence, frequency, decay;
    int32_t banned[RP_ENGINE_MAX_BANNED];
    int n_banned;
    uint64_t step;
    float *occ;          /* [V] decayed counts of the generated tokens */
    int penalized;
    int logprobs, top_logprobs, score_prompt;
    int32_t *bias_ids;   /* [n_bias] (malloc'ed) */
    float *bias_values;
    int n_bias;
    /* response_format: the compiled grammar and its mask cache (shared, engine_worker.c),
     * and the document so far */
    struct rp_grammar_entry *gentry;
    struct rp_json_grammar *grammar;
    struct rp_json_mask *gmask;
    int grammar_failed;  /* asked for but not compiled: the job ends with an error */
    rp_json_state gstate;
} rp_slot_sampling;

/* engine_worker.c: frees a slot's sampling buffers, and the grammars jobs shared (engine
 * teardown). */
typedef struct rp_grammar_entry rp_grammar_entry;
void rp_slot_sampling_free(rp_slot_sampling *s);
void rp_engine_grammars_free(rp_engine *e);

/* A logprob the last stage computed for a unit: of slot's sampled token
 * (pos -1) or of its prompt token at pos. */
typedef struct {
    int32_t slot, pos;
    rp_token_logprob lp;
} rp_unit_logprob;

/* A stored session state (this stage's layers). */
typedef struct {
    char name[RP_ENGINE_SESSION_NAME_MAX];
    float *data;         /* floats_per_slot of this stage's state */
    uint64_t tokens;     /* rank 0: tokens read */
    uint64_t version;    /* rank 0: a new one each time the state is written: the
                          * prefix cache's origin for requests starting here */
    uint64_t last_used;  /* rank 0: LRU clock */
} rp_engine_session;

/* A state of the prefix cache (this stage's layers), under the id rank 0's
 * index (prefix_cache.h) gave it. */
typedef struct {
    uint64_t id;
    float *data;         /* floats_per_slot */
} rp_prefix_state;

/* A unit in the pipeline, until its result comes back from the last stage. */
typedef struct {
    uint64_t id;
    int n;
    int32_t *slots;      /* [group_max], allocated with the record's first use */
} rp_unit_record;

typedef struct {
    rp_unit_record *r;
    int n, cap;
} rp_unit_table;

/* A session operation asked for by a client thread (its buffers are the
 * client's: it waits until done). */
typedef enum { RP_CONTROL_EXPORT, RP_CONTROL_IMPORT, RP_CONTROL_DELETE } rp_control_kind;

typedef struct rp_control {
    rp_control_kind kind;
    const char *name;
    float *out;          /* export: the whole model's state */
    const float *in;     /* import */
    uint64_t tokens;     /* export: out; import: in */
    rp_status status;
    rp_error err;
    int done;
    struct rp_control *next;
} rp_control;

/* Why the engine stopped taking session operations. */
typedef enum {
    RP_ENGINE_STOP_SHUTDOWN,  /* rp_engine_shutdown: RP_ERR_UNAVAILABLE, "stopped" */
    RP_ENGINE_STOP_FAILED     /* a stage or transfer failed: RP_ERR_MPI, "failed" */
} rp_engine_stop_reason;

struct rp_engine {
    const rp_model *m;
    rp_backend *be;
    rp_engine_config cfg;
    int stage, n_stages, is_last;
    rp_transport tp;          /* over a dup of the pipe communicator (has_tp: n_stages > 1) */
    int has_tp;
    size_t max_rows;
    rp_workspace ws;
    rp_state state;           /* [n_slots] of this stage's layers */
    float *logits_dev, *logits_host;
    float *logits_all_dev, *logits_all_host; /* [max_rows, V]: prefill chunks that score */
    float *lp_row;                /* [V]: a row's raw logits, kept while sampling changes it */
    rp_unit_logprob *unit_lp;     /* [max_rows + group_max]: the last unit's logprobs */
    int group_max;                /* sequences per decode unit (rp_engine_group_size) */
    int largest_group;            /* rank 0: the most sequences a decode unit has had (tests) */
    /* Per-unit scratch, [group_max] each: launch_unit's (slots .. t_out),
     * rp_engine_run_unit's (seq_len .. row_begin), a stage's results. */
    int32_t *g_slots, *g_lengths, *g_tokens, *g_s_out, *g_t_out, *g_res_slots, *g_res_tokens;
    int *g_seq_len, *g_slot, *g_row_begin;
    protobuf_c_boolean *g_sample;
    void *g_mem;
    int n_unit_lp;
#define RP_ENGINE_SAMPLE_THREADS_MAX 64
    /* [sample_threads] of rp_sampler_scratch_bytes each, sampler_scratch_stride apart:
     * a decode unit's rows are sampled on that many threads (sample_rows). */
    void *sampler_scratch;
    size_t sampler_scratch_stride;
    int sample_threads;
    int32_t *g_sampled;          /* [group_max]: each row's token, in parallel sampling */
    rp_slot_sampling *sampling;  /* last stage: [n_slots] */
    rp_engine_outgoing *out;     /* ring of n_out */
    int n_out, out_next;
    rp_engine_session *sessions;
    int n_sessions, cap_sessions;
    uint64_t clock;
    uint64_t session_versions;   /* rank 0: the last rp_engine_session.version given */
    rp_prefix_state *prefix_states;
    int n_prefix_states, cap_prefix_states;
    /* driver (rank 0) */
    rp_prefix_cache prefix;      /* the index (budget 0: off) */
    pthread_mutex_t mu;
    pthread_cond_t wake;
    rp_job *queue_head, *queue_tail;
    int n_queued;
    int n_slots_used;            /* slots holding (or being given) a job; under mu */
    rp_job **slot_job;
    uint64_t *slot_tokens;
    int units_in_flight;
    rp_unit_table units;
    int launched_any;            /* the last step launched a unit */
    int *stage_layer_begin, *stage_layer_end;
    uint64_t next_unit_id;
    int prefill_rows_run;        /* prefill rows launched since the last decode unit */
    int rr_cursor;               /* next slot to consider first */
    rp_control *controls;
    int failed;                  /* stopped (error or shutdown): controls are refused (under mu) */
    pthread_t owner;             /* the main thread (rp_engine_create's caller) */
    volatile sig_atomic_t shutdown_requested;
    int shutdown_started;
    /* metrics (under mu) */
    long requests_total, tokens_generated, tokens_prefilled;
    long decode_units, decode_rows; /* decode units launched and their sequences (rows) */
    long prefill_units, prefill_seqs; /* prefill units launched and their prompts (chunks) */
    int prefill_prompts;          /* most prompts per prefill unit (engine.h) */
    int32_t *prefill_tokens;      /* [max_rows]: the tokens of a unit of several prompts */
    long prefix_hits, prefix_saved;
    double *busy_total, *busy_mark, *busy_frac, t_mark, tokens_rate;
    long tokens_mark;
    double t_start;
    const struct rp_token_trie *trie;  /* rp_engine_set_vocab: token bytes for grammars */
    rp_grammar_entry *grammars;        /* last stage: response_format grammars (engine_worker.c) */
    int n_grammars;
    uint64_t grammar_clock;
};

/* Tests only (tests/test_engine.c): called by the main thread at the start
 * of every session operation, with no engine lock held; a non-OK return is
 * a failure of the engine itself (as a failed transfer). NULL: none. */
extern rp_status (*rp_engine_control_test_hook)(rp_engine *e, rp_error *err);

/* engine_worker.c: the stage side. */
/* Sends c (and, for a unit, rows x C of x and v_first) to the next stage. */
rp_status rp_engine_forward(rp_engine *e, const rp_engine_command *c, const float *x,
                            const float *v, size_t rows, rp_error *err);
/* Waits for every transfer to the next stage still in flight. */
rp_status rp_engine_flush(rp_engine *e, rp_error *err);
/* Runs this stage's part of a unit (stage 0: embeds tokens); the last stage
 * samples into slots_out / tokens_out and sets *n_sampled, and leaves the
 * logprobs its slots asked for in e->unit_lp / n_unit_lp. */
rp_status rp_engine_run_unit(rp_engine *e, const rp_engine_command *c, const int32_t *tokens,
                             int32_t *slots_out, int32_t *tokens_out, int *n_sampled,
                             double *busy, rp_error *err);
/* Applies a non-unit command to this stage's slots and sessions. */
rp_status rp_engine_apply(rp_engine *e, const rp_engine_command *c, rp_error *err);
/* Ranks other than 0: follow the command stream until SHUTDOWN. */
rp_status rp_engine_stage_loop(rp_engine *e, rp_error *err);

/* engine_sessions.c: the table (changed by the main thread under e->mu,
 * read by it without) and the session operations. */
rp_engine_session *rp_engine_session_find(rp_engine *e, const char *name);
rp_engine_session *rp_engine_session_put(rp_engine *e, const char *name);
void rp_engine_session_drop(rp_engine *e, const char *name);
/* Main thread, pipeline empty: does the queued session operations. The
 * first failure of the engine itself is returned (and that operation's
 * client told); the operations after it are left for fail_controls. */
rp_status rp_engine_run_controls(rp_engine *e, rp_error *err);
/* Answers every queued operation and refuses later ones. */
void rp_engine_fail_controls(rp_engine *e, rp_engine_stop_reason why, const char *message);

/* engine_driver.c */
/* Runs a command on stage 0 and sends it down the pipe. */
rp_status rp_engine_issue(rp_engine *e, const rp_engine_command *c, rp_error *err);
/* Takes results of units in flight (block: wait for at least one). */
rp_status rp_engine_collect(rp_engine *e, int block, rp_error *err);

#endif
