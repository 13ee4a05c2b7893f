"""Bad input (docs/design.md section 4).

Every bad input raises ``ValueError``, ``TypeError`` or ``IndexError`` with a
message that names the offending value, and a rejected call leaves the sampler
exactly as it was: afterwards it behaves like a twin (same seed, same history)
that never saw the bad call.
"""

from __future__ import annotations

import importlib.util
import math
import re
import sys
import types
from typing import Any

import numpy as np
import pytest
from conftest import numpy_sampler

import gpu_patching
from gpu_patching import BackendUnavailableError, StratifiedPatching, grid, tables

TOO_LARGE = 2 * grid.MAX_PROBABILITY
JUST_TOO_LARGE = float(np.nextafter(grid.MAX_PROBABILITY, np.inf))
SHAPES = [(2, 1, 16, 16), (1, 1, 12, 20)]  # grids (4, 4) and (3, 5) with 4x4 patches
PATCH = (4, 4)


def escaped(value: Any) -> str:
    """A regex that matches the text of ``value``."""
    return re.escape(str(value))


# -- the constructor -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data_shapes", "patch_size", "error", "offending"),
    [
        # wrong dimensionality
        pytest.param(
            [(1, 1, 8, 16, 16)], (4, 4), ValueError, "(1, 1, 8, 16, 16)", id="3d-shape-2d-patch"
        ),
        pytest.param(
            [(1, 1, 16, 16)], (4, 4, 4), ValueError, "(1, 1, 16, 16)", id="2d-shape-3d-patch"
        ),
        pytest.param([(1, 16, 16)], (4, 4), ValueError, "(1, 16, 16)", id="shape-missing-axis"),
        pytest.param(
            [(1, 1, 16, 16), (1, 1, 4, 16, 16)],
            (4, 4),
            ValueError,
            "(1, 1, 4, 16, 16)",
            id="second-shape-wrong",
        ),
        pytest.param([(1, 1, 16, 16)], (4,), ValueError, "(4,)", id="patch-1d"),
        pytest.param([(1, 1, 16, 16)], (4, 4, 4, 4), ValueError, "(4, 4, 4, 4)", id="patch-4d"),
        # non-integer sizes
        pytest.param([(1, 1, 16.0, 16)], (4, 4), TypeError, "16.0", id="float-shape"),
        pytest.param([(1, 1, "16", 16)], (4, 4), TypeError, "'16'", id="str-shape"),
        pytest.param([(1, 1, 16, 16)], (4.5, 4), TypeError, "4.5", id="float-patch"),
        pytest.param([(1, 1, 16, 16)], (4, None), TypeError, "None", id="none-patch"),
        pytest.param([(1, 1, 16, 16)], "44", TypeError, "'44'", id="str-patch"),
        pytest.param([(1, 1, 16, 16)], 4, TypeError, "4", id="int-patch"),
        pytest.param(
            [(1, 1, 16, 16)], (np.float64(4.0), 4), TypeError, "4.0", id="numpy-float-patch"
        ),
        # bools are not sizes
        pytest.param([(1, 1, 16, 16)], (True, 4), TypeError, "True", id="bool-patch"),
        pytest.param([(1, True, 16, 16)], (4, 4), TypeError, "True", id="bool-shape"),
        # non-positive sizes
        pytest.param([(1, 1, 16, 16)], (0, 4), ValueError, "(0, 4)", id="zero-patch"),
        pytest.param([(1, 1, 16, 16)], (4, -2), ValueError, "(4, -2)", id="negative-patch"),
        pytest.param([(1, 1, 0, 16)], (4, 4), ValueError, "(1, 1, 0, 16)", id="zero-shape"),
        pytest.param([(0, 1, 16, 16)], (4, 4), ValueError, "(0, 1, 16, 16)", id="zero-samples"),
        pytest.param([(1, 1, 16, -16)], (4, 4), ValueError, "(1, 1, 16, -16)", id="negative-shape"),
        # (a patch larger than the image is accepted: tests/test_small_images.py)
        # no data
        pytest.param([], (4, 4), ValueError, "empty", id="no-stacks"),
        pytest.param(7, (4, 4), TypeError, "7", id="shapes-not-a-sequence"),
        pytest.param("1,1,16,16", (4, 4), TypeError, "'1,1,16,16'", id="shapes-a-string"),
    ],
)
def test_constructor_rejects_bad_shapes(data_shapes, patch_size, error, offending):
    with pytest.raises(error, match=escaped(offending)):
        StratifiedPatching(data_shapes, patch_size, seed=0, backend="numpy")


