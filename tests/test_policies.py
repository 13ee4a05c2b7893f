"""Policies that change a sampler (``gpu_patching.policies``) and the per-sample counts they read.

Background filtering is checked against the brute-force statistics of
``test_stats``; validation splits against the sampler's own rules (excluded
cells are never touched).
"""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np
import pytest
from conftest import grid_shape, numpy_sampler, patches_overlap_cells, sample_rows
from test_stats import brute_force, random_stack

import gpu_patching.policies as policies
from gpu_patching import FilterResult, StratifiedPatching, filter_background, validation_split
from gpu_patching.testing import usable_cupy

SHAPES = [(3, 1, 97, 64), (2, 2, 40, 50)]
PATCH = (8, 6)


def counted_from_an_epoch(sampler: StratifiedPatching) -> np.ndarray:
    """Patches per sample counted from a drawn epoch, samples in (data_idx, sample_idx) order."""
    batch = sampler.sample_epoch(0).to_numpy()
    samples = [
        (stack, sample)
        for stack, shape in enumerate(sampler.data_shapes)
        for sample in range(shape[0])
    ]
    pairs = list(zip(batch.data_idx.tolist(), batch.sample_idx.tolist(), strict=True))
    return np.asarray([pairs.count(key) for key in samples], dtype=np.int64)


# -- n_patches_per_sample -------------------------------------------------------


def test_patches_per_sample_equal_the_rows_of_an_epoch_after_every_update() -> None:
    sampler = numpy_sampler(SHAPES, PATCH, seed=3)
    np.testing.assert_array_equal(sampler.n_patches_per_sample, counted_from_an_epoch(sampler))
    sampler.exclude_patches(0, 1, [(1, 1), (2, 3), (11, 9)])
    np.testing.assert_array_equal(sampler.n_patches_per_sample, counted_from_an_epoch(sampler))
    sampler.set_region_probs(1, 1, {(0, 0): 0.0, (2, 2): 3.5})
    np.testing.assert_array_equal(sampler.n_patches_per_sample, counted_from_an_epoch(sampler))
    fresh = numpy_sampler(SHAPES, PATCH, seed=3)
    fresh.load_state_dict(sampler.state_dict())
    np.testing.assert_array_equal(fresh.n_patches_per_sample, sampler.n_patches_per_sample)


def test_patches_per_sample_is_an_int64_entry_per_sample_summing_to_n_patches() -> None:
    sampler = numpy_sampler(SHAPES, PATCH)
    counts = sampler.n_patches_per_sample
    assert counts.dtype == np.int64
    assert counts.shape == (sum(shape[0] for shape in SHAPES),)
    assert int(counts.sum()) == sampler.n_patches


def test_patches_per_sample_cannot_be_written() -> None:
    sampler = numpy_sampler(SHAPES, PATCH)
    counts = sampler.n_patches_per_sample
    with pytest.raises(ValueError, match="read-only"):
        counts[0] = 0
    with pytest.raises(AttributeError):
        sampler.n_patches_per_sample = counts  # type: ignore[misc]
    assert int(sampler.n_patches_per_sample.sum()) == sampler.n_patches


def test_patches_per_sample_counts_zero_for_a_sample_with_every_region_off() -> None:
    sampler = numpy_sampler([(2, 1, 40, 40)], (8, 8))
    sampler.set_region_probs(0, 0, np.zeros((5, 5)))
    assert sampler.n_patches_per_sample.tolist() == [0, sampler.n_patches]
    assert sampler.n_patches > 0


# -- background filtering ------------------------------------------------------


def epochs_equal(first: StratifiedPatching, second: StratifiedPatching, epochs: int = 3) -> bool:
    for epoch in range(epochs):
        a, b = first.sample_epoch(epoch).to_numpy(), second.sample_epoch(epoch).to_numpy()
        if not all(
            np.array_equal(getattr(a, column), getattr(b, column))
            for column in ("data_idx", "sample_idx", "coords")
        ):
            return False
    return first.n_patches == second.n_patches


