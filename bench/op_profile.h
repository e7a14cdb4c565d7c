/* Per-op time of any backend: op_profile_wrap returns a backend whose every
 * op calls the wrapped backend's op between two host clocks (each preceded
 * by the backend's synchronize, so on a GPU an op's time is its launch, its
 * kernels and one synchronisation; that last part makes small GPU ops look
 * slower than they are inside an unsynchronised step, which the printed
 * table says next to the unprofiled time). Matmuls are kept apart by shape.
 * Used by bench_cpu --profile and bench_gpu --profile; its clock is the
 * one in core (rp_now_seconds). */
#ifndef RP_BENCH_OP_PROFILE_H
#define RP_BENCH_OP_PROFILE_H

#include <stdio.h>

#include "backend.h"

#define OP_PROFILE_MAX_ENTRIES 96

typedef struct {
    char name[64];
    double seconds;
    long calls;
} op_profile_entry;

typedef struct {
    rp_backend be; /* first: the wrapping backend's ops receive &profile->be */
    rp_backend *inner;
    op_profile_entry entries[OP_PROFILE_MAX_ENTRIES];
    int n_entries;
    long dropped_calls; /* calls whose key did not fit the table (counted, not timed) */
} op_profile;

/* Fills *p so that &p->be forwards every op to inner (which must outlive
 * it) with timing; fields and impl are inner's, so helpers that read
 * be->impl keep working. Destroying &p->be does nothing. */
void op_profile_wrap(op_profile *p, rp_backend *inner);
/* Forgets the times so far (e.g. after warm-up calls). */
void op_profile_reset(op_profile *p);
/* A markdown table: op, calls per unit, ms per unit, share of the profiled
 * total; `units` = how many calls of the thing profiled ran (e.g. decode
 * steps) and `unprofiled_ms` the time of one unit without the wrapper (for
 * the reader to see the timing's own cost; <= 0 leaves the line out). */
void op_profile_print(FILE *out, const op_profile *p, const char *title, long units,
                      double unprofiled_ms);

#endif
