"""Samples smaller than the patch: no patches, a warning that names them, nothing else changes.

CAREamics' ``StratifiedPatching`` builds a sampler when an image is smaller
than the patch along some axis (that sample gets no patches). Ours matches it:
the sample is kept with zero patches, a :class:`SmallSampleWarning` names
``(data_idx, sample_idx, shape)``, and every call works, on the small sample
and on the others, whose patches are exactly those of a sampler without it.
Two kinds of small along an axis: ``D < P - 1`` (no grid cell at all) and
``D == P - 1`` (one cell that holds no valid corner).
"""

from __future__ import annotations

import json
import pickle
import re
import warnings

import numpy as np
import pytest
from conftest import sample_rows

from gpu_patching import (
    PatchBatch,
    PatchLoader,
    SmallSampleWarning,
    StratifiedPatching,
    extract_patches,
    filter_background,
    region_statistics,
    validation_split,
)
from gpu_patching.backends.numpy_backend import NumpyBackend

# Stack 0: one sample shorter than the patch along Y (no cell along Y);
# stack 1: two normal samples; stack 2: one pixel short along X (one empty cell).
SHAPES = [(1, 1, 30, 100), (2, 1, 150, 130), (1, 2, 90, 63)]
PATCH = (64, 64)
BIG_ONLY = [(2, 1, 150, 130)]


def build(shapes=SHAPES, patch=PATCH, seed=5) -> StratifiedPatching:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SmallSampleWarning)
        return StratifiedPatching(shapes, patch, seed=seed, backend="numpy")


def test_a_small_sample_is_named_in_a_warning():
    with pytest.warns(SmallSampleWarning) as caught:
        StratifiedPatching(SHAPES, PATCH, seed=0, backend="numpy")
    messages = [str(w.message) for w in caught]
    assert len(messages) == 2, messages  # one per small stack
    assert "data_idx 0, sample_idx 0 (shape (1, 1, 30, 100))" in messages[0]
    assert "along Y" in messages[0] and "(64, 64)" in messages[0]
    assert "data_idx 2, sample_idx 0 (shape (1, 2, 90, 63))" in messages[1]
    assert "along X" in messages[1]


def test_every_small_sample_of_a_stack_is_named():
    with pytest.warns(SmallSampleWarning, match=re.escape("data_idx 0, sample_idx 0..2")):
        StratifiedPatching([(3, 1, 5, 40, 40)], (8, 8, 8), seed=0, backend="numpy")


def test_no_warning_when_every_sample_holds_a_patch():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        StratifiedPatching([(1, 1, 64, 64), (1, 1, 64, 200)], PATCH, seed=0, backend="numpy")


def test_a_small_sample_has_no_patches_and_the_others_are_unchanged():
    sampler = build()
    alone = build(BIG_ONLY)
    assert sampler.n_patches_per_sample.tolist() == [0, *alone.n_patches_per_sample.tolist(), 0]
    assert sampler.n_patches == alone.n_patches
    assert sampler.get_patch_indices(0) == [] and sampler.get_patch_indices(2) == []
    assert sampler.get_patch_indices(1) == list(range(alone.n_patches))


def test_grids_of_small_samples_are_empty_or_hold_no_corner():
    sampler = build()
    coords = sampler.get_all_grid_coords()
    assert coords[(0, 0)] == []  # (30 + 1) // 64 = 0 cells along Y
    assert coords[(2, 0)] == [(0, 0)]  # (63 + 1) // 64 = 1 cell along X, no corner in it
    assert [view.grid_shape for view in sampler.image_patching[0]] == [(0, 1)]
    assert [view.grid_shape for view in sampler.image_patching[2]] == [(1, 1)]
    assert sampler.get_included_grid_coords()[(0, 0)] == []