def test_regions_under_the_threshold_get_the_filtered_probability() -> None:
    shapes = [(2, 1, 60, 52), (1, 2, 40, 40)]
    stacks = [random_stack(shape, np.float32, seed=k) for k, shape in enumerate(shapes)]
    patch = (8, 8)
    sampler = numpy_sampler(shapes, patch, seed=3)
    expected = numpy_sampler(shapes, patch, seed=3)
    # State from before: one excluded cell and one custom probability per sample.
    for sampler_ in (sampler, expected):
        sampler_.exclude_patches(0, 1, [(2, 2)])
        sampler_.set_region_probs(1, 0, {(0, 0): 3.0, (1, 1): 0.5})
    threshold = 100.0
    result = filter_background(sampler, stacks, threshold=threshold, filtered_prob=0.25)

    for data_idx, shape in enumerate(shapes):
        mean = brute_force(stacks[data_idx], patch)["mean"]
        for sample_idx in range(shape[0]):
            probs = np.ones(grid_shape(shape[2:], patch))
            if data_idx == 1:
                probs[0, 0], probs[1, 1] = 3.0, 0.5
            below = mean[sample_idx] < threshold
            if (data_idx, sample_idx) == (0, 1):
                below[2, 2] = False  # excluded cells are left as they are
            probs[below] = 0.25
            expected.set_region_probs(data_idx, sample_idx, probs)
            assert result.filtered[(data_idx, sample_idx)] == int(below.sum())
    assert isinstance(result, FilterResult)
    assert result.n_patches == sampler.n_patches == expected.n_patches
    assert result.n_patches < result.n_patches_before
    n_cells = sum(s[0] * math.prod(grid_shape(s[2:], patch)) for s in shapes)
    assert result.n_scored == n_cells - 1  # all but the excluded cell
    assert epochs_equal(sampler, expected)


def test_regions_filtered_to_probability_zero_are_never_drawn() -> None:
    # Left half bright, right half dark: all-dark regions get probability 0.
    image = np.zeros((1, 1, 64, 64), dtype=np.uint16)
    image[..., :32] = 1000
    sampler = numpy_sampler([image.shape], (8, 8), seed=1)
    filter_background(sampler, image, threshold=1, filtered_prob=0.0)
    corners = np.concatenate([sampler.sample_epoch(e).to_numpy().coords for e in range(20)])
    # The box [8 gx, 8 gx + 16) is all dark (mean < 1) iff gx >= 4, and the corners
    # of the regions gx <= 3 have x < 32.
    assert corners[:, 1].max() < 32


def test_coverage_filters_regions_with_too_little_mask() -> None:
    shape = (2, 1, 48, 40)
    stack = random_stack(shape, seed=13)
    mask = np.random.default_rng(13).random((2, 48, 40)) < 0.5
    sampler = numpy_sampler([shape], (8, 8), seed=2)
    expected = numpy_sampler([shape], (8, 8), seed=2)
    result = filter_background(
        sampler, [stack], threshold=90.0, mask_stacks=[mask], coverage=0.5, filtered_prob=0.2
    )
    truth = brute_force(stack, (8, 8), mask=mask)
    for sample in range(2):
        hit = (truth["mean"][sample] < 90.0) | (truth["coverage"][sample] < 0.5)
        expected.set_region_probs(0, sample, np.where(hit, 0.2, 1.0))
        assert result.filtered[(0, sample)] == int(hit.sum())
    assert epochs_equal(sampler, expected)


def test_coverage_alone_needs_no_threshold() -> None:
    shape = (1, 1, 32, 32)
    mask = np.zeros((1, 32, 32), dtype=bool)
    mask[:, :16] = True
    sampler = numpy_sampler([shape], (8, 8))
    result = filter_background(
        sampler, [random_stack(shape)], mask_stacks=[mask], coverage=0.01, filtered_prob=0.0
    )
    assert result.filtered[(0, 0)] == 4 * 2  # rows 2 and 3 of the 4x4 grid are all unmasked


@pytest.mark.parametrize("stat", ["std", "max", "min", "entropy"])
def test_every_statistic_can_be_filtered_on(stat: str) -> None:
    shape = (1, 1, 40, 40)
    stack = random_stack(shape, seed=14)
    truth = brute_force(stack, (8, 8))[stat]
    threshold = float(np.median(truth))
    sampler = numpy_sampler([shape], (8, 8))
    result = filter_background(sampler, [stack], stat=stat, threshold=threshold)
    assert result.filtered[(0, 0)] == int((truth[0] < threshold).sum())


