"""The benchmarks' shared report and timing module (benchmarks/_report.py)."""

from __future__ import annotations

import re
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
if str(BENCHMARKS) not in sys.path:
    sys.path.insert(0, str(BENCHMARKS))  # the scripts import it by name, as run from there

import _report  # noqa: E402


def test_times_have_three_significant_digits_in_a_fitting_unit() -> None:
    assert _report.fmt_time(None) == "n/a"
    assert _report.fmt_time(2.5) == "2.50 s"
    assert _report.fmt_time(150.0) == "150 s"
    assert _report.fmt_time(1.5e-3) == "1.50 ms"
    assert _report.fmt_time(0.25) == "250 ms"
    assert _report.fmt_time(25e-6) == "25.0 us"
    assert _report.fmt_time(1e-4) == "100 us"
    assert _report.fmt_time(6.2e-7) == "620 ns"
    assert _report.fmt_time(4.2e-9) == "4.20 ns"


def test_rates_sizes_and_fractions() -> None:
    assert _report.fmt_rate(2.5e9) == "2.50 G/s"
    assert _report.fmt_rate(3.2e6) == "3.20 M/s"
    assert _report.fmt_rate(999) == "999 /s"
    assert _report.fmt_bandwidth(3.0e12) == "3,000 GB/s"
    assert _report.fmt_bytes(4 * 10**9) == "3.73 GiB"
    assert _report.fmt_bytes(3 << 20) == "3.00 MiB"
    assert _report.fmt_bytes(100) == "100 B"
    assert _report.fmt_bytes(-(3 << 20)) == "-3.00 MiB"  # a peak below its bound
    assert _report.fmt_bytes(-100) == "-100 B"
    assert _report.fmt_percent(0.5) == "50.0%"
    assert _report.fmt_overhead(0.123) == "+12%"
    assert _report.fmt_overhead(-0.05) == "-5%"
    assert _report.fmt_ratio(12345.0, 1.0) == "x12,345"
    assert _report.fmt_ratio(3.0, 2.0, decimals=1) == "x1.5"
    assert _report.fmt_ratio(None, 2.0) == "n/a"
    assert [_report.fmt_verdict(v) for v in (True, False, None)] == ["yes", "NO", "n/a"]


def test_slug_and_cuda_versions() -> None:
    assert _report.slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    assert _report.slug("NVIDIA H200") == "nvidia-h200"
    assert _report.slug("???") == "unknown-gpu"
    assert _report.cuda_version(12040) == "12.4"
    assert _report.cuda_version(13000) == "13.0"
    assert _report.cuda_version(0) == "unknown"


def test_markdown_table_aligns_and_checks_its_columns() -> None:
    lines = _report.markdown_table(["a", "b"], [["1", "2"]], "lr")
    assert lines == ["| a | b |", "|---|---:|", "| 1 | 2 |"]
    with pytest.raises(ValueError, match="1 cells"):
        _report.markdown_table(["a", "b"], [["1"]], "lr")
    with pytest.raises(ValueError, match="align has 1"):
        _report.markdown_table(["a", "b"], [], "l")
    with pytest.raises(ValueError, match="'lc'"):
        _report.markdown_table(["a", "b"], [], "lc")


def test_time_calls_warms_up_then_times_each_call_with_its_sync() -> None:
    calls: list[int] = []
    syncs: list[None] = []
    times = _report.time_calls(calls.append, 4, lambda: syncs.append(None))
    assert calls == [0, 0, 1, 2, 3]
    assert len(syncs) == 5
    assert len(times) == 4 and all(t >= 0 for t in times)
    calls.clear()
    _report.median_time(calls.append, 3, warmup=False)
    assert calls == [0, 1, 2]
    with pytest.raises(ValueError, match="repeats"):
        _report.time_calls(calls.append, 0)
    seconds, value = _report.time_once(lambda: 7)
    assert value == 7 and seconds >= 0


class _Clock:
    """A stand-in for CUDA events: each record reads a counter that calls advance."""

    now = 0.0

    def record(self, stream: Any = None) -> None:
        self.at = _Clock.now

    def synchronize(self) -> None:
        return None


