"""CAREamics' training pipeline with its own sampler and with ours, side by side.

What a CAREamics user sees when gpu-patching's sampler replaces CAREamics'
``StratifiedPatching``: the same N2V configuration (mean/std
normalisation, flips and 90-degree rotations), the same arrays, one process.
CAREamics' side is built by ``careamics.dataset.factory.create_train_dataset``,
ours by :func:`gpu_patching.careamics.create_train_dataset` (our sampler from
the start, so the normalisation pass draws through it).

Data shapes (float32, random):

* one 2048x2048 image, 64x64 patches (~1k patches);
* one 10000x6760 image, 32x32 patches (~66k patches);
* one 64x1024x1024 stack, 16x64x64 patches (~1k patches, 3D);
* eight 2048x2048 images, 64x64 patches (~8k patches).

Columns, for each case and each sampler:

* ``build``: the dataset factory call, from arrays to dataset (loading,
  sampler, and the normalisation pass that constructs every patch once);
* ``item``: one ``dataset[i]`` (patch, normalisation, augmentation), indices
  in a shuffled order, mean over ``ITEMS`` calls;
* ``sampler``: one ``get_patch_spec(i)`` over the same indices, and its share
  of an item;
* ``DataLoader 0 / 2 workers``: patches per second of
  ``DataLoader(dataset, batch_size=32, shuffle=True, num_workers=k)`` (fork,
  CAREamics' ``default_collate``) over the ``BATCHES - 1`` batches after the
  first, and the time to the first batch (the workers' start-up);
* ``PatchLoader``: our :class:`~gpu_patching.PatchLoader` on the same arrays
  and sampler: patches cut out in batches, without CAREamics' normalisation or
  augmentation (so not the same work: what the crops alone cost).

End to end (``benchmarks/results/careamics-train.md``): seconds per epoch of
``CAREamist.train`` on one 2048x2048 image (64x64 patches, N2V's two-level
UNet, the same seeds), with CAREamics' sampler and with ours
(:func:`gpu_patching.careamics.using_gpu_patching`), and the time each epoch
spent in the sampler's ``get_patch_spec`` (timed around every call; the
DataLoader runs without workers here, so every call is in this process).

The machine has 2 cores: the worker rows show what two worker processes buy
there, not on a workstation. Run it with ``python benchmarks/bench_careamics.py``
(``--quick``: smaller images and fewer batches, for a smoke run; ``--train-only``:
the end-to-end table alone); it needs CAREamics and its dependencies
(``make careamics-tier``). The tables are printed; ``--write-results`` writes them
into ``benchmarks/results/careamics.md`` and ``benchmarks/results/careamics-train.md``,
``--output`` and ``--train-output`` into the files they name.
"""

from __future__ import annotations

import logging
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from _report import (
    RESULTS_DIR,
    Report,
    cpu_model,
    finish,
    fmt_rate,
    fmt_ratio,
    fmt_time,
    load_1min,
    markdown_table,
    script_parser,
    usable_cupy,
)

from gpu_patching import PatchLoader
from gpu_patching.testing import import_careamics

RESULTS = RESULTS_DIR / "careamics.md"
TRAIN_RESULTS = RESULTS_DIR / "careamics-train.md"
#: Where ``--gpu-only --write-results`` writes the GPU end-to-end table.
GPU_TRAIN_RESULTS = RESULTS_DIR / "careamics-train-gpu.md"
GPU_HEADING = "## CAREamist.train on the GPU"
#: Epochs of CAREamist.train per sampler in the end-to-end table.
TRAIN_EPOCHS = 2
#: Validation patches split off the training image in the end-to-end table.
TRAIN_VAL_PATCHES = 8
BATCH_SIZE = 32
#: Items timed one by one per case and sampler (fewer when a case has fewer patches).
ITEMS = 1000
#: DataLoader batches per measurement: 48 x 32 = 1,536 patches.
BATCHES = 48
SEED = 1234


@dataclass(frozen=True)
class Case:
    """One data shape: the arrays' shapes, their axes and the patch size."""

    name: str
    shapes: tuple[tuple[int, ...], ...]
    axes: str
    patch_size: tuple[int, ...]


