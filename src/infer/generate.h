/* Single-process text generation over one model that owns every layer:
 * prefill the prompt in sequence mode (in chunks), then decode in step mode,
 * sampling each token and handing it to a callback as soon as it exists.
 * The pipelined driver (a later issue) keeps this contract. */
#ifndef RP_INFER_GENERATE_H
#define RP_INFER_GENERATE_H

#include <stddef.h>
#include <stdint.h>

#include "core/error.h"
#include "infer/sampler.h"
#include "model/model.h"

typedef struct {
    int max_new_tokens;      /* >= 0 */
    int prefill_chunk;       /* tokens per sequence-mode call, >= 1 */
    int stop_at_eot;         /* stop when eot_id is sampled (not emitted) */
    int eot_id;
    const int32_t *banned;   /* ids never sampled */
    int n_banned;
    rp_sampler_params sampler;
} rp_generate_options;

typedef struct {
    int prompt_tokens;
    int generated_tokens;
    double prefill_seconds, decode_seconds;
    int stopped_by;          /* 0 max tokens, 1 eot, 2 callback */
} rp_generate_stats;

/* Called with each new token; return non-zero to stop (e.g. a stop string). */
typedef int (*rp_token_callback)(int32_t token, void *user);

/* prompt must have >= 1 token; state must be a 1-slot state for the whole
 * model (zero for a fresh sequence, or a saved one to continue it). On return
 * the state has read the prompt and every emitted token but the last one
 * (feed that token first to continue the sequence). */
rp_status rp_generate(const rp_model *m, rp_state *state, const int32_t *prompt, int n_prompt,
                      const rp_generate_options *opt, rp_token_callback on_token, void *user,
                      rp_generate_stats *stats, rp_error *err);

#endif
