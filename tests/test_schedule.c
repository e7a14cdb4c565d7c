/* Pipeline schedules (src/pipe/schedule.c) and their simulator
 * (src/pipe/simulate.c): GPipe, 1F1B, ZB-H1 and interleaved 1F1B for P = 1..8 stages and M = 1..16
 * micro-batches run without deadlock, reach the theoretical bubble, stash no
 * more than they should and keep schedule.h's conventions; and schedules that
 * break a convention are caught by the simulator. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "pipe/schedule.h"

static const int stage_counts[] = {1, 2, 3, 4, 8};
#define N_STAGE_COUNTS ((int)(sizeof stage_counts / sizeof stage_counts[0]))
#define MAX_TESTED_MICRO 16

static const rp_sim_costs unit_costs = {1.0, 1.0, 0.0, 0.0};

static void build_or_fail(rp_schedule *s, rp_schedule_kind kind, int n_stages, int n_micro) {
    rp_error err;
    if (rp_schedule_build(s, kind, n_stages, n_micro, &err) != RP_OK)
        fail_msg("%s P=%d M=%d: build failed: %s", rp_schedule_kind_name(kind), n_stages,
                 n_micro, err.msg);
}

static void simulate_or_fail(const rp_schedule *s, const rp_sim_costs *costs, rp_sim_result *r) {
    rp_error err;
    if (rp_schedule_simulate(s, costs, r, &err) != RP_OK)
        fail_msg("%s P=%d M=%d: simulation failed: %s", rp_schedule_kind_name(s->kind),
                 s->n_stages, s->n_micro, err.msg);
}

/* Simulates a schedule that must fail; returns the message. */
static const char *simulate_expect_error(const rp_schedule *s, rp_error *err) {
    rp_sim_result r;
    rp_status st = rp_schedule_simulate(s, &unit_costs, &r, err);
    if (st == RP_OK) {
        rp_sim_result_free(&r, s->n_stages);
        fail_msg("the simulator accepted a broken %s schedule (P=%d M=%d)",
                 rp_schedule_kind_name(s->kind), s->n_stages, s->n_micro);
    }
    assert_non_null(strstr(err->msg, rp_schedule_kind_name(s->kind)));
    return err->msg;
}

static void expect_in_message(const char *msg, const char *part) {
    if (!strstr(msg, part)) fail_msg("error message '%s' does not mention '%s'", msg, part);
}

/* Index of the instruction (op, m) on a stage, -1 if absent; fails if it
 * appears twice. */
static int find_instr(const rp_schedule *s, int stage, rp_pipe_opcode op, int m) {
    int found = -1;
    for (int i = 0; i < s->n_instr[stage]; i++)
        if (s->instr[stage][i].op == op && s->instr[stage][i].micro_batch == m) {
            if (found >= 0)
                fail_msg("stage %d: %s m=%d appears twice (#%d and #%d)", stage,
                         rp_pipe_opcode_name(op), m, found, i);
            found = i;
        }
    return found;
}

/* The kinds rp_schedule_build builds from (P, M) alone; interleaved needs
 * its virtual stages and M a multiple of P (its own tests below). */
#define N_PLAIN_KINDS RP_SCHEDULE_INTERLEAVED

static void test_every_shape_simulates_without_deadlock(void **state) {
    for (int k = 0; k < N_PLAIN_KINDS; k++)
        for (int pi = 0; pi < N_STAGE_COUNTS; pi++)
            for (int m = 1; m <= MAX_TESTED_MICRO; m++) {
                rp_schedule s;
                rp_sim_result r;
                build_or_fail(&s, (rp_schedule_kind)k, stage_counts[pi], m);
                assert_int_equal(s.kind, k);
                assert_int_equal(s.n_stages, stage_counts[pi]);
                assert_int_equal(s.n_micro, m);
                simulate_or_fail(&s, &unit_costs, &r);
                assert_true(r.makespan > 0);
                rp_sim_result_free(&r, s.n_stages);
                rp_schedule_free(&s);
            }
}

static void test_bubble_fraction_is_the_theory_under_unit_costs(void **state) {
    for (int k = 0; k <= RP_SCHEDULE_1F1B; k++)
        for (int pi = 0; pi < N_STAGE_COUNTS; pi++)
            for (int m = 1; m <= MAX_TESTED_MICRO; m++) {
                const int p = stage_counts[pi];
                rp_schedule s;
                rp_sim_result r;
                build_or_fail(&s, (rp_schedule_kind)k, p, m);
                simulate_or_fail(&s, &unit_costs, &r);
                double theory = (double)(p - 1) / (m + p - 1);
                if (fabs(r.bubble_fraction - theory) > 1e-9)
                    fail_msg("%s P=%d M=%d: bubble %.12f, theory (P-1)/(M+P-1) = %.12f",
                             rp_schedule_kind_name(k), p, m, r.bubble_fraction, theory);
                /* the critical path: M forwards and backwards plus P-1 of
                 * each to fill and drain the pipe */
                assert_float_equal(r.makespan, 2.0 * (m + p - 1), 1e-9);
                for (int st = 0; st < p; st++) assert_float_equal(r.busy[st], 2.0 * m, 1e-9);
                rp_sim_result_free(&r, s.n_stages);
                rp_schedule_free(&s);
            }
}

/* With a backward twice as long as a forward (the usual ratio) and free
 * communication, both schedules still lose only (P-1)/(M+P-1). (ZB-H1 has
 * its own tests below: it loses less.) */
static void test_bubble_fraction_is_the_theory_when_backward_costs_twice(void **state) {
    const rp_sim_costs costs = {1.0, 2.0, 0.0, 0.0};
    for (int k = 0; k <= RP_SCHEDULE_1F1B; k++)
        for (int pi = 0; pi < N_STAGE_COUNTS; pi++)
            for (int m = 1; m <= MAX_TESTED_MICRO; m++) {
                const int p = stage_counts[pi];
                rp_schedule s;
                rp_sim_result r;
                build_or_fail(&s, (rp_schedule_kind)k, p, m);
                simulate_or_fail(&s, &costs, &r);
                double theory = (double)(p - 1) / (m + p - 1);
                if (fabs(r.bubble_fraction - theory) > 1e-9)
                    fail_msg("%s P=%d M=%d, bwd = 2 fwd: bubble %.12f, theory %.12f",
                             rp_schedule_kind_name(k), p, m, r.bubble_fraction, theory);
                rp_sim_result_free(&r, s.n_stages);
                rp_schedule_free(&s);
            }
}

