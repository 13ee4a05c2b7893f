"""Pictures of the demo (matplotlib, PNG, no display needed)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from .demo import cell_map
from .specs import PatchSpecs
from .strategy import StratifiedPatching

__all__ = ["draw_demo_pictures"]


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # files only: works on machines without a display
    import matplotlib.pyplot as plt

    return plt


def draw_demo_pictures(
    folder: Path,
    *,
    image: NDArray[Any],
    sampler: StratifiedPatching,
    validation: Sequence[PatchSpecs],
    snapshots: dict[str, NDArray[np.int64]],
    epochs: int,
) -> list[Path]:
    """Write the demo's pictures into ``folder`` and return their paths.

    Parameters
    ----------
    folder : pathlib.Path
        Output folder (created if missing).
    image : numpy.ndarray, shape (Y, X)
        The image.
    sampler : StratifiedPatching
        The sampler after the validation split and the background filter.
    validation : sequence of PatchSpecs
        The validation patches.
    snapshots : dict of str to numpy.ndarray
        Coverage maps (patch counts per pixel) by title; titles end in
        ``"1 epoch"`` or ``"N epochs"``.
    epochs : int
        Epochs behind the ``"N epochs"`` maps.

    Returns
    -------
    list of pathlib.Path
        The PNG files written.
    """
    plt = _pyplot()
    from matplotlib.patches import Rectangle

    folder.mkdir(parents=True, exist_ok=True)
    patch_y, patch_x = sampler.patch_size
    probabilities = sampler.get_region_probs(0, 0)
    written = []

    figure, axes = plt.subplots(figsize=(7, 7 * image.shape[0] / image.shape[1] + 0.6))
    axes.imshow(image, cmap="gray")
    # Background regions (probability below 1) tinted, one cell per region.
    tint = cell_map(probabilities < 1, sampler.patch_size, image.shape)
    overlay = np.zeros((*image.shape, 4))
    overlay[..., 2] = 1.0
    overlay[..., 3] = 0.25 * tint
    axes.imshow(overlay)
    for spec in validation:
        y, x = spec["coords"]
        axes.add_patch(
            Rectangle((x - 0.5, y - 0.5), patch_x, patch_y, fill=False, edgecolor="red", lw=1.2)
        )
    axes.set_title(
        f"image; red: {len(validation)} validation patches, blue: background regions",
        fontsize=9,
    )
    axes.set_axis_off()
    path = folder / "image.png"
    figure.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(figure)
    written.append(path)

    figure, axes = plt.subplots(figsize=(6, 6 * probabilities.shape[0] / probabilities.shape[1]))
    shown = axes.imshow(probabilities, cmap="viridis", vmin=0, vmax=max(1.0, probabilities.max()))
    figure.colorbar(shown, ax=axes, label="region probability")
    axes.set_title("per-region sampling probability (grid cells)", fontsize=9)
    axes.set_xlabel("grid x")
    axes.set_ylabel("grid y")
    path = folder / "region-probabilities.png"
    figure.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(figure)
    written.append(path)

    ratio = image.shape[0] / image.shape[1]
    figure, grid = plt.subplots(2, 2, figsize=(10, 8.4 * ratio + 1), layout="constrained")
    order = [
        "stratified, 1 epoch",
        "uniform, 1 epoch",
        f"stratified, {epochs} epochs",
        f"uniform, {epochs} epochs",
    ]
    for axes, title in zip(grid.ravel(), order, strict=True):
        count = 1 if title.endswith("1 epoch") else epochs
        shown = axes.imshow(snapshots[title] / count, cmap="magma", vmin=0, vmax=2.5)
        axes.set_title(f"{title}: coverage per epoch", fontsize=9)
        axes.set_axis_off()
    figure.colorbar(
        shown, ax=grid.ravel().tolist(), shrink=0.7, label="patches per pixel per epoch"
    )
    path = folder / "coverage.png"
    figure.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(figure)
    written.append(path)
    return written
