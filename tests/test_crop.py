"""extract_patches on host stacks: every row equals plain slicing, and bad input is refused.

The rule (issue 5): row ``k`` of ``extract_patches(stacks, batch)`` is
``stacks[d][s, :, z:z+pz, y:y+py, x:x+px]`` for ``d, s = batch.data_idx[k],
batch.sample_idx[k]`` and ``(z,) y, x = batch.coords[k]``; the result has shape
``(len(batch), C, *patch_size)`` and the stacks' dtype. Every check runs before
any work: a rejected call leaves ``out`` as it was.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import pytest

from gpu_patching import PatchBatch, StratifiedPatching, extract_patches
from gpu_patching.arrays import is_device_array

DTYPES = [
    np.uint8,
    np.uint16,
    np.int32,
    np.float16,
    np.float32,
    np.float64,
    np.bool_,
    np.complex128,
    np.object_,
]


def make_batch(
    data_idx: Any, sample_idx: Any, coords: Any, patch_size: tuple[int, ...]
) -> PatchBatch:
    data_idx = np.asarray(data_idx, dtype=np.int64)
    coords = np.asarray(coords, dtype=np.int64).reshape(len(data_idx), len(patch_size))
    return PatchBatch(
        data_idx=data_idx,
        sample_idx=np.asarray(sample_idx, dtype=np.int64),
        coords=coords,
        indices=np.arange(len(data_idx), dtype=np.int64),
        patch_size=patch_size,
    )


def sliced(stacks: list[Any], batch: PatchBatch) -> list[np.ndarray]:
    """The patches by plain slicing, one at a time."""
    patches = []
    for k in range(len(batch)):
        corner = [int(c) for c in batch.coords[k]]
        window = tuple(slice(c, c + p) for c, p in zip(corner, batch.patch_size, strict=True))
        stack = stacks[int(batch.data_idx[k])]
        patches.append(stack[(int(batch.sample_idx[k]), slice(None), *window)])
    return patches


def assert_equals_slicing(result: np.ndarray, stacks: list[Any], batch: PatchBatch) -> None:
    n_channels = stacks[0].shape[1]
    assert result.shape == (len(batch), n_channels, *batch.patch_size)
    assert result.dtype == stacks[0].dtype
    assert result.flags.c_contiguous
    for k, patch in enumerate(sliced(stacks, batch)):
        np.testing.assert_array_equal(result[k], patch, err_msg=f"row {k}")


def values(shape: tuple[int, ...], dtype: Any, seed: int = 0) -> np.ndarray:
    """Distinct values (as far as the dtype allows) so that a misplaced element shows."""
    counting = np.arange(int(np.prod(shape))).reshape(shape)
    if np.dtype(dtype) == np.object_:
        return counting.astype(object)
    if np.dtype(dtype) == np.bool_:
        return np.random.default_rng(seed).integers(0, 2, size=shape).astype(bool)
    return (counting + 7 * seed).astype(dtype)


def random_batch(
    shapes: list[tuple[int, ...]], patch: tuple[int, ...], n_rows: int, seed: int
) -> PatchBatch:
    """Rows over every stack, with corners at both edges of every axis often."""
    generator = np.random.default_rng(seed)
    data_idx = generator.integers(0, len(shapes), size=n_rows)
    sample_idx, coords = [], []
    for d in data_idx:
        shape = shapes[d]
        sample_idx.append(generator.integers(0, shape[0]))
        corner = []
        for axis, p in enumerate(patch):
            last = shape[2 + axis] - p
            corner.append(generator.choice([0, last, generator.integers(0, last + 1)]))
        coords.append(corner)
    return make_batch(data_idx, sample_idx, coords, patch)


# -- equality with slicing --------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n_channels", [1, 3])
def test_2d_patches_equal_slicing(dtype: Any, n_channels: int) -> None:
    shapes = [(3, n_channels, 23, 31)]
    stacks = [values(shapes[0], dtype)]
    batch = random_batch(shapes, (5, 8), 40, seed=1)
    assert_equals_slicing(extract_patches(stacks, batch), stacks, batch)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n_channels", [1, 2])
def test_3d_patches_equal_slicing(dtype: Any, n_channels: int) -> None:
    shapes = [(2, n_channels, 9, 14, 17)]
    stacks = [values(shapes[0], dtype)]
    batch = random_batch(shapes, (3, 4, 6), 30, seed=2)
    assert_equals_slicing(extract_patches(stacks, batch), stacks, batch)


@pytest.mark.parametrize("patch", [(4, 6), (2, 4, 6)])
def test_patches_touching_the_last_row_column_and_slice_are_complete(
    patch: tuple[int, ...],
) -> None:
    spatial = (7, 11, 13)[-len(patch) :]
    shape = (2, 2, *spatial)
    stacks = [values(shape, np.float32)]
    last = [d - p for d, p in zip(spatial, patch, strict=True)]
    # Every combination of first / last corner per axis, in both samples.
    corners = (
        np.array(np.meshgrid(*[[0, c] for c in last], indexing="ij")).reshape(len(patch), -1).T
    )
    n = len(corners)
    batch = make_batch([0] * 2 * n, [0] * n + [1] * n, np.concatenate([corners, corners]), patch)
    result = extract_patches(stacks, batch)
    assert_equals_slicing(result, stacks, batch)
    # The far corner's patch ends with the stack's last element.
    far = int(np.flatnonzero((corners == last).all(axis=1))[0])
    assert result[n + far].reshape(-1)[-1] == stacks[0][1].reshape(-1)[-1]


def test_patch_as_large_as_the_image_is_the_whole_image() -> None:
    stacks = [values((2, 1, 6, 9), np.int32)]
    batch = make_batch([0, 0], [1, 0], [[0, 0], [0, 0]], (6, 9))
    result = extract_patches(stacks, batch)
    np.testing.assert_array_equal(result, stacks[0][[1, 0]])


@pytest.mark.parametrize("patch", [(5, 3), (2, 3, 4)])
def test_rows_from_several_stacks_of_different_shapes_keep_their_order(
    patch: tuple[int, ...],
) -> None:
    if len(patch) == 2:
        shapes = [(2, 2, 10, 12), (1, 2, 5, 30), (4, 2, 9, 3)]
    else:
        shapes = [(2, 2, 5, 6, 7), (1, 2, 2, 9, 4), (3, 2, 8, 3, 5)]
    stacks = [values(shape, np.uint16, seed=k) for k, shape in enumerate(shapes)]
    batch = random_batch(shapes, patch, 200, seed=3)
    assert set(batch.data_idx.tolist()) == {0, 1, 2}
    assert_equals_slicing(extract_patches(stacks, batch), stacks, batch)


def test_a_sampler_epoch_is_cropped_row_for_row() -> None:
    shapes = [(3, 1, 64, 48), (1, 1, 40, 70)]
    sampler = StratifiedPatching(shapes, (16, 8), seed=5, backend="numpy")
    stacks = [values(shape, np.float32, seed=k) for k, shape in enumerate(shapes)]
    batch = sampler.sample_epoch(0)
    assert_equals_slicing(extract_patches(stacks, batch), stacks, batch)
    # A slice of the epoch (a training batch) gives the matching rows.
    np.testing.assert_array_equal(
        extract_patches(stacks, batch[10:42]), extract_patches(stacks, batch)[10:42]
    )


def test_strided_views_are_read_in_place() -> None:
    base = values((4, 2, 30, 40), np.float64)
    stacks = [base[::2, :, 1::3, ::-2], np.asfortranarray(base[1:2])]
    shapes = [s.shape for s in stacks]
    batch = random_batch(shapes, (4, 5), 50, seed=4)
    assert_equals_slicing(extract_patches(stacks, batch), stacks, batch)


def test_any_integer_dtype_of_rows_is_accepted() -> None:
    stacks = [values((2, 1, 8, 8), np.uint8)]
    batch = PatchBatch(
        data_idx=np.zeros(3, dtype=np.uint8),
        sample_idx=np.array([0, 1, 1], dtype=np.int32),
        coords=np.array([[0, 0], [4, 4], [1, 3]], dtype=np.uint16),
        indices=np.arange(3),
        patch_size=(4, 4),
    )
    assert_equals_slicing(extract_patches(stacks, batch), stacks, batch)


def test_several_stacks_and_out_fill_every_row() -> None:
    # Rows of several stacks, interleaved, each copied into its own row of out.
    shapes = [(2, 2, 12, 14), (3, 2, 9, 20)]
    stacks = [values(shape, np.int16, seed=k) for k, shape in enumerate(shapes)]
    batch = random_batch(shapes, (4, 5), 31, seed=9)
    assert_equals_slicing(extract_patches(stacks, batch), stacks, batch)
    out = np.empty((31, 2, 4, 5), dtype=np.int16)
    assert extract_patches(stacks, batch, out=out) is out
    assert_equals_slicing(out, stacks, batch)
    first = batch[batch.data_idx == 0]
    out = np.empty((len(first), 2, 4, 5), dtype=np.int16)
    assert extract_patches(stacks[:1], first, out=out) is out
    assert_equals_slicing(out, stacks[:1], first)


def test_an_empty_batch_gives_an_empty_array_of_the_right_shape() -> None:
    stacks = [values((1, 3, 8, 8), np.float16), values((2, 3, 9, 9), np.float16)]
    empty = make_batch([], [], np.zeros((0, 2)), (4, 4))
    result = extract_patches(stacks, empty)
    assert result.shape == (0, 3, 4, 4) and result.dtype == np.float16
    assert extract_patches(stacks[:1], empty).shape == (0, 3, 4, 4)


def test_torch_cpu_tensors_are_host_stacks() -> None:
    torch = pytest.importorskip("torch")
    array = values((2, 1, 10, 12), np.float32)
    batch = random_batch([array.shape], (3, 3), 20, seed=6)
    result = extract_patches([torch.from_numpy(array)], batch)
    assert isinstance(result, np.ndarray)
    assert_equals_slicing(result, [array], batch)


# -- out= -------------------------------------------------------------------------------


def test_out_is_filled_and_returned_and_can_be_reused() -> None:
    shapes = [(2, 2, 12, 12), (1, 2, 20, 7)]
    stacks = [values(shape, np.int32, seed=k) for k, shape in enumerate(shapes)]
    out = np.empty((25, 2, 6, 5), dtype=np.int32)
    for seed in (7, 8):
        batch = random_batch(shapes, (6, 5), 25, seed=seed)
        assert extract_patches(stacks, batch, out=out) is out
        assert_equals_slicing(out, stacks, batch)


# -- which path --------------------------------------------------------------------------


class FakeCudaArray:
    """Only the CUDA Array Interface's presence matters to the path choice."""

    shape = (1, 1, 4, 4)
    dtype = np.dtype(np.float32)
    __cuda_array_interface__: ClassVar[dict[str, Any]] = {
        "shape": (1, 1, 4, 4),
        "typestr": "<f4",
        "data": (0, False),
    }


