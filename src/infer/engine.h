/* The generation engine (docs/architecture.md, docs/serving.md): many
 * concurrent generations over a model whose layers may be split across P pipeline ranks.
 *
 * Rank 0 is the driver and stage 0. A generation ("job") lives in a slot;
 * every stage keeps, per slot, the recurrent state of its own layers. Work
 * travels down the pipeline as units: a unit is either one prefill chunk of
 * one slot (sequence mode, --prefill-chunk tokens) or a decode step of a
 * group of up to rp_engine_group_size slots (one token each: --max-batch, by
 * default the backend's decode_group, else RP_ENGINE_GROUP_DEFAULT). The
 * driver keeps up to P units in flight so every stage works on a different unit at once;
 * only the residual stream and v_first cross stage boundaries; the last stage
 * applies ln_out and the head, samples (fp32), and returns token ids. Control
 * commands (open/free a slot, session stash/restore/export/import, shutdown)
 * travel down the same ordered stream as protobuf messages. Every byte
 * between stages goes through the stage transport (pipe/transport.h), and
 * only the main thread of each rank uses it.
 *
 * Numbers do not depend on batch composition: a prefill chunk runs alone, and
 * decode groups run as decode rows (backend.h, set_decode_rows), whose rows
 * are computed independently whatever their count, so a sequence gives the
 * same tokens alone or among others, and for any number of stages.
 *
 * Threads: rp_engine_step / rp_engine_run run on the main thread of every
 * rank. On rank 0, any thread (HTTP handlers) may submit, read and cancel
 * jobs and ask for session operations and metrics: those calls are
 * thread-safe. */
#ifndef RP_INFER_ENGINE_H
#define RP_INFER_ENGINE_H

#include <stddef.h>
#include <stdint.h>

#include "core/error.h"
#include "infer/sampler.h"
#include "model/model.h"
#include "pipe/grid.h"

#define RP_ENGINE_GROUP_DEFAULT 8  /* slots per decode unit where the backend names none */
#define RP_ENGINE_MAX_BATCH 4096   /* the largest --max-batch */
#define RP_ENGINE_MAX_STOP_TOKENS 16
#define RP_ENGINE_MAX_BANNED 64
#define RP_ENGINE_SESSION_NAME_MAX 128
#define RP_LOGPROBS_MAX 20         /* top alternatives per token (OpenAI's limit) */
#define RP_ENGINE_MAX_BIAS 300     /* logit_bias entries (OpenAI's limit) */

typedef struct {
    int n_slots;                   /* concurrent generations (admission control) */
    int prefill_chunk;             /* tokens per prefill unit (default 256) */
    /* Prefill rows per turn: after each decode unit, prefill units run
     * until they have read this many rows (at least one unit), then the
     * next decode unit goes. 0 (the default): prefill_chunk; 1: one prefill
     * unit per decode unit. */
    int prefill_turn_rows;
    /* Most prompts (chunks of different slots) per prefill unit, read in
     * one pass over the weights. 0 (the default): the decode group size; 1:
     * one slot per unit. Only where prefill rows are exact rows
     * (rp_model_prefill_rows_exact: the f32 CPU backend), so a prompt's bits
     * do not depend on the prompts beside it; one per unit elsewhere. */
    int prefill_prompts;
    int max_queue;                 /* jobs waiting for a slot (none free) before submit refuses (429) */
    size_t session_budget_bytes;   /* in-memory session states per stage (LRU) */
    double comm_timeout;           /* watchdog seconds for stage transfers; 0 = none */
    int threads;                   /* CPU threads of this rank's backend; the last stage samples a
                                    * unit's rows on as many (0: omp_get_max_threads) */
    /* Most sequences per decode unit (--max-batch), 1..RP_ENGINE_MAX_BATCH;
     * 0: the backend's decode_group (backend.h), else RP_ENGINE_GROUP_DEFAULT.
     * Every rank must use the same value. */
    int max_batch;
    /* Prefix state cache (docs/serving.md): states at the end of finished
     * requests' prompts (less the last token) and of prompt + generated
     * text, keyed by the tokens, LRU under this many bytes of whole-model
     * states (each stage holds its own layers' part); a new request without
     * a session resumes from the longest one. 0: off (the default here; the
     * server sizes it from memory). */
    size_t prefix_cache_bytes;
} rp_engine_config;