static void test_communication_cost_only_lengthens_the_step(void **state) {
    const rp_sim_costs slow = {1.0, 1.0, 0.5, 0.0};
    for (int k = 0; k <= RP_SCHEDULE_1F1B; k++) {
        rp_schedule s;
        rp_sim_result r;
        build_or_fail(&s, (rp_schedule_kind)k, 4, 8);
        simulate_or_fail(&s, &slow, &r);
        /* each of the 2 (P-1) hops of the first micro-batch's round trip waits */
        assert_true(r.makespan >= 2.0 * (8 + 3) + 2 * 3 * 0.5 - 1e-9);
        assert_true(r.bubble_fraction > 3.0 / 11.0);
        for (int st = 0; st < 4; st++) assert_float_equal(r.busy[st], 16.0, 1e-9);
        rp_sim_result_free(&r, s.n_stages);
        rp_schedule_free(&s);
    }
}

static void test_1f1b_stashes_at_most_p_minus_s_micro_batches(void **state) {
    for (int pi = 0; pi < N_STAGE_COUNTS; pi++)
        for (int m = 1; m <= MAX_TESTED_MICRO; m++) {
            const int p = stage_counts[pi];
            rp_schedule s;
            rp_sim_result r;
            build_or_fail(&s, RP_SCHEDULE_1F1B, p, m);
            simulate_or_fail(&s, &unit_costs, &r);
            for (int st = 0; st < p; st++) {
                int bound = p - st < m ? p - st : m;
                if (r.peak_stashed[st] > bound)
                    fail_msg("1f1b P=%d M=%d stage %d: %d micro-batches stashed, at most %d",
                             p, m, st, r.peak_stashed[st], bound);
                /* the bound is reached: warmup + 1 forwards before the
                 * first backward */
                assert_int_equal(r.peak_stashed[st], bound);
                assert_int_equal(s.n_buffers[st], bound);
            }
            rp_sim_result_free(&r, s.n_stages);
            rp_schedule_free(&s);
        }
}

static void test_gpipe_stashes_every_micro_batch(void **state) {
    for (int pi = 0; pi < N_STAGE_COUNTS; pi++)
        for (int m = 1; m <= MAX_TESTED_MICRO; m++) {
            rp_schedule s;
            rp_sim_result r;
            build_or_fail(&s, RP_SCHEDULE_GPIPE, stage_counts[pi], m);
            simulate_or_fail(&s, &unit_costs, &r);
            for (int st = 0; st < s.n_stages; st++) {
                assert_int_equal(r.peak_stashed[st], m);
                assert_int_equal(s.n_buffers[st], m);
            }
            rp_sim_result_free(&r, s.n_stages);
            rp_schedule_free(&s);
        }
}

/* schedule.h's conventions, checked on the lists themselves (independently
 * of the simulator, which checks them too). */
static void check_list_conventions(const rp_schedule *s) {
    const int p = s->n_stages, m_count = s->n_micro;
    const char *kind = rp_schedule_kind_name(s->kind);
    for (int st = 0; st < p; st++) {
        const rp_pipe_instr *list = s->instr[st];
        const int n = s->n_instr[st];
        const int first = st == 0, last = st == p - 1;
        int per_micro = 2 + (first ? 0 : 2) + (last ? 0 : 2);
        if (n != m_count * per_micro + 2)
            fail_msg("%s P=%d M=%d stage %d: %d instructions, expected %d", kind, p, m_count,
                     st, n, m_count * per_micro + 2);
        for (int i = 0; i < n; i++) {
            rp_pipe_opcode op = list[i].op;
            if (first && (op == RP_OP_RECV_ACT || op == RP_OP_SEND_GRAD))
                fail_msg("%s P=%d M=%d: stage 0 has %s at #%d", kind, p, m_count,
                         rp_pipe_opcode_name(op), i);
            if (last && (op == RP_OP_SEND_ACT || op == RP_OP_RECV_GRAD))
                fail_msg("%s P=%d M=%d: last stage has %s at #%d", kind, p, m_count,
                         rp_pipe_opcode_name(op), i);
            if (i < n - 2 && (op == RP_OP_REDUCE_GRADS || op == RP_OP_OPT_STEP))
                fail_msg("%s P=%d M=%d stage %d: %s at #%d before the end", kind, p, m_count,
                         st, rp_pipe_opcode_name(op), i);
        }
        assert_int_equal(list[n - 2].op, RP_OP_REDUCE_GRADS);
        assert_int_equal(list[n - 2].micro_batch, -1);
        assert_int_equal(list[n - 2].buffer, -1);
        assert_int_equal(list[n - 1].op, RP_OP_OPT_STEP);
        assert_int_equal(list[n - 1].micro_batch, -1);
        assert_int_equal(list[n - 1].buffer, -1);

        int previous_bwd = -1, previous_bwd_m = -1;
        for (int m = 0; m < m_count; m++) {
            /* [RECV_ACT m] FWD m [SEND_ACT m] ... [RECV_GRAD m] BWD m [SEND_GRAD m],
             * the bracketed ones right beside their compute op */
            int fwd = find_instr(s, st, RP_OP_FWD, m), bwd = find_instr(s, st, RP_OP_BWD, m);
            int recv_act = find_instr(s, st, RP_OP_RECV_ACT, m);
            int send_act = find_instr(s, st, RP_OP_SEND_ACT, m);
            int recv_grad = find_instr(s, st, RP_OP_RECV_GRAD, m);
            int send_grad = find_instr(s, st, RP_OP_SEND_GRAD, m);
            if (fwd < 0 || bwd < 0 || fwd > bwd)
                fail_msg("%s P=%d M=%d stage %d m=%d: FWD at #%d, BWD at #%d", kind, p, m_count,
                         st, m, fwd, bwd);
            assert_int_equal(recv_act, first ? -1 : fwd - 1);
            assert_int_equal(send_act, last ? -1 : fwd + 1);
            assert_int_equal(recv_grad, last ? -1 : bwd - 1);
            assert_int_equal(send_grad, first ? -1 : bwd + 1);
            /* backwards in increasing micro-batch order */
            if (bwd < previous_bwd)
                fail_msg("%s P=%d M=%d stage %d: BWD m=%d at #%d comes before BWD m=%d at #%d",
                         kind, p, m_count, st, m, bwd, previous_bwd_m, previous_bwd);
            previous_bwd = bwd;
            previous_bwd_m = m;
            /* one slot per micro-batch on every instruction that touches it */
            int slots = s->kind == RP_SCHEDULE_GPIPE ? m_count : (p - st < m_count ? p - st : m_count);
            int want = s->kind == RP_SCHEDULE_GPIPE ? m : m % slots;
            int idx[] = {recv_act, fwd, send_act, recv_grad, bwd, send_grad};
            for (size_t j = 0; j < sizeof idx / sizeof idx[0]; j++)
                if (idx[j] >= 0 && list[idx[j]].buffer != want)
                    fail_msg("%s P=%d M=%d stage %d: %s m=%d uses buffer %d, expected %d", kind,
                             p, m_count, st, rp_pipe_opcode_name(list[idx[j]].op), m,
                             list[idx[j]].buffer, want);
            assert_int_equal(s->n_buffers[st], slots);
        }
    }
}

