/* bench_cpu --quant (bench_cpu_quant.c): the quantized GEMV/GEMM table. */
#ifndef RP_BENCH_CPU_QUANT_TABLE_H
#define RP_BENCH_CPU_QUANT_TABLE_H

/* Prints the table for each thread count; 0 on success. */
int bench_cpu_quant(const int *threads, int n_counts, int quick);

#endif
