"""Region statistics, background filtering and validation splits (``gpu_patching.filters``).

The statistics are checked against a brute-force computation written from the
definition: the sampling region of grid cell ``g`` is the box
``[g * P, (g + 2) * P)`` clipped to the image, and a statistic of the region is
that statistic of the pixels in the box.
"""

from __future__ import annotations

import itertools
import logging
import math
from typing import Any

import numpy as np
import pytest
from conftest import grid_shape, numpy_sampler, patches_overlap_cells, sample_rows
from hypothesis import given, settings
from hypothesis import strategies as st

import gpu_patching.filters as filters
from gpu_patching import (
    FilterResult,
    StratifiedPatching,
    filter_background,
    filter_map,
    region_statistics,
    validation_split,
)
from gpu_patching.testing import usable_cupy

ALL_STATS = ("mean", "std", "min", "max", "entropy", "coverage")


# -- brute force, from the definition ------------------------------------------


def region_box(cell: tuple[int, ...], patch: tuple[int, ...]) -> tuple[slice, ...]:
    """The box ``[g * P, (g + 2) * P)``; slicing clips it to the image."""
    return tuple(slice(g * p, (g + 2) * p) for g, p in zip(cell, patch, strict=True))


def histogram_entropy(values: np.ndarray, bins: int, value_range: tuple[float, float]) -> float:
    """Entropy in bits of the histogram; out-of-range values go to the end bins.

    An empty range (a constant stack) puts every value in bin 0.
    """
    low, high = value_range
    scale = bins / (high - low) if high > low else 0.0
    index = np.clip(np.floor((values - low) * scale), 0, bins - 1).astype(int)
    counts = np.bincount(index.ravel(), minlength=bins)
    fraction = counts[counts > 0] / values.size
    return float(-(fraction * np.log2(fraction)).sum())


