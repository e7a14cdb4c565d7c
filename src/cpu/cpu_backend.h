/* The CPU backend's constructor (src/cpu: BLAS + OpenMP, fp32, the
 * reference twin of cuda/). Callers use the rp_backend vtable of backend.h;
 * the private context is in cpu_internal.h. */
#ifndef RP_CPU_BACKEND_H
#define RP_CPU_BACKEND_H

#include "backend.h"

#ifdef __cplusplus
extern "C" {
#endif

/* n_threads <= 0 means OpenMP's default. Returns NULL with err set on
 * failure. */
rp_backend *rp_cpu_backend_create(int n_threads, rp_error *err);
void rp_cpu_backend_destroy(rp_backend *be);

#ifdef __cplusplus
}
#endif

#endif
