// One launch per epoch: every patch of the epoch, one thread per row.
//
// Row t of the output draws global patch index `indices[t]` when an index
// array is given; otherwise the index comes from the epoch order
// (permutation.cuh's row_index): position first_position + t * position_step,
// wrapped modulo n_positions when that is positive (a DDP shard's padding), and
// put through the seed-and-epoch keyed permutation when `shuffle` is nonzero.
// A plain epoch is (0, 1, 0, 0); rank r of a shuffled epoch sharded over w
// ranks is (r, w, N, 1). The index of a row depends only on its row number, so
// a shuffled, sharded epoch is this same single launch: no sort, no gather.
//
// The kernel writes every column of the result (data_idx, sample_idx, coords
// and the patch index), so an epoch needs no other kernel. SAMPLE_EPOCH in
// sample_epoch.py is parsed from this signature; every scalar has an exact
// NumPy twin:
//     long long <-> numpy.int64, unsigned long long <-> numpy.uint64,
//     unsigned int <-> numpy.uint32, int <-> numpy.int32.
#include "permutation.cuh"
#include "stratified.cuh"

extern "C" __global__ void sample_epoch(
    const long long* patch_offset,
    const long long* n_patches,
    const long long* mass_offset,
    const long long* region_offset,
    const long long* grid_shape,
    const long long* spatial_shape,
    const long long* patch_size,
    const long long* stack_of_sample,
    const long long* sample_in_stack,
    const long long* mass_prefix,
    const long long* weight,
    const unsigned char* subbox_mask,
    long long n_samples,
    long long n_regions,
    int ndim,
    const long long* indices,
    long long first_position,
    long long position_step,
    long long n_positions,
    int shuffle,
    long long n_rows,
    unsigned int draw_number,
    unsigned long long seed,
    long long* data_idx,
    long long* sample_idx,
    long long* coords,
    long long* patch_index) {
    const gp::TableView tables = {
        patch_offset, n_patches, mass_offset, region_offset, grid_shape,
        spatial_shape, patch_size, stack_of_sample, sample_in_stack, mass_prefix,
        weight, subbox_mask, n_samples, n_regions, ndim};
    const gp::RowOutputs out = {data_idx, sample_idx, coords, patch_index};
    const gp::EpochOrder order = {indices, first_position, position_step, n_positions, shuffle};
    // The round keys depend on the epoch only: once per thread, not per row.
    const gp::Shuffle permutation = gp::order_shuffle(order, seed, draw_number);
    // Grid-stride loop: any grid size covers every row exactly once.
    const long long stride = static_cast<long long>(gridDim.x) * blockDim.x;
    for (long long row = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
         row < n_rows; row += stride) {
        const long long index = gp::row_index(order, permutation, row);
        gp::draw_row(tables, index, row, draw_number, seed, out);
    }
}