class FakeDlpackArray:
    def __dlpack_device__(self) -> tuple[int, int]:
        return (2, 0)  # kDLCUDA


class FakeGradTensor:
    """PyTorch raises RuntimeError (not AttributeError) for a tensor that requires grad."""

    @property
    def __cuda_array_interface__(self) -> dict[str, Any]:
        raise RuntimeError("Can't get __cuda_array_interface__ on Variable that requires grad")


def test_device_arrays_are_recognised_by_their_protocols() -> None:
    assert is_device_array(FakeCudaArray())
    assert is_device_array(FakeDlpackArray())
    assert not is_device_array(np.zeros(3))
    assert not is_device_array([[1, 2]])


def test_a_tensor_that_requires_grad_is_refused_with_a_clear_message() -> None:
    with pytest.raises(TypeError, match=r"requires grad.*tensor\.detach\(\)"):
        is_device_array(FakeGradTensor())


# -- errors, all before any work ---------------------------------------------------------


@pytest.fixture()
def setup() -> tuple[list[np.ndarray], PatchBatch, np.ndarray]:
    stacks = [values((2, 1, 10, 12), np.float32), values((1, 1, 8, 20), np.float32, seed=1)]
    batch = make_batch([0, 1, 0], [1, 0, 0], [[6, 8], [0, 16], [0, 0]], (4, 4))
    out = np.full((3, 1, 4, 4), -1.0, dtype=np.float32)
    return stacks, batch, out


