"""The shipped epoch kernel on tables it should refuse, and on edge cases parity rarely hits.

The kernel's header promises a failed row (-1 in every column) for any row the
tables make undrawable, and a corner inside the spatial shape it is given for
every row it draws. Tables built by the library never test those promises, so
these tests edit real tables (a shrunk spatial shape, one or two fields
changed) and launch ``sample_epoch`` itself on the host
(``tests/host_launch.py``). Valid-input edge cases that random tables
almost never reach complete it: a one-patch epoch sharded over several ranks,
tables where every mass point is its own corner (so an off-by-one stratum
bound moves a corner), and a sample whose whole mass is one point. Each
test kills a mutant of the shipped kernels that the parity tests let through.
"""

from __future__ import annotations

import types

import numpy as np
import pytest
from host_launch import HostKernels

from gpu_patching import StratifiedPatching
from gpu_patching.backends.cuda_backend import _launch_args, pack_sample_table, split_sample_table
from gpu_patching.cuda import launch_grid
from gpu_patching.kernels.sample_epoch import SAMPLE_EPOCH
from gpu_patching.permutation import EpochOrder

SENTINEL = -(2**62)


def _draw_on_arrays(host_kernels: HostKernels, tables, arrays, n: int, ndim: int, draw: int = 5):
    """Every index of [0, n) drawn by the shipped kernel on (possibly edited) table arrays."""
    outputs = (
        np.full(n, SENTINEL, dtype=np.int64),
        np.full(n, SENTINEL, dtype=np.int64),
        np.full((n, ndim), SENTINEL, dtype=np.int64),
        np.full(n, SENTINEL, dtype=np.int64),
    )
    args = _launch_args(tables, arrays, EpochOrder.contiguous(0, n), draw, 99, outputs)
    blocks, threads = launch_grid(n)
    host_kernels.function(SAMPLE_EPOCH)((blocks,), (threads,), args)
    for column in outputs:
        assert (column != SENTINEL).all()
    return outputs


@pytest.mark.parametrize(
    ("shape", "patch", "shrunk"),
    [
        ((10, 10), (4, 4), (5, 5)),
        ((10, 10), (4, 4), (5, 10)),
        ((9, 13), (3, 4), (4, 6)),
        ((10, 10, 10), (4, 4, 4), (5, 5, 5)),
        ((10, 9, 10), (4, 3, 4), (10, 4, 5)),
    ],
)
def test_host_kernel_draws_no_corner_past_the_last_corner_of_the_spatial_shape_it_is_given(
    host_kernels: HostKernels,
    shape: tuple[int, ...],
    patch: tuple[int, ...],
    shrunk: tuple[int, ...],
) -> None:
    """Tables whose spatial shape was shrunk after the grid was built.

    Cells then start past the last corner ``D - P`` of the shape the kernel
    reads, on one or more axes. Whatever the tables hold, a row the kernel does
    not fail must carry a corner in ``[0, D - P]`` of that shape on every axis
    (a drawn corner past it names a patch that leaves the stack). Kills the
    removal of the ``rest < 0`` clamp in locate_corner (two negative part sizes
    multiply into a positive sub-box size).
    """
    sampler = StratifiedPatching([(1, 1, *shape)], patch, seed=3, backend="numpy")
    tables = sampler._tables
    ndim = tables.ndim
    arrays = {
        name: view.copy()
        for name, view in split_sample_table(
            pack_sample_table(tables), tables.n_samples, ndim
        ).items()
    }
    arrays["spatial_shape"][:] = shrunk
    view = types.SimpleNamespace(
        n_samples=tables.n_samples,
        ndim=ndim,
        mass_prefix=tables.mass_prefix,
        weight=tables.weight,
        subbox_mask=tables.subbox_mask,
    )
    n = tables.total_patches
    last = np.asarray(shrunk) - np.asarray(patch)
    n_drawn = n_failed = 0
    for draw in range(16):
        _, _, coords, patch_index = _draw_on_arrays(host_kernels, view, arrays, n, ndim, draw)
        failed = patch_index == -1
        assert (coords[failed] == -1).all()
        drawn = coords[~failed]
        bad = ((drawn < 0) | (drawn > last)).any(axis=1)
        assert not bad.any(), (draw, drawn[bad])
        n_drawn += int((~failed).sum())
        n_failed += int(failed.sum())
    # Not vacuous: some rows are drawn (inside the shrunk shape), some fail.
    assert n_drawn > 0 and n_failed > 0, (n_drawn, n_failed)


