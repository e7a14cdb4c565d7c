/* The prefix state cache's index (src/infer/prefix_cache.c): the longest
 * verified prefix wins, a hash collision with other tokens is a miss, the
 * LRU evicts under the byte budget, equal prefixes are stored once, and a
 * prefix read from one origin (zero, a session's version) is never found
 * for another. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include "infer/prefix_cache.h"

static uint64_t collide(uint64_t h, int32_t t) {
    (void)h;
    (void)t;
    return 7;  /* every prefix of every sequence has the same hash */
}

static uint64_t put(rp_prefix_cache *c, const int32_t *t, int len, int *n_ev, uint64_t *ev) {
    uint64_t id;
    int is_new;
    rp_error err;
    assert_int_equal(rp_prefix_cache_insert(c, 0, t, len, &id, &is_new, ev, 16, n_ev, &err), RP_OK);
    return id;
}

static void test_longest_prefix(void **state) {
    (void)state;
    rp_prefix_cache c;
    rp_prefix_cache_init(&c, 1 << 20, 1000);
    const int32_t a[] = {1, 2, 3, 4, 5, 6, 7, 8};
    uint64_t ev[16];
    int n_ev, len;
    uint64_t id3 = put(&c, a, 3, &n_ev, ev), id6 = put(&c, a, 6, &n_ev, ev);
    assert_true(id3 != 0 && id6 != 0 && id3 != id6);
    assert_int_equal(c.bytes, 2 * 1000 + 9 * 4);
    assert_int_equal(rp_prefix_cache_lookup(&c, 0, a, 8, &len), id6);
    assert_int_equal(len, 6);
    /* at most 5 tokens: the 6-token entry does not fit */
    assert_int_equal(rp_prefix_cache_lookup(&c, 0, a, 5, &len), id3);
    assert_int_equal(len, 3);
    const int32_t b[] = {1, 2, 3, 9, 9, 9, 9};
    assert_int_equal(rp_prefix_cache_lookup(&c, 0, b, 7, &len), id3);
    const int32_t d[] = {2, 2, 3, 4};
    assert_int_equal(rp_prefix_cache_lookup(&c, 0, d, 4, &len), 0);
    assert_int_equal(len, 0);
    /* the same prefix again: the existing entry, nothing new */
    uint64_t id;
    int is_new;
    rp_error err;
    assert_int_equal(rp_prefix_cache_insert(&c, 0, a, 6, &id, &is_new, ev, 16, &n_ev, &err), RP_OK);
    assert_int_equal(id, id6);
    assert_int_equal(is_new, 0);
    assert_int_equal(c.n, 2);
    rp_prefix_cache_free(&c);
}

static void test_collision_is_a_miss(void **state) {
    (void)state;
    rp_prefix_cache c;
    rp_prefix_cache_init(&c, 1 << 20, 100);
    c.mix = collide;
    const int32_t a[] = {1, 2, 3, 4}, b[] = {1, 2, 9, 4, 5};
    uint64_t ev[16];
    int n_ev, len;
    uint64_t ida = put(&c, a, 4, &n_ev, ev);
    assert_true(ida != 0);
    /* same hash, same length, other tokens: not a hit */
    assert_int_equal(rp_prefix_cache_lookup(&c, 0, b, 5, &len), 0);
    assert_int_equal(len, 0);
    /* and not "the same entry" on insert either */
    uint64_t idb = put(&c, b, 4, &n_ev, ev);
    assert_true(idb != 0 && idb != ida);
    assert_int_equal(rp_prefix_cache_lookup(&c, 0, b, 5, &len), idb);
    assert_int_equal(len, 4);
    assert_int_equal(rp_prefix_cache_lookup(&c, 0, a, 4, &len), ida);
    rp_prefix_cache_free(&c);
}

static void test_lru_eviction(void **state) {
    (void)state;
    rp_prefix_cache c;
    /* room for two entries of 2 tokens (1000 + 8 bytes each), not three */
    rp_prefix_cache_init(&c, 2100, 1000);
    const int32_t a[] = {1, 1}, b[] = {2, 2}, d[] = {3, 3};
    uint64_t ev[16];
    int n_ev, len;
    uint64_t ida = put(&c, a, 2, &n_ev, ev), idb = put(&c, b, 2, &n_ev, ev);
    assert_int_equal(n_ev, 0);
    /* a used after b: b is the least recently used */
    assert_int_equal(rp_prefix_cache_lookup(&c, 0, a, 2, &len), ida);
    uint64_t idd = put(&c, d, 2, &n_ev, ev);
    assert_int_equal(n_ev, 1);
    assert_int_equal(ev[0], idb);
    assert_int_equal(rp_prefix_cache_lookup(&c, 0, b, 2, &len), 0);
    assert_int_equal(rp_prefix_cache_lookup(&c, 0, a, 2, &len), ida);
    assert_int_equal(rp_prefix_cache_lookup(&c, 0, d, 2, &len), idd);
    assert_int_equal(c.bytes, 2 * 1008);
    /* an entry larger than the whole budget is not stored, nothing evicted */
    int32_t big[400] = {0};
    assert_int_equal(put(&c, big, 400, &n_ev, ev), 0);
    assert_int_equal(n_ev, 0);
    assert_int_equal(c.n, 2);
    rp_prefix_cache_free(&c);
}

/* The same tokens read from another state are another prefix. */
static void test_origins_are_apart(void **state) {
    (void)state;
    rp_prefix_cache c;
    rp_prefix_cache_init(&c, 1 << 20, 1000);
    const int32_t a[] = {1, 2, 3, 4, 5, 6};
    uint64_t ev[16], id0, id7, id;
    int n_ev, len, is_new;
    rp_error err;
    assert_int_equal(rp_prefix_cache_insert(&c, 0, a, 4, &id0, &is_new, ev, 16, &n_ev, &err),
                     RP_OK);
    assert_true(is_new);
    assert_int_equal(rp_prefix_cache_lookup(&c, 7, a, 6, &len), 0);
    assert_int_equal(len, 0);
    assert_int_equal(rp_prefix_cache_insert(&c, 7, a, 4, &id7, &is_new, ev, 16, &n_ev, &err),
                     RP_OK);
    assert_true(is_new && id7 != id0);
    assert_int_equal(rp_prefix_cache_insert(&c, 7, a, 3, &id, &is_new, ev, 16, &n_ev, &err),
                     RP_OK);
    assert_int_equal(rp_prefix_cache_lookup(&c, 7, a, 6, &len), id7);
    assert_int_equal(len, 4);
    assert_int_equal(rp_prefix_cache_lookup(&c, 0, a, 6, &len), id0);
    assert_int_equal(rp_prefix_cache_lookup(&c, 0, a, 3, &len), 0);
    assert_int_equal(rp_prefix_cache_lookup(&c, 8, a, 6, &len), 0);
    rp_prefix_cache_free(&c);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_longest_prefix),
        cmocka_unit_test(test_collision_is_a_miss),
        cmocka_unit_test(test_lru_eviction),
        cmocka_unit_test(test_origins_are_apart),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
