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
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from . import BackendUnavailableError, StratifiedPatching, __version__
from ._atomic import Interrupted, interruptible, write_atomically
from .io import SUPPORTED_SUFFIXES, read_shape, read_stack

__all__ = ["main"]

_PROG = "gpu-patching"


class CommandError(Exception):
    """An error worth one line to the user (exit status 2, no traceback)."""


# -- checks done before any work --------------------------------------------------

#: The extra that installs the command's optional dependencies.
_CLI_EXTRA = "pip install 'gpu-patching[cli]'"
#: Default patch size of ``sample`` by number of spatial axes.
_SAMPLE_PATCH = {2: (64, 64), 3: (32, 64, 64)}


def _require(command: str, modules: Iterable[tuple[str, str]]) -> None:
    """Fail in one line, before any work, when an optional dependency is missing.

    ``modules`` holds ``(import name, what it is for)`` pairs.
    """
    missing = [
        f"{name} ({purpose})" for name, purpose in modules if importlib.util.find_spec(name) is None
    ]
    if missing:
        raise CommandError(f"{command} needs {', '.join(missing)}: {_CLI_EXTRA}")


def _require_backend(backend: str) -> None:
    """``--backend cuda`` without CuPy: say which extra installs it."""
    if backend == "cuda" and importlib.util.find_spec("cupy") is None:
        raise CommandError(
            "--backend cuda needs CuPy, which is not installed: "
            "pip install 'gpu-patching[cuda12]' (CUDA 12) or "
            "pip install 'gpu-patching[cuda13]' (CUDA 13)"
        )


def _reader_modules(paths: Iterable[str]) -> list[tuple[str, str]]:
    """List the optional readers that the input files need."""
    suffixes = {Path(p).suffix.lower() for p in paths}
    modules = []
    if suffixes & {".tif", ".tiff"}:
        modules.append(("tifffile", "reads .tif"))
    if ".zarr" in suffixes:
        modules.append(("zarr", "reads .zarr"))
    return modules


def _same_file(first: Path, second: Path) -> bool:
    try:
        return first.exists() and second.exists() and os.path.samefile(first, second)
    except OSError:
        return first.resolve() == second.resolve()


def _check_outputs(outputs: Sequence[Path], inputs: Iterable[str], overwrite: bool) -> None:
    """Refuse to write over an input ever, or over an existing file unless asked.

    A missing output folder is not an error: it is created when the output is
    written (``sample`` and ``demo`` alike).
    """
    sources = [Path(p) for p in inputs]
    for output in outputs:
        for source in sources:
            # A .zarr input is a folder: nothing may be written inside it.
            inside = source.is_dir() and source.resolve() in output.resolve().parents
            if _same_file(output, source) or output.resolve() == source.resolve() or inside:
                raise CommandError(f"refusing to write {output}: it is the input {source}")
        if output.is_dir():
            raise CommandError(f"{output} is a folder; name a file to write")
        if output.exists() and not overwrite:
            raise CommandError(f"{output} exists; pass --overwrite to replace it")
        for parent in output.parents:
            if parent.exists():
                if not parent.is_dir():
                    raise CommandError(f"cannot write {output}: {parent} is not a folder")
                break


# -- sample --------------------------------------------------------------------


def _cmd_sample(args: argparse.Namespace) -> int:
    output = Path(args.output)
    suffix = output.suffix.lower()
    if suffix not in (".npy", ".csv"):
        raise CommandError(f"--output must end in .npy or .csv, got {output.name!r}")
    _require_backend(args.backend)
    _require("gpu-patching sample", _reader_modules(args.inputs))
    # The inputs first (shapes only, no pixels): a missing input is the error
    # to report even when the output already exists.
    options = _storage_options(args)
    shapes = [_input_shape(path, args, options) for path in args.inputs]
    _check_outputs([output], args.inputs, args.overwrite)
    spatial = {len(s) - 2 for s in shapes}
    if len(spatial) != 1:
        raise CommandError("the inputs mix 2D and 3D stacks; pass stacks of one kind")
    ndim = spatial.pop()
    patch = _patch_size(args.patch, ndim)
    if not any(all(p <= d for p, d in zip(patch, s[2:], strict=True)) for s in shapes):
        raise CommandError(
            f"no patches to sample: the patch size {patch} is larger than every stack "
            f"({', '.join(str(s[2:]) for s in shapes)}) along some axis"
        )
    sampler = StratifiedPatching(shapes, patch, seed=args.seed, backend=args.backend)
    if sampler.n_patches == 0:
        raise CommandError(f"no patches to sample in {', '.join(args.inputs)}")
    batch = sampler.sample_epoch(args.epoch, **_epoch_options(args)).to_numpy()
    table = np.column_stack([batch.indices, batch.data_idx, batch.sample_idx, batch.coords])
    columns = ["index", "data_idx", "sample_idx", *("zyx"[3 - ndim :])]
    if suffix == ".npy":
        write_atomically(output, lambda stream: np.save(stream, table.astype(np.int64)))
    else:
        write_atomically(
            output,
            lambda stream: np.savetxt(
                stream, table, fmt="%d", delimiter=",", header=",".join(columns), comments=""
            ),
        )
    print(
        f"{len(batch)} patches of epoch {args.epoch} (seed {sampler.seed}, "
        f"backend {sampler.backend}, patch {'x'.join(map(str, patch))}) written to {output} "
        f"[{', '.join(columns)}]"
    )
    return 0


