/* Shard-backed window loader (loader.h): permutation, eval split, DP sharding
 * and the resumable cursor. Nothing per window is stored except the list of
 * eval windows (eval_fraction of them), so the loader's memory does not grow
 * with the corpus. */
#include "train/loader.h"

#include <dirent.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "core/rng.h"
#include "train/shards.h"

static uint64_t mix64(uint64_t x) {
    x ^= x >> 30;
    x *= 0xbf58476d1ce4e5b9ull;
    x ^= x >> 27;
    x *= 0x94d049bb133111ebull;
    x ^= x >> 31;
    return x;
}

uint64_t rp_permute_index(uint64_t n, uint64_t key, uint64_t i) {
    if (n <= 1 || i >= n) return i;
    unsigned bits = 64 - (unsigned)__builtin_clzll(n - 1); /* 2^bits >= n */
    unsigned half = (bits + 1) / 2;
    const uint64_t mask = (1ull << half) - 1;
    uint64_t x = i;
    /* Cycle walking: the Feistel network permutes [0, 4^half) (< 4n values),
     * so following x's cycle until it re-enters [0, n) takes < 4 steps on
     * average and yields a bijection of [0, n). */
    do {
        uint64_t left = x >> half, right = x & mask;
        for (uint64_t round = 0; round < 6; round++) {
            uint64_t f = mix64(right ^ mix64(key + round * 0x9e3779b97f4a7c15ull)) & mask;
            uint64_t next = left ^ f;
            left = right;
            right = next;
        }
        x = left << half | right;
    } while (x >= n);
    return x;
}

typedef struct {
    rp_shard shard;
    uint64_t first_window; /* global number of its window 0 */
    uint64_t n_windows;
} loader_shard;

struct rp_loader {
    loader_shard *shards;
    size_t n_shards;
    int ctx_len;
    uint64_t seed, eval_key, order_key;
    double eval_fraction;
    uint64_t n_windows, n_tokens;
    uint64_t forced_eval, forced_train; /* UINT64_MAX when none */
    uint64_t *eval_windows;
    uint64_t n_eval;
    rp_loader_position pos;
    uint64_t epoch_key; /* order key of pos.epoch */
};

int rp_loader_ctx_len(const rp_loader *l) { return l->ctx_len; }
uint64_t rp_loader_n_windows(const rp_loader *l) { return l->n_windows; }
uint64_t rp_loader_n_train(const rp_loader *l) { return l->n_windows - l->n_eval; }
uint64_t rp_loader_n_eval(const rp_loader *l) { return l->n_eval; }
uint64_t rp_loader_n_tokens(const rp_loader *l) { return l->n_tokens; }
size_t rp_loader_n_shards(const rp_loader *l) { return l->n_shards; }
const char *rp_loader_shard_path(const rp_loader *l, size_t i) { return l->shards[i].shard.path; }
uint32_t rp_loader_n_ids(const rp_loader *l) { return l->shards[0].shard.n_ids; }
const char *rp_loader_tokenizer(const rp_loader *l) {
    return rp_shard_tokenizer_name(l->shards[0].shard.tokenizer_kind);
}

static int draw_is_eval(const rp_loader *l, uint64_t w) {
    return rp_rng_uniform_f64(l->eval_key, w) < l->eval_fraction;
}

int rp_loader_is_eval(const rp_loader *l, uint64_t w) {
    if (w == l->forced_train) return 0;
    return w == l->forced_eval || draw_is_eval(l, w);
}

static uint64_t epoch_order_key(const rp_loader *l, uint64_t epoch) {
    return mix64(l->order_key ^ mix64(epoch + 0x632be59bd9b4e019ull));
}

void rp_loader_free(rp_loader *l) {
    if (!l) return;
    for (size_t i = 0; i < l->n_shards; i++) rp_shard_close(&l->shards[i].shard);
    free(l->shards);
    free(l->eval_windows);
    free(l);
}

/* ------------------------------------------------------------ shard list */