def raises_untouched(
    error: type[Exception], match: str, stacks: Any, batch: Any, out: np.ndarray
) -> None:
    """The call raises ``error`` and ``out`` keeps its -1 everywhere."""
    with pytest.raises(error, match=match):
        extract_patches(stacks, batch, out=out)
    assert (np.asarray(out) == -1).all(), "a rejected call wrote into out"


def test_the_setup_is_valid(setup: Any) -> None:
    stacks, batch, out = setup
    assert extract_patches(stacks, batch, out=out) is out


def test_a_stack_with_the_wrong_number_of_axes_is_refused(setup: Any) -> None:
    stacks, batch, out = setup
    raises_untouched(
        ValueError, r"stacks\[1\] has shape \(1, 8, 20\)", [stacks[0], stacks[1][0]], batch, out
    )
    three_d = make_batch([0], [0], [[0, 0, 0]], (1, 4, 4))
    with pytest.raises(ValueError, match=r"5 axes \(SCZYX\)"):
        extract_patches(stacks, three_d)


def test_stacks_with_different_channel_counts_are_refused(setup: Any) -> None:
    stacks, batch, out = setup
    other = values((1, 2, 8, 20), np.float32)
    raises_untouched(
        ValueError, "same number of channels.*stacks\\[1\\] has 2", [stacks[0], other], batch, out
    )