@pytest.mark.parametrize("ndim", [2, 3])
def test_crop_with_more_channels_than_the_stack_reads_only_its_last_channel(
    host_kernels: HostKernels, ndim: int
) -> None:
    """crop_launch_args accepts any n_channels >= 1; the kernel clamps the channel.

    The stack (2 samples, 2 channels) sits between two -1 sentinel regions of
    one buffer; the launch asks for 5 channels. Every element of out must come
    from inside the stack (>= 0), and channels 2..4 must repeat channel 1 (the
    clamp of crop.cuh's "a channel into [0, size - 1]"). Kills the removal of
    that clamp in source_line_offset, which no other test reaches because every
    library launch passes the stacks' own channel count.
    """
    from test_crop_kernels_host import _rows, _table

    from gpu_patching import PatchBatch
    from gpu_patching.crop import crop_launch_args
    from gpu_patching.kernels.crop_patches import crop_kernel

    patch = (2, 3, 4)[-ndim:]
    shape = (2, 2) + (3, 5, 6)[-ndim:]
    size = int(np.prod(shape))
    buffer = np.full(3 * size, -1, dtype=np.int32)
    buffer[size : 2 * size] = np.arange(size, dtype=np.int32)
    stack = buffer[size : 2 * size].reshape(shape)
    coords = np.array([[0] * ndim, [1] * ndim, [1] * ndim], dtype=np.int64)
    batch = PatchBatch(np.zeros(3, np.int64), np.array([0, 1, 1]), coords, np.arange(3), patch)
    n_channels = 5
    out = np.full((3, n_channels, *patch), -7, dtype=np.int32)
    args = crop_launch_args(_table([stack]), _rows(batch), len(batch), n_channels, patch, out)
    host_kernels.function(crop_kernel(4))((2, 2), (3, 2), args)
    assert (out >= 0).all(), "a read left its stack"
    for row in range(3):
        s = int(batch.sample_idx[row])
        window = tuple(slice(c, c + p) for c, p in zip(coords[row], patch, strict=True))
        for channel in range(n_channels):
            expected = stack[(s, min(channel, shape[1] - 1), *window)]
            np.testing.assert_array_equal(out[row, channel], expected)


def _edited_tables(tables):
    """Writable copies of every table array the kernel reads, by parameter name."""
    arrays = {
        name: view.copy()
        for name, view in split_sample_table(
            pack_sample_table(tables), tables.n_samples, tables.ndim
        ).items()
    }
    extra = {
        "mass_prefix": tables.mass_prefix.copy(),
        "weight": tables.weight.copy(),
        "subbox_mask": tables.subbox_mask.copy(),
    }
    return arrays, extra


def _draw_edited(host_kernels: HostKernels, tables, arrays, extra, indices, draw: int = 5):
    """The shipped kernel on edited arrays, one row per index (no host-side checks)."""
    indices = np.ascontiguousarray(indices, dtype=np.int64)
    n, ndim = indices.size, tables.ndim
    view = types.SimpleNamespace(n_samples=tables.n_samples, ndim=ndim, **extra)
    outputs = (
        np.full(n, SENTINEL, dtype=np.int64),
        np.full(n, SENTINEL, dtype=np.int64),
        np.full((n, ndim), SENTINEL, dtype=np.int64),
        np.full(n, SENTINEL, dtype=np.int64),
    )
    args = _launch_args(view, arrays, indices, draw, 99, outputs)
    host_kernels.function(SAMPLE_EPOCH)((3,), (5,), args)
    for column in outputs:
        assert (column != SENTINEL).all()
    return outputs


def _two_samples():
    return StratifiedPatching([(2, 1, 20, 24)], (4, 4), seed=7, backend="numpy")._tables


def _inflate_last_n_patches(tables, arrays, extra):
    # n_patches of the last sample above its patch offsets: index patch_offset[S]
    # (one past the epoch) must still fail, not be drawn as stratum n.
    arrays["n_patches"][-1] += 3
    return [int(arrays["patch_offset"][-1]), int(arrays["patch_offset"][-1]) + 1]


