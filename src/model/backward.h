/* Training passes of the RWKV-7 model: a forward that keeps what the backward
 * needs, and the backward that accumulates parameter gradients (and the
 * gradient w.r.t. the initial state). Per-part functions (embed, one block,
 * head + loss) so a pipeline stage runs only its layers; rp_model_train_step
 * chains them for a process that owns the whole model.
 * Gradients live in an rp_model allocated with the same config and layer
 * range as the weights (rp_model_alloc): the same named pointers, so the
 * optimizer and the all-reduce walk one table. */
#ifndef RP_MODEL_BACKWARD_H
#define RP_MODEL_BACKWARD_H

#include "model/model.h"

typedef struct {
    int max_rows, max_seqs;
    int layer_begin, layer_end;
    rp_layer_activations *layers;   /* [owned layers] */
    float **layer_blocks;
    /* embed / head activations */
    float *emb_rows, *ln0_mean, *ln0_rstd;
    float *x_final, *lnout_mean, *lnout_rstd, *head_in, *losses;
    /* the fused head's scratch: logits of head_chunk_rows rows at a time
     * (backend.h head_cross_entropy), never [max_rows, V] */
    float *head_scratch;
    int head_chunk_rows;
    /* the residual stream and v_first, as in rp_workspace */
    float *x, *v_first;
    /* Allocated for a backend with groupnorm + bonus/gate fused both ways
     * (no o_gn per layer, no d_gn) and with wkv7_backward_beta (no tmp_r,
     * tmp_k, tmp_v): a step refuses a backend without them (reallocate the
     * workspace after switching the entries). */
    int gn_fused, wkv_beta;
    /* Allocated for the mixes formed again (rp_mix_again at max_rows rows):
     * xa and xf have ln_rows rows (the batches the backend stores them for),
     * prev_att / prev_ffn prev_rows (those rows, or on the formed-again path
     * each sequence's first row at its sequence index). Else all max_rows. */
    int mix_again, ln_rows, prev_rows, n_embd;
    /* RP_STORE16_* bits: the saved activations sized for bf16-only storage
     * (max_rows x cols / 2 floats) on the backend's promise (backend.h
     * store16_fits); 0: every buffer fp32. */
    unsigned store16;
    /* backward scratch */
    float *dx, *dv_first, *dprev, *dxa, *dxc, *xc, *dr, *dk, *dv, *dkk, *da, *dw_raw,
        *dg, *dnu, *d_og, *d_gn, *dy, *tmp_r, *tmp_k, *tmp_v, *d_lora, *d_ffn;
    /* With the backend's fused shift_mix/shift_mix_backward (else NULL): the
     * six time-mix mixes (r k v w a g) and the gradients of their seven uses
     * (g a w v(nu) v k r; dmix[0] is dxc), [R,C] each, shared by all layers. */
    float *mix[RP_MIX_MAX], *dmix[RP_MIX_TERMS_MAX];
    float *scratch_base;
    float *own_base;                /* a stash slot's own buffers (scratch is shared) */
    /* Host [max_rows] losses, host_base (NULL in a stash slot, which shares them). */
    void *host_base;
    float *host_losses;
    /* rp_model_train_step's d(state) when its caller passes none: kept for
     * the next step (no backend allocation per step), grown to the largest
     * state seen, dstate_floats floats. */
    float *dstate_data;
    size_t dstate_floats;
} rp_backward_workspace;

/* Room for batches of up to max_rows rows in up to max_seqs sequences. */
rp_status rp_backward_workspace_alloc(rp_backward_workspace *tw, const rp_model *m, int max_rows,
                                      int max_seqs, rp_error *err);
/* A pipeline stash slot: its own saved activations (per layer, the stream x,
 * v_first, dx, d v_first and the embedding's), while the backward scratch
 * and the head's buffers (logit chunks, ln_out) are those of `share`, which
 * must outlive it (rp_backward_head keeps nothing of them). */
rp_status rp_backward_workspace_alloc_stash(rp_backward_workspace *tw, const rp_model *m,
                                            int max_rows, int max_seqs,
                                            const rp_backward_workspace *share, rp_error *err);
/* RP_ERR_ARG when tw lacks buffers that be's ops need (its entries switched
 * since the allocation: see gn_fused, wkv_beta); rp_model_train_step checks. */
