"""OME-Zarr images everywhere: open_stack, `gpu-patching sample` and `demo --image`.

Images are written by zarr here, with the metadata of the OME-Zarr
specification: v0.4 on zarr format 2 (``multiscales`` in the group's
attributes) and v0.5 on zarr format 3 (under ``ome``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from gpu_patching import StratifiedPatching, extract_patches
from gpu_patching.cli import main

zarr = pytest.importorskip("zarr", minversion="3")
pytest.importorskip("yaozarrs")
from conftest import sliced_patches  # noqa: E402
from ome_images import write_ome  # noqa: E402

from gpu_patching.stores import open_stack  # noqa: E402

VERSIONS = pytest.mark.parametrize("zarr_format", [2, 3], ids=["ome-zarr-0.4", "ome-zarr-0.5"])


def _data(shape: tuple[int, ...], seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 60000, shape, dtype=np.uint16)


#: metadata axes -> the image's shape, and the same pixels as SC(Z)YX.
IMAGES = {
    "yx": ((40, 36), lambda a: a[None, None]),
    "zyx": ((12, 40, 36), lambda a: a[None, None]),
    "tcyx": ((3, 2, 40, 36), lambda a: a),
    "tczyx": ((2, 2, 10, 40, 36), lambda a: a),
    "cyx": ((2, 40, 36), lambda a: a[None]),
}


@VERSIONS
@pytest.mark.parametrize("axes", list(IMAGES))
def test_an_ome_zarr_image_opens_with_the_axes_of_its_metadata(tmp_path, axes, zarr_format):
    shape, to_scyx = IMAGES[axes]
    full = _data(shape, seed=len(axes))
    path = write_ome(tmp_path / "image.ome.zarr", full, axes, zarr_format)
    stack = open_stack(path)
    expected = to_scyx(full)
    assert stack.shape == expected.shape
    patch = (4, 8, 8) if "z" in axes else (8, 8)
    batch = StratifiedPatching([stack.shape], patch, seed=3).sample_epoch(0).to_numpy()
    assert np.array_equal(extract_patches([stack], batch), sliced_patches(expected, batch))


@VERSIONS
def test_a_time_axis_becomes_samples(tmp_path, zarr_format):
    full = _data((3, 2, 40, 36), seed=1)
    stack = open_stack(write_ome(tmp_path / "image.ome.zarr", full, "tcyx", zarr_format))
    assert stack.shape[:2] == (3, 2)
    assert np.array_equal(stack[2, 1], full[2, 1])


@VERSIONS
def test_the_array_path_inside_the_group_opens_as_that_level_with_its_axes(tmp_path, zarr_format):
    full = _data((12, 40, 36), seed=2)
    path = write_ome(tmp_path / "image.ome.zarr", full, "zyx", zarr_format)
    stack = open_stack(path / "1")
    assert stack.shape == (1, 1, 12, 20, 18)
    assert stack.axes == open_stack(path, level=1).axes
    assert np.array_equal(stack[0, 0], full[:, ::2, ::2])


def test_axes_that_contradict_the_metadata_are_refused_naming_both(tmp_path):
    path = write_ome(tmp_path / "image.ome.zarr", _data((2, 40, 36), seed=3), "cyx", 3)
    with pytest.raises(ValueError, match=r"'ZYX'.*'CYX'"):
        open_stack(path, axes="ZYX")


def test_axes_that_agree_with_the_metadata_are_accepted(tmp_path):
    path = write_ome(tmp_path / "image.ome.zarr", _data((3, 40, 36), seed=4), "tyx", 3)
    assert open_stack(path, axes="tyx").shape == open_stack(path).shape == (3, 1, 40, 36)


def test_time_and_samples_together_are_refused():
    from gpu_patching.stores.axes import to_scyx_axes

    with pytest.raises(ValueError, match="both T and S"):
        to_scyx_axes("TSYX", 4)


# -- the command -------------------------------------------------------------------------------


def _sample(arguments: list[str], output: Path) -> np.ndarray:
    status = main(["sample", *arguments, "--seed", "5", "--backend", "numpy", "-o", str(output)])
    assert status == 0
    return np.load(output)


@VERSIONS
@pytest.mark.parametrize("axes", ["yx", "zyx", "tcyx", "tczyx"])
def test_sample_reads_an_ome_zarr_image_without_axes(tmp_path, axes, zarr_format):
    shape, _ = IMAGES[axes]
    path = write_ome(tmp_path / "image.ome.zarr", _data(shape, seed=5), axes, zarr_format)
    patch = ["4", "8", "8"] if "z" in axes else ["8", "8"]
    rows = _sample([str(path), "--patch", *patch], tmp_path / "rows.npy")
    stack = open_stack(path)
    expected = StratifiedPatching([stack.shape], tuple(map(int, patch)), seed=5).sample_epoch(0)
    assert np.array_equal(rows[:, 3:], expected.to_numpy().coords)
    assert np.array_equal(rows[:, 2], expected.to_numpy().sample_idx)


def test_sample_reads_the_level_asked_for(tmp_path):
    path = write_ome(tmp_path / "image.ome.zarr", _data((40, 36), seed=6), "yx", 2)
    rows = _sample([str(path), "--level", "1", "--patch", "8", "8"], tmp_path / "rows.npy")
    assert rows[:, 3].max() <= 20 - 8 and rows[:, 4].max() <= 18 - 8
    assert len(rows) == StratifiedPatching([(1, 1, 20, 18)], (8, 8), seed=5).n_patches


def test_sample_reads_the_array_path_inside_the_group(tmp_path):
    path = write_ome(tmp_path / "image.ome.zarr", _data((3, 2, 40, 36), seed=7), "tcyx", 3)
    whole = _sample([str(path), "--patch", "8", "8"], tmp_path / "whole.npy")
    level_0 = _sample([str(path / "0"), "--patch", "8", "8"], tmp_path / "level0.npy")
    assert np.array_equal(whole, level_0)


def test_sample_refuses_axes_that_contradict_the_metadata(tmp_path, capsys):
    path = write_ome(tmp_path / "image.ome.zarr", _data((2, 40, 36), seed=8), "cyx", 2)
    status = main(["sample", str(path), "--axes", "ZYX", "-o", str(tmp_path / "rows.npy")])
    error = capsys.readouterr().err
    assert status == 2
    assert "'ZYX'" in error and "'CYX'" in error


def test_sample_still_needs_axes_for_a_file_without_them(tmp_path, capsys):
    np.save(tmp_path / "stack.npy", _data((40, 36), seed=9))
    status = main(["sample", str(tmp_path / "stack.npy"), "-o", str(tmp_path / "rows.npy")])
    assert status == 2
    assert "--axes" in capsys.readouterr().err


@VERSIONS
@pytest.mark.parametrize("axes", ["yx", "tcyx"])
def test_demo_shows_an_ome_zarr_image_without_axes(tmp_path, axes, zarr_format, capsys):
    shape, _ = IMAGES[axes]
    full = (_data(shape, seed=10) // 8).astype(np.uint16)
    path = write_ome(tmp_path / "image.ome.zarr", full, axes, zarr_format)
    arguments = ["demo", "--image", str(path), "--patch", "8", "8", "--epochs", "2"]
    arguments += ["--output", str(tmp_path / "out"), "--no-progress", "--backend", "numpy"]
    arguments += ["--no-careamics"] + (["--sample", "2", "--channel", "1"] if "t" in axes else [])
    assert main(arguments) == 0
    samples = "sample 2 of 3, channel 1 of 2" if "t" in axes else "sample 0 of 1, channel 0 of 1"
    assert samples in capsys.readouterr().out


def test_demo_shows_the_level_and_array_path_asked_for(tmp_path, capsys):
    path = write_ome(tmp_path / "image.ome.zarr", _data((40, 36), seed=11), "yx", 3)
    common = ["--patch", "8", "8", "--epochs", "2", "--no-progress", "--backend", "numpy"]
    common += ["--no-careamics"]
    assert (
        main(
            ["demo", "--image", str(path), "--level", "1", "--output", str(tmp_path / "a"), *common]
        )
        == 0
    )
    assert main(["demo", "--image", str(path / "1"), "--output", str(tmp_path / "b"), *common]) == 0
    assert (
        main(
            ["demo", "--image", str(path), "--level", "2", "--output", str(tmp_path / "c"), *common]
        )
        == 2
    )
    assert "level 2 does not exist" in capsys.readouterr().err