def _shrink_first_n_patches(tables, arrays, extra):
    # n_patches of sample 0 below its patch offsets, and its last region's
    # weight so large that any point past the sample's mass still has rank 0:
    # strata >= n_patches must fail, not be placed past the mass.
    n0 = int(arrays["n_patches"][0])
    arrays["n_patches"][0] = n0 - 3
    last_region = int(arrays["region_offset"][1]) - 1
    extra["weight"][last_region] = 2**40
    return list(range(n0 - 3, n0))


def _zero_mass_of_last_sample(tables, arrays, extra):
    # The last sample keeps its patches but has no mass: every row fails.
    arrays["mass_offset"][-1] = arrays["mass_offset"][-2]
    return list(range(int(arrays["patch_offset"][-2]), int(arrays["patch_offset"][-1])))


def _first_patch_offset_above_the_index(tables, arrays, extra):
    # patch_offset[0] > 0 (and so above small indices): those indices are
    # outside [patch_offset[0], patch_offset[S]) and must fail, even though the
    # search over the (now unsorted) offsets would find sample 1 for them.
    arrays["patch_offset"][0] = 5
    arrays["patch_offset"][1] = 0
    return [0, 1, 2, 3, 4]


def _negative_first_patch_offset(tables, arrays, extra):
    # patch_offset[0] < 0: a negative index must still fail.
    arrays["patch_offset"][0] = -4
    return [-1, -2, -3, -4]


def _zero_patch_size(tables, arrays, extra):
    # A patch size of 0: every row fails (no corner of a 0-wide patch).
    arrays["patch_size"][-1] = 0
    return list(range(int(arrays["patch_offset"][-1])))


