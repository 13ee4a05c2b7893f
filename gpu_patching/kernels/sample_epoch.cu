// One launch per epoch: every patch of the epoch, one thread per patch.
//
// Row t of the output is global patch index `indices[t]`, or `first_index + t`
// when `indices` is null (an epoch is the range [0, N)). The host side maps the
// flat sample number to (data_idx, sample_idx). The parameter list is mirrored
// by SAMPLE_EPOCH_PARAMS in gpu_patching/backends/cuda_backend.py, and a test
// compares the two; every scalar has an exact NumPy twin:
//     long long <-> numpy.int64, unsigned long long <-> numpy.uint64,
//     unsigned int <-> numpy.uint32, int <-> numpy.int32.
#include "stratified.cuh"

extern "C" __global__ void sample_epoch(
    const long long* patch_offset,
    const long long* n_patches,
    const long long* mass_offset,
    const long long* region_offset,
    const long long* grid_shape,
    const long long* spatial_shape,
    const long long* patch_size,
    const long long* mass_prefix,
    const long long* weight,
    const unsigned char* subbox_mask,
    long long n_samples,
    long long n_regions,
    int ndim,
    const long long* indices,
    long long first_index,
    long long n_rows,
    unsigned int draw_number,
    unsigned long long seed,
    long long* sample,
    long long* coords) {
    const gp::TableView tables = {
        patch_offset, n_patches, mass_offset, region_offset, grid_shape,
        spatial_shape, patch_size, mass_prefix, weight, subbox_mask,
        n_samples, n_regions, ndim};
    // Grid-stride loop: any grid size covers every row exactly once.
    const long long stride = static_cast<long long>(gridDim.x) * blockDim.x;
    for (long long row = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
         row < n_rows; row += stride) {
        gp::draw_row(tables, indices, first_index, row, draw_number, seed, sample, coords);
    }
}