@pytest.mark.parametrize(
    ("seed", "error", "offending"),
    [
        (-1, ValueError, "-1"),
        (1 << 64, ValueError, str(1 << 64)),
        (-(1 << 70), ValueError, str(-(1 << 70))),
        (1.5, TypeError, "1.5"),
        (2.0, TypeError, "2.0"),
        ("42", TypeError, "'42'"),
        (True, TypeError, "True"),
        (np.float32(3), TypeError, "3.0"),
    ],
)
def test_constructor_rejects_bad_seeds(seed, error, offending):
    with pytest.raises(error, match=escaped(offending)):
        StratifiedPatching(SHAPES, PATCH, seed=seed, backend="numpy")


@pytest.mark.parametrize("backend", ["gpu", "NumPy", "", "cpu"])
def test_unknown_backend_name_is_a_value_error(backend):
    with pytest.raises(ValueError, match=escaped(repr(backend))):
        StratifiedPatching(SHAPES, PATCH, seed=0, backend=backend)


@pytest.mark.parametrize("backend", [3, None, b"numpy", ["numpy"]])
def test_non_string_backend_is_a_type_error(backend):
    with pytest.raises(TypeError, match=escaped(repr(backend))):
        StratifiedPatching(SHAPES, PATCH, seed=0, backend=backend)


def test_backend_unavailable_error_is_a_runtime_error():
    assert issubclass(BackendUnavailableError, RuntimeError)
    assert gpu_patching.BackendUnavailableError is BackendUnavailableError


def test_cuda_backend_without_cupy_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)  # 'import cupy' now fails
    with pytest.raises(
        BackendUnavailableError, match=re.escape("pip install gpu-patching[cuda12]")
    ) as caught:
        StratifiedPatching(SHAPES, PATCH, seed=0, backend="cuda")
    assert isinstance(caught.value, RuntimeError)
    assert "'cuda'" in str(caught.value)


def test_cuda_backend_with_cupy_but_no_device_says_so(monkeypatch):
    runtime = types.SimpleNamespace(getDeviceCount=lambda: 0)
    fake_cupy = types.ModuleType("cupy")
    fake_cupy.cuda = types.SimpleNamespace(runtime=runtime)
    monkeypatch.setitem(sys.modules, "cupy", fake_cupy)
    with pytest.raises(BackendUnavailableError, match="device"):
        StratifiedPatching(SHAPES, PATCH, seed=0, backend="cuda")


def _gpu_usable() -> bool:
    if importlib.util.find_spec("cupy") is None:
        return False
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


def test_cuda_backend_on_this_machine_without_a_gpu_raises_backend_unavailable_error():
    if _gpu_usable():
        pytest.skip("a CUDA device is usable here")
    with pytest.raises(BackendUnavailableError, match="cuda"):
        StratifiedPatching(SHAPES, PATCH, seed=0, backend="cuda")


def test_auto_backend_falls_back_to_numpy_without_cupy(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)
    sampler = StratifiedPatching(SHAPES, PATCH, seed=0, backend="auto")
    assert sampler.backend == "numpy"
    reference = numpy_sampler(SHAPES, PATCH, seed=0)
    np.testing.assert_array_equal(sampler.sample_epoch(0).coords, reference.sample_epoch(0).coords)


# -- twins: a rejected call changes nothing --------------------------------------------


def make_twins() -> tuple[StratifiedPatching, StratifiedPatching]:
    """Two samplers with the same seed and the same (non-trivial) history."""
    twins = []
    for _ in range(2):
        sampler = numpy_sampler(SHAPES, PATCH, seed=2024)
        sampler.exclude_patches(0, 0, [(1, 1)])
        sampler.set_region_probs(1, 0, {(0, 1): 0.5, (2, 4): 0.0})
        sampler.set_epoch(3)
        for index in (0, 0, 5, 17):
            sampler.get_patch_spec(index)
        twins.append(sampler)
    return twins[0], twins[1]


def assert_same_behaviour(sampler: StratifiedPatching, twin: StratifiedPatching) -> None:
    assert sampler.n_patches == twin.n_patches
    assert sampler.epoch == twin.epoch
    assert sampler.get_included_grid_coords() == twin.get_included_grid_coords()
    for data_idx in range(len(SHAPES)):
        assert sampler.get_patch_indices(data_idx) == twin.get_patch_indices(data_idx)
    for _ in range(2):
        for index in range(sampler.n_patches):
            assert sampler.get_patch_spec(index) == twin.get_patch_spec(index)
    for epoch in (0, 4, 9):
        ours, theirs = sampler.sample_epoch(epoch), twin.sample_epoch(epoch)
        np.testing.assert_array_equal(ours.coords, theirs.coords)
        np.testing.assert_array_equal(ours.data_idx, theirs.data_idx)
        np.testing.assert_array_equal(ours.sample_idx, theirs.sample_idx)


