// Patch extraction: which element of which stack each output element copies.
//
// This is the index math of the crop kernel (crop_patches.cu);
// gpu_patching/crop.py holds the NumPy twin and the launcher (DeviceCrop),
// crop_patches.py the launch arguments. The test suite launches the kernel
// itself on the host (tests/host_launch.py). The output is C-contiguous
// (N, C, PZ, PY, PX) (PZ = 1 in 2D); element (row, c, z, y, x) is
// stacks[d][s, c, z0 + z, y0 + y, x0 + x] with d = data_idx[row],
// s = sample_idx[row] and (z0,) y0, x0 = coords[row].
//
// Work split. A "line" is the PX elements of one (row, c, z, y): contiguous in
// the output and, for a stack whose X stride is 1, in the stack. Block
// (bx, by) of a 2D grid owns row bx and the by-th chunk of that row's lines
// (grid-stride loops over both, so any grid covers every element exactly once);
// inside a block, threadIdx.x walks X (consecutive threads, consecutive x:
// coalesced reads and writes) and threadIdx.y walks lines. A thread handles up
// to CROP_LINES_PER_THREAD lines of its chunk and loads all of them before it
// stores any, so that several loads are in flight per thread: the compiler may
// not reorder a load past a store through a possibly aliasing pointer.
//
// Safety. The stack table (built by crop.stack_table from real arrays: every
// size >= 1, strides that address every in-range index) is trusted; the rows
// are not. Every index is clamped into its stack before it is used (a stack, a
// sample and a channel into [0, size - 1]; a corner into [0, max(D - P, 0)] and
// each corner + offset into [0, D - 1]), so no row contents can make a read
// leave a stack. The host checks the rows first (row_in_range is the rule), so
// on accepted input the clamps change nothing.
#pragma once

#include "common.cuh"

