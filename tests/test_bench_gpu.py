"""Smoke tests of benchmarks/bench_gpu.py that need no GPU.

The GPU measurements themselves only run on a device; these tests check the
parts that do not: the case list (patch counts land on their targets), the
roofline arithmetic, the report formatting, the NumPy side of the update
measurement, the shuffled-and-sharded section (run on the NumPy backend with a
stand-in for CuPy's events) and the exit path where no CUDA device is usable.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import pytest

from gpu_patching import StratifiedPatching
from gpu_patching.backends.numpy_backend import NumpyBackend
from gpu_patching.grid import MAX_PROBABILITY

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_gpu.py"


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_gpu", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_gpu"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


bench = _load()


def _no_device_env() -> dict[str, str]:
    # Hides every device, so the script takes its no-GPU path even on a GPU machine.
    return {**os.environ, "CUDA_VISIBLE_DEVICES": ""}


# -- cases ----------------------------------------------------------------------------------


def test_region_sets_have_about_1k_66k_and_1m_regions() -> None:
    counts = [bench.count_regions(shapes, patch) for _, shapes, patch in bench.REGION_SETS]
    assert counts == [1024, 65536, 1 << 20]


def test_case_list_marks_the_impossible_combinations() -> None:
    cases = bench.build_cases(bench.REGION_SETS, bench.PATCH_TARGETS)
    assert len(cases) == len(bench.REGION_SETS) * len(bench.PATCH_TARGETS)
    impossible = {(c.regions_label, c.target_patches) for c in cases if not c.feasible}
    assert impossible == {("~1k", 10**7), ("~1k", 10**8), ("~66k", 10**8)}
    for case in cases:
        if case.feasible:
            assert 0 < case.probability <= MAX_PROBABILITY
    # The 1e8 case the roofline target is judged on exists.
    assert any(c.feasible and c.target_patches == 10**8 for c in cases)


def test_quick_cases_are_small() -> None:
    cases = bench.build_cases(bench.QUICK_REGION_SETS, bench.QUICK_PATCH_TARGETS)
    assert cases and all(c.feasible for c in cases)
    assert max(c.target_patches for c in cases) <= 10**6
    assert max(c.n_regions for c in cases) <= 1 << 16


def test_order_cases_are_the_1e6_and_1e7_cases_at_1m_regions() -> None:
    cases = bench.order_cases(quick=False)
    assert [c.target_patches for c in cases] == [10**6, 10**7]
    assert all(c.feasible and c.n_regions == 1 << 20 for c in cases)
    # The same construction as the throughput cases of that region set.
    throughput = bench.build_cases(bench.REGION_SETS[-1:], (10**6, 10**7))
    assert cases == throughput
    quick = bench.order_cases(quick=True)
    assert quick and all(c.feasible for c in quick)
    assert max(c.target_patches for c in quick) <= 10**6
    assert max(c.n_regions for c in quick) <= 1 << 16


def test_order_variants() -> None:
    variants = bench.order_variants()
    assert [key for key, _, _ in variants] == ["plain", "shuffled", "shard4", "shard8"]
    assert variants[0][2] == {}
    assert variants[1][2] == {"shuffle": True}
    for (_, label, options), world_size in zip(variants[2:], (4, 8), strict=True):
        assert options == {"shuffle": True, "rank": 1, "world_size": world_size}
        assert label == f"shuffled shard (rank 1 of {world_size})"


def test_patch_counts_land_on_their_targets() -> None:
    cases = bench.build_cases(bench.REGION_SETS, bench.PATCH_TARGETS)
    samplers: dict[str, StratifiedPatching] = {}
    for case in cases:
        if not case.feasible:
            continue
        sampler = samplers.get(case.regions_label)
        if sampler is None:
            sampler = StratifiedPatching(case.data_shapes, case.patch_size, seed=1, backend="numpy")
            samplers[case.regions_label] = sampler
        assert case.grid() == sampler._tables.sample_grid(0)
        bench.set_uniform_probability(sampler, case)
        assert abs(sampler.n_patches - case.target_patches) <= 0.01 * case.target_patches


# -- arithmetic -----------------------------------------------------------------------------


def test_bytes_written_per_patch() -> None:
    assert bench.bytes_per_patch(2) == 40
    assert bench.bytes_per_patch(3) == 48
    assert bench.epoch_bytes(10**8, 2) == 4 * 10**9


def test_copy_bandwidth_definitions() -> None:
    both, written = bench.copy_bandwidth(1 << 30, 0.5)
    assert both == 2 * (1 << 30) / 0.5
    assert written == (1 << 30) / 0.5


def test_roofline_fraction() -> None:
    # 1e8 patches of 40 bytes in 2 s is 2e9 B/s: half of a 4e9 B/s roofline.
    assert bench.write_rate(10**8, 2, 2.0) == pytest.approx(2e9)
    assert bench.roofline_fraction(10**8, 2, 2.0, 4e9) == pytest.approx(0.5)


def test_epoch_repeats_fit_the_budget() -> None:
    # 20 us epochs: both capped at 200.
    assert bench.epoch_repeats(20e-6, 4.0, 5) == (200, 200)
    # 10 ms epochs, 4 s: 2 s of bursts over 5 rounds, 2 s of isolated epochs.
    assert bench.epoch_repeats(10e-3, 4.0, 5) == (40, 200)
    assert bench.epoch_repeats(0.1, 4.0, 5) == (4, 20)
    # Very slow epochs still run at least once each.
    assert bench.epoch_repeats(100.0, 4.0, 5) == (1, 1)
    assert bench.epoch_repeats(0.0, 4.0, 5) == (200, 200)


def test_burst_length_and_overhead() -> None:
    assert bench.burst_length(1e-3, 0.5, 5) == 100
    assert bench.burst_length(10e-6, 0.5, 5) == 200
    assert bench.burst_length(1.0, 0.5, 5) == 1
    assert bench.burst_length(0.0, 0.5, 5) == 200
    # A quarter of the rows in a quarter of the time costs the same per patch.
    assert bench.per_patch_overhead(1.0, 250, 4.0, 1000) == pytest.approx(0.0)
    assert bench.per_patch_overhead(1.1, 1000, 1.0, 1000) == pytest.approx(0.1)
    assert bench.fmt_overhead(0.123) == "+12%"
    assert bench.fmt_overhead(-0.05) == "-5%"


# -- formatting -----------------------------------------------------------------------------


def test_slug_and_versions() -> None:
    assert bench.slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    assert bench.slug("NVIDIA H200") == "nvidia-h200"
    assert bench.slug("???") == "unknown-gpu"
    assert bench.cuda_version(12040) == "12.4"
    assert bench.cuda_version(12090) == "12.9"
    assert bench.cuda_version(13000) == "13.0"
    assert bench.cuda_version(0) == "unknown"


def test_formatters() -> None:
    assert bench.fmt_time(None) == "n/a"
    assert bench.fmt_time(2.5) == "2.50 s"
    assert bench.fmt_time(1.5e-3) == "1.50 ms"
    assert bench.fmt_time(25e-6) == "25.0 us"
    assert bench.fmt_rate(2.5e9) == "2.50 G/s"
    assert bench.fmt_bandwidth(3.0e12) == "3,000 GB/s"
    assert bench.fmt_bytes(4 * 10**9) == "3.73 GiB"
    assert bench.fmt_percent(0.5) == "50.0%"
    assert [bench.fmt_verdict(v) for v in (True, False, None)] == ["yes", "NO", "n/a"]


def test_markdown_table() -> None:
    lines = bench.markdown_table(["a", "b"], [["1", "2"]], "lr")
    assert lines == ["| a | b |", "|---|---:|", "| 1 | 2 |"]
    with pytest.raises(ValueError):
        bench.markdown_table(["a", "b"], [["1"]], "lr")
    with pytest.raises(ValueError):
        bench.markdown_table(["a", "b"], [], "l")


def test_report_rows_match_their_headers() -> None:
    case = bench.build_cases(bench.REGION_SETS[-1:], (10**8,))[0]
    result = {"n_patches": 10**8, "burst": 2e-3, "isolated": 2.1e-3}
    row = bench.throughput_row(case, result, "skipped (size)", 3e12, 2.8e12)
    assert len(row) == len(bench.THROUGHPUT_HEADER)
    assert "skipped (size)" in row
    with_numpy = {**result, "numpy": 1.0, "same": True}
    assert len(bench.throughput_row(case, with_numpy, "", 3e12, 2.8e12)) == len(
        bench.THROUGHPUT_HEADER
    )
    empty = bench.throughput_row(case, None, "not possible", 1, 1)
    assert len(empty) == len(bench.THROUGHPUT_HEADER)

    latency = {
        "n_patches": 10**5,
        "events": 20e-6,
        "events_p10": 18e-6,
        "events_p90": 25e-6,
        "wall": 31e-6,
        "wall_p10": 28e-6,
        "wall_p90": 40e-6,
        "launches": 1.0,
    }
    row = bench.latency_row("~1k (1,024)", latency)
    assert len(row) == len(bench.LATENCY_HEADER)
    assert row[-1] == "NO"  # the slower method (31 us) misses the 30 us target

    gpu = {key: 0.5e-3 for key, _ in bench.UPDATE_ROWS}
    for host in (None, {key: 50e-3 for key, _ in bench.UPDATE_ROWS}):
        rows = bench.update_rows(gpu, host)
        assert len(rows) == len(bench.UPDATE_ROWS)
        assert all(len(r) == len(bench.UPDATE_HEADER) for r in rows)
        assert all(r[-1] == "yes" for r in rows)


def test_targets_table() -> None:
    probe = {
        "epochs": 5,
        "launch_count": 5,
        "torch": "2.x",
        **bench.classify_device_events(["sample_epoch"] * 5 + ["Activity Buffer Request"]),
    }
    assert probe["ours"] == 5 and probe["other_kernels"] == []
    assert probe["bookkeeping"] == ["Activity Buffer Request"]
    lines = bench.targets_table(
        (0.6, 0.4),
        {"a": {"events": 20e-6, "wall": 25e-6}},
        {"x": 0.8e-3},
        "~1M",
        1.0,
        probe,
    )
    text = "\n".join(lines)
    assert "yes (copy), NO (fill)" in text
    assert text.count("| yes |") == 4  # latency, updates, launch_count, CUPTI
    assert "1 sample_epoch kernel(s) per epoch" in text


def _order_result(n: int, plain: float, others: float, same: Any = None) -> dict[str, Any]:
    """A made-up result of measure_orders: every variant ``others`` over plain, per patch."""
    variants = {}
    baselines = {}
    for key, _, options in bench.order_variants():
        rows = -(-n // options.get("world_size", 1))
        seconds = plain * rows / n * (1 if key == "plain" else 1 + others)
        variants[key] = {"rows": rows, "time": seconds, "launches": 1.0}
        if "world_size" in options:
            baselines[key] = {"rows": rows, "time": plain * rows / n, "launches": 1.0}
    return {"n_patches": n, "variants": variants, "baselines": baselines, "same": same}


def test_order_rows_and_target() -> None:
    case = bench.order_cases(quick=False)[0]
    same = {key: True for key, _, _ in bench.order_variants()}
    result = _order_result(10**6, 1e-4, 0.1, same)
    rows = bench.order_rows(case, result, "")
    assert len(rows) == len(bench.order_variants())
    assert all(len(r) == len(bench.ORDER_HEADER) for r in rows)
    assert rows[0][6] == "(the baseline)"
    assert [r[6] for r in rows[1:]] == ["+10%"] * 3
    assert [r[7] for r in rows] == ["n/a", "n/a", "+10%", "+10%"]
    assert [r[4] for r in rows] == ["100.0 us", "110.0 us", "27.5 us", "13.8 us"]
    assert [r[3] for r in rows] == ["1,000,000", "1,000,000", "250,000", "125,000"]
    assert all(r[-1] == "yes" for r in rows)
    unchecked = bench.order_rows(case, _order_result(10**6, 1e-4, 0.1), "skipped (size)")
    assert all(r[-1] == "skipped (size)" for r in unchecked)
    skipped = bench.order_rows(case, None, "skipped: would overrun --time-budget")
    assert len(skipped) == 1 and len(skipped[0]) == len(bench.ORDER_HEADER)

    target = "shuffling and sharding cost < 20% over the plain epoch"
    fast = "\n".join(bench.targets_table(None, {}, None, "~1M", None, None, [result]))
    assert f"| {target} | worst per patch over 1 case(s): +10%" in fast
    assert fast.count("| yes |") == 2  # the overhead and the launches per call
    slow = [result, _order_result(10**7, 1e-3, 0.3)]
    text = "\n".join(bench.targets_table(None, {}, None, "~1M", None, None, slow))
    assert "+30% (shuffled epoch, 10,000,000 patches)" in text
    assert f"| {target} |" in text and "| NO |" in text
    slow[1]["variants"]["shard8"]["launches"] = 2.0
    text = "\n".join(bench.targets_table(None, {}, None, "~1M", None, None, slow))
    assert "| 1 to 2 | NO |" in text
    missing = "\n".join(bench.targets_table(None, {}, None, "~1M", None, None, []))
    assert f"| {target} | not measured | n/a |" in missing


def test_probe_verdicts() -> None:
    def probe(names: list[str]) -> dict[str, object]:
        events = bench.classify_device_events(names)
        return {"epochs": 5, "launch_count": 5, "torch": "2.x", **events}

    assert bench.probe_verdict(probe(["sample_epoch"] * 5)) is True
    assert bench.probe_verdict(probe(["sample_epoch"] * 10)) is False
    extra = probe(["sample_epoch"] * 5 + ["cupy_copy__int64_int64"])
    assert bench.probe_verdict(extra) is False
    assert "cupy_copy__int64_int64" in bench.probe_text(extra)
    copies = probe(["sample_epoch"] * 5 + ["Memcpy HtoD (Pageable -> Device)"])
    assert bench.probe_verdict(copies) is True
    assert "memcpy/memset: 1" in bench.probe_text(copies)
    assert bench.probe_verdict(probe([])) is None
    assert "profiling unavailable" in bench.probe_text(probe([]))
    assert bench.probe_verdict({"error": "no torch"}) is None
    assert "not measured: no torch" in bench.probe_text({"error": "no torch"})
    lines = bench.targets_table(None, {}, None, "~66k", None, None)
    assert "not measured" in "\n".join(lines)


# -- host-side measurement ------------------------------------------------------------------


def test_time_wall_calls_and_syncs() -> None:
    calls: list[int] = []
    syncs: list[None] = []
    times = bench.time_wall(calls.append, 4, lambda: syncs.append(None))
    assert calls == [0, 0, 1, 2, 3]  # one warm-up call
    assert len(syncs) == 5
    assert len(times) == 4 and all(t >= 0 for t in times)


def test_compare_orders() -> None:
    shapes, patch = [(1, 1, 512, 512)], (32, 32)
    a = StratifiedPatching(shapes, patch, seed=1, backend="numpy")
    b = StratifiedPatching(shapes, patch, seed=1, backend="numpy")
    assert bench.compare_orders(a, b, 7) == {key: True for key, _, _ in bench.order_variants()}
    other = StratifiedPatching(shapes, patch, seed=2, backend="numpy")
    assert not any(bench.compare_orders(a, other, 7).values())
    b.set_region_probs(0, 0, {(0, 0): 0.0})
    with pytest.raises(RuntimeError):
        bench.compare_orders(a, b, 7)


class _Event:
    def record(self, stream: Any = None) -> None:
        self.at = time.perf_counter()

    def synchronize(self) -> None:
        return None


def _host_cupy() -> Any:
    """What the timing code uses of CuPy, on the host (events are perf_counter)."""
    pool = SimpleNamespace(free_all_blocks=lambda: None)
    stream = SimpleNamespace(synchronize=lambda: None)
    return SimpleNamespace(
        cuda=SimpleNamespace(
            Event=_Event,
            get_current_stream=lambda: stream,
            get_elapsed_time=lambda start, end: (end.at - start.at) * 1e3,
            runtime=SimpleNamespace(memGetInfo=lambda: (1 << 34, 1 << 34)),
            memory=SimpleNamespace(OutOfMemoryError=MemoryError),
        ),
        get_default_memory_pool=lambda: pool,
        get_default_pinned_memory_pool=lambda: pool,
    )


@pytest.fixture
def counting_numpy(monkeypatch: pytest.MonkeyPatch) -> None:
    """NumPy samplers count their draws as CudaBackend.launch_count counts launches."""
    draw = NumpyBackend.draw

    def counting_draw(self: Any, *args: Any, **kwargs: Any) -> Any:
        self.launch_count = getattr(self, "launch_count", 0) + 1
        return draw(self, *args, **kwargs)

    monkeypatch.setattr(NumpyBackend, "draw", counting_draw)
    # Small cases, so the section runs in a moment on the host.
    monkeypatch.setattr(bench, "QUICK_ORDER_REGION_SET", bench.REGION_SETS[0])
    monkeypatch.setattr(bench, "QUICK_ORDER_PATCH_TARGETS", (10**3, 10**4))


def _collect(lines: list[str]) -> Any:
    """An ``emit`` (as run() has) that keeps the lines."""

    def emit(*new: str) -> None:
        lines.extend(new)

    return emit


def _orders_args(**overrides: Any) -> argparse.Namespace:
    values = {"quick": True, "time_budget": 420.0, "no_numpy": False, "numpy_max_patches": 10**7}
    return argparse.Namespace(**{**values, **overrides})


@pytest.mark.usefixtures("counting_numpy")
def test_orders_section_on_the_host() -> None:
    lines: list[str] = []
    results = bench.orders_section(
        _host_cupy(), _orders_args(), time.perf_counter(), 0.0, 0.0, _collect(lines), "numpy"
    )
    assert [r["n_patches"] for r in results] == [1000, 10000]
    for result in results:
        variants = result["variants"]
        assert [v["rows"] for v in variants.values()] == [
            result["n_patches"],
            result["n_patches"],
            -(-result["n_patches"] // 4),
            -(-result["n_patches"] // 8),
        ]
        assert all(v["launches"] == 1 and v["time"] > 0 for v in variants.values())
        assert set(result["baselines"]) == {"shard4", "shard8"}
    # Only the smaller case is compared with NumPy (here NumPy against itself).
    assert results[0]["same"] == {key: True for key, _, _ in bench.order_variants()}
    assert results[1]["same"] is None
    table = [line for line in lines if line.startswith("| ~1k")]
    assert len(table) == 2 * len(bench.order_variants())
    assert all(line.endswith("| yes |") for line in table[:4])
    assert all(line.endswith("| not checked (larger case) |") for line in table[4:])
    text = "\n".join(bench.targets_table(None, {}, None, "~1k", None, None, results))
    assert (
        "| 1 kernel launch per call, shuffled and sharded (CudaBackend.launch_count) | 1 | yes |"
        in text
    )


@pytest.mark.usefixtures("counting_numpy")
def test_orders_section_keeps_to_the_time_budget() -> None:
    lines: list[str] = []
    results = bench.orders_section(
        _host_cupy(),
        _orders_args(time_budget=bench.RESERVE_S),
        time.perf_counter(),
        0.0,
        0.0,
        _collect(lines),
        "numpy",
    )
    assert results == []
    rows = [line for line in lines if line.startswith("| ~1k")]
    assert len(rows) == 2 and all("would overrun --time-budget" in line for line in rows)
    no_numpy = bench.orders_section(
        _host_cupy(),
        _orders_args(no_numpy=True),
        time.perf_counter(),
        0.0,
        0.0,
        _collect(lines),
        "numpy",
    )
    assert all(r["same"] is None for r in no_numpy)
    assert any(line.endswith("| skipped (--no-numpy) |") for line in lines)


def test_numpy_updates() -> None:
    timings = bench.measure_updates("numpy", [(1, 1, 640, 640)], (32, 32), 2)
    assert set(timings) == {key for key, _ in bench.UPDATE_ROWS}
    assert all(t > 0 for t in timings.values())


# -- without a usable device ----------------------------------------------------------------


def test_main_without_a_device_prints_one_line_and_returns_0(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    monkeypatch.setattr(bench, "usable_cupy", lambda: (None, "no usable CUDA device (no driver)"))
    output = tmp_path / "out.md"
    assert bench.main(["--output", str(output)]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out == ["no usable CUDA device (no driver); skipping the GPU benchmark"]
    assert not output.exists()


def test_script_without_a_device_exits_0(tmp_path: Path) -> None:
    output = tmp_path / "out.md"
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--output", str(output)],
        capture_output=True,
        text=True,
        env=_no_device_env(),
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    # One line with the reason: CuPy missing, no device visible, or none usable.
    assert len(lines) == 1 and lines[0].endswith("; skipping the GPU benchmark"), done.stdout
    assert not output.exists()


def test_launch_probe_without_a_device_reports_an_error() -> None:
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--launch-probe"],
        capture_output=True,
        text=True,
        env=_no_device_env(),
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    line = next(s for s in done.stdout.splitlines() if s.startswith(bench.PROBE_PREFIX))
    probe = json.loads(line[len(bench.PROBE_PREFIX) :])
    assert "error" in probe
    assert bench.probe_verdict(probe) is None


def test_same_batches_compares_every_column() -> None:
    sampler = StratifiedPatching([(1, 1, 256, 256)], (32, 32), seed=1, backend="numpy")
    a, b = sampler.sample_epoch(0), sampler.sample_epoch(0)
    assert bench.same_batches(a, b)
    changed = type(a)(
        data_idx=a.data_idx,
        sample_idx=a.sample_idx,
        coords=a.coords + 1,
        indices=a.indices,
        patch_size=a.patch_size,
    )
    assert not bench.same_batches(a, changed)


# -- the GPU session script --------------------------------------------------------------

SESSION = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_session.sh"


def test_gpu_session_script_parses_and_names_files_that_exist() -> None:
    subprocess.run(["bash", "-n", str(SESSION)], check=True)
    text = SESSION.read_text()
    named = [word for word in text.replace("(", " ").replace(")", " ").split() if "/" in word]
    files = [w for w in named if w.startswith(("tests/", "benchmarks/")) and w.endswith(".py")]
    assert "tests/test_cuda.py" in files and "benchmarks/bench_gpu.py" in files
    for name in files:
        assert (SESSION.parents[1] / name).is_file(), name


def test_gpu_session_without_a_gpu_reports_that_no_gpu_test_passed(tmp_path: Path) -> None:
    # Here every GPU test skips: the script must not call that a success.
    result = subprocess.run(
        ["bash", str(SESSION), "tests"],
        env={**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert "no GPU test passed" in result.stdout
    assert (tmp_path / "pytest-cuda.log").is_file() and (tmp_path / "device.txt").is_file()


def test_gpu_session_needs_a_known_part() -> None:
    result = subprocess.run(["bash", str(SESSION), "all"], capture_output=True, text=True)
    assert result.returncode == 2 and "usage" in result.stderr
