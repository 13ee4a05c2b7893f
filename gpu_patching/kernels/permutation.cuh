// The order of an epoch: which patch index row t draws (shuffle and DDP shard).
//
// The CUDA twin of gpu_patching/permutation.py (its module docstring states the
// construction); tests/test_kernels_host.py compiles this header with the host
// C++ compiler and checks it against the NumPy code bit for bit.
//
// shuffle_position is a permutation of [0, N) keyed by (seed, epoch): a Feistel
// network on [0, B * 2**k) with cycle walking. A value is R * 2**k + L (L: the
// low k bits, R in [0, B)); even rounds set L ^= top k bits of F(R), odd rounds
// R = (R + (((F(L) >> 16) * B) >> 16)) mod B. Each round is undone by its
// inverse, so the network is a bijection, and walking (re-applying it until the
// value is below N) is a bijection of [0, N). Everything is computed per row, from scalars:
// no sort, no table, no communication.
#pragma once

#include "common.cuh"
#include "philox.cuh"

// Full unrolling keeps the round keys in registers (indexed by constants); the
// host compiler would warn about the pragma, and unrolls on its own anyway.
#if defined(__CUDACC__)
#define GP_SHUFFLE_UNROLL _Pragma("unroll")
#else
#define GP_SHUFFLE_UNROLL
#endif