static void test_lists_keep_the_header_conventions(void **state) {
    for (int k = 0; k <= RP_SCHEDULE_1F1B; k++)
        for (int pi = 0; pi < N_STAGE_COUNTS; pi++)
            for (int m = 1; m <= MAX_TESTED_MICRO; m++) {
                rp_schedule s;
                build_or_fail(&s, (rp_schedule_kind)k, stage_counts[pi], m);
                check_list_conventions(&s);
                rp_schedule_free(&s);
            }
}

static int count_forwards_before_first_backward(const rp_schedule *s, int stage) {
    int n = 0;
    for (int i = 0; i < s->n_instr[stage] && s->instr[stage][i].op != RP_OP_BWD; i++)
        n += s->instr[stage][i].op == RP_OP_FWD;
    return n;
}

static void test_1f1b_warms_up_with_p_minus_s_minus_1_forwards(void **state) {
    for (int pi = 0; pi < N_STAGE_COUNTS; pi++)
        for (int m = 1; m <= MAX_TESTED_MICRO; m++) {
            const int p = stage_counts[pi];
            rp_schedule s;
            build_or_fail(&s, RP_SCHEDULE_1F1B, p, m);
            for (int st = 0; st < p; st++) {
                int warmup = p - st - 1 < m ? p - st - 1 : m;
                /* warmup forwards, then the steady phase starts with one more */
                int want = warmup < m ? warmup + 1 : m;
                assert_int_equal(count_forwards_before_first_backward(&s, st), want);
            }
            rp_schedule_free(&s);
        }
}

static void test_gpipe_runs_all_forwards_first(void **state) {
    rp_schedule s;
    build_or_fail(&s, RP_SCHEDULE_GPIPE, 3, 5);
    for (int st = 0; st < 3; st++) assert_int_equal(count_forwards_before_first_backward(&s, st), 5);
    rp_schedule_free(&s);
}

/* ---- the simulator catches broken schedules ---- */

static void test_deadlock_is_reported_with_the_stuck_stages(void **state) {
    /* stage 0 waits for the gradient of micro-batch 0 before sending its
     * activations: stage 1 can never start */
    rp_schedule s;
    rp_error err;
    build_or_fail(&s, RP_SCHEDULE_1F1B, 2, 1);
    rp_pipe_instr *list = s.instr[0];
    assert_int_equal(list[1].op, RP_OP_SEND_ACT);
    assert_int_equal(list[2].op, RP_OP_RECV_GRAD);
    rp_pipe_instr t = list[1];
    list[1] = list[2];
    list[2] = t;
    const char *msg = simulate_expect_error(&s, &err);
    expect_in_message(msg, "deadlock");
    expect_in_message(msg, "stage 0, #1 RECV_GRAD m=0");
    expect_in_message(msg, "stage 1, #0 RECV_ACT m=0");
    rp_schedule_free(&s);
}

static void test_buffer_reused_before_its_backward_is_reported(void **state) {
    /* stage 0 of a 4-stage 1F1B keeps 4 micro-batches in flight: 3 slots
     * are too few, forward 3 would overwrite micro-batch 0's stash */
    rp_schedule s;
    rp_error err;
    build_or_fail(&s, RP_SCHEDULE_1F1B, 4, 8);
    s.n_buffers[0] = 3;
    for (int i = 0; i < s.n_instr[0]; i++)
        if (s.instr[0][i].micro_batch >= 0) s.instr[0][i].buffer = s.instr[0][i].micro_batch % 3;
    const char *msg = simulate_expect_error(&s, &err);
    expect_in_message(msg, "stage 0");
    expect_in_message(msg, "FWD m=3 buf=0");
    expect_in_message(msg, "micro-batch 0 still holds it");
    rp_schedule_free(&s);
}

static void test_backward_before_the_next_stage_backward_is_reported(void **state) {
    /* drop stage 0's RECV_GRAD of micro-batch 0: its BWD would run on a
     * gradient stage 1 has not computed */
    rp_schedule s;
    rp_error err;
    build_or_fail(&s, RP_SCHEDULE_GPIPE, 2, 2);
    int i = find_instr(&s, 0, RP_OP_RECV_GRAD, 0);
    assert_true(i >= 0);
    memmove(&s.instr[0][i], &s.instr[0][i + 1], (size_t)(s.n_instr[0] - i - 1) * sizeof(rp_pipe_instr));
    s.n_instr[0]--;
    const char *msg = simulate_expect_error(&s, &err);
    expect_in_message(msg, "BWD m=0");
    expect_in_message(msg, "before RECV_GRAD");
    rp_schedule_free(&s);
}

static void test_backward_before_forward_is_reported(void **state) {
    rp_schedule s;
    rp_error err;
    build_or_fail(&s, RP_SCHEDULE_GPIPE, 1, 1);
    rp_pipe_instr t = s.instr[0][0];
    s.instr[0][0] = s.instr[0][1];
    s.instr[0][1] = t;
    expect_in_message(simulate_expect_error(&s, &err), "runs before FWD of micro-batch 0");
    rp_schedule_free(&s);
}

static void test_backwards_out_of_order_are_reported(void **state) {
    rp_schedule s;
    rp_error err;
    build_or_fail(&s, RP_SCHEDULE_GPIPE, 1, 2);
    int b0 = find_instr(&s, 0, RP_OP_BWD, 0), b1 = find_instr(&s, 0, RP_OP_BWD, 1);
    rp_pipe_instr t = s.instr[0][b0];
    s.instr[0][b0] = s.instr[0][b1];
    s.instr[0][b1] = t;
    expect_in_message(simulate_expect_error(&s, &err), "increasing micro-batch order");
    rp_schedule_free(&s);
}

/* Time chunks: every shape runs without deadlock; per stage the chunks of a
 * group forward in time order and recompute and backward in reverse; stage
 * s+1 forwards chunk c-1 while stage s forwards chunk c and the backward
 * phase is 1F1B over the chunks (the pipe fills with one long sequence:
 * makespan 3K + 2(P-1) per group under unit costs, RECOMP costing a
 * forward, not 3 K P); the activation slots a stage holds, min(K, P-s),
 * do not grow with K, and no stage keeps a chunk's input: every stage past
 * the first receives each chunk twice (RECV_ACT, RECV_RECOMP). */
