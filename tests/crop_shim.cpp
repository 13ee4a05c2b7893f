// The constants of crop.cuh through a C ABI, for tests/test_crop_kernels_host.py
// (the crop kernels themselves are launched on the host by tests/host_launch.py).
#include "crop.cuh"

extern "C" {

int crop_lines_per_thread() { return gp::CROP_LINES_PER_THREAD; }

int crop_stack_fields() { return gp::CROP_STACK_FIELDS; }

}  // extern "C"