CASES = (
    Case("2048x2048, 64x64", ((2048, 2048),), "YX", (64, 64)),
    Case("10000x6760, 32x32", ((10000, 6760),), "YX", (32, 32)),
    Case("64x1024x1024, 16x64x64", ((64, 1024, 1024),), "ZYX", (16, 64, 64)),
    Case("8 x 2048x2048, 64x64", ((2048, 2048),) * 8, "YX", (64, 64)),
)
QUICK_CASES = (
    Case("512x512, 64x64", ((512, 512),), "YX", (64, 64)),
    Case("2500x1690, 32x32", ((2500, 1690),), "YX", (32, 32)),
    Case("16x256x256, 16x64x64", ((16, 256, 256),), "ZYX", (16, 64, 64)),
    Case("8 x 512x512, 64x64", ((512, 512),) * 8, "YX", (64, 64)),
)


@dataclass
class Row:
    """The figures of one sampler on one case."""

    sampler: str
    n_patches: int
    build_s: float
    item_s: float
    spec_s: float
    loader_rates: dict[int, tuple[float, float | None]]


def make_arrays(case: Case) -> list[np.ndarray]:
    generator = np.random.default_rng(SEED)
    return [generator.random(shape, dtype=np.float32) for shape in case.shapes]


def n2v_configuration(case: Case, **options: Any) -> Any:
    """CAREamics' N2V configuration for ``case`` (``options``: more of its arguments)."""
    from careamics.config import create_n2v_config

    return create_n2v_config(
        experiment_name="bench",
        data_type="array",
        axes=case.axes,
        patch_size=list(case.patch_size),
        batch_size=BATCH_SIZE,
        augmentations=["x_flip", "y_flip", "rotate_90"],
        **options,
    )


def n2v_config(case: Case) -> Any:
    """A fresh N2V data configuration: every build computes its own normalisation."""
    config = n2v_configuration(case).data_config
    config.patching.seed = SEED
    return config


def loader_rate(dataset: Any, workers: int, batches: int) -> tuple[float, float | None]:
    """A shuffled DataLoader over ``batches`` batches: time to the first, then patches/s.

    The rate is over the batches after the first, so that the workers'
    start-up (forking a process that holds PyTorch and CAREamics) is the
    first figure and not part of the second.
    """
    import torch
    from torch.utils.data import DataLoader
    from torch.utils.data._utils.collate import default_collate

    data_loader = DataLoader(
        dataset,
        batch_size=BATCH_SIZE,
        shuffle=True,
        num_workers=workers,
        collate_fn=default_collate,
        multiprocessing_context="fork" if workers else None,
        generator=torch.Generator().manual_seed(SEED),
    )
    batches = max(2, min(batches, len(data_loader)))
    start = time.perf_counter()
    patches = 0
    for k, batch in enumerate(data_loader):
        if k == 0:
            first_s = time.perf_counter() - start
            start = time.perf_counter()
        else:
            patches += len(batch[0].data)
        if k + 1 == batches:
            break
    # A case of one batch has no batch after the first to time: no rate ('n/a').
    return first_s, (patches / (time.perf_counter() - start) if patches else None)


def measure(
    label: str,
    build: Callable[[Any, Any], Any],
    case: Case,
    arrays: list[np.ndarray],
    items: int,
    batches: int,
) -> tuple[Row, Any]:
    """Build one sampler's dataset and time it; returns the row and the dataset."""
    from careamics.dataset.factory import TrainValSplitData

    data = TrainValSplitData(train_data=arrays, n_val_patches=0)
    config = n2v_config(case)
    start = time.perf_counter()
    dataset = build(config, data)
    build_s = time.perf_counter() - start
    sampler = dataset.patch_constructor.patching_strategy
    n = len(dataset)
    order = np.random.default_rng(SEED).permutation(n)[: min(items, n)].tolist()
    start = time.perf_counter()
    for index in order:
        dataset[index]
    item_s = (time.perf_counter() - start) / len(order)
    start = time.perf_counter()
    for index in order:
        sampler.get_patch_spec(index)
    spec_s = (time.perf_counter() - start) / len(order)
    rates = {workers: loader_rate(dataset, workers, batches) for workers in (0, 2)}
    return Row(label, n, build_s, item_s, spec_s, rates), dataset


def patch_loader_rate(arrays: list[np.ndarray], sampler: Any, batches: int) -> float | None:
    """Patches per second of our PatchLoader over the same arrays and sampler."""
    stacks = [array[None, None] for array in arrays]  # SC(Z)YX
    loader = PatchLoader(stacks, sampler, BATCH_SIZE, shuffle=True)
    loader.set_epoch(1)
    batches = max(2, min(batches, len(loader)))
    start = time.perf_counter()
    patches = 0
    for k, (crops, _) in enumerate(loader):
        if k == 0:  # timed from the second batch, as the DataLoader
            start = time.perf_counter()
        else:
            patches += len(crops)
        if k + 1 == batches:
            break
    return patches / (time.perf_counter() - start) if patches else None  # None: one batch only


