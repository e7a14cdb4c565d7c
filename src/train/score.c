/* Zero-shot scoring on JSON-lines tasks (score.h). */
#include "train/score.h"

#include <jansson.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

/* log p(target | [0] + context) summed over the target tokens, and whether
 * greedy decoding reproduces every target token. */
static rp_status continuation_loglik(const rp_model *m, const int32_t *ctx, size_t n_ctx,
                                     const int32_t *tgt, size_t n_tgt, double *logp, int *greedy,
                                     rp_error *err) {
    rp_backend *be = m->be;
    const int V = m->cfg.vocab_size;
    const int n = (int)(1 + n_ctx + n_tgt - 1);  /* inputs: [0] + ctx + tgt[0..n_tgt-2] */
    int32_t *inputs = malloc((size_t)n * sizeof(int32_t));
    float *logits = be->alloc(be, (size_t)n * V * sizeof(float));
    float *host = malloc((size_t)n_tgt * V * sizeof(float));
    rp_workspace ws;
    rp_state state;
    rp_status st = rp_workspace_alloc(&ws, &m->cfg, n, be, err);
    rp_state_geometry(&state, &m->cfg, 0, m->cfg.n_layer, 1);
    state.data = be->alloc(be, state.floats_per_slot * sizeof(float));
    if (st == RP_OK && (!inputs || !logits || !host || !state.data))
        st = rp_error_set(err, RP_ERR_NOMEM, "cannot allocate scoring buffers for %d tokens", n);
    if (st == RP_OK) {
        inputs[0] = 0;
        memcpy(inputs + 1, ctx, n_ctx * sizeof(int32_t));
        memcpy(inputs + 1 + n_ctx, tgt, (n_tgt - 1) * sizeof(int32_t));
        int len = n, slot = 0, row_begin;
        rp_batch batch;
        rp_batch_init(&batch, 1, &len, &slot, &row_begin);
        st = rp_model_forward(m, &ws, inputs, &batch, &state, RP_LOGITS_ALL, logits, err);
    }
    if (st == RP_OK) {
        /* Target token j is predicted at input row n_ctx + j. */
        be->copy_to_host(be, host, logits + n_ctx * (size_t)V, n_tgt * (size_t)V * sizeof(float));
        double sum = 0;
        int all = 1;
        for (size_t j = 0; j < n_tgt; j++) {
            const float *z = host + j * (size_t)V;
            int best = 0;
            for (int i = 1; i < V; i++)
                if (z[i] > z[best]) best = i;
            double s = 0;
            for (int i = 0; i < V; i++) s += exp((double)z[i] - z[best]);
            sum += (double)z[tgt[j]] - z[best] - log(s);
            all &= best == tgt[j];
        }
        *logp = sum;
        *greedy = all;
    }
    if (state.data) be->free(be, state.data);
    if (logits) be->free(be, logits);
    rp_workspace_free(&ws, be);
    free(inputs);
    free(host);
    return st;
}

static rp_status encode(const rp_tokenizer *tok, const char *text, size_t n, int32_t **ids,
                        size_t *n_ids, const char *path, long line, const char *what,
                        rp_error *err) {
    if (rp_tokenizer_encode(tok, (const uint8_t *)text, n, ids, n_ids, err) != RP_OK)
        return rp_error_prefix(err, "%s:%ld: %s", path, line, what);
    return RP_OK;
}

