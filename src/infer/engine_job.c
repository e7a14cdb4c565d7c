/* The job object shared by the engine's main thread and client threads
 * (engine.h): the client reads tokens as they come, may cancel, and may be
 * called back when there is something to read (rp_job_set_notify). */
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "infer/engine_internal.h"
#include "core/clock.h"

const char *rp_finish_reason_name(rp_finish_reason r) {
    switch (r) {
    case RP_FINISH_NONE: return "running";
    case RP_FINISH_LENGTH: return "length";
    case RP_FINISH_STOP: return "stop";
    case RP_FINISH_CANCELLED: return "cancelled";
    case RP_FINISH_ERROR: return "error";
    }
    return "unknown";
}

void rp_gen_params_defaults(rp_gen_params *p) {
    memset(p, 0, sizeof *p);
    p->max_tokens = 256;
    rp_sampler_defaults(&p->sampler);
    p->penalty_decay = 0.996f;
}

rp_status rp_gen_params_validate(const rp_gen_params *p, int vocab_size, rp_error *err) {
    rp_status st = rp_sampler_validate(&p->sampler, err);
    if (st != RP_OK) return st;
    if (p->max_tokens < 0)
        return rp_error_set(err, RP_ERR_ARG, "max_tokens %d must be >= 0", p->max_tokens);
    if (!(p->penalty_decay >= 0 && p->penalty_decay <= 1))
        return rp_error_set(err, RP_ERR_ARG, "penalty_decay %g must be in [0, 1]",
                            p->penalty_decay);
    if (!(p->presence_penalty > -100 && p->presence_penalty < 100) ||
        !(p->frequency_penalty > -100 && p->frequency_penalty < 100))
        return rp_error_set(err, RP_ERR_ARG, "penalties must be in (-100, 100)");
    if (p->n_stop_tokens < 0 || p->n_stop_tokens > RP_ENGINE_MAX_STOP_TOKENS ||
        p->n_banned < 0 || p->n_banned > RP_ENGINE_MAX_BANNED)
        return rp_error_set(err, RP_ERR_ARG, "at most %d stop tokens and %d banned tokens",
                            RP_ENGINE_MAX_STOP_TOKENS, RP_ENGINE_MAX_BANNED);
    for (int i = 0; i < p->n_stop_tokens; i++)
        if (p->stop_tokens[i] < 0 || p->stop_tokens[i] >= vocab_size)
            return rp_error_set(err, RP_ERR_ARG, "stop token %d is outside the vocabulary [0, %d)",
                                p->stop_tokens[i], vocab_size);
    for (int i = 0; i < p->n_banned; i++)
        if (p->banned[i] < 0 || p->banned[i] >= vocab_size)
            return rp_error_set(err, RP_ERR_ARG, "banned token %d is outside the vocabulary [0, %d)",
                                p->banned[i], vocab_size);
    if (p->top_logprobs < 0 || p->top_logprobs > RP_LOGPROBS_MAX)
        return rp_error_set(err, RP_ERR_ARG, "top_logprobs %d must be in [0, %d]",
                            p->top_logprobs, RP_LOGPROBS_MAX);
    if (p->grammar < RP_GRAMMAR_NONE || p->grammar > RP_GRAMMAR_JSON_SCHEMA ||
        (p->grammar == RP_GRAMMAR_JSON_SCHEMA && !p->grammar_schema))
        return rp_error_set(err, RP_ERR_ARG, "grammar %d: expected none, a JSON object, or a "
                            "JSON schema with its text", p->grammar);
    if (p->grammar && p->n_stop_tokens == 0)
        return rp_error_set(err, RP_ERR_ARG, "response_format needs a stop token to end the "
                            "document (the end-of-text token is banned and no stop_token_ids)");
    if (p->n_bias < 0 || p->n_bias > RP_ENGINE_MAX_BIAS)
        return rp_error_set(err, RP_ERR_ARG, "at most %d logit_bias entries", RP_ENGINE_MAX_BIAS);
    for (int i = 0; i < p->n_bias; i++) {
        if (p->bias_ids[i] < 0 || p->bias_ids[i] >= vocab_size)
            return rp_error_set(err, RP_ERR_ARG, "logit_bias token %d is outside the vocabulary "
                                "[0, %d)", p->bias_ids[i], vocab_size);
        if (!(p->bias_values[i] >= -100 && p->bias_values[i] <= 100))
            return rp_error_set(err, RP_ERR_ARG, "logit_bias of token %d is %g: expected a "
                                "number in [-100, 100]", p->bias_ids[i], p->bias_values[i]);
    }
    return RP_OK;
}

