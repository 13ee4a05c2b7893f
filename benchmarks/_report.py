"""The benchmark scripts' one harness: flags, timing, the machine, tables, the report.

Every ``benchmarks/bench_*.py`` script imports this module by name (its own
folder is first on ``sys.path``) and keeps only its cases: ``script_parser``
gives it ``--quick``, ``--no-reference``, ``--output`` and ``--write-results``;
``time_calls``/``in_turns`` (host) and ``time_events``/``time_burst`` (CUDA)
time it; ``machine_line``, ``device_lines`` and ``load_line`` describe where it
ran; ``markdown_table`` and the ``fmt_*`` functions format it; ``Report`` and
``finish`` print and write it (``--write-results`` keeps the sections a run did
not redo). ``benchmarks/README.md`` lists every name by group.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from gpu_patching._atomic import write_atomically
from gpu_patching.testing import cpu_model, usable_cupy

__all__ = [
    "PROC_MEMORY",
    "RESULTS_DIR",
    "Report",
    "add_output_arguments",
    "cpu_model",
    "cuda_version",
    "destination",
    "device_info",
    "device_lines",
    "finish",
    "fmt_bandwidth",
    "fmt_bytes",
    "fmt_overhead",
    "fmt_percent",
    "fmt_rate",
    "fmt_ratio",
    "fmt_time",
    "fmt_verdict",
    "free_device_memory",
    "in_turns",
    "load_1min",
    "load_line",
    "machine_line",
    "markdown_row",
    "markdown_table",
    "measure_copy_bandwidth",
    "median_time",
    "merge_sections",
    "percentile",
    "reference_or_reason",
    "run_child",
    "script_parser",
    "slug",
    "time_burst",
    "time_calls",
    "time_events",
    "time_once",
    "usable_cupy",
    "write_markdown",
]

#: Where the scripts write their markdown when asked (``--write-results``).
RESULTS_DIR = Path(__file__).resolve().parent / "results"


# -- formatting --------------------------------------------------------------------------


def _three_digits(value: float) -> str:
    if value >= 100:
        return f"{value:.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def fmt_time(seconds: float | None) -> str:
    """A duration with three significant digits: '2.50 s', '1.50 ms', '25.0 us', '620 ns'."""
    if seconds is None:
        return "n/a"
    for scale, unit in ((1.0, "s"), (1e-3, "ms"), (1e-6, "us")):
        if seconds >= scale:
            return f"{_three_digits(seconds / scale)} {unit}"
    return f"{_three_digits(seconds / 1e-9)} ns"


def _in_largest_unit(value: float, units: Sequence[tuple[float, str]], smaller: str) -> str:
    """``value`` with two decimals in the first of ``units`` (largest first) it reaches."""
    for scale, unit in units:
        if value >= scale:
            return f"{value / scale:.2f} {unit}"
    return smaller  # below every unit


def fmt_rate(per_second: float | None) -> str:
    """Items (patches, rows) per second with an SI prefix: '2.50 G/s' ('n/a' for None)."""
    if per_second is None:
        return "n/a"
    units = ((1e9, "G/s"), (1e6, "M/s"), (1e3, "k/s"))
    return _in_largest_unit(per_second, units, f"{per_second:.0f} /s")


def fmt_bandwidth(bytes_per_second: float) -> str:
    """Bytes per second in GB/s (1 GB = 1e9 bytes): '3,000 GB/s'."""
    return f"{bytes_per_second / 1e9:,.0f} GB/s"


def fmt_bytes(nbytes: int) -> str:
    """A size in binary units: '3.73 GiB'; a negative one with its sign: '-199.54 MiB'."""
    if nbytes < 0:
        return "-" + fmt_bytes(-nbytes)
    units = ((1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB"))
    return _in_largest_unit(nbytes, units, f"{nbytes} B")


def fmt_percent(fraction: float) -> str:
    """A fraction as a percentage with one decimal: '50.0%'."""
    return f"{fraction * 100:.1f}%"


def fmt_overhead(fraction: float) -> str:
    """A relative extra cost: 0.123 -> '+12%', -0.05 -> '-5%'."""
    return f"{fraction:+.0%}"


def fmt_ratio(numerator: float | None, denominator: float | None, decimals: int = 0) -> str:
    """How many times ``numerator`` is ``denominator``: 'x1,234' ('n/a': a None or a 0 below).

    Benchmarks print ``reference time / our time``, so a speed-up reads 'x12'.
    """
    if numerator is None or denominator is None or denominator == 0:
        return "n/a"  # not measured, or nothing measured (e.g. no batch to time)
    return f"x{numerator / denominator:,.{decimals}f}"


def fmt_verdict(met: bool | None) -> str:
    """Whether a target is met: 'yes', 'NO', or 'n/a' when not measured."""
    return "n/a" if met is None else ("yes" if met else "NO")


def slug(name: str) -> str:
    """File-name slug of a GPU name: 'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3'."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "unknown-gpu"


