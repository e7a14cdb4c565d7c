/* Shared between the engine's files (engine.c: driver and stages;
 * engine_job.c: the job object clients hold).
 * Not part of the public interface. */
#ifndef RP_SERVE_ENGINE_INTERNAL_H
#define RP_SERVE_ENGINE_INTERNAL_H

#include <pthread.h>
#include <signal.h>

#include "serve/engine.h"

struct rp_job {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int refs;
    /* immutable after create */
    int32_t *prompt;
    int n_prompt;
    rp_gen_params params;
    char start_session[RP_ENGINE_SESSION_NAME_MAX];
    char store_session[RP_ENGINE_SESSION_NAME_MAX];
    /* shared with clients (under mu) */
    int32_t *out;
    int n_out, cap_out, n_read;
    rp_finish_reason finish;
    char error[512];
    int cancel;                    /* 1 cancel, 2 stop (client's stop string) */
    double t_submit, t_slot, t_first, t_last;
    int session_continued;
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
};

/* Job helpers used by the engine (engine_job.c). */
void rp_job_retain(rp_job *job);
/* Appends a generated token and wakes readers. */
void rp_job_push_token(rp_job *job, int32_t token);
/* Sets the final state (first call wins) and wakes readers. */
void rp_job_finish(rp_job *job, rp_finish_reason reason, const char *error);
/* 0 none, 1 cancel, 2 stop. */
int rp_job_cancel_state(rp_job *job);

#endif
