/* What the emulated CUDA runtime (tests/cuda_emu/emu.cpp) has done since the
 * process started, for tests that hold the CUDA backend to a launch budget
 * and to no allocation after warm-up: read before and after the work and
 * subtract. Plain C, linked only into programs built over the emulator. */
#ifndef RP_EMU_COUNTERS_H
#define RP_EMU_COUNTERS_H

typedef struct {
    unsigned long long launches; /* kernel launches; each cuBLAS GEMM counts as one */
    unsigned long long copies;   /* cudaMemcpy(Async) and cudaMemset(Async) calls */
    unsigned long long allocs;   /* cudaMalloc, cudaFree, cudaMallocHost, cudaFreeHost */
    /* launches of to_bf16_kernel: fp32 -> bf16 conversions (GEMM operands, weight copies) */
    unsigned long long bf16_converts;
    unsigned long long graph_launches; /* cudaGraphLaunch calls (their kernels are not
                                          counted in launches again) */
    unsigned long long gemv_group_blocks; /* blocks of gemv_group_kernel launches (the
                                             decode GEMVs' grid, split-K included) */
    unsigned long long pdl_launches; /* launches with programmatic stream serialization
                                        (cudaLaunchKernelEx; issue 15 PDL) */
    unsigned long long device_bytes; /* bytes of the cudaMalloc allocations alive now (not
                                        a count since start: read before and after) */
} rp_emu_counters;

void rp_emu_counts(rp_emu_counters *out);

/* Device bytes per kernel (issue 15: the analytic model's bytes checked):
 * rp_emu_bytes_enable(1) empties the table and from then on every launch
 * that runs notes the distinct 32-byte sectors of device memory it reads and
 * writes (a sector read twice by one launch counts once: what DRAM would
 * move with a perfect L2 inside the launch), summed per key in the order
 * first seen. Keys: a kernel's name as launched (template arguments
 * included), "cublasGemmEx <opA><opB> m n k <A><B>-><C>[ +C]" (A and B read,
 * C written, and read when beta != 0), "cudaMemcpy H2D|D2H|D2D" and
 * "cudaMemset". Off by default (0 switches it off): it slows the checked
 * accesses. Returns 0 where it cannot count (the sanitizer build has no
 * checked accesses), else 1. The key strings live until the next enable. */
typedef struct {
    const char *key;
    unsigned long long launches, bytes_read, bytes_written;
} rp_emu_bytes;
int rp_emu_bytes_enable(int on);
int rp_emu_bytes_rows(void);
/* Row i (0 .. rp_emu_bytes_rows() - 1) into *out; 0 when there is none. */
int rp_emu_bytes_row(int i, rp_emu_bytes *out);

/* The device memory layout from now on (EMU_ALLOC_PAD in emu.cpp): seed > 0
 * pads every cudaMalloc by a seeded amount and never hands freed device
 * memory out again (as ASan's allocator does); 0: the plain layout. A test
 * runs the same work both ways to show that nothing keys on addresses.
 * Returns the seed in force before (EMU_ALLOC_PAD's at start). */
int rp_emu_set_alloc_pad(int seed);

#endif
