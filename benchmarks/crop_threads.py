"""Where splitting the host crop's rows over threads pays: the numbers behind its rule.

``copy_patches`` (the one host crop path) copies each row into a reused
buffer, on the calling thread alone (``threads=1``) or on one thread per
usable core. Rows of 8 KiB to 512 KiB (float32; 2D
patches from 8 stacks of 1024x1024, 3D from 4 of 128x256x256), batches of 64
to 4096, random corners (fixed seed); the two take turns, medians of the
turns. The ratio is the serial time over the threaded one (> 1: threads pay).
``gpu_patching/_row_threads.py`` cites the crossover as its thresholds.
Run ``python benchmarks/crop_threads.py`` (no flags: not one of the
``bench_*`` reports); it prints a markdown table.
"""

from __future__ import annotations

import statistics
import time

import numpy as np

from gpu_patching._row_threads import usable_cores
from gpu_patching.crop import copy_patches

PATCHES = ((32, 64), (64, 64), (64, 128), (128, 128), (8, 64, 64), (16, 64, 64), (32, 64, 64))
BATCHES = (64, 256, 1024, 4096)
TURNS = 7


def main() -> None:
    """Print the serial and threaded times of every row size and batch."""
    n_threads = usable_cores()
    rng = np.random.default_rng(0)
    stacks = {
        2: rng.random((8, 1, 1024, 1024), dtype=np.float32),
        3: rng.random((4, 1, 128, 256, 256), dtype=np.float32),
    }
    print(f"threads: {n_threads}; turns: {TURNS}")
    print("| row | batch | batch bytes | 1 thread | threads | ratio |")
    print("|---|---:|---:|---:|---:|---:|")
    for patch in PATCHES:
        stack = stacks[len(patch)]
        for n_rows in BATCHES:
            highs = [d - p + 1 for d, p in zip(stack.shape[2:], patch, strict=True)]
            corners = np.stack([rng.integers(0, high, n_rows) for high in highs], 1)
            rows = (np.zeros(n_rows, np.int64), rng.integers(0, stack.shape[0], n_rows), corners)
            out = np.zeros((n_rows, 1, *patch), np.float32)
            times: dict[int, list[float]] = {1: [], n_threads: []}
            for turn in range(TURNS):
                order = (1, n_threads) if turn % 2 == 0 else (n_threads, 1)
                for threads in order:
                    start = time.perf_counter()
                    copy_patches([stack], rows, patch, out, threads=threads)
                    times[threads].append(time.perf_counter() - start)
            serial = statistics.median(times[1])
            threaded = statistics.median(times[n_threads])
            row_kib = out[0].nbytes >> 10
            print(
                f"| {'x'.join(map(str, patch))} ({row_kib} KiB) | {n_rows} "
                f"| {out.nbytes / 2**20:.1f} MiB | {serial * 1e3:.2f} ms "
                f"| {threaded * 1e3:.2f} ms | x{serial / threaded:.2f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
