/* The mock NCCL build's stand-in for the fake-device backend: with
 * RWKVPIPE_TEST_FAKE_DEVICE=1 the rwkvpipe_nccl_mock binary runs on the CPU
 * backend marked is_host_memory = 0, so the stage transport moves "device"
 * buffers through NCCL (the mock), whose copies are then plain host memory.
 * Defining this symbol keeps cpu_fake_device.o out of the link. */
#include "config.h"

#include "cpu/cpu_backend.h"
#include "cpu/cpu_fake_device.h"

rp_backend *rp_fake_device_backend_create(int n_threads, rp_error *err) {
    rp_backend *be = rp_cpu_backend_create(n_threads, err);
    if (be) {
        be->is_host_memory = 0;
        be->name = "cpu-as-device (mock NCCL test build)";
    }
    return be;
}
