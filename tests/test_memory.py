"""Memory: what the NumPy backend keeps per region, and its peak in a fresh process."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from gpu_patching import StratifiedPatching
from gpu_patching.backends import host_tables, numpy_backend

#: The target of the README's memory table is 100 bytes per region; the test
#: allows some slack for the allocator, and still fails for the ~300 bytes per
#: region the backend used to take.
_PEAK_BYTES_PER_REGION = 125

_PEAK_SCRIPT = textwrap.dedent(
    """
    import json, sys

    def status(key):
        with open("/proc/self/status") as lines:
            for line in lines:
                if line.startswith(key):
                    return int(line.split()[1]) * 1024

    from gpu_patching import StratifiedPatching

    baseline = status("VmRSS:")
    shape, patch = json.loads(sys.argv[1])
    sampler = StratifiedPatching([shape], patch, seed=1, backend="numpy")
    sampler.exclude_patches(0, 0, [(1,) * len(patch), (7,) * len(patch)])
    sampler.set_region_probs(0, 0, {(3,) * len(patch): 0.5})
    epoch = sampler.sample_epoch(0)
    del epoch
    shuffled = sampler.sample_epoch(1, shuffle=True)
    del shuffled
    print(json.dumps({"peak": status("VmHWM:") - baseline}))
    """
)


def _regions(shape: tuple[int, ...], patch: tuple[int, ...]) -> int:
    return int(np.prod([(s + 1) // p for s, p in zip(shape[2:], patch, strict=True)]))


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux's /proc")
def test_peak_memory_of_a_million_regions_stays_near_100_bytes_per_region():
    # A fresh process (its peak is its own): construction, two updates, an
    # epoch and a shuffled epoch of 1M regions; the peak resident memory
    # over all of them, above the interpreter's after the imports.
    shape, patch = (1, 1, 16384, 16384), (16, 16)
    result = subprocess.run(
        [sys.executable, "-c", _PEAK_SCRIPT, json.dumps([shape, patch])],
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    )
    peak = json.loads(result.stdout.strip().splitlines()[-1])["peak"]
    per_region = peak / _regions(shape, patch)
    assert per_region <= _PEAK_BYTES_PER_REGION, f"{per_region:.0f} bytes per region"


@pytest.mark.parametrize(
    ("shapes", "patch"),
    [
        pytest.param([(1, 1, 300, 260)], (8, 8), id="2d"),
        pytest.param([(3, 1, 40, 50, 60), (2, 2, 33, 20, 47)], (4, 5, 6), id="3d-stacks"),
    ],
)
def test_the_draw_index_keeps_at_most_4_bytes_per_region(shapes, patch):
    # One layout number per region; the layout tables are shared by every
    # region of a kind (interior or edge, sub-box mask), so they stay small.
    sampler = StratifiedPatching(shapes, patch, seed=2, backend="numpy")
    rng = np.random.default_rng(2)
    for data_idx, shape in enumerate(shapes):
        cells = sampler.get_excluded_cells(data_idx, 0).shape
        mask = rng.random(cells) < 0.1
        sampler.exclude_patches(data_idx, 0, mask)
        sampler.set_region_probs(data_idx, shape[0] - 1, rng.random(cells) * 2)
    sampler.sample_epoch(0)
    index = host_tables.box_index(sampler._tables)
    n_regions = len(sampler._tables.weight)
    assert index.layout.nbytes <= 4 * n_regions
    n_boxes = 1 << len(patch)
    assert len(index.layout_base) <= (1 << n_boxes) * 3 ** len(patch) * len(shapes)
    assert len(index.entry_start) == n_boxes * len(index.layout_base)


def test_the_mass_prefix_follows_every_update_and_checkpoint():
    # The tables keep only the exclusive prefix of the region masses; updates
    # write a sample's rows and move the samples after it. It must equal the
    # prefix of masses computed afresh, after any sequence of updates.
    shapes, patch = [(2, 1, 90, 70), (1, 1, 40, 300), (3, 1, 25, 31)], (6, 7)
    sampler = StratifiedPatching(shapes, patch, seed=3, backend="numpy")
    rng = np.random.default_rng(3)

    def assert_prefix_is_fresh(tables):
        masses = []
        for stack in range(tables.n_stacks):
            first, last = int(tables.first_sample[stack]), int(tables.first_sample[stack + 1])
            batch = (last - first, *tables.sample_grid(first))
            rows = slice(int(tables.region_offset[first]), int(tables.region_offset[last]))
            update = tables._compute(
                stack,
                tables.excluded[rows].reshape(batch),
                tables.probability[rows].reshape(batch),
                tables.set_order[rows].reshape(batch),
            )
            masses.append(update.mass)
        mass = np.concatenate(masses)
        np.testing.assert_array_equal(tables.mass_prefix, np.cumsum(mass) - mass)
        np.testing.assert_array_equal(tables.mass, mass)

    for step in range(12):
        data_idx = int(rng.integers(0, len(shapes)))
        sample_idx = int(rng.integers(0, shapes[data_idx][0]))
        cells = sampler.get_excluded_cells(data_idx, sample_idx).shape
        if step % 2:
            sampler.exclude_patches(data_idx, sample_idx, rng.random(cells) < 0.05)
        else:
            probs = np.where(rng.random(cells) < 0.3, rng.random(cells) * 3, 1.0)
            sampler.set_region_probs(data_idx, sample_idx, probs)
        assert_prefix_is_fresh(sampler._tables)
    restored = StratifiedPatching(shapes, patch, seed=0, backend="numpy")
    restored.load_state_dict(sampler.state_dict())
    assert_prefix_is_fresh(restored._tables)
    np.testing.assert_array_equal(restored.sample_epoch(4).coords, sampler.sample_epoch(4).coords)


@pytest.mark.parametrize("narrow_from", [0, 1 << 40], ids=["narrow-corners", "wide-corners"])
def test_shuffled_and_sharded_rows_are_the_plain_epochs_rows(monkeypatch, narrow_from):
    # Large shuffled or sharded draws keep the corners in index order in 32
    # bits, small ones in 64 bits; the rows are the plain epoch's either way,
    # names included (several stacks and samples).
    monkeypatch.setattr(numpy_backend, "NARROW_CORNERS", narrow_from)
    sampler = StratifiedPatching([(3, 1, 90, 70), (2, 2, 40, 300)], (6, 7), seed=6, backend="numpy")
    plain = sampler.sample_epoch(3)
    for rows in (
        sampler.sample_epoch(3, shuffle=True),
        sampler.sample_epoch(3, shuffle=True, rank=2, world_size=3),
        sampler.sample_epoch(3, rank=1, world_size=4, drop_last=True),
    ):
        np.testing.assert_array_equal(rows.coords, plain.coords[rows.indices])
        np.testing.assert_array_equal(rows.data_idx, plain.data_idx[rows.indices])
        np.testing.assert_array_equal(rows.sample_idx, plain.sample_idx[rows.indices])


def test_shuffled_epochs_with_coordinates_beyond_32_bits_keep_them_exact(monkeypatch):
    # Corners in index order are kept in 32 bits only when every axis is
    # shorter than 2**31, else in 64 bits (even for a draw large enough to
    # narrow them): rows must equal the plain epoch's.
    monkeypatch.setattr(numpy_backend, "NARROW_CORNERS", 0)
    # 16 cells of 2**28 along an axis of 2**32: strata cover the mass line
    # evenly, so the upper half of each sample's patches lies beyond 2**31.
    sampler = StratifiedPatching([(2, 1, 1 << 32, 5)], (1 << 28, 2), seed=4, backend="numpy")
    plain = sampler.sample_epoch(5)
    shuffled = sampler.sample_epoch(5, shuffle=True)
    assert int(plain.coords[:, 0].max()) >= 1 << 31
    np.testing.assert_array_equal(shuffled.coords, plain.coords[shuffled.indices])
    np.testing.assert_array_equal(shuffled.sample_idx, plain.sample_idx[shuffled.indices])


def test_layouts_built_in_small_slices_draw_the_same_epochs(monkeypatch):
    # Layout keys are made by slices of regions (whole samples, or parts of
    # one large sample) to bound the temporaries; the slicing must not
    # change a single draw.
    shapes, patch = [(3, 1, 60, 44), (1, 1, 90, 70)], (6, 5)

    def epochs() -> list[np.ndarray]:
        sampler = StratifiedPatching(shapes, patch, seed=5, backend="numpy")
        sampler.exclude_patches(0, 1, [(2, 2), (7, 3)])
        sampler.set_region_probs(1, 0, {(4, 4): 0.0, (5, 1): 3.5})
        return [sampler.sample_epoch(epoch).coords for epoch in range(3)]

    whole = epochs()
    monkeypatch.setattr(host_tables, "KEY_ROWS", 7)
    monkeypatch.setattr(host_tables, "KEPT_KEYS", 3)
    for mine, theirs in zip(epochs(), whole, strict=True):
        np.testing.assert_array_equal(mine, theirs)
