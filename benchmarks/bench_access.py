"""``get_patch_spec`` in any access order: ours and the reference side by side.

A dataset's item ``i`` calls ``get_patch_spec(i)``, and the loader's sampler
decides the order of the ``i``: sequential, shuffled once per pass, drawn with
replacement (``RandomSampler(replacement=True)``), weighted
(``WeightedRandomSampler``), or, at worst, one index over and over. The draw
number of a call is ``base + calls[i]``, so with replacement the call counts
drift apart and consecutive calls need patches of many different epochs.

For each order and size this measures the mean cost per call over a long run
of calls on a fresh sampler (every refill of our cache included), ours and
CAREamics 0.3.5's ``StratifiedPatching`` (the reference, fewer calls: it costs
50-600 us per call) in one process, on the same order of indices. A second
table measures what the per-sampler lock costs the single-threaded path: the
same sequential and with-replacement runs with the lock swapped for a no-op.

Run it with ``python benchmarks/bench_access.py`` (``--quick`` for a small
smoke run, ``--no-reference`` without CAREamics, ``--gpu-only`` for the
GPU table alone). A GPU table runs the same orders on ``backend="cuda"`` (the
CUDA backend's per-index path) beside the NumPy backend, in turns, when CuPy
and a CUDA device are usable; otherwise it says why. The tables are
printed; ``--write-results`` writes them into ``benchmarks/results/access.md``
(keeping the sections this run did not redo), ``--output FILE`` into FILE.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
from _report import (
    RESULTS_DIR,
    Report,
    finish,
    fmt_ratio,
    fmt_time,
    in_turns,
    load_line,
    machine_line,
    markdown_table,
    reference_or_reason,
    script_parser,
    usable_cupy,
)

from gpu_patching import StratifiedPatching

# (label, data_shapes, patch_size, reference?): ~1k to ~1M regions.
CASES = [
    ("~1k: 2048x2048, 64x64", [(1, 1, 2048, 2048)], (64, 64), True),
    ("~66k: 10000x6760, 32x32", [(1, 1, 10000, 6760)], (32, 32), True),
    ("~264k: 4 x 10000x6760, 32x32", [(4, 1, 10000, 6760)], (32, 32), True),
    # The reference needs about a minute to build this one: ours only.
    ("~1M: 16 x 8192x8192, 32x32", [(16, 1, 8192, 8192)], (32, 32), False),
]
QUICK_CASES = [
    ("~1k: 2048x2048, 64x64", [(1, 1, 2048, 2048)], (64, 64), True),
    ("~16k: 4096x4096, 32x32", [(1, 1, 4096, 4096)], (32, 32), False),
]
ORDERS = ["sequential", "shuffled", "with replacement", "weighted", "one index"]
TARGET_PER_CALL = 5e-6
RESULTS = RESULTS_DIR / "access.md"
#: Where ``--gpu-only --write-results`` writes (the CPU tables of access.md stay).
GPU_RESULTS = RESULTS_DIR / "access-gpu.md"
#: The backend of the GPU table's second column (tests run the table on "numpy").
GPU_BACKEND = "cuda"
GPU_HEADING = "## get_patch_spec on the CUDA backend"


def make_order(kind: str, n_patches: int, n_calls: int, seed: int = 0) -> list[int]:
    """Return ``n_calls`` patch indices in the given order."""
    generator = np.random.default_rng(seed)
    if kind == "sequential":
        return (np.arange(n_calls) % n_patches).tolist()
    if kind == "shuffled":
        passes = -(-n_calls // n_patches)
        order = np.concatenate([generator.permutation(n_patches) for _ in range(passes)])
        return order[:n_calls].tolist()
    if kind == "with replacement":
        return generator.integers(0, n_patches, n_calls).tolist()
    if kind == "weighted":
        # Heavy-tailed weights, as a WeightedRandomSampler over rare classes.
        weights = generator.pareto(1.0, n_patches) + 0.01
        return generator.choice(n_patches, n_calls, p=weights / weights.sum()).tolist()
    if kind == "one index":
        return [n_patches // 2] * n_calls
    raise ValueError(f"unknown order {kind!r}")


def per_call(sampler: Any, order: list[int]) -> float:
    """Mean seconds per ``get_patch_spec`` call over ``order``."""
    get = sampler.get_patch_spec
    start = time.perf_counter()
    for index in order:
        get(index)
    return (time.perf_counter() - start) / len(order)


def call_each(sampler: Any, order: list[int]) -> None:
    """``get_patch_spec(i)`` for each ``i`` of ``order``, untimed."""
    get = sampler.get_patch_spec
    for index in order:
        get(index)


def measure_side_by_side(
    ours: Any, theirs: Any, order: list[int], reference_calls: int, turns: int = 10
) -> tuple[float, float | None]:
    """Mean seconds per call of both samplers on ``order``, in alternating turns.

    Each sampler takes its calls in ``turns`` slices, one slice of ours, then
    one of the reference's, and so on (``in_turns``), so that both see the same
    load on a shared machine; ours takes the whole order, the reference its
    first ``reference_calls`` indices.
    """
    ours_step = -(-len(order) // turns)
    theirs_step = -(-reference_calls // turns)
    ours_pieces = [order[k * ours_step : (k + 1) * ours_step] for k in range(turns)]
    theirs_pieces = [
        order[k * theirs_step : min((k + 1) * theirs_step, reference_calls)] for k in range(turns)
    ]
    sides = {"ours": lambda k: call_each(ours, ours_pieces[k])}
    if theirs is not None:
        sides["reference"] = lambda k: call_each(theirs, theirs_pieces[k])
    times = in_turns(sides, turns)
    theirs_time = None
    if theirs is not None:
        theirs_time = sum(times["reference"]) / min(reference_calls, len(order))
    return sum(times["ours"]) / len(order), theirs_time


def measure_lock(
    shapes: list[Any], patch: tuple[int, ...], orders: dict[str, list[int]], rounds: int
) -> dict[str, tuple[float, float]]:
    """Per call on one thread, without and with the lock, best of ``rounds`` in turns.

    A sampler used by one thread only takes no lock; once a second thread has
    used it, every call does (``_owner`` cleared, as that thread would).
    """
    results = {}
    for kind in ("sequential", "with replacement"):
        best: dict[bool, float] = {True: float("inf"), False: float("inf")}
        for _ in range(rounds):
            for locked in (False, True):
                sampler = StratifiedPatching(shapes, patch, seed=1, backend="numpy")
                if locked:
                    sampler._owner = None
                best[locked] = min(best[locked], per_call(sampler, orders[kind]))
        results[kind] = (best[False], best[True])
    return results


def run(cases: list[Any], calls: int, reference_calls: int, use_reference: bool) -> Report:
    report = Report()
    reference, why_not = reference_or_reason(use_reference)
    report.emit(
        "# get_patch_spec in any access order: ours vs the reference (CAREamics 0.3.5)",
        "",
        machine_line(),
        "",
        f"Mean cost per call over a run of calls on a fresh sampler (ours: up to "
        f"{calls:,} calls, at least one pass; reference: the first {reference_calls:,} "
        "calls of the same order), the two taking turns in ten slices each so that "
        "they see the same load. Ours includes every refill of its cache of upcoming "
        "patches. "
        f"Target: at most {fmt_time(TARGET_PER_CALL)} per call in every order.",
        "",
        f"At the start: {load_line()} (the machine is shared: both columns slow "
        "down alike, so compare ratios; the reference's quiet-machine costs per call are "
        "in cpu.md).",
        "",
    )
    # One-time costs of the process (imports, first NumPy calls) are not a call's.
    warm = StratifiedPatching([(1, 1, 256, 256)], (16, 16), seed=1, backend="numpy")
    for kind in ORDERS:
        per_call(warm, make_order(kind, warm.n_patches, 2000))
    header = ["case", "patches", "order", "reference", "gpu-patching (numpy)", "ratio", "target"]
    rows = []
    lock_rows = []
    for label, shapes, patch, with_reference in cases:
        n_patches = StratifiedPatching(shapes, patch, seed=1, backend="numpy").n_patches
        n_calls = max(calls, n_patches) if calls >= n_patches // 4 else calls
        orders = {kind: make_order(kind, n_patches, n_calls) for kind in ORDERS}
        ours: dict[str, float] = {}
        theirs: dict[str, float] = {}
        for kind, order in orders.items():
            sampler = StratifiedPatching(shapes, patch, seed=1, backend="numpy")
            baseline = None
            if reference is not None and with_reference:
                baseline = reference(shapes, list(patch), seed=1)
            mine, other = measure_side_by_side(sampler, baseline, order, reference_calls)
            ours[kind] = mine
            if other is not None:
                theirs[kind] = other
        for kind in ORDERS:
            rows.append(
                [
                    label,
                    f"{n_patches:,}",
                    kind,
                    fmt_time(theirs.get(kind)),
                    fmt_time(ours[kind]),
                    fmt_ratio(theirs.get(kind), ours[kind]),
                    "yes" if ours[kind] <= TARGET_PER_CALL else "NO",
                ]
            )
            print(" | ".join(rows[-1]), flush=True)
        lock = measure_lock(shapes, patch, orders, rounds=3)
        for kind, (alone, shared) in lock.items():
            lock_rows.append(
                [label, kind, fmt_time(alone), fmt_time(shared), f"{(shared - alone) / alone:+.0%}"]
            )
    report.emit(*markdown_table(header, rows, "lrlrrrl"), "", f"At the end: {load_line()}.", "")
    if reference is None:
        report.emit(f"The reference did not run: {why_not}.", "")
    report.emit(
        "## The lock, on one thread",
        "",
        "A sampler that only the thread that built it has used takes no lock in "
        "get_patch_spec; once another thread has used it, every call takes the lock "
        "(so that concurrent callers see some serial order of their calls). The same "
        "runs on one thread in both modes: best of 3, in turns.",
        "",
        *markdown_table(
            ["case", "order", "one thread (no lock)", "after a second thread (lock)", "cost"],
            lock_rows,
            "llrrr",
        ),
    )
    return report


def gpu_section(report: Report, cases: list[Any], calls: int, cupy: Any, why: str) -> None:
    """The GPU table: ``get_patch_spec`` per call on the CUDA backend beside the NumPy one.

    The same cases, orders and table shape as the CPU table, with the NumPy
    backend in the place of the reference; the two take turns in ten slices
    (``measure_side_by_side``). Without a usable device it says why instead.
    """
    report.emit(GPU_HEADING, "")
    if cupy is None:
        report.emit(f"Not run: {why}.", "")
        return
    report.emit(
        "Mean cost per call of get_patch_spec on a fresh sampler of each backend: the "
        "CUDA backend's per-index path (every refill of its cache included) beside the "
        f"NumPy backend's, on the same order of up to {calls:,} calls (at least one "
        "pass), taking turns in ten slices. "
        f"{load_line()}.",
        "",
    )
    rows = []
    for label, shapes, patch, _ in cases:
        n_patches = StratifiedPatching(shapes, patch, seed=1, backend="numpy").n_patches
        n_calls = max(calls, n_patches) if calls >= n_patches // 4 else calls
        for kind in ORDERS:
            order = make_order(kind, n_patches, n_calls)
            device = StratifiedPatching(shapes, patch, seed=1, backend=GPU_BACKEND)
            host = StratifiedPatching(shapes, patch, seed=1, backend="numpy")
            on_device, on_host = measure_side_by_side(device, host, order, len(order))
            assert on_host is not None  # the NumPy side always runs
            rows.append(
                [
                    label,
                    f"{n_patches:,}",
                    kind,
                    fmt_time(on_host),
                    fmt_time(on_device),
                    fmt_ratio(on_host, on_device, 2),
                    "yes" if on_device <= TARGET_PER_CALL else "NO",
                ]
            )
    header = ["case", "patches", "order", "gpu-patching (numpy)", "gpu-patching (cuda)"]
    report.emit(*markdown_table([*header, "ratio", "target"], rows, "lrlrrrl"), "")


def main(argv: list[str] | None = None) -> str:
    parser = script_parser(__doc__, RESULTS, "small cases, few calls", reference=True, gpu=True)
    args = parser.parse_args(argv)
    cases, calls, reference_calls = (
        (QUICK_CASES, 3000, 200) if args.quick else (CASES, 200_000, 1_000)
    )
    cupy, why = usable_cupy()
    if args.gpu_only:
        report = Report()
        report.emit("# get_patch_spec in any access order on the GPU", "", machine_line(), "")
        gpu_section(report, cases, calls, cupy, why)
        return finish(report, args, GPU_RESULTS)
    report = run(cases, calls, reference_calls, not args.no_reference)
    report.emit("")
    gpu_section(report, cases, calls, cupy, why)
    return finish(report, args, RESULTS)


if __name__ == "__main__":
    main()
