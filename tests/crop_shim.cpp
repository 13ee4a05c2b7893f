// Host build of the crop kernels' index math, for tests/test_crop_kernels_host.py.
//
// crop_host_<size> runs gp::crop_thread, the exact per-thread code of
// crop_patches_<size>, for every thread of every block of a launch, one after
// another (threads write disjoint elements, so the order does not matter). Its
// parameters are the kernel's followed by the launch shape, so the test drives
// it with the same argument tuple (crop.crop_launch_args) and the same
// configuration (crop.crop_launch) as a GPU launch. Stack addresses in the
// stack table are host addresses here.
#include "crop.cuh"

namespace {

template <typename T>
void crop_host(const long long* stack_table, long long n_stacks, const long long* data_idx,
               const long long* sample_idx, const long long* coords, int ndim,
               long long n_rows, long long n_channels, long long patch_z, long long patch_y,
               long long patch_x, T* out, long long grid_x, long long grid_y,
               long long block_x, long long block_y) {
    const gp::CropJob<T> job = {{stack_table, n_stacks},
                                {data_idx, sample_idx, coords, ndim, n_rows},
                                {n_channels, {patch_z, patch_y, patch_x}},
                                out};
    gp::ThreadPlace place = {0, 0, grid_x, grid_y, 0, 0, block_x, block_y};
    for (place.block_y = 0; place.block_y < grid_y; ++place.block_y) {
        for (place.block_x = 0; place.block_x < grid_x; ++place.block_x) {
            for (place.thread_y = 0; place.thread_y < block_y; ++place.thread_y) {
                for (place.thread_x = 0; place.thread_x < block_x; ++place.thread_x) {
                    gp::crop_thread(job, place);
                }
            }
        }
    }
}

// An element that counts the assignments made to it: crop_thread<WriteCounter>
// is the kernel's code with every output write counted.
struct WriteCounter {
    long long writes;
    WriteCounter& operator=(const WriteCounter&) {
        ++writes;
        return *this;
    }
};
static_assert(sizeof(WriteCounter) == 8, "a counter is read like an 8-byte element");

}  // namespace

extern "C" {

int crop_lines_per_thread() { return gp::CROP_LINES_PER_THREAD; }

int crop_stack_fields() { return gp::CROP_STACK_FIELDS; }

void crop_host_1(const long long* stack_table, long long n_stacks, const long long* data_idx,
                 const long long* sample_idx, const long long* coords, int ndim,
                 long long n_rows, long long n_channels, long long patch_z, long long patch_y,
                 long long patch_x, unsigned char* out, long long grid_x, long long grid_y,
                 long long block_x, long long block_y) {
    crop_host(stack_table, n_stacks, data_idx, sample_idx, coords, ndim, n_rows, n_channels,
              patch_z, patch_y, patch_x, out, grid_x, grid_y, block_x, block_y);
}

void crop_host_2(const long long* stack_table, long long n_stacks, const long long* data_idx,
                 const long long* sample_idx, const long long* coords, int ndim,
                 long long n_rows, long long n_channels, long long patch_z, long long patch_y,
                 long long patch_x, unsigned short* out, long long grid_x, long long grid_y,
                 long long block_x, long long block_y) {
    crop_host(stack_table, n_stacks, data_idx, sample_idx, coords, ndim, n_rows, n_channels,
              patch_z, patch_y, patch_x, out, grid_x, grid_y, block_x, block_y);
}

void crop_host_4(const long long* stack_table, long long n_stacks, const long long* data_idx,
                 const long long* sample_idx, const long long* coords, int ndim,
                 long long n_rows, long long n_channels, long long patch_z, long long patch_y,
                 long long patch_x, unsigned int* out, long long grid_x, long long grid_y,
                 long long block_x, long long block_y) {
    crop_host(stack_table, n_stacks, data_idx, sample_idx, coords, ndim, n_rows, n_channels,
              patch_z, patch_y, patch_x, out, grid_x, grid_y, block_x, block_y);
}

void crop_host_8(const long long* stack_table, long long n_stacks, const long long* data_idx,
                 const long long* sample_idx, const long long* coords, int ndim,
                 long long n_rows, long long n_channels, long long patch_z, long long patch_y,
                 long long patch_x, unsigned long long* out, long long grid_x,
                 long long grid_y, long long block_x, long long block_y) {
    crop_host(stack_table, n_stacks, data_idx, sample_idx, coords, ndim, n_rows, n_channels,
              patch_z, patch_y, patch_x, out, grid_x, grid_y, block_x, block_y);
}

// crop_host_8 with every output element counting the writes it receives
// (writes must start at 0): the launch covers each element exactly once iff
// every count ends at 1. The stacks' elements must be 8 bytes.
void crop_write_counts(const long long* stack_table, long long n_stacks,
                       const long long* data_idx, const long long* sample_idx,
                       const long long* coords, int ndim, long long n_rows,
                       long long n_channels, long long patch_z, long long patch_y,
                       long long patch_x, unsigned long long* writes, long long grid_x,
                       long long grid_y, long long block_x, long long block_y) {
    crop_host(stack_table, n_stacks, data_idx, sample_idx, coords, ndim, n_rows, n_channels,
              patch_z, patch_y, patch_x, reinterpret_cast<WriteCounter*>(writes), grid_x,
              grid_y, block_x, block_y);
}

// check_crop_rows on the host: the same rule per row, and the same result as
// its atomicMin (the smallest failing row, or n_rows).
void check_rows_host(const long long* stack_table, long long n_stacks, const long long* data_idx,
                     const long long* sample_idx, const long long* coords, int ndim,
                     long long n_rows, long long patch_z, long long patch_y, long long patch_x,
                     long long* first_bad) {
    const gp::StackTable stacks = {stack_table, n_stacks};
    const gp::CropRows rows = {data_idx, sample_idx, coords, ndim, n_rows};
    const gp::PatchShape shape = {1, {patch_z, patch_y, patch_x}};
    for (long long row = 0; row < n_rows; ++row) {
        if (!gp::row_in_range(stacks, rows, shape, row) && row < first_bad[0]) first_bad[0] = row;
    }
}

}  // extern "C"
