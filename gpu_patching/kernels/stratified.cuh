// The per-patch draw: global patch index -> (data_idx, sample_idx, corner).
//
// This is the CUDA twin of gpu_patching/backends/numpy_backend.py (its module
// docstring states the algorithm) and must agree with NumpyBackend.draw bit for
// bit; tests/test_kernels_host.py compiles this header with the host C++
// compiler and checks exactly that on random tables.
//
// Safety: every table read is at an index that a clamped search or an explicit
// range check keeps inside the array lengths implied by `TableView` (listed on
// its fields), whatever the table contents; inconsistent tables make a draw
// fail (draw_patch returns false and the row is -1 in every column) instead of
// reading out of bounds or dividing by zero. Only the lengths are trusted, and
// the launch code checks them before every launch.
#pragma once

#include "common.cuh"
#include "philox.cuh"

namespace gp {

// Spatial dimensions supported by the kernels.
constexpr int MIN_NDIM = 2;
constexpr int MAX_NDIM = 3;

// Read-only view of gpu_patching.tables.RegionTables (S samples, R regions,
// d = ndim). Every array is C-contiguous.
struct TableView {
    const i64* patch_offset;   // [S + 1] first global patch index of each sample
    const i64* n_patches;      // [S]     patches (strata) per sample
    const i64* mass_offset;    // [S + 1] first global mass point of each sample
    const i64* region_offset;  // [S + 1] first region row of each sample
    const i64* grid_shape;     // [S * d] grid cells per axis, row-major (S, d)
    const i64* spatial_shape;  // [S * d] (Z)YX shape, row-major (S, d)
    const i64* patch_size;     // [d]
    const i64* stack_of_sample;  // [S]   data_idx of each sample
    const i64* sample_in_stack;  // [S]   sample_idx of each sample
    const i64* mass_prefix;    // [R]     exclusive prefix sum of region masses
    const i64* weight;         // [R]     quantised probability q of each region
    const u8* subbox_mask;     // [R]     selectable sub-boxes (grid.subbox_masks)
    i64 n_samples;             // S >= 0
    i64 n_regions;             // R >= 0
    int ndim;                  // d in [MIN_NDIM, MAX_NDIM]
};

// The high 64 bits of the 128-bit product a * b: numpy_backend._mulhi64_halves, with
// the same 32-bit limbs. Written out rather than __umul64hi so that the GPU
// runs exactly the code the host build is tested with (both are exact anyway).
GP_HD u64 mulhi64(u64 a, u64 b) {
    const u64 mask = 0xFFFFFFFFull;
    const u64 a_low = a & mask, a_high = a >> 32;
    const u64 b_low = b & mask, b_high = b >> 32;
    const u64 high_low = a_high * b_low;
    // (low*low >> 32) + low 32 bits of high*low + low*high < 2**64: no overflow.
    const u64 middle = ((a_low * b_low) >> 32) + (high_low & mask) + a_low * b_high;
    return a_high * b_high + (high_low >> 32) + (middle >> 32);
}

// The mass point drawn in stratum j of n over [0, M): numpy_backend.stratum_points
// for one draw. With q, r = divmod(M, n) the stratum owns
// [j q + (j r) / n, (j + 1) q + ((j + 1) r) / n); all products stay below 2**62
// for the limits tables.py enforces (n < 2**31, M < 2**62). The point is
// lo + floor(word * width / 2**64): a stratum is narrower than 2**62 points, so
// the 64 random bits reach every one of them.
GP_HD i64 stratum_point(i64 stratum, i64 n_patches, i64 mass_total, u64 word) {
    const i64 quotient = mass_total / n_patches;
    const i64 remainder = mass_total % n_patches;
    const i64 lower = stratum * quotient + (stratum * remainder) / n_patches;
    const i64 upper =
        (stratum + 1) * quotient + ((stratum + 1) * remainder) / n_patches;
    const u64 width = static_cast<u64>(upper - lower);
    return lower + static_cast<i64>(mulhi64(word, width));
}

// The last k in [first, last) with sorted[k] <= value, or first - 1 if there is
// none. Only sorted[first .. last - 1] is read, whatever the contents; on a
// non-decreasing array it equals np.searchsorted(side="right") - 1 restricted to
// the range.
GP_HD i64 last_at_most(const i64* sorted, i64 first, i64 last, i64 value) {
    i64 count = last - first;
    while (count > 0) {
        const i64 half = count / 2;
        const i64 middle = first + half;
        if (sorted[middle] <= value) {
            first = middle + 1;
            count -= half + 1;
        } else {
            count = half;
        }
    }
    return first - 1;
}

// Sub-box `bit` picks part `subbox_part<NDIM>(bit, axis)` along `axis`: bit k is
// itertools.product((0, 1), repeat=NDIM)[k] (grid.subbox_offsets), whose first
// axis is the most significant bit.
template <int NDIM>
GP_HD int subbox_part(int bit, int axis) {
    return (bit >> (NDIM - 1 - axis)) & 1;
}

// The corner that owns mass point `point` (0 <= point < M) of sample `sample`:
// numpy_backend.locate_corners for one point. `sample` must be in [0, S).
template <int NDIM>
GP_HD bool locate_corner(const TableView& tables, i64 sample, i64 point, i64* corner) {
    const i64 first = tables.region_offset[sample];
    const i64 last = tables.region_offset[sample + 1];
    if (first < 0 || first >= last || last > tables.n_regions) return false;
    const i64 global_point = tables.mass_offset[sample] + point;
    // Searching only the sample's rows gives the same row as NumPy's search over
    // the whole array: the sample's first prefix is mass_offset[sample] <= the
    // point and the next sample's is mass_offset[sample + 1] > the point.
    const i64 region = last_at_most(tables.mass_prefix, first, last, global_point);
    if (region < first) return false;
    const i64 weight = tables.weight[region];
    if (weight <= 0) return false;
    // Non-negative by the search. On absurd tables wrapped arithmetic can make
    // it negative: then the sub-box search below stops at once with a negative
    // box_rank, which is refused there, before any division by a part size.
    const i64 rank = (global_point - tables.mass_prefix[region]) / weight;
    const u32 mask = tables.subbox_mask[region];

    // Unravel the cell row-major and size both parts of every axis
    // (grid.axis_part_sizes for one cell).
    i64 cell = region - first;
    i64 cell_start[NDIM], part0[NDIM], part1[NDIM];
    for (int axis = NDIM - 1; axis >= 0; --axis) {
        const i64 cells = tables.grid_shape[sample * NDIM + axis];
        const i64 patch = tables.patch_size[axis];
        if (cells <= 0 || patch <= 0) return false;
        const i64 start = (cell % cells) * patch;
        cell /= cells;
        const i64 last_corner = tables.spatial_shape[sample * NDIM + axis] - patch;
        i64 rest = last_corner - start;
        rest = rest < 0 ? 0 : rest;
        rest = rest > patch - 1 ? patch - 1 : rest;
        cell_start[axis] = start;
        part0[axis] = start <= last_corner ? 1 : 0;
        part1[axis] = rest;
    }

    // The first selectable sub-box, in bit order, whose corners cover the rank.
    int chosen = -1;
    i64 box_rank = rank;
    for (int bit = 0; bit < (1 << NDIM); ++bit) {
        i64 size = static_cast<i64>((mask >> bit) & 1u);
        for (int axis = 0; axis < NDIM; ++axis) {
            size *= subbox_part<NDIM>(bit, axis) ? part1[axis] : part0[axis];
        }
        if (box_rank < size) {
            chosen = bit;
            break;
        }
        box_rank -= size;
    }
    if (chosen < 0 || box_rank < 0) return false;

    // Unravel the rank row-major inside the sub-box. Every factor of the chosen
    // sub-box's (positive) size is positive, so the divisions are safe.
    for (int axis = NDIM - 1; axis >= 0; --axis) {
        const int part = subbox_part<NDIM>(chosen, axis);
        const i64 length = part ? part1[axis] : part0[axis];
        const i64 offset = box_rank % length;
        box_rank /= length;
        corner[axis] = cell_start[axis] + part * (1 + offset);
    }
    return true;
}

// Draw global patch `index` (NDIM == tables.ndim): its flat sample and its
// corner (NDIM values). Returns false, leaving the outputs untouched, when the
// index is outside [0, patch_offset[S]) or the tables are inconsistent.
template <int NDIM>
GP_HD bool draw_patch(const TableView& tables, i64 index, u32 draw_number, u64 seed,
                      i64* sample_out, i64* corner) {
    if (tables.n_samples < 1 || index < 0) return false;
    if (index < tables.patch_offset[0] || index >= tables.patch_offset[tables.n_samples]) {
        return false;
    }
    const i64 sample = last_at_most(tables.patch_offset, 0, tables.n_samples, index);
    if (sample < 0) return false;
    const i64 n_patches = tables.n_patches[sample];
    const i64 stratum = index - tables.patch_offset[sample];
    if (n_patches <= 0 || stratum < 0 || stratum >= n_patches) return false;
    const i64 mass_total = tables.mass_offset[sample + 1] - tables.mass_offset[sample];
    if (mass_total <= 0) return false;
    const u64 word = random_u64(seed, index, draw_number, PURPOSE_STRATUM);
    const i64 point = stratum_point(stratum, n_patches, mass_total, word);
    i64 found[NDIM];
    if (!locate_corner<NDIM>(tables, sample, point, found)) return false;
    *sample_out = sample;
    for (int axis = 0; axis < NDIM; ++axis) corner[axis] = found[axis];
    return true;
}

// The output columns of a launch of N rows, all C-contiguous int64. The kernel
// writes the whole result itself, so the host needs no further kernel to map
// flat samples to (data_idx, sample_idx) or to build the index column.
struct RowOutputs {
    i64* data_idx;     // [N]     stack of each patch
    i64* sample_idx;   // [N]     sample (within its stack) of each patch
    i64* coords;       // [N * d] corner of each patch, row-major (N, d)
    i64* patch_index;  // [N]     global patch index of each row
};

// Write row `row` as a failed draw: -1 in every column. `width` values of coords.
GP_HD void write_failed_row(const RowOutputs& out, i64 row, int width) {
    out.data_idx[row] = -1;
    out.sample_idx[row] = -1;
    out.patch_index[row] = -1;
    for (int axis = 0; axis < width; ++axis) out.coords[row * width + axis] = -1;
}

// One output row (NDIM == tables.ndim): the patch of global index `index`
// (permutation.cuh's row_index says which index a row draws). A failed draw
// (an index outside the epoch, or inconsistent tables) writes -1 in every
// column, index included, so every row is always written and a bad row is
// recognisable in any column.
template <int NDIM>
GP_HD void draw_row_nd(const TableView& tables, i64 index, i64 row, u32 draw_number,
                       u64 seed, const RowOutputs& out) {
    i64 sample = -1;
    i64 corner[NDIM];
    if (!draw_patch<NDIM>(tables, index, draw_number, seed, &sample, corner)) {
        write_failed_row(out, row, NDIM);
        return;
    }
    // draw_patch returned a sample in [0, S): both reads are in bounds.
    out.data_idx[row] = tables.stack_of_sample[sample];
    out.sample_idx[row] = tables.sample_in_stack[sample];
    out.patch_index[row] = index;
    for (int axis = 0; axis < NDIM; ++axis) out.coords[row * NDIM + axis] = corner[axis];
}

// draw_row_nd for the runtime dimensionality of the tables (a row of an
// unsupported dimensionality is all -1). The caller keeps `row` in [0, N) for
// outputs of N rows (see RowOutputs; coords holds N * max(ndim, 0) values).
GP_HD void draw_row(const TableView& tables, i64 index, i64 row, u32 draw_number, u64 seed,
                    const RowOutputs& out) {
    switch (tables.ndim) {
        case 2:
            draw_row_nd<2>(tables, index, row, draw_number, seed, out);
            return;
        case 3:
            draw_row_nd<3>(tables, index, row, draw_number, seed, out);
            return;
        default:
            write_failed_row(out, row, tables.ndim);
    }
}

}  // namespace gp