static void test_time_chunks_pipeline_one_sequence(void **state) {
    for (int pi = 0; pi < N_STAGE_COUNTS; pi++)
        for (int k = 1; k <= 8; k++)
            for (int groups = 1; groups <= 3; groups++) {
                const int P = stage_counts[pi], M = k * groups;
                rp_schedule s;
                rp_sim_result r;
                rp_error err;
                if (rp_schedule_build_time_chunks(&s, P, M, k, &err) != RP_OK)
                    fail_msg("time chunks P=%d M=%d K=%d: %s", P, M, k, err.msg);
                assert_int_equal(s.n_chunks, k);
                simulate_or_fail(&s, &unit_costs, &r);
                for (int st = 0; st < P; st++)
                    for (int g = 0; g < groups; g++)
                        for (int c = 0; c + 1 < k; c++) {
                            const int m = g * k + c;
                            assert_true(find_instr(&s, st, RP_OP_FWD, m) <
                                        find_instr(&s, st, RP_OP_FWD, m + 1));
                            assert_true(find_instr(&s, st, RP_OP_BWD, m + 1) <
                                        find_instr(&s, st, RP_OP_BWD, m));
                            assert_true(find_instr(&s, st, RP_OP_RECOMP, m + 1) <
                                        find_instr(&s, st, RP_OP_RECOMP, m));
                            assert_true(find_instr(&s, st, RP_OP_RECOMP, m) <
                                        find_instr(&s, st, RP_OP_BWD, m));
                            assert_int_equal(find_instr(&s, st, RP_OP_RECV_RECOMP, m) >= 0,
                                             st > 0);
                            assert_int_equal(find_instr(&s, st, RP_OP_SEND_RECOMP, m) >= 0,
                                             st < P - 1);
                        }
                for (int st = 0; st < P && k > 1; st++) {
                    const int slots = P - st < k ? P - st : k;
                    assert_int_equal(s.n_buffers[st], slots);
                    assert_int_equal(r.peak_stashed[st], slots);
                }
                /* K = 1 is the plain schedule: F and B per sequence */
                const double one = k > 1 ? 3.0 * k + 2.0 * (P - 1) : 2.0 * P;
                if (groups == 1) assert_true(fabs(r.makespan - one) < 1e-9);
                else assert_true(r.makespan < groups * one + 1e-9);
                rp_sim_result_free(&r, P);
                rp_schedule_free(&s);
            }
    rp_schedule s;
    rp_error err;
    assert_int_equal(rp_schedule_build_time_chunks(&s, 2, 6, 4, &err), RP_ERR_ARG);
    expect_in_message(err.msg, "time chunks");
}

/* The recomputation's conventions are checked: RECOMPs in the backward
 * order, only in time-chunk schedules, a slot not reused before its BWD,
 * and a missing SEND_RECOMP is a deadlock that names it. */
static void test_time_chunks_recompute_errors_are_reported(void **state) {
    rp_schedule s;
    rp_error err;
    if (rp_schedule_build_time_chunks(&s, 2, 4, 4, &err) != RP_OK) fail_msg("%s", err.msg);
    int r3 = find_instr(&s, 0, RP_OP_RECOMP, 3), r2 = find_instr(&s, 0, RP_OP_RECOMP, 2);
    s.instr[0][r3].micro_batch = 2;
    s.instr[0][r2].micro_batch = 3;
    expect_in_message(simulate_expect_error(&s, &err), "recompute in the backward order");
    rp_schedule_free(&s);

    if (rp_schedule_build_time_chunks(&s, 2, 4, 4, &err) != RP_OK) fail_msg("%s", err.msg);
    s.instr[0][find_instr(&s, 0, RP_OP_RECOMP, 2)].buffer = 0;
    expect_in_message(simulate_expect_error(&s, &err), "overwrites buffer 0");
    rp_schedule_free(&s);

    build_or_fail(&s, RP_SCHEDULE_GPIPE, 1, 1);
    s.instr[0][find_instr(&s, 0, RP_OP_BWD, 0)].op = RP_OP_RECOMP;
    expect_in_message(simulate_expect_error(&s, &err), "belongs to time-chunk schedules");
    rp_schedule_free(&s);

    if (rp_schedule_build_time_chunks(&s, 2, 4, 4, &err) != RP_OK) fail_msg("%s", err.msg);
    int send = find_instr(&s, 0, RP_OP_SEND_RECOMP, 3);
    memmove(&s.instr[0][send], &s.instr[0][send + 1],
            (size_t)(s.n_instr[0] - send - 1) * sizeof(rp_pipe_instr));
    s.n_instr[0]--;
    expect_in_message(simulate_expect_error(&s, &err), "SEND_RECOMP of micro-batch 3");
    rp_schedule_free(&s);
}

/* The executor's time-chunk order is needed: 1F1B's lists (backwards in
 * increasing order, B0 before F1 on one stage) used as time chunks are
 * reported, since chunk c's backward needs d(state) from chunk c+1's. */
static void test_time_chunks_in_increasing_backward_order_are_reported(void **state) {
    for (int k = 0; k < N_PLAIN_KINDS; k++) {
        rp_schedule s;
        rp_error err;
        build_or_fail(&s, (rp_schedule_kind)k, 2, 4);
        s.n_chunks = 4;
        expect_in_message(simulate_expect_error(&s, &err), "last chunk first");
        rp_schedule_free(&s);
    }
}

static void test_micro_batch_run_twice_or_never_is_reported(void **state) {
    /* stage 0 forwards micro-batch 0 twice and micro-batch 1 never */
    rp_schedule s;
    rp_error err;
    build_or_fail(&s, RP_SCHEDULE_GPIPE, 1, 2);
    int f1 = find_instr(&s, 0, RP_OP_FWD, 1);
    s.instr[0][f1].micro_batch = 0;
    expect_in_message(simulate_expect_error(&s, &err), "forwarded twice");
    rp_schedule_free(&s);

    /* the last micro-batch's backward is missing: REDUCE_GRADS comes too early */
    build_or_fail(&s, RP_SCHEDULE_1F1B, 2, 3);
    int b2 = find_instr(&s, 0, RP_OP_BWD, 2);
    memmove(&s.instr[0][b2], &s.instr[0][b2 + 1], (size_t)(s.n_instr[0] - b2 - 1) * sizeof(rp_pipe_instr));
    s.n_instr[0]--;
    expect_in_message(simulate_expect_error(&s, &err), "3 forwards and 2 backwards");
    rp_schedule_free(&s);
}

static void test_list_without_the_optimizer_step_is_reported(void **state) {
    rp_schedule s;
    rp_error err;
    build_or_fail(&s, RP_SCHEDULE_1F1B, 3, 4);
    s.n_instr[1] -= 2;
    const char *msg = simulate_expect_error(&s, &err);
    expect_in_message(msg, "stage 1");
    expect_in_message(msg, "REDUCE_GRADS, OPT_STEP");
    rp_schedule_free(&s);
}

static void test_send_on_the_wrong_end_is_reported(void **state) {
    rp_schedule s;
    rp_error err;
    build_or_fail(&s, RP_SCHEDULE_GPIPE, 2, 1);
    /* the last stage sends its output on, to a stage that does not exist */
    int f = find_instr(&s, 1, RP_OP_FWD, 0);
    s.instr[1][f + 1].op = RP_OP_SEND_ACT;
    expect_in_message(simulate_expect_error(&s, &err), "no stage to send to");
    rp_schedule_free(&s);
}

/* ---- arguments ---- */

