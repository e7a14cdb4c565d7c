/* SHA-256 (FIPS 180-4, sha256.h): the straightforward 64-round compression on
 * big-endian words. Portable C; at a few hundred MB/s it is fast next to the
 * fsync that follows every checkpoint file. */
#include "core/sha256.h"

#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static const uint32_t k_round[64] = {
    0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4,
    0xab1c5ed5, 0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe,
    0x9bdc06a7, 0xc19bf174, 0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f,
    0x4a7484aa, 0x5cb0a9dc, 0x76f988da, 0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7,
    0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967, 0x27b70a85, 0x2e1b2138, 0x4d2c6dfc,
    0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85, 0xa2bfe8a1, 0xa81a664b,
    0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070, 0x19a4c116,
    0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
    0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7,
    0xc67178f2};

static inline uint32_t rotr(uint32_t x, int n) { return (x >> n) | (x << (32 - n)); }

static void compress(uint32_t h[8], const uint8_t *p) {
    uint32_t w[64];
    for (int i = 0; i < 16; i++)
        w[i] = (uint32_t)p[4 * i] << 24 | (uint32_t)p[4 * i + 1] << 16 |
               (uint32_t)p[4 * i + 2] << 8 | (uint32_t)p[4 * i + 3];
    for (int i = 16; i < 64; i++) {
        uint32_t s0 = rotr(w[i - 15], 7) ^ rotr(w[i - 15], 18) ^ (w[i - 15] >> 3);
        uint32_t s1 = rotr(w[i - 2], 17) ^ rotr(w[i - 2], 19) ^ (w[i - 2] >> 10);
        w[i] = w[i - 16] + s0 + w[i - 7] + s1;
    }
    uint32_t a = h[0], b = h[1], c = h[2], d = h[3], e = h[4], f = h[5], g = h[6], hh = h[7];
    for (int i = 0; i < 64; i++) {
        uint32_t t1 = hh + (rotr(e, 6) ^ rotr(e, 11) ^ rotr(e, 25)) + ((e & f) ^ (~e & g)) +
                      k_round[i] + w[i];
        uint32_t t2 = (rotr(a, 2) ^ rotr(a, 13) ^ rotr(a, 22)) + ((a & b) ^ (a & c) ^ (b & c));
        hh = g;
        g = f;
        f = e;
        e = d + t1;
        d = c;
        c = b;
        b = a;
        a = t1 + t2;
    }
    h[0] += a;
    h[1] += b;
    h[2] += c;
    h[3] += d;
    h[4] += e;
    h[5] += f;
    h[6] += g;
    h[7] += hh;
}

void rp_sha256_init(rp_sha256 *s) {
    static const uint32_t h0[8] = {0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a,
                                   0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19};
    memcpy(s->h, h0, sizeof h0);
    s->total_bytes = 0;
    s->block_used = 0;
}

void rp_sha256_update(rp_sha256 *s, const void *data, size_t bytes) {
    const uint8_t *p = data;
    s->total_bytes += bytes;
    if (s->block_used) {
        size_t take = 64 - s->block_used < bytes ? 64 - s->block_used : bytes;
        memcpy(s->block + s->block_used, p, take);
        s->block_used += take;
        p += take;
        bytes -= take;
        if (s->block_used < 64) return;
        compress(s->h, s->block);
        s->block_used = 0;
    }
    for (; bytes >= 64; p += 64, bytes -= 64) compress(s->h, p);
    if (bytes) memcpy(s->block, p, bytes);
    s->block_used = bytes;
}

void rp_sha256_final(rp_sha256 *s, uint8_t digest[RP_SHA256_DIGEST_BYTES]) {
    uint64_t bits = s->total_bytes * 8;
    /* 0x80, zeros up to 56 mod 64, then the bit length big-endian. */
    s->block[s->block_used++] = 0x80;
    if (s->block_used > 56) {
        memset(s->block + s->block_used, 0, 64 - s->block_used);
        compress(s->h, s->block);
        s->block_used = 0;
    }
    memset(s->block + s->block_used, 0, 56 - s->block_used);
    for (int i = 0; i < 8; i++) s->block[56 + i] = (uint8_t)(bits >> (56 - 8 * i));
    compress(s->h, s->block);
    for (int i = 0; i < 8; i++)
        for (int j = 0; j < 4; j++) digest[4 * i + j] = (uint8_t)(s->h[i] >> (24 - 8 * j));
    rp_sha256_init(s);
}

void rp_sha256_digest_to_hex(const uint8_t digest[RP_SHA256_DIGEST_BYTES],
                             char hex[RP_SHA256_HEX_LEN + 1]) {
    static const char digits[] = "0123456789abcdef";
    for (int i = 0; i < RP_SHA256_DIGEST_BYTES; i++) {
        hex[2 * i] = digits[digest[i] >> 4];
        hex[2 * i + 1] = digits[digest[i] & 15];
    }
    hex[RP_SHA256_HEX_LEN] = '\0';
}

void rp_sha256_hex(const void *data, size_t bytes, char hex[RP_SHA256_HEX_LEN + 1]) {
    rp_sha256 s;
    uint8_t digest[RP_SHA256_DIGEST_BYTES];
    rp_sha256_init(&s);
    rp_sha256_update(&s, data, bytes);
    rp_sha256_final(&s, digest);
    rp_sha256_digest_to_hex(digest, hex);
}

rp_status rp_sha256_file(const char *path, char hex[RP_SHA256_HEX_LEN + 1], uint64_t *bytes_out,
                         rp_error *err) {
    enum { CHUNK_BYTES = 1 << 20 };
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return rp_error_set(err, RP_ERR_IO, "%s: cannot open: %s", path, strerror(errno));
    uint8_t *buf = rp_malloc(CHUNK_BYTES, "sha256 read buffer", err);
    if (!buf) {
        close(fd);
        return RP_ERR_NOMEM;
    }
    rp_sha256 s;
    rp_sha256_init(&s);
    rp_status st = RP_OK;
    for (;;) {
        ssize_t n = read(fd, buf, CHUNK_BYTES);
        if (n < 0 && errno == EINTR) continue;
        if (n < 0) {
            st = rp_error_set(err, RP_ERR_IO, "%s: read failed: %s", path, strerror(errno));
            break;
        }
        if (n == 0) break;
        rp_sha256_update(&s, buf, (size_t)n);
    }
    if (st == RP_OK) {
        if (bytes_out) *bytes_out = s.total_bytes;
        uint8_t digest[RP_SHA256_DIGEST_BYTES];
        rp_sha256_final(&s, digest);
        rp_sha256_digest_to_hex(digest, hex);
    }
    free(buf);
    close(fd);
    return st;
}