def brute_force(
    stack: np.ndarray,
    patch: tuple[int, ...],
    *,
    channel: int = 0,
    bins: int = 64,
    value_range: tuple[float, float] | None = None,
    mask: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """Every statistic of every region, one region at a time."""
    image = stack[:, channel].astype(np.float64)
    if value_range is None:
        value_range = (float(image.min()), float(image.max()))
    cells = grid_shape(stack.shape[2:], patch)
    result = {name: np.full((stack.shape[0], *cells), np.nan) for name in ALL_STATS}
    for sample in range(stack.shape[0]):
        for cell in itertools.product(*(range(g) for g in cells)):
            box = region_box(cell, patch)
            crop = image[sample][box]
            if crop.size == 0:
                continue
            at = (sample, *cell)
            result["mean"][at] = crop.mean()
            result["std"][at] = crop.std()
            result["min"][at] = crop.min()
            result["max"][at] = crop.max()
            result["entropy"][at] = histogram_entropy(crop, bins, value_range)
            if mask is not None:
                result["coverage"][at] = mask[sample][box].mean()
    return result


def random_stack(shape: tuple[int, ...], dtype: Any = np.float32, seed: int = 0) -> np.ndarray:
    generator = np.random.default_rng(seed)
    if np.dtype(dtype).kind == "f":
        return (generator.normal(100.0, 20.0, size=shape)).astype(dtype)
    return generator.integers(0, 4096, size=shape).astype(dtype)


def assert_statistics_match(
    ours: dict[str, np.ndarray], expected: dict[str, np.ndarray], names: tuple[str, ...]
) -> None:
    for name in names:
        assert isinstance(ours[name], np.ndarray)
        assert ours[name].dtype == np.float64
        np.testing.assert_allclose(
            ours[name], expected[name], rtol=1e-10, atol=1e-9, equal_nan=True, err_msg=name
        )


# -- region_statistics ---------------------------------------------------------

CASES_2D_3D = [
    # (stack shape, patch size): edges where P does not divide D, and where it does.
    ((3, 2, 37, 50), (8, 7)),
    ((2, 1, 32, 48), (8, 8)),
    ((1, 1, 17, 9), (17, 3)),
    ((2, 1, 11, 20, 17), (3, 4, 5)),
    ((1, 2, 8, 9, 10), (4, 4, 4)),
]


@pytest.mark.parametrize(("shape", "patch"), CASES_2D_3D)
@pytest.mark.parametrize("dtype", [np.float32, np.uint16, np.int32, np.float64])
def test_statistics_equal_brute_force_per_region(
    shape: tuple[int, ...], patch: tuple[int, ...], dtype: Any
) -> None:
    stack = random_stack(shape, dtype, seed=len(shape))
    mask = np.random.default_rng(1).random((shape[0], *shape[2:])) < 0.3
    channel = shape[1] - 1
    ours = region_statistics(stack, patch, channel=channel, stats=ALL_STATS, bins=16, mask=mask)
    expected = brute_force(stack, patch, channel=channel, bins=16, mask=mask)
    assert list(ours) == list(ALL_STATS)
    for name in ALL_STATS:
        assert ours[name].shape == (shape[0], *grid_shape(shape[2:], patch))
    assert_statistics_match(ours, expected, ALL_STATS)


@settings(max_examples=30, deadline=None)
@given(
    data=st.data(),
    ndim=st.sampled_from([2, 3]),
)
def test_statistics_equal_brute_force_for_random_shapes(data: Any, ndim: int) -> None:
    patch = tuple(data.draw(st.integers(1, 6), label=f"P{a}") for a in range(ndim))
    spatial = tuple(data.draw(st.integers(p, 3 * p + 4), label="D") for p in patch)
    samples = data.draw(st.integers(1, 3), label="S")
    stack = random_stack((samples, 1, *spatial), np.float32, seed=sum(spatial))
    ours = region_statistics(stack, patch, stats=("mean", "std", "min", "max", "entropy"), bins=8)
    expected = brute_force(stack, patch, bins=8)
    assert_statistics_match(ours, expected, ("mean", "std", "min", "max", "entropy"))


def test_row_chunks_and_sample_groups_give_the_same_statistics(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    stack = random_stack((5, 1, 45, 38), np.uint16, seed=3)
    mask = stack[:, 0] > 2000
    whole = region_statistics(stack, (6, 5), stats=ALL_STATS, mask=mask)
    # Budgets of one row of blocks, two rows of blocks, and two whole samples.
    budgets = (1, 6 * 38 * 2 + 1, 45 * 38 * 2)
    for group, copy in itertools.product(budgets, budgets):
        monkeypatch.setattr(filters, "_GROUP_ELEMENTS_CPU", group)
        monkeypatch.setattr(filters, "_COPY_ELEMENTS_CPU", copy)
        for dtype in (np.uint16, np.float32):  # with and without the integer fast paths
            chunked = region_statistics(stack.astype(dtype), (6, 5), stats=ALL_STATS, mask=mask)
            assert_statistics_match(chunked, whole, ALL_STATS)


@pytest.mark.parametrize("workers", [2, 3, 5])
def test_threads_give_the_statistics_of_one_thread(
    monkeypatch: pytest.MonkeyPatch, workers: int
) -> None:
    stack = random_stack((5, 2, 45, 38), np.float32, seed=4)
    mask = stack[:, 0] > 0.5
    alone = region_statistics(stack, (6, 5), stats=ALL_STATS, mask=mask, workers=1)
    # Samples larger than a group (cut into row slices), and groups of samples.
    for group in (6 * 38 * 2 + 1, 45 * 38 * 3):
        monkeypatch.setattr(filters, "_GROUP_ELEMENTS_CPU", group)
        threaded = region_statistics(stack, (6, 5), stats=ALL_STATS, mask=mask, workers=workers)
        for name in ALL_STATS:
            np.testing.assert_array_equal(threaded[name], alone[name], err_msg=name)


def test_small_histogram_groups_and_untabulated_entropy_give_the_same_entropy(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    stack = random_stack((3, 1, 30, 26), np.float32, seed=16)
    whole = region_statistics(stack, (4, 3), stats="entropy", bins=10)
    monkeypatch.setattr(filters, "_HISTOGRAM_ELEMENTS", 1)  # one row of blocks per group
    monkeypatch.setattr(filters, "_ENTROPY_TABLE_MAX", 0)  # c * log2(c) computed directly
    small = region_statistics(stack, (4, 3), stats="entropy", bins=10)
    assert_statistics_match(small, whole, ("entropy",))


def test_region_without_pixels_is_nan() -> None:
    # With P = 1 the grid has D + 1 cells per axis; the last box is empty.
    stack = random_stack((1, 1, 5, 6), seed=4)
    ours = region_statistics(stack, (1, 2), stats=("mean", "std", "max", "min", "entropy"))
    assert ours["mean"].shape == (1, 6, 3)
    for name, values in ours.items():
        assert np.isnan(values[0, 5]).all(), name
        assert not np.isnan(values[0, :5]).any(), name


def test_entropy_equals_numpy_histogram_entropy() -> None:
    stack = np.random.default_rng(5).random((2, 1, 40, 40))
    ours = region_statistics(stack, (10, 10), stats="entropy", bins=12, value_range=(0.0, 1.0))
    for sample, y, x in itertools.product(range(2), range(4), range(4)):
        crop = stack[sample, 0][region_box((y, x), (10, 10))]
        counts, _ = np.histogram(crop, bins=12, range=(0.0, 1.0))
        fraction = counts[counts > 0] / crop.size
        assert ours["entropy"][sample, y, x] == pytest.approx(-(fraction * np.log2(fraction)).sum())


def test_entropy_range_defaults_to_the_stack_range_and_clips_outside_values() -> None:
    stack = random_stack((2, 1, 30, 30), np.float64, seed=6)
    default = region_statistics(stack, (5, 5), stats="entropy", bins=10)["entropy"]
    explicit = region_statistics(
        stack, (5, 5), stats="entropy", bins=10, value_range=(stack.min(), stack.max())
    )["entropy"]
    np.testing.assert_array_equal(default, explicit)
    narrow = (90.0, 110.0)  # most values fall outside: they count in the end bins
    ours = region_statistics(stack, (5, 5), stats="entropy", bins=10, value_range=narrow)
    expected = brute_force(stack, (5, 5), bins=10, value_range=narrow)
    assert_statistics_match(ours, expected, ("entropy",))


def test_constant_image_has_zero_std_and_zero_entropy() -> None:
    stack = np.full((1, 1, 20, 20), 7, dtype=np.uint8)
    ours = region_statistics(stack, (4, 4), stats=("mean", "std", "entropy"))
    assert (ours["mean"] == 7).all()
    assert (ours["std"] == 0).all()
    assert (ours["entropy"] == 0).all()


def test_std_does_not_cancel_on_a_large_offset() -> None:
    generator = np.random.default_rng(7)
    stack = 1e7 + generator.normal(0.0, 1e-3, size=(1, 1, 64, 64))
    ours = region_statistics(stack, (16, 16), stats="std")["std"]
    expected = brute_force(stack, (16, 16))["std"]
    np.testing.assert_allclose(ours, expected, rtol=1e-6)


def test_integer_images_give_exact_sums() -> None:
    stack = np.random.default_rng(8).integers(0, 65536, size=(1, 1, 64, 64), dtype=np.uint16)
    ours = region_statistics(stack, (16, 16), stats=("mean", "std"))
    expected = brute_force(stack, (16, 16))
    assert_statistics_match(ours, expected, ("mean", "std"))


@pytest.mark.parametrize("layout", ["S(Z)YX", "S1(Z)YX", "SC(Z)YX"])
def test_coverage_accepts_every_mask_layout(layout: str) -> None:
    stack = random_stack((2, 3, 24, 20), seed=9)
    per_channel = np.random.default_rng(9).random(stack.shape) < 0.5
    spatial_mask = per_channel[:, 1]
    mask = {
        "S(Z)YX": spatial_mask,
        "S1(Z)YX": spatial_mask[:, None],
        "SC(Z)YX": per_channel,
    }[layout]
    ours = region_statistics(stack, (6, 5), channel=1, stats="coverage", mask=mask)
    expected = brute_force(stack, (6, 5), channel=1, mask=spatial_mask)
    assert_statistics_match(ours, expected, ("coverage",))


def test_stats_come_back_in_the_order_asked_without_duplicates() -> None:
    stack = random_stack((1, 1, 16, 16))
    ours = region_statistics(stack, (4, 4), stats=("max", "mean", "max"))
    assert list(ours) == ["max", "mean"]


def test_input_stack_is_not_modified() -> None:
    stack = random_stack((2, 1, 20, 20), np.float64)
    before = stack.copy()
    region_statistics(stack, (4, 4), stats=("mean", "std", "entropy"))
    np.testing.assert_array_equal(stack, before)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"stack": [[[[1.0]]]]}, TypeError, "NumPy or CuPy array"),
        ({"stack": np.zeros((1, 1, 8, 8), dtype=bool)}, TypeError, "integers or floats"),
        ({"stack": np.zeros((1, 8, 8))}, ValueError, "4 axes"),
        ({"patch_size": (16, 4)}, ValueError, "larger than"),
        ({"patch_size": (4, 0)}, ValueError, "positive"),
        ({"channel": 1}, IndexError, "channel 1"),
        ({"channel": 1.0}, TypeError, "channel"),
        ({"stats": ("mean", "median")}, ValueError, "median"),
        ({"stats": ()}, ValueError, "empty"),
        ({"stats": 3}, TypeError, "stats"),
        ({"stats": "entropy", "bins": 0}, ValueError, "bins"),
        ({"stats": "entropy", "value_range": (1.0, 1.0)}, ValueError, "low < high"),
        ({"stats": "entropy", "value_range": (0.0, np.inf)}, ValueError, "finite"),
        ({"stats": "entropy", "value_range": 5}, TypeError, "value_range"),
        ({"stats": "coverage"}, ValueError, "needs a mask"),
        ({"mask": np.ones((1, 8, 8), dtype=bool)}, ValueError, "only used"),
        ({"stats": "coverage", "mask": np.ones((1, 8, 8))}, TypeError, "boolean"),
        ({"stats": "coverage", "mask": np.ones((2, 8, 8), dtype=bool)}, ValueError, "mask has"),
        ({"workers": 0}, ValueError, "workers must be >= 1"),
        ({"workers": 2.0}, TypeError, "workers"),
        ({"workers": True}, TypeError, "workers"),
    ],
)
def test_bad_arguments_are_rejected_with_a_clear_message(
    kwargs: dict[str, Any], error: type[Exception], match: str
) -> None:
    arguments: dict[str, Any] = {"stack": np.zeros((1, 1, 8, 8)), "patch_size": (4, 4)}
    arguments.update(kwargs)
    stack, patch = arguments.pop("stack"), arguments.pop("patch_size")
    with pytest.raises(error, match=match):
        region_statistics(stack, patch, **arguments)


