// Host build of the device functions the epoch kernel calls, for their own
// known-answer tests in tests/test_kernels_host.py: Philox4x32-10, the 64-bit
// random words, the exact high product, and the epoch's shuffle. The kernels
// themselves are launched on the host by tests/host_launch.py, not here.
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

}  // extern "C"