@pytest.mark.parametrize("shuffle", [False, True])
def test_epochs_never_draw_a_small_sample_and_equal_those_without_it(shuffle):
    sampler, alone = build(), build(BIG_ONLY)
    for epoch in (0, 7):
        ours = sampler.sample_epoch(epoch, shuffle=shuffle)
        theirs = alone.sample_epoch(epoch, shuffle=shuffle)
        assert set(ours.data_idx.tolist()) == {1}
        np.testing.assert_array_equal(ours.coords, theirs.coords)
        np.testing.assert_array_equal(ours.sample_idx, theirs.sample_idx)
        np.testing.assert_array_equal(ours.indices, theirs.indices)
    shard = sampler.sample_epoch(3, shuffle=True, rank=1, world_size=3)
    assert len(shard) == -(-sampler.n_patches // 3)


def test_get_patch_spec_serves_every_index_and_refuses_the_end():
    sampler = build()
    specs = [sampler.get_patch_spec(i) for i in range(sampler.n_patches)]
    assert {spec["data_idx"] for spec in specs} == {1}
    epoch = sampler.sample_epoch(0)
    assert [spec["coords"] for spec in specs] == [tuple(row) for row in epoch.coords.tolist()]
    with pytest.raises(IndexError, match=str(sampler.n_patches)):
        sampler.get_patch_spec(sampler.n_patches)


def test_exclusions_and_probabilities_on_a_small_sample():
    sampler = build()
    before = sampler.sample_epoch(2)
    sampler.exclude_patches(0, 0, [])
    sampler.set_region_probs(0, 0, {})
    sampler.exclude_patches(0, 0, np.zeros((0, 1), dtype=bool))  # its dense grid
    sampler.set_region_probs(0, 0, np.zeros((0, 1)))
    sampler.exclude_patches(2, 0, [(0, 0)])  # the one empty cell
    sampler.set_region_probs(2, 0, {(0, 0): 0.5})
    with pytest.raises(ValueError, match=re.escape("(0, 0)")):
        sampler.exclude_patches(0, 0, [(0, 0)])  # there is no cell
    with pytest.raises(ValueError, match=re.escape("(0, 1)")):
        sampler.set_region_probs(0, 0, np.ones((1, 1)))
    assert sampler.get_excluded_cells(2, 0).tolist() == [[True]]
    assert sampler.get_region_probs(2, 0).tolist() == [[0.5]]
    assert sampler.n_patches_per_sample[[0, 3]].tolist() == [0, 0]
    after = sampler.sample_epoch(2)
    np.testing.assert_array_equal(after.coords, before.coords)


def test_state_round_trip_and_pickle_keep_small_samples_without_warning_again():
    sampler = build()
    sampler.exclude_patches(1, 1, [(0, 0)])
    sampler.set_region_probs(2, 0, {(0, 0): 2.0})
    for i in range(5):
        sampler.get_patch_spec(i)
    state = json.loads(json.dumps(sampler.state_dict()))
    fresh = build()
    fresh.load_state_dict(state)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a worker's copy does not warn again
        copy = pickle.loads(pickle.dumps(sampler))
    for other in (fresh, copy):
        assert other.n_patches_per_sample.tolist() == sampler.n_patches_per_sample.tolist()
        assert other.get_region_probs(2, 0).tolist() == [[2.0]]
        np.testing.assert_array_equal(other.sample_epoch(4).coords, sampler.sample_epoch(4).coords)
    assert fresh.get_patch_spec(0) == sampler.get_patch_spec(0)  # the counters came along


def test_only_small_samples_give_an_empty_sampler_that_still_answers():
    sampler = build([(2, 1, 10, 10), (1, 1, 3, 60, 60)][:1], (16, 16))
    assert sampler.n_patches == 0 and sampler.n_patches_per_sample.tolist() == [0, 0]
    assert len(sampler.sample_epoch(0, shuffle=True)) == 0
    assert sampler.epoch_indices(1, shuffle=True).tolist() == []
    assert sampler.cumulative_image_patches.tolist() == [0]
    with pytest.raises(IndexError):
        sampler.get_patch_spec(0)
    sampler.set_epoch(3)
    sampler.load_state_dict(sampler.state_dict())


def test_a_3d_stack_thinner_than_the_patch_has_no_patches():
    sampler = build([(2, 1, 3, 40, 40), (1, 1, 16, 40, 40)], (8, 8, 8))
    assert sampler.n_patches_per_sample[:2].tolist() == [0, 0]
    assert sampler.n_patches_per_sample[2] > 0
    assert set(sampler.sample_epoch(1).data_idx.tolist()) == {1}


def stacks_of(shapes=SHAPES) -> list[np.ndarray]:
    """Stacks of the shapes whose pixels all differ (a misplaced pixel shows)."""
    rng = np.random.default_rng(7)
    return [rng.random(shape, dtype=np.float32) for shape in shapes]


def sliced(stacks, batch) -> np.ndarray:
    """The batch's patches by plain slicing."""
    patches = []
    for d, s, corner in zip(batch.data_idx, batch.sample_idx, batch.coords, strict=True):
        window = tuple(slice(c, c + p) for c, p in zip(corner, batch.patch_size, strict=True))
        patches.append(stacks[d][(s, slice(None), *window)])
    return np.stack(patches)


def test_an_epoch_is_cropped_from_stacks_beside_ones_smaller_than_the_patch():
    sampler, stacks = build(), stacks_of()
    stacks[2] = stacks[2][:, :1]  # one channel, as the others
    epoch = sampler.sample_epoch(3)
    np.testing.assert_array_equal(extract_patches(stacks, epoch), sliced(stacks, epoch))


def test_a_row_that_names_a_stack_smaller_than_the_patch_is_refused():
    # The sampler never draws one; a hand-made row that does would leave the image.
    stacks = [np.zeros((1, 1, 30, 100), dtype=np.float32), np.zeros((1, 1, 64, 64), np.float32)]
    zero = np.zeros(1, np.int64)
    batch = PatchBatch(zero, zero, np.zeros((1, 2), np.int64), zero, PATCH)
    with pytest.raises(ValueError, match=r"stacks\[0\] .* is smaller than the \(64, 64\) patch"):
        extract_patches(stacks, batch)


def test_the_loader_takes_stacks_smaller_than_the_patch_beside_normal_ones():
    shapes = [(1, 1, 30, 100), (2, 1, 150, 130)]
    sampler, stacks = build(shapes), stacks_of(shapes)
    loader = PatchLoader(stacks, sampler, batch_size=5, shuffle=True)
    loader.set_epoch(2)
    pairs = list(loader)
    assert sum(len(batch) for _, batch in pairs) == sampler.n_patches
    for patches, batch in pairs:
        assert set(batch.data_idx.tolist()) == {1}
        np.testing.assert_array_equal(patches, sliced(stacks, batch))


def test_filter_background_takes_stacks_smaller_than_the_patch_beside_normal_ones():
    shapes = [(1, 1, 30, 100), (2, 1, 150, 130), (1, 1, 90, 63)]
    sampler, stacks = build(shapes), stacks_of(shapes)
    alone = build([shapes[1]])
    stacks[1][0, 0, :128] = 0  # a dark band: background in sample 0
    result = filter_background(sampler, stacks, threshold=0.25, filtered_prob=0.1)
    expected = filter_background(alone, [stacks[1]], threshold=0.25, filtered_prob=0.1)
    assert result.filtered[(0, 0)] == 0 and result.scored[(0, 0)] == 0  # no cell at all
    assert result.filtered[(1, 0)] == expected.filtered[(0, 0)] > 0
    assert sampler.n_patches == alone.n_patches
    assert sampler.n_patches_per_sample.tolist() == [0, *alone.n_patches_per_sample.tolist(), 0]


def test_region_statistics_of_a_stack_smaller_than_the_patch_has_the_grid_shape():
    thin, short = stacks_of([(2, 1, 30, 100), (1, 1, 90, 63)])
    assert region_statistics(thin, PATCH)["mean"].shape == (2, 0, 1)
    # (63 + 1) // 64 = 1 cell along X: its region is the whole image.
    mean = region_statistics(short, PATCH, stats=("mean",))["mean"]
    np.testing.assert_allclose(mean, [[[short.mean(dtype=np.float64)]]], rtol=1e-12)


def test_validation_split_never_picks_a_cell_of_a_sample_smaller_than_the_patch():
    sampler = build()
    validation = validation_split(sampler, 4, seed=3)
    assert len(validation) == 4
    assert {spec["data_idx"] for spec in validation} == {1}
    with pytest.raises(ValueError, match="available"):
        validation_split(build(), build().n_patches + 1)


def test_host_compiled_cuda_kernel_equals_numpy_with_zero_region_samples(host_kernels):
    from host_launch import HostBackend

    sampler = build()
    sampler.exclude_patches(1, 0, [(1, 1)])
    tables = sampler._tables
    assert int(tables.n_cells[0]) == 0  # a sample with no region row at all
    n = sampler.n_patches
    for draw in (0, 2**32 - 1):
        expected = NumpyBackend().draw(tables, range(n), draw, sampler.seed)
        actual = HostBackend(host_kernels).draw(tables, range(n), draw, sampler.seed)
        for want, got in zip(expected, actual, strict=True):
            np.testing.assert_array_equal(got, want)


def test_reference_matches_on_small_samples(reference):
    ours = build()
    theirs = reference(SHAPES, PATCH, seed=5)
    assert ours.n_patches == theirs.n_patches
    assert [[view.n_patches for view in stack] for stack in ours.image_patching] == [
        [sample.n_patches for sample in stack] for stack in theirs.image_patching
    ]
    assert [[view.grid_shape for view in stack] for stack in ours.image_patching] == [
        [tuple(sample.grid_shape) for sample in stack] for stack in theirs.image_patching
    ]
    assert ours.get_all_grid_coords() == {
        key: list(value) for key, value in theirs.get_all_grid_coords().items()
    }
    for data_idx in range(len(SHAPES)):
        assert ours.get_patch_indices(data_idx) == list(theirs.get_patch_indices(data_idx))
    rows = sample_rows(ours.sample_epoch(0), 1, 0)
    assert len(rows) == ours.n_patches_per_sample[1]
