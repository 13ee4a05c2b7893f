"""The demonstration behind ``gpu-patching demo`` (and ``make demo``).

On one 2D microscopy image it builds a sampler, holds out validation patches,
samples background regions less often, draws epochs, and compares how evenly
the patches cover the image with plain uniform random patching (the same
number of patches per epoch). It prints a table and writes pictures.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from . import StratifiedPatching
from .policies import filter_background, validation_split
from .stats import region_statistics

__all__ = ["cell_map", "coverage_map", "run_demo"]


def cell_map(values: NDArray[Any], patch_size: Sequence[int], shape: Sequence[int]) -> NDArray[Any]:
    """Spread per-cell values over the pixels of a 2D image.

    Parameters
    ----------
    values : numpy.ndarray, shape (Gy, Gx)
        One value per grid cell.
    patch_size : sequence of int
        ``(py, px)``, the cell size.
    shape : sequence of int
        ``(Y, X)`` of the image.

    Returns
    -------
    numpy.ndarray, shape ``shape``
        The value of the cell of each pixel; pixels past the last cell (the
        grid has ``(D + 1) // P`` cells) take the last cell's value.
    """
    rows = np.minimum(np.arange(shape[0]) // patch_size[0], values.shape[0] - 1)
    cols = np.minimum(np.arange(shape[1]) // patch_size[1], values.shape[1] - 1)
    return values[np.ix_(rows, cols)]


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


def _summary(coverage: NDArray[np.int64], epochs: int, pixels: NDArray[np.bool_]) -> list[str]:
    per_epoch = coverage[pixels] / epochs
    return [
        f"{per_epoch.mean():.3f}",
        f"{per_epoch.std():.3f}",
        f"{np.mean(coverage[pixels] == 0):.1%}",
    ]


def run_demo(
    image: NDArray[Any],
    *,
    name: str,
    patch_size: tuple[int, ...] = (32, 32),
    epochs: int = 20,
    seed: int | None = 2026,
    backend: str = "auto",
    output: Path | None = None,
    validation_fraction: float = 0.05,
    background_stat: str = "std",
    background_quantile: float = 0.3,
    filtered_prob: float = 0.1,
    progress: bool = True,
) -> dict[str, Any]:
    """Run the demonstration on one 2D image.

    Parameters
    ----------
    image : numpy.ndarray, shape (Y, X)
        The image.
    name : str
        How to name the image in the printout.
    patch_size : tuple of int
        Patch size ``(py, px)``.
    epochs : int
        Epochs to draw (at least 1).
    seed : int or None
        Sampler seed.
    backend : {"auto", "cuda", "numpy"}
        Sampler backend.
    output : pathlib.Path, optional
        Folder for the pictures; none are drawn when None.
    validation_fraction : float
        Fraction of the patches to hold out for validation, in ``[0, 0.5]``.
    background_stat : str
        The region statistic that tells background (see
        :func:`~gpu_patching.region_statistics`); ``"std"`` suits both
        fluorescence and transmitted-light images (flat regions are
        background), ``"mean"`` dark-background fluorescence.
    background_quantile : float
        Regions whose statistic is below this quantile of all regions' are
        background, in ``[0, 1]``.
    filtered_prob : float
        Probability given to background regions.
    progress : bool
        Show a progress bar (tqdm).

    Returns
    -------
    dict
        The numbers of the printed table.
    """
    if image.ndim != 2:
        raise ValueError(f"the demo needs a 2D image, got shape {image.shape}")
    if epochs < 1:
        raise ValueError(f"epochs must be at least 1, got {epochs}")
    if not 0 <= validation_fraction <= 0.5:
        raise ValueError(f"validation fraction must be in [0, 0.5], got {validation_fraction}")
    if not 0 <= background_quantile <= 1:
        raise ValueError(f"background quantile must be in [0, 1], got {background_quantile}")
    shape = tuple(int(s) for s in image.shape)
    stack = image[np.newaxis, np.newaxis]
    sampler = StratifiedPatching([stack.shape], patch_size, seed=seed, backend=backend)
    print(f"image: {name}, {shape[0]}x{shape[1]}; patch {patch_size[0]}x{patch_size[1]}")
    print(f"sampler: backend {sampler.backend}, seed {sampler.seed}, {sampler.n_patches} patches")

    n_validation = round(validation_fraction * sampler.n_patches)
    validation = validation_split(sampler, n_validation, seed=sampler.seed) if n_validation else []
    print(f"validation: {len(validation)} patches held out -> {sampler.n_patches} patches")

    scores = region_statistics(stack, patch_size, stats=(background_stat,))[background_stat]
    threshold = float(np.quantile(scores, background_quantile))
    filtered = filter_background(
        sampler, [stack], stat=background_stat, threshold=threshold, filtered_prob=filtered_prob
    )
    print(
        f"background: {sum(filtered.filtered.values())} regions with {background_stat} < "
        f"{threshold:.2f} get probability {filtered_prob} -> {sampler.n_patches} patches per epoch"
    )

    # Pixels the comparison is about: foreground (cells that kept probability
    # 1) outside validation patches. Background is sampled less on purpose.
    held_out = np.zeros(shape, dtype=bool)
    for spec in validation:
        y, x = spec["coords"]
        held_out[y : y + patch_size[0], x : x + patch_size[1]] = True
    foreground = cell_map(sampler.get_region_probs(0, 0), patch_size, shape) >= 1
    pixels = foreground & ~held_out

    n_patches = sampler.n_patches
    stratified = np.zeros(shape, dtype=np.int64)
    uniform = np.zeros(shape, dtype=np.int64)
    snapshots: dict[str, NDArray[np.int64]] = {}
    random = np.random.default_rng(sampler.seed)
    last_corner = np.asarray(shape) - np.asarray(patch_size)
    epoch_seconds = []
    touched_validation = 0
    rounds: Any = range(epochs)
    if progress:
        from tqdm import tqdm

        rounds = tqdm(rounds, desc="epochs", unit="epoch", leave=False)
    for epoch in rounds:
        start = time.perf_counter()
        batch = sampler.sample_epoch(epoch).to_numpy()
        epoch_seconds.append(time.perf_counter() - start)
        epoch_cover = coverage_map(batch.coords, patch_size, shape)
        stratified += epoch_cover
        touched_validation += int(epoch_cover[held_out].sum())
        corners = random.integers(0, last_corner + 1, size=(n_patches, 2))
        uniform += coverage_map(corners, patch_size, shape)
        if epoch == 0:
            snapshots["stratified, 1 epoch"] = stratified.copy()
            snapshots["uniform, 1 epoch"] = uniform.copy()
    snapshots[f"stratified, {epochs} epochs"] = stratified
    snapshots[f"uniform, {epochs} epochs"] = uniform

    rows = [
        ("stratified", 1, snapshots["stratified, 1 epoch"]),
        ("uniform", 1, snapshots["uniform, 1 epoch"]),
        ("stratified", epochs, stratified),
        ("uniform", epochs, uniform),
    ]
    print(f"\n{'sampling':12s} {'epochs':>6s} {'mean':>7s} {'std':>7s} {'uncovered':>10s}")
    results: dict[str, Any] = {"rows": []}
    for label, count, cover in rows:
        mean, std, uncovered = _summary(cover, count, pixels)
        print(f"{label:12s} {count:6d} {mean:>7s} {std:>7s} {uncovered:>10s}")
        results["rows"].append((label, count, mean, std, uncovered))
    per_epoch = float(np.median(epoch_seconds))
    print(
        f"\n(coverage per pixel per epoch, over the {int(pixels.sum())} foreground pixels "
        f"outside validation patches)\n"
        f"patches per epoch: {n_patches}; time per epoch: {per_epoch * 1e3:.2f} ms "
        f"({sampler.backend}); validation pixels covered by training patches: "
        f"{touched_validation}"
    )
    results.update(
        n_patches=n_patches,
        seconds_per_epoch=per_epoch,
        backend=sampler.backend,
        validation=len(validation),
        touched_validation=touched_validation,
    )
    if output is not None:
        from ._pictures import draw_demo_pictures

        written = draw_demo_pictures(
            output,
            image=image,
            sampler=sampler,
            validation=validation,
            snapshots=snapshots,
            epochs=epochs,
        )
        print("pictures:", ", ".join(str(p) for p in written))
        results["pictures"] = written
    return results
