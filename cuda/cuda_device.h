/* CUDA device discovery, compiled by nvcc when configured --with-cuda.
 * The CUDA backend (a later issue) builds on this; the CLI uses it to report
 * what it sees. Plain C linkage so C code can call it. */
#ifndef RP_CUDA_DEVICE_H
#define RP_CUDA_DEVICE_H

#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Number of visible CUDA devices; 0 when there is no device or no driver
 * (never an error: CPU-only machines simply have none). */
int rp_cuda_device_count(void);
/* Writes "NAME (sm_XY, N MiB)" for device index, or the driver's error. */
void rp_cuda_device_describe(int index, char *out, size_t out_size);
/* Makes index the calling thread's device; 0 on success, else the driver's
 * error code (message in out). */
int rp_cuda_device_select(int index, char *out, size_t out_size);
/* "CUDA runtime X.Y, driver X.Y". */
void rp_cuda_versions(char *out, size_t out_size);

#ifdef __cplusplus
}
#endif

#endif
