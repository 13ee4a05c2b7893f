"""Stores that are not what they should be are refused by name, or read exactly.

Malformed OME-Zarr metadata, stacks that disagree on dtype or channels,
big-endian stores, and a missing ``[stores]`` extra: each is either read
exactly as the same array in memory, or refused with an error that names the
store and what is wrong; never a ``KeyError``, never a silent cast.

Every store is written by zarr or tifffile into ``tmp_path``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from gpu_patching.specs import PatchBatch
from gpu_patching.stores import open_stack

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


_AXES = [{"name": "c", "type": "channel"}, {"name": "y"}, {"name": "x"}]
_GOOD_IMAGE = {"version": "0.5", "axes": _AXES, "datasets": [{"path": "0"}]}

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
        {"ome": {"multiscales": [{"axes": _AXES, "datasets": [{"name": "0"}]}]}},
        "path",
    ),
    "dataset-a-string": ({"ome": {"multiscales": [{"axes": _AXES, "datasets": ["0"]}]}}, "path"),
    "path-a-number": (
        {"ome": {"multiscales": [{"axes": _AXES, "datasets": [{"path": 0}]}]}},
        "path",
    ),
    "path-does-not-exist": (
        {"ome": {"multiscales": [{"axes": _AXES, "datasets": [{"path": "full"}]}]}},
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
    attributes = {"ome": {"multiscales": [{"axes": _AXES, "datasets": [{"path": "labels"}]}]}}
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