namespace gp {

// Lines of one chunk per thread: a chunk is blockDim.y * CROP_LINES_PER_THREAD
// lines. Mirrored by crop.CROP_LINES_PER_THREAD (a host test compares them).
constexpr int CROP_LINES_PER_THREAD = 8;

// One stack's row of the stack table: CROP_STACK_FIELDS long long values.
constexpr int CROP_STACK_ADDRESS = 0;  // address of element (0, 0, 0, 0, 0)
constexpr int CROP_STACK_SHAPE = 1;    // 5 sizes S, C, Z, Y, X (Z = 1 in 2D)
constexpr int CROP_STACK_STRIDE = 6;   // 5 strides in elements (Z: 0 in 2D)
constexpr int CROP_STACK_FIELDS = 11;

// The stacks: n_stacks rows of the stack table.
struct StackTable {
    const i64* entries;  // [n_stacks * CROP_STACK_FIELDS]
    i64 n_stacks;        // >= 1
};

// The rows of a PatchBatch; every array is C-contiguous int64.
struct CropRows {
    const i64* data_idx;    // [n_rows]
    const i64* sample_idx;  // [n_rows]
    const i64* coords;      // [n_rows * ndim], (z,) y, x per row
    int ndim;               // 2 or 3
    i64 n_rows;
};

// The output's shape per row: C channels of a PZ x PY x PX patch.
struct PatchShape {
    i64 n_channels;
    i64 size[3];  // PZ (1 in 2D), PY, PX
};

// Where one thread sits in a 2D launch (blockIdx, gridDim, threadIdx, blockDim).
struct ThreadPlace {
    i64 block_x, block_y;
    i64 grid_x, grid_y;
    i64 thread_x, thread_y;
    i64 dim_x, dim_y;
};

// Where one row's patch is read, clamped (see "Safety" above), with its stack's
// sizes and strides copied into registers once per row rather than read from
// the table once per line.
struct RowSource {
    i64 address;        // the stack's address
    i64 sample_offset;  // sample * (sample stride), in elements
    i64 corner[3];      // z0 (0 in 2D), y0, x0
    i64 last[4];        // largest index along C, Z, Y, X
    i64 stride[4];      // element strides along C, Z, Y, X
};

GP_HD i64 clamp_index(i64 value, i64 low, i64 high) {
    return value < low ? low : (value > high ? high : value);
}

// The corner of a row as (z, y, x), with z = 0 for a 2D batch.
GP_HD void row_corner(const CropRows& rows, i64 row, i64 corner[3]) {
    const i64* values = rows.coords + row * rows.ndim;
    corner[0] = rows.ndim == 3 ? values[0] : 0;
    corner[1] = values[rows.ndim - 2];
    corner[2] = values[rows.ndim - 1];
}

// Whether a row names a patch that lies inside its stack: 0 <= data_idx <
// n_stacks, 0 <= sample_idx < S and 0 <= corner <= D - P on every axis. The
// rule crop.py applies on the host; the check kernel applies it on the device.
GP_HD bool row_in_range(const StackTable& stacks, const CropRows& rows, const PatchShape& shape,
                        i64 row) {
    const i64 data_idx = rows.data_idx[row];
    if (data_idx < 0 || data_idx >= stacks.n_stacks) return false;
    const i64* stack = stacks.entries + data_idx * CROP_STACK_FIELDS;
    const i64 sample_idx = rows.sample_idx[row];
    if (sample_idx < 0 || sample_idx >= stack[CROP_STACK_SHAPE]) return false;
    i64 corner[3];
    row_corner(rows, row, corner);
    for (int axis = 0; axis < 3; ++axis) {
        const i64 last_corner = stack[CROP_STACK_SHAPE + 2 + axis] - shape.size[axis];
        if (corner[axis] < 0 || corner[axis] > last_corner) return false;
    }
    return true;
}

// The clamped source of a row (see "Safety" above).
GP_HD RowSource row_source(const StackTable& stacks, const CropRows& rows, const PatchShape& shape,
                           i64 row) {
    RowSource source;
    const i64 data_idx = clamp_index(rows.data_idx[row], 0, stacks.n_stacks - 1);
    const i64* stack = stacks.entries + data_idx * CROP_STACK_FIELDS;
    const i64* size = stack + CROP_STACK_SHAPE;
    const i64* stride = stack + CROP_STACK_STRIDE;
    source.address = stack[CROP_STACK_ADDRESS];
    source.sample_offset = clamp_index(rows.sample_idx[row], 0, size[0] - 1) * stride[0];
    i64 corner[3];
    row_corner(rows, row, corner);
    for (int axis = 0; axis < 3; ++axis) {
        const i64 last_corner = size[2 + axis] - shape.size[axis];
        source.corner[axis] = clamp_index(corner[axis], 0, last_corner > 0 ? last_corner : 0);
    }
    for (int axis = 0; axis < 4; ++axis) {
        source.last[axis] = size[1 + axis] - 1;
        source.stride[axis] = stride[1 + axis];
    }
    return source;
}

// Element offset, from the stack's address, of (sample, channel, z0 + z, y0 + y, x0);
// every index clamped into the stack.
GP_HD i64 source_line_offset(const RowSource& source, i64 channel, i64 z, i64 y) {
    const i64 c = clamp_index(channel, 0, source.last[0]);
    const i64 z_index = clamp_index(source.corner[0] + z, 0, source.last[1]);
    const i64 y_index = clamp_index(source.corner[1] + y, 0, source.last[2]);
    return source.sample_offset + c * source.stride[0] + z_index * source.stride[1] +
           y_index * source.stride[2];
}

// Element offset of column x0 + x within a line (clamped into the stack).
GP_HD i64 source_column_offset(const RowSource& source, i64 x) {
    return clamp_index(source.corner[2] + x, 0, source.last[3]) * source.stride[3];
}

// The lines (c, z, y) of one patch, advanced together: line = (c * PZ + z) * PY + y.
struct LinePosition {
    i64 channel, z, y;
};

GP_HD LinePosition line_position(const PatchShape& shape, i64 line) {
    LinePosition position;
    position.y = line % shape.size[1];
    const i64 plane = line / shape.size[1];
    position.z = plane % shape.size[0];
    position.channel = plane / shape.size[0];
    return position;
}

// Move a line position `step` lines on, without a division (a thread steps by
// blockDim.y, usually less than PY: the loop runs once or not at all).
GP_HD void advance_line(const PatchShape& shape, i64 step, LinePosition& position) {
    position.y += step;
    while (position.y >= shape.size[1]) {
        position.y -= shape.size[1];
        if (++position.z == shape.size[0]) {
            position.z = 0;
            ++position.channel;
        }
    }
}

// Everything one launch of the crop kernel reads and writes. T is an unsigned
// integer of the element size: the kernel copies bits, never values, so one
// instantiation per size serves every dtype of that size exactly (a float copy
// could quiet a signalling NaN).
template <typename T>
struct CropJob {
    StackTable stacks;
    CropRows rows;
    PatchShape shape;
    T* out;  // [n_rows * n_channels * PZ * PY * PX], C-contiguous
};

// The work of one thread of the crop kernel (see "Work split" above).
template <typename T>
GP_HD void crop_thread(const CropJob<T>& job, const ThreadPlace& place) {
    const PatchShape& shape = job.shape;
    const i64 width = shape.size[2];
    const i64 lines_per_patch = shape.n_channels * shape.size[0] * shape.size[1];
    const i64 lines_per_chunk = place.dim_y * CROP_LINES_PER_THREAD;
    for (i64 row = place.block_x; row < job.rows.n_rows; row += place.grid_x) {
        const RowSource source = row_source(job.stacks, job.rows, shape, row);
        const T* stack = reinterpret_cast<const T*>(static_cast<unsigned long long>(source.address));
        for (i64 chunk_start = place.block_y * lines_per_chunk; chunk_start < lines_per_patch;
             chunk_start += place.grid_y * lines_per_chunk) {
            const i64 chunk_end = chunk_start + lines_per_chunk < lines_per_patch
                                      ? chunk_start + lines_per_chunk
                                      : lines_per_patch;
            const i64 first_line = chunk_start + place.thread_y;
            // Lines first_line + k * dim_y, k < count, are this thread's. A
            // thread past the chunk's last line (first_line < chunk_start +
            // dim_y) gets count == 0 and neither loads nor stores.
            const i64 count = (chunk_end - first_line + place.dim_y - 1) / place.dim_y;
            const LinePosition first = line_position(shape, first_line);
            T* out = job.out + (row * lines_per_patch + first_line) * width;
            for (i64 x = place.thread_x; x < width; x += place.dim_x) {
                const i64 column = source_column_offset(source, x);
                T values[CROP_LINES_PER_THREAD];
                LinePosition position = first;
                for (int k = 0; k < CROP_LINES_PER_THREAD; ++k) {
                    if (k < count) {
                        values[k] = stack[source_line_offset(source, position.channel, position.z,
                                                             position.y) +
                                          column];
                        advance_line(shape, place.dim_y, position);
                    }
                }
                for (int k = 0; k < CROP_LINES_PER_THREAD; ++k) {
                    if (k < count) out[k * place.dim_y * width + x] = values[k];
                }
            }
        }
    }
}

}  // namespace gp
