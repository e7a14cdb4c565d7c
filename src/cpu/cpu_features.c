/* Run-time CPU feature detection for the quantized kernels (cpu_features.h).
 * __builtin_cpu_supports reads CPUID (and the OS's XSAVE state) once at
 * start-up, so these calls are cheap. */
#include "config.h"

#include <stdlib.h>
#include <string.h>

#include "cpu/cpu_features.h"

static const char *const isa_names[] = {"generic", "avx2", "avx512", "avx512bf16",
                                        "avx512vnni"};

const char *rp_cpu_isa_name(rp_cpu_isa isa) {
    return isa >= RP_CPU_ISA_GENERIC && isa <= RP_CPU_ISA_AVX512VNNI ? isa_names[isa] : "?";
}

int rp_cpu_isa_parse(const char *name, rp_cpu_isa *out) {
    for (int i = 0; i <= RP_CPU_ISA_AVX512VNNI; i++)
        if (!strcmp(name, isa_names[i])) {
            *out = (rp_cpu_isa)i;
            return 0;
        }
    return -1;
}

int rp_cpu_isa_supported(rp_cpu_isa isa) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_cpu_init();
    switch (isa) {
    case RP_CPU_ISA_GENERIC: return 1;
    case RP_CPU_ISA_AVX2:
        return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    case RP_CPU_ISA_AVX512:
        return rp_cpu_isa_supported(RP_CPU_ISA_AVX2) && __builtin_cpu_supports("avx512f") &&
               __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl");
    case RP_CPU_ISA_AVX512BF16:
        return rp_cpu_isa_supported(RP_CPU_ISA_AVX512) &&
               __builtin_cpu_supports("avx512bf16");
    case RP_CPU_ISA_AVX512VNNI: /* Ice Lake has VNNI without BF16: not implied */
        return rp_cpu_isa_supported(RP_CPU_ISA_AVX512) && __builtin_cpu_supports("avx512vnni");
    }
    return 0;
#else
    return isa == RP_CPU_ISA_GENERIC;
#endif
}

rp_cpu_isa rp_cpu_isa_detect(void) {
    rp_cpu_isa best = RP_CPU_ISA_GENERIC;
    for (int i = RP_CPU_ISA_AVX2; i <= RP_CPU_ISA_AVX512VNNI; i++)
        if (rp_cpu_isa_supported((rp_cpu_isa)i)) best = (rp_cpu_isa)i;
    return best;
}

rp_status rp_cpu_isa_from_env(rp_cpu_isa *out, rp_error *err) {
    const char *v = getenv("RP_CPU_ISA");
    *out = rp_cpu_isa_detect();
    if (!v || !*v) return RP_OK;
    rp_cpu_isa want;
    if (rp_cpu_isa_parse(v, &want))
        return rp_error_set(err, RP_ERR_ARG, "RP_CPU_ISA='%s' is not an instruction set: use one of %s, or unset it",
                            v, RP_CPU_ISA_CHOICES);
    if (!rp_cpu_isa_supported(want))
        return rp_error_set(err, RP_ERR_ARG,
                            "RP_CPU_ISA='%s': this CPU does not have it (its best is %s): use "
                            "one of %s up to %s, or unset it",
                            v, rp_cpu_isa_name(*out), RP_CPU_ISA_CHOICES, rp_cpu_isa_name(*out));
    *out = want;
    return RP_OK;
}
