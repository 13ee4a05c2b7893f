// Fixed-width integers and host/device qualifiers shared by every kernel header.
//
// The same headers are compiled three ways: by NVRTC (through CuPy, and by the
// test suite without a GPU), by nvcc, and by the host C++ compiler for the
// bit-exactness tests. NVRTC has no system headers, so under __CUDACC_RTC__ the
// integer types are spelled with built-in types; everywhere else <cstdint>
// provides them and static_asserts prove the widths agree.
#pragma once

#if defined(__CUDACC_RTC__)
namespace gp {
typedef unsigned char u8;
typedef unsigned int u32;
// The 64-bit types are long long in every build, never int64_t: on LP64 Linux
// int64_t is `long`, and the kernel's C signature (and ctypes, and the NumPy
// dtype map of the launch code) use `long long`. Pointers to `long` and to
// `long long` do not convert into each other.
typedef long long i64;
typedef unsigned long long u64;
}  // namespace gp
#else
#include <cstdint>
namespace gp {
typedef std::uint8_t u8;
typedef std::uint32_t u32;
typedef long long i64;
typedef unsigned long long u64;
static_assert(sizeof(i64) == sizeof(std::int64_t), "long long must be 64 bits");
static_assert(sizeof(u64) == sizeof(std::uint64_t), "long long must be 64 bits");
}  // namespace gp
#endif

#if defined(__CUDACC__)
// Inlined everywhere: these helpers are tiny and run once per patch.
#define GP_HD __host__ __device__ __forceinline__
#else
// Plain C++: the CUDA qualifiers mean nothing, the functions are header-only.
#ifndef __host__
#define __host__
#endif
#ifndef __device__
#define __device__
#endif
#ifndef __forceinline__
#define __forceinline__
#endif
#define GP_HD inline
#endif