static int copy_name(char *dst, const char *src, const char *what, rp_error *err) {
    dst[0] = '\0';
    if (!src) return 0;
    size_t n = strlen(src);
    if (n == 0 || n >= RP_ENGINE_SESSION_NAME_MAX) {
        rp_error_set(err, RP_ERR_ARG, "%s name must have 1 to %d characters", what,
                     RP_ENGINE_SESSION_NAME_MAX - 1);
        return -1;
    }
    memcpy(dst, src, n + 1);
    return 0;
}

/* A job that failed during rp_job_create: nothing shared yet (no mutex, no
 * other reference), so its own buffers are all there is to free. */
static void job_free_unshared(rp_job *j) {
    free(j->prompt);
    free(j->out);
    free(j->lp_prompt);
    free(j->lp_prompt_set);
    free(j);
}

rp_job *rp_job_create(const int32_t *prompt, int n_prompt, const rp_gen_params *params,
                      const char *start_session, const char *store_session, rp_error *err) {
    if (n_prompt < 1) {
        rp_error_set(err, RP_ERR_ARG, "the prompt is empty: a generation needs at least one token");
        return NULL;
    }
    rp_job *j = calloc(1, sizeof *j);
    if (!j) {
        rp_error_set(err, RP_ERR_NOMEM, "job");
        return NULL;
    }
    j->prompt = malloc(sizeof(int32_t) * (size_t)n_prompt);
    j->cap_out = 64;
    j->out = malloc(sizeof(int32_t) * (size_t)j->cap_out);
    if (params->score_prompt) {
        j->lp_prompt = calloc((size_t)n_prompt, sizeof *j->lp_prompt);
        j->lp_prompt_set = calloc((size_t)n_prompt, 1);
        if (!j->lp_prompt || !j->lp_prompt_set) {
            free(j->lp_prompt);
            free(j->lp_prompt_set);
            j->lp_prompt = NULL;
            free(j->out);
            j->out = NULL; /* reported as out of memory below */
        }
    }
    if (!j->prompt || !j->out || copy_name(j->start_session, start_session, "session", err) ||
        copy_name(j->store_session, store_session, "session", err)) {
        if (!j->prompt || !j->out) rp_error_set(err, RP_ERR_NOMEM, "job of %d tokens", n_prompt);
        job_free_unshared(j);
        return NULL;
    }
    memcpy(j->prompt, prompt, sizeof(int32_t) * (size_t)n_prompt);
    j->n_prompt = n_prompt;
    j->params = *params;
    j->params.grammar_schema = NULL;
    if (params->grammar == RP_GRAMMAR_JSON_SCHEMA &&
        !(j->params.grammar_schema = j->grammar_copy = strdup(params->grammar_schema ? params->grammar_schema : ""))) {
        rp_error_set(err, RP_ERR_NOMEM, "job: the response_format schema");
        job_free_unshared(j);
        return NULL;
    }
    j->refs = 1;
    j->slot = -1;
    pthread_mutex_init(&j->mu, NULL);
    pthread_cond_init(&j->cv, NULL);
    pthread_mutex_init(&j->notify_mu, NULL);
    return j;
}

