"""The gpu-patching command: demo, sample, bench, and its error exits."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from gpu_patching import StratifiedPatching
from gpu_patching.cli import main
from gpu_patching.io import read_shape, read_stack, to_scyx_axes

tifffile = pytest.importorskip("tifffile")
zarr = pytest.importorskip("zarr")


def write_stack(path: Path, data: np.ndarray) -> Path:
    suffix = path.suffix
    if suffix == ".npy":
        np.save(path, data)
    elif suffix in (".tif", ".tiff"):
        tifffile.imwrite(path, data, photometric="minisblack")
    elif suffix == ".zarr":
        array = zarr.open(str(path), mode="w", shape=data.shape, dtype=data.dtype)
        array[...] = data
    return path


@pytest.mark.parametrize("suffix", [".npy", ".tif", ".zarr"])
def test_sample_writes_the_epoch_that_the_library_draws(tmp_path, suffix, capsys):
    stack = write_stack(tmp_path / f"stack{suffix}", np.zeros((3, 70, 90), dtype=np.uint16))
    output = tmp_path / "epoch.npy"
    status = main(
        ["sample", str(stack), "--axes", "SYX", "--patch", "16", "16", "--seed", "7",
         "--epoch", "2", "--backend", "numpy", "-o", str(output)]
    )  # fmt: skip
    assert status == 0
    written = np.load(output)
    batch = StratifiedPatching([(3, 1, 70, 90)], (16, 16), seed=7, backend="numpy").sample_epoch(2)
    expected = np.column_stack([batch.indices, batch.data_idx, batch.sample_idx, batch.coords])
    np.testing.assert_array_equal(written, expected)
    assert "written to" in capsys.readouterr().out


def test_sample_csv_has_a_header_and_the_same_rows_as_npy(tmp_path):
    stack = write_stack(tmp_path / "vol.npy", np.zeros((2, 20, 40, 50), dtype=np.float32))
    arguments = ["sample", str(stack), "--axes", "CZYX", "--patch", "8", "16", "16",
                 "--seed", "3", "--backend", "numpy"]  # fmt: skip
    assert main([*arguments, "-o", str(tmp_path / "a.csv")]) == 0
    assert main([*arguments, "-o", str(tmp_path / "a.npy")]) == 0
    lines = (tmp_path / "a.csv").read_text().splitlines()
    assert lines[0] == "index,data_idx,sample_idx,z,y,x"
    rows = np.loadtxt(tmp_path / "a.csv", delimiter=",", skiprows=1, dtype=np.int64, ndmin=2)
    np.testing.assert_array_equal(rows, np.load(tmp_path / "a.npy"))


def test_sample_takes_several_stacks_as_data_indices(tmp_path):
    first = write_stack(tmp_path / "a.npy", np.zeros((40, 40), dtype=np.uint8))
    second = write_stack(tmp_path / "b.npy", np.zeros((64, 30), dtype=np.uint8))
    output = tmp_path / "e.npy"
    assert main(["sample", str(first), str(second), "--axes", "YX", "--patch", "8", "8",
                 "-o", str(output), "--backend", "numpy"]) == 0  # fmt: skip
    table = np.load(output)
    assert set(np.unique(table[:, 1]).tolist()) == {0, 1}


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["sample", "missing.npy", "--axes", "YX", "-o", "x.npy"], "no such file"),
        (["sample", "STACK", "--axes", "QYX", "-o", "x.npy"], "unknown letter"),
        (["sample", "STACK", "--axes", "YX", "-o", "x.npy"], "has 2 letters but the data has 3"),
        (["sample", "STACK", "--axes", "SYY", "-o", "x.npy"], "repeats"),
        (["sample", "STACK", "--axes", "SYX", "-o", "x.txt"], ".npy or .csv"),
        (["sample", "STACK", "--axes", "SYX", "--patch", "8", "-o", "x.npy"], "needs 2 sizes"),
        (["sample", "STACK", "--axes", "SYX", "--patch", "99", "8", "-o", "x.npy"], "larger"),
        (["sample", "BAD.txt", "--axes", "YX", "-o", "x.npy"], "unsupported file type"),
        (["demo", "--image", "missing.tif"], "no such file"),
    ],
)
def test_bad_input_is_one_line_on_stderr_and_exit_status_2(tmp_path, arguments, message, capsys):
    stack = write_stack(tmp_path / "s.npy", np.zeros((2, 40, 40), dtype=np.uint8))
    (tmp_path / "bad.txt").write_text("nothing")
    arguments = [
        {"STACK": str(stack), "BAD.txt": str(tmp_path / "bad.txt")}.get(a, a) for a in arguments
    ]
    arguments = [str(tmp_path / a) if a.endswith(("x.npy", "x.txt")) else a for a in arguments]
    assert main(arguments) == 2
    error = capsys.readouterr().err
    assert message in error
    assert error.count("\n") == 1
    assert "Traceback" not in error


def test_console_entry_point_reports_errors_without_traceback(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "gpu_patching", "sample", str(tmp_path / "nope.npy"),
         "--axes", "YX", "-o", str(tmp_path / "o.npy")],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "no such file" in result.stderr


@pytest.mark.parametrize("command", [[], ["demo"], ["sample"], ["bench"]])
def test_every_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([*command, "--help"])
    assert exit_info.value.code == 0
    assert "usage: gpu-patching" in capsys.readouterr().out


def test_bench_rejects_unknown_benchmark_names(capsys):
    assert main(["bench", "no-such-bench"]) == 2
    assert "unknown benchmark" in capsys.readouterr().err


def test_axes_are_rearranged_to_scyx(tmp_path):
    data = np.arange(2 * 3 * 5 * 4, dtype=np.int32).reshape(5, 4, 3, 2)  # axes Y X C S
    path = write_stack(tmp_path / "yxcs.npy", data)
    assert read_shape(path, "YXCS") == (2, 3, 5, 4)
    np.testing.assert_array_equal(read_stack(path, "YXCS"), data.transpose(3, 2, 0, 1))
    assert to_scyx_axes("zyx", 3) == ([0, 1, 2], "ZYX")