static void test_bad_arguments_are_rejected_with_a_message(void **state) {
    rp_schedule s;
    rp_error err;
    assert_int_equal(rp_schedule_build(&s, RP_SCHEDULE_1F1B, 0, 4, &err), RP_ERR_ARG);
    expect_in_message(err.msg, "pipeline of 0 stages: need >= 1");
    assert_int_equal(rp_schedule_build(&s, RP_SCHEDULE_1F1B, -3, 4, &err), RP_ERR_ARG);
    expect_in_message(err.msg, "-3 stages");
    assert_int_equal(rp_schedule_build(&s, RP_SCHEDULE_GPIPE, RP_SCHEDULE_MAX_STAGES + 1, 4, &err),
                     RP_ERR_ARG);
    expect_in_message(err.msg, "at most");
    assert_int_equal(rp_schedule_build(&s, RP_SCHEDULE_GPIPE, 4, 0, &err), RP_ERR_ARG);
    expect_in_message(err.msg, "0 micro-batches: need >= 1");
    assert_int_equal(rp_schedule_build(&s, RP_SCHEDULE_1F1B, 4, RP_SCHEDULE_MAX_MICRO + 1, &err),
                     RP_ERR_ARG);
    expect_in_message(err.msg, "4097 micro-batches");
    assert_int_equal(rp_schedule_build(&s, (rp_schedule_kind)7, 4, 4, &err), RP_ERR_ARG);
    expect_in_message(err.msg, "kind 7");
    /* a failed build leaves an empty schedule that frees cleanly */
    assert_null(s.instr);
    rp_schedule_free(&s);

    /* the largest schedule allowed builds */
    assert_int_equal(rp_schedule_build(&s, RP_SCHEDULE_1F1B, 2, RP_SCHEDULE_MAX_MICRO, &err), RP_OK);
    rp_sim_result r;
    const rp_sim_costs zero_fwd = {0.0, 1.0, 0.0, 0.0};
    assert_int_equal(rp_schedule_simulate(&s, &zero_fwd, &r, &err), RP_ERR_ARG);
    expect_in_message(err.msg, "fwd 0");
    assert_int_equal(rp_schedule_simulate(&s, NULL, &r, &err), RP_OK);  /* NULL: unit costs */
    assert_float_equal(r.bubble_fraction, 1.0 / (RP_SCHEDULE_MAX_MICRO + 1), 1e-9);
    rp_sim_result_free(&r, s.n_stages);
    rp_schedule_free(&s);
}

static void test_names_round_trip(void **state) {
    for (int k = 0; k < RP_SCHEDULE_KIND_COUNT; k++)
        assert_int_equal(rp_schedule_kind_from_name(rp_schedule_kind_name(k)), k);
    assert_string_equal(rp_schedule_kind_name(RP_SCHEDULE_GPIPE), "gpipe");
    assert_string_equal(rp_schedule_kind_name(RP_SCHEDULE_1F1B), "1f1b");
    assert_string_equal(rp_schedule_kind_name(RP_SCHEDULE_ZB_H1), "zb-h1");
    assert_int_equal(rp_schedule_kind_from_name("zero-bubble"), -1);
    assert_string_equal(rp_pipe_opcode_name(RP_OP_RECV_ACT), "RECV_ACT");
    assert_string_equal(rp_pipe_opcode_name(RP_OP_OPT_STEP), "OPT_STEP");
}

static void test_timeline_shows_every_op_and_the_bubble(void **state) {
    rp_schedule s;
    rp_sim_result r;
    build_or_fail(&s, RP_SCHEDULE_1F1B, 4, 8);
    simulate_or_fail(&s, &unit_costs, &r);
    char *text = NULL;
    size_t size = 0;
    FILE *out = open_memstream(&text, &size);
    assert_non_null(out);
    rp_schedule_print_timeline(&s, &r, out);
    fclose(out);
    expect_in_message(text, "bubble fraction 0.2727");
    expect_in_message(text, "3/11");
    /* stage 3 (last) starts F0 at t = 3 and alternates F/B */
    expect_in_message(text, "stage 3 | .  .  .  F0 B0 F1 B1");
    expect_in_message(text, "stage 0: busy 16");
    expect_in_message(text, "stage 0: busy 16 (72.7%), peak stash 4, buffers 4");
    expect_in_message(text, "stage 3: busy 16 (72.7%), peak stash 1, buffers 1");
    free(text);
    rp_sim_result_free(&r, s.n_stages);
    rp_schedule_free(&s);
}


/* ---- ZB-H1 ---- */

/* Idle time of all stages together: P x makespan - sum of busy. */
static double idle_time(const rp_schedule *s, const rp_sim_result *r) {
    double idle = s->n_stages * r->makespan;
    for (int st = 0; st < s->n_stages; st++) idle -= r->busy[st];
    return idle;
}

static int max_peak(const rp_schedule *s, const rp_sim_result *r) {
    int most = 0;
    for (int st = 0; st < s->n_stages; st++)
        most = r->peak_stashed[st] > most ? r->peak_stashed[st] : most;
    return most;
}

/* Qi et al.: with F = B = W (the backward = B + W twice the forward) 1F1B
 * idles (P-1)(F+B+W) per stage, ZB-H1 (P-1)(F+B-W): a third, with 1F1B's
 * peak activation memory (P micro-batches stashed on the worst stage). */
static void test_zb_h1_bubble_is_a_third_of_1f1b_at_the_same_peak_stash(void **state) {
    const rp_sim_costs costs = {1.0, 2.0, 0.0, 1.0};
    static const int ps[] = {2, 3, 4, 8};
    for (size_t pi = 0; pi < sizeof ps / sizeof ps[0]; pi++)
        for (int m = ps[pi]; m <= MAX_TESTED_MICRO; m++) {
            const int p = ps[pi];
            rp_schedule zb, ob;
            rp_sim_result rz, ro;
            build_or_fail(&zb, RP_SCHEDULE_ZB_H1, p, m);
            build_or_fail(&ob, RP_SCHEDULE_1F1B, p, m);
            simulate_or_fail(&zb, &costs, &rz);
            simulate_or_fail(&ob, &costs, &ro);
            const double iz = idle_time(&zb, &rz), io = idle_time(&ob, &ro);
            /* 1F1B: every stage idles 3 (P-1) */
            assert_float_equal(io, 3.0 * p * (p - 1), 1e-9);
            if (fabs(iz / io - 1.0 / 3.0) > 1e-9)
                fail_msg("zb-h1 P=%d M=%d: idle %g against 1F1B's %g (ratio %.4f, expected 1/3)",
                         p, m, iz, io, iz / io);
            for (int st = 0; st < p; st++) assert_float_equal(rz.busy[st], 3.0 * m, 1e-9);
            assert_int_equal(max_peak(&zb, &rz), max_peak(&ob, &ro));
            assert_int_equal(max_peak(&zb, &rz), p);
            assert_true(rz.bubble_fraction < ro.bubble_fraction);
            rp_sim_result_free(&rz, p);
            rp_sim_result_free(&ro, p);
            rp_schedule_free(&zb);
            rp_schedule_free(&ob);
        }
}

