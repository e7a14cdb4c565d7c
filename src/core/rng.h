/* Counter-based random numbers (Philox4x32-10). A value is a pure function of
 * (key, counter), so every rank draws the same number for the same tensor
 * element without sharing a stream, and any slice can be generated alone. */
#ifndef RP_CORE_RNG_H
#define RP_CORE_RNG_H

#include <stdint.h>

/* Philox4x32-10 block: four 32-bit outputs for (key, counter). */
void rp_philox4x32(uint64_t key, uint64_t counter_hi, uint64_t counter_lo, uint32_t out[4]);

/* Uniform in [0, 1) with 24 random bits, element `index` of stream `key`. */
float rp_rng_uniform(uint64_t key, uint64_t index);
/* Uniform in [0, 1) with 53 random bits. */
double rp_rng_uniform_f64(uint64_t key, uint64_t index);
/* Standard normal (Box-Muller on two 53-bit uniforms), element `index`. */
double rp_rng_normal(uint64_t key, uint64_t index);

/* Mixes a seed and a string (e.g. a tensor name) into a stream key (FNV-1a then
 * a SplitMix64 finalizer), so each tensor has its own stream. */
uint64_t rp_rng_key(uint64_t seed, const char *name);

#endif