typedef struct {
    char **items;
    size_t n, cap;
} path_list;

static int path_list_add(path_list *list, const char *path) {
    if (list->n == list->cap) {
        size_t cap = list->cap ? 2 * list->cap : 16;
        char **grown = realloc(list->items, cap * sizeof *grown);
        if (!grown) return -1;
        list->items = grown;
        list->cap = cap;
    }
    if (!(list->items[list->n] = strdup(path))) return -1;
    list->n++;
    return 0;
}

static void path_list_free(path_list *list) {
    for (size_t i = 0; i < list->n; i++) free(list->items[i]);
    free(list->items);
}

static int compare_strings(const void *a, const void *b) {
    return strcmp(*(char *const *)a, *(char *const *)b);
}

/* A directory contributes its *.tok files in name order. */
static rp_status expand_path(path_list *list, const char *path, rp_error *err) {
    struct stat sb;
    if (stat(path, &sb) != 0)
        return rp_error_set(err, RP_ERR_IO, "%s: cannot open token shards: %s", path, strerror(errno));
    if (!S_ISDIR(sb.st_mode)) {
        if (path_list_add(list, path) != 0) return rp_error_set(err, RP_ERR_NOMEM, "out of memory");
        return RP_OK;
    }
    DIR *d = opendir(path);
    if (!d) return rp_error_set(err, RP_ERR_IO, "%s: cannot list directory: %s", path, strerror(errno));
    path_list found = {0};
    struct dirent *ent;
    rp_status st = RP_OK;
    while ((ent = readdir(d)) != NULL) {
        size_t n = strlen(ent->d_name);
        if (n < 5 || strcmp(ent->d_name + n - 4, ".tok") != 0 || ent->d_name[0] == '.') continue;
        char child[4096];
        snprintf(child, sizeof child, "%s/%s", path, ent->d_name);
        if (path_list_add(&found, child) != 0) {
            st = rp_error_set(err, RP_ERR_NOMEM, "out of memory");
            break;
        }
    }
    closedir(d);
    if (st == RP_OK && found.n == 0)
        st = rp_error_set(err, RP_ERR_ARG,
                          "%s: directory holds no *.tok token shards (make them with `rwkvpipe "
                          "tokenize`)",
                          path);
    if (st == RP_OK) {
        qsort(found.items, found.n, sizeof *found.items, compare_strings);
        for (size_t i = 0; i < found.n && st == RP_OK; i++)
            if (path_list_add(list, found.items[i]) != 0)
                st = rp_error_set(err, RP_ERR_NOMEM, "out of memory");
    }
    path_list_free(&found);
    return st;
}

/* ------------------------------------------------------------------- open */

static rp_status build_split(rp_loader *l, rp_error *err) {
    uint64_t n_eval = 0, argmin = 0, argmax = 0;
    double dmin = 2.0, dmax = -1.0;
    for (uint64_t w = 0; w < l->n_windows; w++) {
        double u = rp_rng_uniform_f64(l->eval_key, w);
        if (u < l->eval_fraction) n_eval++;
        if (u < dmin) dmin = u, argmin = w;
        if (u > dmax) dmax = u, argmax = w;
    }
    if (l->eval_fraction > 0 && n_eval == 0 && l->n_windows >= 2) {
        l->forced_eval = argmin;
        n_eval = 1;
    }
    if (n_eval == l->n_windows && l->n_windows >= 2) {
        l->forced_train = argmax;
        n_eval--;
    }
    if (n_eval == l->n_windows)
        return rp_error_set(err, RP_ERR_ARG,
                            "the shards hold %llu window(s) of %d+1 tokens, all held out for "
                            "eval (eval fraction %g); lower the eval fraction or add data",
                            (unsigned long long)l->n_windows, l->ctx_len, l->eval_fraction);
    l->n_eval = n_eval;
    if (n_eval) {
        l->eval_windows = rp_malloc(n_eval * sizeof *l->eval_windows, "eval window list", err);
        if (!l->eval_windows) return RP_ERR_NOMEM;
        uint64_t k = 0;
        for (uint64_t w = 0; w < l->n_windows; w++)
            if (rp_loader_is_eval(l, w)) l->eval_windows[k++] = w;
        if (k != n_eval)
            return rp_error_set(err, RP_ERR_INTERNAL, "eval split counted %llu then %llu windows",
                                (unsigned long long)n_eval, (unsigned long long)k);
    }
    return RP_OK;
}