def cuda_version(value: int) -> str:
    """CUDA's integer version (1000 * major + 10 * minor) as 'major.minor'."""
    if value <= 0:
        return "unknown"
    return f"{value // 1000}.{(value % 1000) // 10}"


# -- tables ------------------------------------------------------------------------------


def markdown_row(cells: Sequence[str]) -> str:
    """One row of a markdown table."""
    return "| " + " | ".join(cells) + " |"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]], align: str) -> list[str]:
    """Lines of a markdown table; ``align`` has one 'l' or 'r' per column.

    Raises
    ------
    ValueError
        If ``align`` or a row does not have one entry per column, or ``align``
        holds a letter other than 'l' and 'r'.
    """
    if len(align) != len(header):
        raise ValueError(f"align has {len(align)} columns, header has {len(header)}")
    if set(align) - {"l", "r"}:
        raise ValueError(f"align {align!r} may only hold 'l' and 'r'")
    lines = [
        markdown_row(header),
        "|" + "|".join("---:" if a == "r" else "---" for a in align) + "|",
    ]
    for row in rows:
        if len(row) != len(header):
            raise ValueError(f"row {row!r} has {len(row)} cells, expected {len(header)}")
        lines.append(markdown_row(row))
    return lines


# -- timing on the host ------------------------------------------------------------------


def _no_sync() -> None:
    return None


def time_calls(
    function: Callable[[int], Any],
    repeats: int,
    sync: Callable[[], None] = _no_sync,
    warmup: bool = True,
) -> list[float]:
    """``perf_counter`` time of each of ``repeats`` calls ``function(k)``, each followed by sync.

    One warm-up call ``function(0)`` comes first unless ``warmup`` is False.
    The result of each call stays alive until the next call returns, as in a
    training loop (so freeing it is not timed as part of the next call).
    """
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    if warmup:
        function(0)
        sync()
    times = []
    result = None
    for k in range(repeats):
        start = time.perf_counter()
        result = function(k)
        sync()
        times.append(time.perf_counter() - start)
    del result
    return times


def median_time(
    function: Callable[[int], Any],
    repeats: int,
    sync: Callable[[], None] = _no_sync,
    warmup: bool = True,
) -> float:
    """Median of :func:`time_calls` (seconds)."""
    return statistics.median(time_calls(function, repeats, sync, warmup))


def time_once(function: Callable[[], Any]) -> tuple[float, Any]:
    """``(seconds, value)`` of one call, no warm-up (for what is too slow to repeat)."""
    start = time.perf_counter()
    value = function()
    return time.perf_counter() - start, value