void rp_engine_config_defaults(rp_engine_config *c);  /* 16 slots, chunk 256, queue 64, 256 MiB */
/* The decode group size an engine on backend `be` uses with max_batch
 * (0: the backend's default). */
int rp_engine_group_size(int max_batch, const rp_backend *be);

/* Sampling of one generation: the ChatRWKV order (docs/rwkv7.md, Sampling): banned tokens,
 * repetition penalty (logit[t] -= presence + occ[t] * frequency for every
 * token t generated so far; occ decays by penalty_decay each step), softmax,
 * top-p, top-k, temperature on the truncated probabilities; temperature 0 is
 * greedy. The draw uses (seed, token index), so a job is reproducible and
 * independent of what runs beside it. */
typedef struct {
    int max_tokens;                /* >= 0 */
    rp_sampler_params sampler;     /* temperature, top_p, top_k, seed */
    float presence_penalty, frequency_penalty, penalty_decay;
    int32_t stop_tokens[RP_ENGINE_MAX_STOP_TOKENS];  /* sampled -> finish "stop", not emitted */
    int n_stop_tokens;
    int32_t banned[RP_ENGINE_MAX_BANNED];
    int n_banned;
    /* Log-probabilities are of the model's distribution: log-softmax of the
     * raw logits (before penalties, bias, temperature, top-p), in double. */
    int logprobs;                  /* report each generated token's logprob (rp_job_logprob) */
    int top_logprobs;              /* with this many alternatives, 0..RP_LOGPROBS_MAX */
    int score_prompt;              /* also the prompt's tokens (rp_job_prompt_logprob) */
    /* logit_bias: bias_values[i] is added to the logit of bias_ids[i] before sampling */
    int32_t bias_ids[RP_ENGINE_MAX_BIAS];
    float bias_values[RP_ENGINE_MAX_BIAS];
    int n_bias;
    /* response_format (structured output, src/text/json_grammar.h): sampling draws only
     * tokens that continue a valid document, and a stop token only once it is complete
     * (then nothing else is allowed). The schema is JSON text; the job keeps a copy. */
    int grammar;                   /* RP_GRAMMAR_NONE, _JSON_OBJECT or _JSON_SCHEMA */
    const char *grammar_schema;    /* RP_GRAMMAR_JSON_SCHEMA: the schema */
} rp_gen_params;

enum { RP_GRAMMAR_NONE = 0, RP_GRAMMAR_JSON_OBJECT = 1, RP_GRAMMAR_JSON_SCHEMA = 2 };

/* A token's log-probability and the most likely tokens with theirs (most
 * likely first; ties: the lower id first). */
typedef struct {
    int32_t token;
    float logprob;
    int n_top;
    int32_t top_ids[RP_LOGPROBS_MAX];
    float top_logprobs[RP_LOGPROBS_MAX];
} rp_token_logprob;

/* T 1.0, top_p 0.85, top_k 0, seed 42, penalties 0, decay 0.996, max 256. */
void rp_gen_params_defaults(rp_gen_params *p);
rp_status rp_gen_params_validate(const rp_gen_params *p, int vocab_size, rp_error *err);

typedef enum {
    RP_FINISH_NONE = 0,   /* still running */
    RP_FINISH_LENGTH,     /* max_tokens reached */
    RP_FINISH_STOP,       /* a stop token (or the client's stop string: rp_job_stop) */
    RP_FINISH_CANCELLED,  /* rp_job_cancel (client gone) or engine shutdown */
    RP_FINISH_ERROR       /* see rp_job_error */
} rp_finish_reason;

const char *rp_finish_reason_name(rp_finish_reason r);  /* "length", "stop", ... */

typedef struct rp_job rp_job;