def run_case(report: Report, case: Case, items: int, batches: int) -> list[str]:
    """Measure both samplers on one case; returns the summary line."""
    from careamics.dataset.factory import create_train_dataset as careamics_build

    from gpu_patching.careamics import create_train_dataset as ours_build

    arrays = make_arrays(case)
    theirs, _ = measure(
        "CAREamics", lambda c, d: careamics_build(c, d, None), case, arrays, items, batches
    )
    ours, dataset = measure(
        "gpu-patching",
        lambda c, d: ours_build(c, d, backend="numpy"),
        case,
        arrays,
        items,
        batches,
    )
    crops = patch_loader_rate(arrays, dataset.patch_constructor.patching_strategy, batches)
    rows = []
    for row in (theirs, ours):
        rows.append(
            [
                row.sampler,
                f"{row.n_patches:,}",
                fmt_time(row.build_s),
                fmt_time(row.item_s),
                fmt_time(row.spec_s),
                f"{100 * row.spec_s / row.item_s:.0f}%",
                fmt_rate(row.loader_rates[0][1]),
                f"{fmt_rate(row.loader_rates[2][1])} ({fmt_time(row.loader_rates[2][0])})",
            ]
        )
    crops_row = ["PatchLoader (ours, crops only)", f"{ours.n_patches:,}", *[""] * 4]
    rows.append([*crops_row, fmt_rate(crops), ""])
    report.emit(f"### {case.name}", "")
    report.emit(
        *markdown_table(
            [
                "sampler",
                "patches",
                "build",
                "item",
                "get_patch_spec",
                "sampler share",
                "DataLoader, 0 workers",
                "DataLoader, 2 workers (first batch)",
            ],
            rows,
            "lrrrrrrr",
        ),
        "",
    )
    return [
        case.name,
        fmt_ratio(theirs.build_s, ours.build_s, 1),
        fmt_ratio(theirs.item_s, ours.item_s, 1),
        fmt_ratio(theirs.spec_s, ours.spec_s),
        fmt_ratio(ours.loader_rates[0][1], theirs.loader_rates[0][1], 1),
        fmt_ratio(ours.loader_rates[2][1], theirs.loader_rates[2][1], 1),
    ]


class _EpochClock:
    """A Lightning callback: each training epoch's wall time and its sampler's share.

    At the first epoch it puts a timing wrapper around the training sampler's
    ``get_patch_spec`` (an attribute of that sampler object only), so both
    samplers are timed the same way, call by call.
    """

    def __init__(self) -> None:
        self.epoch_s: list[float] = []
        self.sampler_s: list[float] = []
        self._start = 0.0

    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        sampler = trainer.datamodule.train_dataset.patch_constructor.patching_strategy
        if "get_patch_spec" not in vars(sampler):
            untimed = sampler.get_patch_spec

            def timed(index: int) -> Any:
                start = time.perf_counter()
                try:
                    return untimed(index)
                finally:
                    self.sampler_s[-1] += time.perf_counter() - start

            sampler.get_patch_spec = timed
        self.sampler_s.append(0.0)
        self._start = time.perf_counter()

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        self.epoch_s.append(time.perf_counter() - self._start)


def train_run(
    case: Case, arrays: list[np.ndarray], ours: bool, work_dir: Path, accelerator: str = "cpu"
) -> list[str]:
    """``CAREamist.train`` for ``TRAIN_EPOCHS`` epochs with one sampler; its table row.

    ``accelerator`` is Lightning's ("cpu" or "gpu"), named so that a figure
    never comes from another device than its table says.
    """
    from careamics import CAREamist
    from lightning.pytorch import Callback

    from gpu_patching.careamics import using_gpu_patching

    config = n2v_configuration(case, num_epochs=TRAIN_EPOCHS, n_val_patches=TRAIN_VAL_PATCHES)
    config.data_config.seed = config.data_config.patching.seed = SEED
    for params in (
        config.data_config.train_dataloader_params,
        config.data_config.val_dataloader_params,
    ):
        # No workers: every get_patch_spec call is in this process, where it is timed.
        params.update(num_workers=0, persistent_workers=False)
    trainer = dict(config.training_config.trainer_params or {})
    trainer.update(accelerator=accelerator, devices=1)
    config.training_config.trainer_params = trainer

    class EpochClock(_EpochClock, Callback):
        """The clock as a Lightning callback (Lightning is imported only here)."""

    clock = EpochClock()
    careamist = CAREamist(config, work_dir=work_dir, enable_progress_bar=False, callbacks=[clock])
    start = time.perf_counter()
    if ours:
        with using_gpu_patching(careamist):
            careamist.train(train_data=arrays)
    else:
        careamist.train(train_data=arrays)
    total_s = time.perf_counter() - start
    sampler = careamist.train_datamodule.train_dataset.patch_constructor.patching_strategy
    epochs = [fmt_time(seconds) for seconds in clock.epoch_s]
    shares = [
        f"{fmt_time(used)} ({100 * used / epoch:.1f}%)"
        for used, epoch in zip(clock.sampler_s, clock.epoch_s, strict=True)
    ]
    return [
        "gpu-patching" if ours else "CAREamics",
        f"{sampler.n_patches:,}",
        " / ".join(epochs),
        " / ".join(shares),
        fmt_time(total_s),
    ]