def test_filtering_twice_only_filters_more() -> None:
    shape = (1, 1, 40, 40)
    stack = random_stack(shape, seed=15)
    sampler = numpy_sampler([shape], (8, 8))
    first = filter_background(sampler, [stack], threshold=95.0)
    second = filter_background(sampler, [stack], threshold=90.0)  # a lower threshold
    assert second.filtered[(0, 0)] <= first.filtered[(0, 0)]
    assert second.n_patches == first.n_patches  # the first call's regions stay filtered


def test_filter_background_logs_a_summary(caplog: pytest.LogCaptureFixture) -> None:
    shape = (1, 1, 32, 32)
    sampler = numpy_sampler([shape], (8, 8))
    with caplog.at_level(logging.INFO, logger="gpu_patching.policies"):
        result = filter_background(sampler, random_stack(shape), threshold=1e9)
    assert f"{result.n_filtered} of {result.n_scored} regions" in caplog.text
    assert f"n_patches {result.n_patches_before} -> {result.n_patches}" in caplog.text


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"stacks": [np.zeros((2, 1, 32, 32))]}, ValueError, "data_shapes"),
        ({"stacks": [np.zeros((1, 1, 32, 32))] * 2}, ValueError, "2 entries"),
        ({"stacks": "image"}, TypeError, "sequence of arrays"),
        ({"threshold": None}, ValueError, "nothing to filter"),
        ({"threshold": np.nan}, ValueError, "finite"),
        ({"threshold": "1"}, TypeError, "threshold"),
        ({"threshold": 10**400}, ValueError, "threshold is too large for a float64"),
        ({"filtered_prob": 10**400}, ValueError, "filtered_prob is too large for a float64"),
        ({"filtered_prob": -0.1}, ValueError, "filtered_prob"),
        ({"filtered_prob": 2000.0}, ValueError, "filtered_prob"),
        ({"stat": "coverage"}, ValueError, "'coverage' argument"),
        ({"stat": "median"}, ValueError, "median"),
        ({"coverage": 0.5}, ValueError, "mask_stacks"),
        ({"mask_stacks": [np.ones((1, 32, 32), dtype=bool)]}, ValueError, "only used"),
        (
            {"coverage": 1.5, "mask_stacks": [np.ones((1, 32, 32), dtype=bool)]},
            ValueError,
            "coverage",
        ),
        ({"channel": 2}, IndexError, "channel"),
        ({"workers": -1}, ValueError, "workers"),
        ({"strategy": "sampler"}, TypeError, "StratifiedPatching"),
    ],
)
def test_filter_background_rejects_bad_arguments_and_changes_nothing(
    kwargs: dict[str, Any], error: type[Exception], match: str
) -> None:
    shape = (1, 1, 32, 32)
    sampler = numpy_sampler([shape], (8, 8))
    untouched = numpy_sampler([shape], (8, 8))
    arguments: dict[str, Any] = {
        "strategy": sampler,
        "stacks": [random_stack(shape)],
        "threshold": 1e9,
    }
    arguments.update(kwargs)
    with pytest.raises(error, match=match):
        filter_background(arguments.pop("strategy"), arguments.pop("stacks"), **arguments)
    assert epochs_equal(sampler, untouched)