/* ZB-H1 is 1F1B with BWD_B where 1F1B has BWD, and one BWD_W per
 * micro-batch after its BWD_B, in increasing order, in the same slot. */
static void test_zb_h1_is_1f1b_with_deferred_weight_gradients(void **state) {
    for (int pi = 0; pi < N_STAGE_COUNTS; pi++)
        for (int m_count = 1; m_count <= MAX_TESTED_MICRO; m_count++) {
            const int p = stage_counts[pi];
            rp_schedule zb, ob;
            build_or_fail(&zb, RP_SCHEDULE_ZB_H1, p, m_count);
            build_or_fail(&ob, RP_SCHEDULE_1F1B, p, m_count);
            for (int st = 0; st < p; st++) {
                int j = 0, last_w = -1;
                for (int i = 0; i < zb.n_instr[st]; i++) {
                    const rp_pipe_instr *z = &zb.instr[st][i];
                    if (z->op == RP_OP_BWD_W) {
                        assert_int_equal(z->micro_batch, last_w + 1);
                        last_w = z->micro_batch;
                        int b = find_instr(&zb, st, RP_OP_BWD_B, z->micro_batch);
                        assert_true(b >= 0 && b < i);
                        assert_int_equal(z->buffer, zb.instr[st][b].buffer);
                        continue;
                    }
                    const rp_pipe_instr *o = &ob.instr[st][j++];
                    assert_int_equal(z->op == RP_OP_BWD_B ? RP_OP_BWD : z->op, o->op);
                    assert_int_equal(z->micro_batch, o->micro_batch);
                }
                assert_int_equal(j, ob.n_instr[st]);
                assert_int_equal(last_w, m_count - 1);
                assert_int_equal(zb.n_buffers[st], p < m_count ? p : m_count);
            }
            rp_schedule_free(&zb);
            rp_schedule_free(&ob);
        }
}

/* The simulator holds a zero-bubble slot until BWD_W and keeps the weight
 * gradients in order. */
static void test_zb_h1_broken_lists_are_reported(void **state) {
    rp_schedule s;
    rp_error err;
    /* W before its B: swap the first BWD_W with the BWD_B of the same m */
    build_or_fail(&s, RP_SCHEDULE_ZB_H1, 1, 2);
    /* P = 1: F0 B0 W0 F1 B1 W1 */
    assert_int_equal(s.instr[0][1].op, RP_OP_BWD_B);
    assert_int_equal(s.instr[0][2].op, RP_OP_BWD_W);
    s.instr[0][1].op = RP_OP_BWD_W;
    s.instr[0][2].op = RP_OP_BWD_B;
    expect_in_message(simulate_expect_error(&s, &err), "runs before BWD_B of micro-batch 0");
    rp_schedule_free(&s);
    /* weight gradients out of order */
    build_or_fail(&s, RP_SCHEDULE_ZB_H1, 2, 4);
    int w0 = find_instr(&s, 1, RP_OP_BWD_W, 0), w1 = find_instr(&s, 1, RP_OP_BWD_W, 1);
    assert_true(w0 >= 0 && w1 > w0);
    rp_pipe_instr t = s.instr[1][w0];
    s.instr[1][w0] = s.instr[1][w1];
    s.instr[1][w1] = t;
    expect_in_message(simulate_expect_error(&s, &err), "increasing micro-batch order");
    rp_schedule_free(&s);
    /* one slot fewer on stage 1: a forward overwrites a slot whose BWD_W is due */
    build_or_fail(&s, RP_SCHEDULE_ZB_H1, 2, 4);
    for (int i = 0; i < s.n_instr[1]; i++)
        if (s.instr[1][i].buffer >= 0) s.instr[1][i].buffer = s.instr[1][i].micro_batch % 1;
    s.n_buffers[1] = 1;
    expect_in_message(simulate_expect_error(&s, &err), "still holds it");
    rp_schedule_free(&s);
}


/* ---- interleaved 1F1B ---- */

static void build_interleaved_or_fail(rp_schedule *s, int n_stages, int n_micro, int n_virtual) {
    rp_error err;
    if (rp_schedule_build_interleaved(s, n_stages, n_micro, n_virtual, &err) != RP_OK)
        fail_msg("interleaved P=%d M=%d v=%d: build failed: %s", n_stages, n_micro, n_virtual,
                 err.msg);
}

/* Index of (op, m, chunk) on a stage, -1 if absent; fails if it appears twice. */
static int find_chunk_instr(const rp_schedule *s, int stage, rp_pipe_opcode op, int m, int chunk) {
    int found = -1;
    for (int i = 0; i < s->n_instr[stage]; i++) {
        const rp_pipe_instr *in = &s->instr[stage][i];
        if (in->op == op && in->micro_batch == m && in->chunk == chunk) {
            if (found >= 0)
                fail_msg("stage %d: %s m=%d chunk %d appears twice (#%d and #%d)", stage,
                         rp_pipe_opcode_name(op), m, chunk, found, i);
            found = i;
        }
    }
    return found;
}

/* Moves instruction `from` of a stage to position `to` (< from). */
static void move_instr(rp_schedule *s, int stage, int from, int to) {
    rp_pipe_instr t = s->instr[stage][from];
    memmove(&s->instr[stage][to + 1], &s->instr[stage][to],
            (size_t)(from - to) * sizeof(rp_pipe_instr));
    s->instr[stage][to] = t;
}

/* Narayanan et al. 2021: v chunks per stage cut the fill and drain by v, so
 * under unit costs (per chunk) the bubble is (P-1)/(v*M+P-1); each stage
 * stashes Megatron's warm-up + 1 (micro-batch, chunk) pairs. */
static void test_interleaved_bubble_is_the_theory_under_unit_costs(void **state) {
    for (int p = 2; p <= 4; p++)
        for (int v = 2; v <= 3; v++)
            for (int m = p; m <= MAX_TESTED_MICRO; m += p) {
                rp_schedule s;
                rp_sim_result r;
                build_interleaved_or_fail(&s, p, m, v);
                assert_int_equal(s.kind, RP_SCHEDULE_INTERLEAVED);
                assert_int_equal(s.n_virtual, v);
                simulate_or_fail(&s, &unit_costs, &r);
                double theory = (double)(p - 1) / (v * m + p - 1);
                if (fabs(r.bubble_fraction - theory) > 1e-9)
                    fail_msg("interleaved P=%d v=%d M=%d: bubble %.12f, theory "
                             "(P-1)/(v*M+P-1) = %.12f", p, v, m, r.bubble_fraction, theory);
                assert_float_equal(r.makespan, 2.0 * (v * m + p - 1), 1e-9);
                for (int st = 0; st < p; st++) {
                    assert_float_equal(r.busy[st], 2.0 * v * m, 1e-9);
                    int warmup = m == p ? v * m : 2 * (p - st - 1) + (v - 1) * p;
                    int bound = warmup + 1 < v * m ? warmup + 1 : v * m;
                    if (r.peak_stashed[st] != bound || s.n_buffers[st] != bound)
                        fail_msg("interleaved P=%d v=%d M=%d stage %d: peak stash %d, %d "
                                 "buffers; expected %d", p, v, m, st, r.peak_stashed[st],
                                 s.n_buffers[st], bound);
                }
                rp_sim_result_free(&r, s.n_stages);
                rp_schedule_free(&s);
            }
}

