"""benchmarks/bench_gpu.py without a GPU: every fixture is a real function's output.

The measurements run here on the NumPy backend, with a host stand-in for the
few CuPy calls the script makes (events read ``perf_counter``, arrays are
NumPy arrays), and their results feed the report code exactly as on a GPU: a
report that reads a key no measurement returns fails here, not on the first
GPU run. The launch probe runs for real in a child process (torch.profiler on
the CPU). The GPU session script (benchmarks/gpu_session.sh) is checked here
too: its syntax, its time budget and its all-skipped check.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from bench_host import host_cupy

from gpu_patching import StratifiedPatching
from gpu_patching.grid import MAX_PROBABILITY

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "bench_gpu.py"
SESSION = ROOT / "benchmarks" / "gpu_session.sh"
if str(SCRIPT.parent) not in sys.path:
    sys.path.insert(0, str(SCRIPT.parent))  # the scripts import _report by name


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


# -- the sections' options and sizes ---------------------------------------------------------


def _args(**overrides: Any) -> argparse.Namespace:
    """bench_gpu's options (its parser's defaults), for the quick sizes."""
    values = {
        "quick": True,
        "output": None,
        "time_budget": 420.0,
        "no_numpy": False,
        "numpy_max_patches": 10**7,
        "no_torch_profile": False,
        "epoch_budget": None,
    }
    return argparse.Namespace(**{**values, **overrides})


def _session(**overrides: Any) -> Any:
    return bench.Session(_args(**overrides), host_cupy(), bench.Report(echo=False), "numpy")


@pytest.fixture
def small_sizes(monkeypatch: pytest.MonkeyPatch) -> None:
    """The quick run's sections at sizes the host draws in a moment."""
    monkeypatch.setattr(bench, "QUICK_REGION_SETS", bench.REGION_SETS[:1])
    monkeypatch.setattr(bench, "QUICK_PATCH_TARGETS", (10**3, 10**4))
    monkeypatch.setattr(bench, "LATENCY_PATCHES", 10**3)
    monkeypatch.setattr(bench, "ROOFLINE_PATCHES", 10**4)
    monkeypatch.setattr(bench, "ROOFLINE_REGIONS", bench.REGION_SETS[0][0])
    monkeypatch.setattr(bench, "QUICK_EPOCH_BUDGET_S", 0.1)
    monkeypatch.setattr(bench, "QUICK_BANDWIDTH_BYTES", 1 << 12)
    monkeypatch.setattr(bench, "QUICK_ORDER_REGION_SET", bench.REGION_SETS[0])
    monkeypatch.setattr(bench, "QUICK_ORDER_PATCH_TARGETS", (10**3, 10**4))
    monkeypatch.setattr(bench, "ORDER_BUDGET_S", 0.04)


@pytest.fixture(scope="module")
def numpy_probe() -> dict[str, Any]:
    """launch_probe's real output, from its child process, on the NumPy backend."""
    return bench.run_launch_probe(300, "numpy")


def _small_case(target: int = 10**4) -> Any:
    return bench.build_cases(bench.REGION_SETS[:1], (target,))[0]


def _sampler(case: Any, backend: str = "numpy") -> StratifiedPatching:
    sampler = StratifiedPatching(case.data_shapes, case.patch_size, seed=1, backend=backend)
    bench.set_uniform_probability(sampler, case)
    return sampler


@pytest.fixture(scope="module")
def epoch_result() -> dict[str, Any]:
    """measure_epoch's real output (the NumPy backend on both sides)."""
    case = _small_case()
    result: dict[str, Any] = bench.measure_epoch(
        host_cupy(), _sampler(case), _sampler(case), quick=True
    )
    return result


@pytest.fixture(scope="module")
def latency_result() -> dict[str, Any]:
    result: dict[str, Any] = bench.measure_latency(host_cupy(), _sampler(_small_case()), 5)
    return result


@pytest.fixture(scope="module")
def order_result() -> dict[str, Any]:
    result: dict[str, Any] = bench.measure_orders(host_cupy(), _sampler(_small_case()), 0.01, 2)
    return result


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
    # The case the roofline target is judged on exists.
    assert any(
        c.feasible
        and c.target_patches == bench.ROOFLINE_PATCHES
        and c.regions_label == bench.ROOFLINE_REGIONS
        for c in cases
    )


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
    assert cases == bench.build_cases(bench.REGION_SETS[-1:], (10**6, 10**7))
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