#: A decimal number as a storage option's value (an int, or a float with a point or exponent).
_NUMBER = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?")
#: Words of option names whose values are text even when made of digits.
_TEXT_ONLY = ("key", "secret", "token", "pass", "user", "profile", "credential", "account", "id")


def _storage_options(args: argparse.Namespace) -> dict[str, Any] | None:
    """Return the ``--storage-option KEY=VALUE`` flags as fsspec storage_options (None if none).

    ``true``/``false`` become booleans, a JSON object (``client_kwargs={...}``)
    a dict and a decimal number (``max_concurrency=4``, ``timeout=2.5``) a number,
    except for options that name a credential or an account (``key``,
    ``secret``, ``token``, ``profile``, ...): those stay strings, digits or not.
    """
    pairs = getattr(args, "storage_option", None) or []
    if not pairs:
        return None
    options: dict[str, Any] = {}
    for pair in pairs:
        key, separator, value = pair.partition("=")
        if not separator or not key:
            # Not echoed: the value may be a secret.
            raise CommandError(f"--storage-option needs KEY=VALUE, got one without '=' ({key!r})")
        parsed: Any = value
        if value in ("true", "false"):
            parsed = value == "true"
        elif _NUMBER.fullmatch(value) and not any(word in key.lower() for word in _TEXT_ONLY):
            parsed = float(value) if any(c in value for c in ".eE") else int(value)
        elif value.startswith("{"):
            try:
                parsed = json.loads(value)
            except json.JSONDecodeError as error:
                raise CommandError(
                    f"--storage-option {key}: the value is not a JSON object ({error.msg})"
                ) from None
        options[key] = parsed
    return options


def _input_shape(source: str, args: argparse.Namespace, options: dict[str, Any] | None) -> Any:
    """Return the ``SC(Z)YX`` shape of an input: a file, or the URL of a remote store."""
    from .stores.open import is_url

    if is_url(source):
        from .stores import open_stack

        return tuple(open_stack(source, args.axes, level=args.level, storage_options=options).shape)
    if options is not None:
        raise CommandError(f"--storage-option is for URLs (s3://, gs://, https://), not {source}")
    return read_shape(source, args.axes, level=args.level)


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
        return _SAMPLE_PATCH[ndim]
    if len(values) != ndim:
        raise CommandError(f"--patch needs {ndim} sizes for {ndim}D stacks, got {len(values)}")
    return tuple(values)


# -- demo ----------------------------------------------------------------------


def _open_demo_image(args: argparse.Namespace) -> tuple[Any, str]:
    """Open the image the demo shows, reading its shape only, and check the flags against it.

    Returns the opened stack (a lazy ``SC(Z)YX`` stack for ``.zarr``, else the
    path, read later by :func:`_read_demo_image`) and a name that says where
    the plane comes from. Called before the outputs are checked, so that a
    missing or unsuitable input is what the user hears about first.
    """
    stack: Any
    from .stores.open import is_url

    options = _storage_options(args)
    if options is not None and not is_url(args.image or ""):
        raise CommandError("--storage-option is for an --image URL (s3://, gs://, https://)")
    if is_url(args.image or "") or Path(args.image).is_dir():
        # A zarr store or an OME-Zarr image (a level, with its own axes), on
        # disk or remote: only the plane shown is read.
        from .stores import open_stack

        stack = open_stack(args.image, args.axes, level=args.level, storage_options=options)
        shape = tuple(stack.shape)
    else:
        args.axes = args.axes or "YX"
        stack = args.image
        shape = read_shape(args.image, args.axes, level=args.level)
    if len(shape) != 4:
        raise CommandError(
            f"demo shows 2D images; {args.image} with axes {args.axes or stack.axes} is 3D "
            "(use 'sample' for 3D data)"
        )
    samples, channels = shape[:2]
    for flag, value, count in (
        ("--sample", args.sample, samples),
        ("--channel", args.channel, channels),
    ):
        if not 0 <= value < count:
            raise CommandError(f"{flag} {value} is out of range: {args.image} has {count}")
    name = f"{args.image} (sample {args.sample} of {samples}, channel {args.channel} of {channels})"
    return stack, name


