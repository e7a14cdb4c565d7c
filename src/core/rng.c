/* Counter-based random numbers (rng.h): Philox4x32-10 (Salmon et al., SC'11)
 * and the stream/element mapping used by model init. Element `index` of
 * stream `key` is one Philox block at counter (hi 0, lo index), so any slice
 * of a tensor can be drawn alone, in any order, by any rank. */
#include "core/rng.h"

#include <math.h>

#define PHILOX_M0 0xD2511F53u
#define PHILOX_M1 0xCD9E8D57u
#define PHILOX_W0 0x9E3779B9u /* golden ratio */
#define PHILOX_W1 0xBB67AE85u /* sqrt(3) - 1 */

static inline void mulhilo32(uint32_t a, uint32_t b, uint32_t *hi, uint32_t *lo) {
    uint64_t product = (uint64_t)a * b;
    *hi = (uint32_t)(product >> 32);
    *lo = (uint32_t)product;
}

/* Word mapping (fixed, checked against the Random123 known-answer vectors):
 *   ctr = {counter_lo bits 0-31, counter_lo bits 32-63,
 *          counter_hi bits 0-31, counter_hi bits 32-63}
 *   key = {key bits 0-31, key bits 32-63} */
void rp_philox4x32(uint64_t key, uint64_t counter_hi, uint64_t counter_lo, uint32_t out[4]) {
    uint32_t c0 = (uint32_t)counter_lo, c1 = (uint32_t)(counter_lo >> 32);
    uint32_t c2 = (uint32_t)counter_hi, c3 = (uint32_t)(counter_hi >> 32);
    uint32_t k0 = (uint32_t)key, k1 = (uint32_t)(key >> 32);
    for (int round = 0; round < 10; round++) {
        if (round > 0) {
            k0 += PHILOX_W0;
            k1 += PHILOX_W1;
        }
        uint32_t hi0, lo0, hi1, lo1;
        mulhilo32(PHILOX_M0, c0, &hi0, &lo0);
        mulhilo32(PHILOX_M1, c2, &hi1, &lo1);
        uint32_t n0 = hi1 ^ c1 ^ k0, n2 = hi0 ^ c3 ^ k1;
        c0 = n0;
        c1 = lo1;
        c2 = n2;
        c3 = lo0;
    }
    out[0] = c0;
    out[1] = c1;
    out[2] = c2;
    out[3] = c3;
}

/* 53 random bits from two words, scaled to [0, 1). */
static inline double u53(uint32_t high_word, uint32_t low_word) {
    uint64_t bits = (((uint64_t)high_word << 32) | low_word) >> 11;
    return (double)bits * 0x1.0p-53;
}

float rp_rng_uniform(uint64_t key, uint64_t index) {
    uint32_t out[4];
    rp_philox4x32(key, 0, index, out);
    /* 24 bits: every value is exactly representable, so the result is < 1. */
    return (float)(out[0] >> 8) * 0x1.0p-24f;
}

double rp_rng_uniform_f64(uint64_t key, uint64_t index) {
    uint32_t out[4];
    rp_philox4x32(key, 0, index, out);
    return u53(out[0], out[1]);
}

double rp_rng_normal(uint64_t key, uint64_t index) {
    uint32_t out[4];
    rp_philox4x32(key, 0, index, out);
    /* 1 - u lies in (0, 1], so the log never sees 0. */
    double radius_u = 1.0 - u53(out[0], out[1]);
    double angle_u = u53(out[2], out[3]);
    return sqrt(-2.0 * log(radius_u)) * cos(2.0 * M_PI * angle_u);
}

uint64_t rp_rng_key(uint64_t seed, const char *name) {
    uint64_t h = 0xcbf29ce484222325ull; /* FNV-1a 64 offset basis */
    for (const unsigned char *p = (const unsigned char *)name; *p; p++) {
        h ^= *p;
        h *= 0x100000001b3ull; /* FNV prime */
    }
    /* SplitMix64 finalizer: one seed bit flips about half the key bits. */
    uint64_t z = h ^ seed;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}
