// Patch extraction from device-resident stacks: one launch per batch.
//
// crop_patches<T> copies every patch of a batch, from any number of stacks,
// into one C-contiguous (N, C, (PZ,) PY, PX) array. T is the unsigned integer
// type of the elements' size (1, 2, 4 or 8 bytes): the kernel copies bits, so
// every dtype of a size shares one instantiation. crop_patches.py names the
// four instantiations (crop_kernel), which gpu_patching/cuda.py hands to NVRTC
// as name expressions. check_crop_rows finds the first row whose patch leaves
// its stack, for batches whose rows live on the device. The index math is in
// crop.cuh. crop_patches.py parses both signatures (Kernel.from_source);
// every scalar has an exact NumPy twin:
// long long <-> numpy.int64, int <-> numpy.int32.
#include "crop.cuh"

namespace {

__device__ __forceinline__ gp::ThreadPlace this_thread() {
    gp::ThreadPlace place;
    place.block_x = blockIdx.x;
    place.block_y = blockIdx.y;
    place.grid_x = gridDim.x;
    place.grid_y = gridDim.y;
    place.thread_x = threadIdx.x;
    place.thread_y = threadIdx.y;
    place.dim_x = blockDim.x;
    place.dim_y = blockDim.y;
    return place;
}

}  // namespace

template <typename T>
__global__ void crop_patches(
    const long long* stack_table,
    long long n_stacks,
    const long long* data_idx,
    const long long* sample_idx,
    const long long* coords,
    int ndim,
    long long n_rows,
    long long n_channels,
    long long patch_z,
    long long patch_y,
    long long patch_x,
    T* out) {
    const gp::CropJob<T> job = {{stack_table, n_stacks},
                                {data_idx, sample_idx, coords, ndim, n_rows},
                                {n_channels, {patch_z, patch_y, patch_x}},
                                out};
    gp::crop_thread(job, this_thread());
}

// first_bad[0] must hold n_rows on entry; it ends as the first row whose patch
// leaves its stack (gp::row_in_range), or n_rows if there is none.
extern "C" __global__ void check_crop_rows(
    const long long* stack_table,
    long long n_stacks,
    const long long* data_idx,
    const long long* sample_idx,
    const long long* coords,
    int ndim,
    long long n_rows,
    long long patch_z,
    long long patch_y,
    long long patch_x,
    long long* first_bad) {
    const gp::StackTable stacks = {stack_table, n_stacks};
    const gp::CropRows rows = {data_idx, sample_idx, coords, ndim, n_rows};
    const gp::PatchShape shape = {1, {patch_z, patch_y, patch_x}};
    // Grid-stride loop: any grid size checks every row exactly once.
    const long long stride = static_cast<long long>(gridDim.x) * blockDim.x;
    for (long long row = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
         row < n_rows; row += stride) {
        if (!gp::row_in_range(stacks, rows, shape, row)) atomicMin(first_bad, row);
    }
}
