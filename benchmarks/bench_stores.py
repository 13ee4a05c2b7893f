"""Patches from chunked stores: our loader against per-patch zarr slicing.

The cases of issue 15, on stores this script writes (OME-Zarr 0.5 images,
zarr format 3, uint16, zstd through Blosc with byte shuffle):

* 2D: 20000x20000 (800 MB raw), 1024x1024 chunks, 64x64 patches;
* 3D: 256x2048x2048 (2 GB raw), 64x256x256 chunks, 16x64x64 patches;

batches of 128. Rows of each case:

* per-patch slicing: one zarr read per patch (``array[z:z+pz, y:y+py,
  x:x+px]``), what CAREamics' zarr image stack does per item, and CAREamics'
  own ``ZarrImageStack.extract_patch`` where its module loads;
* ours: :class:`gpu_patching.PatchLoader` on the store (each chunk a batch
  touches read once, a 512 MiB chunk cache, the next batch read while the
  current one is used), with one and two reads in flight, on the shuffled
  epoch order (what training uses) and on the sampler's plain order;
* time to the first batch and peak memory (tracemalloc) of ours against
  reading the whole stack first.

Peak resident memory against ``cache_bytes`` (issue 20): one shuffled epoch
of a 256 MiB store (2D, 2 MiB chunks; 3D, 8 MiB chunks) by
:class:`~gpu_patching.PatchLoader` with cache 64 MiB, 256 MiB and the default
(the store's bytes, at most 512 MiB), each in a fresh process: its resident
memory before the epoch (interpreter, imports, the open store, the sampler)
and the peak during the epoch (``VmHWM`` after ``/proc/self/clear_refs``), so
that the figure beyond ``cache_bytes`` (or the pass's floor, one read and the
rows, when larger) plus two batches is what a user must add; beside it the
most bytes the reader counted as held (``ChunkReader.peak_held_bytes``).
``--memory-only`` runs this part alone (Linux only: ``/proc``).

The chunk order against the shuffled order (issue 22), on the same two
stores: chunk decodes per patch of an epoch in each order against the floor
(chunks touched / patches), and a chunk-order epoch's time against reading
every chunk of the store once through the same reader (the floor of
compressed data); the chunk order on two ranks (``torch.distributed``, gloo,
two processes on 127.0.0.1) against one, in chunk decodes summed over the
ranks; and over moto's S3 server (a process on 127.0.0.1, requests counted in
its log) on a smaller store, requests and time per epoch of both orders
against one zarr read per patch, through zarr's ``FsspecStore`` (what
``open_stack`` uses for URLs) and zarr's ``ObjectStore`` on obstore.
``--chunk-order-only`` runs these parts alone; without PyTorch, moto or s3fs
their sections say so. Batch diversity (issue 22): per batch of an epoch, the
distinct sampling regions and the distinct chunks its patches overlap, in the
shuffled order and in chunk order with ``chunk_window`` 1 to 16, from the
rows alone (zarr stores of the cases' shapes with no chunk written);
``--diversity-only`` runs it alone in seconds.

Before the cases, the chunk reader is chosen by measurement: the same chunks
read by per-chunk synchronous zarr calls (one thread, and a pool of two), by
zarr's asynchronous API (what :class:`gpu_patching.stores.ChunkReader` uses)
and by TensorStore when it imports (``--tensorstore-path`` adds a folder to
``sys.path``; it is not a dependency). Throughputs are measured for a fixed
time from a fresh loader (cold cache), so they include the cache's warm-up.

The stores go to ``--store-dir`` (default ``/tmp/gpu-patching-stores``) and
are deleted at the end unless ``--keep``; a later run reuses kept stores.
``--quick`` uses 4096x4096 and 64x512x512 stores. On a usable CUDA device a
last section times ``PatchLoader(..., device_output=True)`` (each batch
uploaded) beside host batches on a 4096x4096 store (``--gpu-only``: that
section alone). The tables are
printed; ``--write-results`` writes them into ``benchmarks/results/stores.md``,
``--output FILE`` into FILE.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import importlib
import importlib.util
import itertools
import json
import math
import re
import shutil
import socket
import subprocess
import sys
import time
import tracemalloc
import types
from collections.abc import Callable, Generator, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib.metadata import version as _version
from pathlib import Path
from typing import Any

import numpy as np
from _report import (
    PROC_MEMORY,
    RESULTS_DIR,
    Report,
    finish,
    fmt_bandwidth,
    fmt_bytes,
    fmt_rate,
    fmt_ratio,
    fmt_time,
    fmt_verdict,
    in_turns,
    load_line,
    machine_line,
    markdown_table,
    run_child,
    script_parser,
    usable_cupy,
)

from gpu_patching import PatchLoader, StratifiedPatching, extract_patches
from gpu_patching.grid import grid_shape
from gpu_patching.stores import (
    DECODE_THREADS,
    DEFAULT_CACHE_BYTES,
    DEFAULT_CHUNK_WINDOW,
    DEFAULT_WORKERS,
    ChunkReader,
    chunk_order,
    default_cache_bytes,
    open_stack,
    plan_chunks,
)
from gpu_patching.stores import reader as reader_module

RESULTS = RESULTS_DIR / "stores.md"
BATCH = 128


@dataclass(frozen=True)
class Case:
    name: str
    shape: tuple[int, ...]  # stored axes (Z)YX
    chunks: tuple[int, ...]
    patch: tuple[int, ...]

    @property
    def axes(self) -> str:
        return "zyx"[3 - len(self.shape) :]

    @property
    def raw_bytes(self) -> int:
        return int(np.prod(self.shape)) * 2


def cases(quick: bool) -> list[Case]:
    if quick:
        return [
            Case("2D", (4096, 4096), (1024, 1024), (64, 64)),
            Case("3D", (64, 512, 512), (64, 256, 256), (16, 64, 64)),
        ]
    return [
        Case("2D", (20000, 20000), (1024, 1024), (64, 64)),
        Case("3D", (256, 2048, 2048), (64, 256, 256), (16, 64, 64)),
    ]


# -- the stores ------------------------------------------------------------------------


def _slab(rng: np.random.Generator, origin: tuple[int, ...], shape: tuple[int, ...]) -> np.ndarray:
    """Microscopy-like uint16 pixels: a background level, smooth structure, noise.

    The structure is a sum of one smooth profile per axis (cheap to make at
    this size); the noise spans 64 levels, so the chunks compress about 2:1.
    """
    pixels = np.full(shape, 400, dtype=np.uint16)
    for k, (start, size) in enumerate(zip(origin, shape, strict=True)):
        axis = np.arange(start, start + size, dtype=np.float32)
        profile = (150 * (1 + np.sin(axis / np.float32(37 + 11 * k)))).astype(np.uint16)
        pixels += profile.reshape([size if a == k else 1 for a in range(len(shape))])
    pixels += rng.integers(0, 64, size=shape, dtype=np.uint16)
    return pixels


def ensure_store(folder: Path, case: Case) -> Path:
    """Write the case's OME-Zarr image once (reused when it is already there)."""
    import zarr
    from zarr.codecs import BloscCodec

    path = folder / f"{case.name.lower()}.ome.zarr"
    if path.exists():
        try:
            array = zarr.open_array(str(path / "0"), mode="r")
            if array.shape == case.shape and array.chunks == case.chunks:
                return path
        except Exception:
            pass
        shutil.rmtree(path)
    start = time.perf_counter()
    group = zarr.open_group(str(path), mode="w", zarr_format=3)
    array = group.create_array(
        "0",
        shape=case.shape,
        chunks=case.chunks,
        dtype=np.uint16,
        compressors=BloscCodec(cname="zstd", clevel=3, shuffle="shuffle"),
    )
    rng = np.random.default_rng(2026)
    # Slabs of one chunk along the first axis and at most 64 MiB.
    step = list(case.chunks)
    for axis in range(1, len(case.shape)):
        step[axis] = case.shape[axis]
    while int(np.prod(step)) * 2 > 64 << 20 and step[1] > case.chunks[1]:
        step[1] = max(case.chunks[1], step[1] // 2 // case.chunks[1] * case.chunks[1])
    for origin in np.ndindex(*(-(-n // s) for n, s in zip(case.shape, step, strict=True))):
        low = [o * s for o, s in zip(origin, step, strict=True)]
        high = [min(lo + s, n) for lo, s, n in zip(low, step, case.shape, strict=True)]
        size = tuple(h - lo for lo, h in zip(low, high, strict=True))
        array[tuple(slice(lo, h) for lo, h in zip(low, high, strict=True))] = _slab(
            rng, tuple(low), size
        )
    group.attrs["ome"] = {
        "version": "0.5",
        "multiscales": [
            {
                "axes": [{"name": a, "type": "space"} for a in case.axes],
                "datasets": [
                    {
                        "path": "0",
                        "coordinateTransformations": [
                            {"type": "scale", "scale": [1.0] * len(case.shape)}
                        ],
                    }
                ],
            }
        ],
    }
    stored = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    print(
        f"wrote {path} ({fmt_bytes(case.raw_bytes)} raw, {fmt_bytes(stored)} stored) in "
        f"{time.perf_counter() - start:.1f} s",
        flush=True,
    )
    return path


# -- the baselines -----------------------------------------------------------------------


_CAREAMICS: list[tuple[Any, str]] = []


def careamics_stack_class() -> tuple[Any, str]:
    """CAREamics' ZarrImageStack, loaded once from its files without CAREamics' __init__."""
    if not _CAREAMICS:
        _CAREAMICS.append(_load_careamics_stack())
    return _CAREAMICS[0]


def _load_careamics_stack() -> tuple[Any, str]:
    try:
        spec = importlib.util.find_spec("careamics")
        if spec is None or not spec.submodule_search_locations:
            return None, "careamics is not installed"
        root = Path(next(iter(spec.submodule_search_locations)))
        # CAREamics' package __init__ imports PyTorch Lightning and more; the
        # zarr stack needs only NumPy, zarr and two helper modules.
        for name, folder in (
            ("careamics", root),
            ("careamics.utils", root / "utils"),
            ("careamics.dataset", root / "dataset"),
            ("careamics.dataset.image_stack", root / "dataset" / "image_stack"),
            (
                "careamics.dataset.image_stack.image_utils",
                root / "dataset" / "image_stack" / "image_utils",
            ),
        ):
            if name not in sys.modules:
                package = types.ModuleType(name)
                package.__path__ = [str(folder)]
                sys.modules[name] = package
        module = importlib.import_module("careamics.dataset.image_stack.zarr_image_stack")
        return module.ZarrImageStack, "CAREamics 0.3.5 ZarrImageStack.extract_patch"
    except Exception as error:  # a different CAREamics layout: say why
        return None, f"CAREamics' ZarrImageStack did not load ({type(error).__name__}: {error})"


def rate_for(
    seconds: float, step: Callable[[int], int], limit: int, min_steps: int = 1
) -> tuple[float, int]:
    """Run ``step(k)`` (returning patches done) for ``seconds`` and at least ``min_steps``.

    Returns (patches/s, patches).
    """
    done = 0
    start = time.perf_counter()
    k = 0
    while k < limit:
        done += step(k)
        k += 1
        if k >= min_steps and time.perf_counter() - start >= seconds:
            break
    return done / (time.perf_counter() - start), done


def per_patch_rate(array: Any, rows: Any, seconds: float) -> tuple[float, int]:
    patch = rows.patch_size

    def one(k: int) -> int:
        corner = rows.coords[k].tolist()
        np.asarray(array[tuple(slice(c, c + p) for c, p in zip(corner, patch, strict=True))])
        return 1

    return rate_for(seconds, one, len(rows))


def careamics_rate(cls: Any, path: Path, case: Case, rows: Any, seconds: float) -> float:
    import zarr

    stack = cls(zarr.open_group(str(path), mode="r"), "0", case.axes.upper())

    def one(k: int) -> int:
        stack.extract_patch(0, None, rows.coords[k].tolist(), rows.patch_size)
        return 1

    return rate_for(seconds, one, len(rows))[0]


def loader_batches(loader: PatchLoader) -> Generator[Any, None, None]:
    """The loader's batches of patches, as a generator the caller may close early."""
    for patches, _ in loader:
        yield patches


def loader_rate(
    stack: Any, strategy: Any, shuffle: bool, workers: int, seconds: float, min_batches: int
) -> tuple[float, int, ChunkReader]:
    """Patches/s and patches of a fresh PatchLoader (its default read-ahead)."""
    loader = PatchLoader([stack], strategy, BATCH, shuffle=shuffle, workers=workers)
    batches = loader_batches(loader)
    rate, done = rate_for(seconds, lambda k: len(next(batches)), len(loader), min_batches)
    batches.close()
    assert loader._reader is not None
    return rate, done, loader._reader


def reads_per_patch_of_slicing(stack: Any, rows: Any, done: int) -> float:
    """Chunks per patch a per-patch read decodes: the chunks each patch touches."""
    part = rows[:done]
    host = (
        part.data_idx.astype(np.int64),
        part.sample_idx.astype(np.int64),
        part.coords.astype(np.int64),
    )
    plan = plan_chunks([stack.shape], [stack.chunks], host, tuple(rows.patch_size))
    return len(plan.piece_row) / max(1, done)


def per_batch_rate(
    stack: Any, rows: Any, workers: int, seconds: float
) -> tuple[float, int, ChunkReader]:
    """Patches/s and patches of the reader one batch at a time (read_ahead=1)."""
    reader = ChunkReader([stack], workers=workers)
    batches = reader.batches(rows, BATCH, read_ahead=1)
    rate, done = rate_for(seconds, lambda k: len(next(batches)[0]), -(-len(rows) // BATCH), 3)
    batches.close()  # type: ignore[attr-defined]
    return rate, done, reader


def reads_note(reader: ChunkReader, done: int) -> tuple[str, str]:
    """Chunk reads per patch handed over (reads ahead included), and the cache's share."""
    touched = reader.chunks_read + reader.cache_hits
    return (
        f"{reader.chunks_read / max(1, done):.3f}",
        f"{reader.chunks_read:,} read, {reader.cache_hits:,} cached "
        f"({reader.cache_hits / max(1, touched):.0%})",
    )


# -- the reader choice -------------------------------------------------------------------


def reader_choice(path: Path, case: Case, tensorstore_path: str | None) -> list[str]:
    """The same chunks read four ways: ms per chunk."""
    stack = open_stack(path)
    grid = stack.chunk_grid[2:]
    n_chunks = min(24, int(np.prod(grid)))
    picks = np.random.default_rng(1).choice(int(np.prod(grid)), n_chunks, replace=False)
    indices = [np.unravel_index(int(p), grid) for p in picks]
    boxes = [
        tuple(
            slice(int(i) * c, min((int(i) + 1) * c, n))
            for i, c, n in zip(ix, case.chunks, case.shape, strict=True)
        )
        for ix in indices
    ]
    array = stack.array
    results: list[tuple[str, float | None, str]] = []

    def best(function: Callable[[], Any], repeats: int = 3) -> float:
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            function()
            times.append(time.perf_counter() - start)
        return min(times) / n_chunks

    results.append(
        ("zarr, one synchronous read per chunk", best(lambda: [array[b] for b in boxes]), "")
    )
    with ThreadPoolExecutor(2) as pool:
        results.append(
            (
                "zarr, synchronous reads from a pool of 2 threads",
                best(lambda: list(pool.map(lambda b: array[b], boxes))),
                "",
            )
        )
    # One patch at each chunk's origin: the reader reads exactly these chunks.
    coords = np.array([[b.start for b in box] for box in boxes], dtype=np.int64)
    rows = (np.zeros(n_chunks, np.int64), np.zeros(n_chunks, np.int64), coords)
    for workers in (1, 2):
        # memory="call": `workers` reads in flight, not held back by a budget.
        reader = ChunkReader([stack], cache_bytes=0, workers=workers, memory="call")
        results.append(
            (
                f"zarr async (ChunkReader, {workers} in flight)",
                best(functools.partial(reader.read, rows, (1,) * len(case.shape))),
                "ours",
            )
        )
    if tensorstore_path:
        sys.path.insert(0, tensorstore_path)
    try:
        import tensorstore as ts

        handle = ts.open(
            {
                "driver": "zarr3",
                "kvstore": {"driver": "file", "path": str(path / "0")},
                "context": {
                    "cache_pool": {"total_bytes_limit": 0},
                    "data_copy_concurrency": {"limit": 2},
                },
            },
            read=True,
        ).result()
        results.append(
            (
                f"TensorStore {_version('tensorstore')}, all reads issued at once "
                "(2 copy threads, no cache)",
                best(lambda: [f.result() for f in [handle[b].read() for b in boxes]]),
                "",
            )
        )
    except ImportError:
        results.append(("TensorStore", None, "not installed (optional; not a dependency)"))
    ours = min(r[1] for r in results if r[2] == "ours" and r[1] is not None)
    rows_md = [
        [name, "n/a" if value is None else fmt_time(value), note or fmt_ratio(value, ours, 2)]
        for name, value, note in results
    ]
    lines = [
        f"### Choosing the reader ({case.name} store, {n_chunks} chunks of "
        f"{fmt_bytes(stack.chunk_bytes)}, best of 3)",
        "",
        *markdown_table(["reader", "time per chunk", "vs ours (x = ours faster)"], rows_md, "lrr"),
        "",
    ]
    ts_rows = [r for r in results if r[0].startswith("TensorStore ") and r[1] is not None]
    if ts_rows:
        ts_time = ts_rows[0][1]
        assert ts_time is not None
        verdict = (
            "faster than ours by more than 20%: worth adopting"
            if ts_time < 0.8 * ours
            else "within 20% of ours or slower"
        )
        lines += [
            f"TensorStore: {fmt_time(ts_time)} per chunk, {verdict}. The chunks' decode "
            "dominates both; ours stays on zarr's asynchronous API, which needs no extra "
            "dependency and also reads TIFFs through tifffile's zarr store.",
            "",
        ]
    return lines


# -- one case ----------------------------------------------------------------------------


def run_case(path: Path, case: Case, seconds: float, report: Report) -> dict[Any, Any]:
    import zarr

    stack = open_stack(path)  # OME-Zarr: level 0, axes from the metadata
    array = zarr.open_array(str(path / "0"), mode="r")
    strategy = StratifiedPatching([stack.shape], case.patch, seed=0)
    shuffled = strategy.sample_epoch(0, shuffle=True).to_numpy()
    batch_bytes = BATCH * int(np.prod(case.patch)) * 2
    report.emit(
        f"### {case.name}: {'x'.join(map(str, case.shape))} uint16 "
        f"({fmt_bytes(case.raw_bytes)} raw), chunks {'x'.join(map(str, case.chunks))} "
        f"({fmt_bytes(stack.chunk_bytes)}), patches {'x'.join(map(str, case.patch))}, "
        f"batch {BATCH}, {strategy.n_patches:,} patches per epoch",
        "",
        f"({load_line()} as this case starts.)",
        "",
    )
    slicing, done = per_patch_rate(array, shuffled, seconds)
    slicing_reads = reads_per_patch_of_slicing(stack, shuffled, done)
    rows: list[list[str]] = [
        [
            "per-patch zarr slicing",
            "shuffled",
            "1",
            fmt_rate(slicing),
            "x1",
            f"{slicing_reads:.3f}",
            "(no cache)",
        ]
    ]
    cls, why = careamics_stack_class()
    if cls is not None:
        rate = careamics_rate(cls, path, case, shuffled, seconds)
        rows.append([why, "shuffled", "1", fmt_rate(rate), fmt_ratio(rate, slicing, 2), "same", ""])
    else:
        rows.append(["CAREamics ZarrImageStack", "shuffled", "1", "n/a", "n/a", "", why])
    # Keyed by name, or by (order, workers) and (order, workers, "reads").
    figures: dict[Any, Any] = {"slicing": slicing, "slicing_reads": slicing_reads}
    rate, done, reader = per_batch_rate(stack, shuffled, 2, seconds)
    rows.append(
        [
            "ours, one batch at a time (read_ahead=1)",
            "shuffled",
            "2",
            fmt_rate(rate),
            fmt_ratio(rate, slicing, 1),
            *reads_note(reader, done),
        ]
    )
    del reader
    gc.collect()
    window = ChunkReader([stack]).read_ahead(batch_bytes)
    for shuffle in (True, False):
        for workers in (1, 2):
            # Shuffled: at least two full windows after the first batch, so
            # that the figure is not the first window's cold start alone.
            min_batches = 1 + 2 * window if shuffle else 1
            rate, done, reader = loader_rate(
                stack, strategy, shuffle, workers, seconds, min_batches
            )
            order = "shuffled" if shuffle else "plain"
            reads, note = reads_note(reader, done)
            rows.append(
                [
                    f"ours (PatchLoader: {window} batches read at once)",
                    order,
                    str(workers),
                    fmt_rate(rate),
                    fmt_ratio(rate, slicing, 1),
                    reads,
                    note,
                ]
            )
            figures[(order, workers)] = rate
            figures[(order, workers, "reads")] = reader.chunks_read / max(1, done)
            del reader
            gc.collect()
    report.emit(
        *markdown_table(
            [
                "method",
                "order",
                "threads",
                "patches/s",
                "vs slicing",
                "chunk reads per patch",
                "chunks",
            ],
            rows,
            "llrrrrl",
        ),
        "",
    )

    # Time to the first batch (a fresh loader, cold cache), then peak memory
    # under tracemalloc: ours vs reading the whole stack.
    gc.collect()
    start = time.perf_counter()
    loader = PatchLoader([stack], strategy, BATCH, shuffle=True, workers=2)
    first_pass = iter(loader)
    next(first_pass)
    first_ours = time.perf_counter() - start
    first_pass.close()  # type: ignore[attr-defined]
    del loader, first_pass
    gc.collect()
    tracemalloc.start()
    start = time.perf_counter()
    loader = PatchLoader([stack], strategy, BATCH, shuffle=True, workers=2)
    batches = loader_batches(loader)
    next(batches)
    n_batches = 1
    # As long as the shuffled throughput runs: the cache and the windows fill.
    while n_batches < len(loader) and (
        n_batches < 1 + 2 * window or time.perf_counter() - start < seconds
    ):
        next(batches)
        n_batches += 1
    batches.close()
    _, peak_ours = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    del loader, batches
    gc.collect()
    tracemalloc.start()
    start = time.perf_counter()
    whole = np.asarray(array[...])
    first_batch = shuffled[:BATCH]
    rows_whole = (
        np.zeros(BATCH, np.int64),
        np.zeros(BATCH, np.int64),
        first_batch.coords.astype(np.int64),
    )
    view = whole.reshape(stack.shape)
    extract_patches([view], first_batch)
    first_whole = time.perf_counter() - start
    _, peak_whole = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    del whole, view
    gc.collect()
    cache = default_cache_bytes([stack])
    bound = cache + 2 * batch_bytes
    report.emit(
        *markdown_table(
            ["", "time to first batch", "peak memory (tracemalloc)"],
            [
                [
                    "ours (shuffled, 2 in flight)",
                    fmt_time(first_ours),
                    f"{fmt_bytes(peak_ours)} over {n_batches} batches",
                ],
                ["read the whole stack first", fmt_time(first_whole), fmt_bytes(peak_whole)],
            ],
            "lrr",
        ),
        "",
        "(The whole-stack read is timed with tracemalloc on: it makes a few large "
        "allocations, so the tracing costs it little.)",
        "",
        f"Memory bound of ours: cache_bytes {fmt_bytes(cache)} (the cached "
        "chunks, the reads in flight, the batches read ahead, the epoch's rows and the "
        "reads' bookkeeping) + two batches "
        f"({fmt_bytes(2 * batch_bytes)}) = {fmt_bytes(bound)}; peak {fmt_bytes(peak_ours)}: "
        f"within: {fmt_verdict(peak_ours <= bound)}.",
        "",
    )

    # Device output: what an upload of the assembled batch moves, against
    # uploading the chunks it touches to crop them on the device.
    plan = plan_chunks([stack.shape], [stack.chunks], rows_whole, case.patch)
    chunk_bytes = len(plan.chunk) * stack.chunk_bytes
    report.emit(
        f"Device output (first shuffled batch): the assembled batch is {fmt_bytes(batch_bytes)}; "
        f"the {len(plan.chunk)} chunks it touches are {fmt_bytes(chunk_bytes)} "
        f"({fmt_ratio(chunk_bytes, batch_bytes)} the bytes to copy over PCIe).",
        "",
    )
    figures.update(first_ours=first_ours, first_whole=first_whole, peak=peak_ours, bound=bound)
    return figures


# -- peak resident memory against cache_bytes -------------------------------------------

#: 256 MiB stores (uint16) for the memory rows, as in issue 20.
MEMORY_CASES = [
    Case("memory-2d", (8192, 16384), (1024, 1024), (64, 64)),
    Case("memory-3d", (64, 1024, 2048), (64, 256, 256), (16, 64, 64)),
]
#: The budgets measured: 64 MiB, 256 MiB and the default (None).
MEMORY_CACHES: list[int | None] = [64 << 20, 256 << 20, None]

# The measuring process: argv[1] is a JSON {"path", "patch", "cache_bytes"}; it
# prints one JSON line of resident memory figures (bytes) and the reader's counts.
MEMORY_CHILD = (
    PROC_MEMORY
    + r"""
import json, sys
job = json.loads(sys.argv[1])
interpreter = status("VmRSS")
from gpu_patching import PatchLoader, StratifiedPatching
from gpu_patching.stores import open_stack
stack = open_stack(job["path"])
strategy = StratifiedPatching([stack.shape], tuple(job["patch"]), seed=0)
options = {} if job["cache_bytes"] is None else {"cache_bytes": job["cache_bytes"]}
loader = PatchLoader([stack], strategy, job["batch"], shuffle=True, **options)
before = status("VmRSS")
if not reset_peak():  # VmHWM from here on: the epoch's own peak
    raise SystemExit("cannot reset VmHWM: /proc/self/clear_refs is not writable")
batches = 0
for patches, batch in loader:
    batches += 1
peak = status("VmHWM")
reader = loader._reader
rows = strategy.sample_epoch(0, shuffle=True).to_numpy()
print(json.dumps({
    "interpreter": interpreter, "before": before, "peak": peak,
    "cache_bytes": reader.cache_bytes, "peak_cached": reader.peak_cached_bytes,
    "peak_held": reader.peak_held_bytes, "peak_reads": reader.peak_reads_in_flight,
    "floor": reader.pass_floor_bytes(rows, job["batch"]),
    "chunks_read": reader.chunks_read, "cache_hits": reader.cache_hits, "batches": batches,
}))
"""
)


def measure_epoch_memory(path: Path, case: Case, cache_bytes: int | None) -> dict[str, Any]:
    """One shuffled epoch of the store in a fresh process: its resident memory figures."""
    job = {"path": str(path), "patch": case.patch, "batch": BATCH, "cache_bytes": cache_bytes}
    return run_child(MEMORY_CHILD, job, "the memory measurement")


def memory_section(folder: Path, report: Report) -> None:
    """Peak resident memory of an epoch against cache_bytes, on 256 MiB stores."""
    report.emit(
        "## Peak memory against cache_bytes (issue 20)",
        "",
        f"Machine: {machine_line()}; {load_line()} at the start. One shuffled epoch of "
        f"`PatchLoader` (batches of {BATCH}, default workers and read-ahead, "
        f"{DECODE_THREADS} decoding threads) per row, each in a fresh process. *before*: "
        "resident memory before the epoch (interpreter, imports, the open store, the "
        "sampler); *peak*: the epoch's resident high-water mark (`VmHWM`, reset first); "
        "*beyond*: peak - before - budget - two batches, what the bound "
        "`peak <= before + budget + 2 x batch bytes + overhead` must add, where the budget "
        "is cache_bytes, or the pass's floor (`ChunkReader.pass_floor_bytes`: one read of "
        "three chunk sizes, the epoch's rows, a batch's bookkeeping) when that is larger. "
        "*held*: the most bytes the reader counted at once (`ChunkReader.peak_held_bytes`: "
        "cached chunks, reads in flight, batches read ahead, rows), within the budget; "
        "*reads*: the most reads in flight at once; *cached*: the most bytes of chunks the "
        "cache held (`ChunkReader.peak_cached_bytes`).",
        "",
    )
    worst = 0
    for case in MEMORY_CASES:
        path = ensure_store(folder, case)
        stack = open_stack(path)
        batch_bytes = BATCH * int(np.prod(case.patch)) * 2
        rows = []
        for cache_bytes in MEMORY_CACHES:
            figures = measure_epoch_memory(path, case, cache_bytes)
            during = figures["peak"] - figures["before"]
            budget = max(figures["cache_bytes"], figures["floor"])
            beyond = during - budget - 2 * batch_bytes
            worst = max(worst, beyond)
            label = "default" if cache_bytes is None else "set"
            rows.append(
                [
                    f"{fmt_bytes(figures['cache_bytes'])} ({label})",
                    fmt_bytes(figures["before"]),
                    fmt_bytes(figures["peak"]),
                    fmt_bytes(during),
                    fmt_bytes(beyond),
                    fmt_bytes(figures["peak_held"]),
                    str(figures["peak_reads"]),
                    fmt_bytes(figures["peak_cached"]),
                    f"{figures['chunks_read']:,}",
                ]
            )
        report.emit(
            f"### {case.name}: {'x'.join(map(str, case.shape))} uint16 "
            f"({fmt_bytes(case.raw_bytes)}), chunks {'x'.join(map(str, case.chunks))} "
            f"({fmt_bytes(stack.chunk_bytes)}), patches {'x'.join(map(str, case.patch))}, "
            f"two batches {fmt_bytes(2 * batch_bytes)}",
            "",
            *markdown_table(
                [
                    "cache_bytes",
                    "before",
                    "peak",
                    "peak - before",
                    "beyond budget + 2 batches",
                    "held",
                    "reads",
                    "cached",
                    "chunks read",
                ],
                rows,
                "lrrrrrrrr",
            ),
            "",
            f"A read in flight counts 3 x {fmt_bytes(stack.chunk_bytes)}; up to "
            f"{DEFAULT_WORKERS} workers read at once when the budget has room for them "
            "beside the batches read ahead, fewer (at least one) when it has not.",
            "",
        )
    report.emit(
        f"Largest overhead beyond the budget + two batches: {fmt_bytes(worst)} "
        f"({load_line()} at the end).",
        "",
    )


# -- chunk order against the shuffled order (issue 22) ----------------------------------

CHUNK_HEADING = "## Chunk order against the shuffled order (issue 22)"
RANKS_HEADING = "## Two ranks in chunk order (issue 22)"
S3_HEADING = "## Over a local S3 server: orders, per-patch reads, fsspec and obstore (issue 22)"
#: Seconds of the shuffled order's epoch measured on the full-size stores (a whole
#: epoch of it takes minutes); its decodes per patch hardly change along an epoch.
SHUFFLED_SECONDS = 60.0
#: Seconds of per-patch reads over S3 on the full-size run (about 40 requests a
#: second on this server: a whole epoch would take minutes); the time is scaled.
PER_PATCH_SECONDS = 30.0
#: The store uploaded to the S3 server: small enough to upload in seconds, with
#: enough chunks (256 of 128 KiB) for the orders to differ.
#: The S3 section's image is this many times the loaders' cache_bytes.
S3_STORE_PER_CACHE = 4
S3_CASES = {
    False: Case("s3-2D", (4096, 4096), (256, 256), (64, 64)),
    True: Case("s3-2D", (1024, 1024), (128, 128), (64, 64)),
}


def host_rows(rows: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A PatchBatch's columns as the int64 arrays plan_chunks and ChunkReader take."""
    return (
        np.asarray(rows.data_idx, dtype=np.int64),
        np.asarray(rows.sample_idx, dtype=np.int64),
        np.asarray(rows.coords, dtype=np.int64),
    )


def chunks_touched(stack: Any, rows: Any) -> int:
    """Chunks the rows' patches touch, each once: the decodes an epoch cannot go below."""
    return len(plan_chunks([stack.shape], [stack.chunks], host_rows(rows), rows.patch_size).chunk)


def decode_every_chunk(stack: Any) -> int:
    """Read every chunk of a one-sample stack once through ChunkReader; return the count.

    One pixel at each chunk's origin, no cache, every chunk of the call read
    with the loader's default reads in flight: the decode floor of an epoch.
    """
    grid = stack.chunk_grid[2:]
    origins = np.stack(
        [g.ravel() * c for g, c in zip(np.indices(grid), stack.chunks[2:], strict=True)], axis=1
    ).astype(np.int64)
    zeros = np.zeros(len(origins), np.int64)
    reader = ChunkReader([stack], cache_bytes=0, memory="call")
    reader.read((zeros, zeros, origins), (1,) * origins.shape[1])
    return reader.chunks_read


def epoch_reads(loader: PatchLoader, seconds: float = float("inf")) -> tuple[int, int]:
    """Run ``loader``'s epoch (or its first ``seconds``); return (patches, chunks decoded)."""
    start = time.perf_counter()
    done = 0
    batches = iter(loader)
    for _, batch in batches:
        done += len(batch)
        if time.perf_counter() - start >= seconds:
            break
    batches.close()  # type: ignore[attr-defined]
    assert loader._reader is not None
    return done, loader._reader.chunks_read


@contextlib.contextmanager
def patches_not_copied() -> Iterator[None]:
    """Within: ``ChunkReader`` reads every chunk as it would and copies no patch out of it.

    A diagnostic, not a mode of the library: an epoch read this way costs
    what the chunk order costs beyond the patches' copy (decodes, planning,
    windows, batches), so the copy's share is the difference.
    """
    cut = reader_module.cut_pieces
    reader_module.cut_pieces = lambda *args: None  # type: ignore[assignment]
    try:
        yield
    finally:
        reader_module.cut_pieces = cut


def cpu_seconds() -> float:
    """User and system CPU time of this process (every thread) so far."""
    return time.process_time()


def chunk_order_case(path: Path, case: Case, quick: bool) -> dict[str, Any]:
    """Decodes, epoch times and CPU times of the floor, the shuffled order and the chunk order."""
    stack = open_stack(path)
    strategy = StratifiedPatching([stack.shape], case.patch, seed=0)
    n_patches = strategy.n_patches
    touched = chunks_touched(stack, strategy.sample_epoch(0, shuffle=True))
    figures: dict[str, Any] = {"patches": n_patches, "touched": touched}
    cpu: dict[str, list[float]] = {"floor": [], "chunks": [], "uncut": []}

    def floor(_k: int) -> None:
        start = cpu_seconds()
        figures["floor_decodes"] = decode_every_chunk(stack)
        cpu["floor"].append(cpu_seconds() - start)

    def chunks(_k: int) -> None:
        loader = PatchLoader([stack], strategy, BATCH, shuffle=True, order="chunks")
        start = cpu_seconds()
        figures["chunks_done"], figures["chunks_decodes"] = epoch_reads(loader)
        cpu["chunks"].append(cpu_seconds() - start)
        del loader
        gc.collect()

    def uncut(_k: int) -> None:
        loader = PatchLoader([stack], strategy, BATCH, shuffle=True, order="chunks")
        start = cpu_seconds()
        with patches_not_copied():
            figures["uncut_done"], figures["uncut_decodes"] = epoch_reads(loader)
        cpu["uncut"].append(cpu_seconds() - start)
        del loader
        gc.collect()

    # Side by side, each from a cold cache; the store's pages are in the OS
    # cache after the first turn for all alike. Each figure is its best turn.
    times = in_turns(
        {"floor": floor, "chunks": chunks, "uncut": uncut}, 1 if quick else 3, rotate=True
    )
    for name, values in times.items():
        figures[f"{name}_time"] = min(values)
        figures[f"{name}_cpu"] = min(cpu[name])
    loader = PatchLoader([stack], strategy, BATCH, shuffle=True)
    start = time.perf_counter()
    done, decodes = epoch_reads(loader, float("inf") if quick else SHUFFLED_SECONDS)
    figures["shuffled_time"] = (time.perf_counter() - start) * n_patches / max(1, done)
    figures["shuffled_done"], figures["shuffled_decodes"] = done, decodes
    del loader
    gc.collect()
    return figures


def chunk_order_cases(selected: list[Case]) -> list[Case]:
    """The cases of the chunk-order section: each case, and the 2D one with 128x128 patches.

    The same 2D store with a quarter as many patches, four times as large:
    the same bytes copied out, a quarter of the per-patch work.
    """
    extra = [
        Case(c.name, c.shape, c.chunks, tuple(2 * p for p in c.patch))
        for c in selected
        if len(c.shape) == 2
    ]
    return [*selected, *extra]


def chunk_order_row(f: dict[str, Any], label: str, key: str, done: int, decodes: int) -> list[str]:
    """One row of a chunk-order table: figures ``key`` of ``f`` against the floor's."""
    per_patch = decodes / max(1, done)
    cpu = f.get(f"{key}_cpu")
    return [
        label,
        f"{done:,}",
        f"{decodes:,}",
        f"{per_patch:.4f}",
        fmt_ratio(per_patch, f["touched"] / f["patches"], 1),
        fmt_time(f[f"{key}_time"]),
        fmt_ratio(f[f"{key}_time"], f["floor_time"], 2),
        "-" if cpu is None else fmt_time(cpu),
        "-" if cpu is None else fmt_ratio(cpu, f["floor_cpu"], 2),
    ]


def chunk_order_section(folder: Path, selected: list[Case], quick: bool, report: Report) -> None:
    """Chunk decodes per patch, epoch and CPU time: shuffled order, chunk order, the floor."""
    report.emit(
        CHUNK_HEADING,
        "",
        f"Machine: {machine_line()}; {load_line()} at the start. One epoch of `PatchLoader` "
        f"(batches of {BATCH}, default cache, reads in flight and read-ahead) in the "
        "shuffled order (the default) and with `order='chunks'` (the same patches grouped by "
        "chunk), each from a fresh loader (cold cache). *Floor*: every chunk the epoch "
        "touches, decoded once (chunks touched / patches); its time is every chunk of the "
        "store read once through the same reader (`ChunkReader`, no cache, the default "
        "reads in flight), the least an epoch of compressed data can take. *No patch "
        "copied* (a diagnostic, not a mode of the library): the chunk-order epoch with "
        "`ChunkReader`'s cut-out replaced by nothing, every chunk read and every batch handed "
        "over as before, so the difference to `order='chunks'` is the cost of copying the "
        "patches out of the chunks. *CPU*: user and system time of the process (every "
        "thread). The floor and the two chunk-order epochs take turns"
        + ("" if quick else " (best of 3, each turn in another order)")
        + ("" if quick else f"; the shuffled order runs for {SHUFFLED_SECONDS:g} s ")
        + ("." if quick else "and its epoch time is scaled from the patches it handed over."),
        "",
    )
    summary = []
    for case in chunk_order_cases(selected):
        path = ensure_store(folder, case)
        f = chunk_order_case(path, case, quick)
        floor = f["touched"] / f["patches"]
        shuffled = f["shuffled_decodes"] / max(1, f["shuffled_done"])
        part = (
            "" if f["shuffled_done"] >= f["patches"] else f" (first {f['shuffled_done']:,}, scaled)"
        )

        rows = [
            chunk_order_row(f, "floor: every chunk once", "floor", f["patches"], f["touched"]),
            chunk_order_row(
                f,
                "shuffled (default)" + part,
                "shuffled",
                f["shuffled_done"],
                f["shuffled_decodes"],
            ),
            chunk_order_row(f, "order='chunks'", "chunks", f["chunks_done"], f["chunks_decodes"]),
            chunk_order_row(
                f,
                "order='chunks', no patch copied (diagnostic)",
                "uncut",
                f["uncut_done"],
                f["uncut_decodes"],
            ),
        ]
        rows[0][4] = rows[0][6] = rows[0][8] = "x1"
        patch_bytes = 2 * math.prod(case.patch)
        report.emit(
            f"### {case.name}: {'x'.join(map(str, case.shape))} uint16, chunks "
            f"{'x'.join(map(str, case.chunks))}, patches {'x'.join(map(str, case.patch))} "
            f"({fmt_bytes(patch_bytes)})",
            "",
            *markdown_table(
                [
                    "order",
                    "patches",
                    "chunk decodes",
                    "decodes per patch",
                    "x floor",
                    "epoch time",
                    "x decode-once time",
                    "CPU",
                    "x decode-once CPU",
                ],
                rows,
                "lrrrrrrrr",
            ),
            "",
        )
        ratio = f["chunks_time"] / f["floor_time"]
        summary.append(
            [
                f"{case.name}, patches {'x'.join(map(str, case.patch))}",
                f"{f['patches']:,}",
                fmt_ratio(shuffled, floor, 1),
                fmt_ratio(f["chunks_decodes"] / max(1, f["chunks_done"]), floor, 1),
                fmt_ratio(ratio, 1, 2),
                fmt_ratio(f["uncut_time"] / f["floor_time"], 1, 2),
                fmt_ratio(f["chunks_cpu"] / f["floor_cpu"], 1, 2),
                fmt_verdict(ratio <= 1.5),
            ]
        )
    report.emit(
        "### Summary (target: a chunk-order epoch at most x1.5 the time to decode the store once)",
        "",
        *markdown_table(
            [
                "case",
                "patches",
                "shuffled: decodes x floor",
                "chunks: decodes x floor",
                "chunks: epoch / decode once",
                "no patch copied: epoch / decode once",
                "chunks: CPU / decode-once CPU",
                "x1.5 met",
            ],
            summary,
            "lrrrrrrr",
        ),
        "",
        f"{load_line()} at the end.",
        "",
    )


# -- batch diversity: chunk order against the shuffled order (issue 22) -----------------

DIVERSITY_HEADING = "## Batch diversity: chunk order against the shuffled order (issue 22)"
#: The chunk windows of the diversity table (DEFAULT_CHUNK_WINDOW among them).
DIVERSITY_WINDOWS = (1, 2, 4, 8, 16)


def empty_store(folder: Path, case: Case) -> Any:
    """The case's array as a zarr store with no chunk written (only its metadata on disk).

    The order of an epoch depends on the shapes, the chunking and the cache
    (which follows the store's size), never on the values: the diversity
    section needs no data.
    """
    import zarr

    path = folder / f"diversity-{case.name.lower()}.zarr"
    zarr.create_array(
        str(path), shape=case.shape, chunks=case.chunks, dtype=np.uint16, overwrite=True
    )
    return open_stack(path, axes=case.axes.upper())


def diversity_rows(
    stack: Any, strategy: StratifiedPatching, window: int | None
) -> tuple[Any, tuple[int, ...] | None]:
    """Epoch 0's rows as ``PatchLoader`` (batches of :data:`BATCH`, defaults) takes them.

    ``window=None``: the shuffled order; else ``order="chunks"`` with that
    ``chunk_window`` and the tile the loader picks for its default cache
    (returned beside the rows; ``None`` for the shuffled order).
    """
    if window is None:
        return strategy.sample_epoch(0, shuffle=True).to_numpy(), None
    loader = PatchLoader(
        [stack], strategy, BATCH, shuffle=True, order="chunks", chunk_window=window
    )
    tile = loader.chunk_tile
    plain = strategy.sample_epoch(0).to_numpy()
    order = chunk_order(
        plain, [stack.chunks], seed=strategy.seed, epoch=0, window=window, tile=tile
    )
    return plain[order.rows], tile


def _distinct_per_batch(ids: np.ndarray, batch: int) -> np.ndarray:
    """Distinct values among the ``ids`` rows of each whole batch of ``batch`` rows."""
    n_batches = len(ids) // batch
    per_batch = np.sort(ids[: n_batches * batch].reshape(n_batches, -1), axis=1)
    return 1 + np.count_nonzero(np.diff(per_batch, axis=1), axis=1)


def batch_diversity(
    rows: Any,
    data_shapes: list[tuple[int, ...]],
    chunks: list[tuple[int, ...]],
    batch: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Distinct regions and distinct chunks of each whole batch of ``batch`` rows.

    A patch's region is its sampling cell (stack, sample, the grid cell of its
    corner); its chunks are every chunk it overlaps (up to ``2^d``: one or two
    per axis), counted once per batch wherever several patches share one.
    ``data_shapes`` and ``chunks`` are each stack's ``SC(Z)YX`` shape and chunk
    shape. A last, shorter batch is left out.
    """
    data_idx, sample_idx, coords = host_rows(rows)
    coords = coords.reshape(len(data_idx), -1)
    patch = np.asarray(rows.patch_size, dtype=np.int64)
    cells = np.asarray([grid_shape(shape[2:], rows.patch_size) for shape in data_shapes])
    cell = np.minimum(coords // patch, cells[data_idx] - 1)  # the last cell takes the edge
    region = np.column_stack([data_idx, sample_idx, cell])
    _, region_id = np.unique(region, axis=0, return_inverse=True)
    size = np.asarray(chunks, dtype=np.int64)[data_idx]
    first = coords // size[:, 2:]
    last = (coords + patch - 1) // size[:, 2:]
    keys = []
    for corner in itertools.product((False, True), repeat=coords.shape[1]):
        spatial = np.where(np.asarray(corner), last, first)
        keys.append(np.column_stack([data_idx, sample_idx // size[:, 0], spatial]))
    stacked = np.stack(keys, axis=1)  # (rows, 2^d, key)
    _, chunk_id = np.unique(stacked.reshape(-1, stacked.shape[2]), axis=0, return_inverse=True)
    chunk_id = chunk_id.reshape(len(data_idx), -1)
    return (
        _distinct_per_batch(region_id.reshape(-1, 1), batch),
        _distinct_per_batch(chunk_id, batch),
    )


def _spread(values: np.ndarray) -> list[str]:
    """Mean, 5th percentile and minimum of per-batch counts, as table cells."""
    return [
        f"{values.mean():.1f}",
        f"{np.percentile(values, 5):.1f}",
        f"{values.min():,}",
    ]


def diversity_section(folder: Path, selected: list[Case], report: Report) -> None:
    """Distinct regions and chunks per batch: the shuffled order, chunk order by window."""
    report.emit(
        DIVERSITY_HEADING,
        "",
        f"Epoch 0 (seed 0) in batches of {BATCH} as `PatchLoader` takes its rows, computed "
        "without reading a chunk: the shuffled order (`sample_epoch(0, shuffle=True)`) and "
        "`order='chunks'` with each `chunk_window` (`chunk_order` with the tile "
        "`PatchLoader.chunk_tile` picks for the default cache of the case's store, a zarr "
        "store of the same shape, chunking and dtype with no chunk written). Per batch: "
        "*regions*, the distinct sampling regions (stack, sample, grid cell of the corner) of "
        "its patches; *chunks*, the distinct chunks its patches overlap (a patch overlaps up "
        "to 2^d). Mean, 5th percentile and minimum over the epoch's whole batches (a last, "
        "shorter batch left out).",
        "",
    )
    for case in selected:
        stack = empty_store(folder, case)
        strategy = StratifiedPatching([stack.shape], case.patch, seed=0)
        n_regions = math.prod(grid_shape(stack.shape[2:], case.patch))
        table = []
        for window in (None, *DIVERSITY_WINDOWS):
            rows, chunk_tile = diversity_rows(stack, strategy, window)
            regions, touched = batch_diversity(rows, [stack.shape], [stack.chunks], BATCH)
            if window is None:
                name, tile = "shuffled (default)", "-"
            else:
                default = " (default)" if window == DEFAULT_CHUNK_WINDOW else ""
                name = f"order='chunks', chunk_window={window}{default}"
                tile = "x".join(map(str, chunk_tile or ()))
            table.append([name, tile, f"{len(regions):,}", *_spread(regions), *_spread(touched)])
        report.emit(
            f"### {case.name}: {'x'.join(map(str, case.shape))}, chunks "
            f"{'x'.join(map(str, case.chunks))} ({math.prod(stack.chunk_grid):,}), patches "
            f"{'x'.join(map(str, case.patch))}, {strategy.n_patches:,} patches, "
            f"{n_regions:,} regions",
            "",
            *markdown_table(
                [
                    "order",
                    "tile",
                    "batches",
                    "regions: mean",
                    "regions: 5th pct",
                    "regions: min",
                    "chunks: mean",
                    "chunks: 5th pct",
                    "chunks: min",
                ],
                table,
                "llrrrrrrr",
            ),
            "",
        )
        shutil.rmtree(folder / f"diversity-{case.name.lower()}.zarr", ignore_errors=True)


# -- two ranks (torch.distributed, gloo) ---------------------------------------------------

# One rank of a chunk-order epoch: argv[1] is a JSON {"path", "patch", "batch",
# "rank", "world", "port"}; rank 0 prints one JSON line of the ranks' summed figures.
RANK_CHILD = r"""
import json, sys, time
import torch
import torch.distributed as dist
job = json.loads(sys.argv[1])
dist.init_process_group(
    "gloo", init_method=f"tcp://127.0.0.1:{job['port']}", rank=job["rank"], world_size=job["world"]
)
from gpu_patching import PatchLoader, StratifiedPatching
from gpu_patching.stores import open_stack
stack = open_stack(job["path"])
strategy = StratifiedPatching([stack.shape], tuple(job["patch"]), seed=0)
loader = PatchLoader(
    [stack], strategy, job["batch"], shuffle=True, order="chunks",
    rank=job["rank"], world_size=job["world"],
)
dist.barrier()
start = time.perf_counter()
patches = 0
for _, batch in loader:
    patches += len(batch)
seconds = time.perf_counter() - start
totals = torch.tensor([loader._reader.chunks_read, patches], dtype=torch.int64)
dist.all_reduce(totals)
longest = torch.tensor([seconds], dtype=torch.float64)
dist.all_reduce(longest, op=dist.ReduceOp.MAX)
if job["rank"] == 0:
    print(json.dumps({"decodes": int(totals[0]), "patches": int(totals[1]),
                      "seconds": float(longest[0]), "n_patches": strategy.n_patches}))
dist.destroy_process_group()
"""


def free_port() -> int:
    """A free TCP port of 127.0.0.1."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def run_ranks(path: Path, case: Case, world: int) -> dict[str, Any]:
    """A chunk-order epoch on ``world`` ranks (processes, gloo on 127.0.0.1): summed figures."""
    port = free_port()
    children = [
        subprocess.Popen(
            [sys.executable, "-c", RANK_CHILD, json.dumps(job)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for job in (
            {
                "path": str(path),
                "patch": case.patch,
                "batch": BATCH,
                "rank": r,
                "world": world,
                "port": port,
            }
            for r in range(world)
        )
    ]
    outputs = [child.communicate(timeout=1800) for child in children]
    for child, (_, err) in zip(children, outputs, strict=True):
        if child.returncode != 0:
            raise RuntimeError(f"a rank of the {world}-rank epoch failed:\n{err}")
    figures: dict[str, Any] = json.loads(outputs[0][0].strip().splitlines()[-1])
    return figures


def ranks_section(folder: Path, selected: list[Case], report: Report) -> None:
    """Chunk decodes of a chunk-order epoch on one rank and summed over two, or why not."""
    report.emit(RANKS_HEADING, "")
    if missing_modules(("torch",)):
        report.emit("Not run: PyTorch is not installed (torch.distributed).", "")
        return
    report.emit(
        f"Machine: {machine_line()}; {load_line()} at the start. One chunk-order epoch "
        "(`PatchLoader(..., order='chunks', rank=r, world_size=n)`, default cache and "
        "tile) on 1 and on 2 ranks, each rank a process of its own in a `torch.distributed` "
        "gloo group on 127.0.0.1 (CPU); the ranks' chunk decodes and patches summed with "
        "`all_reduce`, time of the slowest rank. Both ranks share this machine's cores.",
        "",
    )
    rows = []
    for case in selected:
        path = ensure_store(folder, case)
        one = run_ranks(path, case, 1)
        two = run_ranks(path, case, 2)
        ratio = two["decodes"] / max(1, one["decodes"])
        rows.append(
            [
                case.name,
                f"{one['patches']:,}",
                f"{one['decodes']:,}",
                fmt_time(one["seconds"]),
                f"{two['patches']:,}",
                f"{two['decodes']:,}",
                fmt_time(two["seconds"]),
                fmt_ratio(ratio, 1, 2),
                fmt_verdict(ratio <= 1.2),
            ]
        )
    report.emit(
        *markdown_table(
            [
                "case",
                "1 rank: patches",
                "decodes",
                "time",
                "2 ranks: patches",
                "decodes (sum)",
                "time (slowest)",
                "2 ranks / 1 rank decodes",
                "x1.2 met",
            ],
            rows,
            "lrrrrrrrr",
        ),
        "",
        "With 2 ranks every rank gets as many rows as the longest run of whole tiles, "
        "shorter runs padded by wrapping round to their start, so the patches summed can "
        "exceed the epoch's.",
        "",
    )


# -- over a local S3 server (moto), fsspec and obstore ---------------------------------------

#: A request line of the server's log (werkzeug's, colours and all).
_REQUEST_LINE = re.compile(r'\] "\S*?(GET|HEAD|PUT|POST|DELETE) /')
_S3_KEY, _S3_SECRET = "AKIAGPUPATCHINGBENCH", "gpu-patching-bench-secret"


class LocalS3:
    """moto's S3 server in a child process on 127.0.0.1, requests counted in its log.

    Parameters
    ----------
    folder : Path
        Where its log goes.
    """

    def __init__(self, folder: Path) -> None:
        import urllib.request

        self.endpoint = f"http://127.0.0.1:{free_port()}"
        self._log_path = folder / "moto-server.log"
        self._log = self._log_path.open("w")
        port = self.endpoint.rsplit(":", 1)[1]
        self._process = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", port],
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        self._marks = 0
        deadline = time.monotonic() + 60
        while True:  # the server answers once it listens
            try:
                urllib.request.urlopen(self.endpoint + "/", timeout=5).close()
                break
            except OSError:
                if self._process.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(
                        f"moto's S3 server did not start:\n{self._log_path.read_text()}"
                    ) from None
                time.sleep(0.05)

    @property
    def options(self) -> dict[str, Any]:
        """fsspec storage_options for this server."""
        return {"endpoint_url": self.endpoint, "key": _S3_KEY, "secret": _S3_SECRET}

    def requests(self) -> int:
        """Requests the server has answered so far (its log read up to a marker request)."""
        import urllib.error
        import urllib.request

        self._marks += 1
        marker = f"/gpu-patching-bench-mark-{self._marks}"
        try:
            urllib.request.urlopen(self.endpoint + marker, timeout=10).close()
        except urllib.error.HTTPError:  # no such bucket: the request is logged all the same
            pass
        deadline = time.monotonic() + 30
        while marker not in (text := self._log_path.read_text(errors="replace")):
            if time.monotonic() > deadline:
                raise RuntimeError("the S3 server's log never showed the marker request")
            time.sleep(0.01)
        lines = text[: text.index(marker)].splitlines()
        return sum(1 for line in lines if _REQUEST_LINE.search(line) and "bench-mark-" not in line)

    def stop(self) -> None:
        """Stop the server."""
        self._process.terminate()
        self._process.wait(timeout=30)
        self._log.close()


def obstore_group(server: LocalS3, bucket: str, key: str) -> Any:
    """The OME-Zarr group at ``bucket/key`` through zarr's ObjectStore on obstore's S3Store."""
    import zarr
    from obstore.store import S3Store
    from zarr.storage import ObjectStore

    store = S3Store(
        bucket,
        endpoint=server.endpoint,
        access_key_id=_S3_KEY,
        secret_access_key=_S3_SECRET,
        region="us-east-1",
        client_options={"allow_http": True},
    )
    return zarr.open_group(store=ObjectStore(store, read_only=True), path=key, mode="r")


#: The stores compared: fsspec with s3fs's defaults, fsspec without s3fs's
#: size request before each whole-object read (``max_concurrency`` above 1 asks
#: for the size first, to split large objects; ``open_stack``'s default for
#: ``s3://``, ``stores.open.S3_DEFAULT_OPTIONS``), and obstore.
S3_KINDS = ("fsspec", "fsspec, max_concurrency=1", "obstore")


def s3_remote(server: LocalS3, bucket: str, key: str, kind: str) -> tuple[Any, Any]:
    """(stack, level-0 zarr array) of the image through ``kind``, one of :data:`S3_KINDS`."""
    import zarr

    if kind.startswith("fsspec"):
        url = f"s3://{bucket}/{key}"
        # s3fs's own default (10) given explicitly: open_stack passes 1 otherwise.
        options = server.options | {"max_concurrency": 1 if "max_concurrency" in kind else 10}
        stack = open_stack(url, storage_options=options)
        array = zarr.open_array(f"{url}/0", mode="r", storage_options=options)
        return stack, array
    group = obstore_group(server, bucket, key)
    return open_stack(group), group["0"]


def missing_modules(names: tuple[str, ...]) -> list[str]:
    """The modules of ``names`` that are not installed."""
    return [name for name in names if importlib.util.find_spec(name) is None]


def s3_section(folder: Path, quick: bool, report: Report, case: Case | None = None) -> None:
    """Requests and time per epoch over moto's S3 server: orders, per-patch reads, stores.

    ``case`` replaces the store of :data:`S3_CASES` (the tests use a tiny one).
    """
    report.emit(S3_HEADING, "")
    missing = missing_modules(("moto", "s3fs", "obstore"))
    if "moto" in missing or "s3fs" in missing:
        needed = [name for name in missing if name != "obstore"]
        report.emit(f"Not run: {' and '.join(needed)} not installed (`[test]` extra).", "")
        return
    case = S3_CASES[quick] if case is None else case
    path = ensure_store(folder, case)
    server = LocalS3(folder)
    try:
        import s3fs

        bucket, key = "bench", path.name
        filesystem = s3fs.S3FileSystem(**server.options)
        filesystem.mkdir(bucket)
        filesystem.put(str(path), f"{bucket}/{key}", recursive=True)
        kinds = [kind for kind in S3_KINDS if kind != "obstore" or "obstore" not in missing]
        opened = {kind: s3_remote(server, bucket, key, kind) for kind in kinds}
        stack = opened["fsspec"][0]
        strategy = StratifiedPatching([stack.shape], case.patch, seed=0)
        shuffled = strategy.sample_epoch(0, shuffle=True).to_numpy()
        figures: dict[tuple[str, str], dict[str, Any]] = {}

        # A store larger than the loader's memory, as remote data is: with the
        # default budget this small store would sit whole in the cache.
        cache_bytes = case.raw_bytes // S3_STORE_PER_CACHE

        def epoch(kind: str, order: str) -> Callable[[int], None]:
            def run(_k: int) -> None:
                loader = PatchLoader(
                    [opened[kind][0]],
                    strategy,
                    BATCH,
                    shuffle=True,
                    order=order,
                    cache_bytes=cache_bytes,
                )
                before = server.requests()
                start = time.perf_counter()
                done, decodes = epoch_reads(loader)
                seconds = time.perf_counter() - start
                old = figures.get((kind, order), {"time": float("inf")})
                figures[(kind, order)] = {
                    "done": done,
                    "requests": server.requests() - before,
                    "decodes": decodes,
                    "time": min(old["time"], seconds),
                }

            return run

        def per_patch(kind: str) -> None:
            before = server.requests()
            seconds = float("inf") if quick else PER_PATCH_SECONDS
            rate, done = per_patch_rate(opened[kind][1], shuffled, seconds)
            figures[(kind, "per-patch")] = {
                "done": done,
                "requests": server.requests() - before,
                "decodes": None,
                "time": strategy.n_patches / rate,  # scaled to the epoch
            }

        # Each loader from a cold cache, the stores and orders taking turns.
        in_turns(
            {f"{k} {o}": epoch(k, o) for k in kinds for o in ("shuffle", "chunks")},
            1 if quick else 2,
        )
        for kind in kinds:
            per_patch(kind)
    finally:
        server.stop()
    rows = []
    for kind in kinds:
        slicing = figures[(kind, "per-patch")]["time"]
        for order, label in (
            ("per-patch", "one zarr read per patch"),
            ("shuffle", "PatchLoader, shuffled (default)"),
            ("chunks", "PatchLoader, order='chunks'"),
        ):
            f = figures[(kind, order)]
            if f["done"] < strategy.n_patches:
                label += f" (first {f['done']:,}, time scaled)"
            rows.append(
                [
                    label,
                    kind,
                    f"{f['done']:,}",
                    f"{f['requests']:,}",
                    f"{f['requests'] / max(1, f['done']):.3f}",
                    fmt_time(f["time"]),
                    fmt_ratio(slicing, f["time"], 1),
                ]
            )
    n_chunks = int(np.prod(stack.chunk_grid))
    report.emit(
        f"Machine: {machine_line()}; {load_line()} at the start. moto's S3 server "
        f"(moto {_version('moto')}, a process of its own on 127.0.0.1; every request is "
        "HTTP) holding the OME-Zarr image this script writes, a smaller one than the "
        f"cases above so that it uploads in seconds: {'x'.join(map(str, case.shape))} "
        f"uint16, {n_chunks} chunks of {'x'.join(map(str, case.chunks))} "
        f"({fmt_bytes(stack.chunk_bytes)}), patches {'x'.join(map(str, case.patch))}, "
        f"{strategy.n_patches:,} per epoch, batches of {BATCH}. Requests: counted by the "
        "server (its log), for the epoch alone (not the metadata read when opening). "
        "*fsspec*: `open_stack(url, storage_options=...)`, zarr's `FsspecStore` on s3fs "
        f"{_version('s3fs')} (by default s3fs asks for an object's size, a HEAD request, "
        "before reading it whole; `max_concurrency=1` in `storage_options` reads it with "
        "one GET); *obstore*: `open_stack` of the group opened through zarr's "
        "`ObjectStore` on obstore's `S3Store`"
        + (f" ({_version('obstore')})" if "obstore" in kinds else " (not installed)")
        + ". Loaders from a cold cache, default workers (requests in flight), "
        + f"`cache_bytes` {fmt_bytes(case.raw_bytes // S3_STORE_PER_CACHE)}, "
        + f"1/{S3_STORE_PER_CACHE} of the image (a store larger than the loader's memory, as "
        + "remote data is; at the default budget this image would sit whole in the cache "
        + "and either order read each chunk once); "
        + ("one epoch each" if quick else "best of 2 epochs each, in turns")
        + "; per-patch reads: one synchronous zarr read per patch of the shuffled epoch"
        + ("." if quick else f", for {PER_PATCH_SECONDS:g} s, the epoch's time scaled from it."),
        "",
        *markdown_table(
            [
                "reads",
                "store",
                "patches",
                "requests",
                "requests per patch",
                "time per epoch",
                "x faster than per-patch",
            ],
            rows,
            "llrrrrr",
        ),
        "",
    )
    if "obstore" in kinds:
        times = {
            kind: min(figures[(kind, o)]["time"] for o in ("shuffle", "chunks")) for kind in kinds
        }
        # Against the best fsspec setting: a user (or open_stack) can pass
        # max_concurrency=1 without a new dependency, so that is the bar.
        fsspec = min(times[kind] for kind in kinds if kind.startswith("fsspec"))
        faster = times["obstore"] < 0.8 * fsspec
        report.emit(
            "The loader's best epoch per store: "
            + ", ".join(f"{kind} {fmt_time(t)}" for kind, t in times.items())
            + f"; obstore {fmt_ratio(times['fsspec'], times['obstore'], 1)} faster than "
            "`open_stack`'s fsspec store with s3fs's defaults, "
            f"{fmt_ratio(fsspec, times['obstore'], 2)} than the best fsspec setting: obstore "
            + (
                "faster by more than 20%: worth switching (docs/design.md)."
                if faster
                else "within 20% of fsspec or slower: fsspec stays."
            ),
            "",
        )
    report.emit(f"{load_line()} at the end.", "")


def main(argv: list[str] | None = None) -> str:
    parser = script_parser(
        __doc__, RESULTS, "small stores, short runs (not the memory rows)", gpu=True
    )
    parser.add_argument(
        "--memory-only", action="store_true", help="only the peak memory against cache_bytes"
    )
    parser.add_argument(
        "--chunk-order-only",
        action="store_true",
        help="only issue 22's sections: chunk order, batch diversity, two ranks, local S3",
    )
    parser.add_argument(
        "--diversity-only",
        action="store_true",
        help="only issue 22's batch diversity (no data written, nothing decoded)",
    )
    parser.add_argument(
        "--store-dir",
        type=Path,
        default=Path("/tmp/gpu-patching-stores"),
        help="where the stores go",
    )
    parser.add_argument("--keep", action="store_true", help="keep the stores for a later run")
    parser.add_argument("--seconds", type=float, help="time per throughput measurement")
    parser.add_argument(
        "--tensorstore-path", help="a folder holding TensorStore, for the reader choice"
    )
    args = parser.parse_args(argv)
    seconds = args.seconds if args.seconds is not None else (2.0 if args.quick else 8.0)
    selected = [] if args.memory_only or args.gpu_only else cases(args.quick)
    cupy, why = usable_cupy()
    if args.gpu_only:
        return device_output_main(args, cupy, why, seconds)
    args.store_dir.mkdir(parents=True, exist_ok=True)
    if args.diversity_only:
        return diversity_main(args, selected)
    memory_cases = [] if args.chunk_order_only else MEMORY_CASES
    needed = sum(c.raw_bytes for c in [*selected, *memory_cases])
    free = shutil.disk_usage(args.store_dir).free
    if free < 2 * needed:
        raise SystemExit(
            f"{args.store_dir} has {fmt_bytes(free)} free; the stores need up to "
            f"{fmt_bytes(needed)} (twice that is required to run)"
        )
    report = Report()
    report.emit("# Patches from chunked stores", "")
    try:
        if selected and not args.chunk_order_only:
            throughput_section(args, selected, seconds, report)
        if not args.chunk_order_only:
            memory_section(args.store_dir, report)
        if selected:
            chunk_order_section(args.store_dir, selected, args.quick, report)
            diversity_section(args.store_dir, selected, report)
            ranks_section(args.store_dir, selected, report)
            s3_section(args.store_dir, args.quick, report)
        if not args.memory_only and not args.chunk_order_only:
            device_output_section(args.store_dir, cupy, why, seconds, report)
    finally:
        if not args.keep:
            shutil.rmtree(args.store_dir, ignore_errors=True)
    return finish(report, args, RESULTS)


def diversity_main(args: Any, selected: list[Case]) -> str:
    """``--diversity-only``: the batch diversity section alone, merged into the results."""
    report = Report()
    report.emit("# Patches from chunked stores", "")
    try:
        diversity_section(args.store_dir, selected, report)
    finally:
        if not args.keep:
            shutil.rmtree(args.store_dir, ignore_errors=True)
    return finish(report, args, RESULTS)


def throughput_section(args: Any, selected: list[Case], seconds: float, report: Report) -> None:
    """The cases of issue 15: throughput, chunk reads, first batch and tracemalloc peak."""
    report.emit(
        "## Throughput and chunk reads (issue 15)",
        "",
        f"Machine: {machine_line()}. Stores written by this script: OME-Zarr 0.5, zarr format 3, "
        "uint16, Blosc zstd level 3 with byte shuffle, on the local disk. Throughputs: patches "
        f"handed over per second for {seconds:g} s from a fresh loader (cold cache; the "
        "consumer does nothing with them), the default cache (room for the store's chunks "
        f"beside the reads and the batches read ahead, at most {fmt_bytes(DEFAULT_CACHE_BYTES)}: "
        "the cap, for these stores). "
        "Chunk reads per patch (how many chunks were decoded per patch handed over) do not "
        "depend on the machine's load; patches/s do, and this machine is shared: "
        f"{load_line()} at the start.",
        "",
    )
    paths = [ensure_store(args.store_dir, case) for case in selected]
    report.emit(*reader_choice(paths[0], selected[0], args.tensorstore_path))
    summary = []
    for path, case in zip(paths, selected, strict=True):
        figures = run_case(path, case, seconds, report)
        shuffled = max(figures[("shuffled", 1)], figures[("shuffled", 2)])
        best = max(shuffled, figures[("plain", 1)], figures[("plain", 2)])
        summary.append(
            [
                case.name,
                fmt_ratio(figures[("shuffled", 1)], figures["slicing"], 1),
                fmt_ratio(figures[("shuffled", 2)], figures["slicing"], 1),
                fmt_ratio(figures[("plain", 2)], figures["slicing"], 1),
                fmt_ratio(figures["slicing_reads"], figures[("shuffled", 2, "reads")], 1),
                fmt_verdict(shuffled >= 5 * figures["slicing"]),
                fmt_verdict(best >= 5 * figures["slicing"]),
                fmt_verdict(figures["peak"] <= figures["bound"]),
            ]
        )
    report.emit(
        "### Summary against the targets (x5 the patches/s of per-patch slicing; "
        "peak memory at most the cache plus two batches)",
        "",
        *markdown_table(
            [
                "case",
                "shuffled, 1 thread",
                "shuffled, 2 threads",
                "plain order, 2 threads",
                "fewer chunk reads per patch (shuffled)",
                "x5 shuffled",
                "x5 plain",
                "memory",
            ],
            summary,
            "lrrrrrrr",
        ),
        "",
    )
    report.emit(
        "Device output: `PatchLoader(..., device_output=True)` uploads each assembled "
        "batch (`gpu_patching.loader.upload_batch`) rather than the chunks it was cut "
        "from, since those are many times its bytes (the lines above); the device-output "
        "section below times it on a GPU.",
        "",
        f"{load_line()} at the end.",
        "",
    )


# -- device output (PatchLoader(..., device_output=True)) ----------------------------------

#: The store of the device-output rows: the quick 2D case, small enough to write in seconds.
DEVICE_CASE = Case("2D", (4096, 4096), (1024, 1024), (64, 64))
DEVICE_HEADING = "## Device output (PatchLoader(..., device_output=True))"
#: Where ``--gpu-only --write-results`` writes (stores.md's host sections stay).
GPU_RESULTS = RESULTS_DIR / "stores-gpu.md"


def device_output_rate(
    stack: Any, strategy: Any, cupy: Any, device_output: bool, seconds: float
) -> tuple[float, int]:
    """Patches/s and patches of a fresh shuffled PatchLoader, host or uploaded batches.

    With ``device_output`` each batch's upload is waited for before the next
    is asked for (what a consumer using it does), so the time includes it.
    """
    loader = PatchLoader([stack], strategy, BATCH, shuffle=True, device_output=device_output)
    batches = loader_batches(loader)
    stream = cupy.cuda.get_current_stream()

    def one(k: int) -> int:
        patches = next(batches)
        if device_output:
            stream.synchronize()
        return len(patches)

    rate, done = rate_for(seconds, one, len(loader), min(3, len(loader)))
    batches.close()
    return rate, done


def device_output_section(
    folder: Path, cupy: Any, why: str, seconds: float, report: Report
) -> None:
    """Host batches against uploaded ones on :data:`DEVICE_CASE`'s store, or why not."""
    report.emit(DEVICE_HEADING, "")
    if cupy is None:
        report.emit(f"Not run: {why}.", "")
        return
    stack = open_stack(ensure_store(folder, DEVICE_CASE))
    strategy = StratifiedPatching([stack.shape], DEVICE_CASE.patch, seed=0)
    patch_bytes = int(np.prod(DEVICE_CASE.patch)) * 2
    rows = []
    host = None
    for device_output in (False, True, False, True):  # in turns, each from a cold cache
        rate, done = device_output_rate(stack, strategy, cupy, device_output, seconds)
        host = rate if not device_output else host
        rows.append(
            [
                "uploaded to the GPU (device_output=True)" if device_output else "host (NumPy)",
                f"{done:,}",
                fmt_rate(rate),
                fmt_bandwidth(rate * patch_bytes) if device_output else "(no upload)",
                fmt_ratio(rate, host, 2),
            ]
        )
        gc.collect()
    report.emit(
        f"A shuffled epoch of a {'x'.join(map(str, DEVICE_CASE.shape))} uint16 store "
        f"(chunks {'x'.join(map(str, DEVICE_CASE.chunks))}, patches "
        f"{'x'.join(map(str, DEVICE_CASE.patch))}, batch {BATCH}) for {seconds:g} s from a "
        "fresh loader each (cold cache), host batches and uploaded batches taking turns; "
        "an uploaded batch is waited for before the next is asked for. Upload rate: the "
        f"batches' bytes per second. {load_line()}.",
        "",
        *markdown_table(
            ["batches", "patches", "patches/s", "upload", "against the host row before"],
            rows,
            "lrrrr",
        ),
        "",
    )


def device_output_main(args: Any, cupy: Any, why: str, seconds: float) -> str:
    """``--gpu-only``: the device-output section alone, its store deleted unless ``--keep``."""
    report = Report()
    report.emit("# Patches from chunked stores on the GPU", "", machine_line(), "")
    if cupy is not None:
        args.store_dir.mkdir(parents=True, exist_ok=True)
    try:
        device_output_section(args.store_dir, cupy, why, seconds, report)
    finally:
        if cupy is not None and not args.keep:
            shutil.rmtree(args.store_dir, ignore_errors=True)
    return finish(report, args, GPU_RESULTS)


if __name__ == "__main__":
    main()
