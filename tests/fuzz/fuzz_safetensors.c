/* libFuzzer target: the safetensors reader (src/core/safetensors.c), the
 * format of model weights, checkpoints, session states and logits files.
 * Input = a whole file: 8-byte header length, JSON header, data. Every
 * tensor the reader accepts is looked up and converted to f32, so a table
 * entry that points outside the mapping shows up under ASan. */
#include <stdlib.h>

#include "core/safetensors.h"
#include "fuzz_util.h"

/* Bounds the f32 copy per tensor; the data section of an input is small
 * anyway (libFuzzer's -max_len), this only guards the fuzzer's memory. */
#define FUZZ_MAX_ELEMENTS (1 << 22)

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    rp_st_file f;
    rp_error err;
    if (rp_st_open(&f, fuzz_input_path(data, size), &err) != RP_OK) return 0;
    for (int i = 0; i < f.n_tensors; i++) {
        const rp_st_tensor *t = &f.tensors[i];
        if (rp_st_find(&f, t->name) == NULL) abort(); /* the table must stay searchable */
        if (!rp_dtype_is_float(t->dtype) || t->numel > FUZZ_MAX_ELEMENTS) continue;
        float *dst = malloc(((size_t)t->numel + 1) * sizeof *dst);
        if (!dst) continue;
        if (rp_st_read_f32(&f, t, dst, t->numel, &err) != RP_OK) abort(); /* validated above */
        free(dst);
    }
    for (int i = 0; i < f.n_meta; i++)
        if (rp_st_meta(&f, f.meta_keys[i]) == NULL) abort();
    rp_st_close(&f);
    return 0;
}