/* Megatron's layout and order: chunk c of stage s is model chunk c*P + s,
 * so only stage 0's chunk 0 reads the data and only the last stage's chunk
 * v-1 computes the loss; the last stage's chunk c sends to stage 0's chunk
 * c+1; forwards go through the micro-batches in groups of P, chunk by
 * chunk, and the backwards the same with the chunks reversed. */
static void test_interleaved_lists_follow_megatron_layout_and_order(void **state) {
    const int p = 3, v = 2, m_count = 6;
    rp_schedule s;
    build_interleaved_or_fail(&s, p, m_count, v);
    for (int st = 0; st < p; st++) {
        for (int c = 0; c < v; c++)
            for (int m = 0; m < m_count; m++) {
                const int g = c * p + st;
                assert_true(find_chunk_instr(&s, st, RP_OP_FWD, m, c) >= 0);
                assert_true(find_chunk_instr(&s, st, RP_OP_BWD, m, c) >= 0);
                assert_int_equal(find_chunk_instr(&s, st, RP_OP_RECV_ACT, m, c) >= 0, g > 0);
                assert_int_equal(find_chunk_instr(&s, st, RP_OP_SEND_GRAD, m, c) >= 0, g > 0);
                assert_int_equal(find_chunk_instr(&s, st, RP_OP_SEND_ACT, m, c) >= 0,
                                 g < p * v - 1);
                assert_int_equal(find_chunk_instr(&s, st, RP_OP_RECV_GRAD, m, c) >= 0,
                                 g < p * v - 1);
            }
        /* forward k: micro-batch (k / (P v)) P + k % P on chunk (k / P) % v;
         * backward k the same on chunk v-1 - (k / P) % v */
        int k_fwd = 0, k_bwd = 0;
        for (int i = 0; i < s.n_instr[st]; i++) {
            const rp_pipe_instr *in = &s.instr[st][i];
            if (in->op != RP_OP_FWD && in->op != RP_OP_BWD) continue;
            int *k = in->op == RP_OP_FWD ? &k_fwd : &k_bwd;
            int m = (*k / (p * v)) * p + *k % p, c = (*k / p) % v;
            if (in->op == RP_OP_BWD) c = v - 1 - c;
            if (in->micro_batch != m || in->chunk != c)
                fail_msg("stage %d: %s #%d is m=%d chunk %d, expected m=%d chunk %d", st,
                         rp_pipe_opcode_name(in->op), *k, in->micro_batch, in->chunk, m, c);
            (*k)++;
        }
        assert_int_equal(k_fwd, v * m_count);
        assert_int_equal(k_bwd, v * m_count);
        /* Megatron's warm-up: 2 (P-s-1) + (v-1) P forwards before the first
         * backward */
        int first_bwd = find_chunk_instr(&s, st, RP_OP_BWD, 0, v - 1), fwd_before = 0;
        for (int i = 0; i < first_bwd; i++) fwd_before += s.instr[st][i].op == RP_OP_FWD;
        assert_int_equal(fwd_before, 2 * (p - st - 1) + (v - 1) * p + 1);
    }
    rp_schedule_free(&s);

    /* the other kinds keep one chunk, numbered 0 */
    build_or_fail(&s, RP_SCHEDULE_1F1B, 3, 4);
    assert_int_equal(s.n_virtual, 1);
    for (int st = 0; st < 3; st++)
        for (int i = 0; i < s.n_instr[st]; i++) assert_int_equal(s.instr[st][i].chunk, 0);
    rp_schedule_free(&s);
}

static void test_interleaved_bad_arguments_are_rejected(void **state) {
    rp_schedule s;
    rp_error err;
    assert_int_equal(rp_schedule_build_interleaved(&s, 4, 6, 2, &err), RP_ERR_ARG);
    expect_in_message(err.msg, "6 micro-batches on 4 stages");
    expect_in_message(err.msg, "multiple of the stages");
    expect_in_message(err.msg, "e.g. 8");
    assert_null(s.instr);
    assert_int_equal(rp_schedule_build_interleaved(&s, 2, 4, 1, &err), RP_ERR_ARG);
    expect_in_message(err.msg, "1 virtual stages");
    assert_int_equal(rp_schedule_build_interleaved(&s, 2, 4, RP_SCHEDULE_MAX_VIRTUAL + 1, &err),
                     RP_ERR_ARG);
    expect_in_message(err.msg, "virtual stages");
    assert_int_equal(rp_schedule_build_interleaved(&s, 1, 4, 2, &err), RP_ERR_ARG);
    expect_in_message(err.msg, "need >= 2 stages");
    assert_int_equal(rp_schedule_build_interleaved(&s, 2, 0, 2, &err), RP_ERR_ARG);
    expect_in_message(err.msg, "0 micro-batches");
    assert_int_equal(rp_schedule_build_interleaved(&s, 2, RP_SCHEDULE_MAX_MICRO, 2, &err),
                     RP_ERR_ARG);
    expect_in_message(err.msg, "at most");
    /* without its virtual stages, interleaved cannot be built */
    assert_int_equal(rp_schedule_build(&s, RP_SCHEDULE_INTERLEAVED, 2, 4, &err), RP_ERR_ARG);
    expect_in_message(err.msg, "rp_schedule_build_interleaved");
    assert_null(s.instr);
    rp_schedule_free(&s);
}

