"""Memory benchmark: peak resident memory per region of each operation, in fresh processes.

Every measurement runs in a process of its own, which imports NumPy and
gpu-patching (and, for the reference, CAREamics' ``StratifiedPatching``),
notes its resident memory (the baseline), builds a sampler, runs the steps
that come before the measured operation, resets the kernel's peak counter
(``/proc/self/clear_refs``) and runs the operation. Its figure is the peak
resident memory while the operation ran (``VmHWM``, which includes what the
sampler already held) minus the baseline, per grid cell (sampling region) of
the sampler.

Operations (gpu-patching, NumPy backend):

* ``construct``: building the sampler;
* ``exclude 5%``: ``exclude_patches`` with a dense mask of 5% of the cells;
* ``set_region_probs``: a dense probability array for every cell;
* ``first epoch``: ``sample_epoch`` right after the updates (it also builds
  the draw index); ``epoch``: the next one; ``shuffled epoch``;
* ``first get_patch_spec``: the first call (it fills the per-index cache of
  upcoming patches); ``1,000 get_patch_spec``: the calls after it.

The reference (CAREamics 0.3.5, loaded without its dependencies) is measured
at the sizes it builds in reasonable time: construction, the same exclusion
(as coordinates), the first ``get_patch_spec`` and 1,000 calls (it has no
epoch call). Run ``python benchmarks/bench_memory.py`` (``--quick``: 1M
regions only, no reference). On a usable CUDA device a second table gives the
device memory of the same operations on ``backend="cuda"`` (CuPy's memory
pool: its high-water mark over the operation and what stays in use after it);
``--gpu-only`` runs that table alone. The tables are
printed; ``--write-results`` writes them into ``benchmarks/results/memory.md``,
``--output FILE`` into FILE. Linux
only (``/proc``).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from _report import (
    PROC_MEMORY,
    RESULTS_DIR,
    Report,
    finish,
    machine_line,
    markdown_row,
    markdown_table,
    run_child,
    script_parser,
    usable_cupy,
)

from gpu_patching import StratifiedPatching

RESULTS = RESULTS_DIR / "memory.md"
#: Where ``--gpu-only --write-results`` writes (memory.md's host tables stay).
GPU_RESULTS = RESULTS_DIR / "memory-gpu.md"
#: The backend of the device table (tests run its code on "numpy").
GPU_BACKEND = "cuda"
GPU_HEADING = "## gpu-patching (CUDA backend): device memory"
#: The issue's target: peak resident memory per region.
TARGET_BYTES_PER_REGION = 100

# (label, data_shapes, patch_size): ours at 1M and 10M regions, 2D and 3D,
# and several samples (whose epochs carry per-row stack and sample numbers).
CASES = [
    ("2D, 1M regions: 16384x16384, 16x16", [(1, 1, 16384, 16384)], (16, 16)),
    ("2D, 1M regions: 16 x 4096x4096, 16x16", [(16, 1, 4096, 4096)], (16, 16)),
    ("3D, 1M regions: 800^3, 8^3", [(1, 1, 800, 800, 800)], (8, 8, 8)),
    ("2D, 10M regions: 51200x51200, 16x16", [(1, 1, 51200, 51200)], (16, 16)),
    ("3D, 10M regions: 1720^3, 8^3", [(1, 1, 1720, 1720, 1720)], (8, 8, 8)),
]
QUICK_CASES = CASES[:3]
# Side by side with the reference, at sizes it builds in seconds to a minute.
REFERENCE_CASES = [
    ("2D, ~66k regions: 10000x6760, 32x32", [(1, 1, 10000, 6760)], (32, 32)),
    ("2D, ~264k regions: 4 x 10000x6760, 32x32", [(4, 1, 10000, 6760)], (32, 32)),
]
SMALL_SAMPLERS_NOTE = (
    "At these sizes our figures include what small samplers keep for speed (samplers of "
    "at most 2**19 patches keep the draw-independent parts of their epoch chunks, the first "
    "Philox rounds and the strata bounds: 56 bytes per patch, at most 28 MiB) and fixed-size "
    "blocks of the per-index cache: a few megabytes in all. From 2**19 patches on nothing of "
    "the kind is kept (the 1M and 10M rows above)."
)
OURS = [
    "construct",
    "exclude 5%",
    "set_region_probs",
    "first epoch",
    "epoch",
    "shuffled epoch",
    "first get_patch_spec",
    "1,000 get_patch_spec",
]
THEIRS = ["construct", "exclude 5%", "first get_patch_spec", "1,000 get_patch_spec"]

# The measuring process: argv[1] is a JSON {"shapes", "patch", "operation",
# "reference"}; it prints one JSON line {"regions", "peak", "held"}.
CHILD = (
    PROC_MEMORY
    + r"""
