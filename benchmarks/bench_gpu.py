"""GPU benchmark: the CUDA backend's epoch throughput, latency and update cost.

Everything is measured in this one process, on one card, side by side with the
NumPy backend on the same host and the same shapes:

* ``bandwidth``: the card's device-to-device copy bandwidth, measured here with
  CuPy on a large buffer (a ``cudaMemcpyAsync``, which is what ``cupy.copyto``
  does, and a copy kernel), and the bandwidth of a write-only fill kernel. The
  **copy roofline** is the issue's definition: the write-only equivalent of
  the faster copy, ``bytes / time`` (the read+write bandwidth
  ``2 * bytes / time`` is printed beside it). The stricter **fill roofline** is
  ``bytes / time`` of the fill kernel, which only writes, as ours does.
* ``epoch throughput`` at ~1e5, 1e6, 1e7 and 1e8 patches over ~1k, ~66k and
  ~1M regions (the patch count is set with a uniform dense probability per
  region, ``set_region_probs``; combinations that would need a probability
  above ``gpu_patching.grid.MAX_PROBABILITY`` are listed as not possible). The
  kernel writes ``(3 + d) * 8`` bytes per patch (int64 ``data_idx``,
  ``sample_idx``, global index and ``d`` coordinates); the fraction of a
  roofline is those bytes divided by the time per epoch, over the roofline.
  The time per epoch for throughput is that of back-to-back epochs (CUDA events
  around a burst, divided by its length); the isolated time is one epoch from
  the host call to the result being ready.
* ``end-to-end`` time per epoch at ~1e5 patches: CUDA events around one
  ``sample_epoch`` call (then an event synchronize), and ``perf_counter``
  around the call plus a stream synchronize; medians over many repeats, and the
  kernel launches per epoch (``CudaBackend.launch_count``; and, in a child
  process, every kernel CUPTI sees through ``torch.profiler`` when PyTorch is
  installed: CuPy itself has no launch counter).
* ``shuffled and sharded epochs`` at ~1e6 and ~1e7 patches over ~1M regions
  (the throughput cases' construction): a plain epoch, a shuffled one and
  rank 1's share of a shuffled epoch sharded over 4 and over 8 ranks
  (``sample_epoch(epoch, shuffle=True, rank=1, world_size=w)``), timed in
  turns as back-to-back bursts. Each gets its cost per patch against the plain
  epoch's (as ``bench_cpu.py`` reports it for the NumPy backend), each shard
  also against a plain draw of as many rows (which separates shuffling and
  sharding from the fixed cost of a call), and its launches per call
  (``CudaBackend.launch_count``). For the smaller case every variant is
  checked, row for row, against the NumPy backend's.
* ``table updates`` at ~1M regions (synchronised): ``exclude_patches`` of 5%
  of the cells and ``set_region_probs`` with a dense array.

Targets printed beside the results: >= 50% of the write roofline at 1e8
patches, <= 30 us per epoch at 1e5 patches, updates <= 1 ms at 1M regions, one
launch per epoch, shuffling and sharding cost < 20% over the plain epoch (per
patch) and still one launch per call. Run it with
``python benchmarks/bench_gpu.py`` (``--quick`` for small sizes only); the
tables are printed, ``--write-results`` writes the markdown into
``benchmarks/results/gpu-<card>.md`` (``gpu-<card>-quick.md`` with ``--quick``)
and ``--output FILE`` into FILE; ``--time-budget``
(default 420 s) skips throughput cases, and shuffled and sharded ones, that
would overrun it. Where no usable CUDA device exists it says so in one line
and exits with status 0.

For ``ncu`` (``benchmarks/gpu_session.sh``): ``--profile-epochs N`` only
draws N epochs of the first end-to-end case between ``cudaProfilerStart`` and
``cudaProfilerStop`` (run it under ``ncu --profile-from-start off --csv``), and
``--count-ncu CSV --epochs N`` turns the CSV ncu wrote into launches per epoch.

Tables, timing and the report go through ``benchmarks/_report.py``; the run is
one function per section (``run`` calls them in turn), each of which the tests
also run on the NumPy backend.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from _report import (
    RESULTS_DIR,
    Report,
    destination,
    device_info,
    device_lines,
    fmt_bandwidth,
    fmt_bytes,
    fmt_overhead,
    fmt_percent,
    fmt_rate,
    fmt_ratio,
    fmt_time,
    fmt_verdict,
    free_device_memory,
    markdown_row,
    markdown_table,
    measure_copy_bandwidth,
    percentile,
    script_parser,
    slug,
    time_burst,
    time_calls,
    time_events,
    usable_cupy,
)

from gpu_patching import StratifiedPatching
from gpu_patching.grid import MAX_PROBABILITY, cell_count, grid_shape
from gpu_patching.kernels.sample_epoch import SAMPLE_EPOCH
from gpu_patching.permutation import EpochOrder

# The epoch kernel's entry point, as profilers name it.
KERNEL_NAME = SAMPLE_EPOCH.name

# -- targets (from the issue) -----------------------------------------------------------

TARGET_ROOFLINE_FRACTION = 0.5  # of the write roofline, at 1e8 patches
TARGET_EPOCH_SECONDS = 30e-6  # end-to-end per epoch, at 1e5 patches
TARGET_UPDATE_SECONDS = 1e-3  # exclude / set probabilities, at 1M regions
TARGET_LAUNCHES = 1  # kernel launches per epoch (shuffled and sharded ones too)
TARGET_ORDER_OVERHEAD = 0.2  # shuffling and sharding, per patch, over the plain epoch

# -- the cases ----------------------------------------------------------------------------

# (label, data_shapes, patch_size): 1,024, 65,536 and 1,048,576 regions.
REGION_SETS: list[tuple[str, tuple[tuple[int, ...], ...], tuple[int, ...]]] = [
    ("~1k", ((1, 1, 2048, 2048),), (64, 64)),
    ("~66k", ((1, 1, 8192, 8192),), (32, 32)),
    ("~1M", ((1, 1, 32768, 32768),), (32, 32)),
]
PATCH_TARGETS = (10**5, 10**6, 10**7, 10**8)
QUICK_REGION_SETS = REGION_SETS[:2]
QUICK_PATCH_TARGETS = (10**5, 10**6)
#: Patches of the end-to-end (latency) cases.
LATENCY_PATCHES = 10**5
#: The NumPy comparison is skipped above this many patches (1e8 takes ~15-20 s
#: and several GB of host memory there).
NUMPY_MAX_PATCHES = 10**7
#: Seconds of GPU time each throughput case aims at (bursts and isolated epochs).
EPOCH_BUDGET_S = 4.0
QUICK_EPOCH_BUDGET_S = 1.0
#: The run skips cases that would not finish within this many seconds (the
#: machine it is meant for stops a command after 10 minutes).
TIME_BUDGET_S = 420.0
#: Seconds kept back for the updates and the report, and for the launch probe
#: (a child process that imports PyTorch; not kept with --no-torch-profile).
TAIL_RESERVE_S = 40.0
PROBE_RESERVE_S = 110.0
#: Seconds the throughput cases leave for the shuffled and sharded epochs
#: (which take ~10-15 s on an H100), on top of Session.reserve().
ORDER_RESERVE_S = 30.0
#: Bytes of each buffer of the bandwidth measurement.
BANDWIDTH_BYTES = 1 << 30
QUICK_BANDWIDTH_BYTES = 1 << 28
#: int64 columns the kernel writes besides the d coordinates.
SCALAR_COLUMNS = 3
#: Seconds the child process that counts launches with torch.profiler may take.
PROBE_TIMEOUT_S = 180
PROBE_PREFIX = "LAUNCH_PROBE "
#: The line --profile-epochs prints its result on.
PROFILE_PREFIX = "PROFILED_EPOCHS "
#: The case the write-roofline target is judged on: 1e8 patches over ~1M regions.
ROOFLINE_PATCHES = max(PATCH_TARGETS)
ROOFLINE_REGIONS = REGION_SETS[-1][0]

# -- shuffled and sharded epochs: ~1e6 and ~1e7 patches over ~1M regions
ORDER_REGION_SET = REGION_SETS[-1]
ORDER_PATCH_TARGETS = (10**6, 10**7)
QUICK_ORDER_REGION_SET = QUICK_REGION_SETS[-1]
QUICK_ORDER_PATCH_TARGETS = (10**5, 10**6)
#: The shards measured: rank ORDER_RANK of each world size.
ORDER_RANK = 1
ORDER_WORLD_SIZES = (4, 8)
#: Seconds of GPU time each timed draw of a case aims at (quick: a quarter).
ORDER_BUDGET_S = 0.5
#: The epoch whose rows are compared with the NumPy backend's.
ORDER_CHECK_EPOCH = 7
#: NumPy seconds per patch assumed for the comparison when none was measured.
NUMPY_FALLBACK_PER_PATCH = 1e-6


@dataclass(frozen=True)
class Case:
    """One epoch-throughput case: a region set and a target number of patches."""

    regions_label: str
    data_shapes: tuple[tuple[int, ...], ...]
    patch_size: tuple[int, ...]
    n_regions: int
    target_patches: int
    #: Uniform probability per region that gives ~target_patches; None when it
    #: would exceed MAX_PROBABILITY (the combination is not possible).
    probability: float | None

    @property
    def feasible(self) -> bool:
        return self.probability is not None

    @property
    def ndim(self) -> int:
        return len(self.patch_size)

    def grid(self) -> tuple[int, ...]:
        """Grid shape of the (single) sample of the case."""
        return grid_shape(self.data_shapes[0][2:], self.patch_size)


def count_regions(data_shapes: Sequence[Sequence[int]], patch_size: Sequence[int]) -> int:
    """Number of regions (grid cells) over every sample of every stack."""
    return sum(int(s[0]) * cell_count(grid_shape(s[2:], patch_size)) for s in data_shapes)


def probability_for(target_patches: int, n_regions: int) -> float | None:
    """Uniform probability per region giving ~target_patches, or None if too large.

    With no exclusions and region probability ``p`` everywhere, a sample has
    ``ceil(sum(p))`` patches (when its shape is a multiple of the patch size).
    """
    probability = target_patches / n_regions
    return probability if probability <= MAX_PROBABILITY else None


def build_cases(
    region_sets: Sequence[tuple[str, Sequence[Sequence[int]], Sequence[int]]],
    targets: Sequence[int],
) -> list[Case]:
    """Every (region set, target) pair, feasible or not, in region-set order."""
    cases = []
    for label, shapes, patch in region_sets:
        shapes_t = tuple(tuple(int(s) for s in shape) for shape in shapes)
        patch_t = tuple(int(p) for p in patch)
        n_regions = count_regions(shapes_t, patch_t)
        for target in targets:
            cases.append(
                Case(
                    regions_label=label,
                    data_shapes=shapes_t,
                    patch_size=patch_t,
                    n_regions=n_regions,
                    target_patches=int(target),
                    probability=probability_for(int(target), n_regions),
                )
            )
    return cases


# -- roofline arithmetic -------------------------------------------------------------------


def bytes_per_patch(ndim: int) -> int:
    """Bytes the epoch kernel writes per patch: 3 int64 columns plus d coordinates."""
    return (SCALAR_COLUMNS + ndim) * 8


def epoch_bytes(n_patches: int, ndim: int) -> int:
    """Bytes the epoch kernel writes for ``n_patches`` patches."""
    return n_patches * bytes_per_patch(ndim)


def copy_bandwidth(nbytes: int, seconds: float) -> tuple[float, float]:
    """``(read+write, write-only equivalent)`` bandwidth of copying ``nbytes``.

    A copy reads and writes ``nbytes`` each: ``2 * nbytes / seconds`` moved in
    all, of which ``nbytes / seconds`` written.
    """
    return 2 * nbytes / seconds, nbytes / seconds


def write_rate(n_patches: int, ndim: int, seconds: float) -> float:
    """Bytes per second that an epoch of ``n_patches`` written in ``seconds`` achieves."""
    return epoch_bytes(n_patches, ndim) / seconds


def roofline_fraction(n_patches: int, ndim: int, seconds: float, bandwidth: float) -> float:
    """Fraction of a write roofline (bytes/s) achieved by one epoch."""
    return write_rate(n_patches, ndim, seconds) / bandwidth


def backend_launches(sampler: StratifiedPatching) -> int:
    """Kernel launches the sampler's backend made so far (``CudaBackend.launch_count``).

    The NumPy backend launches nothing and has no such count: its draws are
    counted in their place from the first call on (the sections run on it in
    the tests, where each draw stands for the one launch a GPU makes), so only
    differences between two calls mean anything.
    """
    # The sampler has no public accessor for its backend object.
    backend = sampler._backend
    if not hasattr(backend, "launch_count"):
        _count_draws(backend)
    return int(backend.launch_count)


def _count_draws(backend: Any) -> None:
    """Give a backend without a launch count one that counts its ``draw`` calls."""
    draw = backend.draw

    def counted_draw(*args: Any, **kwargs: Any) -> Any:
        backend.launch_count += 1
        return draw(*args, **kwargs)

    backend.launch_count = 0
    backend.draw = counted_draw


def set_uniform_probability(sampler: StratifiedPatching, case: Case) -> None:
    sampler.set_region_probs(0, 0, np.full(case.grid(), case.probability, dtype=np.float64))


def same_batches(a: Any, b: Any) -> bool:
    return all(
        np.array_equal(getattr(a, name), getattr(b, name))
        for name in ("data_idx", "sample_idx", "coords", "indices")
    )


def epoch_repeats(first_epoch_s: float, budget_s: float, rounds: int) -> tuple[int, int]:
    """``(epochs per burst, isolated repeats)`` that fit ``budget_s`` (half each), in [1, 200]."""
    per_epoch = max(first_epoch_s, 1e-6)
    per_burst = max(1, min(200, int(budget_s / 2 / rounds / per_epoch)))
    isolated = max(1, min(200, int(budget_s / 2 / per_epoch)))
    return per_burst, isolated


def measure_epoch(
    cupy: Any,
    sampler: StratifiedPatching,
    numpy_sampler: StratifiedPatching | None,
    quick: bool,
    budget_s: float | None = None,
) -> dict[str, Any]:
    """Throughput of one case on the GPU (and NumPy when given).

    The repeats are sized from a first synchronised epoch, so a case takes
    about ``budget_s`` seconds of GPU time whatever the kernel's speed
    (default: EPOCH_BUDGET_S, or QUICK_EPOCH_BUDGET_S when ``quick``).
    """
    if budget_s is None:
        budget_s = QUICK_EPOCH_BUDGET_S if quick else EPOCH_BUDGET_S
    n = sampler.n_patches
    draw = sampler.sample_epoch
    stream = cupy.cuda.get_current_stream()
    first = min(time_calls(draw, 2, stream.synchronize, warmup=False))
    rounds = 3 if quick else 5
    per_burst, repeats = epoch_repeats(first, budget_s, rounds)
    burst = time_burst(cupy, draw, per_burst, rounds)
    isolated = statistics.median(time_events(cupy, draw, repeats))
    result: dict[str, Any] = {"n_patches": n, "burst": burst, "isolated": isolated}
    if numpy_sampler is not None:
        if numpy_sampler.n_patches != n:
            raise RuntimeError(f"NumPy has {numpy_sampler.n_patches} patches, the GPU {n}")
        # Above 1e6 patches: a single run, no warm-up (a 1e7 epoch takes seconds).
        small = n <= 10**6
        if small:
            numpy_sampler.sample_epoch(0)
        times = []
        for _ in range(5 if small else 1):
            start = time.perf_counter()
            reference = numpy_sampler.sample_epoch(0)
            times.append(time.perf_counter() - start)
        result["numpy"] = statistics.median(times)
        result["same"] = same_batches(sampler.sample_epoch(0).to_numpy(), reference)
        del reference
    return result


def measure_latency(cupy: Any, sampler: StratifiedPatching, repeats: int) -> dict[str, Any]:
    """End-to-end time of one epoch (host call to result ready), two ways."""
    stream = cupy.cuda.get_current_stream()
    draw = sampler.sample_epoch
    events = time_events(cupy, draw, repeats)
    before = backend_launches(sampler)
    wall = time_calls(draw, repeats, stream.synchronize, warmup=False)
    launches = (backend_launches(sampler) - before) / repeats
    return {
        "n_patches": sampler.n_patches,
        "events": statistics.median(events),
        "events_p10": percentile(events, 10),
        "events_p90": percentile(events, 90),
        "wall": statistics.median(wall),
        "wall_p10": percentile(wall, 10),
        "wall_p90": percentile(wall, 90),
        "launches": launches,
    }


UPDATE_ROWS = (
    ("exclude_coords", "exclude_patches, 5% of cells as a (k, d) int array (host)"),
    ("exclude_mask", "exclude_patches, 5% of cells as a dense bool mask (backend's memory)"),
    ("probs_host", "set_region_probs, dense float64 array (host)"),
    ("probs_native", "set_region_probs, dense float64 array (backend's memory)"),
)


def measure_updates(
    backend: str,
    shapes: Sequence[Sequence[int]],
    patch: Sequence[int],
    repeats: int,
    cupy: Any = None,
) -> dict[str, float]:
    """Median synchronised time of each table update (UPDATE_ROWS) on one backend.

    Excluding the same cells again costs the same (the sample is rebuilt) and
    changes nothing, so every repeat does the same work; the probabilities
    alternate between two arrays. ``cupy`` (given for the GPU) makes the
    "backend's memory" arrays and synchronises its stream; without it they are
    NumPy arrays.
    """
    sampler = StratifiedPatching(shapes, patch, seed=1, backend=backend)
    cells = grid_shape(shapes[0][2:], patch)
    generator = np.random.default_rng(0)
    total = cell_count(cells)
    picks = np.sort(generator.choice(total, total // 20, replace=False))
    coords = np.stack(np.unravel_index(picks, cells), axis=1).astype(np.int64)
    mask = np.zeros(cells, dtype=bool)
    mask[tuple(coords.T)] = True
    probs = [generator.uniform(0.5, 2.0, cells), generator.uniform(0.5, 2.0, cells)]
    if cupy is not None:
        native_mask = cupy.asarray(mask)
        native_probs = [cupy.asarray(p) for p in probs]
        sync = cupy.cuda.get_current_stream().synchronize
    else:
        native_mask, native_probs = mask, probs

        def sync() -> None:
            return None

    updates: dict[str, Callable[[int], Any]] = {
        "exclude_coords": lambda _k: sampler.exclude_patches(0, 0, coords),
        "exclude_mask": lambda _k: sampler.exclude_patches(0, 0, native_mask),
        "probs_host": lambda k: sampler.set_region_probs(0, 0, probs[k % 2]),
        "probs_native": lambda k: sampler.set_region_probs(0, 0, native_probs[k % 2]),
    }
    return {
        name: statistics.median(time_calls(update, repeats, sync))
        for name, update in updates.items()
    }


# -- shuffled and sharded epochs ------------------------------------------------------------


def order_cases(quick: bool) -> list[Case]:
    """The cases of the shuffled and sharded epochs (built like the throughput cases)."""
    region_set = QUICK_ORDER_REGION_SET if quick else ORDER_REGION_SET
    return build_cases([region_set], QUICK_ORDER_PATCH_TARGETS if quick else ORDER_PATCH_TARGETS)


def order_variants() -> list[tuple[str, str, dict[str, Any]]]:
    """``(key, label, sample_epoch keywords)`` of each epoch measured, the plain one first."""
    variants: list[tuple[str, str, dict[str, Any]]] = [
        ("plain", "plain epoch", {}),
        ("shuffled", "shuffled epoch", {"shuffle": True}),
    ]
    for world_size in ORDER_WORLD_SIZES:
        variants.append(
            (
                f"shard{world_size}",
                f"shuffled shard (rank {ORDER_RANK} of {world_size})",
                {"shuffle": True, "rank": ORDER_RANK, "world_size": world_size},
            )
        )
    return variants


def epoch_draw(sampler: StratifiedPatching, options: dict[str, Any]) -> Callable[[int], Any]:
    """``k -> sampler.sample_epoch(k, **options)``."""
    return lambda k: sampler.sample_epoch(k, **options)


def plain_rows_draw(sampler: StratifiedPatching, n_rows: int) -> Callable[[int], Any]:
    """``k ->`` a plain draw of the first ``n_rows`` patches of epoch ``k``, in one launch.

    The baseline of a shard of ``n_rows`` rows: the same call path, kernel and
    bytes written, but neither shuffled nor strided. The sampler's public API
    draws whole epochs only, so this calls its backend directly.
    """
    order = EpochOrder.contiguous(0, n_rows)
    backend, tables, seed = sampler._backend, sampler._tables, sampler.seed
    return lambda k: backend.draw(tables, order, k, seed)


def burst_length(first_call_s: float, budget_s: float, rounds: int) -> int:
    """Calls per burst so that ``rounds`` bursts take about ``budget_s``, in [1, 200]."""
    return max(1, min(200, int(budget_s / rounds / max(first_call_s, 1e-6))))


def per_patch_overhead(seconds: float, rows: int, base_seconds: float, base_rows: int) -> float:
    """Extra cost per row of ``rows`` rows in ``seconds`` over a baseline (0.1 = +10%)."""
    return (seconds / rows) / (base_seconds / base_rows) - 1.0


def measure_orders(
    cupy: Any, sampler: StratifiedPatching, budget_s: float, rounds: int
) -> dict[str, Any]:
    """Per-call time of every order_variants() epoch, and of each shard's plain baseline.

    Each draw is timed as ``rounds`` bursts of back-to-back calls (CUDA events
    around the burst, divided by its length), the draws in turns, so that a
    drift of the card's clocks touches all alike; the result is the median
    burst. The launches per call are ``CudaBackend.launch_count`` over every
    call made here (the bursts' warm-up calls included).
    """
    stream = cupy.cuda.get_current_stream()
    draws: dict[str, Callable[[int], Any]] = {}
    rows: dict[str, int] = {}
    baselines: dict[str, str] = {}  # shard key -> key of its plain baseline
    for key, _label, options in order_variants():
        draws[key] = epoch_draw(sampler, options)
        rows[key] = len(sampler.sample_epoch(0, **options))
    for key, _label, options in order_variants():
        if options.get("world_size", 1) > 1:
            baselines[key] = f"{key} baseline"
            draws[baselines[key]] = plain_rows_draw(sampler, rows[key])
            rows[baselines[key]] = rows[key]
    per_burst = {
        key: burst_length(min(time_calls(draw, 2, stream.synchronize)), budget_s, rounds)
        for key, draw in draws.items()
    }
    times: dict[str, list[float]] = {key: [] for key in draws}
    launches = dict.fromkeys(draws, 0)
    calls = dict.fromkeys(draws, 0)
    for _ in range(rounds):
        for key, draw in draws.items():
            before = backend_launches(sampler)
            times[key].append(time_burst(cupy, draw, per_burst[key], 1))
            launches[key] += backend_launches(sampler) - before
            calls[key] += per_burst[key] + 1  # time_burst makes one warm-up call
    timed = {
        key: {
            "rows": rows[key],
            "time": statistics.median(times[key]),
            "launches": launches[key] / calls[key],
        }
        for key in draws
    }
    return {
        "n_patches": sampler.n_patches,
        "variants": {key: timed[key] for key, _, _ in order_variants()},
        "baselines": {key: timed[base] for key, base in baselines.items()},
        "same": None,
    }


def compare_orders(
    sampler: StratifiedPatching, numpy_sampler: StratifiedPatching, epoch: int
) -> dict[str, bool]:
    """Whether each order_variants() epoch has the same rows on both samplers."""
    if numpy_sampler.n_patches != sampler.n_patches:
        raise RuntimeError(
            f"NumPy has {numpy_sampler.n_patches} patches, the GPU {sampler.n_patches}"
        )
    same = {}
    for key, _label, options in order_variants():
        gpu = sampler.sample_epoch(epoch, **options).to_numpy()
        same[key] = same_batches(gpu, numpy_sampler.sample_epoch(epoch, **options))
        del gpu
    return same


# -- launches per epoch: torch.profiler (CUPTI) in a child process, and for ncu ----------------


def _synchronizer(backend: str) -> Callable[[], None]:
    """What waits for a sampler's work: the device on CUDA, nothing on NumPy."""
    if backend == "cuda":
        cupy, why = usable_cupy()
        if cupy is None:
            raise RuntimeError(why)
        return cupy.cuda.Device().synchronize
    return lambda: None


def launch_probe(backend: str = "cuda", epochs: int = 5) -> dict[str, Any]:
    """Count the device activity of ``epochs`` epochs with torch.profiler (CUPTI).

    Runs in a child process (``--launch-probe``) so that a PyTorch that cannot
    profile, or crashes, costs this one line of the report only. ``backend``
    ``"numpy"`` profiles the CPU only (no device event can appear): the tests
    use it to get this function's real output without a GPU.

    Returns
    -------
    dict
        ``{"error": why}`` when nothing could be counted; otherwise
        ``epochs``, ``launch_count`` (the backend's own count over the same
        epochs), ``torch`` (PyTorch's version), ``device`` (whether CUDA
        activity was profiled) and :func:`classify_device_events`'s keys.
    """
    if backend == "cuda":
        cupy, why = usable_cupy()
        if cupy is None:
            return {"error": why}
    try:
        import torch
        from torch.profiler import ProfilerActivity, profile
    except Exception as error:  # an absent or broken PyTorch is a line of the report
        return {"error": f"PyTorch is not importable ({type(error).__name__}: {error})"}
    activities = [ProfilerActivity.CPU]
    if backend == "cuda":
        if not torch.cuda.is_available():
            return {"error": "PyTorch sees no CUDA device"}
        torch.zeros(1, device="cuda").sum().item()  # initialise PyTorch's CUDA state
        activities.append(ProfilerActivity.CUDA)
    sync = _synchronizer(backend)
    sampler = latency_sampler(backend)
    sampler.sample_epoch(0)
    sync()
    with profile(activities=activities):  # a first session warms CUPTI up
        sampler.sample_epoch(1)
        sync()
    before = backend_launches(sampler)
    with profile(activities=activities) as prof:
        for k in range(epochs):
            sampler.sample_epoch(k + 2)
        sync()
    launches = backend_launches(sampler) - before
    names = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    return {
        "epochs": epochs,
        "launch_count": launches,
        "torch": torch.__version__,
        "device": backend == "cuda",
        **classify_device_events(names),
    }


def latency_sampler(backend: str) -> StratifiedPatching:
    """The sampler of the first end-to-end case (~1k regions, ~LATENCY_PATCHES patches)."""
    case = build_cases(REGION_SETS[:1], (LATENCY_PATCHES,))[0]
    sampler = StratifiedPatching(case.data_shapes, case.patch_size, seed=1, backend=backend)
    set_uniform_probability(sampler, case)
    return sampler


def classify_device_events(names: Sequence[str]) -> dict[str, Any]:
    """Split the names of the device events of a profile into ours, copies and the rest.

    Kineto also reports some bookkeeping of its own on the device timeline
    (activity-buffer requests, overhead); those are listed apart, not counted
    as kernels.
    """
    ours = [n for n in names if KERNEL_NAME in n]
    copies = [n for n in names if n.lower().startswith(("memcpy", "memset"))]
    rest = [n for n in names if KERNEL_NAME not in n and n not in copies]
    bookkeeping = [n for n in rest if any(w in n.lower() for w in ("buffer", "overhead"))]
    return {
        "ours": len(ours),
        "copies": sorted(copies),
        "other_kernels": sorted(n for n in rest if n not in bookkeeping),
        "bookkeeping": sorted(set(bookkeeping)),
    }


def probe_command(backend: str = "cuda") -> list[str]:
    """The child process of :func:`run_launch_probe`."""
    return [sys.executable, str(Path(__file__).resolve()), "--launch-probe", "--backend", backend]


def run_launch_probe(timeout_s: float = PROBE_TIMEOUT_S, backend: str = "cuda") -> dict[str, Any]:
    """:func:`launch_probe` in a child process; ``{"error": why}`` when it gives nothing."""
    try:
        done = subprocess.run(
            probe_command(backend), capture_output=True, text=True, timeout=timeout_s, check=False
        )
    except subprocess.TimeoutExpired:
        return {"error": f"the torch.profiler probe took more than {timeout_s:.0f} s"}
    for line in done.stdout.splitlines():
        if line.startswith(PROBE_PREFIX):
            probe: dict[str, Any] = json.loads(line[len(PROBE_PREFIX) :])
            return probe
    tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
    return {"error": f"the torch.profiler probe exited with {done.returncode}: {tail[0]}"}


def _names(names: Sequence[str], limit: int = 5) -> str:
    unique = sorted(set(names))
    more = f", ... ({len(unique) - limit} more)" if len(unique) > limit else ""
    return ", ".join(unique[:limit]) + more if unique else "none"


def probe_text(probe: dict[str, Any]) -> str:
    """The 'measured' cell of the CUPTI row of the targets table."""
    if "error" in probe:
        return f"not measured: {probe['error']}"
    epochs = probe["epochs"]
    if probe["ours"] == 0 and not probe["other_kernels"]:
        where = "" if probe["device"] else " (CPU activity only: no device profiled)"
        return (
            f"CUPTI (torch {probe['torch']}) recorded no kernel over {epochs} epochs{where} "
            f"(launch_count says {probe['launch_count']}): profiling unavailable here"
        )
    text = (
        f"{probe['ours'] / epochs:g} {KERNEL_NAME} kernel(s) per epoch over {epochs} epochs; "
        f"other kernels: {len(probe['other_kernels'])} ({_names(probe['other_kernels'])}); "
        f"memcpy/memset: {len(probe['copies'])}; launch_count over the same epochs: "
        f"{probe['launch_count'] / epochs:g} per epoch (torch {probe['torch']})"
    )
    if probe["bookkeeping"]:
        text += f"; profiler bookkeeping not counted: {_names(probe['bookkeeping'])}"
    return text


def probe_verdict(probe: dict[str, Any]) -> bool | None:
    """Whether CUPTI saw one launch of ours per epoch and nothing else (None: not measured)."""
    if "error" in probe or (probe["ours"] == 0 and not probe["other_kernels"]):
        return None
    return bool(probe["ours"] == TARGET_LAUNCHES * probe["epochs"] and not probe["other_kernels"])


def profile_epochs(backend: str, epochs: int) -> dict[str, Any]:
    """Draw ``epochs`` epochs between cudaProfilerStart and cudaProfilerStop, for ncu.

    ``ncu --profile-from-start off`` then sees these epochs' kernels only
    (not the compilation, warm-up or table building before them). Returns
    ``epochs`` and the backend's own ``launch_count`` over them; on the NumPy
    backend (the tests) there is no profiler to start.
    """
    sync = _synchronizer(backend)
    sampler = latency_sampler(backend)
    sampler.sample_epoch(0)  # compiles the kernel and uploads the tables
    sync()
    profiler = None
    if backend == "cuda":
        cupy, _ = usable_cupy()
        profiler = cupy.cuda.runtime
        profiler.profilerStart()
    before = backend_launches(sampler)
    try:
        for k in range(epochs):
            sampler.sample_epoch(k + 1)
        sync()
    finally:
        if profiler is not None:
            profiler.profilerStop()
    return {"epochs": epochs, "launch_count": backend_launches(sampler) - before}


def count_ncu_kernels(log: str) -> dict[str, int]:
    """Kernels per name in the CSV that ``ncu --csv`` writes (one launch per distinct ID).

    The CSV starts at its header line (the one naming "ID" and "Kernel Name");
    lines before it (ncu's ``==PROF==`` notes, the program's own output) are
    skipped. A launch with several metrics has several rows with one ID.

    Raises
    ------
    ValueError
        If the text holds no such header (ncu profiled nothing, or failed).
    """
    lines = log.splitlines()
    start = next(
        (i for i, line in enumerate(lines) if '"ID"' in line and '"Kernel Name"' in line), None
    )
    if start is None:
        raise ValueError('no ncu CSV header (a line naming "ID" and "Kernel Name") found')
    seen: dict[str, set[str]] = {}
    for row in csv.DictReader(lines[start:]):
        if row.get("ID") is None or row.get("Kernel Name") is None:
            continue  # a trailing line that is not a row of the table
        seen.setdefault(row["Kernel Name"], set()).add(row["ID"])
    return {name: len(ids) for name, ids in sorted(seen.items())}


def ncu_summary(counts: dict[str, int], epochs: int, launch_count: int | None) -> str:
    """One line: ncu's launches per epoch, ours and others, beside the backend's count."""
    ours = sum(n for name, n in counts.items() if KERNEL_NAME in name)
    others = {name: n for name, n in counts.items() if KERNEL_NAME not in name}
    text = (
        f"ncu: {ours / epochs:g} {KERNEL_NAME} launch(es) per epoch over {epochs} epochs; "
        f"other kernels: {sum(others.values())} ({_names(list(others))})"
    )
    if launch_count is not None:
        text += f"; CudaBackend.launch_count: {launch_count / epochs:g} per epoch"
    met = ours == TARGET_LAUNCHES * epochs and not others
    return f"{text}; one launch per epoch: {fmt_verdict(met)}"


# -- the report -------------------------------------------------------------------------------


def bandwidth_section(seconds: dict[str, float], nbytes: int) -> tuple[list[str], float, float]:
    """Lines of the bandwidth table, the copy roofline and the fill roofline (bytes/s)."""
    rows = []
    labels = {
        "memcpy": "D2D cudaMemcpyAsync (what cupy.copyto does)",
        "copy": "copy kernel (ElementwiseKernel y = x)",
        "fill": "fill kernel (ElementwiseKernel y = v, writes only)",
    }
    for name, label in labels.items():
        both, written = copy_bandwidth(nbytes, seconds[name])
        rows.append(
            [
                f"{label}, {fmt_bytes(nbytes)}",
                fmt_time(seconds[name]),
                "n/a (writes only)" if name == "fill" else fmt_bandwidth(both),
                fmt_bandwidth(written),
            ]
        )
    copy_roof = max(copy_bandwidth(nbytes, seconds[n])[1] for n in ("memcpy", "copy"))
    fill_roof = nbytes / seconds["fill"]
    lines = markdown_table(
        ["operation", "time (median)", "read+write: 2*bytes/time", "written: bytes/time"],
        rows,
        "lrrr",
    )
    lines += [
        "",
        f"**Copy roofline** (the issue's definition: write-only equivalent of a D2D copy, "
        f"bytes/time of the faster copy): {fmt_bandwidth(copy_roof)}. "
        f"**Fill roofline** (stricter: a kernel that only writes): {fmt_bandwidth(fill_roof)}.",
    ]
    return lines, copy_roof, fill_roof


def throughput_row(
    case: Case, result: dict[str, Any] | None, note: str, copy_roof: float, fill_roof: float
) -> list[str]:
    prefix = [f"{case.regions_label} ({case.n_regions:,})"]
    if result is None:
        return [*prefix, f"~{case.target_patches:,}", note, *["n/a"] * 10]
    n, d = result["n_patches"], case.ndim
    burst = result["burst"]
    numpy_time = result.get("numpy")
    same = result.get("same")
    return [
        *prefix,
        f"{n:,}",
        f"{case.probability:.4g}",
        fmt_time(burst),
        fmt_time(result["isolated"]),
        fmt_rate(n / burst),
        fmt_bytes(epoch_bytes(n, d)),
        fmt_bandwidth(write_rate(n, d, burst)),
        fmt_percent(roofline_fraction(n, d, burst, copy_roof)),
        fmt_percent(roofline_fraction(n, d, burst, fill_roof)),
        fmt_time(numpy_time) if numpy_time is not None else note or "skipped",
        fmt_ratio(numpy_time, result["isolated"]),
        ("yes" if same else "NO") if same is not None else "n/a",
    ]


THROUGHPUT_HEADER = [
    "regions",
    "patches",
    "p per region",
    "GPU epoch, back-to-back",
    "GPU epoch, isolated",
    "patches/s",
    "written/epoch",
    "write rate",
    "% copy roofline",
    "% fill roofline",
    "NumPy epoch",
    "GPU/NumPy speed",
    "same patches as NumPy",
]


def latency_row(label: str, result: dict[str, Any]) -> list[str]:
    worst = max(result["events"], result["wall"])
    return [
        label,
        f"{result['n_patches']:,}",
        f"{fmt_time(result['events'])} ({fmt_time(result['events_p10'])} - "
        f"{fmt_time(result['events_p90'])})",
        f"{fmt_time(result['wall'])} ({fmt_time(result['wall_p10'])} - "
        f"{fmt_time(result['wall_p90'])})",
        f"{result['launches']:g}",
        fmt_verdict(worst <= TARGET_EPOCH_SECONDS),
    ]


LATENCY_HEADER = [
    "regions",
    "patches",
    "CUDA events: median (p10 - p90)",
    "perf_counter + stream sync: median (p10 - p90)",
    "launches/epoch (launch_count)",
    "<= 30 us",
]


def update_rows(gpu: dict[str, float], host: dict[str, float] | None) -> list[list[str]]:
    rows = []
    for key, label in UPDATE_ROWS:
        numpy_time = host[key] if host else None
        rows.append(
            [
                label,
                fmt_time(gpu[key]),
                fmt_time(numpy_time),
                fmt_ratio(numpy_time, gpu[key], decimals=1),
                fmt_verdict(gpu[key] <= TARGET_UPDATE_SECONDS),
            ]
        )
    return rows


UPDATE_HEADER = ["update", "GPU (median, synced)", "NumPy (median)", "GPU/NumPy speed", "<= 1 ms"]


def order_rows(case: Case, result: dict[str, Any] | None, note: str) -> list[list[str]]:
    """Rows of the shuffled-and-sharded table for one case (one row when not measured)."""
    prefix = [f"{case.regions_label} ({case.n_regions:,})"]
    if result is None:
        return [[*prefix, f"~{case.target_patches:,}", note, *["n/a"] * (len(ORDER_HEADER) - 3)]]
    variants, baselines, same = result["variants"], result["baselines"], result["same"]
    plain = variants["plain"]
    rows = []
    for key, label, _options in order_variants():
        timed = variants[key]
        baseline = baselines.get(key)
        rows.append(
            [
                *prefix,
                f"{result['n_patches']:,}",
                label,
                f"{timed['rows']:,}",
                fmt_time(timed["time"]),
                fmt_rate(timed["rows"] / timed["time"]),
                "(the baseline)"
                if key == "plain"
                else fmt_overhead(
                    per_patch_overhead(timed["time"], timed["rows"], plain["time"], plain["rows"])
                ),
                fmt_overhead(
                    per_patch_overhead(
                        timed["time"], timed["rows"], baseline["time"], baseline["rows"]
                    )
                )
                if baseline is not None
                else "n/a",
                f"{timed['launches']:g}",
                fmt_verdict(same[key]) if same is not None else note or "n/a",
            ]
        )
    return rows


ORDER_HEADER = [
    "regions",
    "patches",
    "epoch",
    "rows",
    "time per epoch, back-to-back",
    "rows/s",
    "per patch, vs plain epoch",
    "per patch, vs plain draw of as many rows",
    "launches per call (launch_count)",
    "same rows as NumPy",
]


def order_summary(orders: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """The worst per-patch overhead over every measured case, and the launches per call.

    ``None`` when no case was measured.
    """
    if not orders:
        return None
    labels = {key: label for key, label, _ in order_variants()}
    worst: tuple[float, str, int] | None = None
    worst_same_rows: float | None = None
    launches = []
    for result in orders:
        plain = result["variants"]["plain"]
        for key, timed in result["variants"].items():
            launches.append(timed["launches"])
            if key == "plain":
                continue
            overhead = per_patch_overhead(
                timed["time"], timed["rows"], plain["time"], plain["rows"]
            )
            if worst is None or overhead > worst[0]:
                worst = (overhead, labels[key], result["n_patches"])
            baseline = result["baselines"].get(key)
            if baseline is not None:
                against = per_patch_overhead(
                    timed["time"], timed["rows"], baseline["time"], baseline["rows"]
                )
                if worst_same_rows is None or against > worst_same_rows:
                    worst_same_rows = against
    assert worst is not None
    return {
        "overhead": worst[0],
        "variant": worst[1],
        "n_patches": worst[2],
        "overhead_same_rows": worst_same_rows,
        "launches": (min(launches), max(launches)),
        "cases": len(orders),
    }


def targets_table(
    roofline: tuple[float, float] | None,
    latency: dict[str, dict[str, Any]],
    updates: dict[str, float] | None,
    update_label: str,
    launches: float | None,
    probe: dict[str, Any] | None,
    orders: Sequence[dict[str, Any]] | None = None,
) -> list[str]:
    rows = []
    if roofline is None:
        rows.append([">= 50% of the write roofline at 1e8 patches", "not measured", "n/a"])
    else:
        copy_fraction, fill_fraction = roofline
        rows.append(
            [
                ">= 50% of the write roofline at 1e8 patches",
                f"{fmt_percent(copy_fraction)} of the copy roofline "
                f"({fmt_percent(fill_fraction)} of the fill roofline)",
                f"{fmt_verdict(copy_fraction >= TARGET_ROOFLINE_FRACTION)} (copy), "
                f"{fmt_verdict(fill_fraction >= TARGET_ROOFLINE_FRACTION)} (fill)",
            ]
        )
    if latency:
        worst = max(max(r["events"], r["wall"]) for r in latency.values())
        rows.append(
            [
                "<= 30 us per epoch at 1e5 patches (end to end)",
                f"worst median over region sets and methods: {fmt_time(worst)}",
                fmt_verdict(worst <= TARGET_EPOCH_SECONDS),
            ]
        )
    else:
        rows.append(["<= 30 us per epoch at 1e5 patches (end to end)", "not measured", "n/a"])
    if updates:
        worst = max(updates.values())
        rows.append(
            [
                f"updates <= 1 ms at 1M regions (measured at {update_label})",
                f"slowest: {fmt_time(worst)}",
                fmt_verdict(worst <= TARGET_UPDATE_SECONDS),
            ]
        )
    if launches is not None:
        rows.append(
            [
                "1 kernel launch per epoch (CudaBackend.launch_count)",
                f"{launches:g}",
                fmt_verdict(launches == TARGET_LAUNCHES),
            ]
        )
    if probe is not None:
        rows.append(
            [
                "1 kernel launch per epoch (CUPTI via torch.profiler)",
                probe_text(probe),
                fmt_verdict(probe_verdict(probe)),
            ]
        )
    summary = order_summary(orders or [])
    order_target = "shuffling and sharding cost < 20% over the plain epoch"
    if summary is None:
        rows.append([order_target, "not measured", "n/a"])
    else:
        same_rows = summary["overhead_same_rows"]
        against = (
            f"; shards against a plain draw of as many rows: at most {fmt_overhead(same_rows)}"
            if same_rows is not None
            else ""
        )
        rows.append(
            [
                order_target,
                f"worst per patch over {summary['cases']} case(s): "
                f"{fmt_overhead(summary['overhead'])} ({summary['variant']}, "
                f"{summary['n_patches']:,} patches){against}",
                fmt_verdict(summary["overhead"] < TARGET_ORDER_OVERHEAD),
            ]
        )
        low, high = summary["launches"]
        rows.append(
            [
                "1 kernel launch per call, shuffled and sharded (CudaBackend.launch_count)",
                f"{high:g}" if low == high else f"{low:g} to {high:g}",
                fmt_verdict(low == high == TARGET_LAUNCHES),
            ]
        )
    return markdown_table(["target", "measured", "met"], rows, "lll")


# -- the run, section by section ----------------------------------------------------------------


@dataclass
class Session:
    """What every section of one run shares: options, CuPy, the report, the clock.

    ``backend`` is ``"cuda"`` on a GPU; the tests run the same sections on
    ``"numpy"`` with a host stand-in for the few CuPy calls made here.
    """

    args: argparse.Namespace
    cupy: Any
    report: Report
    backend: str = "cuda"
    started: float = field(default_factory=time.perf_counter)

    def left(self, reserve_s: float) -> float:
        """Seconds of ``--time-budget`` left once ``reserve_s`` is kept back."""
        return self.args.time_budget - reserve_s - (time.perf_counter() - self.started)

    def reserve(self) -> float:
        """Seconds the sections after the shuffled and sharded epochs need."""
        return TAIL_RESERVE_S + (0.0 if self.args.no_torch_profile else PROBE_RESERVE_S)

    def epoch_budget(self) -> float:
        """Seconds of GPU time per throughput case (--epoch-budget, else by --quick)."""
        if self.args.epoch_budget is not None:
            return float(self.args.epoch_budget)
        return QUICK_EPOCH_BUDGET_S if self.args.quick else EPOCH_BUDGET_S

    def numpy_max(self) -> int:
        """Patches above which the NumPy comparison is skipped (0 with --no-numpy)."""
        return 0 if self.args.no_numpy else int(self.args.numpy_max_patches)


@dataclass
class Throughput:
    """What the throughput section hands on: latency results, roofline, seconds per patch."""

    latency: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: ``(copy, fill)`` roofline fractions of the ROOFLINE_PATCHES case, when measured.
    roofline: tuple[float, float] | None = None
    #: The slowest seconds per patch seen, to skip later cases that would overrun.
    gpu_per_patch: float = 0.0
    numpy_per_patch: float = 0.0


def first_call_section(session: Session) -> None:
    """Time the first sampler and epoch of the process (kernel compile or disk cache)."""
    start = time.perf_counter()
    warm = StratifiedPatching([(1, 1, 256, 256)], (32, 32), seed=1, backend=session.backend)
    warm.sample_epoch(0)
    session.cupy.cuda.Device().synchronize()
    first_call = time.perf_counter() - start
    del warm
    session.report.emit(
        "",
        f"First sampler + epoch in this process (kernel compile or disk cache): "
        f"{fmt_time(first_call)}. Times are medians; 1 GB = 1e9 bytes.",
    )


def bandwidth_measure_section(session: Session) -> tuple[float, float]:
    """Measure and emit the card's copy bandwidths; return (copy, fill) rooflines in B/s."""
    quick = session.args.quick
    nbytes = QUICK_BANDWIDTH_BYTES if quick else BANDWIDTH_BYTES
    seconds = measure_copy_bandwidth(session.cupy, nbytes, per_burst=10 if quick else 20, rounds=5)
    free_device_memory(session.cupy)
    table, copy_roof, fill_roof = bandwidth_section(seconds, nbytes)
    session.report.emit("", "## Bandwidth (measured in this run)", "", *table)
    return copy_roof, fill_roof


def throughput_intro(session: Session) -> list[str]:
    """The heading, the explanation and the header of the throughput table."""
    numpy_text = (
        "NumPy: not run (--no-numpy)."
        if session.args.no_numpy
        else f"NumPy: the same shapes and probabilities on this host (skipped above "
        f"{session.numpy_max():,} patches, or where it would take too long); GPU/NumPy "
        f"speed = NumPy epoch / isolated GPU epoch."
    )
    return [
        "",
        "## Epoch throughput",
        "",
        f"One sample per region set; every region gets the same probability p (dense "
        f"`set_region_probs`), which sets the patch count. Bytes written per patch: "
        f"(3 + d) * 8 = {bytes_per_patch(2)} (d = 2). *Back-to-back*: CUDA events around a "
        f"burst of epochs, per epoch (patches/s, write rate and the roofline fractions use "
        f"it); *isolated*: CUDA events around one call, synchronised. {numpy_text}",
        "",
        *markdown_table(THROUGHPUT_HEADER, [], "l" + "r" * (len(THROUGHPUT_HEADER) - 1)),
    ]


def case_skip_note(session: Session, case: Case, n_patches: int, per_patch: float) -> str:
    """Why a throughput case cannot run now ('' when it can): time budget or memory."""
    left = session.left(session.reserve() + ORDER_RESERVE_S)
    if session.epoch_budget() + 4 * per_patch * n_patches > left:
        return "skipped: would overrun --time-budget"
    free_device_memory(session.cupy)
    free, _ = session.cupy.cuda.runtime.memGetInfo()
    if 2.2 * epoch_bytes(n_patches, case.ndim) > free:
        return f"skipped: needs ~{fmt_bytes(2 * epoch_bytes(n_patches, case.ndim))} free"
    return ""


def numpy_skip_reason(session: Session, n_patches: int, estimate: float, left: float) -> str:
    """Why a NumPy comparison of ``estimate`` seconds is skipped ('' when it runs)."""
    if session.args.no_numpy:
        return "skipped (--no-numpy)"
    if n_patches > session.numpy_max():
        return "skipped (size)"
    if estimate >= min(30.0, left / 2):
        return "skipped (time)"
    return ""


def numpy_note(session: Session, n_patches: int, numpy_per_patch: float) -> str:
    """Why the NumPy comparison of a case is skipped ('' when it runs)."""
    estimate = numpy_per_patch * n_patches * (7 if n_patches <= 10**6 else 2)
    left = session.left(session.reserve() + ORDER_RESERVE_S)
    return numpy_skip_reason(session, n_patches, estimate, left)


def throughput_section(session: Session, copy_roof: float, fill_roof: float) -> Throughput:
    """Measure and emit every throughput case; time the ~LATENCY_PATCHES ones end to end."""
    args, cupy, emit = session.args, session.cupy, session.report.emit
    region_sets = QUICK_REGION_SETS if args.quick else REGION_SETS
    targets = QUICK_PATCH_TARGETS if args.quick else PATCH_TARGETS
    emit(*throughput_intro(session))
    cases = build_cases(region_sets, targets)
    outcome = Throughput()
    for label, shapes, patch in region_sets:
        sampler = StratifiedPatching(shapes, patch, seed=1, backend=session.backend)
        numpy_sampler = None
        for case in (c for c in cases if c.regions_label == label):
            if not case.feasible:
                note = f"not possible: needs p > {MAX_PROBABILITY:g}"
                emit(markdown_row(throughput_row(case, None, note, 1, 1)))
                continue
            set_uniform_probability(sampler, case)
            n = sampler.n_patches
            skip = case_skip_note(session, case, n, outcome.gpu_per_patch)
            if skip:
                emit(markdown_row(throughput_row(case, None, skip, 1, 1)))
                continue
            note = numpy_note(session, n, outcome.numpy_per_patch)
            if not note:
                if numpy_sampler is None:
                    numpy_sampler = StratifiedPatching(shapes, patch, seed=1, backend="numpy")
                set_uniform_probability(numpy_sampler, case)
            try:
                result = measure_epoch(
                    cupy,
                    sampler,
                    None if note else numpy_sampler,
                    args.quick,
                    session.epoch_budget(),
                )
            except cupy.cuda.memory.OutOfMemoryError:
                free_device_memory(cupy)
                note = "skipped: out of device memory"
                emit(markdown_row(throughput_row(case, None, note, 1, 1)))
                continue
            emit(markdown_row(throughput_row(case, result, note, copy_roof, fill_roof)))
            record_throughput(outcome, case, result, copy_roof, fill_roof)
            if case.target_patches == LATENCY_PATCHES:
                quick = args.quick
                repeats = max(100, min(300 if quick else 2000, int(2.0 / result["isolated"])))
                outcome.latency[f"{label} ({case.n_regions:,})"] = measure_latency(
                    cupy, sampler, repeats
                )
            free_device_memory(cupy)
        del sampler, numpy_sampler
        free_device_memory(cupy)
    return outcome


def record_throughput(
    outcome: Throughput, case: Case, result: dict[str, Any], copy_roof: float, fill_roof: float
) -> None:
    """Keep the slowest seconds per patch, and the roofline fractions of the roofline case."""
    n = result["n_patches"]
    outcome.gpu_per_patch = max(outcome.gpu_per_patch, result["isolated"] / n)
    if "numpy" in result:
        outcome.numpy_per_patch = max(outcome.numpy_per_patch, result["numpy"] / n)
    if case.target_patches == ROOFLINE_PATCHES and case.regions_label == ROOFLINE_REGIONS:
        outcome.roofline = (
            roofline_fraction(n, case.ndim, result["burst"], copy_roof),
            roofline_fraction(n, case.ndim, result["burst"], fill_roof),
        )


def latency_section(session: Session, latency: dict[str, dict[str, Any]]) -> float | None:
    """Emit the end-to-end table; return the most launches per epoch seen (None if none)."""
    session.report.emit(
        "",
        f"## End-to-end time per epoch at ~{LATENCY_PATCHES:,} patches",
        "",
        "From the host call `sample_epoch(k)` to the result being ready: CUDA events recorded "
        "before and after the call, then `Event.synchronize`; and `time.perf_counter` around "
        "the call plus `Stream.synchronize`. The result of each epoch is kept until the next "
        "returns, as in training.",
        "",
        *markdown_table(
            LATENCY_HEADER,
            [latency_row(label, result) for label, result in latency.items()],
            "lrrrrl",
        ),
    )
    return max((r["launches"] for r in latency.values()), default=None)


def orders_section(
    session: Session, gpu_per_patch: float, numpy_per_patch: float
) -> list[dict[str, Any]]:
    """Measure and emit the shuffled and sharded epochs; return each measured case's result.

    ``gpu_per_patch`` and ``numpy_per_patch`` (seconds, the slowest seen by
    the throughput cases, 0 when none) size the estimates that skip what would
    overrun ``--time-budget``.
    """
    cupy, emit = session.cupy, session.report.emit
    quick = session.args.quick
    cases = order_cases(quick)
    rounds = 3 if quick else 5
    budget_s = ORDER_BUDGET_S / 4 if quick else ORDER_BUDGET_S
    checked = min(c.target_patches for c in cases)
    emit(*orders_intro(rounds, checked))
    results: list[dict[str, Any]] = []
    n_draws = len(order_variants()) + len(ORDER_WORLD_SIZES)  # the shards' baselines too
    first = cases[0]
    sampler = StratifiedPatching(
        first.data_shapes, first.patch_size, seed=1, backend=session.backend
    )
    for case in cases:

        def skip(note: str, case: Case = case) -> None:
            emit(*(markdown_row(row) for row in order_rows(case, None, note)))

        if not case.feasible:
            skip(f"not possible: needs p > {MAX_PROBABILITY:g}")
            continue
        set_uniform_probability(sampler, case)
        n = sampler.n_patches
        left = session.left(session.reserve())
        if n_draws * (budget_s + 3 * gpu_per_patch * n) > left:
            skip("skipped: would overrun --time-budget")
            continue
        free_device_memory(cupy)
        free, _ = cupy.cuda.runtime.memGetInfo()
        if 2.2 * epoch_bytes(n, case.ndim) > free:
            skip(f"skipped: needs ~{fmt_bytes(2 * epoch_bytes(n, case.ndim))} free")
            continue
        note = order_check_note(session, case, checked, n, numpy_per_patch, left)
        try:
            result = measure_orders(cupy, sampler, budget_s, rounds)
            if not note:
                numpy_sampler = StratifiedPatching(
                    case.data_shapes, case.patch_size, seed=1, backend="numpy"
                )
                set_uniform_probability(numpy_sampler, case)
                result["same"] = compare_orders(sampler, numpy_sampler, ORDER_CHECK_EPOCH)
                del numpy_sampler
        except cupy.cuda.memory.OutOfMemoryError:
            free_device_memory(cupy)
            skip("skipped: out of device memory")
            continue
        results.append(result)
        emit(*(markdown_row(row) for row in order_rows(case, result, note)))
        free_device_memory(cupy)
    del sampler
    free_device_memory(cupy)
    return results


def orders_intro(rounds: int, checked: int) -> list[str]:
    """The heading, the explanation and the header of the shuffled-and-sharded table."""
    sizes = " and ".join(f"{w}" for w in ORDER_WORLD_SIZES)
    return [
        "",
        "## Shuffled and sharded epochs (gpu-patching, CUDA backend)",
        "",
        f"`sample_epoch(k)`, `sample_epoch(k, shuffle=True)` and `sample_epoch(k, shuffle=True, "
        f"rank={ORDER_RANK}, world_size=w)` for w = {sizes}; the cases are built as for the "
        f"throughput (one sample, uniform p). Medians of {rounds} bursts of back-to-back calls "
        f"per kind (CUDA events around the burst, per call), the kinds timed in turns. "
        f"'Per patch' compares costs per "
        f"row with the plain epoch's, as `bench_cpu.py` does for the NumPy backend; a shard is "
        f"also compared with a plain draw of as many rows (the first ones, through the backend), "
        f"which leaves out the fixed cost of a call. Launches per call: "
        f"`CudaBackend.launch_count` over every call timed. Same rows as NumPy: every column "
        f"of epoch {ORDER_CHECK_EPOCH} against the NumPy backend's, for the "
        f"~{checked:,}-patch case.",
        "",
        *markdown_table(ORDER_HEADER, [], "lrlrrrrrrl"),
    ]


def order_check_note(
    session: Session, case: Case, checked: int, n_patches: int, numpy_per_patch: float, left: float
) -> str:
    """Why a shuffled-and-sharded case is not compared with NumPy ('' when it is)."""
    # The NumPy side draws each kind once (a shuffle costs more than a plain epoch).
    estimate = max(numpy_per_patch, NUMPY_FALLBACK_PER_PATCH) * n_patches * 6
    if case.target_patches != checked:
        return "not checked (larger case)"
    return numpy_skip_reason(session, n_patches, estimate, left)


def updates_section(session: Session) -> tuple[dict[str, float], str]:
    """Measure and emit the table updates at the run's largest region set."""
    region_sets = QUICK_REGION_SETS if session.args.quick else REGION_SETS
    label, shapes, patch = region_sets[-1]
    update_label = f"{label} ({count_regions(shapes, patch):,}) regions"
    repeats = 5 if session.args.quick else 20
    gpu = measure_updates(session.backend, shapes, patch, repeats, session.cupy)
    free_device_memory(session.cupy)
    host = (
        None
        if session.args.no_numpy
        else measure_updates("numpy", shapes, patch, max(3, repeats // 4))
    )
    session.report.emit(
        "",
        f"## Table updates at {update_label}",
        "",
        "`perf_counter` around the call plus a stream synchronize, median. 5% of the cells "
        "are excluded (the same cells each repeat: the sample is rebuilt every time); the "
        "probabilities alternate between two dense arrays. *Backend's memory*: a CuPy array "
        "on the GPU, a NumPy array on NumPy.",
        "",
        *markdown_table(UPDATE_HEADER, update_rows(gpu, host), "lrrrl"),
    )
    return gpu, update_label


def targets_section(
    session: Session,
    output: Path | None,
    throughput: Throughput,
    launches: float | None,
    orders: Sequence[dict[str, Any]],
    updates: tuple[dict[str, float], str],
    keep: bool = False,
) -> list[str]:
    """Write the report with its targets table; count launches with CUPTI; write it again.

    The first write keeps the measurements should the profiler probe (a child
    process) not come back. With ``keep`` (``--write-results``), the old
    file's sections this run did not redo stay.
    """
    gpu_updates, update_label = updates

    def targets(probe: dict[str, Any] | None) -> list[str]:
        summary = [
            "",
            "## Targets",
            "",
            *targets_table(
                throughput.roofline,
                throughput.latency,
                gpu_updates,
                update_label,
                launches,
                probe,
                orders,
            ),
        ]
        session.report.write(output, summary, keep=keep)
        return summary

    targets(None)
    probe = None
    if not session.args.no_torch_profile:
        print("\ncounting launches with torch.profiler in a child process ...", flush=True)
        timeout = max(30.0, min(PROBE_TIMEOUT_S, session.left(-150.0)))
        probe = run_launch_probe(timeout, session.backend)
    return targets(probe)


def run(args: argparse.Namespace, cupy: Any, backend: str = "cuda") -> str:
    """Measure everything, print the tables as they come, write the report; return it."""
    session = Session(args, cupy, Report(), backend)
    info = device_info(cupy)
    quick = "-quick" if args.quick else ""
    output, keep = destination(args, RESULTS_DIR / f"gpu-{slug(info['name'])}{quick}.md")
    session.report.emit(
        f"# GPU benchmark: gpu-patching CUDA backend ({info['name']})", "", *device_lines(info)
    )
    first_call_section(session)
    copy_roof, fill_roof = bandwidth_measure_section(session)
    throughput = throughput_section(session, copy_roof, fill_roof)
    launches = latency_section(session, throughput.latency)
    orders = orders_section(session, throughput.gpu_per_patch, throughput.numpy_per_patch)
    updates = updates_section(session)
    summary = targets_section(session, output, throughput, launches, orders, updates, keep)
    print("\n".join(summary))
    if output is not None:
        print(f"\nwritten to {output}")
    return session.report.text(summary)


def main(argv: list[str] | None = None) -> int:
    # --write-results names the card's own file, gpu-<card>.md.
    parser = script_parser(
        __doc__, RESULTS_DIR / "gpu-<card>.md", "small sizes only, fewer repeats"
    )
    parser.add_argument(
        "--numpy-max-patches",
        type=int,
        default=NUMPY_MAX_PATCHES,
        help="skip the NumPy comparison above this many patches",
    )
    parser.add_argument("--no-numpy", action="store_true", help="skip the NumPy comparison")
    parser.add_argument(
        "--time-budget",
        type=float,
        default=TIME_BUDGET_S,
        help="seconds the whole run may take; throughput cases that would overrun are skipped",
    )
    parser.add_argument(
        "--epoch-budget",
        type=float,
        default=None,
        metavar="S",
        help=f"seconds of GPU time per throughput case (default {EPOCH_BUDGET_S:g}, "
        f"{QUICK_EPOCH_BUDGET_S:g} with --quick)",
    )
    parser.add_argument(
        "--no-torch-profile",
        action="store_true",
        help="skip counting launches with torch.profiler (CUPTI)",
    )
    parser.add_argument(
        "--profile-epochs",
        type=int,
        default=None,
        metavar="N",
        help="only draw N epochs of the first end-to-end case between cudaProfilerStart and "
        "cudaProfilerStop (run it under `ncu --profile-from-start off`) and print the "
        "backend's launch count",
    )
    parser.add_argument(
        "--count-ncu",
        type=Path,
        default=None,
        metavar="CSV",
        help="print the launches per epoch in the CSV that `ncu --csv` wrote for "
        "--profile-epochs (with --epochs and --launch-count)",
    )
    parser.add_argument(
        "--epochs",
        type=int,
        default=5,
        help="epochs profiled (--count-ncu; the log's own PROFILED_EPOCHS line wins)",
    )
    parser.add_argument("--launch-count", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--launch-probe", action="store_true", help=argparse.SUPPRESS)
    # The tests run the probe and the profiled epochs on the NumPy backend.
    parser.add_argument(
        "--backend", default="cuda", choices=("cuda", "numpy"), help=argparse.SUPPRESS
    )
    args = parser.parse_args(argv)
    if args.epochs < 1 or (args.profile_epochs is not None and args.profile_epochs < 1):
        parser.error("--epochs and --profile-epochs need at least 1 epoch")

    if args.launch_probe:
        try:
            probe = launch_probe(args.backend)
        except Exception as error:  # the parent reports it as one line
            probe = {"error": f"{type(error).__name__}: {error}"}
        print(PROBE_PREFIX + json.dumps(probe), flush=True)
        print(probe_text(probe))  # for a person reading the log
        return 0
    if args.count_ncu is not None:
        log = args.count_ncu.read_text()
        epochs, launch_count = args.epochs, args.launch_count
        drawn_lines = [line for line in log.splitlines() if line.startswith(PROFILE_PREFIX)]
        if drawn_lines:  # the --profile-epochs line of the same run says what was drawn
            drawn = json.loads(drawn_lines[-1][len(PROFILE_PREFIX) :])
            epochs, launch_count = drawn["epochs"], drawn["launch_count"]
        print(ncu_summary(count_ncu_kernels(log), epochs, launch_count))
        return 0

    if args.backend == "cuda":
        cupy, why = usable_cupy()
        if cupy is None:
            print(f"{why}; skipping the GPU benchmark")
            return 0
    if args.profile_epochs is not None:
        profiled = profile_epochs(args.backend, args.profile_epochs)
        print(PROFILE_PREFIX + json.dumps(profiled), flush=True)
        return 0
    if args.backend != "cuda":
        parser.error("--backend numpy is for --launch-probe and --profile-epochs only")
    run(args, cupy)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