void rp_job_share_prompt(rp_job *job, rp_job *first) {
    /* read at admission by the engine's main thread, after submit */
    if (!first || job->fork_of || job->n_prompt != first->n_prompt || job->n_prompt < 2 ||
        job->params.max_tokens == 0 || first->params.max_tokens == 0 ||
        strcmp(job->start_session, first->start_session) != 0 || job->store_session[0] ||
        first->store_session[0] ||
        memcmp(job->prompt, first->prompt, sizeof(int32_t) * (size_t)job->n_prompt) != 0)
        return;
    rp_job_retain(first);
    job->fork_of = first;
    first->fork_parent = 1;
}

void rp_job_retain(rp_job *job) {
    pthread_mutex_lock(&job->mu);
    job->refs++;
    pthread_mutex_unlock(&job->mu);
}

void rp_job_release(rp_job *job) {
    if (!job) return;
    pthread_mutex_lock(&job->mu);
    int left = --job->refs;
    pthread_mutex_unlock(&job->mu);
    if (left > 0) return;
    pthread_mutex_destroy(&job->mu);
    pthread_cond_destroy(&job->cv);
    pthread_mutex_destroy(&job->notify_mu);
    if (job->fork_of) rp_job_release(job->fork_of);
    free(job->prompt);
    free(job->out);
    free(job->lp);
    free(job->lp_prompt);
    free(job->lp_prompt_set);
    free(job->grammar_copy);
    free(job);
}

int rp_job_read(rp_job *job, int32_t *out, int max, int timeout_ms, rp_finish_reason *finish) {
    pthread_mutex_lock(&job->mu);
    if (job->n_read == job->n_out && job->finish == RP_FINISH_NONE && timeout_ms > 0) {
        struct timespec until;
        clock_gettime(CLOCK_REALTIME, &until);
        until.tv_sec += timeout_ms / 1000;
        until.tv_nsec += (long)(timeout_ms % 1000) * 1000000L;
        if (until.tv_nsec >= 1000000000L) {
            until.tv_sec++;
            until.tv_nsec -= 1000000000L;
        }
        while (job->n_read == job->n_out && job->finish == RP_FINISH_NONE)
            if (pthread_cond_timedwait(&job->cv, &job->mu, &until) != 0) break;
    }
    int n = job->n_out - job->n_read;
    if (n > max) n = max;
    if (n > 0) memcpy(out, job->out + job->n_read, sizeof(int32_t) * (size_t)n);
    job->n_read += n;
    /* Finished only once every token has been read. */
    if (finish) *finish = job->n_read == job->n_out ? job->finish : RP_FINISH_NONE;
    pthread_mutex_unlock(&job->mu);
    return n;
}

void rp_job_set_notify(rp_job *job, void (*fn)(void *user), void *user) {
    pthread_mutex_lock(&job->notify_mu);
    job->notify = fn;
    job->notify_user = fn ? user : NULL;
    pthread_mutex_unlock(&job->notify_mu);
}

/* Called after job->mu is released: the hook may take the client's locks. */
static void job_notify(rp_job *job) {
    pthread_mutex_lock(&job->notify_mu);
    if (job->notify) job->notify(job->notify_user);
    pthread_mutex_unlock(&job->notify_mu);
}

void rp_job_cancel(rp_job *job) {
    pthread_mutex_lock(&job->mu);
    if (!job->cancel) job->cancel = RP_JOB_CANCEL_CLIENT;
    pthread_mutex_unlock(&job->mu);
}

void rp_job_stop(rp_job *job) {
    pthread_mutex_lock(&job->mu);
    if (!job->cancel) job->cancel = RP_JOB_CANCEL_STOP;
    pthread_mutex_unlock(&job->mu);
}

rp_job_cancel_reason rp_job_cancel_state(rp_job *job) {
    pthread_mutex_lock(&job->mu);
    rp_job_cancel_reason c = job->cancel;
    pthread_mutex_unlock(&job->mu);
    return c;
}