def run_train(case: Case, output: Path | None) -> str:
    """The end-to-end table: CAREamist.train with each sampler, side by side."""
    import tempfile

    import torch

    from gpu_patching.testing import import_careamics

    careamics = import_careamics()
    arrays = make_arrays(case)
    report = Report()
    report.emit(
        "# CAREamist.train with CAREamics' sampler and with ours",
        "",
        f"CPU: {cpu_model()}; Python {platform.python_version()}, NumPy {np.__version__}, "
        f"PyTorch {torch.__version__} ({torch.get_num_threads()} threads), CAREamics "
        f"{careamics.__version__}; our NumPy backend.",
        "",
        f"`CAREamist.train` for {TRAIN_EPOCHS} epochs on one {case.name.split(',')[0]} "
        f"float32 image, {'x'.join(map(str, case.patch_size))} patches, N2V's default "
        f"configuration (its two-level UNet, mean/std normalisation, flips, 90-degree "
        f"rotations), batch size {BATCH_SIZE}, {TRAIN_VAL_PATCHES} validation patches "
        f"split off, the same seeds for both samplers, DataLoader without workers. "
        f"`epoch` is the wall time of each training epoch (its validation included), "
        f"`sampler` the time its `get_patch_spec` calls took in it (and their share of "
        f"the epoch), `train()` the whole call (dataset build with its normalisation "
        f"pass, both epochs, checkpoints); each sampler runs twice, taking turns, with the "
        f"load average (1 min) when its run began. On this CPU the network's forward and "
        f"backward passes take nearly all of an epoch: the sampler can only save its "
        f"own share. Produced by `python benchmarks/bench_careamics.py --train-only`.",
        "",
    )
    load_before = load_1min()
    rows = []
    # Taking turns, CAREamics-ours-ours-CAREamics, so that a change of the
    # machine's load during the run weighs on both samplers alike.
    for ours in (False, True, True, False):
        with tempfile.TemporaryDirectory() as work_dir:
            load = load_1min()
            rows.append([*train_run(case, arrays, ours, Path(work_dir)), load])
    report.emit(
        *markdown_table(
            [
                "sampler",
                "training patches",
                "epoch 1 / 2",
                "sampler in epoch 1 / 2 (share)",
                "train()",
                "load before",
            ],
            rows,
            "lrrrrr",
        ),
        "",
        f"Load average (1 min) {load_before} at the start, {load_1min()} at "
        f"the end (2 cores: above 2, other processes shared the cores).",
    )
    return report.write(output)


def gpu_why_not() -> str:
    """Why ``CAREamist.train`` cannot run on a GPU here ("" when it can)."""
    cupy, why = usable_cupy()  # the harness' test: a device that runs a kernel
    if cupy is None:
        return why
    try:
        import torch
    except ImportError as error:
        return f"PyTorch is not importable ({error})"
    if not torch.cuda.is_available():
        return f"PyTorch {torch.__version__} sees no CUDA device"
    try:
        import_careamics()
    except ImportError as error:
        return f"CAREamics' pipeline is not importable ({error})"
    return ""


