/* Shared by the libFuzzer targets in tests/fuzz: hands the parsers under test
 * the fuzz input as a file (they all open paths), through one memfd rewritten
 * per run, and a scratch directory for parsers that need one. Nothing else
 * survives from one input to the next. See tests/fuzz/README.md. */
#ifndef RP_FUZZ_UTIL_H
#define RP_FUZZ_UTIL_H

#include <ftw.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

/* A failure of the harness itself (not of the parser) must stop the run
 * loudly rather than look like an uninteresting input. */
static inline void fuzz_die(const char *what) {
    perror(what);
    abort();
}

/* Writes data to a file and returns its path (/proc/self/fd/N of a memfd, so
 * nothing touches the disk). Valid until the next call. */
static inline const char *fuzz_input_path(const uint8_t *data, size_t size) {
    static int fd = -1;
    static char path[64];
    if (fd < 0) {
        fd = memfd_create("rp-fuzz-input", MFD_CLOEXEC);
        if (fd < 0) fuzz_die("memfd_create");
        snprintf(path, sizeof path, "/proc/self/fd/%d", fd);
    }
    if (ftruncate(fd, 0) != 0) fuzz_die("ftruncate");
    size_t done = 0;
    while (done < size) {
        ssize_t n = pwrite(fd, data + done, size - done, (off_t)done);
        if (n <= 0) fuzz_die("pwrite");
        done += (size_t)n;
    }
    return path;
}

static int fuzz_remove_entry(const char *path, const struct stat *sb, int flag, struct FTW *ftw) {
    (void)sb;
    (void)flag;
    (void)ftw;
    return remove(path);
}

static char fuzz_scratch[4096];

static void fuzz_remove_scratch(void) {
    if (fuzz_scratch[0]) nftw(fuzz_scratch, fuzz_remove_entry, 16, FTW_DEPTH | FTW_PHYS);
}

/* A private directory under $TMPDIR (default /tmp), removed at exit. */
static inline const char *fuzz_scratch_dir(void) {
    if (!fuzz_scratch[0]) {
        const char *tmp = getenv("TMPDIR");
        snprintf(fuzz_scratch, sizeof fuzz_scratch, "%s/rp-fuzz-XXXXXX",
                 tmp && *tmp ? tmp : "/tmp");
        if (!mkdtemp(fuzz_scratch)) fuzz_die("mkdtemp");
        atexit(fuzz_remove_scratch);
    }
    return fuzz_scratch;
}

#endif
