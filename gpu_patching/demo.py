"""A short demonstration: stratified against uniform random patching.

Run it with ``python -m gpu_patching.demo`` (``make demo`` does). It builds a
sampler over a synthetic 2D stack, holds out a block of grid cells as a
validation area, lowers the probability of a "background" band, draws a few
epochs and prints how evenly the patches cover the image, side by side with
plain uniform random patch corners (the same number of patches per epoch).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence

import numpy as np
from numpy.typing import NDArray

from . import StratifiedPatching

__all__ = ["coverage_map", "main"]


def coverage_map(
    corners: NDArray[np.int64], patch_size: Sequence[int], shape: Sequence[int]
) -> NDArray[np.int64]:
    """Count how many patches cover each pixel of a 2D image.

    Parameters
    ----------
    corners : numpy.ndarray of int, shape (N, 2)
        Top-left corners of the patches.
    patch_size : sequence of int
        ``(py, px)``.
    shape : sequence of int
        ``(Y, X)`` of the image.

    Returns
    -------
    numpy.ndarray of int64, shape ``shape``
        Patches covering each pixel.
    """
    py, px = (int(p) for p in patch_size)
    height, width = (int(s) for s in shape)
    # A 2D difference array: +1 at each box's corner, -1 past its edges, then
    # two cumulative sums; no loop over patches.
    diff = np.zeros((height + 1, width + 1), dtype=np.int64)
    y, x = corners[:, 0], corners[:, 1]
    np.add.at(diff, (y, x), 1)
    np.add.at(diff, (y + py, x), -1)
    np.add.at(diff, (y, x + px), -1)
    np.add.at(diff, (y + py, x + px), 1)
    return diff.cumsum(axis=0).cumsum(axis=1)[:height, :width]


def _stats(coverage: NDArray[np.int64], epochs: int, keep: NDArray[np.bool_]) -> str:
    per_epoch = coverage[keep] / epochs
    uncovered = float(np.mean(coverage[keep] == 0))
    return f"{per_epoch.mean():9.3f} {per_epoch.std():9.3f} {uncovered:10.2%}"


def main(argv: Sequence[str] | None = None) -> int:
    """Run the demonstration and print its table.

    Parameters
    ----------
    argv : sequence of str, optional
        Command-line arguments (default: ``sys.argv[1:]``).

    Returns
    -------
    int
        The exit status, 0.
    """
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, nargs=2, default=(1024, 1536), metavar=("Y", "X"))
    parser.add_argument("--patch", type=int, nargs=2, default=(64, 64), metavar=("PY", "PX"))
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--seed", type=int, default=2026)
    parser.add_argument("--backend", default="auto", choices=("auto", "cuda", "numpy"))
    args = parser.parse_args(argv)

    shape = tuple(args.size)
    patch = tuple(args.patch)
    sampler = StratifiedPatching([(1, 1, *shape)], patch, seed=args.seed, backend=args.backend)
    grid_y, grid_x = (
        len(set(axis)) for axis in zip(*sampler.get_all_grid_coords()[(0, 0)], strict=True)
    )
    print(f"image {shape[0]}x{shape[1]}, patch {patch[0]}x{patch[1]}, grid {grid_y}x{grid_x}")
    print(f"backend {sampler.backend}, seed {sampler.seed}, {sampler.n_patches} patches per epoch")

    # Hold out a 3x3 block of cells (e.g. for validation) and sample the top
    # band of cells (say, background) four times less often.
    held_out = [(grid_y // 2 + dy, grid_x // 2 + dx) for dy in range(3) for dx in range(3)]
    sampler.exclude_patches(0, 0, held_out)
    probabilities = np.ones((grid_y, grid_x))
    probabilities[:2] = 0.25
    sampler.set_region_probs(0, 0, probabilities)
    n_patches = sampler.n_patches
    print(
        f"after holding out {len(held_out)} cells and down-weighting 2 rows: "
        f"{n_patches} patches per epoch"
    )

    keep = np.ones(shape, dtype=bool)  # pixels outside the held-out block
    (y0, x0), (y1, x1) = held_out[0], held_out[-1]
    block = (
        slice(y0 * patch[0], (y1 + 1) * patch[0]),
        slice(x0 * patch[1], (x1 + 1) * patch[1]),
    )
    keep[block] = False
    keep[: 2 * patch[0]] = False  # and outside the down-weighted band

    stratified = np.zeros(shape, dtype=np.int64)
    uniform = np.zeros(shape, dtype=np.int64)
    random = np.random.default_rng(args.seed)
    last_corner = np.asarray(shape) - np.asarray(patch)
    epoch_times = []
    print(f"\n{'':24s}{'mean':>9s} {'std':>9s} {'uncovered':>10s}   (coverage per epoch)")
    for epoch in range(args.epochs):
        start = time.perf_counter()
        batch = sampler.sample_epoch(epoch).to_numpy()
        epoch_times.append(time.perf_counter() - start)
        stratified += coverage_map(batch.coords, patch, shape)
        corners = random.integers(0, last_corner + 1, size=(n_patches, 2))
        uniform += coverage_map(corners, patch, shape)
        if epoch in (0, args.epochs - 1):
            print(
                f"after {epoch + 1:2d} epoch(s): stratified {_stats(stratified, epoch + 1, keep)}"
            )
            print(f"{'':16s}uniform    {_stats(uniform, epoch + 1, keep)}")

    touched = stratified[block].max()
    print(f"\nheld-out block covered by {int(touched)} stratified patches (must be 0)")
    print(
        f"time per epoch: {np.median(epoch_times) * 1e3:.2f} ms "
        f"({np.median(epoch_times) / n_patches * 1e9:.0f} ns per patch, {sampler.backend})"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
