"""Region statistics (``gpu_patching.stats``).

The statistics are checked against a brute-force computation written from the
definition: the sampling region of grid cell ``g`` is the box
``[g * P, (g + 2) * P)`` clipped to the image, and a statistic of the region is
that statistic of the pixels in the box.
"""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np
import pytest
from conftest import grid_shape
from hypothesis import given, settings
from hypothesis import strategies as st

import gpu_patching.stats as stats_module
from gpu_patching import filter_map, region_statistics
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
        monkeypatch.setattr(stats_module, "_GROUP_ELEMENTS_CPU", group)
        monkeypatch.setattr(stats_module, "_COPY_ELEMENTS_CPU", copy)
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
        monkeypatch.setattr(stats_module, "_GROUP_ELEMENTS_CPU", group)
        threaded = region_statistics(stack, (6, 5), stats=ALL_STATS, mask=mask, workers=workers)
        for name in ALL_STATS:
            np.testing.assert_array_equal(threaded[name], alone[name], err_msg=name)


def test_small_histogram_groups_and_untabulated_entropy_give_the_same_entropy(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    stack = random_stack((3, 1, 30, 26), np.float32, seed=16)
    whole = region_statistics(stack, (4, 3), stats="entropy", bins=10)
    monkeypatch.setattr(stats_module, "_HISTOGRAM_ELEMENTS", 1)  # one row of blocks per group
    monkeypatch.setattr(stats_module, "_ENTROPY_TABLE_MAX", 0)  # c * log2(c) computed directly
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
        ({"stats": "entropy", "bins": 2**63}, ValueError, f"bins must be in .*got {2**63}"),
        ({"stats": "entropy", "value_range": (0, 10**400)}, ValueError, "value_range.1. is too"),
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


def test_filter_map_of_an_image_smaller_than_the_patch_follows_its_grid() -> None:
    # As the sampler: no cell along Y (30 < 63), or one cell covering the whole image.
    thin = random_stack((2, 1, 30, 100), np.float32, seed=1)
    no_cell = filter_map(region_statistics(thin, (64, 64))["mean"], (64, 64), (30, 100))
    assert no_cell.shape == (2, 30, 100) and np.isnan(no_cell).all()
    short = random_stack((1, 1, 90, 63), np.float32, seed=2)
    one_cell = filter_map(region_statistics(short, (64, 64))["max"], (64, 64), (90, 63))
    np.testing.assert_array_equal(one_cell, np.full((1, 90, 63), short.max(), dtype=np.float64))


@pytest.mark.parametrize(
    ("statistic", "spatial", "kwargs", "error", "match"),
    [
        (np.zeros((1, 3, 3)), (10, 10), {}, ValueError, "must be"),
        (np.zeros((1, 3, 3), dtype=bool), (13, 13), {}, TypeError, "real numbers"),
        (np.zeros((1, 3, 3)), (13, 13), {"combine": "mean"}, ValueError, "combine"),
        ([[0.0]], (4, 4), {}, TypeError, "NumPy or CuPy"),
        (np.zeros((1, 0, 3)), (0, 13), {}, ValueError, "must be positive"),
    ],
)
def test_filter_map_rejects_bad_arguments(
    statistic: Any, spatial: tuple[int, ...], kwargs: dict[str, Any], error: type, match: str
) -> None:
    with pytest.raises(error, match=match):
        filter_map(statistic, (4, 4), spatial, **kwargs)


# -- filter_background ---------------------------------------------------------


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


# -- array types -----------------------------------------------------------------


def test_tensors_are_read_as_numpy_arrays_and_give_the_same_statistics() -> None:
    torch = pytest.importorskip("torch")
    stack = random_stack((2, 1, 30, 26), np.float32, seed=30)
    mask = stack[:, 0] > 100.0
    on_numpy = region_statistics(stack, (4, 3), stats=ALL_STATS, mask=mask)
    on_torch = region_statistics(
        torch.from_numpy(stack), torch.tensor([4, 3]), stats=ALL_STATS, mask=torch.from_numpy(mask)
    )
    for name in ALL_STATS:
        assert isinstance(on_torch[name], np.ndarray)
        np.testing.assert_array_equal(on_torch[name], on_numpy[name], err_msg=name)
    mean = torch.from_numpy(on_numpy["mean"])
    np.testing.assert_array_equal(
        filter_map(mean, (4, 3), (30, 26)), filter_map(on_numpy["mean"], (4, 3), (30, 26))
    )


@pytest.mark.parametrize("stack", [[[[[1.0]]]], "image", None], ids=["list", "str", "None"])
def test_a_stack_that_is_no_array_is_a_type_error_naming_its_type(stack: Any) -> None:
    with pytest.raises(
        TypeError, match=f"stack must be a NumPy or CuPy array.*{type(stack).__name__}"
    ):
        region_statistics(stack, (1, 1))


def test_region_statistics_import_nothing_of_the_sampler() -> None:
    import ast
    from pathlib import Path

    source = Path(stats_module.__file__).read_text()
    imported = {
        node.module
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.ImportFrom) and node.level > 0 and node.module is not None
    }
    imported |= {
        alias.name
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.ImportFrom) and node.level > 0 and node.module is None
        for alias in node.names
    }
    assert imported <= {"_validation", "arrays", "blocks", "grid"}, imported
    # Its block reductions (gpu_patching.blocks) import nothing of the package.
    blocks_source = Path(stats_module.__file__).with_name("blocks.py").read_text()
    assert not [
        node
        for node in ast.walk(ast.parse(blocks_source))
        if isinstance(node, ast.ImportFrom) and node.level > 0
    ]
