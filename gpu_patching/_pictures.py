"""Pictures of the demo (matplotlib, PNG, no display needed).

Three pictures, each readable without the README: the image and how the
background threshold was chosen, the sampling probability of every region over
the image, and the coverage of every sampler over the image. Every map shows
the image underneath, pixel axes, the held-out validation patches in the same
colour, and a caption under each panel. This module only draws: it takes the
demo's numbers as plain data (:class:`DemoScene`, :class:`CoverageRun`).
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from ._atomic import write_atomically

__all__ = ["PICTURE_NAMES", "CoverageRun", "DemoScene", "draw_demo_pictures"]

#: The files :func:`draw_demo_pictures` writes, in order.
PICTURE_NAMES = ("image.png", "region-probabilities.png", "coverage.png")

# One colour for the held-out validation cells in every picture.
_HELD_OUT = "#e8202a"


@dataclass
class CoverageRun:
    """The coverage one sampler reached, epoch after epoch.

    Attributes
    ----------
    label : str
        The sampler's name.
    n_patches : int
        Patches per epoch.
    seconds_per_epoch : float
        Median time to draw one epoch.
    snapshots : dict of int to numpy.ndarray
        Patches per pixel summed over the first ``k`` epochs, by ``k``.
    spreads : list of float
        After each epoch ``k`` (from 1): the standard deviation, over the
        reachable pixels, of patches per pixel per epoch.
    uncovered_first_epoch : float
        Fraction of the reachable pixels that the first epoch left uncovered.
    touched_validation : int
        Validation pixels covered by training patches, summed over epochs.
    """

    label: str
    n_patches: int
    seconds_per_epoch: float
    snapshots: dict[int, NDArray[np.int64]]
    spreads: list[float]
    uncovered_first_epoch: float
    touched_validation: int


@dataclass
class DemoScene:
    """What the demo set up on its image.

    Attributes
    ----------
    image : numpy.ndarray, shape (Y, X)
        The image.
    name : str
        Its name (which file, sample and channel).
    patch_size : tuple of int
        ``(py, px)``, also the grid cell size.
    validation_corners : list of tuple of int
        Top-left corners of the validation patches (their held-out cells).
    excluded : numpy.ndarray of bool, shape (Gy, Gx)
        Excluded grid cells.
    probabilities : numpy.ndarray of float, shape (Gy, Gx)
        Region probabilities.
    scores : numpy.ndarray, shape (Gy, Gx)
        The region statistic that chose the background.
    stat : str
        Its name, as the histogram's axis names it.
    threshold : float
        Regions scoring below it are background.
    threshold_rule : str
        How the threshold was chosen (Otsu's, the default, or given).
    background : str
        How often background regions are drawn, in words
        (:func:`gpu_patching.demo.background_words`).
    expected : numpy.ndarray, shape (Y, X)
        Expected patches per pixel per epoch.
    reachable : numpy.ndarray of bool, shape (Y, X)
        Pixels that some patch can cover.
    limit : float
        Spread of ``expected`` over the reachable pixels: what every
        sampler's spread tends to as epochs add up (a finite run can end
        below it).
    epochs : int
        Epochs drawn.
    """

    image: NDArray[Any]
    name: str
    patch_size: tuple[int, int]
    validation_corners: list[tuple[int, ...]]
    excluded: NDArray[np.bool_]
    probabilities: NDArray[np.float64]
    scores: NDArray[Any]
    stat: str
    threshold: float
    threshold_rule: str
    background: str
    expected: NDArray[np.float64]
    reachable: NDArray[np.bool_]
    limit: float
    epochs: int


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # files only: works on machines without a display
    import matplotlib.pyplot as plt

    return plt


def _caption(axes: Any, text: str, width: int = 70) -> None:
    """Write a caption under a panel (below its x axis label)."""
    axes.text(
        0.5,
        -0.13,
        "\n".join(textwrap.wrap(text, width)),
        transform=axes.transAxes,
        ha="center",
        va="top",
        fontsize=8,
    )


def _show_image(axes: Any, scene: DemoScene) -> None:
    axes.imshow(scene.image, cmap="gray", interpolation="nearest")
    axes.set_xlabel("x (pixels)", fontsize=8)
    axes.set_ylabel("y (pixels)", fontsize=8)
    axes.tick_params(labelsize=7)


def _outline_validation(axes: Any, scene: DemoScene) -> Any:
    from matplotlib.patches import Rectangle

    py, px = scene.patch_size
    for y, x in scene.validation_corners:
        axes.add_patch(
            Rectangle((x - 0.5, y - 0.5), px, py, fill=False, edgecolor=_HELD_OUT, lw=1.3)
        )
    return Rectangle((0, 0), 1, 1, fill=False, edgecolor=_HELD_OUT, lw=1.3)


def _cell_extent(scene: DemoScene) -> tuple[float, float, float, float]:
    """Pixel extent of the grid cells (row 0 on top, as imshow draws images)."""
    rows, cols = scene.probabilities.shape
    py, px = scene.patch_size
    return (-0.5, cols * px - 0.5, rows * py - 0.5, -0.5)


def _words(figure: Any) -> str:
    """Every non-empty text of a figure (titles, captions, legends, labels), one a line."""
    from matplotlib.text import Text

    texts = (artist.get_text() for artist in figure.findobj(Text))
    return "\n".join(text for text in texts if text.strip())


def _save(figure: Any, path: Path) -> Path:
    # The figures lay themselves out (constrained layout): one draw, not two.
    # The PNG carries its words as its description: a text for screen readers
    # and search, and what the tests read to hold the words to the numbers.
    # Written atomically: an interrupted demo leaves the old picture, not half of one.
    description = {"Description": _words(figure)}
    try:
        write_atomically(
            path,
            lambda stream: figure.savefig(stream, dpi=90, format="png", metadata=description),
        )
    finally:
        _pyplot().close(figure)
    return path


def _count_background(scene: DemoScene) -> int:
    """Background regions, counted as the filter counts them: included and under the threshold.

    At probability 1 they look like the rest on the probability map, so they
    are counted from the scores, not from the probabilities.
    """
    below = np.asarray(scene.scores) < scene.threshold
    return int((below & ~np.asarray(scene.excluded)).sum())


def _draw_image(scene: DemoScene, path: Path) -> Path:
    plt = _pyplot()
    figure, (left, right) = plt.subplots(
        1, 2, figsize=(12, 5.6), width_ratios=(1.1, 1), layout="constrained"
    )
    _show_image(left, scene)
    left.set_title("(a) the image", fontsize=10)
    _caption(left, f"{scene.name}; {scene.image.shape[0]} x {scene.image.shape[1]} pixels.")
    scores = np.asarray(scene.scores, dtype=np.float64).ravel()
    held_out = np.asarray(scene.excluded).ravel()
    background = (scores < scene.threshold) & ~held_out
    kept = ~background & ~held_out
    bins = np.histogram_bin_edges(scores, bins=40)
    # Stacked, so the bars add up to every region; held-out cells keep their
    # probability but are never sampled, so they get their own colour.
    right.hist(
        [scores[background], scores[kept], scores[held_out]],
        bins=bins,
        stacked=True,
        color=["#3b6fd6", "0.45", _HELD_OUT],
        label=[
            f"background ({background.sum()})",
            f"kept ({kept.sum()})",
            f"held out for validation ({held_out.sum()})",
        ],
    )
    right.axvline(scene.threshold, color="black", ls="--", lw=1.2)
    right.text(
        scene.threshold,
        right.get_ylim()[1] * 0.95,
        f" threshold {scene.threshold:.4g}",
        fontsize=8,
        va="top",
    )
    right.set_xlabel(f"{scene.stat} of each region (its 2x-patch box)")
    # Log counts: background regions often outnumber the rest tenfold, and
    # linear bars would hide the regions that were kept.
    right.set_yscale("log")
    right.set_ylabel("regions (log scale)")
    right.legend(fontsize=8)
    right.set_title("(b) how background was chosen", fontsize=10)
    _caption(
        right,
        f"Histogram of the {scene.stat} of the {scores.size} sampling regions. Regions "
        f"below the threshold ({scene.threshold:.4g}: {scene.threshold_rule}) are "
        f"background, {scene.background}.",
    )
    return _save(figure, path)


def _draw_probabilities(scene: DemoScene, path: Path) -> Path:
    plt = _pyplot()
    from matplotlib.colors import BoundaryNorm, ListedColormap
    from matplotlib.patches import Patch

    included = ~scene.excluded
    values = np.unique(scene.probabilities[included]) if included.any() else np.array([])
    # One category per distinct probability, plus "held out" first: a
    # discrete scale, since a run has only a few distinct probabilities.
    category = np.zeros(scene.probabilities.shape, dtype=np.int64)
    category[included] = 1 + np.searchsorted(values, scene.probabilities[included])
    palette = plt.get_cmap("viridis")(np.linspace(0.1, 0.95, max(len(values), 1)))
    colours = ListedColormap([_HELD_OUT, *palette[: len(values)]])
    norm = BoundaryNorm(np.arange(len(values) + 2) - 0.5, colours.N)
    height, width = scene.image.shape
    figure, axes = plt.subplots(figsize=(7.5, 7.5 * height / width + 1.2), layout="constrained")
    _show_image(axes, scene)
    shown = axes.imshow(
        category,
        cmap=colours,
        norm=norm,
        alpha=0.45,
        extent=_cell_extent(scene),
        interpolation="nearest",
    )
    outline = _outline_validation(axes, scene)
    axes.set_xlim(-0.5, width - 0.5)
    axes.set_ylim(height - 0.5, -0.5)
    bar = figure.colorbar(shown, ax=axes, ticks=np.arange(len(values) + 1), shrink=0.5)
    bar.ax.set_yticklabels(["held out", *(f"p = {v:.3g}" for v in values)], fontsize=8)
    bar.set_label("region sampling probability", fontsize=9)
    n_background = _count_background(scene)
    axes.legend(
        handles=[
            Patch(facecolor=_HELD_OUT, alpha=0.45, label="held-out cell (never sampled)"),
            outline,
            *(
                Patch(facecolor=palette[i], alpha=0.45, label=f"region with probability {v:.3g}")
                for i, v in enumerate(values)
            ),
        ],
        labels=[
            "held-out cell (never overlapped)",
            f"validation patch ({len(scene.validation_corners)})",
            *(f"region, probability {v:.3g}" for v in values),
        ],
        fontsize=7,
        # Above the image, so that it hides none of it.
        loc="lower center",
        bbox_to_anchor=(0.5, 1.01),
        ncol=2,
        frameon=False,
    )
    # Wrapped: a file path in the name can be wider than the figure.
    figure.suptitle(
        textwrap.fill(f"Region sampling probabilities over {scene.name}", 100), fontsize=10
    )
    _caption(
        axes,
        f"Each {scene.patch_size[0]}x{scene.patch_size[1]} grid cell coloured by the "
        f"probability of its sampling region: {n_background} background regions are "
        f"{scene.background}, {len(scene.validation_corners)} cells are held out for validation "
        f"(no training patch overlaps them). Pixels past the last full cell belong to "
        f"the regions of the last row and column.",
        width=90,
    )
    return _save(figure, path)


def _draw_coverage(scene: DemoScene, runs: Sequence[CoverageRun], path: Path) -> Path:
    plt = _pyplot()
    from matplotlib.colors import Normalize

    height, width = scene.image.shape
    epochs = scene.epochs
    first = runs[0].snapshots[1][scene.reachable]
    top = max(2.0, float(np.ceil(np.percentile(first, 99.5)))) if first.size else 2.0
    norm = Normalize(0.0, top)
    # Uncovered pixels (masked) are transparent: the image itself shows there.
    colours = plt.get_cmap("magma").with_extremes(bad=(0.0, 0.0, 0.0, 0.0))
    # One column per sampler (1 epoch on top, all epochs below), and a last
    # column with the expected coverage and the spread after each epoch.
    columns = len(runs) + 1
    panel = 3.6
    figure, grid = plt.subplots(
        2,
        columns,
        figsize=(columns * panel + 1.0, 2 * (panel * height / width + 1.3) + 0.4),
        squeeze=False,
        layout="constrained",
    )
    letters = "abcdefghijklmnop"
    shown = None
    for column, run in enumerate(runs):
        for row, count in enumerate((1, epochs)):
            axes = grid[row, column]
            letter = letters[row * columns + column]
            per_epoch = run.snapshots[count] / count
            _show_image(axes, scene)
            shown = axes.imshow(
                np.ma.masked_equal(per_epoch, 0),
                cmap=colours,
                norm=norm,
                alpha=0.75,
                interpolation="nearest",
            )
            _outline_validation(axes, scene)
            uncovered = float(np.mean(run.snapshots[count][scene.reachable] == 0))
            axes.set_title(
                f"({letter}) {run.label},\nafter {count} epoch{'s' * (count > 1)}",
                fontsize=9,
            )
            _caption(
                axes,
                f"{run.n_patches} patches per epoch; {uncovered:.1%} of the reachable pixels "
                f"never covered (bare image); spread {run.spreads[count - 1]:.3f} "
                f"(limit {scene.limit:.3f}).",
                width=45,
            )
    expected_axes, curve = grid[0, -1], grid[1, -1]
    _show_image(expected_axes, scene)
    expected_axes.imshow(
        np.ma.masked_equal(scene.expected, 0),
        cmap=colours,
        norm=norm,
        alpha=0.75,
        interpolation="nearest",
    )
    _outline_validation(expected_axes, scene)
    expected_axes.set_title(f"({letters[columns - 1]}) expected coverage,\nany epoch", fontsize=9)
    _caption(
        expected_axes,
        "The average of every sampler here: pixels near the border or a held-out cell are "
        "reachable by fewer patches"
        + (f", background is {scene.background}" if _count_background(scene) else "")
        + f"; its spread, {scene.limit:.3f}, is the limit every sampler's spread tends to "
        f"as epochs add up.",
        width=45,
    )
    counts = np.arange(1, epochs + 1)
    for run in runs:
        curve.plot(counts, run.spreads, marker="o", ms=3, label=run.label)
    curve.axhline(scene.limit, color="black", ls="--", lw=1, label="limit (expected coverage)")
    curve.set_xlabel("epochs drawn", fontsize=8)
    curve.set_ylabel("spread (patches per pixel per epoch)", fontsize=8)
    curve.tick_params(labelsize=7)
    curve.set_ylim(bottom=0)
    curve.xaxis.get_major_locator().set_params(integer=True)
    curve.legend(fontsize=7)
    curve.set_title(f"({letters[2 * columns - 1]}) spread after\neach epoch", fontsize=9)
    _caption(
        curve,
        f"Standard deviation over the {int(scene.reachable.sum())} reachable pixels of the "
        f"mean coverage per epoch so far; lower is more even. The dashed line is the limit: "
        f"every curve tends to it as epochs add up, and a finite run may end above or below "
        f"it.",
        width=45,
    )
    figure.colorbar(
        shown,
        ax=grid[:, :-1].ravel().tolist(),
        shrink=0.6,
        label="patches per pixel per epoch (red boxes: validation patches)",
    )
    figure.suptitle(textwrap.fill(f"Coverage of {scene.name}", 160), fontsize=11)
    return _save(figure, path)


def draw_demo_pictures(folder: Path, scene: DemoScene, runs: Sequence[CoverageRun]) -> list[Path]:
    """Write the demo's pictures into ``folder`` and return their paths.

    Parameters
    ----------
    folder : pathlib.Path
        Output folder (created if missing).
    scene : DemoScene
        The image, its regions and what the demo set up on them.
    runs : sequence of CoverageRun
        The samplers' coverage, ours first.

    Returns
    -------
    list of pathlib.Path
        The PNG files written (:data:`PICTURE_NAMES`).
    """
    folder.mkdir(parents=True, exist_ok=True)
    image_path, probability_path, coverage_path = (folder / name for name in PICTURE_NAMES)
    return [
        _draw_image(scene, image_path),
        _draw_probabilities(scene, probability_path),
        _draw_coverage(scene, runs, coverage_path),
    ]
