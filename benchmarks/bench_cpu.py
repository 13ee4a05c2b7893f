"""CPU benchmark: gpu-patching's NumPy backend side by side with the reference.

Both implementations run in this one process on the same shapes:

* ``setup``: building the sampler;
* ``epoch``: every patch of one epoch. Ours is one ``sample_epoch`` call; the
  reference has only the per-patch path, so its epoch is its measured cost per
  ``get_patch_spec`` call times the number of patches. Our first epoch of a
  new sampler also builds the NumPy backend's draw index, and the first epoch
  after an update refreshes it: both are shown too;
* ``per call``: ``get_patch_spec`` amortised over a whole epoch (ours includes
  the epoch computation it serves calls from);
* ``exclude 5%``: ``exclude_patches`` with 5% of one sample's grid cells.

The ratios are reference time / our time. A second table shows our cost per
region from ~1k to ~1M regions (it should be flat). A third compares a plain
epoch with a shuffled one and with one rank's share of a shuffled epoch
sharded over 4 ranks (the target: shuffling and sharding cost less than 20%
over the plain epoch, per patch). Run it with
``python benchmarks/bench_cpu.py`` (``--quick`` for a smoke run, ``--no-reference``
without CAREamics); the tables are printed; ``--write-results`` writes them into
``benchmarks/results/cpu.md`` (keeping the sections this run did not redo),
``--output FILE`` into FILE.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import numpy as np
from _report import (
    RESULTS_DIR,
    Report,
    finish,
    fmt_overhead,
    fmt_ratio,
    fmt_time,
    in_turns,
    machine_line,
    markdown_row,
    markdown_table,
    median_time,
    reference_or_reason,
    script_parser,
    time_once,
)

from gpu_patching import StratifiedPatching

# (label, data_shapes, patch_size): ~1k, ~66k and ~264k regions.
CASES = [
    ("~1k regions: 2500x1690, 64x64", [(1, 1, 2500, 1690)], (64, 64)),
    ("~66k regions: 10000x6760, 32x32", [(1, 1, 10000, 6760)], (32, 32)),
    ("~264k regions: 4 x 10000x6760, 32x32", [(4, 1, 10000, 6760)], (32, 32)),
]
# Our cost per region, ~1k to ~1M regions.
SCALING = [
    ("1k", [(1, 1, 2048, 2048)], (64, 64)),
    ("16k", [(1, 1, 4096, 4096)], (32, 32)),
    ("66k", [(1, 1, 10000, 6760)], (32, 32)),
    ("264k", [(4, 1, 10000, 6760)], (32, 32)),
    ("1M", [(16, 1, 8192, 8192)], (32, 32)),
]
# Shuffled and sharded epochs: ~66k and ~264k regions.
ORDER_CASES = CASES[1:]
ORDER_WORLD_SIZE = 4
RESULTS = RESULTS_DIR / "cpu.md"


def five_percent(sampler: Any, seed: int = 0) -> list[tuple[int, ...]]:
    cells = sampler.get_all_grid_coords()[(0, 0)]
    pick = np.random.default_rng(seed).choice(len(cells), len(cells) // 20, replace=False)
    return [cells[i] for i in sorted(pick)]


def measure_ours(shapes: list, patch: tuple, repeats: int) -> dict[str, float]:
    setup = median_time(
        lambda _k: StratifiedPatching(shapes, patch, seed=1, backend="numpy"), repeats
    )
    sampler = StratifiedPatching(shapes, patch, seed=1, backend="numpy")
    n_patches = sampler.n_patches
    epoch = median_time(lambda _k: sampler.sample_epoch(3), repeats)

    def one_epoch_of_calls(_k: int) -> None:
        for index in range(n_patches):
            sampler.get_patch_spec(index)

    per_call = median_time(one_epoch_of_calls, max(1, repeats // 3)) / n_patches
    cells = five_percent(sampler)

    def exclude() -> None:
        fresh = StratifiedPatching(shapes, patch, seed=1, backend="numpy")
        start = time.perf_counter()
        fresh.sample_epoch(0)  # a new sampler's first epoch builds the draw index
        first_epochs.append(time.perf_counter() - start)
        start = time.perf_counter()
        fresh.exclude_patches(0, 0, cells)
        timings.append(time.perf_counter() - start)
        start = time.perf_counter()
        fresh.sample_epoch(1)  # the first epoch after an update refreshes it
        updated_epochs.append(time.perf_counter() - start)

    timings: list[float] = []
    first_epochs: list[float] = []
    updated_epochs: list[float] = []
    for _ in range(max(3, repeats // 2)):
        exclude()
    return {
        "n_patches": n_patches,
        "regions": sum(len(v) for v in sampler.get_all_grid_coords().values()),
        "setup": setup,
        "epoch": epoch,
        "first_epoch": statistics.median(first_epochs),
        "updated_epoch": statistics.median(updated_epochs),
        "per_call": per_call,
        "exclude": statistics.median(timings),
    }


def measure_reference(reference: Any, shapes: list, patch: tuple, calls: int) -> dict[str, float]:
    setup, sampler = time_once(lambda: reference(shapes, list(patch), seed=1))
    n_patches = sampler.n_patches
    indices = np.random.default_rng(0).integers(0, n_patches, calls)
    sampler.get_patch_spec(int(indices[0]))
    per_call, _ = time_once(lambda: [sampler.get_patch_spec(int(i)) for i in indices])
    per_call /= calls
    cells = five_percent(sampler)
    exclude, _ = time_once(lambda: sampler.exclude_patches(0, 0, cells))
    return {
        "n_patches": n_patches,
        "setup": setup,
        "epoch": per_call * n_patches,
        # The reference has no per-epoch state: every epoch costs the same.
        "first_epoch": per_call * n_patches,
        "updated_epoch": per_call * n_patches,
        "per_call": per_call,
        "exclude": exclude,
    }


def measure_orders(shapes: list, patch: tuple, repeats: int) -> dict[str, Any]:
    """Median epoch times: plain, shuffled, and one rank of a shuffled 4-rank shard.

    The variants are timed in turns, so that drifts of the machine's speed
    touch all three alike.
    """
    sampler = StratifiedPatching(shapes, patch, seed=1, backend="numpy")
    variants: dict[str, dict[str, Any]] = {
        "plain": {},
        "shuffled": {"shuffle": True},
        "sharded": {"shuffle": True, "rank": 1, "world_size": ORDER_WORLD_SIZE},
    }
    rows = {name: len(sampler.sample_epoch(3, **options)) for name, options in variants.items()}
    times = in_turns(
        {
            name: lambda k, options=options: sampler.sample_epoch(3 + k, **options)
            for name, options in variants.items()
        },
        repeats,
    )
    return {
        "n_patches": sampler.n_patches,
        "rows": rows,
        **{name: statistics.median(values) for name, values in times.items()},
    }


CASE_ROWS = (
    ("setup", "setup"),
    ("epoch", "epoch (all patches)"),
    ("first_epoch", "first epoch of a new sampler"),
    ("updated_epoch", "epoch right after an exclusion"),
    ("per_call", "get_patch_spec, per call"),
    ("exclude", "exclude 5% of cells"),
)
CASE_HEADER = ["case", "patches", "what", "reference", "gpu-patching (numpy)", "ratio"]
SCALING_HEADER = ["regions", "patches", "setup / region", "epoch / patch", "exclude 5% / region"]


def case_rows(label: str, ours: dict[str, Any], theirs: dict[str, Any] | None) -> list[list[str]]:
    """Rows of the main table for one case: each measurement, reference / ours."""
    rows = [
        [
            label,
            f"{ours['n_patches']:,}",
            what,
            fmt_time(theirs[key]) if theirs else "n/a",
            fmt_time(ours[key]),
            fmt_ratio(theirs[key], ours[key]) if theirs else "n/a",
        ]
        for key, what in CASE_ROWS
    ]
    if theirs:
        rows.append(
            [
                label,
                "",
                "epoch cost per patch",
                fmt_time(theirs["per_call"]),
                fmt_time(ours["epoch"] / ours["n_patches"]),
                fmt_ratio(theirs["per_call"] * ours["n_patches"], ours["epoch"]),
            ]
        )
    return rows


def scaling_row(label: str, ours: dict[str, Any]) -> list[str]:
    """One row of the cost-per-region table."""
    regions = ours["regions"]
    return [
        f"{label} ({regions:,})",
        f"{ours['n_patches']:,}",
        fmt_time(ours["setup"] / regions),
        fmt_time(ours["epoch"] / ours["n_patches"]),
        fmt_time(ours["exclude"] / regions),
    ]


def order_header() -> list[str]:
    return [
        "case",
        "patches",
        "plain epoch",
        "shuffled epoch",
        "shuffled, per patch",
        f"shuffled shard (1 of {ORDER_WORLD_SIZE})",
        "shard, per patch",
    ]


def order_row(label: str, orders: dict[str, Any]) -> list[str]:
    """One row of the shuffled-and-sharded table: times and costs per patch over plain."""
    per_row = {name: orders[name] / orders["rows"][name] for name in orders["rows"]}
    return [
        label,
        f"{orders['n_patches']:,}",
        fmt_time(orders["plain"]),
        fmt_time(orders["shuffled"]),
        fmt_overhead(per_row["shuffled"] / per_row["plain"] - 1),
        fmt_time(orders["sharded"]),
        fmt_overhead(per_row["sharded"] / per_row["plain"] - 1),
    ]


def main(argv: list[str] | None = None) -> str:
    parser = script_parser(__doc__, RESULTS, "small shapes, few repeats", reference=True)
    args = parser.parse_args(argv)

    cases = CASES[:1] if args.quick else CASES
    scaling = SCALING[:2] if args.quick else SCALING
    order_cases = CASES[:1] if args.quick else ORDER_CASES
    repeats = 3 if args.quick else 15
    reference, why_not = reference_or_reason(not args.no_reference)
    if reference is None and not args.no_reference:
        print(f"reference not available ({why_not}); showing gpu-patching only")

    report = Report()
    report.emit(
        "# CPU benchmark: NumPy backend vs the reference (CAREamics 0.3.5)",
        "",
        machine_line(),
        "",
        "Times are medians (ours) or single runs (reference).",
        "",
        *markdown_table(CASE_HEADER, [], "lrlrrr"),
    )
    for label, shapes, patch in cases:
        ours = measure_ours(shapes, patch, repeats)
        theirs = (
            measure_reference(reference, shapes, patch, calls=200 if args.quick else 400)
            if reference is not None
            else None
        )
        report.emit(*(markdown_row(row) for row in case_rows(label, ours, theirs)))

    report.emit(
        "",
        "## Cost per region (gpu-patching, NumPy backend)",
        "",
        *markdown_table(SCALING_HEADER, [], "rrrrr"),
    )
    for label, shapes, patch in scaling:
        ours = measure_ours(shapes, patch, max(3, repeats // 3))
        report.emit(markdown_row(scaling_row(label, ours)))

    report.emit(
        "",
        "## Shuffled and sharded epochs (gpu-patching, NumPy backend)",
        "",
        f"Medians of {repeats} epochs of each kind, timed in turns. The shard is rank 1 of "
        f"{ORDER_WORLD_SIZE} (a quarter of the rows); 'per patch' compares costs per row "
        "with the plain epoch's.",
        "",
        *markdown_table(order_header(), [], "lrrrrrr"),
    )
    for label, shapes, patch in order_cases:
        report.emit(markdown_row(order_row(label, measure_orders(shapes, patch, repeats))))

    return finish(report, args, RESULTS)


if __name__ == "__main__":
    main()
