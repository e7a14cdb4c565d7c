/* Next-token sampler (see sampler.h, docs/rwkv7.md Sampling): banned -> softmax -> top-p ->
 * top-k -> p^(1/T) -> inverse-CDF draw with the counter-based RNG. Called once
 * per generated token by src/cli and the server; all memory is the caller's
 * scratch, so it never allocates. */
#include "infer/sampler.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "core/rng.h"

void rp_sampler_defaults(rp_sampler_params *p) {
    p->temperature = 1.0f;
    p->top_p = 0.85f;
    p->top_k = 0;
    p->seed = 42;
}

rp_status rp_sampler_validate(const rp_sampler_params *p, rp_error *err) {
    if (isnan(p->temperature) || isinf(p->temperature) || p->temperature < 0.0f)
        return rp_error_set(err, RP_ERR_ARG, "sampler: temperature %g is invalid; expected a finite value >= 0 "
                            "(0 = greedy)", (double)p->temperature);
    if (isnan(p->top_p) || !(p->top_p > 0.0f && p->top_p <= 1.0f))
        return rp_error_set(err, RP_ERR_ARG, "sampler: top_p %g is invalid; expected a value in (0, 1] (1 = off)",
                            (double)p->top_p);
    if (p->top_k < 0)
        return rp_error_set(err, RP_ERR_ARG, "sampler: top_k %d is invalid; expected >= 0 (0 = off)", p->top_k);
    return RP_OK;
}

size_t rp_sampler_scratch_bytes(int n_vocab) {
    if (n_vocab <= 0) return 0;
    return 2 * (size_t)n_vocab * sizeof(float) + (size_t)n_vocab * sizeof(int);
}

/* qsort has no context argument, so the comparator reads the probabilities
 * through this pointer (thread-local: batch rows may be sampled in parallel). */
static _Thread_local const float *sort_probs;

/* Descending probability, lower id first on ties, so the order (and so which
 * token top-k keeps among equals) does not depend on the qsort implementation. */
static int compare_desc(const void *a, const void *b) {
    int i = *(const int *)a, j = *(const int *)b;
    float pi = sort_probs[i], pj = sort_probs[j];
    if (pi > pj) return -1;
    if (pi < pj) return 1;
    return (i > j) - (i < j);
}

/* Fills order[0..n) with ids by descending probability and returns how many
 * of them top-p and top-k keep (at least 1). The reference definition, and the
 * fallback of truncate_partial: sorting all V ids costs ~4 ms at V = 65536, so
 * for top-p only the candidates with p >= (1 - top_p) / (2V) are sorted: the
 * ids below that hold at most (1 - top_p) / 2 of the mass, so the nucleus
 * (ties at the cut included) lies inside the candidates. If rounding says
 * otherwise, the second pass sorts every id. */