def in_turns(
    functions: Mapping[str, Callable[[int], Any]], rounds: int, *, rotate: bool = False
) -> dict[str, list[float]]:
    """``perf_counter`` time of each function in each of ``rounds`` turns, by name.

    Turn ``k`` calls every function once, ``function(k)``, in the mapping's
    order, so that methods compared side by side see the same load on a shared
    machine (a drift of its speed touches them alike). With ``rotate``, turn
    ``k`` starts at the ``k``-th function (modulo their number) and goes round,
    so that no method always runs right after the same one: a cost one call
    leaves to the next (memory the kernel must compact or zero again after a
    large allocation is freed) then falls on every method in turn. No warm-up.

    Raises
    ------
    ValueError
        If ``rounds`` is less than 1.
    """
    if rounds < 1:
        raise ValueError(f"rounds must be at least 1, got {rounds}")
    times: dict[str, list[float]] = {name: [] for name in functions}
    names = list(functions)
    for k in range(rounds):
        first = k % len(names) if rotate and names else 0
        for name in names[first:] + names[:first]:
            start = time.perf_counter()
            functions[name](k)
            times[name].append(time.perf_counter() - start)
    return times


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100) of ``values``."""
    return float(np.percentile(np.asarray(values), q))


# -- a measurement in a fresh process -----------------------------------------------------

#: Source of two helpers for a measuring child process on Linux, to put before
#: its own code: ``status(key)`` is a ``/proc/self/status`` figure in bytes
#: (``VmRSS``, ``VmHWM``), ``reset_peak()`` resets ``VmHWM`` to the resident
#: memory now (False where the system does not allow it).
PROC_MEMORY = r"""
def status(key):
    with open("/proc/self/status") as lines:
        for line in lines:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024

def reset_peak():
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False
"""


def run_child(source: str, job: dict[str, Any], what: str) -> dict[str, Any]:
    """Run ``source`` in a fresh Python with ``job`` as JSON in ``sys.argv[1]``.

    A fresh process measures memory from a known start, without what earlier
    cases left behind. Returns the child's last line of output, read as JSON.

    Raises
    ------
    RuntimeError
        If the child fails: the message names ``what`` and holds its stderr.
    """
    done = subprocess.run(
        [sys.executable, "-c", source, json.dumps(job)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"{what} failed:\n{done.stderr}")
    figures: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return figures


# -- timing on a CUDA device -------------------------------------------------------------


def time_events(cupy: Any, function: Callable[[int], Any], repeats: int) -> list[float]:
    """CUDA-event time of each of ``repeats`` calls, each synchronised before the next.

    One warm-up call ``function(0)`` comes first.
    """
    stream = cupy.cuda.get_current_stream()
    start, end = cupy.cuda.Event(), cupy.cuda.Event()
    function(0)
    stream.synchronize()
    times = []
    result = None
    for k in range(repeats):
        start.record(stream)
        result = function(k)
        end.record(stream)
        end.synchronize()
        times.append(cupy.cuda.get_elapsed_time(start, end) * 1e-3)
    del result
    return times


def time_burst(cupy: Any, function: Callable[[int], Any], per_burst: int, rounds: int) -> float:
    """Per-call CUDA-event time of ``per_burst`` back-to-back calls, median of ``rounds``.

    One warm-up call ``function(0)`` comes first, so ``rounds * per_burst + 1``
    calls are made in all.
    """
    stream = cupy.cuda.get_current_stream()
    start, end = cupy.cuda.Event(), cupy.cuda.Event()
    function(0)
    stream.synchronize()
    per_call = []
    for _ in range(rounds):
        result = None
        start.record(stream)
        for k in range(per_burst):
            result = function(k)
        end.record(stream)
        end.synchronize()
        del result
        per_call.append(cupy.cuda.get_elapsed_time(start, end) * 1e-3 / per_burst)
    return statistics.median(per_call)


def free_device_memory(cupy: Any) -> None:
    """Give CuPy's cached device and pinned blocks back, between cases."""
    cupy.get_default_memory_pool().free_all_blocks()
    cupy.get_default_pinned_memory_pool().free_all_blocks()