rp_status rp_score_file(const rp_model *model, const rp_tokenizer *tok, rp_score_task task,
                        const char *path, FILE *per_example, rp_score_result *result,
                        rp_error *err) {
    memset(result, 0, sizeof *result);
    FILE *f = fopen(path, "r");
    if (!f) return rp_error_set(err, RP_ERR_IO, "cannot open %s", path);
    char *line = NULL;
    size_t cap = 0;
    long line_no = 0, right = 0, right_norm = 0;
    double nll_sum = 0;
    rp_status st = RP_OK;
    ssize_t got;
    while (st == RP_OK && (got = getline(&line, &cap, f)) >= 0) {
        line_no++;
        if (strspn(line, " \t\r\n") == (size_t)got) continue;
        json_error_t jerr;
        json_t *obj = json_loads(line, 0, &jerr);
        if (!obj || !json_is_object(obj)) {
            st = rp_error_set(err, RP_ERR_FORMAT, "%s:%ld: not a JSON object (%s)", path, line_no,
                              obj ? "another JSON value" : jerr.text);
            json_decref(obj);
            break;
        }
        int32_t *ctx = NULL, *tgt = NULL;
        size_t n_ctx = 0, n_tgt = 0;
        if (task == RP_SCORE_LAST_WORD) {
            json_t *t = json_object_get(obj, "text");
            const char *text = json_string_value(t);
            size_t n = json_string_length(t);
            const char *space = text ? memrchr(text, ' ', n) : NULL;
            if (!text || !space || space == text || space == text + n - 1) {
                st = rp_error_set(err, RP_ERR_FORMAT,
                                  "%s:%ld: expected {\"text\": \"context ... last_word\"} with a "
                                  "space before the last word", path, line_no);
            } else if ((st = encode(tok, text, (size_t)(space - text), &ctx, &n_ctx, path, line_no,
                                    "context", err)) == RP_OK &&
                       (st = encode(tok, space, n - (size_t)(space - text), &tgt, &n_tgt, path,
                                    line_no, "last word", err)) == RP_OK) {
                double logp;
                int greedy;
                st = continuation_loglik(model, ctx, n_ctx, tgt, n_tgt, &logp, &greedy, err);
                if (st == RP_OK) {
                    nll_sum += -logp;
                    right += greedy;
                    if (per_example)
                        fprintf(per_example, "%ld logp %.6f greedy %d\n", result->examples, logp,
                                greedy);
                    result->examples++;
                }
            }
        } else {
            json_t *c = json_object_get(obj, "context"), *choices = json_object_get(obj, "choices");
            json_t *label = json_object_get(obj, "label");
            size_t n_choices = json_array_size(choices);
            if (!json_is_string(c) || !json_is_array(choices) || n_choices < 2 ||
                !json_is_integer(label) || json_integer_value(label) < 0 ||
                (size_t)json_integer_value(label) >= n_choices) {
                st = rp_error_set(err, RP_ERR_FORMAT,
                                  "%s:%ld: expected {\"context\": \"...\", \"choices\": [\"...\", "
                                  "...] (>= 2), \"label\": index of the right choice}", path,
                                  line_no);
            } else if ((st = encode(tok, json_string_value(c), json_string_length(c), &ctx, &n_ctx,
                                    path, line_no, "context", err)) == RP_OK) {
                int best = -1, best_norm = -1;
                double best_lp = 0, best_norm_lp = 0;
                if (per_example) fprintf(per_example, "%ld label %lld logp", result->examples,
                                         (long long)json_integer_value(label));
                for (size_t k = 0; k < n_choices && st == RP_OK; k++) {
                    json_t *ch = json_array_get(choices, k);
                    if (!json_is_string(ch) || json_string_length(ch) == 0) {
                        st = rp_error_set(err, RP_ERR_FORMAT,
                                          "%s:%ld: choice %zu is not a non-empty string", path,
                                          line_no, k);
                        break;
                    }
                    free(tgt);
                    tgt = NULL;
                    if ((st = encode(tok, json_string_value(ch), json_string_length(ch), &tgt,
                                     &n_tgt, path, line_no, "choice", err)) != RP_OK)
                        break;
                    double lp;
                    int greedy;
                    st = continuation_loglik(model, ctx, n_ctx, tgt, n_tgt, &lp, &greedy, err);
                    if (st != RP_OK) break;
                    double norm = lp / (double)json_string_length(ch);
                    if (best < 0 || lp > best_lp) best = (int)k, best_lp = lp;
                    if (best_norm < 0 || norm > best_norm_lp) best_norm = (int)k, best_norm_lp = norm;
                    if (per_example) fprintf(per_example, " %.6f", lp);
                }
                if (st == RP_OK) {
                    long lab = (long)json_integer_value(label);
                    right += best == lab;
                    right_norm += best_norm == lab;
                    if (per_example)
                        fprintf(per_example, " pick %d pick_norm %d\n", best, best_norm);
                    result->examples++;
                }
            }
        }
        free(ctx);
        free(tgt);
        json_decref(obj);
    }
    free(line);
    fclose(f);
    if (st != RP_OK) return st;
    if (result->examples == 0) return rp_error_set(err, RP_ERR_FORMAT, "%s: no examples", path);
    result->accuracy = (double)right / result->examples;
    result->accuracy_norm = (double)right_norm / result->examples;
    result->perplexity = task == RP_SCORE_LAST_WORD ? exp(nll_sum / result->examples) : 0.0;
    return RP_OK;
}
