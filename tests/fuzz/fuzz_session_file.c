/* libFuzzer target: saved session states (rp_session_file_read in
 * src/infer/session_file.c): safetensors plus a hex SessionHeader protobuf
 * in the metadata, or a state-tuning file. Clients of `rwkvpipe serve` can
 * make the server load these, so a bad file must fail cleanly. The model
 * shape is the built-in "tiny" (L2, C128, 2 heads of 64), as the seeds. */
#include <stdlib.h>

#include "model/config.h"
#include "model/state.h"
#include "infer/session_file.h"
#include "fuzz_util.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    rp_config cfg;
    rp_error err;
    if (rp_config_builtin(&cfg, "tiny", 256, &err) != RP_OK) abort();
    rp_state view;
    rp_state_geometry(&view, &cfg, 0, cfg.n_layer, 1);
    float *state = malloc(view.floats_per_slot * sizeof *state);
    if (!state) abort();
    uint64_t tokens;
    (void)rp_session_file_read(fuzz_input_path(data, size), &cfg, &tokens, state, &err);
    free(state);
    return 0;
}