def check_rejected(call, error, offending: str) -> None:
    """``call(sampler)`` raises ``error`` naming ``offending`` and changes nothing."""
    sampler, twin = make_twins()
    with pytest.raises(error, match=escaped(offending)):
        call(sampler)
    assert_same_behaviour(sampler, twin)


def test_twins_really_are_identical_and_sensitive_to_state():
    sampler, twin = make_twins()
    assert_same_behaviour(sampler, twin)
    # A change that is accepted is visible to the comparison.
    sampler, twin = make_twins()
    sampler.exclude_patches(1, 0, [(0, 0)])
    with pytest.raises(AssertionError):
        assert_same_behaviour(sampler, twin)


# -- exclude_patches -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data_idx", "sample_idx", "grid_coords", "error", "offending"),
    [
        # grid coords outside the grid
        pytest.param(0, 0, [(4, 0)], ValueError, "(4, 0)", id="row-past-grid"),
        pytest.param(0, 0, [(0, 4)], ValueError, "(0, 4)", id="column-past-grid"),
        pytest.param(0, 0, [(2, 2), (-1, 0)], ValueError, "(-1, 0)", id="negative"),
        pytest.param(1, 0, [(0, 5)], ValueError, "(0, 5)", id="second-stack-grid"),
        pytest.param(0, 0, np.array([[1, 1], [9, 9]]), ValueError, "(9, 9)", id="array-outside"),
        # wrong length
        pytest.param(0, 0, [(1,)], ValueError, "(1,)", id="too-short"),
        pytest.param(0, 0, [(1, 1), (1, 1, 1)], ValueError, "(1, 1, 1)", id="too-long"),
        pytest.param(0, 0, np.array([[1, 1, 1]]), ValueError, "(1, 3)", id="array-wrong-width"),
        # non-integer
        pytest.param(0, 0, [(1.0, 2)], TypeError, "1.0", id="float-coord"),
        pytest.param(0, 0, [("1", 2)], TypeError, "'1'", id="str-coord"),
        pytest.param(0, 0, [(True, 0)], TypeError, "True", id="bool-coord"),
        pytest.param(0, 0, [(1, 1), (2, np.True_)], TypeError, "True", id="numpy-bool-coord"),
        pytest.param(0, 0, [(1, None)], TypeError, "None", id="none-coord"),
        pytest.param(0, 0, [5], TypeError, "5", id="coord-not-a-tuple"),
        pytest.param(0, 0, (1, 1), TypeError, "1", id="single-tuple"),
        pytest.param(0, 0, 5, TypeError, "5", id="coords-an-int"),
        pytest.param(0, 0, "11", TypeError, "'11'", id="coords-a-string"),
        pytest.param(0, 0, None, TypeError, "None", id="coords-none"),
        pytest.param(0, 0, np.array([[1.0, 1.0]]), TypeError, "float64", id="float-array"),
        # dense masks of the wrong shape or dtype
        pytest.param(
            0, 0, np.zeros((3, 4), dtype=bool), ValueError, "(3, 4)", id="mask-wrong-shape"
        ),
        pytest.param(
            0, 0, np.zeros((4, 4, 1), dtype=bool), ValueError, "(4, 4, 1)", id="mask-wrong-ndim"
        ),
        pytest.param(
            1, 0, np.zeros((4, 4), dtype=bool), ValueError, "(4, 4)", id="mask-of-other-stack"
        ),
        pytest.param(
            0, 0, np.zeros((4, 4), dtype=np.float64), TypeError, "float64", id="mask-float"
        ),
        # unknown (data_idx, sample_idx)
        pytest.param(2, 0, [(0, 0)], IndexError, "data_idx 2", id="data-idx-too-large"),
        pytest.param(-1, 0, [(0, 0)], IndexError, "-1", id="data-idx-negative"),
        pytest.param(0, 2, [(0, 0)], IndexError, "sample_idx 2", id="sample-idx-too-large"),
        pytest.param(1, 1, [(0, 0)], IndexError, "sample_idx 1", id="sample-idx-of-other-stack"),
        pytest.param(0, -1, [(0, 0)], IndexError, "-1", id="sample-idx-negative"),
        pytest.param(0.0, 0, [(0, 0)], TypeError, "0.0", id="data-idx-float"),
        pytest.param("0", 0, [(0, 0)], TypeError, "'0'", id="data-idx-str"),
        pytest.param(0, 1.0, [(0, 0)], TypeError, "1.0", id="sample-idx-float"),
        pytest.param(True, 0, [(0, 0)], TypeError, "True", id="data-idx-bool"),
        pytest.param(None, 0, [(0, 0)], TypeError, "None", id="data-idx-none"),
    ],
)
def test_exclude_patches_rejects_bad_input_and_changes_nothing(
    data_idx, sample_idx, grid_coords, error, offending
):
    check_rejected(
        lambda sampler: sampler.exclude_patches(data_idx, sample_idx, grid_coords),
        error,
        offending,
    )


