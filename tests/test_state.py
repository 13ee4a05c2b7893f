"""Checkpoints: state_dict() is plain JSON, and load_state_dict() resumes exactly.

A state holds everything that determines future draws (seed, shapes, patch
size, exclusions, probabilities, per-index call counters, epoch base); a
sampler that loads it continues exactly where the saved one would have, and a
state from other shapes, or a modified one, is refused without changing
anything.
"""

from __future__ import annotations

import copy
import json
from typing import Any

import numpy as np
import pytest
from conftest import numpy_sampler

from gpu_patching import StratifiedPatching
from gpu_patching._state import (
    STATE_FORMAT,
    STATE_VERSION,
    decode_array,
    encode_array,
    state_checksum,
)

SHAPES = [(3, 1, 97, 64), (2, 2, 40, 50)]
PATCH = (8, 6)


def configured_sampler(seed: int = 7) -> StratifiedPatching:
    """A used sampler: exclusions, probabilities, a set_epoch and uneven call counts."""
    sampler = numpy_sampler(SHAPES, PATCH, seed=seed)
    sampler.exclude_patches(0, 1, [(1, 1), (2, 3), (11, 9)])
    sampler.set_region_probs(1, 0, {(0, 0): 0.0, (2, 2): 3.5, (4, 7): 0.125})
    sampler.set_epoch(5)
    for index in (0, 1, 1, 2, 2, 2, sampler.n_patches - 1):
        sampler.get_patch_spec(index)
    return sampler


def through_json(state: dict[str, Any]) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(json.dumps(state))
    return loaded


def specs_of(sampler: StratifiedPatching, indices: list[int]) -> list[Any]:
    return [sampler.get_patch_spec(index) for index in indices]


def same_state_contents(a: StratifiedPatching, b: StratifiedPatching) -> bool:
    return a.state_dict() == b.state_dict()


@pytest.fixture
def saved() -> tuple[StratifiedPatching, dict[str, Any]]:
    sampler = configured_sampler()
    return sampler, through_json(sampler.state_dict())


# -- what a state is -------------------------------------------------------------------


def test_state_is_plain_json_data(saved: Any) -> None:
    _, state = saved

    def plain(value: Any) -> bool:
        if isinstance(value, dict):
            return all(isinstance(k, str) and plain(v) for k, v in value.items())
        if isinstance(value, list):
            return all(plain(v) for v in value)
        return type(value) in (str, int)

    assert plain(state)
    assert json.loads(json.dumps(state, allow_nan=False)) == state


def test_state_names_its_format_version_and_everything_that_determines_draws(
    saved: Any,
) -> None:
    sampler, state = saved
    assert state["format"] == STATE_FORMAT and state["version"] == STATE_VERSION
    assert state["seed"] == 7
    assert state["data_shapes"] == [list(shape) for shape in SHAPES]
    assert state["patch_size"] == list(PATCH)
    assert state["epoch_base"] == 5
    assert state["n_patches"] == sampler.n_patches
    n_regions = int(sampler._tables.region_offset[-1])
    assert state["excluded"]["length"] == state["probability"]["length"] == n_regions
    assert state["calls"]["length"] == sampler.n_patches
    assert state["checksum"].startswith("sha256:")


def test_state_of_a_million_regions_is_compact() -> None:
    sampler = StratifiedPatching([(16, 1, 8192, 8192)], (32, 32), seed=1, backend="numpy")
    assert int(sampler._tables.region_offset[-1]) == 2**20
    assert len(json.dumps(sampler.state_dict())) < 64_000


def test_state_dict_does_not_change_the_sampler(saved: Any) -> None:
    sampler, state = saved
    assert through_json(sampler.state_dict()) == state
    twin = configured_sampler()
    assert specs_of(sampler, [0, 1, 2, 3]) == specs_of(twin, [0, 1, 2, 3])


# -- exact resume ----------------------------------------------------------------------


def test_loaded_sampler_continues_the_get_patch_spec_sequence(saved: Any) -> None:
    sampler, state = saved
    resumed = numpy_sampler(SHAPES, PATCH, seed=999)
    resumed.load_state_dict(state)
    indices = [2, 2, 0, 1, 5, sampler.n_patches - 1, 2, 7, 7, 7]
    assert specs_of(resumed, indices) == specs_of(sampler, indices)


def test_loaded_sampler_draws_the_same_epochs(saved: Any) -> None:
    sampler, state = saved
    resumed = numpy_sampler(SHAPES, PATCH, seed=None)
    resumed.load_state_dict(state)
    assert resumed.seed == sampler.seed and resumed.epoch == sampler.epoch == 5
    for arguments in ({}, {"shuffle": True, "rank": 1, "world_size": 3}):
        ours, theirs = resumed.sample_epoch(8, **arguments), sampler.sample_epoch(8, **arguments)
        for name in ("data_idx", "sample_idx", "coords", "indices"):
            np.testing.assert_array_equal(getattr(ours, name), getattr(theirs, name))