rp_status rp_loader_open(rp_loader **out, const char *const *paths, size_t n_paths, int ctx_len,
                         uint64_t seed, double eval_fraction, rp_error *err) {
    *out = NULL;
    if (n_paths == 0) return rp_error_set(err, RP_ERR_ARG, "loader: no token shard paths given");
    if (ctx_len < 1) return rp_error_set(err, RP_ERR_ARG, "loader: ctx_len %d must be >= 1", ctx_len);
    if (!(eval_fraction >= 0.0 && eval_fraction < 1.0))
        return rp_error_set(err, RP_ERR_ARG, "loader: eval fraction %g is not in [0, 1)",
                            eval_fraction);
    path_list list = {0};
    rp_status st = RP_OK;
    for (size_t i = 0; i < n_paths && st == RP_OK; i++) st = expand_path(&list, paths[i], err);
    if (st != RP_OK) {
        path_list_free(&list);
        return st;
    }
    rp_loader *l = rp_calloc(1, sizeof *l, "loader", err);
    if (l) l->shards = rp_calloc(list.n, sizeof *l->shards, "loader shards", err);
    if (!l || !l->shards) {
        free(l);
        path_list_free(&list);
        return RP_ERR_NOMEM;
    }
    l->ctx_len = ctx_len;
    l->seed = seed;
    l->eval_fraction = eval_fraction;
    l->eval_key = rp_rng_key(seed, "loader.eval");
    l->order_key = rp_rng_key(seed, "loader.order");
    l->forced_eval = l->forced_train = UINT64_MAX;
    for (size_t i = 0; i < list.n && st == RP_OK; i++) {
        loader_shard *ls = &l->shards[i];
        if ((st = rp_shard_open(&ls->shard, list.items[i], err)) != RP_OK) break;
        l->n_shards++;
        const rp_shard *first = &l->shards[0].shard, *s = &ls->shard;
        if (s->tokenizer_kind != first->tokenizer_kind || s->n_ids != first->n_ids) {
            st = rp_error_set(err, RP_ERR_FORMAT,
                              "%s: tokenizer %s with %u ids, but %s has %s with %u ids; every "
                              "shard of a corpus must come from the same tokenizer",
                              s->path, rp_shard_tokenizer_name(s->tokenizer_kind), s->n_ids,
                              first->path, rp_shard_tokenizer_name(first->tokenizer_kind),
                              first->n_ids);
            break;
        }
        ls->first_window = l->n_windows;
        ls->n_windows = s->n_tokens > (uint64_t)ctx_len ? (s->n_tokens - 1) / (uint64_t)ctx_len : 0;
        l->n_windows += ls->n_windows;
        l->n_tokens += s->n_tokens;
    }
    path_list_free(&list);
    if (st == RP_OK && l->n_windows == 0)
        st = rp_error_set(err, RP_ERR_ARG,
                          "the shards hold %llu tokens but no shard has the %d tokens of one "
                          "window (ctx_len + 1); use a smaller ctx_len or more data",
                          (unsigned long long)l->n_tokens, ctx_len + 1);
    if (st == RP_OK) st = build_split(l, err);
    if (st != RP_OK) {
        rp_loader_free(l);
        return st;
    }
    l->pos.n_windows = l->n_windows;
    l->epoch_key = epoch_order_key(l, 0);
    *out = l;
    return RP_OK;
}

/* ---------------------------------------------------------------- windows */