def test_exclude_patches_checks_every_coordinate_before_excluding_any():
    # The first coordinates are fine; the last one is not: none may be applied.
    check_rejected(
        lambda sampler: sampler.exclude_patches(0, 1, [(0, 0), (1, 2), (2, 9)]),
        ValueError,
        "(2, 9)",
    )


# -- set_region_probs ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data_idx", "sample_idx", "probs", "error", "offending"),
    [
        # probability values
        pytest.param(0, 0, {(0, 0): -0.5}, ValueError, "-0.5", id="negative"),
        pytest.param(0, 0, {(0, 0): -1}, ValueError, "-1", id="negative-int"),
        pytest.param(0, 0, {(1, 1): 0.5, (0, 0): math.nan}, ValueError, "nan", id="nan"),
        pytest.param(0, 0, {(0, 0): math.inf}, ValueError, "inf", id="inf"),
        pytest.param(0, 0, {(0, 0): -math.inf}, ValueError, "-inf", id="minus-inf"),
        pytest.param(0, 0, {(0, 0): TOO_LARGE}, ValueError, str(TOO_LARGE), id="too-large"),
        pytest.param(
            0, 0, {(0, 0): JUST_TOO_LARGE}, ValueError, str(JUST_TOO_LARGE), id="just-too-large"
        ),
        pytest.param(0, 0, {(0, 0): "0.5"}, TypeError, "'0.5'", id="str-value"),
        pytest.param(0, 0, {(0, 0): None}, TypeError, "None", id="none-value"),
        pytest.param(0, 0, {(0, 0): True}, TypeError, "True", id="bool-value"),
        pytest.param(0, 0, {(0, 0): 1j}, TypeError, "1j", id="complex-value"),
        # keys
        pytest.param(0, 0, {(4, 0): 0.5}, ValueError, "(4, 0)", id="key-outside"),
        pytest.param(0, 0, {(0, -1): 0.5}, ValueError, "(0, -1)", id="key-negative"),
        pytest.param(1, 0, {(0, 5): 0.5}, ValueError, "(0, 5)", id="key-outside-second-stack"),
        pytest.param(0, 0, {(0,): 0.5}, ValueError, "(0,)", id="key-too-short"),
        pytest.param(0, 0, {(0, 0, 0): 0.5}, ValueError, "(0, 0, 0)", id="key-too-long"),
        pytest.param(0, 0, {(0.5, 0): 0.5}, TypeError, "0.5", id="key-float"),
        pytest.param(0, 0, {3: 0.5}, TypeError, "3", id="key-int"),
        pytest.param(0, 0, {"ab": 0.5}, TypeError, "'ab'", id="key-str"),
        pytest.param(0, 0, {(True, 0): 0.5}, TypeError, "True", id="key-bool"),
        # not a mapping
        pytest.param(0, 0, [((0, 0), 0.5)], TypeError, "list", id="list-of-pairs"),
        pytest.param(0, 0, 0.5, TypeError, "float", id="scalar"),
        pytest.param(0, 0, None, TypeError, "NoneType", id="none"),
        # dense arrays of the wrong shape or dtype
        pytest.param(0, 0, np.ones((3, 4)), ValueError, "(3, 4)", id="array-wrong-shape"),
        pytest.param(0, 0, np.ones(16), ValueError, "(16,)", id="array-flat"),
        pytest.param(1, 0, np.ones((4, 4)), ValueError, "(4, 4)", id="array-of-other-stack"),
        pytest.param(0, 0, np.ones((4, 4), dtype=bool), TypeError, "bool", id="array-bool"),
        pytest.param(
            0, 0, np.ones((4, 4), dtype=complex), TypeError, "complex128", id="array-complex"
        ),
        pytest.param(0, 0, np.full((4, 4), "a"), TypeError, "<U1", id="array-str"),
        pytest.param(0, 0, np.full((4, 4), -1.0), ValueError, "-1.0", id="array-negative"),
        pytest.param(0, 0, np.full((4, 4), np.nan), ValueError, "nan", id="array-nan"),
        pytest.param(0, 0, np.full((4, 4), np.inf), ValueError, "inf", id="array-inf"),
        # unknown (data_idx, sample_idx)
        pytest.param(2, 0, {(0, 0): 0.5}, IndexError, "data_idx 2", id="data-idx-too-large"),
        pytest.param(0, 2, {(0, 0): 0.5}, IndexError, "sample_idx 2", id="sample-idx-too-large"),
        pytest.param(0, -1, {(0, 0): 0.5}, IndexError, "-1", id="sample-idx-negative"),
        pytest.param(0.0, 0, {(0, 0): 0.5}, TypeError, "0.0", id="data-idx-float"),
        pytest.param(0, "1", {(0, 0): 0.5}, TypeError, "'1'", id="sample-idx-str"),
    ],
)
def test_set_region_probs_rejects_bad_input_and_changes_nothing(
    data_idx, sample_idx, probs, error, offending
):
    check_rejected(
        lambda sampler: sampler.set_region_probs(data_idx, sample_idx, probs),
        error,
        offending,
    )


