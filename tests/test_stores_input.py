"""Stores that are not what they should be are refused by name, or read exactly.

Malformed OME-Zarr metadata, stacks that disagree on dtype or channels,
big-endian stores, and a missing ``[stores]`` extra: each is either read
exactly as the same array in memory, or refused with an error that names the
store and what is wrong; never a ``KeyError``, never a silent cast.

Every store is written by zarr or tifffile into ``tmp_path``.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from gpu_patching import PatchLoader, StratifiedPatching, extract_patches
from gpu_patching.specs import PatchBatch
from gpu_patching.stores import ChunkReader, open_stack

zarr = pytest.importorskip("zarr", minversion="3")
tifffile = pytest.importorskip("tifffile", minversion="2025.5.21")


def _data(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 60000, shape, dtype=np.uint16)


def _batch(patch_size: tuple[int, ...], sample_idx: list[int], coords: list[Any]) -> PatchBatch:
    n = len(sample_idx)
    return PatchBatch(
        data_idx=np.zeros(n, np.int64),
        sample_idx=np.asarray(sample_idx, np.int64),
        coords=np.asarray(coords, np.int64).reshape(n, len(patch_size)),
        indices=np.arange(n, dtype=np.int64),
        patch_size=tuple(patch_size),
    )


# -- malformed OME-Zarr metadata -------------------------------------------------------------


def _ome_group(path: Path, attributes: dict[str, Any]) -> Path:
    """An OME-Zarr 0.5 group with one array '0' (CYX) and the given attributes."""
    group = zarr.open_group(str(path), mode="w", zarr_format=3)
    group.create_array("0", shape=(1, 16, 16), chunks=(1, 8, 8), dtype=np.uint16)
    group.attrs.update(attributes)
    return path


_AXES = [
    {"name": "c", "type": "channel"},
    {"name": "y", "type": "space"},
    {"name": "x", "type": "space"},
]
# Every dataset of an image has its scale (the specification requires it).
_SCALE = [{"type": "scale", "scale": [1.0, 1.0, 1.0]}]
_GOOD_IMAGE = {
    "version": "0.5",
    "axes": _AXES,
    "datasets": [{"path": "0", "coordinateTransformations": _SCALE}],
}

#: Malformed metadata -> the field the error must name.
MALFORMED = {
    "multiscales-missing": ({"ome": {"version": "0.5"}}, "multiscales"),
    "multiscales-a-mapping": ({"ome": {"multiscales": {"datasets": []}}}, "multiscales"),
    "multiscales-a-string": ({"multiscales": "0"}, "multiscales"),
    "multiscales-of-a-number": ({"multiscales": [3]}, "multiscales"),
    "datasets-missing": ({"ome": {"multiscales": [{"axes": _AXES}]}}, "datasets"),
    "datasets-a-mapping": (
        {"ome": {"multiscales": [{"axes": _AXES, "datasets": {"path": "0"}}]}},
        "datasets",
    ),
    "dataset-without-path": (
        {
            "ome": {
                "multiscales": [
                    {
                        "axes": _AXES,
                        "datasets": [{"name": "0", "coordinateTransformations": _SCALE}],
                    }
                ]
            }
        },
        "path",
    ),
    "dataset-a-string": ({"ome": {"multiscales": [{"axes": _AXES, "datasets": ["0"]}]}}, "path"),
    "path-a-number": (
        {
            "ome": {
                "multiscales": [
                    {"axes": _AXES, "datasets": [{"path": 0, "coordinateTransformations": _SCALE}]}
                ]
            }
        },
        "path",
    ),
    "path-does-not-exist": (
        {
            "ome": {
                "multiscales": [
                    {
                        "axes": _AXES,
                        "datasets": [{"path": "full", "coordinateTransformations": _SCALE}],
                    }
                ]
            }
        },
        "full",
    ),
    "ome-a-list": ({"ome": [_GOOD_IMAGE]}, "ome"),
    "ome-a-string": ({"ome": "0.5"}, "ome"),
    "axes-a-string": (
        {"ome": {"multiscales": [{"axes": "cyx", "datasets": [{"path": "0"}]}]}},
        "axes",
    ),
    "axis-without-name": (
        {"ome": {"multiscales": [{"axes": [{"type": "space"}] * 3, "datasets": [{"path": "0"}]}]}},
        "axes",
    ),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_ome_zarr_metadata_is_a_value_error_naming_the_store_and_field(tmp_path, case):
    attributes, field = MALFORMED[case]
    path = _ome_group(tmp_path / "image.zarr", attributes)
    with pytest.raises(ValueError) as raised:
        open_stack(path)
    assert str(path) in str(raised.value)
    assert field in str(raised.value)


def test_a_dataset_path_naming_a_group_is_a_value_error(tmp_path):
    attributes = {
        "ome": {
            "multiscales": [
                {
                    "axes": _AXES,
                    "datasets": [{"path": "labels", "coordinateTransformations": _SCALE}],
                }
            ]
        }
    }
    path = _ome_group(tmp_path / "image.zarr", attributes)
    zarr.open_group(str(path), mode="a").create_group("labels")
    with pytest.raises(ValueError, match=r"labels.*not an array"):
        open_stack(path)


def test_well_formed_ome_zarr_metadata_still_opens(tmp_path):
    path = _ome_group(tmp_path / "image.zarr", {"ome": {"multiscales": [_GOOD_IMAGE]}})
    assert open_stack(path).shape == (1, 1, 16, 16)


def test_the_command_prints_one_line_and_exits_2_on_malformed_ome_zarr(tmp_path, capsys):
    from gpu_patching.cli import main

    path = _ome_group(tmp_path / "image.zarr", MALFORMED["dataset-without-path"][0])
    status = main(["demo", "--image", str(path), "--axes", "CYX", "--output", str(tmp_path)])
    error = capsys.readouterr().err
    assert status == 2
    assert len(error.strip().splitlines()) == 1
    assert str(path) in error and "path" in error


# -- stacks that disagree ----------------------------------------------------------------------


def _store(path: Path, data: np.ndarray, zarr_format: int = 3) -> Any:
    array = zarr.create_array(
        str(path), shape=data.shape, chunks=(1, 1, 8, 8), dtype=data.dtype, zarr_format=zarr_format
    )
    array[...] = data
    return open_stack(array)


def test_a_reader_refuses_stacks_of_different_dtypes_naming_both(tmp_path):
    small = _store(tmp_path / "small.zarr", _data((1, 1, 16, 16)))
    # 1e9 does not fit in uint16: a cast to the first stack's dtype would give 51712.
    large = _store(tmp_path / "large.zarr", np.full((1, 1, 16, 16), 10**9, dtype=np.uint32))
    with pytest.raises(TypeError) as raised:
        ChunkReader([small, large])
    message = str(raised.value)
    assert "small.zarr" in message and "uint16" in message
    assert "large.zarr" in message and "uint32" in message


def test_a_reader_refuses_stacks_of_different_channel_counts_naming_both(tmp_path):
    one = _store(tmp_path / "one.zarr", _data((1, 1, 16, 16)))
    two = _store(tmp_path / "two.zarr", _data((1, 2, 16, 16)))
    with pytest.raises(ValueError) as raised:
        ChunkReader([one, two])
    message = str(raised.value)
    assert "one.zarr" in message and "two.zarr" in message and "channels" in message


def test_extract_patches_and_the_loader_refuse_stores_that_disagree(tmp_path):
    small = _store(tmp_path / "small.zarr", _data((1, 1, 16, 16)))
    large = _store(tmp_path / "large.zarr", np.full((1, 1, 16, 16), 10**9, dtype=np.uint32))
    two = _store(tmp_path / "two.zarr", _data((1, 2, 16, 16)))
    batch = _batch((8, 8), [0], [(0, 0)])
    for other, error in ((large, TypeError), (two, ValueError)):
        strategy = StratifiedPatching([small.shape, other.shape], (8, 8), seed=0)
        with pytest.raises(error):
            extract_patches([small, other], batch)
        with pytest.raises(error):
            PatchLoader([small, other], strategy, batch_size=4)


# -- byte order ----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [">u2", ">f4", ">i8"])
def test_a_big_endian_store_is_read_in_native_byte_order(tmp_path, dtype):
    data = _data((2, 1, 32, 32), seed=3).astype(dtype)
    stack = _store(tmp_path / "big.zarr", data, zarr_format=2)
    native = data.astype(data.dtype.newbyteorder("="))
    assert stack.dtype == native.dtype
    strategy = StratifiedPatching([stack.shape], (8, 8), seed=1)
    rows = strategy.sample_epoch(0).to_numpy()
    patches = extract_patches([stack], rows)
    assert patches.dtype.isnative
    assert np.array_equal(patches, extract_patches([native], rows))
    assert stack[1, 0].dtype.isnative and np.array_equal(stack[1, 0], native[1, 0])
    assert np.array_equal(stack.read_chunk((0, 0, 1, 2)), native[:1, :, 8:16, 16:24])


def test_a_loader_gives_tensors_of_a_big_endian_store(tmp_path):
    torch = pytest.importorskip("torch")
    data = _data((2, 1, 32, 32), seed=4).astype(">f4")
    stack = _store(tmp_path / "big.zarr", data, zarr_format=2)
    strategy = StratifiedPatching([stack.shape], (8, 8), seed=2)
    loader = PatchLoader([stack], strategy, batch_size=16, as_torch=True)
    for patches, batch in loader:
        assert patches.dtype == torch.float32
        assert np.array_equal(patches.numpy(), extract_patches([data.astype("=f4")], batch))


def test_a_big_endian_tiff_is_read_in_native_byte_order(tmp_path):
    data = _data((3, 32, 32), seed=5)
    tifffile.imwrite(
        tmp_path / "big.tif",
        data.astype(">u2"),
        byteorder=">",
        tile=(16, 16),
        photometric="minisblack",
    )
    stack = open_stack(tmp_path / "big.tif", axes="SYX")
    try:
        rows = StratifiedPatching([stack.shape], (8, 8), seed=3).sample_epoch(0).to_numpy()
        patches = extract_patches([stack], rows)
    finally:
        stack.close()
    assert patches.dtype == np.dtype("=u2")
    assert np.array_equal(patches, extract_patches([data[:, np.newaxis]], rows))


# -- without the [stores] extra --------------------------------------------------------------


def _without(module: str, code: str) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh interpreter in which ``module`` cannot be imported."""
    # A None entry in sys.modules makes every import of the module raise ImportError,
    # exactly as when it is not installed.
    script = f"import sys\nsys.modules[{module!r}] = None\n" + textwrap.dedent(code)
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)


