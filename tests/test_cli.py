"""The gpu-patching command: demo, sample, bench, and its error exits."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from gpu_patching import BackendUnavailableError, StratifiedPatching
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


# -- the command never destroys input (issue: overwrite) ---------------------------


def sample_args(stack: Path, output: Path, *extra: str) -> list[str]:
    return ["sample", str(stack), "--axes", "SYX", "--patch", "8", "8", "--backend", "numpy",
            "-o", str(output), *extra]  # fmt: skip


@pytest.mark.parametrize("extra", [[], ["--overwrite"]])
def test_sample_never_writes_over_one_of_its_inputs(tmp_path, extra, capsys):
    stack = write_stack(tmp_path / "a.npy", np.arange(2 * 20 * 20).reshape(2, 20, 20))
    before = stack.read_bytes()
    assert main(sample_args(stack, stack, *extra)) == 2
    assert "it is the input" in capsys.readouterr().err
    assert stack.read_bytes() == before


def test_sample_never_writes_inside_a_zarr_input(tmp_path, capsys):
    store = write_stack(tmp_path / "s.zarr", np.zeros((2, 20, 20), dtype=np.uint8))
    assert main(sample_args(store, store / "epoch.npy")) == 2
    assert "it is the input" in capsys.readouterr().err
    assert not (store / "epoch.npy").exists()


def test_sample_replaces_an_existing_file_only_with_overwrite(tmp_path, capsys):
    stack = write_stack(tmp_path / "a.npy", np.zeros((2, 20, 20), dtype=np.uint8))
    output = tmp_path / "epoch.npy"
    output.write_bytes(b"keep me")
    assert main(sample_args(stack, output)) == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err
    assert output.read_bytes() == b"keep me"
    assert main(sample_args(stack, output, "--overwrite")) == 0
    assert np.load(output).shape[1] == 5
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_sample_and_demo_both_create_a_missing_output_folder(tmp_path):
    stack = write_stack(tmp_path / "a.npy", np.zeros((2, 20, 20), dtype=np.uint8))
    output = tmp_path / "new" / "folder" / "epoch.csv"
    assert main(sample_args(stack, output)) == 0
    assert output.read_text().startswith("index,")
    # demo: see test_demo.py (its --output folder is created the same way).


def test_demo_refuses_to_replace_pictures_before_any_work(tmp_path, capsys):
    (tmp_path / "coverage.png").write_bytes(b"old picture")
    assert main(["demo", "--output", str(tmp_path), "--no-progress"]) == 2
    captured = capsys.readouterr()
    assert "coverage.png exists; pass --overwrite" in captured.err
    assert captured.out == ""
    assert (tmp_path / "coverage.png").read_bytes() == b"old picture"


def test_demo_names_a_missing_image_before_the_pictures_already_in_its_output(tmp_path, capsys):
    (tmp_path / "coverage.png").write_bytes(b"old picture")
    missing = tmp_path / "missing.tif"
    assert main(["demo", "--image", str(missing), "--output", str(tmp_path)]) == 2
    error = capsys.readouterr().err
    assert f"no such file or folder: {missing}" in error
    assert "exists" not in error


def test_demo_checks_a_3d_image_before_the_pictures_already_in_its_output(tmp_path, capsys):
    (tmp_path / "coverage.png").write_bytes(b"old picture")
    np.save(tmp_path / "volume.npy", np.zeros((8, 32, 32), dtype=np.uint8))
    arguments = ["demo", "--image", str(tmp_path / "volume.npy"), "--axes", "ZYX"]
    assert main([*arguments, "--output", str(tmp_path)]) == 2
    assert "demo shows 2D images" in capsys.readouterr().err


def test_sample_names_a_missing_input_before_an_existing_output(tmp_path, capsys):
    output = tmp_path / "epoch.npy"
    output.write_bytes(b"keep me")
    missing = tmp_path / "missing.npy"
    assert main(sample_args(missing, output)) == 2
    error = capsys.readouterr().err
    assert f"no such file or folder: {missing}" in error
    assert output.read_bytes() == b"keep me"


def test_tests_run_outside_the_checkout_so_its_files_cannot_change_them():
    checkout = Path(__file__).resolve().parent.parent
    here = Path.cwd().resolve()
    assert here != checkout and checkout not in here.parents


# -- one line and exit status 2 for every error ----------------------------------


@pytest.mark.parametrize(
    "error",
    [
        ValueError("bad\nvalue"),
        TypeError("bad type"),
        IndexError("bad index"),
        OSError("disk full"),
        MemoryError(),
        OverflowError("too big"),
        BackendUnavailableError("backend='cuda' is unavailable: no CUDA device is visible"),
    ],
)
def test_every_error_of_the_library_is_one_line_and_exit_status_2(
    tmp_path, monkeypatch, error, capsys
):
    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr("gpu_patching.cli.StratifiedPatching", fail)
    stack = write_stack(tmp_path / "a.npy", np.zeros((2, 20, 20), dtype=np.uint8))
    assert main(sample_args(stack, tmp_path / "e.npy")) == 2
    message = capsys.readouterr().err
    assert message.count("\n") == 1
    assert message.startswith("gpu-patching sample: error: ")
    assert len(message.strip()) > len("gpu-patching sample: error: ")
    assert not (tmp_path / "e.npy").exists()


def test_sample_on_a_store_too_large_to_sample_is_one_line_and_exit_status_2(tmp_path, capsys):
    # 10**12 pixels declared, 8 KB on disk: 3.9e9 patches of 16x16 per sample.
    store = zarr.open(str(tmp_path / "huge.zarr"), mode="w", shape=(10**6, 10**6),
                      dtype="u1", chunks=(1000, 1000))  # fmt: skip
    del store
    status = main(["sample", str(tmp_path / "huge.zarr"), "--axes", "YX", "--patch", "16", "16",
                   "--backend", "numpy", "-o", str(tmp_path / "e.npy")])  # fmt: skip
    assert status == 2
    message = capsys.readouterr().err
    assert message.count("\n") == 1
    assert "Traceback" not in message


def test_cuda_backend_without_cupy_names_the_extra(tmp_path, monkeypatch, capsys):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "cupy" else find_spec(name, *a),
    )
    stack = write_stack(tmp_path / "a.npy", np.zeros((2, 20, 20), dtype=np.uint8))
    for arguments in (
        ["sample", str(stack), "--axes", "SYX", "--backend", "cuda", "-o", str(tmp_path / "e.npy")],
        ["demo", "--backend", "cuda", "--output", str(tmp_path / "pictures")],
    ):
        assert main(arguments) == 2
        message = capsys.readouterr().err
        assert message.count("\n") == 1
        assert "pip install 'gpu-patching[cuda12]'" in message
        assert "pip install 'gpu-patching[cuda13]'" in message
    assert not (tmp_path / "pictures").exists()


@pytest.mark.parametrize("module", ["matplotlib", "skimage", "tqdm"])
def test_demo_checks_its_optional_dependencies_before_any_work(
    tmp_path, monkeypatch, module, capsys
):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == module else find_spec(name, *a),
    )
    image = write_stack(tmp_path / "image.npy", np.zeros((64, 64), dtype=np.float32))
    output = tmp_path / "pictures"
    assert main(["demo", "--image", str(image), "--output", str(output)]) == 2
    captured = capsys.readouterr()
    assert f"needs {module}" in captured.err
    assert "pip install 'gpu-patching[cli]'" in captured.err
    assert captured.out == ""
    assert not output.exists()


def test_sample_checks_the_reader_of_its_inputs_before_any_work(tmp_path, monkeypatch, capsys):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec",
        lambda name, *a: None if name == "tifffile" else find_spec(name, *a),
    )  # fmt: skip
    status = main(["sample", str(tmp_path / "x.tif"), "--axes", "YX", "-o",
                   str(tmp_path / "e.npy")])  # fmt: skip
    assert status == 2
    assert "needs tifffile (reads .tif): pip install 'gpu-patching[cli]'" in capsys.readouterr().err


def test_sample_help_shows_the_default_patch_size(capsys):
    with pytest.raises(SystemExit):
        main(["sample", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "default 64 64 for 2D stacks, 32 64 64 for 3D" in text


# -- errors name the file ------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("noise.npy", bytes(range(256)) * 4, "is not a NumPy .npy file"),
        ("noise.tif", bytes(range(256)) * 4, "is not a readable TIFF file"),
        ("cut.tif", b"II*\x00" + bytes(range(100)), "is not a readable TIFF file"),
    ],
)
def test_a_damaged_file_is_named_in_one_line(tmp_path, name, content, message, capsys):
    path = tmp_path / name
    path.write_bytes(content)
    assert main(["sample", str(path), "--axes", "YX", "-o", str(tmp_path / "e.npy")]) == 2
    error = capsys.readouterr().err
    assert f"{path} {message}" in error
    assert error.count("\n") == 1
    assert "pickle" not in error


def test_a_truncated_npy_is_named(tmp_path, capsys):
    path = write_stack(tmp_path / "cut.npy", np.zeros((100, 100), dtype=np.float64))
    path.write_bytes(path.read_bytes()[:2000])
    assert main(["sample", str(path), "--axes", "YX", "-o", str(tmp_path / "e.npy")]) == 2
    assert f"{path} is not a readable .npy array" in capsys.readouterr().err


# -- bench writes into benchmarks/results/ only when asked ---------------------------------


def bench_arguments_seen_by_the_script(tmp_path: Path, *options: str) -> list[str]:
    """Run ``gpu-patching bench cpu OPTIONS``; the script only reports its arguments."""
    hook = tmp_path / "hook"
    hook.mkdir(exist_ok=True)
    (hook / "sitecustomize.py").write_text(
        "import json, os, sys\n"
        "if sys.argv and sys.argv[0].endswith('bench_cpu.py'):\n"
        "    print('script arguments', json.dumps(sys.argv[1:]), flush=True)\n"
        "    os._exit(0)  # SystemExit is fatal while site runs\n"
    )
    path = [str(hook), *filter(None, [os.environ.get("PYTHONPATH")])]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path)}
    result = subprocess.run(
        [sys.executable, "-m", "gpu_patching", "bench", "cpu", *options],
        capture_output=True, text=True, env=env, cwd=tmp_path, check=True,
    )  # fmt: skip
    line = next(x for x in result.stdout.splitlines() if x.startswith("script arguments"))
    return json.loads(line.removeprefix("script arguments "))


def test_bench_asks_the_scripts_to_write_no_file_by_default(tmp_path):
    assert bench_arguments_seen_by_the_script(tmp_path, "--quick") == ["--quick"]


def test_bench_write_results_is_passed_on_to_the_scripts(tmp_path):
    assert bench_arguments_seen_by_the_script(tmp_path, "--write-results") == ["--write-results"]


def test_bench_takes_an_output_folder_or_write_results_not_both(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "--write-results", "--output-dir", "x"])
    assert "not allowed with argument" in capsys.readouterr().err