def test_set_region_probs_checks_every_value_before_setting_any():
    check_rejected(
        lambda sampler: sampler.set_region_probs(0, 1, {(0, 0): 0.0, (1, 1): 2.0, (2, 2): -3.0}),
        ValueError,
        "-3.0",
    )


def _cube_with_at_least(corners: int, patch: int) -> tuple[int, int, int]:
    """A cubic 3D spatial shape with at least ``corners`` valid patch corners."""
    side = round(corners ** (1 / 3)) + 2
    return (side + patch - 1,) * 3


@pytest.mark.parametrize(
    "times_the_limit",
    [
        pytest.param(1, id="just-beyond-2**62"),
        # Beyond 2**63: an int64 sum of the region masses would wrap negative.
        pytest.param(3, id="beyond-int64"),
    ],
)
def test_probabilities_whose_total_mass_exceeds_the_exact_range_are_rejected(times_the_limit):
    # At the largest probability every corner weighs q units of mass; give one
    # sample enough corners that its mass leaves the exact range.
    q = round(grid.MAX_PROBABILITY * grid.PROB_ONE)
    patch = (128, 128, 128)
    spatial = _cube_with_at_least(times_the_limit * tables.MAX_TOTAL_MASS // q + 1, 128)
    cells = tuple((d + 1) // p for d, p in zip(spatial, patch, strict=True))
    sampler = numpy_sampler([(1, 1, *spatial)], patch, seed=5)
    twin = numpy_sampler([(1, 1, *spatial)], patch, seed=5)
    with pytest.raises(ValueError, match="too large"):
        sampler.set_region_probs(0, 0, np.full(cells, grid.MAX_PROBABILITY))
    assert_same_large_behaviour(sampler, twin)


def test_probabilities_whose_mass_summed_over_samples_exceeds_the_exact_range_are_rejected():
    # Each of two samples stays below 2**62 on its own; together they do not.
    q = round(grid.MAX_PROBABILITY * grid.PROB_ONE)
    patch = (128, 128, 128)
    spatial = _cube_with_at_least(tables.MAX_TOTAL_MASS // q * 3 // 5, 128)
    cells = tuple((d + 1) // p for d, p in zip(spatial, patch, strict=True))
    sampler = numpy_sampler([(2, 1, *spatial)], patch, seed=6)
    twin = numpy_sampler([(2, 1, *spatial)], patch, seed=6)
    for accepted in (sampler, twin):
        accepted.set_region_probs(0, 0, np.full(cells, grid.MAX_PROBABILITY))
    with pytest.raises(ValueError, match="too large"):
        sampler.set_region_probs(0, 1, np.full(cells, grid.MAX_PROBABILITY))
    assert_same_large_behaviour(sampler, twin)


def assert_same_large_behaviour(sampler: StratifiedPatching, twin: StratifiedPatching) -> None:
    # p > 1 oversamples: these samplers have millions of patches, so compare
    # one epoch (every table takes part in it) rather than every index.
    assert sampler.n_patches == twin.n_patches > 0
    ours, theirs = sampler.sample_epoch(1), twin.sample_epoch(1)
    np.testing.assert_array_equal(ours.coords, theirs.coords)
    np.testing.assert_array_equal(ours.sample_idx, theirs.sample_idx)


def test_largest_probability_is_accepted():
    sampler = numpy_sampler(SHAPES, PATCH)
    sampler.set_region_probs(0, 0, {(1, 1): grid.MAX_PROBABILITY})
    assert sampler.n_patches > numpy_sampler(SHAPES, PATCH).n_patches


# -- get_patch_spec, sample_epoch, set_epoch, get_patch_indices ------------------------


def test_get_patch_spec_rejects_negative_index_and_changes_nothing():
    check_rejected(lambda sampler: sampler.get_patch_spec(-1), IndexError, "-1")


def test_get_patch_spec_rejects_index_at_n_patches_and_changes_nothing():
    sampler, _ = make_twins()
    n_patches = sampler.n_patches
    check_rejected(lambda s: s.get_patch_spec(n_patches), IndexError, f"index {n_patches}")
    check_rejected(lambda s: s.get_patch_spec(n_patches + 1000), IndexError, str(n_patches + 1000))
    check_rejected(lambda s: s.get_patch_spec(np.int64(n_patches)), IndexError, str(n_patches))


@pytest.mark.parametrize(
    ("index", "offending"),
    [(1.0, "1.0"), (np.float64(2.0), "2.0"), ("3", "'3'"), (True, "True"), (None, "None")],
)
def test_get_patch_spec_rejects_non_integer_index_and_changes_nothing(index, offending):
    check_rejected(lambda sampler: sampler.get_patch_spec(index), TypeError, offending)


def test_get_patch_spec_on_an_empty_sampler_raises_index_error():
    sampler = numpy_sampler([(1, 1, 8, 8)], (4, 4))
    sampler.exclude_patches(0, 0, [(0, 0), (0, 1), (1, 0), (1, 1)])
    assert sampler.n_patches == 0
    with pytest.raises(IndexError, match="index 0"):
        sampler.get_patch_spec(0)


@pytest.mark.parametrize("method", ["sample_epoch", "set_epoch"])
@pytest.mark.parametrize(
    ("epoch", "error", "offending"),
    [
        (-1, ValueError, "-1"),
        (1 << 32, ValueError, str(1 << 32)),
        (1 << 70, ValueError, str(1 << 70)),
        (1.0, TypeError, "1.0"),
        ("2", TypeError, "'2'"),
        (True, TypeError, "True"),
        (None, TypeError, "None"),
    ],
)
def test_bad_epochs_are_rejected_and_change_nothing(method, epoch, error, offending):
    check_rejected(lambda sampler: getattr(sampler, method)(epoch), error, offending)


def test_largest_epoch_is_accepted():
    sampler = numpy_sampler(SHAPES, PATCH)
    sampler.set_epoch((1 << 32) - 1)
    assert sampler.epoch == (1 << 32) - 1
    last = sampler.sample_epoch((1 << 32) - 1)
    assert sampler.get_patch_spec(0) == last.spec(0)


@pytest.mark.parametrize(
    ("data_idx", "error", "offending"),
    [
        (2, IndexError, "data_idx 2"),
        (-1, IndexError, "-1"),
        (0.0, TypeError, "0.0"),
        ("0", TypeError, "'0'"),
        (True, TypeError, "True"),
    ],
)
def test_get_patch_indices_rejects_bad_data_idx_and_changes_nothing(data_idx, error, offending):
    check_rejected(lambda sampler: sampler.get_patch_indices(data_idx), error, offending)


# -- exceptions outside the contract (OverflowError, NotImplementedError, ...) ---------


@pytest.mark.parametrize(
    ("call", "error", "offending"),
    [
        pytest.param(
            lambda s: s.set_region_probs(0, 0, {(0, 0): 10**400}),
            ValueError,
            str(10**400),
            id="probability-too-large-for-a-float",
        ),
        pytest.param(
            lambda s: s.sample_epoch(0, rank=2**63 + 1, world_size=2),
            ValueError,
            str(2**63 + 1),
            id="rank-2**63+1",
        ),
        pytest.param(
            lambda s: s.sample_epoch(0, rank=2**63 + 1, world_size=2**64),
            ValueError,
            str(2**64),
            id="world-size-2**64",
        ),
        pytest.param(
            lambda s: s.epoch_indices(0, shuffle=True, rank=2**62, world_size=2**63 - 1),
            ValueError,
            str(2**63 - 1),
            id="world-size-2**63-1",
        ),
        pytest.param(
            lambda s: s.exclude_patches(0, 0, np.array([[2**64 - 1, 0]], dtype=np.uint64)),
            ValueError,
            f"({2**64 - 1}, 0)",
            id="uint64-coordinate-as-given",
        ),
        pytest.param(
            lambda s: s.exclude_patches(0, 0, memoryview(np.array([[1.5, 0.0]]))),
            TypeError,
            "float64",
            id="memoryview-of-floats",
        ),
        pytest.param(
            lambda s: s.exclude_patches(0, 0, memoryview(np.array([[1, 2, 3]]))),
            ValueError,
            "(1, 3)",
            id="memoryview-of-the-wrong-shape",
        ),
        pytest.param(
            lambda s: s.set_region_probs(0, 0, {(0, 0): np.array([0.5, 0.5])}),
            TypeError,
            "array([0.5, 0.5])",
            id="probability-array-in-a-dict",
        ),
    ],
)
def test_hostile_values_raise_contract_errors_naming_the_value_as_given(call, error, offending):
    check_rejected(call, error, offending)


def test_a_memoryview_of_coordinates_excludes_like_the_coordinates():
    sampler, twin = make_twins()
    coords = np.array([[2, 3], [0, 1]], dtype=np.int64)
    sampler.exclude_patches(1, 0, memoryview(coords))
    twin.exclude_patches(1, 0, [(2, 3), (0, 1)])
    assert_same_behaviour(sampler, twin)


# -- array types: NumPy integers, 0-d arrays and tensors, other array-likes --------------


class OnlyArrayProtocol:
    """An array-like that offers nothing but ``__array__`` (as many libraries do)."""

    def __init__(self, values: np.ndarray) -> None:
        self._values = values

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        return np.asarray(self._values, dtype=dtype)


class OnlyDLPack:
    """An array-like that offers nothing but DLPack."""

    def __init__(self, values: np.ndarray) -> None:
        self._values = values

    def __dlpack__(self, **kwargs: Any) -> Any:
        return self._values.__dlpack__(**kwargs)

    def __dlpack_device__(self) -> Any:
        return self._values.__dlpack_device__()


class BrokenArray:
    """Claims the array protocol but cannot deliver."""

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        raise RuntimeError("device lost")


@pytest.mark.parametrize(
    "wrap", [np.asarray, OnlyArrayProtocol, OnlyDLPack], ids=lambda w: w.__name__
)
def test_array_likes_are_read_through_their_protocols(wrap):
    sampler, twin = make_twins()
    coords = np.array([[2, 3], [0, 1]], dtype=np.int64)
    mask = np.zeros((3, 5), dtype=bool)
    mask[1, 4] = True
    probs = np.linspace(0.0, 2.0, 16).reshape(4, 4)
    sampler.exclude_patches(1, 0, wrap(coords))
    sampler.exclude_patches(1, 0, wrap(mask))
    sampler.set_region_probs(0, 1, wrap(probs))
    twin.exclude_patches(1, 0, [(2, 3), (0, 1), (1, 4)])
    twin.set_region_probs(0, 1, probs)
    assert_same_behaviour(sampler, twin)


def test_an_array_like_that_cannot_be_read_is_a_type_error_naming_its_type():
    check_rejected(lambda s: s.exclude_patches(0, 0, BrokenArray()), TypeError, "BrokenArray")
    check_rejected(lambda s: s.set_region_probs(0, 0, BrokenArray()), TypeError, "BrokenArray")


@pytest.mark.parametrize(
    "index", [np.int64(5), np.uint8(5), np.array(5), np.array(5, dtype=np.uint64)], ids=repr
)
def test_numpy_integers_and_0d_integer_arrays_are_indices(index):
    sampler, twin = make_twins()
    assert sampler.get_patch_spec(index) == twin.get_patch_spec(5)
    assert_same_behaviour(sampler, twin)


@pytest.mark.parametrize(
    ("index", "offending"),
    [
        (np.array([5]), "array([5])"),
        (np.array(5.0), "array(5.)"),
        (np.array(True), "array(True)"),
        (np.bool_(True), "True"),
    ],
    ids=repr,
)
def test_arrays_that_are_not_one_integer_are_not_indices(index, offending):
    check_rejected(lambda s: s.get_patch_spec(index), TypeError, offending)


def test_torch_tensors_are_taken_wherever_numpy_arrays_are():
    torch = pytest.importorskip("torch")
    sampler, twin = make_twins()
    mask = torch.zeros((3, 5), dtype=torch.bool)
    mask[2, 0] = True
    sampler.exclude_patches(torch.tensor(1), torch.tensor(0), torch.tensor([[2, 3], [0, 1]]))
    sampler.exclude_patches(1, 0, mask)
    sampler.set_region_probs(0, 1, torch.linspace(0.0, 2.0, 16).reshape(4, 4))
    sampler.set_region_probs(0, 0, {(torch.tensor(1), 2): torch.tensor(0.25)})
    twin.exclude_patches(1, 0, [(2, 3), (0, 1), (2, 0)])
    twin.set_region_probs(0, 1, torch.linspace(0.0, 2.0, 16).reshape(4, 4).numpy())
    twin.set_region_probs(0, 0, {(1, 2): 0.25})
    assert sampler.get_patch_spec(torch.tensor(7)) == twin.get_patch_spec(7)
    sampler.set_epoch(torch.tensor(4))
    twin.set_epoch(4)
    assert_same_behaviour(sampler, twin)


@pytest.mark.parametrize(
    ("make", "error", "offending"),
    [
        (lambda torch: torch.tensor(1.0), TypeError, "tensor(1.)"),
        (lambda torch: torch.tensor([1]), TypeError, "tensor([1])"),
        (lambda torch: torch.tensor(True), TypeError, "tensor(True)"),
    ],
)
def test_tensors_that_are_not_one_integer_are_not_indices(make, error, offending):
    torch = pytest.importorskip("torch")
    check_rejected(lambda s: s.get_patch_spec(make(torch)), error, offending)


def test_torch_masks_and_coordinates_of_the_wrong_kind_name_argument_and_expectation():
    torch = pytest.importorskip("torch")
    check_rejected(
        lambda s: s.exclude_patches(0, 0, torch.zeros((4, 3), dtype=torch.bool)),
        ValueError,
        "grid_coords has shape (4, 3), but the sample's grid has shape (4, 4)",
    )
    check_rejected(
        lambda s: s.exclude_patches(0, 0, torch.tensor([[1.0, 1.0]])),
        TypeError,
        "grid_coords must hold integers, got dtype float32",
    )


# -- PatchBatch rows -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("row", "offending"), [(1.0, "1.0"), (True, "True"), ("1", "'1'"), (None, "None")]
)
def test_patch_batch_spec_names_the_row_and_what_is_expected(row, offending):
    batch = numpy_sampler(SHAPES, PATCH).sample_epoch(0)
    with pytest.raises(TypeError, match=f"row must be an integer, got {escaped(offending)}"):
        batch.spec(row)


def test_patch_batch_spec_takes_numpy_and_0d_integers_and_names_a_row_out_of_range():
    batch = numpy_sampler(SHAPES, PATCH).sample_epoch(0)
    assert batch.spec(np.int64(3)) == batch.spec(np.array(3)) == batch.spec(3)
    with pytest.raises(IndexError, match=f"row {2**64} is out of range"):
        batch.spec(2**64)


@pytest.mark.parametrize(
    ("rows", "offending"),
    [(1.0, "1.0"), ("a", "'a'"), ([1.5], "[1.5]"), (np.array(2), "array(2)")],
)
def test_patch_batch_rows_of_the_wrong_type_name_it(rows, offending):
    batch = numpy_sampler(SHAPES, PATCH).sample_epoch(0)
    with pytest.raises(TypeError, match=escaped(offending)):
        batch[rows]


# -- one helper per rule -----------------------------------------------------------------


def test_one_rank_and_world_size_rule_for_every_entry_point():
    from gpu_patching import _validation as check

    assert check.check_rank_world_size(3, 2**32) == (3, 2**32)
    assert check.check_rank_world_size(np.int64(0), np.array(1)) == (0, 1)
    with pytest.raises(
        ValueError, match=f"world_size must be >= 1 and at most 2\\*\\*32, got {2**32 + 1}"
    ):
        check.check_rank_world_size(0, 2**32 + 1)
    with pytest.raises(ValueError, match="num_replicas"):
        check.check_rank_world_size(5, 5, world_size_name="num_replicas")
    assert check.check_epoch(np.uint32(2**32 - 1)) == 2**32 - 1
    with pytest.raises(ValueError, match=r"draw_number must be in \[0, 2\*\*32\), got -1"):
        check.check_epoch(-1, "draw_number")


def test_the_constructor_takes_shapes_and_seeds_as_tensors():
    torch = pytest.importorskip("torch")
    sampler = StratifiedPatching(
        torch.tensor([[2, 1, 16, 16]]), torch.tensor([4, 4]), torch.tensor(9), backend="numpy"
    )
    twin = numpy_sampler([(2, 1, 16, 16)], (4, 4), seed=9)
    assert sampler.data_shapes == twin.data_shapes and sampler.patch_size == twin.patch_size
    np.testing.assert_array_equal(sampler.sample_epoch(2).coords, twin.sample_epoch(2).coords)
    with pytest.raises(TypeError, match=escaped("tensor([[4, 4]])")):
        StratifiedPatching([(1, 1, 16, 16)], torch.tensor([[4, 4]]), backend="numpy")
