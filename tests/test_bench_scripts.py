"""The CPU, crop and filter benchmark scripts, run end to end on tiny cases.

Each script's measurements run for real (on the host; the crop script's GPU
part on a host stand-in for CuPy and the shipped crop kernel compiled for the
host), and their results feed the scripts' own report code: a table that reads
a result a measurement does not return fails here. The timings themselves are
not checked (speed is for the scripts to report, not for tests to assert).
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
from bench_host import host_cupy
from conftest import sliced_patches

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
if str(BENCHMARKS) not in sys.path:
    sys.path.insert(0, str(BENCHMARKS))  # the scripts import _report by name


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


bench_cpu = _load("bench_cpu")
bench_crop = _load("bench_crop")
bench_filters = _load("bench_filters")


def _table(text: str, header_start: str) -> list[list[str]]:
    """The rows of the markdown table whose header starts with ``header_start``."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header_start))
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    width = len(lines[start].strip("|").split("|"))
    assert all(len(row) == width for row in rows), rows
    return rows


# -- bench_cpu ----------------------------------------------------------------------------


def test_bench_cpu_reports_every_case_against_the_reference(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    tiny = ("tiny: 256x192, 32x32", [(1, 1, 256, 192)], (32, 32))
    monkeypatch.setattr(bench_cpu, "CASES", [tiny])
    monkeypatch.setattr(bench_cpu, "SCALING", [("48", [(1, 1, 256, 192)], (32, 32))])
    output = tmp_path / "cpu.md"
    text = bench_cpu.main(["--quick", "--output", str(output)])
    capsys.readouterr()
    assert output.read_text() == text
    rows = _table(text, "| case | patches | what |")
    whats = [row[2] for row in rows]
    assert whats[:6] == [what for _, what in bench_cpu.CASE_ROWS]
    referenced = "reference not available" not in text
    if referenced:  # CAREamics installed: every row has a ratio, and the per-patch row
        assert whats[6] == "epoch cost per patch"
        assert all(row[5].startswith("x") for row in rows)
    else:
        assert all(row[5] == "n/a" for row in rows)
    scaling = _table(text, "| regions | patches | setup / region |")
    assert [row[0] for row in scaling] == ["48 (48)"]
    orders = _table(text, "| case | patches | plain epoch |")
    assert len(orders) == 1 and orders[0][4].startswith(("+", "-"))


# -- bench_filters --------------------------------------------------------------------------


def test_bench_filters_reports_every_statistic_and_the_target(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(bench_filters, "QUICK_SHAPE", (256, 192))
    monkeypatch.setattr(bench_filters, "PILOT_REGIONS", 10)
    output = tmp_path / "filters.md"
    text = bench_filters.main(["--quick", "--no-gpu", "--output", str(output)])
    capsys.readouterr()
    assert output.read_text() == text
    rows = _table(text, "| what | region-by-region loop |")
    whats = [row[0] for row in rows]
    for name in ("mean", "std", "max", "mean + std + max", "entropy", "coverage"):
        assert name in whats
        assert rows[whats.index(name)][3].startswith("x")  # loop / ours
    assert any(what.startswith("filter_background") for what in whats)
    assert "Target of issue 6: filtering at least x100" in text
    assert "## GPU\n\nNot run: skipped with --no-gpu." in text


# -- bench_crop -------------------------------------------------------------------------------


@pytest.fixture
def tiny_crops(monkeypatch: pytest.MonkeyPatch) -> None:
    cases = (
        bench_crop.Case("8x8 float32", (2, 1, 64, 48), (8, 8)),
        bench_crop.Case("4x8x8 float32", (2, 1, 8, 16, 16), (4, 8, 8)),
    )
    monkeypatch.setattr(bench_crop, "CASES", cases)
    monkeypatch.setattr(bench_crop, "BATCHES", (4, 16))
    monkeypatch.setattr(bench_crop, "TARGET_BATCH", 16)
    monkeypatch.setattr(bench_crop, "BANDWIDTH_BYTES", 1 << 12)


@pytest.mark.usefixtures("tiny_crops")
def test_bench_crop_cpu_part_compares_the_two_methods(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(bench_crop, "usable_cupy", lambda: (None, "no GPU in this test"))
    output = tmp_path / "crop-cpu.md"
    assert bench_crop.main(["--quick", "--output", str(output)]) == 0
    capsys.readouterr()
    text = output.read_text()
    rows = _table(text, "| patch | batch | method |")
    assert len(rows) == 2 * 2 * 4  # cases x batches x methods
    assert {row[2] for row in rows} == {
        "extract_patches (NumPy)",
        "extract_patches (NumPy), out= reused",
        "per-patch slicing loop",
        "per-patch slicing loop, out reused",
    }
    assert "Both methods give identical arrays in every case: yes" in text
    assert "GPU part: skipped: no GPU in this test" in text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["crop-cpu.md"]


@pytest.mark.usefixtures("tiny_crops")
def test_bench_crop_cpu_part_sets_each_host_path_beside_the_reused_buffer_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(bench_crop, "usable_cupy", lambda: (None, "no GPU in this test"))
    output = tmp_path / "crop-cpu.md"
    assert bench_crop.main(["--quick", "--output", str(output)]) == 0
    capsys.readouterr()
    rows = _table(output.read_text(), "| patch | batch | loop, out reused |")
    assert [(row[0], row[1]) for row in rows] == [
        ("8x8 float32", "4"),
        ("8x8 float32", "16"),
        ("4x8x8 float32", "4"),
        ("4x8x8 float32", "16"),
    ]
    # extract_patches (out= reused, new output) and PatchLoader, each as a ratio
    assert all(row[k].startswith("x") for row in rows for k in (4, 7, 11))
    # what allocating a new output alone costs, beside the new-output ratio
    assert all(row[8].endswith("s") for row in rows)


@pytest.mark.usefixtures("tiny_crops")
def test_bench_crop_gpu_report_from_the_host_launched_kernel(
    host_kernels: Any, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from gpu_patching.crop import DeviceCrop

    # The prepared launch gets the shipped crop kernel compiled for the host.
    cropper = DeviceCrop(xp=np, functions=host_kernels.functions())
    monkeypatch.setattr(bench_crop.crop_module, "device_crop", lambda: cropper)
    cupy = host_cupy()
    results, copy_bandwidth = bench_crop.run_gpu(cupy, quick=True)
    cpu = bench_crop.run_cpu(quick=True)
    capsys.readouterr()
    assert copy_bandwidth > 0
    assert [(r["case"].label, r["n_rows"]) for r in results] == [
        ("8x8 float32", 4),
        ("8x8 float32", 16),
        ("4x8x8 float32", 4),
        ("4x8x8 float32", 16),
    ]
    assert all(r["same"] for r in results)  # the host kernel agrees with slicing
    text = bench_crop.gpu_markdown(cupy, results, copy_bandwidth, cpu)
    rows = _table(text, "| patch | batch | method | time per batch |")
    assert len(rows) == 4 * 5  # cases x batches x methods
    assert all(row[-1].endswith("%") for row in rows)  # a fraction of the copy bandwidth
    assert "All methods give identical arrays in every case: yes" in text
    verdicts = [line for line in text.splitlines() if line.startswith("- ")]
    assert len(verdicts) == 2 and all("batch 16: crop kernel at" in v for v in verdicts)
    assert "GPU: Host stand-in (device 0, 2 SMs" in text
    assert len(_table(text, "| patch | batch | method | time per batch | patches/s | GB/s |")) > 0


@pytest.mark.usefixtures("tiny_crops")
def test_bench_crop_gpu_only_writes_the_gpu_report_alone(
    host_kernels: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from gpu_patching.crop import DeviceCrop

    cropper = DeviceCrop(xp=np, functions=host_kernels.functions())
    monkeypatch.setattr(bench_crop.crop_module, "device_crop", lambda: cropper)
    monkeypatch.setattr(bench_crop, "usable_cupy", lambda: (host_cupy(), ""))
    assert bench_crop.main(["--gpu-only", "--output", str(tmp_path / "crop-cpu.md")]) == 0
    capsys.readouterr()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["crop-gpu-host-stand-in.md"]
    text = (tmp_path / "crop-gpu-host-stand-in.md").read_text()
    assert len(_table(text, "| patch | batch | method | time per batch |")) == 4 * 5
    assert text.rstrip().endswith(
        "## The same cases on this machine's CPU (NumPy stacks)\n\nNot run (--gpu-only)."
    )


def test_bench_filters_gpu_only_without_a_gpu_says_so_for_both_halves(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(bench_filters, "SHAPE", (256, 192))
    monkeypatch.setattr(bench_filters, "usable_cupy", lambda: (None, "no GPU in this test"))
    text = bench_filters.main(["--gpu-only", "--output", str(tmp_path / "f.md")])
    capsys.readouterr()
    assert "## CPU: " in text and "Not run (--gpu-only)." in text
    assert "Not run: no GPU in this test." in text
    assert "| what |" not in text
    with pytest.raises(SystemExit):
        bench_filters.main(["--gpu-only", "--no-gpu"])


# -- bench_careamics --quick: a case smaller than a batch -------------------------------


def test_a_loader_of_one_batch_has_no_rate_and_its_ratios_read_n_a() -> None:
    from gpu_patching import StratifiedPatching

    bench_careamics = _load("bench_careamics")
    # The --quick 3D case: 16 patches, fewer than a batch of 32.
    sampler = StratifiedPatching([(1, 1, 16, 256, 256)], (16, 64, 64), seed=0, backend="numpy")
    assert sampler.n_patches < bench_careamics.BATCH_SIZE
    volume = np.zeros((16, 256, 256), dtype=np.float32)
    rate = bench_careamics.patch_loader_rate([volume], sampler, batches=8)
    assert rate is None
    assert bench_careamics.fmt_rate(rate) == "n/a"
    assert bench_careamics.fmt_ratio(rate, 100.0) == "n/a"


def test_a_ratio_over_nothing_measured_reads_n_a() -> None:
    import _report

    assert _report.fmt_ratio(5.0, 0.0, 1) == "n/a"
    assert _report.fmt_ratio(5.0, 2.0, 1) == "x2.5"


# -- results are written only when asked, and a partial run keeps the rest ---------------


def test_a_benchmark_prints_its_report_and_writes_no_file_unless_asked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(
        bench_cpu, "CASES", [("tiny: 256x192, 32x32", [(1, 1, 256, 192)], (32, 32))]
    )
    monkeypatch.setattr(bench_cpu, "SCALING", [("48", [(1, 1, 256, 192)], (32, 32))])
    monkeypatch.setattr(bench_cpu, "RESULTS", tmp_path / "results" / "cpu.md")
    text = bench_cpu.main(["--quick", "--no-reference"])
    assert "| case | patches | what |" in capsys.readouterr().out
    assert "| case | patches | what |" in text
    assert not (tmp_path / "results").exists()


def test_write_results_keeps_the_sections_this_run_did_not_redo(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    results = tmp_path / "filters.md"
    results.write_text("# Region statistics\n\n## CPU: old machine\n\nold CPU figures\n\n"
                       "## GPU: NVIDIA H100\n\nold GPU figures\n")  # fmt: skip
    monkeypatch.setattr(bench_filters, "QUICK_SHAPE", (256, 192))
    monkeypatch.setattr(bench_filters, "PILOT_REGIONS", 10)
    monkeypatch.setattr(bench_filters, "RESULTS", results)
    bench_filters.main(["--quick", "--no-gpu", "--write-results"])
    capsys.readouterr()
    merged = results.read_text()
    assert "old CPU figures" not in merged  # rerun: replaced
    assert "| what | region-by-region loop |" in merged
    gpu = merged[merged.index("## GPU: NVIDIA H100") :]
    assert "old GPU figures" in gpu  # not rerun (--no-gpu): kept, and said so
    assert "Not rerun in the latest run" in gpu
    assert "Not run: skipped with --no-gpu." not in merged


def test_merge_sections_replaces_rerun_sections_and_keeps_the_others_in_place() -> None:
    import _report

    old = "# T\nold machine\n## A: x\n\nold a\n## B\n\nold b\n## C\n\nold c\n"
    new = "# T\nnew machine\n## A: y\n\nnew a\n## B\n\nNot run (--gpu-only).\n## D\n\nnew d\n"
    merged = _report.merge_sections(old, new)
    assert merged == (
        "# T\nnew machine\n## A: y\n\nnew a\n"
        f"## B\n\n{_report.KEPT_NOTE}\n\nold b\n"
        f"## C\n\n{_report.KEPT_NOTE}\n\nold c\n"
        "## D\n\nnew d\n"
    )
    assert _report.merge_sections(merged, new) == merged  # the note is added once


# -- every script goes through the one harness (benchmarks/_report.py) -------------------

SCRIPTS = sorted(path.stem for path in BENCHMARKS.glob("bench_*.py"))


@pytest.mark.parametrize("name", SCRIPTS)
def test_every_script_takes_its_shared_flags_from_the_harness(name: str) -> None:
    source = (BENCHMARKS / f"{name}.py").read_text()
    assert "script_parser(" in source  # --quick, --output, --write-results, ...
    assert "ArgumentParser(" not in source  # no parser of its own
    assert "getloadavg" not in source  # the machine's load: load_line()


@pytest.mark.parametrize("name", SCRIPTS)
def test_every_script_offers_quick_output_and_write_results(name: str) -> None:
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / f"{name}.py"), "--help"],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    for flag in ("--quick", "--output", "--write-results"):
        assert flag in done.stdout, (name, flag)


def test_bench_access_runs_quick_through_the_harness_into_its_output(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    bench_access = _load("bench_access")
    tiny = ("tiny: 256x192, 32x32", [(1, 1, 256, 192)], (32, 32), True)
    monkeypatch.setattr(bench_access, "QUICK_CASES", [tiny])
    monkeypatch.setattr(bench_access, "RESULTS", tmp_path / "results" / "access.md")
    output = tmp_path / "access.md"
    text = bench_access.main(["--quick", "--output", str(output)])
    assert f"written to {output}" in capsys.readouterr().out
    assert output.read_text() == text and not (tmp_path / "results").exists()
    rows = _table(text, "| case | patches | order |")
    assert [row[2] for row in rows] == bench_access.ORDERS
    assert all(row[4] != "n/a" for row in rows)  # ours is always measured
    lock = _table(text, "| case | order | one thread (no lock) |")
    assert [row[1] for row in lock] == ["sequential", "with replacement"]


def test_bench_memory_runs_quick_through_the_harness_into_its_output(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    bench_memory = _load("bench_memory")
    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("bench_memory needs Linux's /proc/self/clear_refs")
    tiny = ("tiny: 256x192, 32x32", [(1, 1, 256, 192)], (32, 32))
    monkeypatch.setattr(bench_memory, "QUICK_CASES", [tiny])
    monkeypatch.setattr(bench_memory, "RESULTS", tmp_path / "results" / "memory.md")
    output = tmp_path / "memory.md"
    text = bench_memory.main(["--quick", "--output", str(output)])
    assert f"written to {output}" in capsys.readouterr().out
    assert output.read_text() == text and not (tmp_path / "results").exists()
    rows = _table(text, "| case | regions |")
    assert len(rows) == 1 and rows[0][1] == "48"
    assert len(rows[0]) == 2 + len(bench_memory.OURS)


# -- the GPU rows of bench_access, bench_memory, bench_stores and bench_careamics ---------


def test_bench_access_gpu_only_without_a_gpu_says_why_and_measures_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    bench_access = _load("bench_access")
    monkeypatch.setattr(bench_access, "usable_cupy", lambda: (None, "no GPU in this test"))
    text = bench_access.main(["--quick", "--gpu-only", "--output", str(tmp_path / "a.md")])
    capsys.readouterr()
    assert f"{bench_access.GPU_HEADING}\n\nNot run: no GPU in this test." in text
    assert "| case | patches | order |" not in text  # no CPU table, no GPU figure


def test_bench_access_gpu_table_sets_the_cuda_backend_beside_numpy_in_every_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    bench_access = _load("bench_access")
    tiny = ("tiny: 256x192, 32x32", [(1, 1, 256, 192)], (32, 32), True)
    monkeypatch.setattr(bench_access, "QUICK_CASES", [tiny])
    # The table's code on the host: the NumPy backend stands in for the CUDA one.
    monkeypatch.setattr(bench_access, "GPU_BACKEND", "numpy")
    monkeypatch.setattr(bench_access, "usable_cupy", lambda: (host_cupy(), ""))
    text = bench_access.main(["--quick", "--gpu-only", "--output", str(tmp_path / "a.md")])
    capsys.readouterr()
    rows = _table(text, "| case | patches | order | gpu-patching (numpy) | gpu-patching (cuda) |")
    assert [row[2] for row in rows] == bench_access.ORDERS
    assert all(row[3] != "n/a" and row[4] != "n/a" and row[5].startswith("x") for row in rows)


def test_bench_memory_gpu_only_without_a_gpu_says_why_and_measures_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    bench_memory = _load("bench_memory")
    monkeypatch.setattr(bench_memory, "usable_cupy", lambda: (None, "no GPU in this test"))
    text = bench_memory.main(["--quick", "--gpu-only", "--output", str(tmp_path / "m.md")])
    capsys.readouterr()
    assert f"{bench_memory.GPU_HEADING}\n\nNot run: no GPU in this test." in text
    assert "| case | regions |" not in text


def test_bench_memory_device_table_gives_peak_and_kept_bytes_of_every_operation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from types import SimpleNamespace

    bench_memory = _load("bench_memory")
    tiny = ("tiny: 256x192, 32x32", [(1, 1, 256, 192)], (32, 32))
    monkeypatch.setattr(bench_memory, "QUICK_CASES", [tiny])
    monkeypatch.setattr(bench_memory, "GPU_BACKEND", "numpy")  # the table's code on the host
    # A pool that grows by 480 bytes per operation and keeps 96 of them in use.
    used, total = [0], [0]

    def free_all_blocks() -> None:
        total[0] = used[0]

    def step() -> None:
        total[0] += 480
        used[0] += 96

    cupy = host_cupy()
    pool = SimpleNamespace(
        free_all_blocks=free_all_blocks, used_bytes=lambda: used[0], total_bytes=lambda: total[0]
    )
    cupy.get_default_memory_pool = lambda: pool
    steps = bench_memory.device_steps
    monkeypatch.setattr(
        bench_memory,
        "device_steps",
        lambda shapes, patch: {
            k: (lambda s, f=f: (step(), f(s))[1]) for k, f in steps(shapes, patch).items()
        },
    )
    monkeypatch.setattr(bench_memory, "usable_cupy", lambda: (cupy, ""))
    text = bench_memory.main(["--quick", "--gpu-only", "--output", str(tmp_path / "m.md")])
    capsys.readouterr()
    rows = _table(text, "| case | regions | bytes per region |")
    assert [row[2] for row in rows] == ["peak", "kept"]
    assert rows[0][1] == "48"
    assert rows[0][3:] == ["10"] * len(bench_memory.OURS)  # 480 bytes over 48 regions
    assert rows[1][3:] == ["2"] * len(bench_memory.OURS)  # 96 bytes kept


def test_bench_stores_gpu_only_without_a_gpu_says_why_and_writes_no_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    bench_stores = _load("bench_stores")
    monkeypatch.setattr(bench_stores, "usable_cupy", lambda: (None, "no GPU in this test"))
    stores = tmp_path / "stores"
    argv = ["--quick", "--gpu-only", "--store-dir", str(stores), "--output", str(tmp_path / "s.md")]
    text = bench_stores.main(argv)
    capsys.readouterr()
    assert f"{bench_stores.DEVICE_HEADING}\n\nNot run: no GPU in this test." in text
    assert "## Throughput" not in text and "## Peak memory" not in text
    assert not stores.exists()


def test_bench_stores_device_output_rate_counts_the_batches_of_a_real_store(
    tmp_path: Path,
) -> None:
    pytest.importorskip("zarr")
    bench_stores = _load("bench_stores")
    from gpu_patching import StratifiedPatching
    from gpu_patching.stores import open_stack

    case = bench_stores.Case("2D", (512, 512), (256, 256), (64, 64))
    stack = open_stack(bench_stores.ensure_store(tmp_path, case))
    strategy = StratifiedPatching([stack.shape], case.patch, seed=0)
    rate, done = bench_stores.device_output_rate(stack, strategy, host_cupy(), False, 0.0)
    # At least three batches (or the whole epoch when it has fewer).
    assert done == min(3 * bench_stores.BATCH, strategy.n_patches) and rate > 0


def test_bench_careamics_gpu_only_without_a_gpu_says_why_and_trains_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    bench_careamics = _load("bench_careamics")
    monkeypatch.setattr(bench_careamics, "usable_cupy", lambda: (None, "no GPU in this test"))
    output = tmp_path / "train-gpu.md"
    text = bench_careamics.main(["--quick", "--gpu-only", "--output", str(output)])
    capsys.readouterr()
    assert output.read_text() == text
    assert f"{bench_careamics.GPU_HEADING}\n\nNot run: no GPU in this test." in text
    assert "| sampler |" not in text


# -- bench_stores: issue 22's chunk order, two ranks and the local S3 server --------------


def test_bench_stores_chunk_order_only_runs_quick_into_its_output_with_its_three_sections(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("zarr")
    bench_stores = _load("bench_stores")
    stores, output = tmp_path / "stores", tmp_path / "chunks.md"
    argv = ["--quick", "--chunk-order-only", "--store-dir", str(stores), "--output", str(output)]
    text = bench_stores.main(argv)
    printed = capsys.readouterr().out
    assert output.read_text() == text
    for heading in (bench_stores.CHUNK_HEADING, bench_stores.RANKS_HEADING):
        assert heading in text and heading in printed
    assert bench_stores.S3_HEADING in text
    assert "## Throughput" not in text and "## Peak memory" not in text
    assert "## Device output" not in text
    rows = _table(text, "| order | patches | chunk decodes |")
    assert [row[0] for row in rows] == [
        "floor: every chunk once",
        "shuffled (default)",
        "order='chunks'",
        "order='chunks', no patch copied (diagnostic)",
    ]
    assert len({row[1] for row in rows}) == 1  # --quick: whole epochs in every order
    assert not stores.exists()  # no --keep


def test_reading_every_chunk_once_decodes_each_chunk_of_the_store_once(tmp_path: Path) -> None:
    pytest.importorskip("zarr")
    bench_stores = _load("bench_stores")
    from gpu_patching.stores import open_stack

    case = bench_stores.Case("3D", (20, 96, 64), (8, 32, 32), (4, 16, 16))
    stack = open_stack(bench_stores.ensure_store(tmp_path, case))
    assert bench_stores.decode_every_chunk(stack) == 3 * 3 * 2


def test_the_chunk_order_table_hands_over_every_patch_and_decodes_no_less_than_the_floor(
    tmp_path: Path,
) -> None:
    pytest.importorskip("zarr")
    bench_stores = _load("bench_stores")
    from _report import Report

    case = bench_stores.Case("2D", (512, 384), (128, 128), (32, 32))
    report = Report(echo=False)
    bench_stores.chunk_order_section(tmp_path, [case], True, report)
    rows = _table(report.text(), "| order | patches | chunk decodes |")
    patches = {int(row[1].replace(",", "")) for row in rows}
    decodes = [int(row[2].replace(",", "")) for row in rows]
    assert patches == {(512 // 32) * (384 // 32)}
    assert decodes[0] == 4 * 3  # every chunk touched
    assert min(decodes[1:]) >= decodes[0]


def test_batch_diversity_counts_every_chunk_a_patch_straddles_and_each_region_once() -> None:
    bench_stores = _load("bench_stores")
    from gpu_patching import PatchBatch

    # 16x16 chunks, 8x8 patches: corners (0, 0), (12, 0) and (12, 12) overlap
    # one, two (across y) and four chunks; their regions (cells) all differ.
    rows = PatchBatch(
        data_idx=np.zeros(3, np.int64),
        sample_idx=np.zeros(3, np.int64),
        coords=np.asarray([[0, 0], [12, 0], [12, 12]], np.int64),
        indices=np.arange(3, dtype=np.int64),
        patch_size=(8, 8),
    )
    shapes, chunks = [(1, 1, 64, 64)], [(1, 1, 16, 16)]
    regions, touched = bench_stores.batch_diversity(rows, shapes, chunks, 1)
    assert regions.tolist() == [1, 1, 1] and touched.tolist() == [1, 2, 4]
    regions, touched = bench_stores.batch_diversity(rows, shapes, chunks, 3)
    assert regions.tolist() == [3] and touched.tolist() == [4]  # shared chunks count once


def test_batch_diversity_counts_a_3d_patch_over_eight_chunks_and_leaves_out_a_short_batch() -> None:
    bench_stores = _load("bench_stores")
    from gpu_patching import PatchBatch

    rows = PatchBatch(
        data_idx=np.zeros(3, np.int64),
        sample_idx=np.zeros(3, np.int64),
        coords=np.asarray([[6, 6, 6], [0, 0, 0], [0, 0, 2]], np.int64),
        indices=np.arange(3, dtype=np.int64),
        patch_size=(4, 4, 4),
    )
    regions, touched = bench_stores.batch_diversity(
        rows, [(1, 1, 16, 16, 16)], [(1, 1, 8, 8, 8)], 2
    )
    # One whole batch: the first two rows, two regions, 8 chunks (the first row's).
    assert regions.tolist() == [2] and touched.tolist() == [8]


def test_the_diversity_rows_are_the_rows_the_loader_hands_over_in_each_order(
    tmp_path: Path,
) -> None:
    pytest.importorskip("zarr")
    bench_stores = _load("bench_stores")
    from gpu_patching import PatchLoader, StratifiedPatching
    from gpu_patching.stores import open_stack

    case = bench_stores.Case("2D", (512, 384), (128, 128), (32, 32))
    stack = open_stack(bench_stores.ensure_store(tmp_path, case))
    strategy = StratifiedPatching([stack.shape], case.patch, seed=0)
    for window in (None, 2):
        options = {} if window is None else {"order": "chunks", "chunk_window": window}
        loader = PatchLoader([stack], strategy, bench_stores.BATCH, shuffle=True, **options)
        handed = np.concatenate([np.asarray(batch.indices) for _, batch in loader])
        rows, tile = bench_stores.diversity_rows(stack, strategy, window)
        assert np.array_equal(np.asarray(rows.indices), handed)
        assert tile == loader.chunk_tile


def test_bench_stores_diversity_only_has_a_row_per_order_and_window_and_writes_no_data(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("zarr")
    bench_stores = _load("bench_stores")
    tiny = [
        bench_stores.Case("2D", (1024, 768), (128, 128), (16, 16)),
        bench_stores.Case("3D", (32, 256, 256), (8, 64, 64), (4, 16, 16)),
    ]
    monkeypatch.setattr(bench_stores, "cases", lambda quick: tiny)
    stores, output = tmp_path / "stores", tmp_path / "diversity.md"
    argv = ["--quick", "--diversity-only", "--store-dir", str(stores), "--output", str(output)]
    text = bench_stores.main(argv)
    assert output.read_text() == text and bench_stores.DIVERSITY_HEADING in text
    assert "## Chunk order" not in text and "## Throughput" not in text
    assert not stores.exists()  # no --keep
    windows = bench_stores.DIVERSITY_WINDOWS
    for part in text.split("\n### ")[1:]:
        rows = _table(part, "| order | tile | batches |")
        names = [row[0] for row in rows]
        assert names[0] == "shuffled (default)" and len(rows) == 1 + len(windows)
        assert all(f"chunk_window={w}" in name for w, name in zip(windows, names[1:], strict=True))
        regions = [float(row[3]) for row in rows]
        chunks = [float(row[6]) for row in rows]
        assert max(regions) <= bench_stores.BATCH
        assert regions[0] >= regions[1]  # one home chunk's patches share regions
        assert chunks[1:] == sorted(chunks[1:])  # more home chunks, more chunks
        assert chunks[0] >= chunks[-1]  # the shuffled batch spans the store


def test_bench_stores_two_rank_section_without_pytorch_says_why(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bench_stores = _load("bench_stores")
    from _report import Report

    monkeypatch.setattr(bench_stores, "missing_modules", lambda names: list(names))
    report = Report(echo=False)
    bench_stores.ranks_section(tmp_path, [], report)
    assert report.text() == (
        f"{bench_stores.RANKS_HEADING}\n\n"
        "Not run: PyTorch is not installed (torch.distributed).\n\n"
    )


def test_bench_stores_s3_section_without_moto_says_why_and_starts_no_server(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bench_stores = _load("bench_stores")
    from _report import Report

    monkeypatch.setattr(bench_stores, "missing_modules", lambda names: ["moto"])
    report = Report(echo=False)
    bench_stores.s3_section(tmp_path, True, report)
    assert report.text() == (
        f"{bench_stores.S3_HEADING}\n\nNot run: moto not installed (`[test]` extra).\n\n"
    )
    assert not any(tmp_path.iterdir())  # no store written, no server log


def test_the_local_s3_server_counts_each_request_it_answers(tmp_path: Path) -> None:
    pytest.importorskip("moto.server")
    bench_stores = _load("bench_stores")
    import urllib.error
    import urllib.request

    server = bench_stores.LocalS3(tmp_path)
    try:
        before = server.requests()
        for k in range(3):
            with pytest.raises(urllib.error.HTTPError):
                urllib.request.urlopen(f"{server.endpoint}/no-bucket/key-{k}", timeout=10)
        assert server.requests() - before == 3
    finally:
        server.stop()


S3_FSSPEC = ("fsspec", "fsspec, max_concurrency=1")


def test_over_s3_each_per_patch_read_asks_once_for_each_chunk_its_patch_touches(
    tmp_path: Path,
) -> None:
    pytest.importorskip("moto.server")
    pytest.importorskip("s3fs")
    pytest.importorskip("obstore")
    bench_stores = _load("bench_stores")
    from _report import Report

    case = bench_stores.Case("s3-2D", (256, 256), (64, 64), (32, 32))
    report = Report(echo=False)
    bench_stores.s3_section(tmp_path, True, report, case)
    rows = _table(report.text(), "| reads | store | patches |")
    by_kind = {(row[0], row[1]): row for row in rows}
    assert {kind for _, kind in by_kind} == set(bench_stores.S3_KINDS)
    # A 32x32 patch on a grid of 32 meets one chunk of 64x64 (or 2 or 4 across edges).
    for kind in ("fsspec, max_concurrency=1", "obstore"):
        per_patch = by_kind[("one zarr read per patch", kind)]
        assert per_patch[2] == "64"
        assert 64 <= int(per_patch[3].replace(",", "")) <= 4 * 64
        for order in ("PatchLoader, shuffled (default)", "PatchLoader, order='chunks'"):
            assert int(by_kind[(order, kind)][3].replace(",", "")) >= 16  # each chunk once
    # The 'fsspec' row keeps s3fs's defaults (open_stack's own is max_concurrency=1):
    # a size request (HEAD) before each of the 16 chunks' reads.
    chunk_order = "PatchLoader, order='chunks'"
    requests = {k: int(by_kind[(chunk_order, k)][3].replace(",", "")) for k in S3_FSSPEC}
    assert requests["fsspec"] >= requests["fsspec, max_concurrency=1"] + 16
    verdict = next(line for line in report.lines if line.startswith("The loader's best epoch"))
    assert "faster than `open_stack`'s fsspec store with s3fs's defaults" in verdict
    assert verdict.endswith(("worth switching (docs/design.md).", "fsspec stays."))


# -- bench_stores: the chunk-order section ----------------------------------------------


@pytest.fixture(scope="module")
def bench_stores() -> ModuleType:
    pytest.importorskip("zarr", minversion="3")
    return _load("bench_stores")


def test_patches_not_copied_reads_every_chunk_copies_no_patch_and_restores_the_cut_out(
    bench_stores: ModuleType, tmp_path: Path
) -> None:
    from gpu_patching import PatchLoader, StratifiedPatching
    from gpu_patching.stores import cut, open_stack
    from gpu_patching.stores import reader as reader_module

    case = bench_stores.Case("2D", (256, 256), (64, 64), (16, 16))
    stack = open_stack(bench_stores.ensure_store(tmp_path, case))
    pixels = np.asarray(stack.array[...]).reshape(stack.shape)
    strategy = StratifiedPatching([stack.shape], case.patch, seed=2)

    def epoch() -> tuple[int, list[bool]]:
        loader = PatchLoader([stack], strategy, 32, order="chunks")
        equal = [
            bool(np.array_equal(patches, sliced_patches(pixels, batch)))
            for patches, batch in loader
        ]
        assert loader._reader is not None
        return loader._reader.chunks_read, equal

    before, copied = epoch()
    with bench_stores.patches_not_copied():
        assert reader_module.cut_pieces is not cut.cut_pieces
        during, _ = epoch()
    assert reader_module.cut_pieces is cut.cut_pieces
    after, copied_again = epoch()
    assert all(copied) and all(copied_again)
    assert before == during == after == 16  # every chunk of the 4x4 grid, once


def test_chunk_order_section_sets_the_uncopied_epoch_and_cpu_beside_the_floor(
    bench_stores: ModuleType, tmp_path: Path
) -> None:
    report = bench_stores.Report(echo=False)
    tiny = [
        bench_stores.Case("2D", (256, 256), (64, 64), (16, 16)),
        bench_stores.Case("3D", (32, 128, 128), (16, 64, 64), (8, 16, 16)),
    ]
    bench_stores.chunk_order_section(tmp_path, tiny, True, report)
    text = report.text()
    for title in ("2D: 256x256", "3D: 32x128x128", "patches 32x32"):
        assert title in text
    summary = _table(text, "| case | patches |")
    assert [row[0] for row in summary] == [
        "2D, patches 16x16",
        "3D, patches 8x16x16",
        "2D, patches 32x32",
    ]
    rows = _table(text, "| order | patches | chunk decodes |")  # the first case's table
    by_order = {row[0]: row for row in rows}
    uncut = by_order["order='chunks', no patch copied (diagnostic)"]
    chunks = by_order["order='chunks'"]
    assert uncut[1:5] == chunks[1:5]  # the same patches and decodes
    assert by_order["floor: every chunk once"][7] != "-"  # CPU measured for the floor
    assert all(cell.startswith("x") for cell in uncut[6:9:2])