def _read_demo_image(args: argparse.Namespace, opened: Any) -> np.ndarray:
    """Read the plane that :func:`_open_demo_image` checked, as float32."""
    if isinstance(opened, str):
        opened = read_stack(opened, args.axes)
    return np.asarray(opened[args.sample, args.channel]).astype(np.float32)


def _load_demo_image(args: argparse.Namespace) -> tuple[np.ndarray, str]:
    """Return the 2D image the demo shows and a name that says where it came from."""
    if args.image is None:
        from skimage import data

        image = data.cell().astype(np.float32)
        return image, "scikit-image's 'cell' (quantitative phase image of a cell in saline)"
    opened, name = _open_demo_image(args)
    return _read_demo_image(args, opened), name


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import PICTURE_NAMES

    _require_backend(args.backend)
    modules = [
        ("matplotlib", "draws the pictures"),
        ("skimage", "Otsu's threshold and the bundled image"),
        *_reader_modules([args.image] if args.image else []),
    ]
    if not args.no_progress:
        modules.append(("tqdm", "progress bars"))
    _require("gpu-patching demo", modules)
    # The input first (its shape, not its pixels): a missing image is the
    # error to report even when the output folder already holds pictures.
    opened = _open_demo_image(args) if args.image is not None else None
    output = Path(args.output)
    if output.exists() and not output.is_dir():
        raise CommandError(f"--output {output} is a file; name a folder for the pictures")
    _check_outputs(
        [output / name for name in PICTURE_NAMES],
        [args.image] if args.image else [],
        args.overwrite,
    )
    if opened is None:
        image, name = _load_demo_image(args)
    else:
        image, name = _read_demo_image(args, opened[0]), opened[1]
    from .demo import run_demo

    run_demo(
        image,
        name=name,
        patch_size=(int(args.patch[0]), int(args.patch[1])),
        epochs=args.epochs,
        seed=args.seed,
        backend=args.backend,
        output=output,
        validation_fraction=args.validation_fraction,
        background_stat=args.background_stat,
        background_threshold=args.background_threshold,
        filtered_prob=args.filtered_prob,
        compare_careamics=not args.no_careamics,
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
        elif args.write_results:
            command.append("--write-results")
        env = dict(os.environ)
        root = str(folder.parent)
        env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
        status |= _run_to_the_end(command, env)
    return 1 if status else 0


def _run_to_the_end(command: list[str], env: dict[str, str]) -> int:
    """Run a benchmark script; SIGINT or SIGTERM is passed on to it, then awaited.

    The script writes its report atomically and removes its temporary file
    when a signal stops it, but only if it is allowed to finish: killing it
    (what ``subprocess.call`` does on an exception) could leave the temporary
    file, and leaving it running would write after the command is gone.
    """
    with interruptible():
        child = subprocess.Popen(command, env=env)
        try:
            return child.wait()
        except Interrupted as interrupted:
            child.send_signal(interrupted.signum)
            child.wait()
            raise


# -- parser ----------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser of the ``gpu-patching`` command."""
    parser = argparse.ArgumentParser(
        prog=_PROG,
        description="GPU-resident stratified patch sampling for microscopy training.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def store_options(sub: argparse.ArgumentParser, axes_help: str, inputs: str) -> None:
        # How the commands that read images open them: axes, OME-Zarr level, URL options.
        sub.add_argument("--axes", help=axes_help)
        sub.add_argument(
            "--level", type=int, default=0, help=f"OME-Zarr level of {inputs} (default 0)"
        )
        sub.add_argument(
            "--storage-option",
            action="append",
            metavar="KEY=VALUE",
            help=f"an fsspec storage option of {inputs} given by URL (s3://, gs://, https://), "
            "e.g. anon=true, max_concurrency=4 or endpoint_url=https://... (a number is "
            "passed as a number, except for credentials); repeatable",
        )

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
    store_options(
        demo, "axes of --image, e.g. YX, CYX (default: an OME-Zarr image's own, else YX)", "--image"
    )
    demo.add_argument("--sample", type=int, default=0, help="sample of --image shown (default 0)")
    demo.add_argument("--channel", type=int, default=0, help="channel of --image shown (default 0)")
    demo.add_argument("--patch", type=int, nargs=2, metavar=("PY", "PX"), help="default 32 32")
    demo.add_argument("--epochs", type=int, default=20, help="epochs to draw (default 20)")
    demo.add_argument(
        "--output", default="demo-output", help="folder for the pictures (default demo-output)"
    )
    demo.add_argument(
        "--overwrite", action="store_true", help="replace pictures already in --output"
    )
    demo.add_argument(
        "--validation-fraction",
        type=float,
        default=0.05,
        help="fraction of the patches held out for validation (default 0.05)",
    )
    demo.add_argument(
        "--background-stat",
        default="foreground",
        choices=("foreground", "mean", "std", "max", "entropy"),
        help="what tells background: low values are background (default foreground: the "
        "fraction of a region's pixels above Otsu's threshold of the image's pixels)",
    )
    demo.add_argument(
        "--background-threshold",
        type=float,
        help="regions whose statistic is below this are background (default: 0.01 for "
        "foreground, else Otsu's threshold of the regions' statistic; printed)",
    )
    demo.add_argument(
        "--filtered-prob",
        type=float,
        default=0.1,
        help="probability of background regions (default 0.1)",
    )
    demo.add_argument(
        "--no-careamics",
        action="store_true",
        help="leave CAREamics' StratifiedPatching out of the comparison",
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
    sample.add_argument(
        "inputs", nargs="+", help="stack files or store URLs (s3://, ...), one per data_idx"
    )
    store_options(
        sample, "axes of the stacks, e.g. YX, SYX, TCZYX (OME-Zarr images: their own)", "the inputs"
    )
    sample.add_argument(
        "--patch",
        type=int,
        nargs="+",
        help="patch size per spatial axis (default 64 64 for 2D stacks, 32 64 64 for 3D)",
    )
    sample.add_argument("--epoch", type=int, default=0, help="epoch (draw number, default 0)")
    sample.add_argument("--shuffle", action="store_true", help="shuffle the epoch")
    sample.add_argument("--rank", type=int, default=0, help="this rank (default 0)")
    sample.add_argument("--world-size", type=int, default=1, help="number of ranks (default 1)")
    sample.add_argument("--drop-last", action="store_true", help="drop the uneven tail")
    sample.add_argument(
        "--output", "-o", required=True, help="output file, .npy or .csv (folders are created)"
    )
    sample.add_argument(
        "--overwrite", action="store_true", help="replace --output if it exists (never an input)"
    )
    common(sample)
    sample.set_defaults(handler=_cmd_sample)

    bench = commands.add_parser(
        "bench",
        help="run the benchmark scripts of this checkout and print their tables",
        description=(
            "Run benchmarks/bench_*.py (all, or the NAMEs given) and print their tables; "
            "files are written only with --output-dir or --write-results."
        ),
    )
    bench.add_argument("names", nargs="*", help="benchmarks to run, e.g. cpu gpu crop filters")
    bench.add_argument("--quick", action="store_true", help="small sizes only")
    outputs = bench.add_mutually_exclusive_group()
    outputs.add_argument("--output-dir", help="write the markdown tables into this folder")
    outputs.add_argument(
        "--write-results",
        action="store_true",
        help="write them into benchmarks/results/, keeping the sections a script did not "
        "rerun (default: print the tables, write no file)",
    )
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
        with warnings.catch_warnings():
            # The library's warnings (e.g. a stack smaller than the patch) as
            # one line each, like the errors, without source lines.
            warnings.showwarning = _show_warning(args.command)
            return int(args.handler(args))
    except (
        CommandError,
        ValueError,
        TypeError,
        IndexError,
        OverflowError,
        OSError,
        ImportError,
        MemoryError,
        BackendUnavailableError,
    ) as error:
        print(f"{_PROG} {args.command}: error: {_one_line(error)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as interrupted:
        # Ctrl-C, or SIGTERM during a write (gpu_patching._atomic): what was
        # being written is gone, what was written before stays. The shell's
        # convention: 128 + the signal's number.
        signum = getattr(interrupted, "signum", signal.SIGINT)
        name = signal.Signals(signum).name
        print(f"{_PROG} {args.command}: interrupted by {name}", file=sys.stderr)
        return 128 + signum


def _show_warning(command: str) -> Any:
    def show(message: Warning | str, *args: Any, **kwargs: Any) -> None:
        print(f"{_PROG} {command}: warning: {' '.join(str(message).split())}", file=sys.stderr)

    return show


def _one_line(error: BaseException) -> str:
    """Return the error's message on one line (its type when it has no message)."""
    if isinstance(error, ImportError) and error.name and not isinstance(error, CommandError):
        if importlib.util.find_spec(error.name.partition(".")[0]) is None:
            return f"{error} ({_CLI_EXTRA})"
    text = " ".join(str(error).split())
    if isinstance(error, MemoryError):
        return f"out of memory ({text})" if text else "out of memory"
    return text or type(error).__name__


def _entry() -> None:
    """Console-script entry point."""
    raise SystemExit(main())
