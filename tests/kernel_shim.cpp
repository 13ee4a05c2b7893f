// Host build of the kernel headers, for tests/test_kernels_host.py.
//
// It compiles the exact per-patch code the GPU runs (gpu_patching/kernels) with
// the host C++ compiler and exposes it through a C ABI for ctypes. draw_epoch
// plays the GPU's threads one after another: row t runs the same row_index and
// draw_row as thread t of sample_epoch, with the same arguments in the same
// order.
#include "permutation.cuh"
#include "philox.cuh"
#include "stratified.cuh"

extern "C" {

// Philox4x32-10 of one counter and key (for the known-answer vectors).
void philox(const unsigned int* counter, const unsigned int* key, unsigned int* out) {
    gp::Words4 words = {{counter[0], counter[1], counter[2], counter[3]}};
    const gp::Words4 result = gp::philox4x32_10(words, key[0], key[1]);
    for (int k = 0; k < 4; ++k) out[k] = result.w[k];
}

// The first Philox word of (seed, index, draw number, purpose).
unsigned int random_u32(unsigned long long seed, long long index, unsigned int draw_number,
                        unsigned int purpose) {
    return gp::random_u32(seed, index, draw_number, purpose);
}

// `word1 << 32 | word0` of (seed, index, draw number, purpose): the stratum draw.
unsigned long long random_u64(unsigned long long seed, long long index,
                              unsigned int draw_number, unsigned int purpose) {
    return gp::random_u64(seed, index, draw_number, purpose);
}

// The high 64 bits of a 128-bit product.
unsigned long long mulhi64(unsigned long long a, unsigned long long b) {
    return gp::mulhi64(a, b);
}

// The Feistel domain (k, B) and round keys of an epoch's permutation of N.
void shuffle_parameters(long long n_positions, unsigned long long seed,
                        unsigned int draw_number, long long* domain, unsigned int* keys) {
    const gp::Shuffle shuffle = gp::make_shuffle(n_positions, seed, draw_number);
    domain[0] = shuffle.low_bits;
    domain[1] = shuffle.high_size;
    for (int k = 0; k < gp::SHUFFLE_ROUNDS; ++k) keys[k] = shuffle.keys[k];
}

// The shuffled order's index at each of `count` positions (-1 outside [0, N)).
void shuffle_positions(long long n_positions, unsigned long long seed,
                       unsigned int draw_number, const long long* positions, long long count,
                       long long* out) {
    const gp::Shuffle shuffle = gp::make_shuffle(n_positions, seed, draw_number);
    for (long long k = 0; k < count; ++k) out[k] = gp::shuffle_position(shuffle, positions[k]);
}

// sample_epoch on the host: the kernel's parameter list, rows in order.
void draw_epoch(const long long* patch_offset, const long long* n_patches,
                const long long* mass_offset, const long long* region_offset,
                const long long* grid_shape, const long long* spatial_shape,
                const long long* patch_size, const long long* stack_of_sample,
                const long long* sample_in_stack, const long long* mass_prefix,
                const long long* weight, const unsigned char* subbox_mask,
                long long n_samples, long long n_regions, int ndim,
                const long long* indices, long long first_position, long long position_step,
                long long n_positions, int shuffle, long long n_rows,
                unsigned int draw_number, unsigned long long seed, long long* data_idx,
                long long* sample_idx, long long* coords, long long* patch_index) {
    const gp::TableView tables = {
        patch_offset, n_patches, mass_offset, region_offset, grid_shape,
        spatial_shape, patch_size, stack_of_sample, sample_in_stack, mass_prefix,
        weight, subbox_mask, n_samples, n_regions, ndim};
    const gp::RowOutputs out = {data_idx, sample_idx, coords, patch_index};
    const gp::EpochOrder order = {indices, first_position, position_step, n_positions, shuffle};
    const gp::Shuffle permutation = gp::order_shuffle(order, seed, draw_number);
    for (long long row = 0; row < n_rows; ++row) {
        const long long index = gp::row_index(order, permutation, row);
        gp::draw_row(tables, index, row, draw_number, seed, out);
    }
}

}  // extern "C"
