/* SHA-256 (FIPS 180-4), self-contained so checkpoints need no crypto library:
 * an incremental hasher and a whole-file helper. Checkpoint files are listed in
 * their manifest with their SHA-256 (src/train/checkpoint.c); a mismatch means
 * the file was corrupted, truncated or replaced. */
#ifndef RP_CORE_SHA256_H
#define RP_CORE_SHA256_H

#include <stddef.h>
#include <stdint.h>

#include "core/error.h"

#define RP_SHA256_DIGEST_BYTES 32
#define RP_SHA256_HEX_LEN 64   /* hex digits, without the terminating NUL */

typedef struct {
    uint32_t h[8];
    uint64_t total_bytes;
    uint8_t block[64];
    size_t block_used;
} rp_sha256;

void rp_sha256_init(rp_sha256 *s);
void rp_sha256_update(rp_sha256 *s, const void *data, size_t bytes);
void rp_sha256_final(rp_sha256 *s, uint8_t digest[RP_SHA256_DIGEST_BYTES]);

/* One-shot digest of a buffer, as 64 lowercase hex digits + NUL. */
void rp_sha256_hex(const void *data, size_t bytes, char hex[RP_SHA256_HEX_LEN + 1]);
void rp_sha256_digest_to_hex(const uint8_t digest[RP_SHA256_DIGEST_BYTES],
                             char hex[RP_SHA256_HEX_LEN + 1]);

/* Streams path through the hasher; *bytes_out (if non-NULL) receives its size. */
rp_status rp_sha256_file(const char *path, char hex[RP_SHA256_HEX_LEN + 1], uint64_t *bytes_out,
                         rp_error *err);

#endif