def test_entropy_of_non_finite_stack_needs_a_value_range() -> None:
    stack = np.zeros((1, 1, 8, 8))
    stack[0, 0, 3, 3] = np.nan
    with pytest.raises(ValueError, match="value_range"):
        region_statistics(stack, (4, 4), stats="entropy")
    ours = region_statistics(stack, (4, 4), stats=("entropy", "mean"), value_range=(0.0, 1.0))
    for name in ("entropy", "mean"):  # NaN only where the region holds the NaN pixel
        assert np.isnan(ours[name][0, 0, 0]) and ours[name][0, 1, 1] == 0, name


# -- filter_map ----------------------------------------------------------------


def brute_force_map(
    statistic: np.ndarray, patch: tuple[int, ...], spatial: tuple[int, ...], combine: str
) -> np.ndarray:
    pick = np.nanmax if combine == "max" else np.nanmin
    out = np.full((statistic.shape[0], *spatial), np.nan)
    cells = statistic.shape[1:]
    for pixel in itertools.product(*(range(d) for d in spatial)):
        over = [
            cell
            for cell in itertools.product(*(range(g) for g in cells))
            if all(g * p <= x < (g + 2) * p for g, p, x in zip(cell, patch, pixel, strict=True))
        ]
        for sample in range(statistic.shape[0]):
            out[(sample, *pixel)] = pick([statistic[(sample, *cell)] for cell in over])
    return out