void rp_job_push_token(rp_job *job, int32_t token) {
    pthread_mutex_lock(&job->mu);
    if (job->n_out == job->cap_out) {
        int32_t *grown = realloc(job->out, sizeof(int32_t) * (size_t)job->cap_out * 2);
        if (grown) {
            job->out = grown;
            job->cap_out *= 2;
        }
    }
    if (job->n_out < job->cap_out) job->out[job->n_out++] = token;
    double now = rp_now_seconds();
    if (job->t_first == 0) job->t_first = now;
    job->t_last = now;
    pthread_cond_broadcast(&job->cv);
    pthread_mutex_unlock(&job->mu);
    job_notify(job);
}

void rp_job_push_logprob(rp_job *job, const rp_token_logprob *lp) {
    pthread_mutex_lock(&job->mu);
    if (job->n_lp == job->cap_lp) {
        int cap = job->cap_lp ? 2 * job->cap_lp : 16;
        rp_token_logprob *grown = realloc(job->lp, sizeof *grown * (size_t)cap);
        if (grown) job->lp = grown, job->cap_lp = cap;
    }
    if (job->n_lp < job->cap_lp) job->lp[job->n_lp++] = *lp;
    pthread_mutex_unlock(&job->mu);
}

void rp_job_set_prompt_logprob(rp_job *job, int pos, const rp_token_logprob *lp) {
    pthread_mutex_lock(&job->mu);
    if (job->lp_prompt && pos >= 0 && pos < job->n_prompt) {
        job->lp_prompt[pos] = *lp;
        job->lp_prompt_set[pos] = 1;
    }
    pthread_mutex_unlock(&job->mu);
}

int rp_job_logprob(rp_job *job, int i, rp_token_logprob *out) {
    pthread_mutex_lock(&job->mu);
    int have = i >= 0 && i < job->n_lp;
    if (have) *out = job->lp[i];
    pthread_mutex_unlock(&job->mu);
    return have;
}

int rp_job_prompt_logprob(rp_job *job, int i, rp_token_logprob *out) {
    pthread_mutex_lock(&job->mu);
    int have = job->lp_prompt && i >= 0 && i < job->n_prompt && job->lp_prompt_set[i];
    if (have) *out = job->lp_prompt[i];
    pthread_mutex_unlock(&job->mu);
    return have;
}

void rp_job_finish(rp_job *job, rp_finish_reason reason, const char *error) {
    pthread_mutex_lock(&job->mu);
    if (job->finish == RP_FINISH_NONE) {
        job->finish = reason;
        if (error) snprintf(job->error, sizeof job->error, "%s", error);
    }
    pthread_cond_broadcast(&job->cv);
    pthread_mutex_unlock(&job->mu);
    job_notify(job);
}

void rp_job_get_stats(rp_job *job, rp_job_stats *s) {
    pthread_mutex_lock(&job->mu);
    memset(s, 0, sizeof *s);
    s->prompt_tokens = job->n_prompt;
    s->completion_tokens = job->n_out;
    s->session_continued = job->session_continued;
    s->cached_tokens = job->cached_tokens;
    if (job->t_slot > 0) s->queue_seconds = job->t_slot - job->t_submit;
    if (job->t_first > 0) s->first_token_seconds = job->t_first - job->t_submit;
    if (job->n_out > 1 && job->t_last > job->t_first)
        s->decode_tokens_per_second = (job->n_out - 1) / (job->t_last - job->t_first);
    pthread_mutex_unlock(&job->mu);
}

void rp_job_error(rp_job *job, char *out, size_t size) {
    pthread_mutex_lock(&job->mu);
    snprintf(out, size, "%s", job->finish == RP_FINISH_ERROR ? job->error : "");
    pthread_mutex_unlock(&job->mu);
}
