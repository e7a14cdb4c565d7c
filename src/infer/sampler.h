/* Next-token sampling from logits, following the rwkv pip package order
 * (spec 6.1): banned tokens -> softmax (fp32) -> top-p -> top-k -> temperature
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

/* Returns the sampled id in [0, n_vocab). scratch must hold 2 * n_vocab floats
 * plus n_vocab ints (see rp_sampler_scratch_bytes). banned (may be NULL) lists
 * n_banned ids that get probability 0 (ids outside [0, n_vocab) are ignored);
 * NaN logits are treated as banned. step picks the random number: the draw is
 * u = rp_rng_uniform_f64(rp_rng_key(seed, "sampler"), step), inverse CDF over
 * ids in increasing order. Returns -1 if p fails rp_sampler_validate, n_vocab
 * <= 0, or every id is banned. */
size_t rp_sampler_scratch_bytes(int n_vocab);
int rp_sample(const float *logits, int n_vocab, const rp_sampler_params *p, uint64_t step,
              const int32_t *banned, int n_banned, void *scratch);

#endif
