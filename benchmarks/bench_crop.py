"""Crop benchmark: extract_patches against CuPy fancy indexing and a per-patch slicing loop.

Cases (issue 5): 64x64 and 32x64x64 float32 patches, batches of 256 and 4096
rows, one stack per case (2D: 8 samples of 1024x1024; 3D: 4 samples of
128x256x256), random corners (fixed seed). Throughput is reported as patches/s
and as GB/s of bytes read + written: each patch element is read once from its
stack and written once to the output, so ``2 * output bytes / time``.

* **CPU** (always): ``extract_patches`` on NumPy stacks against a per-patch
  slicing loop (``out[k] = stack[s, :, y:y+py, x:x+px]``), each with a fresh
  output and with a reused one, and a pass of ``PatchLoader`` (in memory)
  against that loop into a reused buffer over the same pre-drawn rows: the
  acceptance table lists each as the loop's time over its own (>= x1.00
  means at least as fast). Median wall time of several calls.
* **GPU** (when a usable CUDA device exists): on CuPy stacks, ``extract_patches``
  (the crop kernel alone, launched back to back with prepared arguments; and
  the whole call with host rows, and with device rows, which adds the row-check
  kernel and its one scalar copy back) against CuPy fancy indexing (broadcast
  index arrays built on the device from the corners, then one gather) and a
  per-patch slicing loop (one copy kernel per patch). CUDA-event times; bursts
  of back-to-back calls, median of several bursts. Beside them, the card's
  device-to-device copy bandwidth measured here (``cudaMemcpyAsync`` of 1 GiB,
  read + write); the target is the crop kernel at >= 70% of it at batch 4096.

Run ``python benchmarks/bench_crop.py`` (``--quick`` for fewer repeats). The
tables are printed; ``--write-results`` writes the CPU markdown into
``benchmarks/results/crop-cpu.md`` and the GPU markdown into
``benchmarks/results/crop-gpu-<card>.md`` (``--output FILE``: the CPU markdown
into FILE, the GPU markdown beside it); without a GPU the GPU part is
skipped and the script says so. ``--gpu-only`` skips the CPU part (a GPU
session's device time is short). Every method's output is checked against the
others, the prepared launch's too (into an output filled with NaN first).
"""

from __future__ import annotations

import mmap
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from _report import (
    RESULTS_DIR,
    destination,
    device_info,
    device_lines,
    fmt_bandwidth,
    fmt_bytes,
    fmt_percent,
    fmt_rate,
    fmt_ratio,
    fmt_time,
    free_device_memory,
    in_turns,
    machine_line,
    markdown_table,
    measure_copy_bandwidth,
    script_parser,
    slug,
    time_burst,
    usable_cupy,
    write_markdown,
)

from gpu_patching import PatchBatch, PatchLoader, StratifiedPatching, extract_patches
from gpu_patching import crop as crop_module
from gpu_patching._row_threads import copy_threads
from gpu_patching.kernels.crop_patches import crop_kernel

TARGET_COPY_FRACTION = 0.70  # of the D2D copy bandwidth, at batch 4096
TARGET_BATCH = 4096
BATCHES = (256, 4096)
BANDWIDTH_BYTES = 1 << 30


@dataclass(frozen=True)
class Case:
    """One stack and one patch size; the batches run over it."""

    label: str
    stack_shape: tuple[int, ...]
    patch_size: tuple[int, ...]


CASES = (
    Case("64x64 float32", (8, 1, 1024, 1024), (64, 64)),
    Case("32x64x64 float32", (4, 1, 128, 256, 256), (32, 64, 64)),
)


def make_stack(case: Case) -> np.ndarray:
    return np.random.default_rng(0).random(case.stack_shape, dtype=np.float32)


def make_batch(case: Case, n_rows: int, seed: int = 1) -> PatchBatch:
    """Random valid rows over the case's stack (NumPy arrays)."""
    generator = np.random.default_rng(seed)
    spatial = case.stack_shape[2:]
    coords = np.stack(
        [
            generator.integers(0, d - p + 1, size=n_rows)
            for d, p in zip(spatial, case.patch_size, strict=True)
        ],
        axis=1,
    )
    return PatchBatch(
        data_idx=np.zeros(n_rows, dtype=np.int64),
        sample_idx=generator.integers(0, case.stack_shape[0], size=n_rows),
        coords=coords.astype(np.int64),
        indices=np.arange(n_rows, dtype=np.int64),
        patch_size=case.patch_size,
    )