@pytest.mark.parametrize("module", ["zarr", "tifffile"])
def test_opening_a_tiff_without_the_extra_names_the_extra(tmp_path, module):
    tifffile.imwrite(tmp_path / "a.tif", _data((16, 16)))
    result = _without(
        module,
        f"""
        from gpu_patching.stores import open_stack
        try:
            open_stack({str(tmp_path / "a.tif")!r})
        except ImportError as error:
            print(error)
        """,
    )
    assert result.returncode == 0, result.stderr
    assert "pip install 'gpu-patching[stores]'" in result.stdout


def test_opening_a_zarr_store_without_zarr_names_the_extra(tmp_path):
    _store(tmp_path / "a.zarr", _data((1, 1, 16, 16)))
    result = _without(
        "zarr",
        f"""
        from gpu_patching.stores import open_stack
        try:
            open_stack({str(tmp_path / "a.zarr")!r})
        except ImportError as error:
            print(error)
        """,
    )
    assert result.returncode == 0, result.stderr
    assert "pip install 'gpu-patching[stores]'" in result.stdout


@pytest.mark.parametrize(("module", "name"), [("zarr", "a.zarr"), ("tifffile", "a.tif")])
def test_reading_a_file_without_its_reader_names_the_extra(tmp_path, module, name):
    tifffile.imwrite(tmp_path / "a.tif", _data((16, 16)))
    _store(tmp_path / "a.zarr", _data((1, 1, 16, 16)))
    result = _without(
        module,
        f"""
        from gpu_patching.io import read_stack
        try:
            read_stack({str(tmp_path / name)!r}, "SCYX" if {name!r}.endswith(".zarr") else "YX")
        except ImportError as error:
            print(error)
        """,
    )
    assert result.returncode == 0, result.stderr
    assert "pip install 'gpu-patching[cli]'" in result.stdout


@pytest.mark.parametrize("suffix", [".npy", ".zarr"])
def test_read_stack_returns_a_big_endian_file_in_native_byte_order(tmp_path, suffix):
    from gpu_patching.io import read_stack

    data = _data((2, 1, 16, 16), seed=6).astype(">u2")
    path = tmp_path / f"big{suffix}"
    if suffix == ".npy":
        np.save(path, data)
    else:
        _store(path, data, zarr_format=2)
    stack = read_stack(path, "SCYX")
    assert stack.dtype == np.dtype("=u2")
    assert np.array_equal(stack, data)