/* A job: the prompt tokens (copied) and its sampling. start_session (may be
 * NULL): begin from the state stored under that name (then `prompt` is only
 * the new text; a name that is not stored when the job gets its slot ends it
 * with RP_FINISH_ERROR "unknown session"; callers check rp_engine_session_exists
 * first for a better answer);
 * NULL starts from the zero state. store_session (may be NULL): keep the
 * state after the job under that name (a chat continues with both set to
 * the same name; an initial state from state tuning is a stored session used
 * as start_session only). Returns NULL with err set. */
rp_job *rp_job_create(const int32_t *prompt, int n_prompt, const rp_gen_params *params,
                      const char *start_session, const char *store_session, rp_error *err);
/* n > 1: job has the same prompt (and start) as first, submitted before it.
 * The prompt is read once: when both hold a slot as first has read all but
 * its last prompt token, job's state is copied from first's and each reads
 * the last token itself (so each samples its own first token). A job that
 * gets its slot after that point, or whose first is gone, reads the prompt
 * itself: the same numbers either way. Call before submitting job. */
void rp_job_share_prompt(rp_job *job, rp_job *first);
/* The client's reference: every job is released once by its creator. */
void rp_job_release(rp_job *job);

/* Blocks up to timeout_ms (0: poll) for generated tokens the client has not
 * read yet; copies up to max of them into out and returns how many. *finish
 * (may be NULL) receives the job's state: RP_FINISH_NONE while running. */
int rp_job_read(rp_job *job, int32_t *out, int max, int timeout_ms, rp_finish_reason *finish);
/* Calls fn(user) whenever the job has new tokens to read or has ended, so a
 * client can wait without a thread (the HTTP server resumes a suspended
 * connection). fn runs on the engine's main thread, possibly with engine
 * locks held: it must be quick and must not call the engine or this job.
 * It may be called once more than needed. Setting fn to NULL returns only
 * after a call in progress has returned, so user may be freed after it. */
void rp_job_set_notify(rp_job *job, void (*fn)(void *user), void *user);
/* With params.logprobs: generated token i's log-probability (i in the
 * order of rp_job_read; a stop token that ended the job, which rp_job_read
 * never returns, follows the last one). Returns 1, or 0 when it has not come
 * (yet). With params.score_prompt: prompt token i's (i >= 1: the first has
 * no distribution to come from). */
int rp_job_logprob(rp_job *job, int i, rp_token_logprob *out);
int rp_job_prompt_logprob(rp_job *job, int i, rp_token_logprob *out);
/* Ends the job: the engine frees its slot on every stage at its next step. */
void rp_job_cancel(rp_job *job);
/* Same, with finish reason "stop" (the client found a stop string). */
void rp_job_stop(rp_job *job);

typedef struct {
    int prompt_tokens;             /* prefilled (new) tokens */
    int completion_tokens;         /* generated, stop token excluded */
    double queue_seconds;          /* submit -> slot */
    double first_token_seconds;    /* submit -> first token */
    double decode_tokens_per_second;
    int session_continued;         /* started from a stored session state */
    int cached_tokens;             /* prompt tokens resumed from the prefix cache */
} rp_job_stats;

void rp_job_get_stats(rp_job *job, rp_job_stats *stats);
/* The error message when finish is RP_FINISH_ERROR ("" otherwise). */
void rp_job_error(rp_job *job, char *out, size_t size);

typedef struct rp_engine rp_engine;

/* Collective over the pipe: every rank passes its stage's part of the model
 * (grid NULL: one process owning the whole model). */
rp_status rp_engine_create(rp_engine **e, const rp_model *model, const rp_grid *grid,
                           const rp_engine_config *cfg, rp_error *err);
void rp_engine_free(rp_engine *e);

/* Rank 0, any thread: queue a job (the engine takes its own reference).
 * RP_ERR_BUSY when the queue is full (HTTP 429), RP_ERR_UNAVAILABLE after
 * rp_engine_shutdown (HTTP 503). A job that stores a session reports its end
 * (rp_job_read's finish) only once the session is stored, so the next turn
 * or a save can follow at once. */
rp_status rp_engine_submit(rp_engine *e, rp_job *job, rp_error *err);
/* The same for the n choices of one request, all or none, queued together:
 * choices sharing a prompt (rp_job_share_prompt) that find free slots then
 * start together, so the prompt is read once. */