rp_status rp_backward_workspace_check(const rp_backward_workspace *tw, const rp_backend *be,
                                      rp_error *err);
/* RP_ERR_ARG when batch exceeds tw: more rows or sequences than it holds, or
 * a batch the backend stores xa / prev for (rp_mix_again false) with more
 * rows than a workspace made for the mixes formed again keeps (ln_rows). */
rp_status rp_backward_workspace_check_batch(const rp_backward_workspace *tw, rp_backend *be,
                                            const rp_batch *batch, rp_error *err);
void rp_backward_workspace_free(rp_backward_workspace *tw, rp_backend *be);

/* Zeroes every owned gradient buffer of grads (an rp_model used as storage). */
void rp_model_zero(rp_model *grads);

/* ---- forward (saving activations) ---- */
rp_status rp_backward_embed_forward(const rp_model *m, rp_backward_workspace *tw,
                                    const int32_t *tokens, const rp_batch *batch, rp_error *err);
void rp_backward_block_forward(const rp_model *m, rp_backward_workspace *tw, int layer,
                               rp_state *state, const rp_batch *batch);
/* Head and cross-entropy, forward and backward at once (the fused
 * head_cross_entropy op: the logits exist one row chunk at a time): returns
 * the sum of the per-row losses over rows whose target is >= 0 (host
 * targets), accumulates the head and ln_out gradients of loss_scale * that
 * sum (loss_scale e.g. 1 / number of targets of the global batch) and leaves
 * d(residual) in tw->dx for the blocks' backward. l2wrap_factor > 0 adds the
 * official L2Wrap term: l2wrap_factor * max(logits) on the arg-max logit's
 * gradient of every row with a target (the trainer passes 1e-4 * loss_scale;
 * the forward loss is unchanged). */
double rp_backward_head(const rp_model *m, rp_model *grads, rp_backward_workspace *tw,
                        const int32_t *targets, const rp_batch *batch, float loss_scale,
                        float l2wrap_factor);

/* ---- backward: tw->dx holds d(residual) between parts ---- */
/* dstate (optional): per slot, on entry d(state after the call), on return
 * d(state before it), same layout as the state. */
void rp_backward_block_backward(const rp_model *m, rp_model *grads, rp_backward_workspace *tw,
                                int layer, rp_state *dstate, const rp_batch *batch);
void rp_backward_embed_backward(const rp_model *m, rp_model *grads, rp_backward_workspace *tw,
                                const int32_t *tokens, const rp_batch *batch);

/* The block backward split for zero-bubble schedules (schedule.h BWD_B /
 * BWD_W). _b is rp_backward_block_backward except that the six large
 * matrices (ffn key/value, output, receptance, key, value) get no weight
 * gradient: their output gradients go to wsave (rp_backward_wsave_floats
 * for the batch's rows, per layer, kept with the micro-batch's activations
 * until _w), and _w adds those weight gradients later with the same GEMMs
 * (tw->xc as scratch). _b then _w on every micro-batch in increasing order
 * gives grads bit for bit equal to rp_backward_block_backward's: every
 * gradient is accumulated by the same calls in the same order. */
size_t rp_backward_wsave_floats(const rp_config *c, int rows);
void rp_backward_block_backward_b(const rp_model *m, rp_model *grads, rp_backward_workspace *tw,
                                  int layer, rp_state *dstate, const rp_batch *batch,
                                  float *wsave);
void rp_backward_block_backward_w(const rp_model *m, rp_model *grads, rp_backward_workspace *tw,
                                  int layer, const rp_batch *batch, const float *wsave);

/* Whole model: forward from `state` (updated to the final state), then the
 * gradient of loss_scale * (sum of the cross-entropies of rows whose target
 * is >= 0) accumulated into grads (and into dstate when non-NULL: in d final
 * state, out d initial state). *loss_sum = the unscaled sum, *n_targets =
 * the rows with a target. */
rp_status rp_model_train_step(const rp_model *m, rp_model *grads, rp_backward_workspace *tw,
                              const int32_t *inputs, const int32_t *targets,
                              const rp_batch *batch, rp_state *state, rp_state *dstate,
                              float loss_scale, float l2wrap_factor, double *loss_sum,
                              int *n_targets, rp_error *err);

#endif