def test_loaded_sampler_has_the_exclusions_and_probabilities(saved: Any) -> None:
    sampler, state = saved
    resumed = numpy_sampler(SHAPES, PATCH)
    resumed.load_state_dict(state)
    assert resumed.n_patches == sampler.n_patches
    assert resumed.get_included_grid_coords() == sampler.get_included_grid_coords()
    for name in ("excluded", "probability", "weight", "mass", "mass_prefix", "subbox_mask"):
        np.testing.assert_array_equal(
            getattr(resumed._tables, name), getattr(sampler._tables, name), name
        )


def test_loading_replaces_the_loaders_own_exclusions() -> None:
    state = numpy_sampler(SHAPES, PATCH, seed=3).state_dict()
    dirty = configured_sampler()
    dirty.load_state_dict(state)
    assert same_state_contents(dirty, numpy_sampler(SHAPES, PATCH, seed=3))


def test_loaded_sampler_continues_after_later_updates_like_the_original(saved: Any) -> None:
    sampler, state = saved
    resumed = numpy_sampler(SHAPES, PATCH)
    resumed.load_state_dict(state)
    for twin in (sampler, resumed):
        twin.exclude_patches(1, 1, [(0, 0)])
        twin.set_epoch(11)
    assert specs_of(resumed, [0, 0, 3]) == specs_of(sampler, [0, 0, 3])


def test_state_of_a_loaded_sampler_is_the_loaded_state(saved: Any) -> None:
    _, state = saved
    resumed = numpy_sampler(SHAPES, PATCH)
    resumed.load_state_dict(state)
    assert through_json(resumed.state_dict()) == state


def test_a_state_with_every_cell_excluded_resumes() -> None:
    sampler = numpy_sampler([(1, 1, 12, 12)], (4, 4), seed=5)
    sampler.exclude_patches(0, 0, [(y, x) for y in range(3) for x in range(3)])
    resumed = numpy_sampler([(1, 1, 12, 12)], (4, 4))
    resumed.load_state_dict(through_json(sampler.state_dict()))
    assert resumed.n_patches == 0 and resumed.seed == 5


# -- refused states --------------------------------------------------------------------


def assert_refused(
    state: Any, error: type[Exception], match: str, sampler: StratifiedPatching | None = None
) -> None:
    """Loading ``state`` raises, and the loader is exactly as it was."""
    loader = sampler if sampler is not None else configured_sampler(seed=1)
    before = loader.state_dict()
    with pytest.raises(error, match=match):
        loader.load_state_dict(state)
    assert loader.state_dict() == before


def with_checksum(state: dict[str, Any]) -> dict[str, Any]:
    """A state whose checksum is recomputed: a deliberate, not an accidental, edit."""
    state = copy.deepcopy(state)
    state["checksum"] = state_checksum(state)
    return state


@pytest.mark.parametrize(
    ("shapes", "patch"),
    [
        ([(3, 1, 97, 64), (2, 2, 40, 51)], PATCH),
        ([(3, 1, 97, 64)], PATCH),
        (SHAPES, (8, 8)),
        ([(3, 1, 97, 64, 10), (2, 2, 40, 50, 10)], (8, 6, 2)),
    ],
)
def test_state_from_other_shapes_is_refused(saved: Any, shapes: list[Any], patch: Any) -> None:
    _, state = saved
    assert_refused(state, ValueError, "the state is for data_shapes", numpy_sampler(shapes, patch))


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("seed", 8),
        ("epoch_base", 6),
        ("n_patches", 10),
        ("patch_size", [8, 8]),
        ("data_shapes", [[3, 1, 97, 64], [2, 2, 40, 51]]),
    ],
)
def test_tampered_state_is_refused(saved: Any, key: str, value: Any) -> None:
    _, state = saved
    tampered = dict(state, **{key: value})
    assert_refused(tampered, ValueError, "checksum does not match")


def test_state_with_a_tampered_array_is_refused(saved: Any) -> None:
    _, state = saved
    tampered = copy.deepcopy(state)
    data = tampered["calls"]["data"]
    tampered["calls"]["data"] = data[:-4] + ("AAAA" if data[-4:] != "AAAA" else "BBBB")
    assert_refused(tampered, ValueError, "checksum does not match")


def test_state_whose_arrays_disagree_with_its_patch_count_is_refused(saved: Any) -> None:
    _, state = saved
    rewritten = with_checksum(dict(state, n_patches=state["n_patches"] + 1))
    assert_refused(rewritten, ValueError, "holds .* values, this sampler needs")


def test_state_with_undecodable_data_is_refused(saved: Any) -> None:
    _, state = saved
    broken = copy.deepcopy(state)
    broken["excluded"]["data"] = "not base64!"
    assert_refused(with_checksum(broken), ValueError, r"state\['excluded'\] cannot be decoded")