def measure_copy_bandwidth(cupy: Any, nbytes: int, per_burst: int, rounds: int) -> dict[str, float]:
    """Seconds per operation on ``nbytes``: a D2D memcpy, a copy kernel and a fill kernel.

    Keys ``memcpy`` (``cudaMemcpyAsync``, what ``cupy.copyto`` of contiguous
    arrays of one dtype does), ``copy`` and ``fill``: the two kernels are one
    thread per element, so the fill only writes. ``nbytes`` is rounded down
    to whole 8-byte words.

    Raises
    ------
    ValueError
        If ``nbytes`` is less than one 8-byte word.
    RuntimeError
        If the kernels did not write what they should (a measurement of
        nothing).
    """
    words = nbytes // 8
    if words < 1:
        raise ValueError(f"nbytes must be at least 8, got {nbytes}")
    nbytes = words * 8
    src = cupy.ones(words, dtype=cupy.uint64)
    dst = cupy.zeros(words, dtype=cupy.uint64)
    copy_kernel = cupy.ElementwiseKernel("T x", "T y", "y = x", "gpu_patching_bench_copy")
    fill_kernel = cupy.ElementwiseKernel("T v", "T y", "y = v", "gpu_patching_bench_fill")
    stream = cupy.cuda.get_current_stream()
    operations = {
        "memcpy": lambda _k: dst.data.copy_from_device_async(src.data, nbytes, stream),
        "copy": lambda _k: copy_kernel(src, dst),
        "fill": lambda k: fill_kernel(np.uint64(k + 2), dst),
    }
    seconds = {name: time_burst(cupy, op, per_burst, rounds) for name, op in operations.items()}
    # The last fill wrote per_burst + 1 everywhere: check the kernels really ran.
    if not bool((dst == per_burst + 1).all()):
        raise RuntimeError("the bandwidth measurement did not write what it should")
    return seconds  # the caller frees the buffers' memory


# -- the machine -------------------------------------------------------------------------


def machine_line() -> str:
    """'CPU: <model> (<n> logical cores); Python x.y.z; NumPy a.b.c'."""
    return f"CPU: {cpu_model()}; Python {platform.python_version()}; NumPy {np.__version__}"


def load_line() -> str:
    """'load average 1.2 / 0.8 / 0.5 on 2 cores' (the machine is shared), or that it is unknown."""
    try:
        one, five, fifteen = os.getloadavg()
    except OSError:  # a system without load averages
        return "load average unknown"
    return f"load average {one:.1f} / {five:.1f} / {fifteen:.1f} on {os.cpu_count()} cores"


def load_1min() -> str:
    """The one-minute load average with one decimal ('2.3'), or 'n/a'."""
    try:
        return f"{os.getloadavg()[0]:.1f}"
    except OSError:  # a system without load averages
        return "n/a"


def reference_or_reason(wanted: bool) -> tuple[Callable[..., Any] | None, str]:
    """CAREamics 0.3.5's ``StratifiedPatching`` (the reference), or None and why not.

    ``wanted`` is False for ``--no-reference``; otherwise the reason is the
    import error when CAREamics is not installed.
    """
    if not wanted:
        return None, "--no-reference"
    from gpu_patching.testing import load_reference

    try:
        return load_reference(), ""
    except ImportError as error:
        return None, str(error)