def gpu_train_section(report: Report, case: Case) -> None:
    """``CAREamist.train`` on the GPU with each sampler (one run each), or why not."""
    report.emit("# CAREamist.train on the GPU", "", GPU_HEADING, "")
    why = gpu_why_not()
    if why:
        report.emit(f"Not run: {why}.", "")
        return
    import tempfile

    import torch

    report.emit(
        f"GPU: {torch.cuda.get_device_name(0)}; PyTorch {torch.__version__}; CPU: "
        f"{cpu_model()}. `CAREamist.train` with `accelerator='gpu'` for {TRAIN_EPOCHS} "
        f"epochs on one {case.name.split(',')[0]} float32 image, "
        f"{'x'.join(map(str, case.patch_size))} patches, the configuration of the CPU "
        "table (DataLoader without workers; our sampler on its NumPy backend, as "
        "CAREamics asks for one patch per item), CAREamics' sampler then ours.",
        "",
    )
    arrays = make_arrays(case)
    rows = []
    for ours in (False, True):
        with tempfile.TemporaryDirectory() as work_dir:
            rows.append(train_run(case, arrays, ours, Path(work_dir), accelerator="gpu"))
    report.emit(
        *markdown_table(
            ["sampler", "training patches", "epoch 1 / 2", "sampler in epoch 1 / 2", "train()"],
            rows,
            "lrrrr",
        ),
        "",
    )


def main(argv: list[str] | None = None) -> str:
    parser = script_parser(__doc__, RESULTS, "small images, few batches", gpu=True)
    parser.add_argument(
        "--train-output",
        type=Path,
        default=None,
        help="markdown file for the end-to-end CAREamist.train table",
    )
    parser.add_argument(
        "--train-only", action="store_true", help="only the end-to-end CAREamist.train table"
    )
    args = parser.parse_args(argv)
    if args.train_output is None and args.write_results:
        args.train_output = TRAIN_RESULTS
    os.environ.setdefault("TQDM_DISABLE", "1")  # CAREamics' progress bars
    if args.gpu_only:
        report = Report()
        gpu_train_section(report, QUICK_CASES[0] if args.quick else CASES[0])
        return finish(report, args, GPU_TRAIN_RESULTS)
    try:
        careamics = import_careamics()
    except ImportError as error:
        # Like the GPU benchmarks without a GPU: say why, write nothing, succeed,
        # so that `gpu-patching bench` runs the others.
        print(
            f"bench_careamics: CAREamics' pipeline is not importable ({error}); "
            f"install the CAREamics tier with 'make careamics-tier'. Nothing measured."
        )
        return ""
    logging.getLogger("Statistics").setLevel(logging.WARNING)  # its normalisation log
    train_case = QUICK_CASES[0] if args.quick else CASES[0]
    if args.train_only:
        return run_train(train_case, args.train_output)
    import torch

    # The network trains on every core; the pipeline's figures use one thread each,
    # so that the DataLoader's workers are the parallelism measured.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    cases = QUICK_CASES if args.quick else CASES
    items = 100 if args.quick else ITEMS
    batches = 8 if args.quick else BATCHES
    report = Report()
    report.emit(
        "# CAREamics' pipeline with its sampler and with ours",
        "",
        f"CPU: {cpu_model()}; Python {platform.python_version()}, NumPy {np.__version__}, "
        f"PyTorch {torch.__version__}, CAREamics {careamics.__version__}; our NumPy backend.",
        "",
        f"N2V configuration (mean/std normalisation, flips, 90-degree rotations), float32 "
        f"arrays, batch size {BATCH_SIZE}; `item` and `get_patch_spec` are means over "
        f"{items:,} shuffled indices (all of them when fewer); the DataLoader and "
        f"PatchLoader rates are over the {batches - 1} batches after the first "
        f"({(batches - 1) * BATCH_SIZE:,} patches; the time to the first batch, the "
        f"workers' start-up, is in brackets), fork start method. The machine has 2 cores "
        f"shared with other work, so single figures can move by 10-20%. Produced by "
        f"`python benchmarks/bench_careamics.py{' --quick' if args.quick else ''}`.",
        "",
    )
    started = time.perf_counter()
    load_before = load_1min()
    summary = [run_case(report, case, items, batches) for case in cases]
    report.emit(
        "### Ours against CAREamics' (how many times faster)",
        "",
        *markdown_table(
            ["case", "build", "item", "get_patch_spec", "DataLoader 0 w.", "DataLoader 2 w."],
            summary,
            "lrrrrr",
        ),
        "",
        f"Whole run: {time.perf_counter() - started:.0f} s; load average (1 min) "
        f"{load_before} at the start, {load_1min()} at the end (2 cores: "
        f"above 2, other processes shared the cores and every figure is slower than on "
        f"an idle machine, both samplers alike).",
    )
    text = finish(report, args, RESULTS)
    torch.set_num_threads(threads)
    return text + run_train(train_case, args.train_output)


if __name__ == "__main__":
    main()
