"""Policies that change a sampler (``gpu_patching.policies``) and the per-sample counts they read."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import numpy_sampler

from gpu_patching import StratifiedPatching

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
