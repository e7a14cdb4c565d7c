/* Session state files (session_file.h). */
#include "serve/session_file.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/safetensors.h"
#include "core/version.h"
#include "model/config_pb.h"
#include "model/state.h"
#include "rwkvpipe.pb-c.h"

#define META_KEY "rwkvpipe.session"

rp_status rp_session_file_write(const char *path, const rp_config *cfg, uint64_t tokens,
                                const float *state, rp_error *err) {
    rp_state view;
    rp_state_geometry(&view, cfg, 0, cfg->n_layer, 1);
    view.data = (float *)state;
    const int L = cfg->n_layer, C = cfg->n_embd, H = cfg->n_head;
    const size_t HNN = (size_t)H * 64 * 64;
    float *att = malloc(sizeof(float) * (size_t)L * C), *ffn = malloc(sizeof(float) * (size_t)L * C);
    float *wkv = malloc(sizeof(float) * (size_t)L * HNN);
    Rwkvpipe__ModelConfig mc;
    rp_config_to_pb(cfg, &mc);
    Rwkvpipe__SessionHeader h = RWKVPIPE__SESSION_HEADER__INIT;
    h.config = &mc;
    h.tokens = tokens;
    h.created_by = (char *)rp_build_description();
    size_t n = rwkvpipe__session_header__get_packed_size(&h);
    uint8_t *packed = malloc(n ? n : 1);
    char *hex = malloc(2 * n + 1);
    if (!att || !ffn || !wkv || !packed || !hex) {
        free(att);
        free(ffn);
        free(wkv);
        free(packed);
        free(hex);
        return rp_error_set(err, RP_ERR_NOMEM, "session file buffers");
    }
    rwkvpipe__session_header__pack(&h, packed);
    for (size_t i = 0; i < n; i++) snprintf(hex + 2 * i, 3, "%02x", packed[i]);
    hex[2 * n] = '\0';
    for (int l = 0; l < L; l++) {
        memcpy(att + (size_t)l * C, rp_state_att_x_prev(&view, 0, l), sizeof(float) * C);
        memcpy(ffn + (size_t)l * C, rp_state_ffn_x_prev(&view, 0, l), sizeof(float) * C);
        memcpy(wkv + (size_t)l * HNN, rp_state_wkv(&view, 0, l), sizeof(float) * HNN);
    }
    int64_t shape_lc[2] = {L, C}, shape_wkv[4] = {L, H, 64, 64};
    rp_st_writer w;
    rp_st_writer_init(&w);
    char tok[32];
    snprintf(tok, sizeof tok, "%llu", (unsigned long long)tokens);
    rp_status st = rp_st_writer_add(&w, "state.att_x_prev", RP_DTYPE_F32, RP_DTYPE_F32, 2,
                                    shape_lc, att, err);
    if (st == RP_OK)
        st = rp_st_writer_add(&w, "state.ffn_x_prev", RP_DTYPE_F32, RP_DTYPE_F32, 2, shape_lc,
                              ffn, err);
    if (st == RP_OK)
        st = rp_st_writer_add(&w, "state.wkv", RP_DTYPE_F32, RP_DTYPE_F32, 4, shape_wkv, wkv, err);
    if (st == RP_OK) st = rp_st_writer_add_meta(&w, META_KEY, hex, err);
    if (st == RP_OK) st = rp_st_writer_add_meta(&w, "tokens", tok, err);
    if (st == RP_OK) st = rp_st_writer_write(&w, path, err);
    rp_st_writer_free(&w);
    free(att);
    free(ffn);
    free(wkv);
    free(packed);
    free(hex);
    return st;
}

static int hex_value(char c) {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    return -1;
}

