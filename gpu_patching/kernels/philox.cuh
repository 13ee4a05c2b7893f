// Philox4x32-10 (Salmon et al., SC'11; Random123) and the sampler's counter
// layout. The NumPy twin is gpu_patching/rng.py; the tests check both against
// the published known-answer vectors and against each other.
//
// Counter layout (identical to rng.py):
//     counter = (index & 0xffffffff, draw_number, purpose, index >> 32)
//     key     = (seed & 0xffffffff, seed >> 32)
#pragma once

#include "common.cuh"

namespace gp {

// Purpose word of the draw that places a patch inside its stratum.
constexpr u32 PURPOSE_STRATUM = 0;
// Purpose word reserved for epoch shuffling.
constexpr u32 PURPOSE_SHUFFLE = 1;

struct Words4 {
    u32 w[4];
};

// One Philox round constant multiply: the high and low halves of a 32x32-bit
// product. A 64-bit multiply is exact and compiles to mul.wide.u32 on the GPU.
GP_HD void mulhilo32(u32 a, u32 b, u32* hi, u32* lo) {
    const u64 product = static_cast<u64>(a) * static_cast<u64>(b);
    *hi = static_cast<u32>(product >> 32);
    *lo = static_cast<u32>(product);
}

// Philox4x32 with 10 rounds, Random123's constants.
GP_HD Words4 philox4x32_10(Words4 counter, u32 key0, u32 key1) {
    u32 c0 = counter.w[0], c1 = counter.w[1], c2 = counter.w[2], c3 = counter.w[3];
    for (int round = 0; round < 10; ++round) {
        u32 hi0, lo0, hi1, lo1;
        mulhilo32(0xD2511F53u, c0, &hi0, &lo0);
        mulhilo32(0xCD9E8D57u, c2, &hi1, &lo1);
        const u32 n0 = hi1 ^ c1 ^ key0;
        const u32 n2 = hi0 ^ c3 ^ key1;
        c0 = n0;
        c1 = lo1;
        c2 = n2;
        c3 = lo0;
        // Unsigned arithmetic wraps modulo 2**32, as the key schedule requires.
        key0 += 0x9E3779B9u;
        key1 += 0xBB67AE85u;
    }
    Words4 out = {{c0, c1, c2, c3}};
    return out;
}

// The first Philox output word for a (seed, index, draw number, purpose):
// rng.random_uint32 for one index. `index` must be non-negative.
GP_HD u32 random_u32(u64 seed, i64 index, u32 draw_number, u32 purpose) {
    const u64 bits = static_cast<u64>(index);
    Words4 counter = {{static_cast<u32>(bits), draw_number, purpose,
                       static_cast<u32>(bits >> 32)}};
    return philox4x32_10(counter, static_cast<u32>(seed),
                         static_cast<u32>(seed >> 32)).w[0];
}

// `word1 << 32 | word0` of the Philox output for a (seed, index, draw number,
// purpose): rng.random_uint64 for one index. `index` must be non-negative.
GP_HD u64 random_u64(u64 seed, i64 index, u32 draw_number, u32 purpose) {
    const u64 bits = static_cast<u64>(index);
    Words4 counter = {{static_cast<u32>(bits), draw_number, purpose,
                       static_cast<u32>(bits >> 32)}};
    const Words4 out =
        philox4x32_10(counter, static_cast<u32>(seed), static_cast<u32>(seed >> 32));
    return (static_cast<u64>(out.w[1]) << 32) | out.w[0];
}

}  // namespace gp