def device_info(cupy: Any) -> dict[str, Any]:
    """The current CUDA device: id, name, SMs, memory, theoretical DRAM peak, versions.

    Keys: ``id``, ``name``, ``sms``, ``memory`` (bytes), ``peak`` (bytes/s or
    None where the runtime no longer reports the memory clock), ``runtime``,
    ``driver``, ``cupy``.
    """
    device_id = int(cupy.cuda.Device().id)
    props = cupy.cuda.runtime.getDeviceProperties(device_id)
    name = props["name"]
    name = name.decode() if isinstance(name, bytes) else str(name)
    # memoryClockRate (kHz) is gone from CUDA 13's cudaDeviceProp: optional.
    clock_khz = props.get("memoryClockRate", 0)
    bus_bits = props.get("memoryBusWidth", 0)
    peak = 2 * clock_khz * 1e3 * bus_bits / 8 if clock_khz and bus_bits else None
    try:
        driver = cuda_version(cupy.cuda.runtime.driverGetVersion())
    except Exception:  # a driver query must not stop a benchmark
        driver = "unknown"
    return {
        "id": device_id,
        "name": name,
        "sms": props.get("multiProcessorCount"),
        "memory": int(props.get("totalGlobalMem", 0)),
        "peak": peak,
        "runtime": cuda_version(cupy.cuda.runtime.runtimeGetVersion()),
        "driver": driver,
        "cupy": cupy.__version__,
    }


def device_lines(info: dict[str, Any]) -> list[str]:
    """The header lines of a GPU report: the card, the versions, the host CPU."""
    peak = f"; theoretical DRAM peak {fmt_bandwidth(info['peak'])}" if info["peak"] else ""
    return [
        f"GPU: {info['name']} (device {info['id']}, {info['sms']} SMs, "
        f"{fmt_bytes(info['memory'])}{peak})",
        "",
        f"CUDA runtime {info['runtime']}, driver {info['driver']}; CuPy {info['cupy']}; "
        f"NumPy {np.__version__}; Python {platform.python_version()}",
        "",
        f"CPU: {cpu_model()}",
    ]


# -- the report --------------------------------------------------------------------------


class Report:
    """Lines of a markdown report, printed as they come and written at the end.

    Parameters
    ----------
    echo : bool
        Print each line as it is added (the default), so a long run shows its
        tables row by row.
    """

    def __init__(self, echo: bool = True) -> None:
        self.lines: list[str] = []
        self.echo = echo

    def emit(self, *lines: str) -> None:
        """Add lines (and print them)."""
        self.lines.extend(lines)
        if self.echo and lines:
            print("\n".join(lines), flush=True)

    def text(self, extra: Sequence[str] = ()) -> str:
        """The report so far (and ``extra`` lines after it), ending in a newline."""
        return "\n".join([*self.lines, *extra]) + "\n"

    def write(self, path: Path | None, extra: Sequence[str] = (), keep: bool = False) -> str:
        """Write :meth:`text` to ``path`` (nothing when ``None``) and return it.

        With ``keep``, the old file's sections that this report lacks stay
        (:func:`merge_sections`).
        """
        text = self.text(extra)
        write_markdown(path, text, keep)
        return text


def write_markdown(path: Path | None, text: str, keep: bool = False) -> None:
    """Write a finished report to ``path``, creating its folder; nothing when ``None``.

    Atomically (``gpu_patching._atomic``): a run stopped by Ctrl-C or SIGTERM
    leaves the previous report, never half of one or a temporary file. With
    ``keep``, the sections of the old file that this run did not redo stay
    (:func:`merge_sections`).
    """
    if path is None:
        return
    if keep and path.is_file():
        text = merge_sections(path.read_text(), text)
    write_atomically(path, lambda stream: stream.write(text.encode()))


#: What a section of a partial run says instead of figures ("Not run (--gpu-only).").
_NOT_RUN = re.compile(r"\s*not run\b", re.IGNORECASE)
#: The line a kept section gets, once.
KEPT_NOTE = "_Not rerun in the latest run: these figures are from the run before it._"


def _sections(text: str) -> tuple[str, list[tuple[str, str]]]:
    """Split a report into the text before its first ``## `` heading and its sections."""
    # A zero-width split before each heading: parts[0] is the preamble ("" when
    # the text starts with a heading), every other part one whole section.
    parts = re.split(r"(?m)^(?=## )", text)
    sections = []
    for part in parts[1:]:
        heading, _, body = part.partition("\n")
        sections.append((heading, body))
    return parts[0], sections