@pytest.mark.parametrize("combine", ["max", "min"])
@pytest.mark.parametrize(
    ("spatial", "patch"), [((13, 10), (4, 3)), ((8, 8), (4, 4)), ((5, 7, 6), (2, 3, 2))]
)
def test_filter_map_is_the_max_or_min_over_overlapping_regions(
    combine: str, spatial: tuple[int, ...], patch: tuple[int, ...]
) -> None:
    statistic = np.random.default_rng(10).random((2, *grid_shape(spatial, patch)))
    ours = filter_map(statistic, patch, spatial, combine=combine)
    assert ours.shape == (2, *spatial)
    np.testing.assert_array_equal(ours, brute_force_map(statistic, patch, spatial, combine))


def test_filter_map_accepts_one_sample_and_skips_empty_regions() -> None:
    stack = random_stack((1, 1, 6, 6), seed=11)
    mean = region_statistics(stack, (1, 3), stats="mean")["mean"]  # last row of cells empty
    ours = filter_map(mean[0], (1, 3), (6, 6))
    assert ours.shape == (6, 6)
    assert not np.isnan(ours).any()
    np.testing.assert_array_equal(ours, filter_map(mean, (1, 3), (6, 6))[0])


def test_pixels_under_the_max_map_lie_only_in_filtered_regions() -> None:
    stack = random_stack((1, 1, 40, 36), seed=12)
    mean = region_statistics(stack, (8, 6), stats="mean")["mean"]
    threshold = float(np.median(mean))
    low = filter_map(mean, (8, 6), (40, 36)) < threshold
    for y, x in zip(*np.nonzero(low[0]), strict=True):
        cells = [(gy, gx) for gy in (y // 8 - 1, y // 8) for gx in (x // 6 - 1, x // 6)]
        cells = [
            (gy, gx) for gy, gx in cells if 0 <= gy < mean.shape[1] and 0 <= gx < mean.shape[2]
        ]
        assert all(mean[0, gy, gx] < threshold for gy, gx in cells)


@pytest.mark.parametrize(
    ("statistic", "spatial", "kwargs", "error", "match"),
    [
        (np.zeros((1, 3, 3)), (10, 10), {}, ValueError, "must be"),
        (np.zeros((1, 3, 3), dtype=bool), (13, 13), {}, TypeError, "real numbers"),
        (np.zeros((1, 3, 3)), (13, 13), {"combine": "mean"}, ValueError, "combine"),
        ([[0.0]], (4, 4), {}, TypeError, "NumPy or CuPy"),
        (np.zeros((1, 3, 3)), (2, 13), {}, ValueError, "larger than"),
    ],
)
def test_filter_map_rejects_bad_arguments(
    statistic: Any, spatial: tuple[int, ...], kwargs: dict[str, Any], error: type, match: str
) -> None:
    with pytest.raises(error, match=match):
        filter_map(statistic, (4, 4), spatial, **kwargs)


# -- filter_background ---------------------------------------------------------


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
    with caplog.at_level(logging.INFO, logger="gpu_patching.filters"):
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
    assert filters._apportion(7, [5, 3, 2], [10, 10, 10]) == [4, 2, 1]
    assert filters._apportion(3, [1, 1, 1], [5, 5, 5]) == [1, 1, 1]
    assert filters._apportion(2, [1, 1, 1], [5, 5, 5]) == [1, 1, 0]  # ties: lower index


def test_apportion_caps_at_capacity_and_shares_the_rest() -> None:
    assert filters._apportion(5, [1, 1], [1, 10]) == [1, 4]
    assert filters._apportion(6, [10, 0, 1], [2, 3, 10]) == [2, 0, 4]
    assert filters._apportion(4, [1, 0], [1, 5]) == [1, 3]  # only zero weights have room


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


@pytest.mark.parametrize(("shape", "patch"), CASES_2D_3D)
@pytest.mark.parametrize("dtype", [np.float32, np.uint16])
@pytest.mark.cuda
@pytest.mark.skipif(cupy is None, reason=_WHY_NO_CUDA)
def test_cupy_statistics_equal_numpy_statistics(
    shape: tuple[int, ...], patch: tuple[int, ...], dtype: Any
) -> None:
    stack = random_stack(shape, dtype, seed=20)
    mask = np.random.default_rng(20).random((shape[0], *shape[2:])) < 0.4
    on_host = region_statistics(stack, patch, stats=ALL_STATS, bins=16, mask=mask)
    on_device = region_statistics(
        cupy.asarray(stack), patch, stats=ALL_STATS, bins=16, mask=cupy.asarray(mask)
    )
    for name in ALL_STATS:
        assert isinstance(on_device[name], cupy.ndarray), name
        np.testing.assert_allclose(
            on_device[name].get(), on_host[name], rtol=1e-10, atol=1e-9, equal_nan=True
        )
    grid_map = filter_map(on_device["mean"], patch, shape[2:])
    assert isinstance(grid_map, cupy.ndarray)
    np.testing.assert_allclose(grid_map.get(), filter_map(on_host["mean"], patch, shape[2:]))


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
