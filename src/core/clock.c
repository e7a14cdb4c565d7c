/* rp_now_seconds (clock.h): CLOCK_MONOTONIC, immune to wall-clock jumps, so a
 * deadline cannot fire early or never because an NTP step moved the time. */
#include "core/clock.h"

#include <time.h>

double rp_now_seconds(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}
