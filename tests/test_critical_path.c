/* The critical path of a traced pipeline step (src/pipe/critical_path.c) on
 * hand-made traces whose longest path is worked out by hand: waiting in a
 * RECV or in the OPT_STEP all-reduce is not work, compute and the part of a
 * RECV after its SEND ended are; interleaved chunks pass from the last stage
 * to stage 0 and back; a trace that is not one step is refused. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>
#include <string.h>

#include "pipe/critical_path.h"
#include "pipe/schedule.h"

#define E(op, m, a, b) {RP_OP_##op, m, a, b, 0}
/* An instruction of an interleaved trace, on the stage's chunk c. */
#define EC(op, m, c, a, b) {RP_OP_##op, m, a, b, c}

static void test_one_stage_sums_its_work_not_its_gaps(void **unused) {
    (void)unused;
    const struct rp_pipe_trace_entry s0[] = {E(FWD, 0, 0.0, 1.0), E(BWD, 0, 1.0, 3.0),
                                             E(REDUCE_GRADS, -1, 3.5, 3.5),
                                             E(OPT_STEP, -1, 4.0, 5.0)};
    const struct rp_pipe_trace_entry *t[] = {s0};
    const int len[] = {4};
    double cp, span;
    rp_error err;
    assert_int_equal(rp_pipe_critical_path(t, len, 1, &cp, &span, &err), RP_OK);
    assert_float_equal(cp, 4.0, 1e-12);
    assert_float_equal(span, 5.0, 1e-12);
}

/* Stage 1 waits 1.1 s for micro-batch 0's activations (only 0.2 s of its
 * RECV is after the send), stage 0 waits in RECV_GRAD until 4.4 + 0.6 s.
 * Longest path: FWD0 1 + SEND_ACT 0.1 + RECV_ACT 0.2 + FWD 1 + BWD 2 +
 * SEND_GRAD 0.1 + RECV_GRAD 0.6 + BWD 1 + OPT_STEP from the later start
 * (6.1) 0.4 = 6.4, while the step spans 6.5. */
static void test_two_stages_count_transfers_but_not_waits(void **unused) {
    (void)unused;
    const struct rp_pipe_trace_entry s0[] = {
        E(FWD, 0, 0.0, 1.0),       E(SEND_ACT, 0, 1.0, 1.1), E(RECV_GRAD, 0, 1.1, 5.0),
        E(BWD, 0, 5.0, 6.0),       E(REDUCE_GRADS, -1, 6.0, 6.0), E(OPT_STEP, -1, 6.0, 6.5)};
    const struct rp_pipe_trace_entry s1[] = {
        E(RECV_ACT, 0, 0.0, 1.3),  E(FWD, 0, 1.3, 2.3),      E(BWD, 0, 2.3, 4.3),
        E(SEND_GRAD, 0, 4.3, 4.4), E(REDUCE_GRADS, -1, 4.4, 4.4), E(OPT_STEP, -1, 6.1, 6.5)};
    const struct rp_pipe_trace_entry *t[] = {s0, s1};
    const int len[] = {6, 6};
    double cp, span;
    rp_error err;
    assert_int_equal(rp_pipe_critical_path(t, len, 2, &cp, &span, &err), RP_OK);
    assert_float_equal(cp, 6.4, 1e-9);
    assert_float_equal(span, 6.5, 1e-12);
}

/* Two micro-batches where stage 1 is the slow one: the path runs through
 * stage 1's compute, not stage 0's (1 + 0 + 3 + 3 = 7, the RECV of m1
 * arrived while stage 1 was still busy: weight 0). */
static void test_path_follows_the_slow_stage(void **unused) {
    (void)unused;
    const struct rp_pipe_trace_entry s0[] = {E(FWD, 0, 0.0, 1.0), E(SEND_ACT, 0, 1.0, 1.0),
                                             E(FWD, 1, 1.0, 2.0), E(SEND_ACT, 1, 2.0, 2.0)};
    const struct rp_pipe_trace_entry s1[] = {E(RECV_ACT, 0, 0.0, 1.0), E(FWD, 0, 1.0, 4.0),
                                             E(RECV_ACT, 1, 4.0, 4.0), E(FWD, 1, 4.0, 7.0)};
    const struct rp_pipe_trace_entry *t[] = {s0, s1};
    const int len[] = {4, 4};
    double cp, span;
    rp_error err;
    assert_int_equal(rp_pipe_critical_path(t, len, 2, &cp, &span, &err), RP_OK);
    assert_float_equal(cp, 7.0, 1e-12);
    assert_float_equal(span, 7.0, 1e-12);
}

