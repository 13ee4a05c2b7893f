"""Size limits: refused up front, before anything is allocated, naming the limit and the shape."""

from __future__ import annotations

import base64
import tracemalloc
import zlib

import pytest

from gpu_patching import StratifiedPatching, _state, tables
from gpu_patching.tables import check_size_limits

#: Refusing a shape may cost a few small Python objects, never an array of
#: the size being refused.
_REFUSAL_BYTES = 1 << 20


def refuse_without_allocating(shapes, patch) -> str:
    """Build a sampler that must be refused; return the message.

    tracemalloc sees NumPy's array allocations too, so the peak bounds
    whatever the refused call allocated.
    """
    tracemalloc.start()
    try:
        with pytest.raises(ValueError) as caught:
            StratifiedPatching(shapes, patch, seed=0, backend="numpy")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < _REFUSAL_BYTES, f"{peak} bytes allocated before the refusal"
    return str(caught.value)


def test_too_many_patches_in_one_sample_is_refused_before_allocating():
    # The case: 3.9e9 patches in one sample used to end in MemoryError.
    message = refuse_without_allocating([(1, 1, 10**6, 10**6)], (16, 16))
    assert "3906250000 patches per sample" in message
    assert str(tables.MAX_PATCHES_PER_SAMPLE) in message
    assert "(1000000, 1000000)" in message and "data_shapes[0]" in message


def test_the_patch_limit_counts_one_sample_not_the_stack(monkeypatch):
    # 2**31 - 1 patches per sample is the limit itself: accepted (checked on
    # the shapes, without building the tables); one more is refused.
    monkeypatch.setattr(tables, "_physical_memory_bytes", lambda: None)
    limit = tables.MAX_PATCHES_PER_SAMPLE
    check_size_limits([(limit, 1)], [1], (1, 1))
    with pytest.raises(ValueError, match="2147483648 patches per sample"):
        check_size_limits([(limit + 1, 1)], [1], (1, 1))


def test_too_many_regions_over_all_stacks_is_refused_before_allocating():
    # Each sample is within the patch limit; all of them hold 5e12 cells.
    message = refuse_without_allocating([(2000, 1, 10**5, 10**5)], (2, 2))
    assert "5000000000000" in message and str(tables.MAX_TOTAL_REGIONS) in message
    assert "data_shapes[0]" in message and "(100000, 100000)" in message


def test_the_region_limit_is_summed_over_stacks(monkeypatch):
    # Each stack holds 2**18 samples of 2049 x 1025 cells (1x1 patches): one
    # stack is within the limit, two are not.
    cells_per_stack = (1 << 18) * 2049 * 1025
    assert cells_per_stack < tables.MAX_TOTAL_REGIONS < 2 * cells_per_stack
    monkeypatch.setattr(tables, "_physical_memory_bytes", lambda: None)
    check_size_limits([(2048, 1024)], [1 << 18], (1, 1))
    with pytest.raises(ValueError, match=r"data_shapes\[1\].*grid cells"):
        check_size_limits([(2048, 1024)] * 2, [1 << 18] * 2, (1, 1))


def test_a_sampling_mass_beyond_int64_is_refused_before_allocating():
    # 4096 samples of 2**28 cells: within the region and patch limits, but
    # their 2**44 patch positions weigh more than 2**62 units of mass.
    message = refuse_without_allocating([(4096, 1, 1 << 16, 1 << 16)], (4, 4))
    assert "sampling mass" in message and str(tables.MAX_TOTAL_MASS) in message


def test_tables_larger_than_the_machine_are_refused_before_allocating():
    # 1e12 samples of one cell each: every per-sample limit holds, but their
    # tables need about 100 TiB.
    message = refuse_without_allocating([(10**12, 1, 16, 16)], (16, 16))
    assert "GiB" in message and "(16, 16)" in message


@pytest.mark.parametrize("axis", [2**62 + 1, 2**63, 2**64 + 5])
def test_axes_beyond_int64_are_refused_with_a_value_error(axis):
    message = refuse_without_allocating([(1, 1, axis, 8)], (2, 2))
    assert str(axis) in message and str(tables.MAX_AXIS_LENGTH) in message


def test_a_patch_size_beyond_int64_is_refused_with_a_value_error():
    message = refuse_without_allocating([(1, 1, 8, 8)], (2**63, 2))
    assert str(2**63) in message


def test_a_state_for_too_large_shapes_is_refused_and_changes_nothing():
    # A well-formed (sealed) state naming shapes beyond the limits is refused
    # (they are not this sampler's) before any of its arrays is decoded, and
    # unpickling such a state builds its sampler through the constructor's
    # checks.
    sampler = StratifiedPatching([(1, 1, 64, 64)], (16, 16), seed=1, backend="numpy")
    before = sampler.state_dict()
    body = {k: v for k, v in before.items() if k not in ("format", "version", "checksum")}
    body["data_shapes"] = [[1, 1, 10**6, 10**6]]
    with pytest.raises(ValueError, match=r"data_shapes \[\(1, 1, 1000000, 1000000\)\]"):
        sampler.load_state_dict(_state.seal(body))
    assert sampler.state_dict() == before
    pickled = {"backend": "numpy", "state": _state.seal(body)}
    with pytest.raises(ValueError, match="patches per sample"):
        StratifiedPatching.__new__(StratifiedPatching).__setstate__(pickled)


def test_a_state_whose_arrays_inflate_beyond_their_length_is_refused_early():
    # 64 MiB of zeros compress to about 64 KiB: decoding stops one byte past
    # the expected length instead of inflating all of it.
    sampler = StratifiedPatching([(1, 1, 64, 64)], (16, 16), seed=1, backend="numpy")
    before = sampler.state_dict()
    body = {k: v for k, v in before.items() if k not in ("format", "version", "checksum")}
    bomb = base64.b64encode(zlib.compress(bytes(64 << 20), 9)).decode("ascii")
    body["probability"] = {**body["probability"], "data": bomb}
    tracemalloc.start()
    try:
        with pytest.raises(ValueError, match="decodes to"):
            sampler.load_state_dict(_state.seal(body))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20
    assert sampler.state_dict() == before
