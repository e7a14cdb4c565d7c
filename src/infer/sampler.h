/* Next-token sampling from logits, following the rwkv pip package order
 * (docs/rwkv7.md, Sampling): banned tokens -> softmax (fp32) -> top-p -> top-k -> temperature
 * applied to the truncated probabilities (p^(1/T), renormalised) -> draw.
 * Temperature 0 is greedy (argmax, lowest id on ties). The draw uses the
 * counter-based RNG keyed by (seed, step), so a run is reproducible and
 * independent of batch composition. */
#ifndef RP_INFER_SAMPLER_H
#define RP_INFER_SAMPLER_H

#include <stddef.h>
#include <stdint.h>

#include "core/error.h"

typedef struct {
    float temperature;  /* >= 0; 0 = greedy */
    float top_p;        /* (0, 1]; 1 = off */
    int top_k;          /* >= 0; 0 = off */
    uint64_t seed;
} rp_sampler_params;

void rp_sampler_defaults(rp_sampler_params *p); /* T 1.0, top_p 0.85, top_k 0, seed 42 */
rp_status rp_sampler_validate(const rp_sampler_params *p, rp_error *err);

/* rp_sample's results when no token can be drawn. */
#define RP_SAMPLE_NONE (-1)        /* invalid p or n_vocab, or every id is banned */
/* Every id that is not banned has a NaN or -inf logit (NaN weights, a NaN
 * session state): the result is RP_SAMPLE_NOT_FINITE - k, k = the number of
 * non-finite logits, so the count survives the trip from the last pipeline
 * stage to rank 0 as one int32 token. */
#define RP_SAMPLE_NOT_FINITE (-2)

/* Returns the sampled id in [0, n_vocab). scratch must hold 2 * n_vocab floats
 * plus n_vocab ints (see rp_sampler_scratch_bytes). banned (may be NULL) lists
 * n_banned ids that get probability 0 (ids outside [0, n_vocab) are ignored);
 * NaN logits are treated as banned. step picks the random number: the draw is
 * u = rp_rng_uniform_f64(rp_rng_key(seed, "sampler"), step), inverse CDF over
 * ids in increasing order. Returns RP_SAMPLE_NONE if p fails
 * rp_sampler_validate, n_vocab <= 0 or every id is banned, and
 * RP_SAMPLE_NOT_FINITE - k when the logits left are all non-finite. */
size_t rp_sampler_scratch_bytes(int n_vocab);
int rp_sample(const float *logits, int n_vocab, const rp_sampler_params *p, uint64_t step,
              const int32_t *banned, int n_banned, void *scratch);

/* Why rp_sample returned result (< 0) for generated token token_index, as a
 * message: for non-finite logits "the logits are not finite (K of them) at
 * generated token N ...: check the model file or the session state";
 * otherwise that every token is banned. rp_sample_failure sets err
 * (RP_ERR_FORMAT / RP_ERR_ARG); rp_sample_failure_message returns the same
 * text in a thread-local buffer valid until the next call on the thread. */
rp_status rp_sample_failure(int result, uint64_t token_index, rp_error *err);
const char *rp_sample_failure_message(int result, uint64_t token_index);

#endif