rp_status rp_loader_window(const rp_loader *l, uint64_t window, int32_t *out, rp_error *err) {
    if (window >= l->n_windows)
        return rp_error_set(err, RP_ERR_ARG, "loader: window %llu is out of range [0, %llu)",
                            (unsigned long long)window, (unsigned long long)l->n_windows);
    size_t lo = 0, hi = l->n_shards; /* last shard with first_window <= window */
    while (hi - lo > 1) {
        size_t mid = lo + (hi - lo) / 2;
        if (l->shards[mid].first_window <= window) lo = mid;
        else hi = mid;
    }
    while (window - l->shards[lo].first_window >= l->shards[lo].n_windows) lo++; /* empty shards */
    const loader_shard *ls = &l->shards[lo];
    uint64_t start = (window - ls->first_window) * (uint64_t)l->ctx_len;
    return rp_shard_read(&ls->shard, start, (size_t)l->ctx_len + 1, out, err);
}

rp_status rp_loader_eval_window(const rp_loader *l, uint64_t j, int32_t *out, uint64_t *window_id,
                                rp_error *err) {
    if (j >= l->n_eval)
        return rp_error_set(err, RP_ERR_ARG, "loader: eval window %llu is out of range [0, %llu)",
                            (unsigned long long)j, (unsigned long long)l->n_eval);
    if (window_id) *window_id = l->eval_windows[j];
    return rp_loader_window(l, l->eval_windows[j], out, err);
}

static uint64_t next_train_window(rp_loader *l) {
    for (;;) {
        if (l->pos.index == l->n_windows) {
            l->pos.epoch++;
            l->pos.index = 0;
            l->epoch_key = epoch_order_key(l, l->pos.epoch);
        }
        uint64_t w = rp_permute_index(l->n_windows, l->epoch_key, l->pos.index++);
        if (!rp_loader_is_eval(l, w)) {
            l->pos.samples++;
            return w;
        }
    }
}

rp_status rp_loader_next_batch(rp_loader *l, int batch_size, int32_t *tokens_out,
                               uint64_t *window_ids_out, int rank, int n_ranks, rp_error *err) {
    if (batch_size < 1 || n_ranks < 1 || rank < 0 || rank >= n_ranks)
        return rp_error_set(err, RP_ERR_ARG,
                            "loader: batch size %d, rank %d of %d ranks: need batch >= 1 and "
                            "0 <= rank < ranks",
                            batch_size, rank, n_ranks);
    const size_t row = (size_t)l->ctx_len + 1;
    const uint64_t total = (uint64_t)batch_size * (uint64_t)n_ranks;
    for (uint64_t g = 0; g < total; g++) {
        uint64_t w = next_train_window(l);
        if (g % (uint64_t)n_ranks != (uint64_t)rank) continue;
        uint64_t slot = g / (uint64_t)n_ranks;
        if (window_ids_out) window_ids_out[slot] = w;
        rp_status st = rp_loader_window(l, w, tokens_out + slot * row, err);
        if (st != RP_OK) return st;
    }
    return RP_OK;
}

void rp_loader_get_position(const rp_loader *l, rp_loader_position *pos) { *pos = l->pos; }

rp_status rp_loader_set_position(rp_loader *l, const rp_loader_position *pos, rp_error *err) {
    if (pos->n_windows != l->n_windows)
        return rp_error_set(err, RP_ERR_ARG,
                            "loader: the saved data position is over %llu windows but these "
                            "shards give %llu (ctx_len %d); resume with the same shards and "
                            "ctx_len",
                            (unsigned long long)pos->n_windows, (unsigned long long)l->n_windows,
                            l->ctx_len);
    if (pos->index > l->n_windows)
        return rp_error_set(err, RP_ERR_ARG, "loader: saved index %llu is beyond %llu windows",
                            (unsigned long long)pos->index, (unsigned long long)l->n_windows);
    l->pos = *pos;
    l->epoch_key = epoch_order_key(l, pos->epoch);
    return RP_OK;
}