static void test_receive_without_its_send_is_refused(void **unused) {
    (void)unused;
    const struct rp_pipe_trace_entry s0[] = {E(FWD, 0, 0.0, 1.0)};
    const struct rp_pipe_trace_entry s1[] = {E(RECV_ACT, 3, 0.0, 1.0), E(FWD, 3, 1.0, 2.0)};
    const struct rp_pipe_trace_entry *t[] = {s0, s1};
    const int len[] = {1, 2};
    double cp, span;
    rp_error err;
    assert_int_equal(rp_pipe_critical_path(t, len, 2, &cp, &span, &err), RP_ERR_ARG);
    assert_non_null(strstr(err.msg, "RECV_ACT of micro-batch 3"));
    assert_non_null(strstr(err.msg, "SEND_ACT on stage 0"));
}

/* Interleaved, P = 2, v = 2, one micro-batch through model chunks 0..3
 * (k = c * P + s): stage 1's chunk 0 feeds stage 0's chunk 1 (the wrap),
 * and its gradient comes back from there. Every RECV is 0.2 s past its
 * SEND, every SEND 0.1 s, FWD 1 s, BWD 2 s, all on one chain: 4 x 1 + 3 x
 * (0.1 + 0.2) forward, 4 x 2 + 3 x (0.1 + 0.2) backward = 13.8 s of
 * critical path. Stage 0 starts its last BWD 0.3 s late (bookkeeping, not
 * work): the span is 14.1 s. */
static void test_interleaved_chunks_wrap_between_the_stages(void **unused) {
    (void)unused;
    const struct rp_pipe_trace_entry s0[] = {
        EC(FWD, 0, 0, 0.0, 1.0),       EC(SEND_ACT, 0, 0, 1.0, 1.1),
        EC(RECV_ACT, 0, 1, 1.1, 2.6),  EC(FWD, 0, 1, 2.6, 3.6),
        EC(SEND_ACT, 0, 1, 3.6, 3.7),  EC(RECV_GRAD, 0, 1, 3.7, 7.2),
        EC(BWD, 0, 1, 7.2, 9.2),       EC(SEND_GRAD, 0, 1, 9.2, 9.3),
        EC(RECV_GRAD, 0, 0, 9.3, 11.8), EC(BWD, 0, 0, 12.1, 14.1)};
    const struct rp_pipe_trace_entry s1[] = {
        EC(RECV_ACT, 0, 0, 0.0, 1.3),  EC(FWD, 0, 0, 1.3, 2.3),
        EC(SEND_ACT, 0, 0, 2.3, 2.4),  EC(RECV_ACT, 0, 1, 2.4, 3.9),
        EC(FWD, 0, 1, 3.9, 4.9),       EC(BWD, 0, 1, 4.9, 6.9),
        EC(SEND_GRAD, 0, 1, 6.9, 7.0), EC(RECV_GRAD, 0, 0, 7.0, 9.5),
        EC(BWD, 0, 0, 9.5, 11.5),      EC(SEND_GRAD, 0, 0, 11.5, 11.6)};
    const struct rp_pipe_trace_entry *t[] = {s0, s1};
    const int len[] = {10, 10};
    double cp, span;
    rp_error err;
    assert_int_equal(rp_pipe_critical_path(t, len, 2, &cp, &span, &err), RP_OK);
    assert_float_equal(cp, 13.8, 1e-9);
    assert_float_equal(span, 14.1, 1e-12);
}

/* The chunk is part of the match: stage 0's chunk 1 waits for the last
 * stage's chunk 0, not for a send of the same micro-batch from another
 * chunk. */
static void test_interleaved_receive_needs_the_previous_chunks_send(void **unused) {
    (void)unused;
    const struct rp_pipe_trace_entry s0[] = {EC(FWD, 0, 0, 0.0, 1.0),
                                             EC(SEND_ACT, 0, 0, 1.0, 1.1),
                                             EC(RECV_ACT, 0, 2, 1.1, 2.0)};
    const struct rp_pipe_trace_entry s1[] = {EC(RECV_ACT, 0, 0, 0.0, 1.2),
                                             EC(FWD, 0, 0, 1.2, 2.2),
                                             EC(SEND_ACT, 0, 0, 2.2, 2.3)};
    const struct rp_pipe_trace_entry *t[] = {s0, s1};
    const int len[] = {3, 3};
    double cp, span;
    rp_error err;
    assert_int_equal(rp_pipe_critical_path(t, len, 2, &cp, &span, &err), RP_ERR_ARG);
    assert_non_null(strstr(err.msg, "RECV_ACT of micro-batch 0 chunk 2"));
    assert_non_null(strstr(err.msg, "SEND_ACT on stage 1 chunk 1"));
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_one_stage_sums_its_work_not_its_gaps),
        cmocka_unit_test(test_two_stages_count_transfers_but_not_waits),
        cmocka_unit_test(test_path_follows_the_slow_stage),
        cmocka_unit_test(test_receive_without_its_send_is_refused),
        cmocka_unit_test(test_interleaved_chunks_wrap_between_the_stages),
        cmocka_unit_test(test_interleaved_receive_needs_the_previous_chunks_send),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
