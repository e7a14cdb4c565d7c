/* Prefill + decode loop (generate.h). */
#include "infer/generate.h"
#include "core/clock.h"

#include <stdlib.h>
#include <time.h>

rp_status rp_generate(const rp_model *m, rp_state *state, const int32_t *prompt, int n_prompt,
                      const rp_generate_options *opt, rp_token_callback on_token, void *user,
                      rp_generate_stats *stats, rp_error *err) {
    rp_generate_stats local = {0};
    if (!stats) stats = &local;
    *stats = local;
    if (n_prompt < 1) return rp_error_set(err, RP_ERR_ARG, "the prompt is empty: give at least one token");
    if (opt->prefill_chunk < 1)
        return rp_error_set(err, RP_ERR_ARG, "prefill chunk %d must be >= 1", opt->prefill_chunk);
    if (opt->max_new_tokens < 0)
        return rp_error_set(err, RP_ERR_ARG, "max tokens %d must be >= 0", opt->max_new_tokens);
    rp_status st = rp_sampler_validate(&opt->sampler, err);
    if (st != RP_OK) return st;

    rp_backend *be = m->be;
    const int V = m->cfg.vocab_size;
    int chunk = opt->prefill_chunk < n_prompt ? opt->prefill_chunk : n_prompt;
    rp_workspace ws;
    if ((st = rp_workspace_alloc(&ws, &m->cfg, chunk, be, err)) != RP_OK) return st;
    float *logits_dev = be->alloc(be, (size_t)V * sizeof(float));
    float *logits = malloc((size_t)V * sizeof(float));
    void *scratch = malloc(rp_sampler_scratch_bytes(V));
    if (!logits_dev || !logits || !scratch) {
        st = rp_error_set(err, RP_ERR_NOMEM, "cannot allocate logits for a %d-token vocabulary", V);
        goto done;
    }

    int slot = 0, row_begin = 0;
    rp_batch batch;
    double t0 = rp_now_seconds();
    for (int pos = 0; pos < n_prompt; pos += chunk) {
        int len = n_prompt - pos < chunk ? n_prompt - pos : chunk;
        rp_batch_init(&batch, 1, &len, &slot, &row_begin);
        /* Only the last chunk needs logits. */
        rp_logits_mode mode = pos + len == n_prompt ? RP_LOGITS_LAST : RP_LOGITS_NONE;
        st = rp_model_forward(m, &ws, prompt + pos, &batch, state, mode, logits_dev, err);
        if (st != RP_OK) goto done;
    }
    be->synchronize(be);
    stats->prompt_tokens = n_prompt;
    stats->prefill_seconds = rp_now_seconds() - t0;

    t0 = rp_now_seconds();
    int one = 1;
    rp_batch_init(&batch, 1, &one, &slot, &row_begin);
    for (int i = 0; i < opt->max_new_tokens; i++) {
        be->copy_to_host(be, logits, logits_dev, (size_t)V * sizeof(float));
        if ((st = be->status(be, err)) != RP_OK) goto done;  /* a device fault, if any */
        int32_t token = rp_sample(logits, V, &opt->sampler, (uint64_t)i, opt->banned,
                                  opt->n_banned, scratch);
        if (opt->stop_at_eot && token == opt->eot_id) {
            stats->stopped_by = 1;
            break;
        }
        stats->generated_tokens++;
        if (on_token && on_token(token, user)) {
            stats->stopped_by = 2;
            break;
        }
        if (i + 1 == opt->max_new_tokens) break;  /* no forward for a token nobody reads */
        st = rp_model_forward(m, &ws, &token, &batch, state, RP_LOGITS_LAST, logits_dev, err);
        if (st != RP_OK) goto done;
    }
    stats->decode_seconds = rp_now_seconds() - t0;
done:
    free(scratch);
    free(logits);
    if (logits_dev) be->free(be, logits_dev);
    rp_workspace_free(&ws, be);
    return st;
}