def test_stacks_with_different_dtypes_are_refused(setup: Any) -> None:
    stacks, batch, out = setup
    raises_untouched(
        TypeError, "same dtype.*float64", [stacks[0], stacks[1].astype(np.float64)], batch, out
    )


def test_a_row_naming_a_stack_smaller_than_the_patch_is_refused(setup: Any) -> None:
    # The stack itself is accepted (the sampler gives it no patches); row 1 names it.
    stacks, batch, out = setup
    raises_untouched(
        ValueError,
        r"batch.coords\[1\] = \(0, 16\) names stacks\[1\] \(spatial shape \(3, 20\)\), "
        r"which is smaller than the \(4, 4\) patch",
        [stacks[0], values((1, 1, 3, 20), np.float32)],
        batch,
        out,
    )


@pytest.mark.parametrize(
    ("field", "row", "value", "error", "match"),
    [
        (
            "data_idx",
            1,
            2,
            IndexError,
            r"batch.data_idx\[1\] = 2 is out of range: there are 2 stacks",
        ),
        ("data_idx", 0, -1, IndexError, r"batch.data_idx\[0\] = -1"),
        ("sample_idx", 1, 1, IndexError, r"batch.sample_idx\[1\] = 1 .* has 1 samples"),
        ("sample_idx", 2, -3, IndexError, r"batch.sample_idx\[2\] = -3"),
        (
            "coords",
            0,
            (7, 8),
            ValueError,
            r"batch.coords\[0\] = \(7, 8\) .* 0 <= corner <= \(6, 8\)",
        ),
        ("coords", 1, (0, 17), ValueError, r"batch.coords\[1\] = \(0, 17\)"),
        ("coords", 2, (-1, 0), ValueError, r"batch.coords\[2\] = \(-1, 0\)"),
    ],
)
def test_a_row_outside_its_stack_is_refused(
    setup: Any, field: str, row: int, value: Any, error: type[Exception], match: str
) -> None:
    stacks, batch, out = setup
    column = getattr(batch, field).copy()
    column[row] = value
    arrays = {
        name: getattr(batch, name) for name in ("data_idx", "sample_idx", "coords", "indices")
    }
    arrays[field] = column
    raises_untouched(error, match, stacks, PatchBatch(**arrays, patch_size=batch.patch_size), out)


