/* The one monotonic clock: every timing, deadline and rate in the tree reads
 * it, so durations are comparable across modules. Async-signal-safe (a
 * clock_gettime call), so signal handlers may use it too. */
#ifndef RP_CORE_CLOCK_H
#define RP_CORE_CLOCK_H

/* Seconds on CLOCK_MONOTONIC (an arbitrary origin; only differences mean
 * anything). */
double rp_now_seconds(void);

#endif