def test_a_failing_update_rolls_back_the_samples_already_updated(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    shape = (3, 1, 32, 32)
    sampler = numpy_sampler([shape], (8, 8))
    untouched = numpy_sampler([shape], (8, 8))
    original = StratifiedPatching.set_region_probs
    calls = []

    def failing(self: StratifiedPatching, data_idx: int, sample_idx: int, probs: Any) -> None:
        calls.append(sample_idx)
        if len(calls) == 2:
            raise RuntimeError("device lost")
        original(self, data_idx, sample_idx, probs)

    monkeypatch.setattr(StratifiedPatching, "set_region_probs", failing)
    with pytest.raises(RuntimeError, match="device lost"):
        filter_background(sampler, [random_stack(shape)], threshold=1e9)
    assert epochs_equal(sampler, untouched)


# -- validation_split ----------------------------------------------------------


def test_apportion_uses_largest_remainders() -> None:
    assert policies._apportion(7, [5, 3, 2], [10, 10, 10]) == [4, 2, 1]
    assert policies._apportion(3, [1, 1, 1], [5, 5, 5]) == [1, 1, 1]
    assert policies._apportion(2, [1, 1, 1], [5, 5, 5]) == [1, 1, 0]  # ties: lower index


def test_apportion_caps_at_capacity_and_shares_the_rest() -> None:
    assert policies._apportion(5, [1, 1], [1, 10]) == [1, 4]
    assert policies._apportion(6, [10, 0, 1], [2, 3, 10]) == [2, 0, 4]
    assert policies._apportion(4, [1, 0], [1, 5]) == [1, 3]  # only zero weights have room


def test_validation_patches_are_included_cells_that_fit_in_the_image() -> None:
    shapes = [(2, 1, 70, 64)]
    patch = (16, 16)
    sampler = numpy_sampler(shapes, patch, seed=4)
    sampler.exclude_patches(0, 0, [(0, 0), (1, 1)])
    included_before = sampler.get_included_grid_coords()
    specs = validation_split(sampler, 10, seed=1)
    assert len(specs) == 10
    seen = set()
    for spec in specs:
        assert spec["patch_size"] == patch
        cell = tuple(c // p for c, p in zip(spec["coords"], patch, strict=True))
        assert tuple(c * p for c, p in zip(cell, patch, strict=True)) == spec["coords"]
        assert cell in included_before[(spec["data_idx"], spec["sample_idx"])]
        assert all(c + p <= d for c, p, d in zip(spec["coords"], patch, shapes[0][2:], strict=True))
        seen.add((spec["data_idx"], spec["sample_idx"], cell))
    assert len(seen) == 10
    included_after = sampler.get_included_grid_coords()
    for data_idx, sample_idx, cell in seen:
        assert cell not in included_after[(data_idx, sample_idx)]


def test_cells_whose_patch_would_leave_the_image_are_never_chosen() -> None:
    # D = 31, P = 16: the grid has 2 rows but only row 0 has a patch inside the image.
    sampler = numpy_sampler([(1, 1, 31, 64)], (16, 16))
    specs = validation_split(sampler, 4, seed=0)
    assert sorted(spec["coords"] for spec in specs) == [(0, 0), (0, 16), (0, 32), (0, 48)]
    with pytest.raises(ValueError, match="the 0 grid cells available"):
        validation_split(sampler, 1)


def test_training_patches_never_overlap_a_validation_patch() -> None:
    shapes = [(2, 1, 96, 80), (1, 1, 64, 72)]
    patch = (16, 16)
    sampler = numpy_sampler(shapes, patch, seed=5)
    specs = validation_split(sampler, 9, seed=2)
    by_sample: dict[tuple[int, int], list[tuple[int, ...]]] = {}
    for spec in specs:
        cell = tuple(c // p for c, p in zip(spec["coords"], patch, strict=True))
        by_sample.setdefault((spec["data_idx"], spec["sample_idx"]), []).append(cell)
    for epoch in range(300):
        batch = sampler.sample_epoch(epoch).to_numpy()
        for (data_idx, sample_idx), cells in by_sample.items():
            corners = batch.coords[sample_rows(batch, data_idx, sample_idx)]
            assert not patches_overlap_cells(corners, patch, cells).any()


def test_validation_patches_follow_the_patch_counts_of_the_samples() -> None:
    # Sample patch counts 4 * 4 = 16 and 8 * 8 = 64: 10 patches split 2 : 8.
    sampler = numpy_sampler([(1, 1, 64, 64), (1, 1, 128, 128)], (16, 16))
    specs = validation_split(sampler, 10, seed=0)
    per_stack = [sum(spec["data_idx"] == k for spec in specs) for k in (0, 1)]
    assert per_stack == [2, 8]


def test_validation_split_reduces_n_patches_by_the_cells_taken() -> None:
    sampler = numpy_sampler([(3, 1, 64, 64)], (16, 16))
    before = sampler.n_patches
    validation_split(sampler, 6, seed=0)
    assert sampler.n_patches == before - 6


def test_validation_split_is_reproducible_with_a_seed() -> None:
    def split(seed: int | None, sampler_seed: int = 0) -> list[Any]:
        sampler = numpy_sampler([(2, 1, 128, 96)], (16, 16), seed=sampler_seed)
        return validation_split(sampler, 12, seed=seed)

    assert split(7) == split(7)
    assert split(7) != split(8)
    assert split(None, sampler_seed=11) == split(11)  # None: the sampler's seed


def test_too_many_validation_patches_says_how_many_are_available() -> None:
    sampler = numpy_sampler([(1, 1, 64, 64)], (16, 16))
    sampler.exclude_patches(0, 0, [(0, 0)])
    untouched = numpy_sampler([(1, 1, 64, 64)], (16, 16))
    untouched.exclude_patches(0, 0, [(0, 0)])
    with pytest.raises(ValueError, match="more than the 15 grid cells available"):
        validation_split(sampler, 16)
    assert epochs_equal(sampler, untouched)


def test_zero_validation_patches_changes_nothing() -> None:
    sampler = numpy_sampler([(1, 1, 64, 64)], (16, 16))
    assert validation_split(sampler, 0) == []
    assert epochs_equal(sampler, numpy_sampler([(1, 1, 64, 64)], (16, 16)))


@pytest.mark.parametrize(
    ("arguments", "error", "match"),
    [
        ((None, 1), TypeError, "StratifiedPatching"),
        (("sampler", -1), ValueError, ">= 0"),
        (("sampler", 1.0), TypeError, "n_val_patches"),
    ],
)
def test_validation_split_rejects_bad_arguments(
    arguments: tuple[Any, Any], error: type[Exception], match: str
) -> None:
    sampler = numpy_sampler([(1, 1, 64, 64)], (16, 16))
    strategy = sampler if arguments[0] == "sampler" else arguments[0]
    with pytest.raises(error, match=match):
        validation_split(strategy, arguments[1])


def test_validation_split_rejects_a_seed_out_of_range() -> None:
    sampler = numpy_sampler([(1, 1, 64, 64)], (16, 16))
    with pytest.raises(ValueError, match="seed"):
        validation_split(sampler, 1, seed=-1)
    with pytest.raises(TypeError, match="seed"):
        validation_split(sampler, 1, seed=1.5)


# -- CuPy agrees with NumPy ----------------------------------------------------


cupy, _WHY_NO_CUDA = usable_cupy()


@pytest.mark.cuda
@pytest.mark.skipif(cupy is None, reason=_WHY_NO_CUDA)
@pytest.mark.parametrize("backend", ["numpy", "cuda"])
def test_filtering_cupy_stacks_equals_filtering_numpy_stacks(backend: str) -> None:
    shape = (2, 1, 64, 48)
    stack = random_stack(shape, np.uint16, seed=21)
    on_host = StratifiedPatching([shape], (8, 8), seed=1, backend="numpy")
    on_device = StratifiedPatching([shape], (8, 8), seed=1, backend=backend)
    expected = filter_background(on_host, [stack], stat="entropy", threshold=5.0)
    result = filter_background(on_device, [cupy.asarray(stack)], stat="entropy", threshold=5.0)
    assert result == expected
    assert validation_split(on_device, 5, seed=3) == validation_split(on_host, 5, seed=3)
    assert epochs_equal(on_device, on_host)


def test_filtering_tensor_stacks_equals_filtering_numpy_stacks() -> None:
    torch = pytest.importorskip("torch")
    shapes = [(2, 1, 40, 32), (1, 1, 24, 24)]
    stacks = [random_stack(shape, np.float32, seed=k) for k, shape in enumerate(shapes)]
    masks = [stack[:, 0] > 100.0 for stack in stacks]
    on_numpy, on_torch = numpy_sampler(shapes, (8, 8)), numpy_sampler(shapes, (8, 8))
    expected = filter_background(on_numpy, stacks, threshold=100.0, mask_stacks=masks, coverage=0.5)
    result = filter_background(
        on_torch,
        [torch.from_numpy(stack) for stack in stacks],
        threshold=100.0,
        mask_stacks=[torch.from_numpy(mask) for mask in masks],
        coverage=0.5,
    )
    assert result == expected
    assert epochs_equal(on_torch, on_numpy)


def test_validation_split_reads_the_patch_counts_without_drawing_an_epoch(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    expected = validation_split(numpy_sampler(SHAPES, PATCH, seed=4), 6, seed=2)

    def no_epochs(self: StratifiedPatching, *args: Any, **kwargs: Any) -> Any:
        raise AssertionError("validation_split drew an epoch")

    monkeypatch.setattr(StratifiedPatching, "sample_epoch", no_epochs)
    assert validation_split(numpy_sampler(SHAPES, PATCH, seed=4), 6, seed=2) == expected