def _event_cupy() -> Any:
    stream = SimpleNamespace(synchronize=lambda: None)
    return SimpleNamespace(
        cuda=SimpleNamespace(
            Event=_Clock,
            get_current_stream=lambda: stream,
            get_elapsed_time=lambda start, end: (end.at - start.at) * 1e3,
        )
    )


def test_event_timers_count_calls_and_divide_bursts() -> None:
    calls: list[int] = []

    def call(k: int) -> None:
        calls.append(k)
        _Clock.now += 0.002  # every call "takes" 2 ms of device time

    assert _report.time_burst(_event_cupy(), call, 5, 3) == pytest.approx(0.002)
    assert len(calls) == 1 + 5 * 3  # the warm-up, then the bursts
    calls.clear()
    times = _report.time_events(_event_cupy(), call, 4)
    assert times == pytest.approx([0.002] * 4) and calls == [0, 0, 1, 2, 3]


def test_percentile() -> None:
    assert _report.percentile([1.0, 2.0, 3.0, 4.0, 5.0], 50) == 3.0
    assert _report.percentile(list(np.arange(11.0)), 90) == pytest.approx(9.0)


def test_report_prints_as_it_goes_and_writes_its_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    report = _report.Report()
    report.emit("# title", "")
    report.emit(*_report.markdown_table(["a"], [["1"]], "r"))
    assert capsys.readouterr().out == "# title\n\n| a |\n|---:|\n| 1 |\n"
    path = tmp_path / "deep" / "out.md"
    text = report.write(path, extra=["", "tail"])
    assert path.read_text() == text == "# title\n\n| a |\n|---:|\n| 1 |\n\ntail\n"
    assert report.text() == "# title\n\n| a |\n|---:|\n| 1 |\n"  # extra is not kept
    quiet = _report.Report(echo=False)
    quiet.emit("x")
    assert capsys.readouterr().out == ""


def test_machine_line_names_cpu_python_and_numpy() -> None:
    line = _report.machine_line()
    assert line.startswith("CPU: ") and f"NumPy {np.__version__}" in line
    assert "logical cores" in line


def test_the_readme_example_runs(capsys: pytest.CaptureFixture[str]) -> None:
    text = (BENCHMARKS / "README.md").read_text()
    section = text[text.index("## The shared report module") :]
    example = section[section.index("```python\n") + 10 : section.index("```\n", 10)]
    exec(compile(example, "benchmarks/README.md", "exec"), {})
    printed = capsys.readouterr().out
    assert printed.startswith("# Sum: np.sum against a Python loop\n")
    assert "| case | np.sum | Python sum() | ratio |" in printed


def test_copy_bandwidth_measures_three_operations_and_checks_they_wrote() -> None:
    from bench_host import host_cupy

    seconds = _report.measure_copy_bandwidth(host_cupy(), 1 << 12, per_burst=2, rounds=2)
    assert set(seconds) == {"memcpy", "copy", "fill"} and all(t > 0 for t in seconds.values())
    with pytest.raises(ValueError, match="nbytes"):
        _report.measure_copy_bandwidth(host_cupy(), 7, per_burst=2, rounds=2)


def test_copy_bandwidth_refuses_kernels_that_wrote_nothing() -> None:
    from bench_host import host_cupy

    class Idle:
        def __init__(self, *args: Any) -> None:
            return None

        def __call__(self, value: Any, out: Any) -> None:
            return None  # launched, but writes nothing

    cupy = host_cupy()
    cupy.ElementwiseKernel = Idle
    with pytest.raises(RuntimeError, match="did not write"):
        _report.measure_copy_bandwidth(cupy, 1 << 12, per_burst=2, rounds=1)


# -- the script harness --------------------------------------------------------------------


def test_script_parser_gives_every_script_the_same_flags(tmp_path: Path) -> None:
    parser = _report.script_parser(
        "Title line.\n\nMore.", tmp_path / "x.md", "tiny", reference=True
    )
    assert parser.description == "Title line."
    args = parser.parse_args(["--quick", "--no-reference", "--write-results"])
    assert args.quick and args.no_reference and args.write_results and args.output is None
    assert _report.destination(args, tmp_path / "x.md") == (tmp_path / "x.md", True)


def test_script_parser_adds_no_reference_only_to_scripts_with_a_reference(tmp_path: Path) -> None:
    parser = _report.script_parser("Title.", tmp_path / "x.md", "tiny")
    with pytest.raises(SystemExit):
        parser.parse_args(["--no-reference"])