def test_state_with_a_bad_probability_is_refused(saved: Any) -> None:
    _, state = saved
    length = state["probability"]["length"]
    probability = decode_array(state["probability"], "probability", "<f8", length).copy()
    probability[3] = -1.0
    broken = copy.deepcopy(state)
    broken["probability"] = encode_array(probability)
    assert_refused(with_checksum(broken), ValueError, r"state\['probability'\] must be finite")


def test_state_of_another_format_or_version_is_refused(saved: Any) -> None:
    _, state = saved
    assert_refused(with_checksum(dict(state, version=True)), ValueError, "True is not supported")
    assert_refused(with_checksum(dict(state, version=1.0)), ValueError, "1.0 is not supported")
    assert_refused(with_checksum(dict(state, version=0)), ValueError, "version 0 is not supported")
    assert_refused(with_checksum(dict(state, version=3)), ValueError, "version 3 is not supported")
    assert_refused(with_checksum(dict(state, format="x")), ValueError, "state format is 'x'")


def as_version_1(state: dict[str, Any]) -> dict[str, Any]:
    """The state as version 1 wrote it: no probability_order."""
    old = {key: value for key, value in state.items() if key != "probability_order"}
    return with_checksum(dict(old, version=1))


def test_a_version_1_state_loads_with_the_probabilities_set_in_row_order(saved: Any) -> None:
    # configured_sampler sets its probabilities in row order, so the restored
    # order, and with it every count and draw, is the original's.
    original, state = saved
    loaded = numpy_sampler(SHAPES, PATCH, seed=1)
    loaded.load_state_dict(as_version_1(state))
    assert loaded.state_dict() == original.state_dict()
    indices = [0, 1, 2, 3, original.n_patches - 1]
    assert specs_of(loaded, indices) == specs_of(original, indices)


def test_a_version_1_state_with_a_probability_order_is_refused(saved: Any) -> None:
    _, state = saved
    old = as_version_1(state)
    old["probability_order"] = state["probability_order"]
    assert_refused(with_checksum(old), ValueError, r"unknown keys \['probability_order'\]")


def test_state_with_missing_or_unknown_keys_is_refused(saved: Any) -> None:
    _, state = saved
    missing = {key: value for key, value in state.items() if key != "calls"}
    assert_refused(missing, ValueError, r"missing keys \['calls'\]")
    assert_refused(dict(state, extra=1), ValueError, r"unknown keys \['extra'\]")


def test_state_that_is_not_a_mapping_is_refused(saved: Any) -> None:
    _, state = saved
    assert_refused(json.dumps(state), TypeError, "state must be a mapping")
    assert_refused([state], TypeError, "state must be a mapping")


def test_state_that_is_not_json_data_is_refused(saved: Any) -> None:
    _, state = saved
    assert_refused(dict(state, seed={7}), ValueError, "not plain JSON data")


# -- reading probabilities back --------------------------------------------------------


def test_region_probabilities_read_back_as_set() -> None:
    sampler = configured_sampler()
    probabilities = sampler.get_region_probs(1, 0)
    assert isinstance(probabilities, np.ndarray) and probabilities.dtype == np.float64
    assert probabilities.shape == sampler._tables.sample_grid(sampler._tables.sample_id(1, 0))
    assert probabilities[0, 0] == 0.0 and probabilities[2, 2] == 3.5
    assert probabilities[4, 7] == 0.125 and probabilities[1, 1] == 1.0
    with pytest.raises(IndexError):
        sampler.get_region_probs(2, 0)


def test_excluded_cells_read_back_as_the_complement_of_the_included_coords() -> None:
    sampler = configured_sampler()
    excluded = sampler.get_excluded_cells(0, 1)
    assert isinstance(excluded, np.ndarray) and excluded.dtype == np.bool_
    assert np.argwhere(excluded).tolist() == [[1, 1], [2, 3], [11, 9]]
    included = sampler.get_included_grid_coords()
    for (data_idx, sample_idx), cells in included.items():
        kept = ~sampler.get_excluded_cells(data_idx, sample_idx)
        assert [tuple(c) for c in np.argwhere(kept).tolist()] == cells
    # A copy: writing into it changes nothing; and it round-trips as a dense mask.
    excluded[0, 0] = True
    assert not sampler.get_excluded_cells(0, 1)[0, 0]
    twin = numpy_sampler(SHAPES, PATCH, seed=7)
    twin.exclude_patches(0, 1, sampler.get_excluded_cells(0, 1))
    assert twin.get_included_grid_coords() == included
    with pytest.raises(IndexError):
        sampler.get_excluded_cells(0, 3)


def test_a_state_nested_too_deep_for_json_is_refused(saved: Any) -> None:
    _, state = saved
    nested: Any = 0
    for _ in range(100_000):
        nested = [nested]
    assert_refused(dict(state, data_shapes=nested), ValueError, "state is not plain JSON data")