namespace gp {

// permutation.SHUFFLE_ROUNDS: rounds of the network (a multiple of 4, the
// key words of one Philox call).
constexpr int SHUFFLE_ROUNDS = 8;
static_assert(SHUFFLE_ROUNDS % 4 == 0, "round keys come four to a Philox call");
// permutation._MIN_LOW_BITS and _MIN_HIGH_SIZE: the smallest halves.
constexpr int SHUFFLE_MIN_LOW_BITS = 3;
constexpr u64 SHUFFLE_MIN_HIGH_SIZE = 8;
// MurmurHash3's fmix32 multipliers.
constexpr u32 SHUFFLE_MIX1 = 0x85EBCA6Bu;
constexpr u32 SHUFFLE_MIX2 = 0xC2B2AE35u;

// The permutation of one epoch: its domain and round keys (permutation.py's
// feistel_domain and round_keys).
struct Shuffle {
    i64 n_positions;            // N; no position is valid when N <= 0
    int low_bits;               // k in [3, 32]
    u32 high_size;              // B in [8, 2**31]
    u32 keys[SHUFFLE_ROUNDS];   // key of each round
};

// Number of bits of `value` (0 for 0): Python's int.bit_length.
GP_HD int bit_length(u64 value) {
    int bits = 0;
    while (value) {
        ++bits;
        value >>= 1;
    }
    return bits;
}

// The domain and keys of the permutation of [0, n_positions) for an epoch.
// Key r is word r % 4 of the Philox output of counter
// (r / 4, draw_number, PURPOSE_SHUFFLE, 0): rng.py's counter layout with the
// key block as the index word.
GP_HD Shuffle make_shuffle(i64 n_positions, u64 seed, u32 draw_number) {
    Shuffle shuffle;
    shuffle.n_positions = n_positions;
    const u64 n = n_positions > 1 ? static_cast<u64>(n_positions) : 1;
    int low_bits = (bit_length(n - 1) + 1) / 2;
    low_bits = low_bits < SHUFFLE_MIN_LOW_BITS ? SHUFFLE_MIN_LOW_BITS : low_bits;
    // ceil(n / 2**k) <= 2**31 for any n < 2**63 (k >= 32 once n >= 2**62).
    u64 high_size = (n + (1ull << low_bits) - 1) >> low_bits;
    high_size = high_size < SHUFFLE_MIN_HIGH_SIZE ? SHUFFLE_MIN_HIGH_SIZE : high_size;
    shuffle.low_bits = low_bits;
    shuffle.high_size = static_cast<u32>(high_size);
GP_SHUFFLE_UNROLL
    for (int block = 0; block < SHUFFLE_ROUNDS / 4; ++block) {
        const Words4 counter = {{static_cast<u32>(block), draw_number, PURPOSE_SHUFFLE, 0u}};
        const Words4 words =
            philox4x32_10(counter, static_cast<u32>(seed), static_cast<u32>(seed >> 32));
GP_SHUFFLE_UNROLL
        for (int word = 0; word < 4; ++word) shuffle.keys[4 * block + word] = words.w[word];
    }
    return shuffle;
}

// The round function F(half, key): fmix32's two multiply/xor-shift steps of
// half ^ key (arithmetic mod 2**32).
GP_HD u32 shuffle_mix(u32 half, u32 key) {
    u32 mixed = (half ^ key) * SHUFFLE_MIX1;
    mixed ^= mixed >> 16;
    return mixed * SHUFFLE_MIX2;
}

// One pass of the Feistel network; `value` must be below B * 2**k.
GP_HD u64 shuffle_network(const Shuffle& shuffle, u64 value) {
    const int low_bits = shuffle.low_bits;
    u32 low = static_cast<u32>(value & ((1ull << low_bits) - 1));
    u32 high = static_cast<u32>(value >> low_bits);
GP_SHUFFLE_UNROLL
    for (int round = 0; round < SHUFFLE_ROUNDS; ++round) {
        if (round % 2 == 0) {
            low ^= shuffle_mix(high, shuffle.keys[round]) >> (32 - low_bits);
        } else {
            // Lemire's range reduction of F's top 16 bits: ((F >> 16) * B) >> 16
            // is in [0, B) (the product < 2**47 fits 64 bits for B <= 2**31),
            // and high + step < 2 B <= 2**32, so one subtraction reduces it.
            const u64 top = shuffle_mix(low, shuffle.keys[round]) >> 16;
            high += static_cast<u32>((top * shuffle.high_size) >> 16);
            if (high >= shuffle.high_size) high -= shuffle.high_size;
        }
    }
    return (static_cast<u64>(high) << low_bits) | low;
}

// The patch index at `position` of the shuffled order: permutation.permute for
// one position, or -1 when the position is outside [0, N). The walk ends: the
// network's cycle through `position` comes back to it, and it is below N.
GP_HD i64 shuffle_position(const Shuffle& shuffle, i64 position) {
    if (shuffle.n_positions <= 0 || position < 0 || position >= shuffle.n_positions) {
        return -1;
    }
    const u64 n = static_cast<u64>(shuffle.n_positions);
    u64 value = static_cast<u64>(position);
    do {
        value = shuffle_network(shuffle, value);
    } while (value >= n);
    return static_cast<i64>(value);
}

// permutation.EpochOrder as kernel arguments: row t takes position
// first_position + t * position_step, modulo n_positions when that is positive
// (a shard's padding wraps round), then its index is the position, or
// shuffle_position of it when `shuffle` is nonzero. With `indices` given, row
// t is simply indices[t].
struct EpochOrder {
    const i64* indices;   // [rows] or null
    i64 first_position;
    i64 position_step;
    i64 n_positions;
    int shuffle;
};

// The permutation an order needs (its keys are only computed when shuffling).
GP_HD Shuffle order_shuffle(const EpochOrder& order, u64 seed, u32 draw_number) {
    if (order.indices == nullptr && order.shuffle) {
        return make_shuffle(order.n_positions, seed, draw_number);
    }
    Shuffle none = {};
    return none;
}

// The global patch index of row `row` (which the caller keeps in [0, rows)),
// or a negative value that makes the draw fail. The position arithmetic is
// unsigned, so no argument can make it overflow.
GP_HD i64 row_index(const EpochOrder& order, const Shuffle& shuffle, i64 row) {
    if (order.indices != nullptr) return order.indices[row];
    u64 position = static_cast<u64>(order.first_position) +
                   static_cast<u64>(row) * static_cast<u64>(order.position_step);
    if (order.n_positions > 0) position %= static_cast<u64>(order.n_positions);
    if (!order.shuffle) return static_cast<i64>(position);
    return shuffle_position(shuffle, static_cast<i64>(position));
}

}  // namespace gp