static void test_interleaved_broken_lists_are_reported(void **state) {
    const int p = 2, v = 2, m_count = 4;
    rp_schedule s;
    rp_error err;
    const char *msg;

    /* stage 0 forwards chunk 1 of micro-batch 0 before chunk 0: it waits for
     * the last stage's chunk 0, which waits for stage 0's chunk 0 */
    build_interleaved_or_fail(&s, p, m_count, v);
    move_instr(&s, 0, find_chunk_instr(&s, 0, RP_OP_RECV_ACT, 0, 1), 0);
    msg = simulate_expect_error(&s, &err);
    expect_in_message(msg, "deadlocks");
    expect_in_message(msg, "stage 0, #0 RECV_ACT m=0 buf=2 chunk=1 waits for stage 1's (chunk 0) "
                           "SEND_ACT of micro-batch 0");
    rp_schedule_free(&s);

    /* the last stage waits for chunk 0's gradient before sending chunk 0's
     * output on: the gradient comes from stage 0's chunk 1, which needs
     * that output */
    build_interleaved_or_fail(&s, p, m_count, v);
    move_instr(&s, 1, find_chunk_instr(&s, 1, RP_OP_RECV_GRAD, 0, 0),
               find_chunk_instr(&s, 1, RP_OP_SEND_ACT, 0, 0));
    msg = simulate_expect_error(&s, &err);
    expect_in_message(msg, "stage 1, #2 RECV_GRAD m=0 buf=0 chunk=0 waits for stage 0's "
                           "(chunk 1) SEND_GRAD of micro-batch 0");
    rp_schedule_free(&s);

    /* a chunk that the stage does not have */
    build_interleaved_or_fail(&s, p, m_count, v);
    s.instr[1][find_chunk_instr(&s, 1, RP_OP_FWD, 2, 1)].chunk = 2;
    expect_in_message(simulate_expect_error(&s, &err), "chunk 2 outside 0..1");
    rp_schedule_free(&s);

    /* stage 0's chunk 1 receives its input from the last stage: relabelled
     * as chunk 0, it would receive on the first model chunk */
    build_interleaved_or_fail(&s, p, m_count, v);
    s.instr[0][find_chunk_instr(&s, 0, RP_OP_RECV_ACT, 1, 1)].chunk = 0;
    expect_in_message(simulate_expect_error(&s, &err), "stage 0 reads its input from the data");
    rp_schedule_free(&s);

    /* the last stage's chunk 0 sends on; chunk 1 computes the loss */
    build_interleaved_or_fail(&s, p, m_count, v);
    s.instr[1][find_chunk_instr(&s, 1, RP_OP_SEND_ACT, 0, 0)].chunk = 1;
    expect_in_message(simulate_expect_error(&s, &err), "the last stage computes the loss");
    rp_schedule_free(&s);

    /* backwards of one chunk out of micro-batch order: the last stage's
     * chunk 0 backwards micro-batch 3 before 2 (both at the end) */
    build_interleaved_or_fail(&s, p, m_count, v);
    int g2 = find_chunk_instr(&s, 1, RP_OP_RECV_GRAD, 2, 0);
    int g3 = find_chunk_instr(&s, 1, RP_OP_RECV_GRAD, 3, 0);
    for (int j = 0; j < 3; j++) {
        rp_pipe_instr t = s.instr[1][g2 + j];
        s.instr[1][g2 + j] = s.instr[1][g3 + j];
        s.instr[1][g3 + j] = t;
    }
    expect_in_message(simulate_expect_error(&s, &err),
                      "increasing micro-batch order: expected micro-batch 2 next");
    rp_schedule_free(&s);

    /* a chunk's last backward missing: REDUCE_GRADS names the chunk */
    build_interleaved_or_fail(&s, p, m_count, v);
    int b = find_chunk_instr(&s, 0, RP_OP_BWD, m_count - 1, 0);
    memmove(&s.instr[0][b], &s.instr[0][b + 1],
            (size_t)(s.n_instr[0] - b - 1) * sizeof(rp_pipe_instr));
    s.n_instr[0]--;
    expect_in_message(simulate_expect_error(&s, &err), "4 forwards and 3 backwards of chunk 0");
    rp_schedule_free(&s);
}

static void test_interleaved_timeline_shows_the_chunk_per_cell(void **state) {
    rp_schedule s;
    rp_sim_result r;
    build_interleaved_or_fail(&s, 2, 4, 2);
    simulate_or_fail(&s, &unit_costs, &r);
    char *text = NULL;
    size_t size = 0;
    FILE *out = open_memstream(&text, &size);
    assert_non_null(out);
    rp_schedule_print_timeline(&s, &r, out);
    fclose(out);
    expect_in_message(text, "theory (P-1)/(v*M+P-1) = 1/9 = 0.1111");
    expect_in_message(text, "bubble fraction 0.1111");
    /* stage 1 starts one unit late, runs chunk 0 then chunk 1 of the first
     * group, and answers chunk 1's forward with its backward at once */
    expect_in_message(text, "stage 1 | .    F0.0 F1.0 F0.1 B0.1 F1.1 B1.1");
    expect_in_message(text, "stage 0 | F0.0 F1.0 F0.1 F1.1 F2.0 B0.1");
    expect_in_message(text, "stage 0: busy 16 (88.9%), peak stash 5, buffers 5");
    free(text);
    rp_sim_result_free(&r, s.n_stages);
    rp_schedule_free(&s);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_every_shape_simulates_without_deadlock),
        cmocka_unit_test(test_bubble_fraction_is_the_theory_under_unit_costs),
        cmocka_unit_test(test_bubble_fraction_is_the_theory_when_backward_costs_twice),
        cmocka_unit_test(test_communication_cost_only_lengthens_the_step),
        cmocka_unit_test(test_1f1b_stashes_at_most_p_minus_s_micro_batches),
        cmocka_unit_test(test_gpipe_stashes_every_micro_batch),
        cmocka_unit_test(test_lists_keep_the_header_conventions),
        cmocka_unit_test(test_1f1b_warms_up_with_p_minus_s_minus_1_forwards),
        cmocka_unit_test(test_gpipe_runs_all_forwards_first),
        cmocka_unit_test(test_deadlock_is_reported_with_the_stuck_stages),
        cmocka_unit_test(test_buffer_reused_before_its_backward_is_reported),
        cmocka_unit_test(test_backward_before_the_next_stage_backward_is_reported),
        cmocka_unit_test(test_backward_before_forward_is_reported),
        cmocka_unit_test(test_backwards_out_of_order_are_reported),
        cmocka_unit_test(test_time_chunks_pipeline_one_sequence),
        cmocka_unit_test(test_time_chunks_in_increasing_backward_order_are_reported),
        cmocka_unit_test(test_time_chunks_recompute_errors_are_reported),
        cmocka_unit_test(test_micro_batch_run_twice_or_never_is_reported),
        cmocka_unit_test(test_list_without_the_optimizer_step_is_reported),
        cmocka_unit_test(test_send_on_the_wrong_end_is_reported),
        cmocka_unit_test(test_bad_arguments_are_rejected_with_a_message),
        cmocka_unit_test(test_names_round_trip),
        cmocka_unit_test(test_timeline_shows_every_op_and_the_bubble),
        cmocka_unit_test(test_zb_h1_bubble_is_a_third_of_1f1b_at_the_same_peak_stash),
        cmocka_unit_test(test_zb_h1_is_1f1b_with_deferred_weight_gradients),
        cmocka_unit_test(test_zb_h1_broken_lists_are_reported),
        cmocka_unit_test(test_interleaved_bubble_is_the_theory_under_unit_costs),
        cmocka_unit_test(test_interleaved_lists_follow_megatron_layout_and_order),
        cmocka_unit_test(test_interleaved_bad_arguments_are_rejected),
        cmocka_unit_test(test_interleaved_broken_lists_are_reported),
        cmocka_unit_test(test_interleaved_timeline_shows_the_chunk_per_cell),
    };
    return cmocka_run_group_tests_name("schedule", tests, NULL, NULL);
}