def _wrapped_negative_rank(tables, arrays, extra):
    # mass_prefix of sample 0's first region near -2**63: the point minus it
    # wraps to a negative rank (signed overflow: what the GPU and gcc do in
    # practice). locate_corner's comment promises such a rank is refused (by
    # `box_rank < 0`) before it picks a sub-box.
    extra["mass_prefix"][0] = -(2**63) + 10
    second = int(extra["mass_prefix"][1])
    n0 = int(arrays["n_patches"][0])
    mass0 = int(arrays["mass_offset"][1])
    # The strata of sample 0 whose points fall in its first region, past 10.
    return [k for k in range(n0) if 10 + mass0 * (k + 1) // n0 <= second]


def _subbox_bits_past_the_last_sub_box(tables, arrays, extra):
    # 2D has 4 sub-boxes (mask bits 0-3); a mask of only bits 4-7 selects none,
    # so every row of the last sample fails rather than being placed in a
    # fifth, nonexistent sub-box.
    first, last = int(arrays["region_offset"][-2]), int(arrays["region_offset"][-1])
    extra["subbox_mask"][first:last] = 0xF0
    return list(range(int(arrays["patch_offset"][-2]), int(arrays["patch_offset"][-1])))


@pytest.mark.parametrize(
    "edit",
    [
        _inflate_last_n_patches,
        _shrink_first_n_patches,
        _zero_mass_of_last_sample,
        _first_patch_offset_above_the_index,
        _negative_first_patch_offset,
        _zero_patch_size,
        _wrapped_negative_rank,
        _subbox_bits_past_the_last_sub_box,
    ],
)
def test_host_kernel_fails_the_rows_an_inconsistent_table_makes_undrawable(
    host_kernels: HostKernels, edit
) -> None:
    """stratified.cuh: draw_patch "returns false ... when the index is outside
    [0, patch_offset[S]) or the tables are inconsistent". One field edited at a
    time (two for the n_patches case), and the rows that edit makes undrawable
    must be -1 in every column, over several draw numbers."""
    tables = _two_samples()
    for draw in range(8):
        arrays, extra = _edited_tables(tables)
        indices = edit(tables, arrays, extra)
        data_idx, sample_idx, coords, patch_index = _draw_edited(
            host_kernels, tables, arrays, extra, indices, draw
        )
        assert (patch_index == -1).all(), (draw, indices, patch_index, coords)
        assert (data_idx == -1).all() and (sample_idx == -1).all() and (coords == -1).all()


@pytest.mark.parametrize("shuffle", [False, True])
def test_a_one_patch_epoch_sharded_over_several_ranks_draws_patch_zero_on_every_rank(
    host_kernels: HostKernels, shuffle: bool
) -> None:
    """N = 1: every rank's one row wraps round to position 0 (``position % 1``).

    Rank r's row takes position r, reduced modulo n_positions = 1. Kills
    ``if (order.n_positions > 0)`` -> ``> 1`` in permutation.cuh's row_index,
    which no test reaches because every sharded test epoch has N >= 2.
    """
    from host_launch import HostBackend

    from gpu_patching.backends.numpy_backend import NumpyBackend

    sampler = StratifiedPatching([(1, 1, 4, 4)], (4, 4), seed=5, backend="numpy")
    tables = sampler._tables
    assert tables.total_patches == 1
    for world_size in (2, 3, 5):
        for rank in range(world_size):
            order = EpochOrder.shard(1, shuffle=shuffle, rank=rank, world_size=world_size)
            expected = NumpyBackend().draw(tables, order, 3, sampler.seed)
            actual = HostBackend(host_kernels).draw(tables, order, 3, sampler.seed)
            for want, got in zip(expected, actual, strict=True):
                np.testing.assert_array_equal(got, want)
            np.testing.assert_array_equal(actual[3], [0])


@pytest.mark.parametrize("shape", [(1, 1, 40, 36), (2, 1, 13, 22, 17)])
def test_host_kernel_equals_numpy_when_every_mass_point_is_its_own_corner(
    host_kernels: HostKernels, shape: tuple[int, ...]
) -> None:
    """Weight 1 on every cell: a stratum bound one mass point off moves a corner.

    With the usual weights (~2**20 points per corner) a point one off almost
    never changes the corner, so parity on random tables cannot see an
    off-by-one in stratum_point's bounds (e.g. upper computed with
    ``stratum * remainder`` instead of ``(stratum + 1) * remainder``).
    """
    from host_launch import HostBackend

    from gpu_patching import grid
    from gpu_patching.backends.numpy_backend import NumpyBackend

    patch = (4,) * (len(shape) - 2)
    sampler = StratifiedPatching([shape], patch, seed=21, backend="numpy")
    tables = sampler._tables
    smallest = 1.0 / grid.PROB_ONE  # quantises to weight 1
    for sample_idx in range(shape[0]):
        cells = tables.sample_grid(tables.sample_id(0, sample_idx))
        sampler.set_region_probs(0, sample_idx, {cell: smallest for cell in np.ndindex(*cells)})
    tables = sampler._tables
    assert (tables.weight == 1).all(), np.unique(tables.weight)
    indices = np.arange(tables.total_patches)
    for draw in range(4):
        expected = NumpyBackend().draw(tables, indices, draw, sampler.seed)
        actual = HostBackend(host_kernels).draw(tables, indices, draw, sampler.seed)
        for want, got in zip(expected, actual, strict=True):
            np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize(("shape", "patch"), [((1, 1, 6, 5), (6, 5)), ((1, 1, 4, 3, 5), (4, 3, 5))])
def test_host_kernel_equals_numpy_on_a_sample_whose_whole_mass_is_one_point(
    host_kernels: HostKernels, shape: tuple[int, ...], patch: tuple[int, ...]
) -> None:
    """The image is one patch (one corner) of the smallest weight: its mass is 1,
    the smallest a drawable sample has, and every row draws that corner."""
    from host_launch import HostBackend

    from gpu_patching import grid
    from gpu_patching.backends.numpy_backend import NumpyBackend

    sampler = StratifiedPatching([shape], patch, seed=5, backend="numpy")
    sampler.set_region_probs(0, 0, {(0,) * len(patch): 1.0 / grid.PROB_ONE})
    tables = sampler._tables
    assert tables.mass_offset.tolist() == [0, 1]
    indices = np.arange(tables.total_patches)
    expected = NumpyBackend().draw(tables, indices, 3, sampler.seed)
    actual = HostBackend(host_kernels).draw(tables, indices, 3, sampler.seed)
    assert (expected[3] == indices).all()
    for want, got in zip(expected, actual, strict=True):
        np.testing.assert_array_equal(got, want)
