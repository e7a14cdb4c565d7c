/* Build identity (version.h). The only core file that reads the autoconf
 * header, so nothing else depends on build flags for its identity. */
#include "config.h"

#include "core/version.h"

const char *rp_version(void) { return PACKAGE_VERSION; }

const char *rp_build_description(void) {
    return "rwkvpipe " PACKAGE_VERSION " (CPU: CBLAS + OpenMP"
#ifdef RP_HAVE_CUDA
           "; CUDA: yes"
#else
           "; CUDA: no"
#endif
#ifdef RP_HAVE_NCCL
           "; NCCL: yes"
#else
           "; NCCL: no"
#endif
#if defined(__SANITIZE_ADDRESS__)
           "; sanitizers: yes"
#endif
           ")";
}
