/* libFuzzer target: the checkpoint manifest (manifest.pb, a protobuf
 * CheckpointManifest) and rwkvpipe's validation of it after unpacking
 * (src/train/checkpoint.c): read_info (what `train --resume` and `info`
 * read), verify (hashes the files it names: names must stay inside the step
 * directory) and describe. The input is the manifest of a step directory
 * that holds nothing else. */
#include <stdio.h>
#include <stdlib.h>
#include <sys/stat.h>

#include "train/checkpoint.h"
#include "fuzz_util.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    static char dir[4200], manifest[4300];
    if (!dir[0]) {
        snprintf(dir, sizeof dir, "%s/step-00000001", fuzz_scratch_dir());
        snprintf(manifest, sizeof manifest, "%s/%s", dir, RP_CKPT_MANIFEST_NAME);
        if (mkdir(dir, 0700) != 0) fuzz_die("mkdir");
    }
    FILE *fp = fopen(manifest, "wb");
    if (!fp || fwrite(data, 1, size, fp) != size || fclose(fp) != 0) fuzz_die(manifest);
    rp_ckpt_info info;
    rp_error err;
    if (rp_ckpt_read_info(dir, &info, &err) == RP_OK) {
        if (info.cfg.n_layer < 0 || info.cfg.n_embd < 0) abort();
        /* The step directory has only the manifest: every file it names is
         * missing, so verification can never pass. */
        if (rp_ckpt_verify(dir, &err) == RP_OK) abort();
    }
    FILE *out = fopen("/dev/null", "w");
    if (!out) fuzz_die("/dev/null");
    (void)rp_ckpt_describe(dir, out, &err);
    fclose(out);
    return 0;
}
