"""Per-index call counters and the per-index draw paths.

The ``k``-th call of ``get_patch_spec(i)`` (counting from the last
``set_epoch``) is row ``i`` of ``sample_epoch(base + k)``, whatever the order
of the calls: sequential, shuffled, with replacement, weighted, one index over
and over. Every path that serves a call (the cache of upcoming patches, its
vectorised refills, the one-patch draw, long windows for repeating indices) is
checked against epoch rows, and the counters' sharing and copying rules are
checked too.
"""

from __future__ import annotations

import copy
import dataclasses
import pickle
from collections import Counter
from typing import Any

import numpy as np
import pytest

import gpu_patching._counters as counters_module
from gpu_patching import StratifiedPatching, _state
from gpu_patching._counters import CallCounters
from gpu_patching.backends.host_tables import HostTables
from gpu_patching.backends.numpy_backend import draw_rows


def _sampler_2d() -> StratifiedPatching:
    """Two stacks of several samples, exclusions, probabilities, an empty sample."""
    sampler = StratifiedPatching(
        [(2, 1, 150, 100), (3, 1, 60, 170)], (16, 16), seed=2**64 - 12345, backend="numpy"
    )
    sampler.exclude_patches(1, 1, [(1, 1), (2, 3)])
    cells = sampler.get_region_probs(0, 0).shape
    sampler.set_region_probs(0, 0, np.random.default_rng(3).uniform(0.0, 3.0, cells))
    sampler.exclude_patches(1, 2, np.ones(sampler.get_excluded_cells(1, 2).shape, dtype=bool))
    return sampler


def _sampler_3d() -> StratifiedPatching:
    sampler = StratifiedPatching([(2, 1, 20, 37, 41)], (8, 8, 8), seed=7, backend="numpy")
    sampler.exclude_patches(0, 1, [(0, 1, 1)])
    return sampler


SAMPLERS = {"2d": _sampler_2d, "3d": _sampler_3d}
_STATE_ENVELOPE = ("format", "version", "checksum")


def _epoch_row(epochs: dict[int, Any], sampler: StratifiedPatching, draw: int, index: int) -> Any:
    if draw not in epochs:
        epochs[draw] = sampler.sample_epoch(draw).to_numpy()
    batch = epochs[draw]
    return (
        int(batch.data_idx[index]),
        int(batch.sample_idx[index]),
        tuple(int(c) for c in batch.coords[index]),
    )


def _check_calls(sampler: StratifiedPatching, order: list[int], base: int = 0) -> None:
    """Call get_patch_spec in ``order``; each call must be its epoch row."""
    calls: Counter[int] = Counter()
    epochs: dict[int, Any] = {}
    for index in order:
        spec = sampler.get_patch_spec(index)
        draw = (base + calls[index]) % 2**32
        calls[index] += 1
        got = (spec["data_idx"], spec["sample_idx"], spec["coords"])
        assert got == _epoch_row(epochs, sampler, draw, index), (index, draw)