rp_status rp_engine_submit_all(rp_engine *e, rp_job *const *jobs, int n, rp_error *err);
/* Rank 0, any thread: queued jobs beyond the free slots (what --max-queue
 * limits; 0 when every queued job has a free slot waiting for it). */
int rp_engine_waiting(rp_engine *e);

/* Rank 0 main thread: one scheduling round (admit queued jobs, launch units,
 * compute stage 0, collect results, free finished slots). Returns whether
 * anything is in progress. Other ranks: rp_engine_run. */
int rp_engine_step(rp_engine *e, rp_error *err, rp_status *st);

/* Every rank's main thread: serve until rp_engine_shutdown (rank 0 loops over
 * rp_engine_step, sleeping briefly when idle; stages follow the command
 * stream). Returns RP_OK after a clean shutdown of every stage. */
rp_status rp_engine_run(rp_engine *e, rp_error *err);

/* Rank 0, any thread (also a signal handler: async-signal-safe): running jobs
 * are cancelled, every stage is told to stop, rp_engine_run returns. */
void rp_engine_shutdown(rp_engine *e);

/* Rank 0, any thread; blocking until the main thread has done it (with the
 * pipeline empty). Sessions are named (RP_ENGINE_SESSION_NAME_MAX). The
 * engine does no file I/O: a caller saves a session by exporting it and
 * writing the buffer (src/infer/session_file.h), and loads one by reading a
 * file and importing it. The main thread holds the engine's lock only for
 * its session table, never across a transfer, so other threads' calls
 * (submit, exists, metrics) never wait for one.
 * state: the whole model's state of one sequence in rp_state layout (1 slot,
 * layers 0..L-1), rp_engine_session_floats floats, the same whatever the
 * number of stages. export: gathers every stage's part (through the
 * transport, on the main thread) into out, and the tokens the state has read; import: stores
 * state under name (replacing it) on every stage; delete: forgets it.
 * Unknown names are RP_ERR_ARG with a message (HTTP 404); once the engine
 * stopped (error or shutdown) RP_ERR_UNAVAILABLE. A failed transfer ends
 * rp_engine_run with that error, and the caller of the operation gets
 * RP_ERR_MPI "the engine failed: <it>". */
size_t rp_engine_session_floats(const rp_engine *e);
rp_status rp_engine_session_export(rp_engine *e, const char *name, float *out, uint64_t *tokens,
                                   rp_error *err);
rp_status rp_engine_session_import(rp_engine *e, const char *name, const float *state,
                                   uint64_t tokens, rp_error *err);
rp_status rp_engine_session_delete(rp_engine *e, const char *name, rp_error *err);
int rp_engine_session_exists(rp_engine *e, const char *name);

typedef struct {
    long requests_total, requests_active, requests_queued;
    long tokens_generated, tokens_prefilled;
    long prefill_units, prefill_seqs; /* prefill units launched and the prompts they read */
    long decode_units, decode_rows; /* decode units launched, their sequences: rows / units is
                                     * the mean decode group */
    double tokens_per_second;       /* generated, over the last ~10 s */
    int slots_total, slots_active;
    int n_stages;
    double stage_busy[RP_GRID_MAX_STAGES < 64 ? RP_GRID_MAX_STAGES : 64]; /* fraction, last ~10 s */
    long sessions_stored;
    long prefix_cache_hits;         /* requests that resumed from a cached prefix */
    long prefix_cache_tokens_saved; /* prompt tokens those did not read */
    size_t prefix_cache_bytes;      /* the cache's whole-model states + tokens */
    double uptime_seconds;
} rp_engine_metrics;

void rp_engine_get_metrics(rp_engine *e, rp_engine_metrics *m);

/* Every rank, before serving: the vocabulary's token bytes, which the last stage needs for
 * response_format (json_mask.h). The trie is the caller's and must outlive the engine. Without
 * it a job with a grammar ends with an error. */
struct rp_token_trie;
void rp_engine_set_vocab(rp_engine *e, const struct rp_token_trie *trie);

/* What the model is (for /v1/models and session files). */
const rp_config *rp_engine_config_of(const rp_engine *e);

#endif
