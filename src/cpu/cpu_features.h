/* The x86 instruction sets the CPU's quantized kernels can use, found at run
 * time (not from the compiler's -march): a binary built with AVX-512 kernels
 * still runs on an older x86-64. RP_CPU_ISA (environment) caps the level, to
 * test or measure a lower path on a machine that has the higher one. */
#ifndef RP_CPU_FEATURES_H
#define RP_CPU_FEATURES_H

#include "core/error.h"

/* Ordered: a level caps the kernels at those it names and the ones below it;
 * avx512vnni is the top (it also takes the BF16 dot product where the CPU has
 * it, which a CPU with VNNI need not: rp_cpu_isa_supported checks each). */
typedef enum {
    RP_CPU_ISA_GENERIC = 0,    /* portable C */
    RP_CPU_ISA_AVX2 = 1,       /* AVX2 + FMA */
    RP_CPU_ISA_AVX512 = 2,     /* AVX512F/BW/VL */
    RP_CPU_ISA_AVX512BF16 = 3, /* + AVX512_BF16 (vdpbf16ps) */
    RP_CPU_ISA_AVX512VNNI = 4  /* + AVX512_VNNI (vpdpbusd) */
} rp_cpu_isa;

#define RP_CPU_ISA_CHOICES "generic, avx2, avx512, avx512bf16, avx512vnni"

const char *rp_cpu_isa_name(rp_cpu_isa isa);
/* 0 and *out for a name in RP_CPU_ISA_CHOICES; -1 otherwise. */
int rp_cpu_isa_parse(const char *name, rp_cpu_isa *out);
/* Whether this CPU runs `isa`'s kernels (__builtin_cpu_supports). */
int rp_cpu_isa_supported(rp_cpu_isa isa);
/* The highest level this CPU supports. */
rp_cpu_isa rp_cpu_isa_detect(void);
/* The level to use: RP_CPU_ISA if set (an error naming the value and the
 * choices when it is unknown or this CPU lacks it), else rp_cpu_isa_detect(). */
rp_status rp_cpu_isa_from_env(rp_cpu_isa *out, rp_error *err);

#endif
