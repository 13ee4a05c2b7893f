"""gpu-patching demo: the main job writes its pictures and prints its table."""

from __future__ import annotations

import numpy as np
import pytest

from gpu_patching.cli import main

pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")

PICTURES = ("image.png", "region-probabilities.png", "coverage.png")


def test_demo_on_a_named_file_writes_the_pictures_and_prints_the_table(tmp_path, capsys):
    rng = np.random.default_rng(0)
    image = rng.normal(100, 10, (96, 128)).astype(np.float32)
    image[:, :40] = 5  # a dark background band
    path = tmp_path / "image.npy"
    np.save(path, image)
    output = tmp_path / "pictures"
    status = main(
        ["demo", "--image", str(path), "--axes", "YX", "--patch", "16", "16",
         "--epochs", "3", "--output", str(output), "--no-progress", "--backend", "numpy"]
    )  # fmt: skip
    assert status == 0
    for name in PICTURES:
        picture = output / name
        assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    for label in ("stratified", "uniform", "patches per epoch", "validation", "background"):
        assert label in printed
    assert "validation pixels covered by training patches: 0" in printed


def test_demo_defaults_to_the_bundled_cell_image(tmp_path, capsys):
    pytest.importorskip("skimage")
    status = main(["demo", "--epochs", "2", "--output", str(tmp_path), "--no-progress",
                   "--backend", "numpy"])  # fmt: skip
    assert status == 0
    assert "cell" in capsys.readouterr().out
    assert all((tmp_path / name).exists() for name in PICTURES)


def test_demo_rejects_a_3d_stack_with_one_line(tmp_path, capsys):
    path = tmp_path / "volume.npy"
    np.save(path, np.zeros((8, 32, 32), dtype=np.uint8))
    assert main(["demo", "--image", str(path), "--axes", "ZYX", "--output", str(tmp_path)]) == 2
    assert "2D" in capsys.readouterr().err
