"""Patch counts equal CAREamics 0.3.5's exactly, after any sequence of updates.

The reference counts a sample's patches as
``ceil(prod(D / P) - (1 - p_1) - (1 - p_2) - ... - n_excluded)`` in float64,
subtracting one term per region whose probability was ever set, in the order
the regions were first set (its probabilities live in a dict). ``n_patches``
and the three ``cumulative_*`` arrays must equal the reference's after every
call, for every configuration the reference accepts (a call that makes the
reference raise ends that configuration). The one rule of our own is the
degenerate case, where the reference counts patches it cannot draw
(docs/design.md, "Patches per sample").
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from conftest import all_cells, numpy_sampler
from host_launch import HostBackend, HostKernels

from gpu_patching import StratifiedPatching

pytestmark = [
    pytest.mark.reference,
    # The reference's own bins divide by zero on the degenerate configurations
    # this file feeds it (its warnings, not ours: ours would still show). It is
    # loaded under gpu_patching.testing's alias, so that is its module name.
    pytest.mark.filterwarnings("ignore::RuntimeWarning:_gpu_patching_reference_patching"),
]

#: The probabilities the issue names; random floats come beside them.
NAMED_PROBABILITIES = (0.0, 0.1, 1 / 3, 0.7, 1.0, 1.5, 2.5)
N_CONFIGURATIONS = 2200


def reference_counts(theirs: Any) -> list[int]:
    """The reference's patches per sample, 0 where it counts patches it cannot draw.

    That is the degenerate case (every region with selectable corners has
    probability 0): the reference still counts patches, but its draw divides
    0 by 0. Our rule gives such a sample no patches (docs/design.md).
    """
    counts = []
    for image in theirs.image_patching:
        for sample in image:
            mass = sum(
                area * sample.relative_probs.get(idx, 1) for idx, area in sample.areas.items()
            )
            counts.append(sample.n_patches if mass > 0 else 0)
    return counts


def assert_same_counts(ours: StratifiedPatching, theirs: Any, where: str) -> None:
    expected = reference_counts(theirs)
    assert ours.n_patches_per_sample.tolist() == expected, where
    assert ours.n_patches == sum(expected), where
    per_image = [sum(expected[:end]) for end in np.asarray(theirs.cumulative_image_samples)]
    assert ours.cumulative_image_patches.tolist() == per_image, where
    assert ours.cumulative_sample_patches.tolist() == np.cumsum(expected).tolist(), where
    assert ours.cumulative_image_samples.tolist() == list(theirs.cumulative_image_samples), where
    if expected == [s.n_patches for image in theirs.image_patching for s in image]:
        # No degenerate sample: the reference's own arrays, as they are.
        assert ours.n_patches == theirs.n_patches, where
        for name in ("cumulative_image_patches", "cumulative_sample_patches"):
            mine, other = getattr(ours, name), np.asarray(getattr(theirs, name))
            assert mine.tolist() == other.tolist(), f"{where}: {name}"


def random_probability(generator: np.random.Generator) -> float:
    if generator.random() < 0.6:
        return float(NAMED_PROBABILITIES[int(generator.integers(len(NAMED_PROBABILITIES)))])
    return float(generator.uniform(0.0, 3.0))


def random_shapes(generator: np.random.Generator) -> tuple[list[tuple[int, ...]], tuple[int, ...]]:
    # Small grids (a few to a few dozen regions per sample): the reference
    # builds one Python object per region and bin-packs on every update.
    ndim = int(generator.choice([2, 3]))
    patch = tuple(int(p) for p in generator.integers(2, 6, size=ndim))
    cells_per_axis = 6 if ndim == 2 else 3
    shapes = []
    for _ in range(int(generator.integers(1, 3))):
        spatial = tuple(int(generator.integers(p, p * cells_per_axis + 2)) for p in patch)
        shapes.append((int(generator.integers(1, 3)), 1, *spatial))
    return shapes, patch


def random_call(
    generator: np.random.Generator, shapes: list[tuple[int, ...]], patch: tuple[int, ...]
) -> tuple[str, int, int, Any, Any]:
    """One call as ``(method, data_idx, sample_idx, our argument, the reference's argument)``."""
    data_idx = int(generator.integers(len(shapes)))
    sample_idx = int(generator.integers(shapes[data_idx][0]))
    cells = all_cells(shapes[data_idx][2:], patch)
    kind = generator.random()
    if kind < 0.25:
        count = int(generator.integers(1, max(2, len(cells) // 3 + 1)))
        chosen = generator.choice(len(cells), size=min(count, len(cells)), replace=False)
        excluded = [cells[int(k)] for k in chosen]
        return "exclude_patches", data_idx, sample_idx, excluded, excluded
    if kind < 0.75:
        # Some regions, in a random order (the order they enter the dict).
        count = int(generator.integers(1, len(cells) + 1))
        chosen = generator.choice(len(cells), size=count, replace=False)
        probs = {cells[int(k)]: random_probability(generator) for k in chosen}
        return "set_region_probs", data_idx, sample_idx, probs, probs
    # Every region at once; ours as the dense array half of the time (a dict
    # of every cell in row-major order, for the reference).
    shared = generator.random() < 0.5
    value = random_probability(generator)
    probs = {cell: value if shared else random_probability(generator) for cell in cells}
    if generator.random() < 0.5:
        grid = tuple((d + 1) // p for d, p in zip(shapes[data_idx][2:], patch, strict=True))
        dense = np.array([probs[cell] for cell in cells], dtype=np.float64).reshape(grid)
        return "set_region_probs", data_idx, sample_idx, dense, probs
    order = generator.permutation(len(cells))
    probs = {cells[int(k)]: probs[cells[int(k)]] for k in order}
    return "set_region_probs", data_idx, sample_idx, probs, probs


def test_n_patches_and_cumulative_counts_equal_the_reference_after_every_call(reference) -> None:
    generator = np.random.default_rng(19)
    accepted_calls = 0
    for configuration in range(N_CONFIGURATIONS):
        shapes, patch = random_shapes(generator)
        ours = numpy_sampler(shapes, patch, seed=configuration)
        theirs = reference(shapes, patch, seed=configuration)
        assert_same_counts(ours, theirs, f"configuration {configuration}, fresh")
        for step in range(int(generator.integers(1, 7))):
            method, data_idx, sample_idx, mine, other = random_call(generator, shapes, patch)
            try:
                getattr(theirs, method)(data_idx, sample_idx, other)
            except Exception:
                # A configuration the reference refuses; its state may be half
                # changed, so this configuration ends here.
                break
            getattr(ours, method)(data_idx, sample_idx, mine)
            accepted_calls += 1
            where = f"configuration {configuration} {shapes} {patch}, call {step}: {method}"
            assert_same_counts(ours, theirs, where)
    # The fuzz compared thousands of updated states, not just fresh samplers.
    assert accepted_calls > 3 * N_CONFIGURATIONS


def test_one_hundred_regions_at_probability_one_tenth_count_as_the_reference(reference) -> None:
    shapes, patch = [(1, 1, 100, 100)], (10, 10)
    probs = {cell: 0.1 for cell in all_cells((100, 100), patch)}
    assert len(probs) == 100
    ours, theirs = numpy_sampler(shapes, patch), reference(shapes, patch, seed=0)
    ours.set_region_probs(0, 0, probs)
    theirs.set_region_probs(0, 0, probs)
    # 100 - 100 * 0.9 is 10 in exact arithmetic, and so is the float64 fold;
    # the quantised probabilities (0.1 is 104858 / 2**20) would give 11.
    assert ours.n_patches == theirs.n_patches == 10


# The same eleven regions and probabilities, first set in two orders: the
# real count is an integer (62), and the float64 fold crosses 64 on the way,
# where its rounding depends on the order.
SAME_PROBS_IN_ONE_ORDER = {
    (0, 0): 0.1, (0, 1): 0.7, (0, 2): 0.7, (0, 3): 0.0, (0, 4): 0.0, (0, 5): 0.0,
    (0, 6): 0.1, (1, 0): 0.0, (1, 1): 0.0, (1, 2): 0.7, (1, 3): 0.7,
}  # fmt: skip
SAME_PROBS_IN_ANOTHER_ORDER = {
    (1, 0): 0.0, (1, 3): 0.7, (0, 5): 0.0, (0, 4): 0.0, (0, 0): 0.1, (0, 1): 0.7,
    (1, 1): 0.0, (0, 2): 0.7, (1, 2): 0.7, (0, 6): 0.1, (0, 3): 0.0,
}  # fmt: skip


@pytest.mark.parametrize(
    ("probs", "expected"),
    [(SAME_PROBS_IN_ONE_ORDER, 62), (SAME_PROBS_IN_ANOTHER_ORDER, 63)],
    ids=["one order", "another order"],
)
def test_the_count_subtracts_probabilities_in_the_order_regions_were_first_set(
    reference, probs: dict[tuple[int, int], float], expected: int
) -> None:
    assert probs == SAME_PROBS_IN_ONE_ORDER  # equal dicts: only the order differs
    shapes, patch = [(1, 1, 40, 28)], (4, 4)
    ours, theirs = numpy_sampler(shapes, patch), reference(shapes, patch, seed=0)
    ours.set_region_probs(0, 0, probs)
    theirs.set_region_probs(0, 0, probs)
    assert ours.n_patches == theirs.n_patches == expected
    # Setting a region again keeps its first place in the order.
    for sampler in (ours, theirs):
        sampler.set_region_probs(0, 0, {(0, 3): 0.5, (5, 5): 0.25})
        sampler.set_region_probs(0, 0, {(0, 3): 0.0})
    assert ours.n_patches == theirs.n_patches


def test_probabilities_set_on_excluded_regions_still_count(reference) -> None:
    shapes, patch = [(1, 1, 30, 30)], (5, 5)
    ours, theirs = numpy_sampler(shapes, patch), reference(shapes, patch, seed=0)
    for sampler in (ours, theirs):
        sampler.exclude_patches(0, 0, [(1, 1), (2, 2)])
        sampler.set_region_probs(0, 0, {(1, 1): 0.0, (2, 2): 0.5, (3, 3): 0.25})
    # 36 - (1 - 0) - (1 - 0.5) - (1 - 0.25) - 2 excluded = 31.75
    assert ours.n_patches == theirs.n_patches == 32


def test_a_count_that_rounds_to_zero_gives_no_patches_as_in_the_reference(reference) -> None:
    # (31 / 16)**2 = 3.75 minus 0.9 for the one region with corners and 1 for
    # each of the three empty ones: ceil(-0.146) is 0 although region (0, 0)
    # has mass, and the reference keeps the sample with 0 patches.
    shapes, patch = [(1, 1, 31, 31), (1, 1, 20, 20)], (16, 16)
    probs = {(0, 0): 0.1, (0, 1): 0.0, (1, 0): 0.0, (1, 1): 0.0}
    ours, theirs = numpy_sampler(shapes, patch), reference(shapes, patch, seed=0)
    ours.set_region_probs(0, 0, probs)
    theirs.set_region_probs(0, 0, probs)
    assert ours.n_patches_per_sample.tolist()[0] == theirs.image_patching[0][0].n_patches == 0
    assert_same_counts(ours, theirs, "a sample counted to zero")


def test_a_sample_whose_every_region_is_switched_off_has_no_patches(reference) -> None:
    # The degenerate case: (25 / 10)**2 = 6.25 minus 4 regions at p = 0
    # leaves the reference 3 patches (its count ignores which regions have
    # mass), none of which it can draw. Ours counts 0: nothing to draw.
    shapes, patch = [(1, 1, 25, 25), (1, 1, 20, 20)], (10, 10)
    off = {cell: 0.0 for cell in all_cells((25, 25), patch)}
    ours, theirs = numpy_sampler(shapes, patch), reference(shapes, patch, seed=0)
    ours.set_region_probs(0, 0, off)
    theirs.set_region_probs(0, 0, off)
    assert theirs.image_patching[0][0].n_patches == 3
    with pytest.raises((TypeError, ValueError)):
        theirs.get_patch_spec(0)
    assert ours.n_patches_per_sample.tolist() == [0, theirs.image_patching[1][0].n_patches]


@pytest.mark.parametrize("ndim", [2, 3])
def test_the_cuda_backend_counts_with_the_same_code_as_the_numpy_backend(
    host_kernels: HostKernels, ndim: int
) -> None:
    generator = np.random.default_rng(ndim)
    shape = (2, 1, 23, 17) if ndim == 2 else (2, 1, 9, 11, 7)
    patch = (3, 4) if ndim == 2 else (2, 3, 2)
    numpy_side = numpy_sampler([shape], patch, seed=3)
    cuda_side = StratifiedPatching([shape], patch, seed=3, backend="numpy")
    cuda_side._backend = HostBackend(host_kernels)  # the CUDA launch path, on the host
    cells = all_cells(shape[2:], patch)
    for _ in range(20):
        chosen = generator.choice(len(cells), size=len(cells) // 2, replace=False)
        probs = {cells[int(k)]: random_probability(generator) for k in chosen}
        for sampler in (numpy_side, cuda_side):
            sampler.set_region_probs(0, 1, probs)
        assert cuda_side.n_patches_per_sample.tolist() == numpy_side.n_patches_per_sample.tolist()
        batch = cuda_side.sample_epoch(0).to_numpy()
        assert len(batch) == numpy_side.n_patches


def test_set_region_order_survives_a_state_dict_round_trip() -> None:
    shapes, patch = [(1, 1, 40, 40)], (4, 4)
    sampler = numpy_sampler(shapes, patch, seed=5)
    sampler.set_region_probs(0, 0, {(0, 3): 0.1, (0, 2): 0.7, (0, 1): 0.1, (0, 0): 0.1})
    sampler.set_region_probs(0, 0, {(0, 0): 0.2, (0, 4): 0.7, (0, 1): 0.1})
    restored = numpy_sampler(shapes, patch, seed=0)
    restored.load_state_dict(sampler.state_dict())
    for extra in ({(5, 5): 1 / 3}, {(6, 6): 0.1, (5, 5): 0.7}):
        sampler.set_region_probs(0, 0, extra)
        restored.set_region_probs(0, 0, extra)
        assert restored.n_patches == sampler.n_patches