import json, sys
job = json.loads(sys.argv[1])
import numpy as np
from gpu_patching import StratifiedPatching
if job["reference"]:
    from gpu_patching.testing import load_reference
    build = load_reference()
else:
    def build(shapes, patch, seed):
        return StratifiedPatching(shapes, patch, seed, backend="numpy")
shapes = [tuple(shape) for shape in job["shapes"]]
patch = tuple(job["patch"])
ndim = len(patch)
cells = tuple((size + 1) // p for size, p in zip(shapes[0][2:], patch))
regions = sum(shape[0] * int(np.prod([(s + 1) // p for s, p in zip(shape[2:], patch)]))
              for shape in shapes)
# 5% of the first sample's cells, evenly spread (every 20th, row-major).
chosen = np.zeros(int(np.prod(cells)), dtype=bool)
chosen[::20] = True
chosen = chosen.reshape(cells)
baseline = status("VmRSS")
steps = {
    "construct": lambda: None,
    "exclude 5%": lambda s: s.exclude_patches(
        0, 0, chosen if not job["reference"] else [tuple(c) for c in np.argwhere(chosen)]
    ),
    "set_region_probs": lambda s: s.set_region_probs(
        0, 0, np.where(chosen, 0.25, 1.0)
    ),
    "first epoch": lambda s: s.sample_epoch(0),
    "epoch": lambda s: s.sample_epoch(1),
    "shuffled epoch": lambda s: s.sample_epoch(2, shuffle=True),
    "first get_patch_spec": lambda s: s.get_patch_spec(0),
    "1,000 get_patch_spec": lambda s: [s.get_patch_spec(i % s.n_patches) for i in range(1000)],
}
order = job["order"]
operation = job["operation"]
sampler = None
if operation == "construct":
    reset_peak()
    sampler = build(shapes, patch, 1)
else:
    sampler = build(shapes, patch, 1)
    for step in order[1 : order.index(operation)]:
        result = steps[step](sampler)
        del result
    reset_peak()
    result = steps[operation](sampler)
peak = status("VmHWM") - baseline
held = status("VmRSS") - baseline
print(json.dumps({"regions": regions, "peak": peak, "held": held}))
"""
)


def measure(shapes: list, patch: tuple, operation: str, reference: bool) -> dict[str, Any]:
    """Run one operation in a fresh process; return its figures."""
    job = {
        "shapes": shapes,
        "patch": patch,
        "operation": operation,
        "reference": reference,
        "order": THEIRS if reference else OURS,
    }
    return run_child(CHILD, job, f"measuring {operation} of {shapes}")


def per_region(figures: dict[str, Any] | None) -> str:
    if figures is None:
        return "n/a"
    return f"{figures['peak'] / figures['regions']:.0f}"


def device_steps(shapes: list[Any], patch: tuple[int, ...]) -> dict[str, Callable[[Any], Any]]:
    """The operations of :data:`OURS` on a sampler (the same arguments as the host child's)."""
    cells = tuple((size + 1) // p for size, p in zip(shapes[0][2:], patch, strict=True))
    chosen = np.zeros(int(np.prod(cells)), dtype=bool)
    chosen[::20] = True  # 5% of the first sample's cells, evenly spread
    chosen = chosen.reshape(cells)
    return {
        "construct": lambda _: StratifiedPatching(shapes, patch, 1, backend=GPU_BACKEND),
        "exclude 5%": lambda s: s.exclude_patches(0, 0, chosen),
        "set_region_probs": lambda s: s.set_region_probs(0, 0, np.where(chosen, 0.25, 1.0)),
        "first epoch": lambda s: s.sample_epoch(0),
        "epoch": lambda s: s.sample_epoch(1),
        "shuffled epoch": lambda s: s.sample_epoch(2, shuffle=True),
        "first get_patch_spec": lambda s: s.get_patch_spec(0),
        "1,000 get_patch_spec": lambda s: [s.get_patch_spec(i % s.n_patches) for i in range(1000)],
    }


def measure_device(cupy: Any, shapes: list[Any], patch: tuple[int, ...]) -> dict[str, Any]:
    """Device bytes of each operation of :data:`OURS`, in order, on one sampler.

    Before each operation the pool gives its cached blocks back, so that its
    total is what is in use; it keeps the blocks freed during the operation,
    so its total after the operation (its result still held) is the
    operation's high-water mark. ``peak``: that mark minus the bytes in use
    before; ``held``: the bytes in use once the result is dropped, minus
    those before (what the sampler keeps). Keys ``regions`` and one
    ``{"peak", "held"}`` per operation.
    """
    pool = cupy.get_default_memory_pool()
    steps = device_steps(shapes, patch)
    figures: dict[str, Any] = {}
    sampler = None
    for operation in OURS:
        pool.free_all_blocks()
        before = pool.used_bytes()
        result = steps[operation](sampler)
        cupy.cuda.Device().synchronize()
        peak = pool.total_bytes() - before
        if operation == "construct":
            sampler, result = result, None
        del result
        figures[operation] = {"peak": peak, "held": pool.used_bytes() - before}
    del sampler
    # Grid cells, counted as the host child counts them.
    figures["regions"] = sum(
        shape[0] * int(np.prod([(size + 1) // p for size, p in zip(shape[2:], patch, strict=True)]))
        for shape in shapes
    )
    pool.free_all_blocks()
    return figures


def gpu_section(report: Report, cases: list[Any], cupy: Any, why: str) -> None:
    """The device table: bytes per region of each operation on the CUDA backend, or why not."""
    report.emit(GPU_HEADING, "")
    if cupy is None:
        report.emit(f"Not run: {why}.", "")
        return
    report.emit(
        "Device bytes per region (grid cell) of the same operations on one sampler per "
        "case, in the order of the table, from CuPy's default memory pool: `peak` is the "
        "pool's high-water mark over the operation (cached blocks given back before it), "
        "`kept` what stays in use after it once its result is dropped. Host memory is "
        "the table above.",
        "",
        *markdown_table(
            ["case", "regions", "bytes per region", *OURS], [], "lrl" + "r" * len(OURS)
        ),
    )
    for label, shapes, patch in cases:
        figures = measure_device(cupy, shapes, patch)
        regions = figures["regions"]
        for key, what in (("peak", "peak"), ("held", "kept")):
            cells = [f"{figures[op][key] / regions:.0f}" for op in OURS]
            report.emit(markdown_row([label, f"{regions:,}", what, *cells]))
    report.emit("")


def main(argv: list[str] | None = None) -> str:
    parser = script_parser(
        __doc__, RESULTS, "1M regions only, no reference", reference=True, gpu=True
    )
    args = parser.parse_args(argv)
    cases = QUICK_CASES if args.quick else CASES
    cupy, why = usable_cupy()
    if args.gpu_only:
        report = Report()
        report.emit("# Memory benchmark: device memory per region", "", machine_line(), "")
        gpu_section(report, cases, cupy, why)
        return finish(report, args, GPU_RESULTS)
    if not Path("/proc/self/clear_refs").exists():
        raise SystemExit("bench_memory.py needs Linux's /proc/self/clear_refs")
    report = Report()
    report.emit(
        "# Memory benchmark: peak resident memory per region",
        "",
        machine_line(),
        "",
        "Each figure is one operation in a fresh process: the peak resident memory while it "
        "ran (VmHWM, reset just before it; it includes what the sampler already held) "
        "minus the process's memory after its imports, divided by the number of grid cells "
        "(sampling regions). The steps before an operation run in the same process, in the "
        f"order of the table. Target: at most {TARGET_BYTES_PER_REGION} bytes per region.",
        "",
        "## gpu-patching (NumPy backend)",
        "",
        *markdown_table(["case", "regions", *OURS], [], "lr" + "r" * len(OURS)),
    )
    worst = 0.0
    for label, shapes, patch in cases:
        figures = [measure(shapes, patch, operation, False) for operation in OURS]
        worst = max(worst, *(f["peak"] / f["regions"] for f in figures))
        regions = f"{figures[0]['regions']:,}"
        report.emit(markdown_row([label, regions, *(per_region(f) for f in figures)]))
    report.emit("", f"Largest figure: {worst:.0f} bytes per region.")

    if not (args.quick or args.no_reference):
        report.emit(
            "",
            "## Side by side with the reference (CAREamics 0.3.5)",
            "",
            "Bytes per region; the reference has no epoch call (an epoch is n_patches "
            "get_patch_spec calls).",
            "",
            *markdown_table(
                ["case", "regions", "operation", "reference", "gpu-patching (numpy)"],
                [],
                "lrlrr",
            ),
        )
        for label, shapes, patch in REFERENCE_CASES:
            for operation in THEIRS:
                theirs = measure(shapes, patch, operation, True)
                ours = measure(shapes, patch, operation, False)
                report.emit(
                    markdown_row(
                        [
                            label,
                            f"{ours['regions']:,}",
                            operation,
                            per_region(theirs),
                            per_region(ours),
                        ]
                    )
                )
        report.emit("", SMALL_SAMPLERS_NOTE)
    report.emit("")
    gpu_section(report, cases, cupy, why)
    return finish(report, args, RESULTS)


if __name__ == "__main__":
    main()