def test_the_first_bad_row_is_named(setup: Any) -> None:
    stacks, _, out = setup
    batch = make_batch([0, 5, 9], [0, 0, 0], [[0, 0], [0, 0], [0, 0]], (4, 4))
    raises_untouched(IndexError, r"data_idx\[1\] = 5", stacks, batch, out)


def test_a_batch_of_inconsistent_shapes_or_types_is_refused(setup: Any) -> None:
    stacks, batch, out = setup
    with pytest.raises(TypeError, match="PatchBatch"):
        extract_patches(stacks, {"data_idx": batch.data_idx})
    wide = PatchBatch(
        batch.data_idx, batch.sample_idx, np.zeros((3, 3), np.int64), batch.indices, (4, 4)
    )
    raises_untouched(ValueError, r"batch.coords has shape \(3, 3\)", stacks, wide, out)
    short = PatchBatch(batch.data_idx, batch.sample_idx[:2], batch.coords, batch.indices, (4, 4))
    raises_untouched(ValueError, "batch.sample_idx has shape", stacks, short, out)
    floats = PatchBatch(
        batch.data_idx, batch.sample_idx, batch.coords.astype(float), batch.indices, (4, 4)
    )
    raises_untouched(TypeError, "batch.coords must hold integers", stacks, floats, out)
    bad_patch = PatchBatch(batch.data_idx, batch.sample_idx, batch.coords, batch.indices, (4, 0))
    raises_untouched(ValueError, "patch_size", stacks, bad_patch, out)


def test_stacks_that_are_not_a_sequence_of_arrays_are_refused(setup: Any) -> None:
    _, batch, out = setup
    raises_untouched(ValueError, "stacks is empty", [], batch, out)
    raises_untouched(TypeError, "sequence of arrays", "stacks", batch, out)
    raises_untouched(TypeError, "sequence of arrays", 3, batch, out)


def test_host_and_device_stacks_cannot_be_mixed(setup: Any) -> None:
    stacks, batch, out = setup
    raises_untouched(
        TypeError,
        r"stacks\[1\] is a device array .* stacks\[0\] is not",
        [stacks[0], FakeCudaArray()],
        batch,
        out,
    )


def test_a_bad_out_is_refused(setup: Any) -> None:
    stacks, batch, _ = setup
    cases: list[tuple[type[Exception], str, Any]] = [
        (ValueError, r"out has shape \(3, 1, 4, 5\)", np.full((3, 1, 4, 5), -1, np.float32)),
        (ValueError, r"out has shape \(2, 1, 4, 4\)", np.full((2, 1, 4, 4), -1, np.float32)),
        (TypeError, "out has dtype float64", np.full((3, 1, 4, 4), -1, np.float64)),
        (ValueError, "C-contiguous", np.full((3, 1, 4, 8), -1, np.float32)[..., ::2]),
        (TypeError, "must be a NumPy array", [[-1.0]]),
    ]
    for error, match, bad in cases:
        with pytest.raises(error, match=match):
            extract_patches(stacks, batch, out=bad)
        assert (np.asarray(bad) == -1).all()
    read_only = np.full((3, 1, 4, 4), -1, np.float32)
    read_only.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        extract_patches(stacks, batch, out=read_only)
    # out inside a stack would overwrite the pixels it reads.
    inside = values((1, 1, 48, 4), np.float32)
    with pytest.raises(ValueError, match=r"shares memory with stacks\[1\]"):
        extract_patches(
            [stacks[0], inside],
            make_batch([1], [0], [[0, 0]], (4, 4)),
            out=inside[:, :, :4],
        )


