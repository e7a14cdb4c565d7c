/* The fake-device test backend (cpu_fake_device.c): the CPU backend's
 * arithmetic on memory the host cannot touch directly (is_host_memory = 0;
 * any host access through its pointers faults), so tests on a CPU-only
 * machine find code that dereferences backend memory instead of copying it. */
#ifndef RP_CPU_FAKE_DEVICE_H
#define RP_CPU_FAKE_DEVICE_H

#include "backend.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Returns NULL with err set on failure; destroy with rp_backend_destroy. */
rp_backend *rp_fake_device_backend_create(int n_threads, rp_error *err);

#ifdef __cplusplus
}
#endif

#endif
