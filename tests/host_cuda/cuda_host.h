// A host stand-in for CUDA's launch model, so that the test suite can compile
// the shipped .cu files with the host C++ compiler and launch every __global__
// function over every block and thread of a grid, on a machine without a GPU.
//
// What it provides is exactly what the kernels use: the qualifiers
// (__global__, __device__, __host__, __forceinline__), the built-in variables
// blockIdx, threadIdx, blockDim and gridDim, and atomicMin. gp_host::run plays
// one launch: it sets gridDim and blockDim, then runs the kernel body once per
// (block, thread) pair, every pair exactly once, in an order permuted by a
// seed (a GPU promises no order between threads, so neither do we). Threads run
// one after another, so an atomic is a plain read-modify-write here; the
// kernels share no memory between threads and never synchronise, so that is
// the whole of their concurrency.
//
// Included before the .cu file by the launcher that tests/host_launch.py
// generates; never part of the package.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <numeric>
#include <utility>
#include <vector>

#define __global__
#define __host__
#define __device__
#define __forceinline__

struct gp_host_dim3 {
    unsigned int x, y, z;
};

namespace gp_host {

inline thread_local gp_host_dim3 block_index = {0, 0, 0};
inline thread_local gp_host_dim3 thread_index = {0, 0, 0};
inline thread_local gp_host_dim3 block_dim = {1, 1, 1};
inline thread_local gp_host_dim3 grid_dim = {1, 1, 1};

// One launch: grid and block sizes along x, y, z, and the seed of the order
// in which the (block, thread) pairs run (0: the natural order).
struct Launch {
    long long grid[3];
    long long block[3];
    unsigned long long order_seed;
    long long only_pair;  // >= 0: run only the (block, thread) pair of this linear index
};

// splitmix64: a small, well-mixed generator for the permutation.
inline unsigned long long next_random(unsigned long long& state) {
    state += 0x9e3779b97f4a7c15ULL;
    unsigned long long z = state;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

inline gp_host_dim3 unravel(long long linear, const long long size[3]) {
    gp_host_dim3 place;
    place.x = static_cast<unsigned int>(linear % size[0]);
    place.y = static_cast<unsigned int>((linear / size[0]) % size[1]);
    place.z = static_cast<unsigned int>(linear / (size[0] * size[1]));
    return place;
}

template <typename Body>
void run(const Launch& launch, Body body) {
    long long n_blocks = 1;
    long long n_threads = 1;
    for (int axis = 0; axis < 3; ++axis) {
        if (launch.grid[axis] < 1 || launch.block[axis] < 1) {
            // No exception may cross the extern "C" launcher into ctypes.
            std::fprintf(stderr, "gp_host::run: grid and block sizes must be >= 1\n");
            std::abort();
        }
        n_blocks *= launch.grid[axis];
        n_threads *= launch.block[axis];
    }
    const long long n_pairs = n_blocks * n_threads;
    if (n_pairs > (1LL << 24)) {
        std::fprintf(stderr, "gp_host::run: launch of %lld threads too large for the host\n",
                     n_pairs);
        std::abort();
    }
    std::vector<long long> order(static_cast<std::size_t>(n_pairs));
    std::iota(order.begin(), order.end(), 0LL);
    if (launch.order_seed != 0) {
        unsigned long long state = launch.order_seed;
        for (long long k = n_pairs - 1; k > 0; --k) {
            const long long j = static_cast<long long>(next_random(state) % (k + 1));
            std::swap(order[static_cast<std::size_t>(k)], order[static_cast<std::size_t>(j)]);
        }
    }
    grid_dim = {static_cast<unsigned int>(launch.grid[0]),
                static_cast<unsigned int>(launch.grid[1]),
                static_cast<unsigned int>(launch.grid[2])};
    block_dim = {static_cast<unsigned int>(launch.block[0]),
                 static_cast<unsigned int>(launch.block[1]),
                 static_cast<unsigned int>(launch.block[2])};
    for (const long long pair : order) {
        if (launch.only_pair >= 0 && pair != launch.only_pair) continue;
        block_index = unravel(pair / n_threads, launch.grid);
        thread_index = unravel(pair % n_threads, launch.block);
        body();
    }
}

}  // namespace gp_host

#define blockIdx (::gp_host::block_index)
#define threadIdx (::gp_host::thread_index)
#define blockDim (::gp_host::block_dim)
#define gridDim (::gp_host::grid_dim)

// CUDA's atomicMin for the integer types it supports; threads run one at a
// time here, so a plain read-modify-write is atomic.
template <typename T>
inline T atomicMin(T* address, T value) {
    const T old = *address;
    if (value < old) *address = value;
    return old;
}

namespace gp_host {

// An 8-byte element that counts the assignments made to it: the crop kernel
// instantiated with it (tests/host_launch.py's WRITE_COUNTS) shows how many
// times a launch writes each output element.
struct WriteCounter {
    long long writes;
    WriteCounter& operator=(const WriteCounter&) {
        ++writes;
        return *this;
    }
};
static_assert(sizeof(WriteCounter) == 8, "a counter is read like an 8-byte element");

// An 8-byte element that counts how often it is read: assigning from it
// increments the source's count. The crop kernel instantiated with it
// (READ_COUNTS) shows how many times a launch reads each stack element.
struct ReadCounter {
    mutable long long reads;
    ReadCounter() : reads(0) {}
    ReadCounter& operator=(const ReadCounter& source) {
        ++source.reads;
        return *this;
    }
};
static_assert(sizeof(ReadCounter) == 8, "a counter is read like an 8-byte element");

}  // namespace gp_host
