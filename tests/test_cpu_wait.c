/* The CPU backend's OpenMP wait policy (src/cpu/cpu_wait.c): a program that
 * links the backend starts libgomp with a bounded spin unless the user chose a
 * policy, so an idle team does not burn CPU while the main thread is busy
 * elsewhere (docs/perf/cpu.md, "Threads under contention"). */
#include "config.h"

#include <omp.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <cmocka.h>

#include "backend.h"
#include "cpu/cpu_backend.h"
#include "cpu/cpu_wait.h"

static int policy_from_environment(void) {
    return strstr(rp_cpu_wait_policy(), "from the environment") != NULL;
}

/* Unless the test's own environment set a policy, the backend set
 * GOMP_SPINCOUNT before libgomp started and says so. */
static void test_bounded_spin_is_set_before_main(void **state) {
    (void)state;
    if (policy_from_environment()) skip();
    const char *spin = getenv("GOMP_SPINCOUNT");
    assert_non_null(spin);
    assert_string_equal(spin, RP_CPU_SPINCOUNT);
    assert_string_equal(rp_cpu_wait_policy(), "bounded spin (GOMP_SPINCOUNT=" RP_CPU_SPINCOUNT ")");
}

static double thread_cpu_s(void) {
    struct timespec t;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

/* Between regions the team's other thread must sleep, not spin: 100 tiny
 * 2-thread regions, each followed by 2 ms in which the main thread sleeps;
 * the CPU time the worker thread (libgomp keeps the same one) used from the
 * first region to the last. With libgomp's default (300000 spins) it spins
 * through much of each gap (measured: 300-700 ms over 100 gaps, in CPU time,
 * so a loaded machine does not hide it); bounded, a few ms in all. */
static void test_idle_team_does_not_spin(void **state) {
    (void)state;
    if (policy_from_environment()) skip();
    rp_error err;
    rp_backend *be = rp_cpu_backend_create(2, &err);
    assert_non_null(be);
    const int regions = 100;
    const struct timespec pause = {0, 2 * 1000 * 1000};
    double first = -1.0, last = -1.0;
    for (int i = 0; i < regions; i++) {
#pragma omp parallel num_threads(2)
        {
            if (omp_get_thread_num() == 1) {
                if (i == 0) first = thread_cpu_s();
                if (i == regions - 1) last = thread_cpu_s();
            }
        }
        nanosleep(&pause, NULL);
    }
    assert_true(first >= 0.0 && last >= 0.0); /* the team had two threads */
    double worker = last - first, gaps = (regions - 1) * 2e-3;
    print_message("idle worker: %.1f ms of CPU over %.0f ms of gaps\n", worker * 1e3, gaps * 1e3);
    assert_true(worker < 0.1 * gaps);
    rp_cpu_backend_destroy(be);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_bounded_spin_is_set_before_main),
        cmocka_unit_test(test_idle_team_does_not_spin),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