# -- the report, on real measurements --------------------------------------------------------


def test_measure_epoch_and_its_row(epoch_result: dict[str, Any]) -> None:
    case = _small_case()
    assert epoch_result["n_patches"] == _sampler(case).n_patches
    assert epoch_result["same"] is True  # NumPy against NumPy
    assert epoch_result["burst"] > 0 and epoch_result["isolated"] > 0
    row = bench.throughput_row(case, epoch_result, "", 3e12, 2.8e12)
    assert len(row) == len(bench.THROUGHPUT_HEADER)
    assert row[1] == f"{epoch_result['n_patches']:,}" and row[-1] == "yes"
    assert row[-2] == bench.fmt_ratio(epoch_result["numpy"], epoch_result["isolated"])
    without_numpy = {k: v for k, v in epoch_result.items() if k not in ("numpy", "same")}
    row = bench.throughput_row(case, without_numpy, "skipped (size)", 3e12, 2.8e12)
    assert len(row) == len(bench.THROUGHPUT_HEADER) and "skipped (size)" in row
    empty = bench.throughput_row(case, None, "not possible", 1, 1)
    assert len(empty) == len(bench.THROUGHPUT_HEADER)


def test_measure_latency_and_its_row(latency_result: dict[str, Any]) -> None:
    assert latency_result["launches"] == 1  # one draw per epoch on the NumPy backend
    row = bench.latency_row("~1k (1,024)", latency_result)
    assert len(row) == len(bench.LATENCY_HEADER)
    worst = max(latency_result["events"], latency_result["wall"])
    assert row[-1] == bench.fmt_verdict(worst <= bench.TARGET_EPOCH_SECONDS)
    slow = {**latency_result, "wall": 31e-6, "events": 20e-6}
    assert bench.latency_row("~1k", slow)[-1] == "NO"  # the slower method misses 30 us


def test_measure_updates_and_their_rows() -> None:
    shapes, patch = [(1, 1, 640, 640)], (32, 32)
    host = bench.measure_updates("numpy", shapes, patch, 2)
    native = bench.measure_updates("numpy", shapes, patch, 2, host_cupy())
    assert set(host) == set(native) == {key for key, _ in bench.UPDATE_ROWS}
    assert all(t > 0 for t in host.values())
    for other in (None, host):
        rows = bench.update_rows(native, other)
        assert len(rows) == len(bench.UPDATE_ROWS)
        assert all(len(r) == len(bench.UPDATE_HEADER) for r in rows)
        assert [r[-1] for r in rows] == [
            bench.fmt_verdict(native[key] <= bench.TARGET_UPDATE_SECONDS)
            for key, _ in bench.UPDATE_ROWS
        ]


