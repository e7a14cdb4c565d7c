/* Build identity for --version, file metadata and logs. */
#ifndef RP_CORE_VERSION_H
#define RP_CORE_VERSION_H

/* "0.1.0" */
const char *rp_version(void);
/* One line: version, BLAS, CUDA/NCCL build flags, sanitizers. */
const char *rp_build_description(void);

#endif
