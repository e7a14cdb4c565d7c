/* The sampler as it was before top-p used partial selection (commit ded8a14's
 * src/infer/sampler.c, rp_sample and the sort it truncates with, renamed ref_*): the
 * reference that tests/test_sampler.c compares the partial selection with, token for
 * token, over many random distributions. Test-only; included by test_sampler.c. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "core/rng.h"
#include "infer/sampler.h"

/* qsort has no context argument, so the comparator reads the probabilities
 * through this pointer (thread-local: batch rows may be sampled in parallel). */
static _Thread_local const float *ref_sort_probs;

/* Descending probability, lower id first on ties, so the order (and so which
 * token top-k keeps among equals) does not depend on the qsort implementation. */
static int ref_compare_desc(const void *a, const void *b) {
    int i = *(const int *)a, j = *(const int *)b;
    float pi = ref_sort_probs[i], pj = ref_sort_probs[j];
    if (pi > pj) return -1;
    if (pi < pj) return 1;
    return (i > j) - (i < j);
}

/* Fills order[0..n) with ids by descending probability and returns how many
 * of them top-p and top-k keep (at least 1). Sorting all V ids costs ~4 ms at
 * V = 65536, so for top-p only the candidates with p >= (1 - top_p) / (2V)
 * are sorted: the ids below that hold at most (1 - top_p) / 2 of the mass, so
 * the nucleus (ties at the cut included) lies inside the candidates. If
 * rounding says otherwise, the second pass sorts every id. */
static int ref_truncate_sorted(const float *prob, int n_vocab, const rp_sampler_params *p, int *order) {
    float floor_p = p->top_p < 1.0f ? (float)((1.0 - (double)p->top_p) / (2.0 * n_vocab)) : 0.0f;
    for (int pass = 0; pass < 2; pass++, floor_p = 0.0f) {
        int n = 0;
        for (int i = 0; i < n_vocab; i++)
            if (prob[i] > 0.0f && prob[i] >= floor_p) order[n++] = i;
        ref_sort_probs = prob;
        qsort(order, (size_t)n, sizeof *order, ref_compare_desc);
        ref_sort_probs = NULL;
        int keep = n;
        if (p->top_p < 1.0f) {
            double cumulative = 0.0;
            int cut = -1;
            for (int r = 0; r < n; r++) {
                cumulative += prob[order[r]];
                if (cumulative >= p->top_p) {
                    cut = r;
                    break;
                }
            }
            if (cut < 0 && floor_p > 0.0f) continue; /* nucleus not inside the candidates */
            if (cut >= 0) {                          /* else rounding: the sum never reached top_p, keep all */
                float cutoff = prob[order[cut]];
                keep = cut + 1;
                while (keep < n && prob[order[keep]] >= cutoff) keep++;
            }
        }
        if (p->top_k > 0 && p->top_k < keep) keep = p->top_k;
        return keep > 0 ? keep : 1;
    }
    return 1; /* unreachable: the second pass always returns */
}

/* Why no id is left: all banned, or the logits of the others are NaN or
 * -inf (a broken model or state: the message must say so, not blame the
 * banned list). flags is n_vocab floats of scratch. */
static int ref_nothing_to_sample(const float *logits, int n_vocab, const int32_t *banned,
                             int n_banned, float *flags) {
    memset(flags, 0, (size_t)n_vocab * sizeof *flags);
    for (int b = 0; b < n_banned; b++)
        if (banned[b] >= 0 && banned[b] < n_vocab) flags[banned[b]] = 1.0f;
    int allowed = 0, not_finite = 0;
    for (int i = 0; i < n_vocab; i++) {
        allowed += flags[i] == 0.0f;
        not_finite += !isfinite(logits[i]);
    }
    return allowed > 0 ? RP_SAMPLE_NOT_FINITE - not_finite : RP_SAMPLE_NONE;
}