/* The model shape stored in the header must be the serving model's. */
static rp_status check_header(const rp_st_file *f, const char *path, const rp_config *cfg,
                              uint64_t *tokens, rp_error *err) {
    const char *hex = rp_st_meta(f, META_KEY);
    if (!hex)
        return rp_error_set(err, RP_ERR_FORMAT, "%s: no \"%s\" metadata: not a session file "
                            "written by rwkvpipe", path, META_KEY);
    size_t n = strlen(hex) / 2;
    uint8_t *packed = malloc(n ? n : 1);
    if (!packed) return rp_error_set(err, RP_ERR_NOMEM, "session header");
    for (size_t i = 0; i < n; i++) {
        int hi = hex_value(hex[2 * i]), lo = hex_value(hex[2 * i + 1]);
        if (hi < 0 || lo < 0) {
            free(packed);
            return rp_error_set(err, RP_ERR_FORMAT, "%s: the session header is not hex", path);
        }
        packed[i] = (uint8_t)(hi * 16 + lo);
    }
    Rwkvpipe__SessionHeader *h = rwkvpipe__session_header__unpack(NULL, n, packed);
    free(packed);
    if (!h || !h->config) {
        if (h) rwkvpipe__session_header__free_unpacked(h, NULL);
        return rp_error_set(err, RP_ERR_FORMAT, "%s: the session header does not decode", path);
    }
    const Rwkvpipe__ModelConfig *c = h->config;
    rp_status st = RP_OK;
    if ((int)c->n_layer != cfg->n_layer || (int)c->n_embd != cfg->n_embd ||
        (int)c->head_size != cfg->head_size || (int)c->vocab_size != cfg->vocab_size)
        st = rp_error_set(err, RP_ERR_SHAPE,
                          "%s holds the state of a model with %u layers, C=%u, V=%u; this server "
                          "runs %d layers, C=%d, V=%d", path, c->n_layer, c->n_embd,
                          c->vocab_size, cfg->n_layer, cfg->n_embd, cfg->vocab_size);
    *tokens = h->tokens;
    rwkvpipe__session_header__free_unpacked(h, NULL);
    return st;
}

static rp_status read_tensor(const rp_st_file *f, const char *path, const char *name,
                             int ndim, const int64_t *shape, float *dst, rp_error *err) {
    const rp_st_tensor *t = rp_st_find(f, name);
    if (!t) return rp_error_set(err, RP_ERR_FORMAT, "%s: tensor %s is missing", path, name);
    int64_t numel = 1;
    int same = t->ndim == ndim;
    for (int i = 0; i < ndim; i++) {
        numel *= shape[i];
        same = same && t->shape[i] == shape[i];
    }
    if (!same)
        return rp_error_set(err, RP_ERR_SHAPE, "%s: %s has the wrong shape for this model "
                            "(expected %d dims, %lld elements)", path, name, ndim,
                            (long long)numel);
    return rp_st_read_f32(f, t, dst, numel, err);
}

rp_status rp_session_file_read(const char *path, const rp_config *cfg, uint64_t *tokens,
                               float *state, rp_error *err) {
    rp_st_file f;
    rp_status st = rp_st_open(&f, path, err);
    if (st != RP_OK) return st;
    rp_state view;
    rp_state_geometry(&view, cfg, 0, cfg->n_layer, 1);
    view.data = state;
    const int L = cfg->n_layer, C = cfg->n_embd, H = cfg->n_head;
    const size_t HNN = (size_t)H * 64 * 64;
    memset(state, 0, view.floats_per_slot * sizeof(float));
    *tokens = 0;
    if (rp_st_find(&f, "state.wkv")) {
        float *att = malloc(sizeof(float) * (size_t)L * C), *ffn = malloc(sizeof(float) * (size_t)L * C);
        float *wkv = malloc(sizeof(float) * (size_t)L * HNN);
        int64_t shape_lc[2] = {L, C}, shape_wkv[4] = {L, H, 64, 64};
        if (!att || !ffn || !wkv) st = rp_error_set(err, RP_ERR_NOMEM, "session buffers");
        if (st == RP_OK) st = check_header(&f, path, cfg, tokens, err);
        if (st == RP_OK) st = read_tensor(&f, path, "state.att_x_prev", 2, shape_lc, att, err);
        if (st == RP_OK) st = read_tensor(&f, path, "state.ffn_x_prev", 2, shape_lc, ffn, err);
        if (st == RP_OK) st = read_tensor(&f, path, "state.wkv", 4, shape_wkv, wkv, err);
        for (int l = 0; st == RP_OK && l < L; l++) {
            memcpy(rp_state_att_x_prev(&view, 0, l), att + (size_t)l * C, sizeof(float) * C);
            memcpy(rp_state_ffn_x_prev(&view, 0, l), ffn + (size_t)l * C, sizeof(float) * C);
            memcpy(rp_state_wkv(&view, 0, l), wkv + (size_t)l * HNN, sizeof(float) * HNN);
        }
        free(att);
        free(ffn);
        free(wkv);
    } else {
        /* A state-tuning file: every layer's tuned WKV state. */
        int64_t shape[3] = {H, 64, 64};
        for (int l = 0; st == RP_OK && l < L; l++) {
            char name[64];
            snprintf(name, sizeof name, "blocks.%d.att.time_state", l);
            if (!rp_st_find(&f, name)) {
                st = rp_error_set(err, RP_ERR_FORMAT,
                                  "%s is neither a session file (state.wkv) nor a state-tuning "
                                  "file (%s is missing)", path, name);
                break;
            }
            st = read_tensor(&f, path, name, 3, shape, rp_state_wkv(&view, 0, l), err);
        }
    }
    rp_st_close(&f);
    return st;
}