def output_bytes(case: Case, n_rows: int) -> int:
    return n_rows * case.stack_shape[1] * int(np.prod(case.patch_size)) * 4


def moved_bytes(case: Case, n_rows: int) -> int:
    """Bytes read + written by one batch: every output element is read once and written once."""
    return 2 * output_bytes(case, n_rows)


# -- the methods compared ------------------------------------------------------------------


def slicing_loop(stack: Any, batch: PatchBatch, xp: Any, out: Any = None) -> Any:
    """The per-patch loop: one slice assignment per patch (host corners)."""
    n_rows = len(batch)
    if out is None:
        out = xp.empty((n_rows, stack.shape[1], *batch.patch_size), dtype=stack.dtype)
    samples = batch.sample_idx.tolist()
    corners = batch.coords.tolist()
    for k in range(n_rows):
        window = tuple(slice(c, c + p) for c, p in zip(corners[k], batch.patch_size, strict=True))
        out[k] = stack[(samples[k], slice(None), *window)]
    return out


def fancy_indexing(
    stack: Any, sample_idx: Any, coords: Any, patch_size: tuple[int, ...], xp: Any
) -> Any:
    """One gather with broadcast index arrays of shape (N, C, *patch) built from the corners."""
    rank = coords.shape[1] + 2

    def along(axis: int, values: Any) -> Any:
        shape = [1] * rank
        shape[axis] = -1
        return values.reshape(shape)

    index = [along(0, sample_idx), along(1, xp.arange(stack.shape[1]))]
    for axis, size in enumerate(patch_size):
        index.append(along(0, coords[:, axis]) + along(2 + axis, xp.arange(size)))
    return stack[tuple(index)]


# -- CPU ------------------------------------------------------------------------------------


#: The method that only allocates a new output and writes one value per page.
FIRST_TOUCH = "a new output's page faults alone"