def _orders(n_patches: int) -> dict[str, list[int]]:
    generator = np.random.default_rng(11)
    weights = generator.pareto(1.0, n_patches) + 0.01
    return {
        "sequential": list(range(n_patches)) * 3,
        "shuffled": np.concatenate([generator.permutation(n_patches) for _ in range(3)]).tolist(),
        "replacement": generator.integers(0, n_patches, 4 * n_patches).tolist(),
        "weighted": generator.choice(n_patches, 4 * n_patches, p=weights / weights.sum()).tolist(),
        "one index": [n_patches // 2] * 300 + list(range(n_patches)),
        "two indices": [3, n_patches - 1] * 150,
    }


@pytest.mark.parametrize(
    "kind", ["sequential", "shuffled", "replacement", "weighted", "one index", "two indices"]
)
@pytest.mark.parametrize("shape", sorted(SAMPLERS))
def test_every_access_order_returns_the_epoch_rows(shape: str, kind: str) -> None:
    sampler = SAMPLERS[shape]()
    _check_calls(sampler, _orders(sampler.n_patches)[kind])


def test_every_serving_path_returns_the_epoch_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    # Few misses before a refill and short windows: every path of the cache
    # (refill, one-patch draw, long window, window expiry) serves many calls.
    refills = dataclasses.replace(counters_module._REFILLS, min_misses=5)
    monkeypatch.setattr(counters_module, "_REFILLS", refills)
    hot = dataclasses.replace(counters_module._HOT, max_length=4, max_rows=8)
    monkeypatch.setattr(counters_module, "_HOT", hot)
    paths: Counter[str] = Counter()
    for name in ("_refill", "_fill_hot"):
        original = getattr(counters_module.UpcomingPatches, name)

        def counted(self: Any, *args: Any, _name: str = name, _original: Any = original) -> Any:
            paths[_name] += 1
            return _original(self, *args)

        monkeypatch.setattr(counters_module.UpcomingPatches, name, counted)

    def counted_draw(tables: Any, indices: Any, *args: Any) -> Any:
        paths["one patch" if isinstance(indices, int) else "rows"] += 1
        return draw_rows(tables, indices, *args)

    monkeypatch.setattr(counters_module, "draw_rows", counted_draw)
    sampler = _sampler_2d()
    orders = _orders(sampler.n_patches)
    _check_calls(
        sampler,
        orders["replacement"] + orders["one index"] + orders["two indices"] + orders["sequential"],
    )
    assert min(paths["_refill"], paths["_fill_hot"], paths["one patch"]) >= 3, paths


def test_small_samplers_keep_several_draws_per_index() -> None:
    sampler = StratifiedPatching([(1, 1, 64, 64)], (16, 16), seed=5, backend="numpy")
    _check_calls(sampler, np.random.default_rng(2).integers(0, 16, 400).tolist())
    upcoming = sampler._calls.upcoming
    assert upcoming is not None and upcoming.depth > 1


def test_calls_after_set_epoch_and_updates_return_the_epoch_rows() -> None:
    sampler = _sampler_2d()
    order = np.random.default_rng(4).integers(0, sampler.n_patches, 600).tolist()
    _check_calls(sampler, order)
    sampler.set_epoch(2**32 - 2)  # draw numbers wrap round past 2**32 - 1
    _check_calls(sampler, order, base=2**32 - 2)
    sampler.set_epoch(9)
    sampler.exclude_patches(0, 1, [(0, 0)])
    calls = sampler.state_dict()["calls"]
    assert sampler.epoch == 9 and calls["length"] == sampler.n_patches
    _check_calls(sampler, [index for index in order if index < sampler.n_patches], base=9)


@pytest.mark.parametrize("shape", sorted(SAMPLERS))
def test_the_draw_of_one_index_is_the_epoch_row_in_python_ints(shape: str) -> None:
    sampler = SAMPLERS[shape]()
    epochs: dict[int, Any] = {}
    for number in (0, 5, 2**32 - 1):
        for index in range(sampler.n_patches):
            patch = draw_rows(sampler._tables, index, number, sampler.seed)
            assert patch == _epoch_row(epochs, sampler, number, index)
            assert all(type(value) is int for value in (*patch[:2], *patch[2]))


@pytest.mark.parametrize("shape", sorted(SAMPLERS))
def test_rows_drawn_at_their_own_draw_numbers_are_the_epoch_rows(shape: str) -> None:
    sampler = SAMPLERS[shape]()
    generator = np.random.default_rng(8)
    indices = generator.integers(0, sampler.n_patches, 3000)
    numbers = generator.choice([0, 1, 77, 2**32 - 1], 3000)
    data_idx, sample_idx, coords = draw_rows(sampler._tables, indices, numbers, sampler.seed)
    epochs: dict[int, Any] = {}
    for row, (index, number) in enumerate(zip(indices.tolist(), numbers.tolist(), strict=True)):
        got = (int(data_idx[row]), int(sample_idx[row]), tuple(coords[row].tolist()))
        assert got == _epoch_row(epochs, sampler, number, index)


def test_host_mirror_of_the_tables_draws_the_same_patches() -> None:
    # The CUDA backend's tables are mirrored this way; NumPy arrays stand in.
    sampler = _sampler_2d()
    mirror = HostTables(sampler._tables)
    for index in range(sampler.n_patches):
        direct = draw_rows(sampler._tables, index, 3, sampler.seed)
        assert draw_rows(mirror, index, 3, sampler.seed) == direct
    every = np.arange(sampler.n_patches)
    direct_rows = draw_rows(sampler._tables, every, 3, sampler.seed)
    for got, expected in zip(draw_rows(mirror, every, 3, sampler.seed), direct_rows, strict=True):
        np.testing.assert_array_equal(got, expected)


def test_pickle_and_deepcopy_are_independent_copies() -> None:
    sampler = _sampler_2d()
    for index in range(10):
        sampler.get_patch_spec(index)
    for clone in (pickle.loads(pickle.dumps(sampler)), copy.deepcopy(sampler)):
        assert clone.state_dict() == sampler.state_dict()
        clone.get_patch_spec(0)
        clone.set_epoch(5)
        assert sampler.state_dict()["calls"] != clone.state_dict()["calls"]
        assert sampler.epoch == 0


def test_counters_pickled_outside_a_process_start_are_a_copy() -> None:
    counters = CallCounters(4, np.array([1, 2, 3, 4], dtype=np.uint32), base=9)
    clone = pickle.loads(pickle.dumps(counters))
    clone.view[0] = 100
    assert counters.counts.tolist() == [1, 2, 3, 4] and clone.base == 9


def test_counters_keep_their_counts_when_resized() -> None:
    counters = CallCounters(4, np.array([1, 2, 3, 4], dtype=np.uint32), base=9)
    assert counters.resized(2).counts.tolist() == [1, 2]
    grown = counters.resized(6)
    assert grown.counts.tolist() == [1, 2, 3, 4, 0, 0] and grown.base == 9


def _state_after_calls() -> tuple[StratifiedPatching, dict[str, Any]]:
    sampler = _sampler_2d()
    for index in range(sampler.n_patches - 40, sampler.n_patches):
        sampler.get_patch_spec(index)
    sampler.set_epoch(3)
    for index in range(sampler.n_patches - 20, sampler.n_patches):
        sampler.get_patch_spec(index)
    return sampler, sampler.state_dict()


def test_a_failed_transaction_leaves_the_state_unchanged() -> None:
    sampler, before = _state_after_calls()
    with pytest.raises(RuntimeError, match="late failure"):
        with sampler.transaction():
            sampler.exclude_patches(1, 0, [(0, 0), (1, 1), (2, 2)])  # fewer patches
            sampler.set_region_probs(0, 1, {(0, 0): 40.0})  # more patches
            sampler.set_epoch(77)
            raise RuntimeError("late failure")
    assert sampler.state_dict() == before
    # The indices not called since set_epoch(3) draw epoch 3 next.
    _check_calls(sampler, list(range(sampler.n_patches - 20)), base=3)


def test_filter_background_over_the_patch_limit_changes_nothing() -> None:
    from gpu_patching import filter_background

    # The second stack has 2.16M regions; oversampling its background would
    # give it more patches than one sample may have, so the call is refused
    # after the first stack was updated (the case of a bug report: the last
    # indices' call counters came back as 0).
    small = np.zeros((1, 1, 32, 32), dtype=np.float32)
    large = np.zeros((1, 1, 1469, 1469), dtype=np.float32)
    sampler = StratifiedPatching([small.shape, large.shape], (1, 1), seed=3, backend="numpy")
    # Filtering lowers the small stack's patch count (1024 -> 1000 per
    # region) before the large stack is refused: the indices shift.
    sampler.set_region_probs(0, 0, np.full((33, 33), 1024.0))
    # The last indices have been called (set through a state: calling them
    # would first draw all 3.2M patches into the cache).
    state = sampler.state_dict()
    calls = np.zeros(sampler.n_patches, dtype=np.uint32)
    calls[-50:] = 7
    body = {key: value for key, value in state.items() if key not in _STATE_ENVELOPE}
    sampler.load_state_dict(
        _state.seal({**body, "epoch_base": 4, "calls": _state.encode_array(calls)})
    )
    before = sampler.state_dict()
    with pytest.raises(ValueError, match="patches"):
        filter_background(sampler, [small, large], threshold=1.0, filtered_prob=1000.0)
    assert sampler.state_dict() == before


def test_an_update_whose_counters_cannot_be_allocated_changes_nothing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    sampler, before = _state_after_calls()

    def no_memory(self: CallCounters, n_indices: int) -> CallCounters:
        raise OSError("no space left for shared memory")

    monkeypatch.setattr(CallCounters, "resized", no_memory)
    with pytest.raises(OSError, match="shared memory"):
        sampler.exclude_patches(0, 0, [(1, 1)])
    assert sampler.state_dict() == before


def test_a_call_whose_draw_fails_counts_nothing_and_spoils_no_cache(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    sampler = _sampler_2d()
    order = list(range(sampler.n_patches))
    _check_calls(sampler, order)
    original = counters_module.UpcomingPatches._fill_block
    calls = {"n": 0}

    def fails_half_way(self: Any, stale: Any, first: Any) -> None:
        calls["n"] += 1
        original(self, stale[: len(stale) // 2], first[: len(first) // 2])
        raise MemoryError("out of memory half way through a refill")

    monkeypatch.setattr(counters_module.UpcomingPatches, "_fill_block", fails_half_way)
    sampler.set_epoch(50)  # every window is behind: the next call refills them all
    before = sampler.state_dict()
    with pytest.raises(MemoryError):
        sampler.get_patch_spec(5)
    assert calls["n"] == 1 and sampler.state_dict() == before
    monkeypatch.setattr(counters_module.UpcomingPatches, "_fill_block", original)
    calls_so_far: Counter[int] = Counter()
    epochs: dict[int, Any] = {}
    for index in [5, *order]:
        spec = sampler.get_patch_spec(index)
        draw = 50 + calls_so_far[index]
        calls_so_far[index] += 1
        got = (spec["data_idx"], spec["sample_idx"], spec["coords"])
        assert got == _epoch_row(epochs, sampler, draw, index)


def test_the_cuda_backend_serves_calls_from_the_same_cache(host_kernels: Any) -> None:
    # The CUDA backend's launch path with the shipped kernel run on the host:
    # refills where every index is at one draw number launch the epoch kernel.
    from host_launch import HostBackend

    shapes, patch = [(1, 1, 600, 600)], (16, 16)  # 1,369 patches: one draw per index
    sampler = StratifiedPatching(shapes, patch, seed=6, backend="numpy")
    sampler._backend = HostBackend(host_kernels)
    expected = StratifiedPatching(shapes, patch, seed=6, backend="numpy")
    orders = _orders(sampler.n_patches)
    calls: Counter[int] = Counter()
    epochs: dict[int, Any] = {}
    for index in orders["shuffled"][: 2 * sampler.n_patches] + orders["replacement"][:500]:
        spec = sampler.get_patch_spec(index)
        got = (spec["data_idx"], spec["sample_idx"], spec["coords"])
        assert got == _epoch_row(epochs, expected, calls[index], index)
        calls[index] += 1
    assert sampler._backend.launch_count >= 2  # one refill per pass at least
