/* libFuzzer target: loading model weights (rp_model_load in
 * src/model/model.c): the safetensors reader, then deriving the model
 * config from tensor names and shapes (official or HF names) and reading
 * every tensor into the CPU backend. Weights come from the network, so a
 * crafted file must fail with a message, never crash or allocate wildly. */
#include <stdlib.h>

#include "backend.h"
#include "cpu/cpu_backend.h"
#include "model/model.h"
#include "fuzz_util.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    rp_error err;
    rp_backend *be = rp_cpu_backend_create(1, &err);
    if (!be) abort();
    rp_model m;
    if (rp_model_load(&m, fuzz_input_path(data, size), 0, -1, be, &err) == RP_OK) rp_model_free(&m);
    rp_backend_destroy(be);
    return 0;
}