def _section_key(heading: str) -> str:
    # "## CPU: AMD EPYC ..." and "## CPU: Intel ..." are the same section.
    return heading.partition(":")[0].strip()


def merge_sections(old: str, new: str) -> str:
    """Return ``new`` with the ``## `` sections of ``old`` that ``new`` did not redo.

    A section of ``new`` replaces the ``old`` one with the same heading (up to
    its first ``:``), unless all it says is that it was not run; an ``old``
    section that ``new`` lacks, or did not run, stays where it was, marked
    with :data:`KEPT_NOTE`. ``new``'s own text before its first section (the
    machine, the date) comes first; sections only ``new`` has come last.
    """
    _, old_sections = _sections(old)
    preamble, new_sections = _sections(new)
    rerun = {
        _section_key(heading): (heading, body)
        for heading, body in new_sections
        if not _NOT_RUN.match(body)
    }
    merged, used = [], set()
    for heading, body in old_sections:
        key = _section_key(heading)
        if key in rerun:
            merged.append(rerun[key])
            used.add(key)
        else:
            if KEPT_NOTE not in body:
                body = f"\n{KEPT_NOTE}\n{body}"
            merged.append((heading, body))
            used.add(key)
    merged += [(h, b) for h, b in new_sections if _section_key(h) not in used]
    return preamble + "".join(f"{heading}\n{body}" for heading, body in merged)


def add_output_arguments(parser: argparse.ArgumentParser, default: Path) -> None:
    """Add ``--output FILE`` and ``--write-results`` (into ``default``) to a script's parser.

    Without either, the script prints its report and writes no file: the
    committed results change only when someone asks for it.
    """
    parser.add_argument("--output", type=Path, default=None, help="write the markdown here")
    parser.add_argument(
        "--write-results",
        action="store_true",
        help=f"write the markdown into benchmarks/results/{default.name}, keeping the "
        "sections this run did not redo",
    )


def script_parser(
    description: str, results: Path, quick: str, *, reference: bool = False, gpu: bool = False
) -> argparse.ArgumentParser:
    """A script's parser with the flags every script shares; the script adds its own.

    Parameters
    ----------
    description : str
        The script's module docstring: its first line is the ``--help`` title.
    results : Path
        The committed file that ``--write-results`` writes (``add_output_arguments``).
    quick : str
        What ``--quick`` makes smaller, for ``--help``.
    reference : bool
        Add ``--no-reference`` (for scripts that run CAREamics' sampler beside ours).
    gpu : bool
        Add ``--gpu-only`` (for scripts with a CPU and a GPU part, so that a GPU
        session short of time runs the GPU part alone).

    Raises
    ------
    ValueError
        If ``description`` has no first line to serve as the title.
    """
    title = description.strip().splitlines()[0] if description.strip() else ""
    if not title:
        raise ValueError(f"description {description!r} has no title line")
    parser = argparse.ArgumentParser(description=title)
    parser.add_argument("--quick", action="store_true", help=quick)
    if reference:
        parser.add_argument("--no-reference", action="store_true", help="skip CAREamics")
    if gpu:
        parser.add_argument(
            "--gpu-only",
            action="store_true",
            help="skip the CPU part: for a GPU session short of time",
        )
    add_output_arguments(parser, results)
    return parser


def finish(
    report: Report, args: argparse.Namespace, results: Path, extra: Sequence[str] = ()
) -> str:
    """Write the report where ``--output``/``--write-results`` say (nowhere by default).

    Prints where it went, and returns the report's text (with ``extra``).
    """
    output, keep = destination(args, results)
    text = report.write(output, extra, keep=keep)
    if output is not None:
        print(f"\nwritten to {output}")
    return text


def destination(args: argparse.Namespace, default: Path) -> tuple[Path | None, bool]:
    """Where the report goes: ``(path or None, keep the old file's other sections)``."""
    if args.output is not None:
        return args.output, False
    if getattr(args, "write_results", False):
        return default, True
    return None, False
