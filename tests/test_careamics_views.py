"""The per-sample views CAREamics' helpers read: ``image_patching`` and the cumulative counts.

``create_val_split`` reads ``image_patching[data_idx][sample_idx].n_patches``,
CAREamics' tests read ``.grid_shape`` there, and CAREamics' class also has
``cumulative_image_patches``, ``cumulative_sample_patches`` and
``cumulative_image_samples``. Ours are read-only views over the tables: right
after every update, equal to the reference's after the same calls, and
impossible to change. (CAREamics' helpers themselves run on ours in
``tests/test_careamics_tier.py``, which needs CAREamics' dependencies.)
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from conftest import all_cells

from gpu_patching import StratifiedPatching
from gpu_patching.views import SamplePatchingView

SHAPES = [(2, 1, 70, 90), (1, 3, 40, 41), (3, 1, 33, 64)]
PATCH = (8, 16)


def build(seed: int = 1) -> StratifiedPatching:
    return StratifiedPatching(SHAPES, PATCH, seed=seed, backend="numpy")


def expected_cumulative(sampler: StratifiedPatching) -> tuple[list[int], list[int], list[int]]:
    """The three arrays from the per-sample counts, as plain lists."""
    per_sample = sampler.n_patches_per_sample.tolist()
    per_stack_samples = [shape[0] for shape in sampler.data_shapes]
    bounds = np.cumsum(per_stack_samples).tolist()
    per_stack = [sum(per_sample[b - n : b]) for b, n in zip(bounds, per_stack_samples, strict=True)]
    return np.cumsum(per_stack).tolist(), np.cumsum(per_sample).tolist(), bounds


def assert_views_match(sampler: StratifiedPatching) -> None:
    images, samples, image_samples = expected_cumulative(sampler)
    assert sampler.cumulative_image_patches.tolist() == images
    assert sampler.cumulative_sample_patches.tolist() == samples
    assert sampler.cumulative_image_samples.tolist() == image_samples
    flat = [view for stack in sampler.image_patching for view in stack]
    assert [view.n_patches for view in flat] == sampler.n_patches_per_sample.tolist()
    for view in flat:
        grid = sampler.get_excluded_cells(view.data_idx, view.sample_idx).shape
        assert view.grid_shape == grid


def test_image_patching_has_one_view_per_sample_in_order():
    sampler = build()
    views = sampler.image_patching
    assert len(views) == 3 and [len(stack) for stack in views] == [2, 1, 3]
    for data_idx, stack in enumerate(views):
        for sample_idx, view in enumerate(stack):
            assert isinstance(view, SamplePatchingView)
            assert (view.data_idx, view.sample_idx) == (data_idx, sample_idx)
            assert view.shape == SHAPES[data_idx][2:] and view.patch_size == PATCH
    assert_views_match(sampler)
    assert sampler.cumulative_image_patches[-1] == sampler.n_patches
    assert sampler.cumulative_image_patches.dtype == np.int64


def test_views_index_like_lists():
    views = build().image_patching
    assert views[-1][-1].data_idx == 2 and views[-1][-1].sample_idx == 2
    assert [stack[0].data_idx for stack in views[1:]] == [1, 2]
    assert [view.sample_idx for view in views[2][::2]] == [0, 2]
    assert [v.sample_idx for v in views[0]] == [0, 1]
    with pytest.raises(IndexError, match="data_idx 3"):
        views[3]
    with pytest.raises(IndexError, match="sample_idx -4"):
        views[2][-4]
    with pytest.raises(TypeError, match=r"1\.0"):
        views[1.0]


def test_views_taken_before_an_update_answer_after_it():
    sampler = build()
    views = sampler.image_patching
    held = views[0][1]
    before = held.n_patches
    old_cumulative = sampler.cumulative_sample_patches
    sampler.exclude_patches(0, 1, [(0, 0), (3, 2)])
    assert held.n_patches == before - 2 == views[0][1].n_patches
    assert_views_match(sampler)
    # An array is the caller's copy: it keeps the counts of its time.
    assert old_cumulative[1] - old_cumulative[0] == before


@pytest.mark.parametrize("seed", [3, 4, 5])
def test_views_stay_consistent_after_random_updates_and_state_loads(seed):
    generator = np.random.default_rng(seed)
    sampler = build(seed)
    for _ in range(6):
        data_idx = int(generator.integers(len(SHAPES)))
        sample_idx = int(generator.integers(SHAPES[data_idx][0]))
        cells = all_cells(SHAPES[data_idx][2:], PATCH)
        picks = [cells[k] for k in generator.choice(len(cells), size=3, replace=False)]
        if generator.random() < 0.5:
            sampler.exclude_patches(data_idx, sample_idx, picks)
        else:
            probs = dict(zip(picks, generator.choice([0.0, 0.25, 2.0], size=3), strict=True))
            sampler.set_region_probs(data_idx, sample_idx, probs)
        assert_views_match(sampler)
    fresh = build(seed)
    views = fresh.image_patching
    fresh.load_state_dict(sampler.state_dict())
    assert [v.n_patches for stack in views for v in stack] == [
        v.n_patches for stack in sampler.image_patching for v in stack
    ]
    assert_views_match(fresh)


def test_views_cannot_be_changed():
    sampler = build()
    view = sampler.image_patching[0][0]
    with pytest.raises(AttributeError):
        view.n_patches = 3  # type: ignore[misc]
    with pytest.raises(AttributeError):
        view.extra = 1  # type: ignore[attr-defined]
    with pytest.raises(TypeError):
        sampler.image_patching[0][0] = view  # type: ignore[index]
    with pytest.raises(AttributeError):
        sampler.cumulative_image_patches = np.zeros(3)  # type: ignore[misc]
    for name in (
        "cumulative_image_patches",
        "cumulative_sample_patches",
        "cumulative_image_samples",
    ):
        values = getattr(sampler, name)
        with pytest.raises(ValueError, match="read-only"):
            values[0] = 99
    assert_views_match(sampler)


def test_views_equal_the_reference_after_the_same_exclusions(reference):
    ours = build(seed=9)
    theirs = reference(SHAPES, PATCH, seed=9)
    generator = np.random.default_rng(9)
    for data_idx, shape in enumerate(SHAPES):
        for sample_idx in range(shape[0]):
            cells = all_cells(shape[2:], PATCH)
            picks = [cells[k] for k in generator.choice(len(cells), size=4, replace=False)]
            ours.exclude_patches(data_idx, sample_idx, picks)
            theirs.exclude_patches(data_idx, sample_idx, picks)
    for name in (
        "cumulative_image_patches",
        "cumulative_sample_patches",
        "cumulative_image_samples",
    ):
        np.testing.assert_array_equal(getattr(ours, name), getattr(theirs, name), err_msg=name)
    for ours_stack, theirs_stack in itertools.zip_longest(
        ours.image_patching, theirs.image_patching
    ):
        assert [v.n_patches for v in ours_stack] == [s.n_patches for s in theirs_stack]
        assert [v.grid_shape for v in ours_stack] == [tuple(s.grid_shape) for s in theirs_stack]