def test_measure_orders_and_their_rows(order_result: dict[str, Any]) -> None:
    case = _small_case()
    n = order_result["n_patches"]
    variants = order_result["variants"]
    assert [v["rows"] for v in variants.values()] == [n, n, -(-n // 4), -(-n // 8)]
    assert all(v["launches"] == 1 and v["time"] > 0 for v in variants.values())
    assert set(order_result["baselines"]) == {"shard4", "shard8"}
    rows = bench.order_rows(case, order_result, "not checked (larger case)")
    assert len(rows) == len(bench.order_variants())
    assert all(len(r) == len(bench.ORDER_HEADER) for r in rows)
    plain = variants["plain"]
    assert rows[0][6] == "(the baseline)"
    for row, (key, _, _) in zip(rows[1:], bench.order_variants()[1:], strict=True):
        timed = variants[key]
        expected = bench.per_patch_overhead(timed["time"], timed["rows"], plain["time"], n)
        assert row[6] == bench.fmt_overhead(expected)
    assert all(r[-1] == "not checked (larger case)" for r in rows)
    skipped = bench.order_rows(case, None, "skipped: would overrun --time-budget")
    assert len(skipped) == 1 and len(skipped[0]) == len(bench.ORDER_HEADER)


def _slower(result: dict[str, Any], key: str, factor: float) -> dict[str, Any]:
    """A real measure_orders result with one variant's time multiplied (a slower card)."""
    slower = copy.deepcopy(result)
    plain = slower["variants"]["plain"]
    timed = slower["variants"][key]
    timed["time"] = plain["time"] * timed["rows"] / plain["rows"] * factor
    return slower


def test_order_target_names_the_worst_variant(order_result: dict[str, Any]) -> None:
    target = "shuffling and sharding cost < 20% over the plain epoch"
    fast = _slower(_slower(order_result, "shuffled", 1.1), "shard4", 1.0)
    fast = _slower(fast, "shard8", 1.05)
    text = "\n".join(bench.targets_table(None, {}, None, "~1k", None, None, [fast]))
    assert f"| {target} | worst per patch over 1 case(s): +10% (shuffled epoch" in text
    slow = _slower(fast, "shard8", 1.3)
    text = "\n".join(bench.targets_table(None, {}, None, "~1k", None, None, [fast, slow]))
    assert "+30% (shuffled shard (rank 1 of 8)" in text and "over 2 case(s)" in text
    assert re.search(rf"\| {re.escape(target)} \|[^\n]*\| NO \|", text)
    slow["variants"]["shard8"]["launches"] = 2.0
    text = "\n".join(bench.targets_table(None, {}, None, "~1k", None, None, [slow]))
    assert "| 1 to 2 | NO |" in text
    missing = "\n".join(bench.targets_table(None, {}, None, "~1k", None, None, []))
    assert f"| {target} | not measured | n/a |" in missing


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


def test_bandwidth_section_on_a_real_measurement() -> None:
    nbytes = 1 << 12
    seconds = bench.measure_copy_bandwidth(host_cupy(), nbytes, per_burst=3, rounds=2)
    lines, copy_roof, fill_roof = bench.bandwidth_section(seconds, nbytes)
    assert copy_roof == max(nbytes / seconds["memcpy"], nbytes / seconds["copy"])
    assert fill_roof == nbytes / seconds["fill"]
    assert sum(line.startswith("| D2D cudaMemcpyAsync") for line in lines) == 1
    assert "**Copy roofline**" in lines[-1]


# -- the launch probe -------------------------------------------------------------------------


def test_launch_probe_returns_every_key_its_report_reads(numpy_probe: dict[str, Any]) -> None:
    if "error" in numpy_probe:  # no PyTorch here: the error is the whole report
        assert "PyTorch" in numpy_probe["error"]
        assert bench.probe_text(numpy_probe) == f"not measured: {numpy_probe['error']}"
        assert bench.probe_verdict(numpy_probe) is None
        return
    assert numpy_probe["epochs"] == 5 and numpy_probe["launch_count"] == 5
    assert numpy_probe["device"] is False and numpy_probe["ours"] == 0
    text = bench.probe_text(numpy_probe)  # the KeyError of issue 11 would raise here
    assert "profiling unavailable here" in text and numpy_probe["torch"] in text
    assert bench.probe_verdict(numpy_probe) is None


def _device_probe(probe: dict[str, Any], names: list[str]) -> dict[str, Any]:
    """The real probe's keys with the device events a GPU's profile would name."""
    if "error" in probe:
        pytest.skip(f"launch_probe gave no profile here: {probe['error']}")
    return {**probe, "device": True, **bench.classify_device_events(names)}


def test_probe_verdicts(numpy_probe: dict[str, Any]) -> None:
    epochs = numpy_probe.get("epochs", 5)
    one_each = _device_probe(numpy_probe, ["sample_epoch"] * epochs)
    assert bench.probe_verdict(one_each) is True
    assert "1 sample_epoch kernel(s) per epoch" in bench.probe_text(one_each)
    assert bench.probe_verdict(_device_probe(numpy_probe, ["sample_epoch"] * 2 * epochs)) is False
    extra = _device_probe(numpy_probe, ["sample_epoch"] * epochs + ["cupy_copy__int64_int64"])
    assert bench.probe_verdict(extra) is False
    assert "cupy_copy__int64_int64" in bench.probe_text(extra)
    copies = _device_probe(
        numpy_probe, ["sample_epoch"] * epochs + ["Memcpy HtoD (Pageable -> Device)"]
    )
    assert bench.probe_verdict(copies) is True
    assert "memcpy/memset: 1" in bench.probe_text(copies)
    kineto = _device_probe(numpy_probe, ["sample_epoch"] * epochs + ["Activity Buffer Request"])
    assert kineto["bookkeeping"] == ["Activity Buffer Request"]
    assert bench.probe_verdict(kineto) is True
    assert "bookkeeping not counted" in bench.probe_text(kineto)


def test_launch_probe_without_a_device_reports_an_error() -> None:
    done = subprocess.run(
        bench.probe_command("cuda"),
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
    assert bench.probe_text(probe) == f"not measured: {probe['error']}"


# -- ncu's count of launches ------------------------------------------------------------------

# What `ncu --csv --metrics gpu__time_duration.sum` prints: notes, then one row per
# kernel launch and metric (the program's own lines can come first).
NCU_COLUMNS = (
    "ID,Process ID,Process Name,Host Name,Kernel Name,Context,Stream,Block Size,Grid Size,"
    "Device,CC,Section Name,Metric Name,Metric Unit,Metric Value"
).split(",")


def _ncu_row(launch: int, kernel: str, value: str) -> str:
    cells = [str(launch), "4242", "python3.12", "127.0.0.1", kernel, "1", "7", "(256, 1, 1)"]
    cells += ["(132, 1, 1)", "0", "9.0", "Command line profiler metrics"]
    cells += ["gpu__time_duration.sum", "us", value]
    return ",".join(f'"{cell}"' for cell in cells)


NCU_LOG = "\n".join(
    [
        'PROFILED_EPOCHS {"epochs": 2, "launch_count": 2}',
        "==PROF== Connected to process 4242 (/usr/bin/python3.12)",
        '==PROF== Profiling "sample_epoch": 0%....50%....100% - 1 pass',
        '==PROF== Profiling "sample_epoch": 0%....50%....100% - 1 pass',
        "==PROF== Disconnected from process 4242",
        ",".join(f'"{column}"' for column in NCU_COLUMNS),
        _ncu_row(0, "sample_epoch", "9.18"),
        _ncu_row(1, "sample_epoch", "9.02"),
        "",
    ]
)


def test_ncu_launches_are_counted_per_kernel() -> None:
    assert bench.count_ncu_kernels(NCU_LOG) == {"sample_epoch": 2}
    two_metrics = NCU_LOG + _ncu_row(1, "sample_epoch", "1.00") + "\n"
    assert bench.count_ncu_kernels(two_metrics) == {"sample_epoch": 2}  # one launch, one ID
    other = NCU_LOG + _ncu_row(2, "cupy_copy", "2.00") + "\n"
    assert bench.count_ncu_kernels(other) == {"cupy_copy": 1, "sample_epoch": 2}
    with pytest.raises(ValueError, match="no ncu CSV header"):
        bench.count_ncu_kernels("==PROF== No kernels were profiled.\n")


def test_ncu_summary_says_whether_each_epoch_is_one_launch() -> None:
    one = bench.ncu_summary({"sample_epoch": 5}, 5, 5)
    assert "1 sample_epoch launch(es) per epoch" in one and one.endswith(": yes")
    assert "CudaBackend.launch_count: 1 per epoch" in one
    assert bench.ncu_summary({"sample_epoch": 5, "cupy_copy": 1}, 5, None).endswith(": NO")
    assert bench.ncu_summary({"sample_epoch": 10}, 5, 5).endswith(": NO")


def test_count_ncu_from_the_command_line(tmp_path: Path, capsys: Any) -> None:
    log = tmp_path / "ncu.csv"
    log.write_text(NCU_LOG)
    # The epochs and launch count come from the log's own PROFILED_EPOCHS line.
    assert bench.main(["--count-ncu", str(log)]) == 0
    assert capsys.readouterr().out.strip() == bench.ncu_summary({"sample_epoch": 2}, 2, 2)
    log.write_text(NCU_LOG.split("\n", 1)[1])  # without it: the options say
    assert bench.main(["--count-ncu", str(log), "--epochs", "1", "--launch-count", "1"]) == 0
    assert capsys.readouterr().out.strip() == bench.ncu_summary({"sample_epoch": 2}, 1, 1)


def test_profile_epochs_counts_the_backends_draws() -> None:
    assert bench.profile_epochs("numpy", 3) == {"epochs": 3, "launch_count": 3}


# -- the sections and the whole run, on the NumPy backend --------------------------------------


@pytest.mark.usefixtures("small_sizes")
def test_orders_section_on_the_host() -> None:
    session = _session()
    results = bench.orders_section(session, 0.0, 0.0)
    assert [r["n_patches"] for r in results] == [1000, 10000]
    # Only the smaller case is compared with NumPy (here NumPy against itself).
    assert results[0]["same"] == {key: True for key, _, _ in bench.order_variants()}
    assert results[1]["same"] is None
    table = [line for line in session.report.lines if line.startswith("| ~1k")]
    assert len(table) == 2 * len(bench.order_variants())
    assert all(line.endswith("| yes |") for line in table[:4])
    assert all(line.endswith("| not checked (larger case) |") for line in table[4:])


@pytest.mark.usefixtures("small_sizes")
def test_orders_section_keeps_to_the_time_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    session = _session(time_budget=bench.TAIL_RESERVE_S + bench.PROBE_RESERVE_S)
    assert bench.orders_section(session, 0.0, 0.0) == []
    rows = [line for line in session.report.lines if line.startswith("| ~1k")]
    assert len(rows) == 2 and all("would overrun --time-budget" in line for line in rows)
    monkeypatch.setattr(bench, "QUICK_ORDER_PATCH_TARGETS", (10**3,))
    session = _session(no_numpy=True)
    assert all(r["same"] is None for r in bench.orders_section(session, 0.0, 0.0))
    assert any(line.endswith("| skipped (--no-numpy) |") for line in session.report.lines)


@pytest.mark.usefixtures("small_sizes")
def test_the_whole_run_builds_its_report_from_real_measurements(
    tmp_path: Path,
    numpy_probe: dict[str, Any],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # The probe's child process already ran for the fixture: reuse its real output.
    def probe(timeout_s: float, backend: str) -> dict[str, Any]:
        assert backend == "numpy" and timeout_s > 0
        return numpy_probe

    monkeypatch.setattr(bench, "run_launch_probe", probe)
    output = tmp_path / "gpu.md"
    text = bench.run(_args(output=output), host_cupy(), backend="numpy")
    capsys.readouterr()
    assert output.read_text() == text
    for heading in (
        "# GPU benchmark: gpu-patching CUDA backend (Host stand-in)",
        "## Bandwidth (measured in this run)",
        "## Epoch throughput",
        "## End-to-end time per epoch at ~1,000 patches",
        "## Shuffled and sharded epochs (gpu-patching, CUDA backend)",
        "## Table updates at ~1k (1,024) regions",
        "## Targets",
    ):
        assert heading in text.splitlines(), heading
    throughput = [line for line in text.splitlines() if line.startswith("| ~1k (1,024) |")]
    assert len(throughput) >= 3  # two throughput cases, one latency row, ...
    assert all("| yes |" in line for line in throughput[:2])  # same patches as NumPy
    targets = text[text.index("## Targets") :]
    assert "not measured |" not in targets.replace("not measured: ", "")
    assert "| 1 kernel launch per epoch (CudaBackend.launch_count) | 1 | yes |" in targets
    assert "| 1 kernel launch per epoch (CUPTI via torch.profiler) |" in targets
    assert bench.probe_text(numpy_probe) in targets
    assert "of the copy roofline" in targets


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


# -- the GPU session script (benchmarks/gpu_session.sh) ---------------------------------------

#: The device call's limit for the whole session (issue 11): 8 minutes.
SESSION_LIMIT_S = 480


def _session_script(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(SESSION), *args],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHON": sys.executable, **env},
        timeout=300,
        check=False,
    )


def test_gpu_session_script_parses_and_names_files_that_exist() -> None:
    subprocess.run(["bash", "-n", str(SESSION)], check=True)
    text = SESSION.read_text()
    named = re.findall(r"\b(?:tests|benchmarks)/[\w/]+\.py\b", text)
    assert "tests/test_cuda.py" in named and "benchmarks/bench_gpu.py" in named
    for name in named:
        assert (ROOT / name).is_file(), name


def test_gpu_session_steps_fit_one_8_minute_call() -> None:
    done = _session_script("plan")
    assert done.returncode == 0, done.stderr
    budgets = dict(re.findall(r"^([\w-]+) +(\d+) s", done.stdout, re.MULTILINE))
    steps = ["describe", "pytest-cuda", "memcheck", "launches", "bench-gpu"]
    steps += ["bench-crop", "bench-filters", "bench-access", "bench-memory", "bench-stores"]
    steps += ["bench-careamics"]
    assert [name for name in budgets if name not in ("total", "grace")] == steps
    total, grace = int(budgets.pop("total")), int(budgets.pop("grace"))
    assert total == sum(int(seconds) for seconds in budgets.values())
    session_s = int(re.search(r"of (\d+) s for the session", done.stdout).group(1))
    assert total <= session_s
    # A step that overruns is killed GRACE s after its limit, and later steps only
    # get what is left of the session: the call ends within its 8 minutes, with
    # time left for the summary and the archive.
    assert session_s + grace + 20 <= SESSION_LIMIT_S


@pytest.mark.parametrize(
    ("summary", "passed"),
    [
        ("4 passed, 2 skipped, 300 deselected in 3.10s", True),
        ("========= 1 failed, 3 passed, 1 skipped in 9.00s =========", True),
        ("128 skipped, 142 deselected in 1.98s", False),
        ("========= 5 skipped in 0.50s =========", False),
        ("no tests ran in 0.10s", False),
        ("270 deselected in 0.40s", False),
        ("2 errors in 0.20s", False),
        ("", False),
    ],
)
def test_gpu_session_fails_loudly_when_no_gpu_test_passed(
    tmp_path: Path, summary: str, passed: bool
) -> None:
    log = tmp_path / "pytest-cuda.log"
    # The lines pytest's -ra summary prints before the last one.
    log.write_text(f"ss.s\nSKIPPED [3] tests/test_cuda.py:40: 12 passed earlier\n{summary}\n")
    done = _session_script("check-pytest-log", str(log))
    assert done.returncode == (0 if passed else 1), done.stdout + done.stderr
    if passed:
        assert done.stdout.startswith("ok      GPU tests ran:")
    else:
        assert done.stdout.startswith("FAILED: no GPU test passed: every GPU test skipped")
        assert str(log) in done.stdout


def test_gpu_session_finds_every_file_with_gpu_tests() -> None:
    done = _session_script("list-gpu-tests")
    assert done.returncode == 0, done.stderr
    listed = done.stdout.split()
    assert {"tests/test_cuda.py", "tests/test_crop_cuda.py"} <= set(listed)
    marked = re.compile(r"^\s*@pytest\.mark\.cuda\b|^pytestmark\s*=.*pytest\.mark\.cuda\b", re.M)
    files = {p.relative_to(ROOT).as_posix(): p.read_text() for p in ROOT.glob("tests/test_*.py")}
    assert sorted(listed) == sorted(name for name, text in files.items() if marked.search(text))
    assert "tests/test_bench_gpu.py" not in listed  # it names the marker, marks nothing


def test_gpu_session_without_a_gpu_fails_and_packs_its_logs(tmp_path: Path) -> None:
    # Here every GPU test skips: the session must not call that a success.
    done = _session_script(OUT=str(tmp_path))
    assert done.returncode == 1, done.stdout + done.stderr
    summary = (tmp_path / "summary.txt").read_text()
    assert "FAILED: no GPU test passed" in summary
    assert "GPU SESSION FAILED" in summary.splitlines()[-1]
    # What comes back from the device machine: at most 8 files, no folder.
    returned = sorted(p.name for p in tmp_path.iterdir())
    assert returned == ["pytest-cuda.log", "session.tar.gz", "summary.txt"]
    listing = subprocess.run(
        ["tar", "-tzf", str(tmp_path / "session.tar.gz")], capture_output=True, text=True
    ).stdout.split()
    assert {"logs/describe.log", "logs/pytest-cuda.log"} <= set(listing)


def _bench_commands() -> dict[str, list[str]]:
    """Each benchmark step of the session and its command line (after python)."""
    done = _session_script("commands")
    assert done.returncode == 0, done.stderr
    steps = [line.split(": ", 1) for line in done.stdout.splitlines()]
    return {name: command.split() for name, command in steps}


def test_gpu_session_runs_every_benchmark_that_has_a_gpu_row() -> None:
    # A script has a GPU row when it asks the harness for a device (usable_cupy).
    with_gpu = {
        f"benchmarks/{path.name}"
        for path in (ROOT / "benchmarks").glob("bench_*.py")
        if "usable_cupy" in path.read_text()
    }
    assert with_gpu == {
        f"benchmarks/bench_{name}.py"
        for name in ("gpu", "crop", "filters", "access", "memory", "stores", "careamics")
    }
    assert {command[0] for command in _bench_commands().values()} == with_gpu


def test_gpu_session_runs_the_scripts_with_a_cpu_part_for_their_gpu_rows_alone() -> None:
    # A script with CPU rows too runs with --gpu-only: its CPU rows come from CPU machines.
    for name, command in _bench_commands().items():
        if name != "bench-gpu":
            assert "--gpu-only" in command, name


def test_gpu_session_plan_fits_the_budget_with_every_benchmark_step() -> None:
    plan = _session_script("plan").stdout
    budgets = {k: int(v) for k, v in re.findall(r"^([\w-]+) +(\d+) s", plan, re.MULTILINE)}
    benchmarks = _bench_commands()
    assert all(budgets[name] >= 15 for name in benchmarks)  # room to start and report
    session_s = int(re.search(r"of (\d+) s for the session", plan).group(1))
    assert sum(v for k, v in budgets.items() if k not in ("total", "grace")) <= session_s


def test_gpu_session_benchmark_commands_are_steps_with_a_budget() -> None:
    plan = _session_script("plan").stdout
    budgets = dict(re.findall(r"^([\w-]+) +(\d+) s", plan, re.MULTILINE))
    assert all(name in budgets for name in _bench_commands())


@pytest.mark.parametrize(
    "step",
    [
        "bench-gpu",
        "bench-crop",
        "bench-filters",
        "bench-access",
        "bench-memory",
        "bench-stores",
        "bench-careamics",
    ],
)
def test_gpu_session_benchmark_command_lines_use_flags_their_script_accepts(step: str) -> None:
    command = _bench_commands()[step]
    done = subprocess.run(
        [sys.executable, str(ROOT / command[0]), "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    for flag in (word for word in command[1:] if word.startswith("--")):
        assert re.search(rf"(^|\s){re.escape(flag)}\b", done.stdout), (step, flag)
    if "--time-budget" in command:  # what is left of the step for the script itself
        assert float(command[command.index("--time-budget") + 1]) > 0


def test_gpu_session_rejects_an_unknown_part() -> None:
    done = _session_script("tests")
    assert done.returncode == 2 and "usage" in done.stderr


def test_benchmarks_readme_states_the_session_budgets_the_script_uses() -> None:
    plan = _session_script("plan").stdout
    budgets = dict(re.findall(r"^([\w-]+) +(\d+) s", plan, re.MULTILINE))
    readme = (ROOT / "benchmarks" / "README.md").read_text()
    stated = dict(re.findall(r"^\| ([\w-]+) \| (\d+) s \|", readme, re.MULTILINE))
    assert stated == {k: v for k, v in budgets.items() if k not in ("total", "grace")}


def test_the_cuda_backend_on_the_host_draws_each_epoch_in_one_launch(host_kernels: Any) -> None:
    # The CUDA backend's own code (launch_count, grid, argument tuple) with the
    # shipped kernel run on the host: what the GPU report's launch columns read.
    from host_launch import HostBackend

    case = _small_case(10**3)
    sampler = _sampler(case)
    sampler._backend = HostBackend(host_kernels)
    latency = bench.measure_latency(host_cupy(), sampler, 3)
    assert latency["launches"] == 1
    orders = bench.measure_orders(host_cupy(), sampler, 0.001, 1)
    assert [v["launches"] for v in orders["variants"].values()] == [1, 1, 1, 1]
    assert [v["launches"] for v in orders["baselines"].values()] == [1, 1]
    same = bench.compare_orders(sampler, _sampler(case), bench.ORDER_CHECK_EPOCH)
    assert same == {key: True for key, _, _ in bench.order_variants()}


# A machine that has what the GPU path of the session needs, but no GPU: stubs
# of nvidia-smi, ncu and compute-sanitizer on PATH, and a python3 that passes
# the GPU check and stands in for the GPU-only runs. Everything else is real:
# the GPU tests (which skip here), the epochs that ncu would profile (on the
# NumPy backend) and the count of its CSV.
FAKE_PYTHON = """#!/usr/bin/env bash
real={python}
case "$*" in
    *usable_cupy*) exit 0 ;;  # the GPU check
    *"import cupy, numpy"*) echo "cupy (stand-in)"; exit 0 ;;
    *"import torch"*) echo "torch (stand-in)"; exit 0 ;;
    *set_allocator*) shift 2; exec "$real" -m pytest "$@" ;;  # CuPy's pool: none here
    *--profile-epochs*) exec "$real" "$@" --backend numpy ;;
    *"bench_gpu.py --no-torch-profile"*) echo "bench_gpu (stand-in): $*"; exit 0 ;;
    *bench_crop.py*|*bench_filters.py*)  # their --output is an absolute path under $OUT
        args="$*"
        output=${{args##*--output }}
        [[ "$output" == /* ]] || exit 3
        echo "# stand-in" >"$output"
        if [[ "$args" == *bench_crop.py* ]]; then
            echo "# stand-in" >"${{output%/*}}/crop-gpu-stand-in.md"
        fi
        exit 0 ;;
esac
exec "$real" "$@"
"""

FAKE_TOOLS = {
    "nvidia-smi": 'echo "GPU 0: stand-in"',
    # Drops its options, runs the program, then prints one launch per profiled epoch.
    "ncu": """while [[ $1 == --* ]]; do [[ $1 == --csv ]] && shift || shift 2; done
"$@" || exit $?
echo '"ID","Kernel Name","Metric Name","Metric Value"'
for i in 0 1 2 3 4; do
    echo "\\"$i\\",\\"sample_epoch\\",\\"gpu__time_duration.sum\\",\\"9\\""
done""",
    "compute-sanitizer": """while [[ $1 == --* ]]; do shift 2; done
exec "$@\"""",
}


def test_gpu_session_runs_every_step_on_a_machine_with_the_tools(tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in {**FAKE_TOOLS, "python3": FAKE_PYTHON.format(python=sys.executable)}.items():
        tool = bin_dir / name
        tool.write_text(body if body.startswith("#!") else f"#!/usr/bin/env bash\n{body}\n")
        tool.chmod(0o755)
    out = tmp_path / "out"
    done = _session_script(
        OUT=str(out),
        PYTHON=str(bin_dir / "python3"),
        PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
    )
    summary = (out / "summary.txt").read_text()
    assert done.returncode == 1, done.stdout + done.stderr  # the GPU tests skipped here
    lines = summary.splitlines()
    for name in ("describe", "pytest-cuda", "memcheck", "launches", "bench-gpu"):
        assert any(line.startswith(f"ok      {name} (") for line in lines), (name, summary)
    assert any(line.startswith("ok      bench-crop (") for line in lines), summary
    assert any(line.startswith("ok      bench-filters (") for line in lines), summary
    # Without a device the scripts of the last steps say why and succeed.
    for name in ("bench-access", "bench-memory", "bench-stores", "bench-careamics"):
        assert any(line.startswith(f"ok      {name} (") for line in lines), (name, summary)
    assert "FAILED: no GPU test passed" in summary
    counted = next(line for line in lines if line.startswith("launches per epoch counted with ncu"))
    assert "1 sample_epoch launch(es) per epoch over 5 epochs" in counted
    assert "CudaBackend.launch_count: 1 per epoch; one launch per epoch: yes" in counted
    assert lines[-1] == "GPU SESSION FAILED: see the FAILED lines above"
    returned = sorted(p.name for p in out.iterdir())
    assert returned == [
        "crop-gpu-stand-in.md",
        "filters-gpu.md",
        "pytest-cuda.log",
        "session.tar.gz",
        "summary.txt",
    ]
    assert len(returned) <= 8  # what the device tool brings back
