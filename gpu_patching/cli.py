"""The ``gpu-patching`` command: ``demo``, ``sample`` and ``bench``.

``gpu-patching demo`` runs the main job on a real microscopy image (the
``cell`` image shipped inside scikit-image, or a file you name) and writes
pictures; ``gpu-patching sample`` writes one epoch of patch specs for stacks
on disk; ``gpu-patching bench`` runs the benchmark scripts of a source
checkout. Every subcommand has ``--help``. Bad input gives a one-line error on
stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from . import StratifiedPatching, __version__
from .io import SUPPORTED_SUFFIXES, read_shape, read_stack

__all__ = ["main"]

_PROG = "gpu-patching"


class CommandError(Exception):
    """An error worth one line to the user (exit status 2, no traceback)."""


# -- sample --------------------------------------------------------------------


def _cmd_sample(args: argparse.Namespace) -> int:
    output = Path(args.output)
    suffix = output.suffix.lower()
    if suffix not in (".npy", ".csv"):
        raise CommandError(f"--output must end in .npy or .csv, got {output.name!r}")
    shapes = []
    for path in args.inputs:
        shape = read_shape(path, args.axes)
        shapes.append(shape)
    spatial = {len(s) - 2 for s in shapes}
    if len(spatial) != 1:
        raise CommandError("the inputs mix 2D and 3D stacks; pass stacks of one kind")
    ndim = spatial.pop()
    patch = _patch_size(args.patch, ndim)
    sampler = StratifiedPatching(shapes, patch, seed=args.seed, backend=args.backend)
    batch = sampler.sample_epoch(args.epoch, **_epoch_options(args)).to_numpy()
    table = np.column_stack([batch.indices, batch.data_idx, batch.sample_idx, batch.coords])
    columns = ["index", "data_idx", "sample_idx", *("zyx"[3 - ndim :])]
    if suffix == ".npy":
        np.save(output, table.astype(np.int64))
    else:
        np.savetxt(output, table, fmt="%d", delimiter=",", header=",".join(columns), comments="")
    print(
        f"{len(batch)} patches of epoch {args.epoch} (seed {sampler.seed}, "
        f"backend {sampler.backend}) written to {output} [{', '.join(columns)}]"
    )
    return 0


def _epoch_options(args: argparse.Namespace) -> dict[str, Any]:
    """Shuffle/shard options of sample_epoch, passed only when asked for."""
    options: dict[str, Any] = {}
    if args.shuffle:
        options["shuffle"] = True
    if args.world_size != 1 or args.rank != 0:
        options.update(rank=args.rank, world_size=args.world_size)
    if args.drop_last:
        options["drop_last"] = True
    return options


def _patch_size(values: Sequence[int] | None, ndim: int) -> tuple[int, ...]:
    if values is None:
        return (64, 64) if ndim == 2 else (32, 64, 64)
    if len(values) != ndim:
        raise CommandError(f"--patch needs {ndim} sizes for {ndim}D stacks, got {len(values)}")
    return tuple(values)


# -- demo ----------------------------------------------------------------------


def _load_demo_image(args: argparse.Namespace) -> tuple[np.ndarray, str]:
    """Return a 2D float image and a name for it."""
    if args.image is None:
        from skimage import data

        return data.cell().astype(
            np.float32
        ), "scikit-image 'cell' (quantitative phase image of a cell in saline)"
    stack = read_stack(args.image, args.axes)
    if stack.ndim != 4:
        raise CommandError("demo shows 2D images; give a 2D stack or use 'sample' for 3D data")
    return stack[0, 0].astype(np.float32), f"{args.image} (sample 0, channel 0)"


def _cmd_demo(args: argparse.Namespace) -> int:
    image, name = _load_demo_image(args)
    from .demo import run_demo

    patch = _patch_size(args.patch, 2)
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    run_demo(
        image,
        name=name,
        patch_size=patch,
        epochs=args.epochs,
        seed=args.seed,
        backend=args.backend,
        output=output,
        validation_fraction=args.validation_fraction,
        background_stat=args.background_stat,
        background_quantile=args.background_quantile,
        filtered_prob=args.filtered_prob,
        progress=not args.no_progress,
    )
    return 0


# -- bench ---------------------------------------------------------------------


def _benchmark_dir() -> Path:
    here = Path(__file__).resolve().parent.parent / "benchmarks"
    if not here.is_dir():
        raise CommandError(
            "the benchmark scripts live in a source checkout (benchmarks/); "
            "clone the repository to run them"
        )
    return here


def _cmd_bench(args: argparse.Namespace) -> int:
    folder = _benchmark_dir()
    scripts = sorted(folder.glob("bench_*.py"))
    if args.names:
        wanted = {f"bench_{n.removeprefix('bench_').removesuffix('.py')}.py" for n in args.names}
        unknown = wanted - {s.name for s in scripts}
        if unknown:
            raise CommandError(
                f"unknown benchmark(s) {', '.join(sorted(unknown))}; "
                f"available: {', '.join(s.stem.removeprefix('bench_') for s in scripts)}"
            )
        scripts = [s for s in scripts if s.name in wanted]
    status = 0
    for script in scripts:
        print(f"== {script.stem} ==", flush=True)
        command = [sys.executable, str(script)]
        if args.quick:
            command.append("--quick")
        if args.output_dir is not None:
            command += ["--output", str(Path(args.output_dir) / f"{script.stem}.md")]
        env = dict(os.environ)
        root = str(folder.parent)
        env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
        status |= subprocess.call(command, env=env)
    return 1 if status else 0


# -- parser ----------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser of the ``gpu-patching`` command."""
    parser = argparse.ArgumentParser(
        prog=_PROG,
        description="GPU-resident stratified patch sampling for microscopy training.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def common(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--seed", type=int, default=2026, help="sampler seed (default 2026)")
        sub.add_argument(
            "--backend", default="auto", choices=("auto", "cuda", "numpy"), help="default: auto"
        )

    demo = commands.add_parser(
        "demo",
        help="the main job on a real microscopy image, with pictures",
        description=(
            "Build a sampler on a microscopy image (default: scikit-image's 'cell'), hold out "
            "validation patches, sample background regions less often, draw epochs and write "
            "pictures of the cells, the region probabilities and the coverage (stratified "
            "beside uniform random patching) into --output."
        ),
    )
    demo.add_argument("--image", help=f"an image file ({', '.join(SUPPORTED_SUFFIXES)})")
    demo.add_argument("--axes", default="YX", help="axes of --image, e.g. YX, CYX (default YX)")
    demo.add_argument("--patch", type=int, nargs=2, metavar=("PY", "PX"), help="default 32 32")
    demo.add_argument("--epochs", type=int, default=20, help="epochs to draw (default 20)")
    demo.add_argument(
        "--output", default="demo-output", help="folder for the pictures (default demo-output)"
    )
    demo.add_argument(
        "--validation-fraction",
        type=float,
        default=0.05,
        help="fraction of the patches held out for validation (default 0.05)",
    )
    demo.add_argument(
        "--background-stat",
        default="std",
        choices=("mean", "std", "max", "entropy"),
        help="region statistic that tells background: low values are background (default std)",
    )
    demo.add_argument(
        "--background-quantile",
        type=float,
        default=0.3,
        help="regions below this quantile of the statistic are background (default 0.3)",
    )
    demo.add_argument(
        "--filtered-prob",
        type=float,
        default=0.1,
        help="probability of background regions (default 0.1)",
    )
    demo.add_argument("--no-progress", action="store_true", help="no progress bar")
    common(demo)
    demo.set_defaults(handler=_cmd_demo, patch_default=(32, 32))

    sample = commands.add_parser(
        "sample",
        help="write one epoch of patch specs for stacks on disk",
        description=(
            "Read the shapes of one or more stacks (.tif/.tiff, .zarr, .npy; pixels are not "
            "read), build a sampler and write one epoch of patches as rows "
            "[index, data_idx, sample_idx, (z,) y, x] to a .npy or .csv file."
        ),
    )
    sample.add_argument("inputs", nargs="+", help="stack files, one per data_idx")
    sample.add_argument("--axes", required=True, help="axes of the stacks, e.g. YX, SYX, SCZYX")
    sample.add_argument("--patch", type=int, nargs="+", help="patch size per spatial axis")
    sample.add_argument("--epoch", type=int, default=0, help="epoch (draw number, default 0)")
    sample.add_argument("--shuffle", action="store_true", help="shuffle the epoch")
    sample.add_argument("--rank", type=int, default=0, help="this rank (default 0)")
    sample.add_argument("--world-size", type=int, default=1, help="number of ranks (default 1)")
    sample.add_argument("--drop-last", action="store_true", help="drop the uneven tail")
    sample.add_argument("--output", "-o", required=True, help="output file, .npy or .csv")
    common(sample)
    sample.set_defaults(handler=_cmd_sample)

    bench = commands.add_parser(
        "bench",
        help="run the benchmark scripts of this checkout and print their tables",
        description="Run benchmarks/bench_*.py (all, or the NAMEs given) and print their tables.",
    )
    bench.add_argument("names", nargs="*", help="benchmarks to run, e.g. cpu gpu crop filters")
    bench.add_argument("--quick", action="store_true", help="small sizes only")
    bench.add_argument("--output-dir", help="write the markdown tables here")
    bench.set_defaults(handler=_cmd_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``gpu-patching`` command.

    Parameters
    ----------
    argv : sequence of str, optional
        Arguments without the program name (default: ``sys.argv[1:]``).

    Returns
    -------
    int
        Exit status: 0 on success, 2 on bad input.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "patch", None) is None and hasattr(args, "patch_default"):
        args.patch = list(args.patch_default)
    try:
        return int(args.handler(args))
    except (CommandError, ValueError, TypeError, IndexError, OSError, ImportError) as error:
        print(f"{_PROG} {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # pragma: no cover - interactive only
        return 130


def _entry() -> None:
    """Console-script entry point."""
    raise SystemExit(main())