def touch_new_output(shape: tuple[int, ...], dtype: np.dtype[Any]) -> np.ndarray:
    """Allocate an output as the methods that allocate do, and fault in every page.

    What a method that returns a new array pays on top of the copy: the
    operating system maps and zeroes every page at its first write, and
    sometimes compacts memory first to back it with huge pages.
    """
    array = np.empty(shape, dtype=dtype)
    array.reshape(-1)[:: max(1, mmap.PAGESIZE // array.itemsize)] = 0
    return array


def measure_cpu(case: Case, stack: np.ndarray, n_rows: int, quick: bool) -> dict[str, Any]:
    """One case and batch on the host."""
    batch = make_batch(case, n_rows)
    same = bool(np.array_equal(extract_patches([stack], batch), slicing_loop(stack, batch, np)))
    # In turns, so that the methods compared see the same load on a shared machine.
    repeats = 1 if quick else 3 if output_bytes(case, n_rows) > 1 << 30 else 7
    out = np.empty((n_rows, stack.shape[1], *case.patch_size), dtype=stack.dtype)
    methods: dict[str, Callable[[int], Any]] = {
        "extract_patches (NumPy)": lambda _k: extract_patches([stack], batch),
        "extract_patches (NumPy), out= reused": lambda _k: extract_patches([stack], batch, out=out),
        "per-patch slicing loop": lambda _k: slicing_loop(stack, batch, np),
        "per-patch slicing loop, out reused": lambda _k: slicing_loop(stack, batch, np, out),
        FIRST_TOUCH: lambda _k: touch_new_output(out.shape, out.dtype),
    }
    for method in methods.values():
        method(0)  # warm-up: the pages of out, the caches
    # Rotated: freeing a large output leaves work (pages to zero or compact)
    # to whichever call allocates next; rotating spreads it over the methods.
    turns = in_turns(methods, repeats, rotate=True)
    timings = {name: statistics.median(times) for name, times in turns.items()}
    loader_times, loader_same = measure_loader(case, stack, n_rows, repeats)
    return {
        "case": case,
        "n_rows": n_rows,
        "times": timings,
        "loader": loader_times,
        "same": same and loader_same,
    }


#: Batches in one PatchLoader pass: the first two allocate the two buffers that
#: then take turns (a plain loop holds one batch while the next is cut).
LOADER_BATCHES = 4
#: Batches of each pass left out of the loader's timing: they allocate.
LOADER_WARMUP_BATCHES = 2


def measure_loader(
    case: Case, stack: np.ndarray, n_rows: int, repeats: int
) -> tuple[dict[str, float], bool]:
    """Median time per batch of a PatchLoader pass and of the slicing loop on its rows.

    The sampler gets the stack several times over (the same array), so that an
    epoch holds :data:`LOADER_BATCHES` batches of ``n_rows``. Each batch of a
    pass after the first :data:`LOADER_WARMUP_BATCHES` is timed on its own
    (``next`` of the loader), and in turn (before or after it, alternately)
    the loop slices that batch's rows, drawn already, into one reused buffer.
    """
    per_stack = StratifiedPatching([stack.shape], case.patch_size, seed=0).n_patches
    copies = max(1, -(-LOADER_BATCHES * n_rows // per_stack))
    strategy = StratifiedPatching([stack.shape] * copies, case.patch_size, seed=0)
    loader = PatchLoader([stack] * copies, strategy, n_rows, shuffle=True)
    buffer = np.empty((n_rows, stack.shape[1], *case.patch_size), dtype=stack.dtype)
    slicing_loop(stack, strategy.sample_epoch(0)[:n_rows].to_numpy(), np, buffer)  # pages, once
    loop_times: list[float] = []
    loader_times: list[float] = []
    same = True
    # The loader's rows, drawn already: the loop can slice a batch before the
    # loader cuts it. The two take turns at going first, so that neither
    # always finds the batch's pixels in cache.
    epoch = strategy.sample_epoch(0, shuffle=True).to_numpy()
    for _ in range(max(1, repeats)):
        batches = iter(loader)
        for k in range(LOADER_BATCHES):
            rows = epoch[k * n_rows : (k + 1) * n_rows]
            loop_first = k % 2 == 1
            if loop_first and k >= LOADER_WARMUP_BATCHES:
                start = time.perf_counter()
                slicing_loop(stack, rows, np, buffer)
                loop_times.append(time.perf_counter() - start)
            start = time.perf_counter()
            patches, batch = next(batches)
            if k < LOADER_WARMUP_BATCHES:
                continue
            loader_times.append(time.perf_counter() - start)
            if not loop_first:
                start = time.perf_counter()
                slicing_loop(stack, rows, np, buffer)
                loop_times.append(time.perf_counter() - start)
            same = same and bool(np.array_equal(batch.coords, rows.coords))
            same = same and bool(np.array_equal(patches, buffer))
        del patches, batches
    times = {
        "slicing loop, out reused": statistics.median(loop_times),
        "PatchLoader (in memory)": statistics.median(loader_times),
    }
    return times, same


def run_cpu(quick: bool) -> list[dict[str, Any]]:
    results = []
    for case in CASES:
        stack = make_stack(case)
        for n_rows in BATCHES:
            result = measure_cpu(case, stack, n_rows, quick)
            results.append(result)
            print(f"cpu {case.label} batch {n_rows}: {timing_text(result)}", flush=True)
    return results


def timing_text(result: dict[str, Any]) -> str:
    return ", ".join(f"{name} {fmt_time(t)}" for name, t in result["times"].items())


def result_rows(
    results: list[dict[str, Any]],
    baseline: str,
    extra: Callable[[dict[str, Any], str, float], list[str]] | None = None,
) -> list[list[str]]:
    rows = []
    for result in results:
        case, n_rows = result["case"], result["n_rows"]
        reference = result["times"][baseline]
        for method, seconds in result["times"].items():
            if method == FIRST_TOUCH:
                continue  # it crops nothing: the table below sets it beside the methods
            row = [
                case.label,
                f"{n_rows:,}",
                method,
                fmt_time(seconds),
                fmt_rate(n_rows / seconds),
                f"{moved_bytes(case, n_rows) / seconds / 1e9:,.2f}",
                fmt_ratio(reference, seconds, decimals=1),
            ]
            if extra is not None:
                row += extra(result, method, seconds)
            rows.append(row)
    return rows


def cpu_markdown(results: list[dict[str, Any]], gpu_note: str) -> str:
    lines = [
        "# Crop benchmark (CPU): extract_patches on NumPy stacks vs a per-patch slicing loop",
        "",
        machine_line(),
        "",
        "One float32 stack per case (2D: 8 x 1024x1024; 3D: 4 x 128x256x256), random corners. "
        "GB/s counts bytes read + written (2 x the output's bytes). Times are medians of "
        "7 turns (3 where the output exceeds 1 GiB), each turn calling every method once, "
        "one method later than the turn before; "
        "each call allocates its output unless it says 'reused' (a fresh output costs its "
        "page faults). 'speed-up' is against the per-patch loop that allocates. "
        "extract_patches copies each patch straight into its row of the output (or of out=), "
        "batches of rows of 64 KiB or more (8 MiB or more in all: the 32x64x64 cases here) "
        f"in runs of rows on {copy_threads(None, 1 << 20, 1 << 20)} thread(s), one per "
        "usable core up to 4 (gpu_patching/_row_threads.py); PatchLoader likewise; the "
        "loops run on one thread.",
        "",
        *markdown_table(
            ["patch", "batch", "method", "time per batch", "patches/s", "GB/s", "speed-up"],
            result_rows(results, "per-patch slicing loop"),
            "lrlrrrr",
        ),
        "",
        "Both methods give identical arrays in every case: "
        + ("yes" if all(r["same"] for r in results) else "NO"),
        "",
        "## Against a plain loop that slices the same corners into a reused buffer",
        "",
        "Each ratio is the loop's time over the method's, measured side by side in this "
        "run (>= x1.00: at least as fast). `extract_patches` runs on the corners above; "
        "with a new output it is set beside the loop that also allocates one (like for "
        "like), and the last column before the loader's is what allocating alone costs "
        "(a new array of the output's size, one value written per page): the operating "
        "system's price for fresh memory, which a reused buffer (out=, or PatchLoader's "
        "two) never pays, and which varies from run to run with how much memory it must "
        "compact to give huge pages. The methods take turns, each turn starting one "
        "method later. "
        f"`PatchLoader` (batches of one shuffled epoch, {LOADER_BATCHES} per pass) is timed "
        f"per batch after the first {LOADER_WARMUP_BATCHES} of each pass, which allocate "
        "the two buffers that then take turns; in turn with each (before or after it, "
        "alternately), the loop slices that batch's rows. Medians.",
        "",
        *markdown_table(
            [
                "patch",
                "batch",
                "loop, out reused",
                "extract_patches, out= reused",
                "ratio",
                "loop, new output",
                "extract_patches, new output",
                "ratio",
                "allocating alone",
                "loop, out reused (loader's rows)",
                "PatchLoader (in memory)",
                "ratio",
            ],
            loop_rows(results),
            "lrrrrrrrrrrr",
        ),
        "",
        f"GPU part: {gpu_note}",
    ]
    return "\n".join(lines) + "\n"


def loop_rows(results: list[dict[str, Any]]) -> list[list[str]]:
    """One row per case and batch: the reused-buffer loop beside each host path."""
    rows = []
    for result in results:
        times, loader = result["times"], result["loader"]
        loop = times["per-patch slicing loop, out reused"]
        reused = times["extract_patches (NumPy), out= reused"]
        fresh = times["extract_patches (NumPy)"]
        fresh_loop = times["per-patch slicing loop"]
        loader_loop = loader["slicing loop, out reused"]
        ours = loader["PatchLoader (in memory)"]
        rows.append(
            [
                result["case"].label,
                f"{result['n_rows']:,}",
                fmt_time(loop),
                fmt_time(reused),
                fmt_ratio(loop, reused, decimals=2),
                fmt_time(fresh_loop),
                fmt_time(fresh),
                fmt_ratio(fresh_loop, fresh, decimals=2),
                fmt_time(times[FIRST_TOUCH]),
                fmt_time(loader_loop),
                fmt_time(ours),
                fmt_ratio(loader_loop, ours, decimals=2),
            ]
        )
    return rows


# -- GPU ------------------------------------------------------------------------------------


def run_gpu(cupy: Any, quick: bool) -> tuple[list[dict[str, Any]], float]:
    """Every case and batch on the device; returns the results and the D2D copy bandwidth."""
    rounds = 3 if quick else 5
    seconds = measure_copy_bandwidth(cupy, BANDWIDTH_BYTES, 5 if quick else 20, rounds)
    copy_bandwidth = 2 * BANDWIDTH_BYTES / seconds["memcpy"]  # read + write
    free_device_memory(cupy)
    print(f"D2D copy bandwidth (read + write): {fmt_bandwidth(copy_bandwidth)}", flush=True)
    results = []
    for case in CASES:
        stack = cupy.asarray(make_stack(case))
        for n_rows in BATCHES:
            result = measure_gpu(cupy, case, stack, n_rows, rounds)
            results.append(result)
            print(f"gpu {case.label} batch {n_rows}: {timing_text(result)}", flush=True)
            free_device_memory(cupy)
        del stack
        free_device_memory(cupy)
    return results, copy_bandwidth


def measure_gpu(cupy: Any, case: Case, stack: Any, n_rows: int, rounds: int) -> dict[str, Any]:
    """One case and batch on the device: every method, and whether they agree."""
    batch = make_batch(case, n_rows)
    columns = ("data_idx", "sample_idx", "coords", "indices")
    device_batch = PatchBatch(
        *(cupy.asarray(getattr(batch, name)) for name in columns), patch_size=batch.patch_size
    )
    sample_idx, coords = device_batch.sample_idx, device_batch.coords
    out = cupy.empty((n_rows, 1, *case.patch_size), dtype=cupy.float32)
    kernel, grid, block, args = prepared_kernel(cupy, stack, batch, out)
    per_burst = 20 if output_bytes(case, n_rows) < 1 << 28 else 3
    methods: dict[str, tuple[Callable[[int], Any], int, int]] = {
        "crop kernel (ours, prepared launch)": (
            lambda _k: kernel(grid, block, args),
            per_burst,
            rounds,
        ),
        "extract_patches, host rows (ours)": (
            lambda _k: extract_patches([stack], batch, out=out),
            per_burst,
            rounds,
        ),
        "extract_patches, device rows (ours)": (
            lambda _k: extract_patches([stack], device_batch, out=out),
            per_burst,
            rounds,
        ),
        "CuPy fancy indexing": (
            lambda _k: fancy_indexing(stack, sample_idx, coords, case.patch_size, cupy),
            max(1, per_burst // 2),
            rounds,
        ),
        # One copy kernel per patch: a single call per round is plenty.
        "per-patch slicing loop (CuPy)": (
            lambda _k: slicing_loop(stack, batch, cupy),
            1,
            1 if n_rows > 1000 else rounds,
        ),
    }
    timings = {
        name: time_burst(cupy, function, burst, repeats)
        for name, (function, burst, repeats) in methods.items()
    }
    ours = extract_patches([stack], device_batch)
    same = bool(
        cupy.array_equal(ours, fancy_indexing(stack, sample_idx, coords, case.patch_size, cupy))
    )
    same = same and bool(cupy.array_equal(ours, slicing_loop(stack, batch, cupy)))
    # The prepared launch timed above writes the same patches: NaN first, so an
    # element it leaves unwritten fails the comparison.
    out.fill(np.nan)
    kernel(grid, block, args)
    same = same and bool(cupy.array_equal(out, ours))
    return {"case": case, "n_rows": n_rows, "times": timings, "same": same}


def prepared_kernel(
    cupy: Any, stack: Any, batch: PatchBatch, out: Any
) -> tuple[Any, Any, Any, Any]:
    """The crop kernel and its arguments for one batch, prepared once (as extract_patches does)."""
    itemsize = stack.dtype.itemsize
    table = cupy.asarray(
        crop_module.stack_table(
            [stack.data.ptr], [stack.shape], [tuple(s // itemsize for s in stack.strides)]
        )
    )
    rows = (
        cupy.asarray(batch.data_idx, dtype=cupy.int64),
        cupy.asarray(batch.sample_idx, dtype=cupy.int64),
        cupy.asarray(batch.coords, dtype=cupy.int64).reshape(-1),
    )
    n_rows, n_channels = len(batch), stack.shape[1]
    args = crop_module.crop_launch_args(table, rows, n_rows, n_channels, batch.patch_size, out)
    launch = crop_module.crop_launch(n_rows, n_channels, batch.patch_size)
    cropper = crop_module.device_crop()
    kernel = cropper._functions(crop_kernel(itemsize), int(cupy.cuda.Device().id))
    return kernel, launch.grid, launch.block, args


def gpu_markdown(
    cupy: Any, results: list[dict[str, Any]], copy_bandwidth: float, cpu: list[dict[str, Any]]
) -> str:
    kernel_label = "crop kernel (ours, prepared launch)"

    def fraction(result: dict[str, Any], method: str, seconds: float) -> list[str]:
        rate = moved_bytes(result["case"], result["n_rows"]) / seconds
        return [fmt_percent(rate / copy_bandwidth)]

    verdicts = []
    for result in results:
        if result["n_rows"] != TARGET_BATCH:
            continue
        rate = moved_bytes(result["case"], result["n_rows"]) / result["times"][kernel_label]
        met = rate / copy_bandwidth >= TARGET_COPY_FRACTION
        verdicts.append(
            f"- {result['case'].label}, batch {TARGET_BATCH}: crop kernel at "
            f"{fmt_percent(rate / copy_bandwidth)} of the D2D copy bandwidth: "
            + ("met" if met else "NOT met")
        )
    info = device_info(cupy)
    lines = [
        "# Crop benchmark (GPU): extract_patches vs CuPy fancy indexing and a per-patch loop",
        "",
        *device_lines(info),
        "",
        f"D2D copy bandwidth measured here (cudaMemcpyAsync of {fmt_bytes(BANDWIDTH_BYTES)}, "
        f"read + write = 2 x bytes / time): **{fmt_bandwidth(copy_bandwidth)}**.",
        "",
        "One float32 stack per case (2D: 8 x 1024x1024; 3D: 4 x 128x256x256), random corners. "
        "GB/s counts bytes read + written (2 x the output's bytes); '% of copy' is that over "
        "the D2D copy bandwidth. CUDA-event times per call of back-to-back bursts (medians); "
        "the per-patch loop is timed over single calls. 'speed-up' is against CuPy fancy "
        "indexing. 'extract_patches, device rows' includes the row-check kernel and its "
        "8-byte copy back, which waits for the stream.",
        "",
        *markdown_table(
            [
                "patch",
                "batch",
                "method",
                "time per batch",
                "patches/s",
                "GB/s",
                "speed-up",
                "% of copy",
            ],
            result_rows(results, "CuPy fancy indexing", fraction),
            "lrlrrrrr",
        ),
        "",
        "All methods give identical arrays in every case: "
        + ("yes" if all(r["same"] for r in results) else "NO"),
        "",
        f"## Target: crop kernel >= {TARGET_COPY_FRACTION:.0%} of the D2D copy bandwidth "
        f"at batch {TARGET_BATCH}",
        "",
        *verdicts,
        "",
        "## The same cases on this machine's CPU (NumPy stacks)",
        "",
    ]
    if cpu:
        lines += markdown_table(
            ["patch", "batch", "method", "time per batch", "patches/s", "GB/s", "speed-up"],
            result_rows(cpu, "per-patch slicing loop"),
            "lrlrrrr",
        )
    else:
        lines.append("Not run (--gpu-only).")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    # --output names the CPU markdown; the GPU markdown goes beside it as crop-gpu-<card>.md.
    parser = script_parser(__doc__, RESULTS_DIR / "crop-cpu.md", "fewer repeats", gpu=True)
    args = parser.parse_args(argv)
    output, keep = destination(args, RESULTS_DIR / "crop-cpu.md")

    cupy, why = usable_cupy()
    cpu = []
    if not args.gpu_only:
        cpu = run_cpu(args.quick)
        gpu_note = f"skipped: {why}" if cupy is None else "see crop-gpu-<card>.md"
        cpu_text = cpu_markdown(cpu, gpu_note)
        write_markdown(output, cpu_text, keep)
        print(cpu_text)
        if output is not None:
            print(f"written to {output}")
    if cupy is None:
        print(f"GPU part skipped: {why}")
        return 0
    gpu, copy_bandwidth = run_gpu(cupy, args.quick)
    gpu_text = gpu_markdown(cupy, gpu, copy_bandwidth, cpu)
    print(gpu_text)
    if output is not None:
        gpu_output = output.parent / f"crop-gpu-{slug(device_info(cupy)['name'])}.md"
        write_markdown(gpu_output, gpu_text, keep)
        print(f"written to {gpu_output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