# -- byte order and the values a message shows (issue 19, item 8) --------------------


@pytest.mark.parametrize("dtype", [">u2", ">i4", ">f4", ">f8", ">c16"])
def test_a_big_endian_stack_is_cropped_into_native_byte_order(dtype: str) -> None:
    native_dtype = np.dtype(dtype).newbyteorder("=")
    stacks = [values((2, 1, 10, 12), native_dtype), values((1, 1, 8, 20), native_dtype, seed=1)]
    batch = random_batch([s.shape for s in stacks], (4, 4), 20, seed=2)
    result = extract_patches([stack.astype(dtype) for stack in stacks], batch)
    assert result.dtype == native_dtype and result.dtype.isnative
    assert_equals_slicing(result, stacks, batch)


def test_stacks_of_both_byte_orders_are_read_exactly() -> None:
    stacks = [values((2, 1, 10, 12), np.uint16), values((1, 1, 8, 20), np.uint16, seed=1)]
    stacks[0][0, 0, 0, :4] = [0, 1, 256, 65535]  # bytes that differ when swapped
    batch = random_batch([s.shape for s in stacks], (4, 4), 20, seed=3)
    mixed = [stacks[0].astype(">u2"), stacks[1]]
    assert_equals_slicing(extract_patches(mixed, batch), stacks, batch)
    out = np.empty((20, 1, 4, 4), dtype=">u2")  # out in the stacks' other byte order
    assert_equals_slicing(extract_patches(mixed, batch, out=out).astype(np.uint16), stacks, batch)


@pytest.mark.parametrize(
    ("field", "error", "match"),
    [
        ("data_idx", IndexError, r"batch.data_idx\[1\] = 18446744073709551615 is out of range"),
        ("sample_idx", IndexError, r"batch.sample_idx\[1\] = 18446744073709551615 is out"),
        ("coords", ValueError, r"batch.coords\[1\] = \(0, 18446744073709551615\) puts"),
    ],
)
def test_a_uint64_row_is_named_with_the_value_given(
    setup: Any, field: str, error: type[Exception], match: str
) -> None:
    stacks, batch, out = setup
    arrays = {
        name: getattr(batch, name).astype(np.uint64)
        for name in ("data_idx", "sample_idx", "coords")
    }
    column = arrays[field]
    if field == "coords":
        column[1, 1] = 2**64 - 1
    else:
        column[1] = 2**64 - 1
    bad = PatchBatch(**arrays, indices=batch.indices, patch_size=batch.patch_size)
    raises_untouched(error, match, stacks, bad, out)


def test_a_uint64_corner_past_int64_is_refused_not_wrapped(setup: Any) -> None:
    # 2**63 + 6 wraps to a negative int64: it must be refused as the value given.
    stacks, batch, out = setup
    coords = batch.coords.astype(np.uint64)
    coords[0, 0] = 2**63 + 6
    bad = PatchBatch(batch.data_idx, batch.sample_idx, coords, batch.indices, batch.patch_size)
    match = r"batch.coords\[0\] = \(9223372036854775814, 8\)"
    raises_untouched(ValueError, match, stacks, bad, out)


def test_the_result_is_a_writable_copy_even_of_a_whole_image_of_a_read_only_stack() -> None:
    stack = values((2, 1, 6, 5), np.float32)
    stack.flags.writeable = False
    batch = make_batch([0, 0], [1, 0], [[0, 0], [0, 0]], (6, 5))
    result = extract_patches([stack], batch)
    assert result.flags.writeable and not np.shares_memory(result, stack)
    result *= 0
    np.testing.assert_array_equal(stack, values((2, 1, 6, 5), np.float32))