static int ref_sample(const float *logits, int n_vocab, const rp_sampler_params *p, uint64_t step,
              const int32_t *banned, int n_banned, void *scratch) {
    if (n_vocab <= 0 || !logits || !p || !scratch || rp_sampler_validate(p, NULL) != RP_OK) return -1;
    float *prob = scratch;                   /* [V] softmax probabilities */
    float *weight = prob + n_vocab;          /* [V] final unnormalised weights */
    int *order = (int *)(weight + n_vocab);  /* [V] ids by descending prob */

    /* (1) banned -> -inf. NaN logits are treated as banned: a broken logit
     * should never be sampled, and comparisons with NaN would poison max. */
    for (int i = 0; i < n_vocab; i++) prob[i] = isnan(logits[i]) ? -INFINITY : logits[i];
    for (int b = 0; b < n_banned; b++)
        if (banned[b] >= 0 && banned[b] < n_vocab) prob[banned[b]] = -INFINITY;

    int best = -1;
    for (int i = 0; i < n_vocab; i++)
        if (prob[i] > -INFINITY && (best < 0 || prob[i] > prob[best])) best = i;
    if (best < 0) return ref_nothing_to_sample(logits, n_vocab, banned, n_banned, weight);
    if (p->temperature == 0.0f) return best; /* greedy on the logits: lowest id among ties */

    /* (2) softmax in fp32 after subtracting the max (so exp never overflows).
     * +inf logits share the mass equally. */
    float max_logit = prob[best];
    double sum = 0.0;
    for (int i = 0; i < n_vocab; i++) {
        float e;
        if (isinf(max_logit)) e = prob[i] == INFINITY ? 1.0f : 0.0f;
        else e = prob[i] == -INFINITY ? 0.0f : expf(prob[i] - max_logit);
        prob[i] = e;
        sum += e;
    }
    float inv_sum = (float)(1.0 / sum);
    for (int i = 0; i < n_vocab; i++) prob[i] *= inv_sum;

    /* (3) top-p and (4) top-k both keep a prefix of the descending order:
     * top-p the prefix up to the first cumulative sum >= top_p plus every
     * token tied with the one there, top-k its first k. */
    int keep_count = 0;
    int sorted = p->top_p < 1.0f || p->top_k > 0;
    if (sorted) keep_count = ref_truncate_sorted(prob, n_vocab, p, order);

    /* (5) temperature on the truncated probabilities: p^(1/T). Dividing by
     * the largest kept p first keeps the max at 1, so a small T cannot
     * underflow every weight to 0; the renormalisation cancels the factor. */
    memset(weight, 0, (size_t)n_vocab * sizeof *weight);
    double inv_t = 1.0 / (double)p->temperature;
    double top = prob[best] > 0.0f ? prob[best] : 1.0;
    int plain = p->temperature == 1.0f;
    if (sorted) {
        for (int r = 0; r < keep_count; r++) {
            int i = order[r];
            weight[i] = plain ? prob[i] : (float)pow((double)prob[i] / top, inv_t);
        }
    } else {
        for (int i = 0; i < n_vocab; i++)
            if (prob[i] > 0.0f) weight[i] = plain ? prob[i] : (float)pow((double)prob[i] / top, inv_t);
    }

    /* (6) inverse-CDF draw over ids in increasing order. */
    double total = 0.0;
    int last = best;
    for (int i = 0; i < n_vocab; i++)
        if (weight[i] > 0.0f) {
            total += weight[i];
            last = i;
        }
    if (!(total > 0.0)) return best;
    double u = rp_rng_uniform_f64(rp_rng_key(p->seed, "sampler"), step);
    double target = u * total, cumulative = 0.0;
    for (int i = 0; i < n_vocab; i++) {
        if (weight[i] <= 0.0f) continue;
        cumulative += weight[i];
        if (target < cumulative) return i;
    }
    return last; /* u * total rounded up to the sum */
}