static int truncate_sorted(const float *prob, int n_vocab, const rp_sampler_params *p, int *order) {
    float floor_p = p->top_p < 1.0f ? (float)((1.0 - (double)p->top_p) / (2.0 * n_vocab)) : 0.0f;
    for (int pass = 0; pass < 2; pass++, floor_p = 0.0f) {
        int n = 0;
        for (int i = 0; i < n_vocab; i++)
            if (prob[i] > 0.0f && prob[i] >= floor_p) order[n++] = i;
        sort_probs = prob;
        qsort(order, (size_t)n, sizeof *order, compare_desc);
        sort_probs = NULL;
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

/* a before b in the sorted order: higher probability, then lower id */
static int ranks_before(const float *prob, int a, int b) {
    return prob[a] > prob[b] || (prob[a] == prob[b] && a < b);
}

static void swap_ids(int *x, int i, int j) {
    int t = x[i];
    x[i] = x[j];
    x[j] = t;
}

/* Reorders ids[0..n) so that its first k are the k first in the sorted order
 * (in no particular order), 0 < k < n: quickselect (Lomuto partition around a
 * median-of-three pivot). The order is strict (ids differ), so the set is
 * unique. Invariant: ids[0..lo) rank before ids[lo..), ids[hi..) after
 * ids[..hi), and lo <= k <= hi. */
static void select_first_k(const float *prob, int *ids, int n, int k) {
    int lo = 0, hi = n;
    while (hi - lo > 1) {
        int mid = lo + (hi - lo) / 2, last = hi - 1;
        if (ranks_before(prob, ids[mid], ids[lo])) swap_ids(ids, mid, lo);
        if (ranks_before(prob, ids[last], ids[lo])) swap_ids(ids, last, lo);
        if (ranks_before(prob, ids[mid], ids[last])) swap_ids(ids, mid, last); /* median to last */
        const int pivot = ids[last];
        int store = lo;
        for (int i = lo; i < last; i++)
            if (ranks_before(prob, ids[i], pivot)) swap_ids(ids, i, store++);
        swap_ids(ids, store, last); /* exactly `store` ids rank before the pivot */
        if (store == k) return;
        if (store < k) lo = store + 1;
        else hi = store;
    }
}

/* The same result as truncate_sorted without sorting: the set top-p keeps is
 * every id with p >= v*, where v* is the probability at the cut, the largest
 * value whose mass (ids with p >= v) reaches top_p. A three-way quickselect
 * over the values finds v* in O(V), summing each part's mass; the sums come
 * in another order than the sorted cumulative sum, so they may differ from it
 * by rounding (below 1e-11 for 65536 terms): when the mass just above or at
 * v* lies within 1e-9 of top_p, the decision could differ, and the sorted
 * reference decides instead. top-k then selects its first k (quickselect).
 * order[0..keep) receives the kept ids in no particular order (the draw goes
 * over ids in increasing order, so only the set matters). */
static int truncate_partial(const float *prob, int n_vocab, const rp_sampler_params *p, int *order) {
    const double eps = 1e-9;
    int n = 0, keep = 0;
    if (p->top_p < 1.0f) {
        const float floor_p = (float)((1.0 - (double)p->top_p) / (2.0 * n_vocab));
        for (int i = 0; i < n_vocab; i++)
            if (prob[i] > 0.0f && prob[i] >= floor_p) order[n++] = i;
        const double top_p = p->top_p;
        double above = 0.0; /* the mass of order[0..a): values above the range */
        int a = 0, b = n, found = 0;
        while (a < b) {
            /* median of three values as the pivot */
            float x = prob[order[a]], y = prob[order[a + (b - a) / 2]], z = prob[order[b - 1]];
            float pv = x < y ? (y < z ? y : (x < z ? z : x)) : (x < z ? x : (y < z ? z : y));
            /* three-way partition of [a, b): > pv | == pv | < pv */
            int lt = a, i = a, gt = b;
            double m_gt = 0.0, m_eq = 0.0;
            while (i < gt) {
                float v = prob[order[i]];
                if (v > pv) {
                    m_gt += v;
                    swap_ids(order, lt++, i++);
                } else if (v < pv) {
                    swap_ids(order, i, --gt);
                } else {
                    m_eq += v;
                    i++;
                }
            }
            if (above + m_gt >= top_p) {
                b = lt;           /* v* > pv */
            } else if (above + m_gt + m_eq >= top_p) {
                if (above + m_gt >= top_p - eps || above + m_gt + m_eq < top_p + eps) break;
                keep = gt;        /* v* = pv: order[0..gt) hold p >= pv */
                found = 1;
                break;
            } else {
                above += m_gt + m_eq;
                a = gt;           /* v* < pv */
            }
        }
        if (!found) return truncate_sorted(prob, n_vocab, p, order);
    } else {
        for (int i = 0; i < n_vocab; i++)
            if (prob[i] > 0.0f) order[n++] = i;
        keep = n;
    }
    if (p->top_k > 0 && p->top_k < keep) {
        select_first_k(prob, order, keep, p->top_k);
        keep = p->top_k;
    }
    return keep > 0 ? keep : 1;
}

/* Why no id is left: all banned, or the logits of the others are NaN or
 * -inf (a broken model or state: the message must say so, not blame the
 * banned list). flags is n_vocab floats of scratch. */
static int nothing_to_sample(const float *logits, int n_vocab, const int32_t *banned,
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

rp_status rp_sample_failure(int result, uint64_t token_index, rp_error *err) {
    if (result <= RP_SAMPLE_NOT_FINITE)
        return rp_error_set(err, RP_ERR_FORMAT,
                            "the logits are not finite at generated token %llu (%d NaN or "
                            "infinite values, none left to sample from): the model produced "
                            "NaN/inf; check the model file or the session state",
                            (unsigned long long)token_index, RP_SAMPLE_NOT_FINITE - result);
    return rp_error_set(err, RP_ERR_ARG,
                        "every token is banned at generated token %llu: nothing can be sampled",
                        (unsigned long long)token_index);
}

const char *rp_sample_failure_message(int result, uint64_t token_index) {
    static _Thread_local rp_error err;
    rp_sample_failure(result, token_index, &err);
    return err.msg;
}

int rp_sample(const float *logits, int n_vocab, const rp_sampler_params *p, uint64_t step,
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
    if (best < 0) return nothing_to_sample(logits, n_vocab, banned, n_banned, weight);
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
    if (sorted) keep_count = truncate_partial(prob, n_vocab, p, order);

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