def test_script_parser_adds_gpu_only_to_scripts_with_a_gpu_part(tmp_path: Path) -> None:
    parser = _report.script_parser("Title.", tmp_path / "x.md", "tiny", gpu=True)
    assert parser.parse_args(["--gpu-only"]).gpu_only
    assert (
        not _report.script_parser("Title.", tmp_path / "x.md", "tiny")
        .parse_args([])
        .__dict__.get("gpu_only")
    )


def test_script_parser_refuses_a_description_without_a_title(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="description"):
        _report.script_parser("", tmp_path / "x.md", "tiny")


def test_finish_writes_only_when_asked_and_says_where(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    parser = _report.script_parser("Title.", tmp_path / "x.md", "tiny")
    report = _report.Report(echo=False)
    report.emit("# title")
    assert _report.finish(report, parser.parse_args([]), tmp_path / "x.md") == "# title\n"
    assert not (tmp_path / "x.md").exists() and capsys.readouterr().out == ""
    output = tmp_path / "out.md"
    text = _report.finish(report, parser.parse_args(["--output", str(output)]), tmp_path / "x.md")
    assert output.read_text() == text and f"written to {output}" in capsys.readouterr().out


def test_in_turns_calls_each_function_once_per_round_in_order() -> None:
    calls: list[tuple[str, int]] = []
    times = _report.in_turns(
        {"a": lambda k: calls.append(("a", k)), "b": lambda k: calls.append(("b", k))}, rounds=3
    )
    assert calls == [("a", 0), ("b", 0), ("a", 1), ("b", 1), ("a", 2), ("b", 2)]
    assert list(times) == ["a", "b"] and all(len(t) == 3 and min(t) >= 0 for t in times.values())


def test_in_turns_with_rotate_starts_turn_k_at_the_kth_function() -> None:
    calls: list[tuple[str, int]] = []
    functions = {name: (lambda k, name=name: calls.append((name, k))) for name in "abc"}
    times = _report.in_turns(functions, rounds=4, rotate=True)
    assert [name for name, _ in calls] == list("abcbcacababc")
    assert [k for _, k in calls] == [0] * 3 + [1] * 3 + [2] * 3 + [3] * 3
    assert list(times) == ["a", "b", "c"] and all(len(t) == 4 for t in times.values())


def test_in_turns_refuses_fewer_than_one_round() -> None:
    with pytest.raises(ValueError, match="rounds"):
        _report.in_turns({"a": lambda k: None}, rounds=0)


def test_load_line_states_the_three_load_averages_and_the_cores() -> None:
    line = _report.load_line()
    assert line.startswith("load average ") and line.endswith(" cores")
    assert line.count(" / ") == 2


def test_load_1min_is_the_one_minute_load_average_with_one_decimal() -> None:
    assert re.fullmatch(r"\d+\.\d", _report.load_1min())
    assert _report.load_line().startswith(f"load average {_report.load_1min()} / ")


def test_no_reference_flag_gives_no_reference_and_says_why() -> None:
    reference, why = _report.reference_or_reason(wanted=False)
    assert reference is None and why == "--no-reference"


def test_run_child_hands_the_job_over_and_reads_the_last_json_line() -> None:
    source = (
        'import json, sys\nprint("noise")\n'
        'print(json.dumps({"twice": 2 * json.loads(sys.argv[1])["n"]}))'
    )
    assert _report.run_child(source, {"n": 21}, "doubling") == {"twice": 42}


def test_run_child_names_what_failed_and_shows_the_childs_error() -> None:
    with pytest.raises(RuntimeError, match=r"(?s)doubling failed:.*ZeroDivisionError"):
        _report.run_child("1 / 0", {}, "doubling")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="Linux's /proc")
def test_proc_memory_helpers_read_resident_memory_in_a_child() -> None:
    source = _report.PROC_MEMORY + (
        "import json\nreset_peak()\nprint(json.dumps({'rss': status('VmRSS'), "
        "'hwm': status('VmHWM')}))"
    )
    figures = _report.run_child(source, {}, "reading memory")
    assert 0 < figures["rss"] <= figures["hwm"]
