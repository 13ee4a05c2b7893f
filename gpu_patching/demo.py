"""The demonstration behind ``gpu-patching demo`` (and ``make demo``).

On one 2D microscopy image: a validation split and background regions chosen
by Otsu's threshold, then the coverage of our sampler, CAREamics'
``StratifiedPatching`` (when it loads) and independent random patching, all
drawing from that same distribution over corners: the fraction one epoch
leaves uncovered, the spread of patches per pixel after 1, 5 and N epochs,
and the limit they tend to. What the table means: ``docs/design.md``, "The
demo".
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from . import StratifiedPatching, filter_background, region_statistics, validation_split
from ._pictures import PICTURE_NAMES, CoverageRun, DemoScene, draw_demo_pictures

__all__ = [
    "BACKGROUND_STATS",
    "FOREGROUND",
    "FOREGROUND_FRACTION",
    "PICTURE_NAMES",
    "background_words",
    "cell_map",
    "corner_weights",
    "coverage_map",
    "expected_coverage",
    "run_demo",
]

#: Epoch counts after which the table reports the coverage spread (and N).
SPREAD_EPOCHS = (1, 5)

#: The default background statistic: the fraction of a region's pixels that
#: are foreground, foreground being the pixels above Otsu's threshold of the
#: image's pixels (bright objects: fluorescence, phase contrast).
FOREGROUND = "foreground"

#: The statistics ``background_stat`` takes: :data:`FOREGROUND`, or a region
#: statistic of :func:`~gpu_patching.region_statistics` split by Otsu.
BACKGROUND_STATS = (FOREGROUND, "mean", "std", "max", "entropy")

#: Regions with a smaller fraction of foreground pixels are background by
#: default. 1% of a 64x64 region is 41 pixels: more than the few noisy
#: pixels of empty background that pass Otsu's threshold, less than the edge
#: of a cell or a nucleus cut by the region's border (see the README's demo
#: section for the images it was checked on).
FOREGROUND_FRACTION = 0.01


def _check_2d(shape: Sequence[int], patch_size: Sequence[int]) -> tuple[int, int, int, int]:
    if len(shape) != 2 or len(patch_size) != 2:
        raise ValueError(
            f"expected a 2D shape and patch size, got shape {tuple(shape)} "
            f"and patch size {tuple(patch_size)}"
        )
    height, width = (int(s) for s in shape)
    py, px = (int(p) for p in patch_size)
    if not (1 <= py <= height and 1 <= px <= width):
        raise ValueError(f"patch size {(py, px)} does not fit the shape {(height, width)}")
    return height, width, py, px


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
    _check_2d(shape, patch_size)
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
    height, width, py, px = _check_2d(shape, patch_size)
    corners = np.asarray(corners, dtype=np.int64).reshape(-1, 2)
    # A 2D difference array: +1 at each box's corner, -1 past its edges, then
    # two cumulative sums; no loop over patches.
    diff = np.zeros((height + 1, width + 1), dtype=np.int64)
    y, x = corners[:, 0], corners[:, 1]
    np.add.at(diff, (y, x), 1)
    np.add.at(diff, (y + py, x), -1)
    np.add.at(diff, (y, x + px), -1)
    np.add.at(diff, (y + py, x + px), 1)
    return diff.cumsum(axis=0).cumsum(axis=1)[:height, :width]


def corner_weights(
    excluded: NDArray[np.bool_],
    probabilities: NDArray[Any],
    patch_size: Sequence[int],
    shape: Sequence[int],
) -> NDArray[np.float64]:
    """Return the sampling weight of every patch corner of a 2D sample.

    The distribution every sampler of the demo draws from: a corner's weight
    is the probability of the region (grid cell) that holds it, or 0 when its
    patch overlaps an excluded cell.

    Parameters
    ----------
    excluded : numpy.ndarray of bool, shape (Gy, Gx)
        Excluded grid cells (``StratifiedPatching.get_excluded_cells``).
    probabilities : numpy.ndarray of float, shape (Gy, Gx)
        Region probabilities (``StratifiedPatching.get_region_probs``).
    patch_size, shape : sequence of int
        ``(py, px)`` of the patches and ``(Y, X)`` of the sample.

    Returns
    -------
    numpy.ndarray of float64, shape ``(Y - py + 1, X - px + 1)``
        Weight of the patch whose top-left corner is at each position.

    Raises
    ------
    ValueError
        If the grids do not have the sample's grid shape ``(D + 1) // P``, or a
        probability is negative or not finite.
    """
    height, width, py, px = _check_2d(shape, patch_size)
    grid = ((height + 1) // py, (width + 1) // px)
    excluded = np.asarray(excluded, dtype=bool)
    probabilities = np.asarray(probabilities, dtype=np.float64)
    for name, values in (("excluded", excluded), ("probabilities", probabilities)):
        if values.shape != grid:
            raise ValueError(f"{name} has shape {values.shape}, expected the grid shape {grid}")
    if not np.all(np.isfinite(probabilities) & (probabilities >= 0)):
        raise ValueError("probabilities must be finite and non-negative")
    corner_y = np.arange(height - py + 1)
    corner_x = np.arange(width - px + 1)
    # A corner lies in cell c // P; its patch ends in cell (c + P - 1) // P,
    # at most one further, which may be past the grid (never excluded).
    first_y, last_y = corner_y // py, (corner_y + py - 1) // py
    first_x, last_x = corner_x // px, (corner_x + px - 1) // px
    padded = np.zeros((grid[0] + 1, grid[1] + 1), dtype=bool)
    padded[: grid[0], : grid[1]] = excluded
    touches = (
        padded[np.ix_(first_y, first_x)]
        | padded[np.ix_(last_y, first_x)]
        | padded[np.ix_(first_y, last_x)]
        | padded[np.ix_(last_y, last_x)]
    )
    weights = probabilities[np.ix_(first_y, first_x)].copy()
    weights[touches] = 0.0
    return weights


def _box_sum(values: NDArray[Any], patch_size: Sequence[int], shape: Sequence[int]) -> NDArray[Any]:
    """Sum per-corner values over every pixel each corner's patch covers."""
    height, width, py, px = _check_2d(shape, patch_size)
    rows, cols = values.shape
    diff = np.zeros((height + 1, width + 1), dtype=values.dtype)
    diff[:rows, :cols] += values
    diff[py : py + rows, :cols] -= values
    diff[:rows, px : px + cols] -= values
    diff[py : py + rows, px : px + cols] += values
    return diff.cumsum(axis=0).cumsum(axis=1)[:height, :width]


def expected_coverage(
    weights: NDArray[Any], n_patches: int, patch_size: Sequence[int], shape: Sequence[int]
) -> NDArray[np.float64]:
    """Return the expected patches per pixel of one epoch of ``n_patches`` draws.

    Parameters
    ----------
    weights : numpy.ndarray, shape ``(Y - py + 1, X - px + 1)``
        Per-corner sampling weights (:func:`corner_weights`).
    n_patches : int
        Patches per epoch.
    patch_size, shape : sequence of int
        ``(py, px)`` of the patches and ``(Y, X)`` of the image.

    Returns
    -------
    numpy.ndarray of float64, shape ``shape``
        The expected coverage of each pixel by one epoch.
    """
    height, width, py, px = _check_2d(shape, patch_size)
    weights = np.asarray(weights, dtype=np.float64)
    if weights.shape != (height - py + 1, width - px + 1):
        raise ValueError(
            f"weights has shape {weights.shape}, expected one per corner "
            f"{(height - py + 1, width - px + 1)}"
        )
    total = float(weights.sum())
    if total <= 0:
        return np.zeros((height, width))
    coverage = _box_sum(weights * (int(n_patches) / total), patch_size, shape)
    # The float cumulative sums leave residue (1e-17 and the like) on pixels
    # that no weighted corner reaches; the integer count of those corners says
    # exactly which pixels they are.
    reached = _box_sum((weights > 0).astype(np.int64), patch_size, shape) > 0
    coverage[~reached] = 0.0
    return coverage


def background_words(filtered_prob: float) -> str:
    """Say how often background regions are drawn, compared with the rest.

    Parameters
    ----------
    filtered_prob : float
        Probability given to background regions (the rest keep 1).

    Returns
    -------
    str
        For example ``"drawn less often (probability 0.1)"``.
    """
    if filtered_prob == 0:
        return "never drawn (probability 0)"
    if filtered_prob < 1:
        return f"drawn less often (probability {filtered_prob:g})"
    if filtered_prob == 1:
        return "drawn as often as the rest (probability 1)"
    return f"drawn more often (probability {filtered_prob:g})"


def _independent_draws(weights: NDArray[np.float64], n_patches: int, seed: int) -> Any:
    """Epochs of corners drawn independently with probability ``weights / sum``."""
    cumulative = np.cumsum(weights.ravel())
    random = np.random.default_rng(seed)
    columns = weights.shape[1]

    def draw(epoch: int) -> NDArray[np.int64]:
        del epoch  # each epoch continues the same stream
        points = random.random(n_patches) * cumulative[-1]
        # side="right" skips every zero-weight corner (a flat step of the sum).
        flat = np.minimum(np.searchsorted(cumulative, points, side="right"), cumulative.size - 1)
        return np.stack(np.divmod(flat, columns), axis=1)

    return draw


def _careamics_sampler(
    sampler: StratifiedPatching, shape: tuple[int, ...], seed: int
) -> tuple[Any, str]:
    """CAREamics' sampler set up like ours, or ``(None, why not)``."""
    from .testing import load_reference

    try:
        reference = load_reference()
    except ImportError as error:
        return None, str(error)
    theirs = reference([shape], sampler.patch_size, seed=seed)
    excluded = sampler.get_excluded_cells(0, 0)
    if excluded.any():
        theirs.exclude_patches(0, 0, [tuple(int(i) for i in c) for c in np.argwhere(excluded)])
    probabilities = sampler.get_region_probs(0, 0)
    changed = np.argwhere(probabilities != 1)
    if len(changed):
        theirs.set_region_probs(
            0, 0, {tuple(int(i) for i in c): float(probabilities[tuple(c)]) for c in changed}
        )
    return theirs, ""


def _measure(
    label: str,
    n_patches: int,
    draw: Callable[[int], NDArray[np.int64]],
    *,
    scene: DemoScene,
    held_out: NDArray[np.bool_],
    progress: bool,
) -> CoverageRun:
    """Draw the scene's epochs and record their coverage."""
    epochs, reachable = scene.epochs, scene.reachable
    total = np.zeros(scene.image.shape, dtype=np.int64)
    seconds, spreads, snapshots = [], [], {}
    touched = 0
    rounds: Any = range(epochs)
    if progress:
        from tqdm import tqdm

        rounds = tqdm(rounds, desc=label, unit="epoch", leave=False)
    for epoch in rounds:
        start = time.perf_counter()
        corners = draw(epoch)
        seconds.append(time.perf_counter() - start)
        cover = coverage_map(corners, scene.patch_size, scene.image.shape)
        total += cover
        touched += int(cover[held_out].sum())
        spreads.append(float((total[reachable] / (epoch + 1)).std()))
        if epoch + 1 in (*SPREAD_EPOCHS, epochs):
            snapshots[epoch + 1] = total.copy()
    first = snapshots[1]
    return CoverageRun(
        label=label,
        n_patches=n_patches,
        seconds_per_epoch=float(np.median(seconds)),
        snapshots=snapshots,
        spreads=spreads,
        uncovered_first_epoch=float(np.mean(first[reachable] == 0)),
        touched_validation=touched,
    )


def run_demo(
    image: NDArray[Any],
    *,
    name: str,
    patch_size: tuple[int, int] = (32, 32),
    epochs: int = 20,
    seed: int | None = 2026,
    backend: str = "auto",
    output: Path | None = None,
    validation_fraction: float = 0.05,
    background_stat: str = FOREGROUND,
    background_threshold: float | None = None,
    filtered_prob: float = 0.1,
    compare_careamics: bool = True,
    progress: bool = True,
) -> dict[str, Any]:
    """Run the demonstration on one 2D image.

    Parameters
    ----------
    image : numpy.ndarray, shape (Y, X)
        The image.
    name : str
        How to name the image in the printout and the pictures (say which
        sample and channel of a larger stack it is).
    patch_size : tuple of int
        Patch size ``(py, px)``.
    epochs : int
        Epochs to draw (at least 1).
    seed : int or None
        Seed of every sampler.
    backend : {"auto", "cuda", "numpy"}
        Backend of our sampler.
    output : pathlib.Path, optional
        Folder for the pictures (created if missing); none are drawn when None.
    validation_fraction : float
        Fraction of the patches to hold out for validation, in ``[0, 0.5]``.
    background_stat : str
        What tells background (one of :data:`BACKGROUND_STATS`). The default,
        ``"foreground"``, is the fraction of a region's pixels above Otsu's
        threshold of the image's pixels (scikit-image's ``threshold_otsu``):
        it keeps every region that holds part of a bright object, flat
        inside or not (fluorescence, phase contrast). ``"mean"``, ``"std"``,
        ``"max"`` and ``"entropy"`` are region statistics (see
        :func:`~gpu_patching.region_statistics`), split by Otsu's threshold
        of the regions' values; ``"std"`` takes flat regions for background,
        which suits textured objects but also takes the flat inside of a
        large cell.
    background_threshold : float, optional
        Regions whose statistic is below this are background. By default
        :data:`FOREGROUND_FRACTION` for ``"foreground"`` (a fraction in
        ``[0, 1]``), Otsu's threshold of the regions' values otherwise.
    filtered_prob : float
        Probability given to background regions (the others keep 1).
    compare_careamics : bool
        Also run CAREamics' ``StratifiedPatching`` when it can be loaded.
    progress : bool
        Show progress bars (tqdm).

    Returns
    -------
    dict
        The printed numbers: ``"runs"`` (one :class:`CoverageRun` per
        sampler), ``"limit"`` (the spread of the expected coverage, which
        every row's spread tends to), ``"threshold"``, ``"reachable_pixels"``,
        ``"careamics"`` (why its row is absent, or ``""``), ``"validation"``,
        ``"background_regions"``, ``"region_probabilities"`` (the grid of
        region probabilities every sampler used) and ``"pictures"``.

    Raises
    ------
    TypeError
        If the image is not real-valued.
    ValueError
        If the image is not 2D or has NaN or infinite pixels, ``epochs`` is
        below 1, ``background_stat`` is unknown, or a fraction, threshold or
        probability is out of range.
    """
    image = np.asarray(image)
    if image.ndim != 2:
        raise ValueError(f"the demo needs a 2D image, got shape {image.shape}")
    if not np.issubdtype(image.dtype, np.number) or np.issubdtype(image.dtype, np.complexfloating):
        raise TypeError(f"the demo needs a real-valued image, got dtype {image.dtype}")
    finite = np.isfinite(image)
    if not finite.all():
        raise ValueError(
            f"the image has {image.size - int(finite.sum())} NaN or infinite pixels; "
            "region statistics (and so the background threshold) need finite values"
        )
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs must be an integer of at least 1, got {epochs!r}")
    if not 0 <= validation_fraction <= 0.5:
        raise ValueError(f"validation fraction must be in [0, 0.5], got {validation_fraction}")
    if not (np.isfinite(filtered_prob) and filtered_prob >= 0):
        raise ValueError(f"filtered probability must be finite and >= 0, got {filtered_prob}")
    if background_stat not in BACKGROUND_STATS:
        raise ValueError(
            f"background stat must be one of {BACKGROUND_STATS}, got {background_stat!r}"
        )
    if background_threshold is not None and not np.isfinite(background_threshold):
        raise ValueError(f"background threshold must be finite, got {background_threshold}")
    if (
        background_stat == FOREGROUND
        and background_threshold is not None
        and not 0 <= background_threshold <= 1
    ):
        raise ValueError(
            f"background threshold must be a fraction in [0, 1] for the foreground "
            f"statistic, got {background_threshold}"
        )
    shape = (int(image.shape[0]), int(image.shape[1]))
    patch = (int(patch_size[0]), int(patch_size[1]))
    stack = image[np.newaxis, np.newaxis]
    sampler = StratifiedPatching([stack.shape], patch, seed=seed, backend=backend)
    seed = sampler.seed
    print(f"image: {name}, {shape[0]}x{shape[1]} pixels; patch {patch[0]}x{patch[1]}")
    print(f"sampler: backend {sampler.backend}, seed {seed}, {sampler.n_patches} patches")

    n_validation = round(validation_fraction * sampler.n_patches)
    validation = validation_split(sampler, n_validation, seed=seed) if n_validation else []
    print(f"validation: {len(validation)} patches held out -> {sampler.n_patches} patches")

    from skimage.filters import threshold_otsu

    if background_stat == FOREGROUND:
        # Otsu on the pixels, where the two classes (object, background) are;
        # a region statistic would split regions even when all hold cells.
        pixel_threshold = float(threshold_otsu(image))
        foreground = (image > pixel_threshold)[np.newaxis, np.newaxis]
        scores = np.asarray(
            region_statistics(stack, patch, stats=("coverage",), mask=foreground)["coverage"]
        )[0]
        stat_label = "foreground fraction"
        given = background_threshold is not None
        threshold = FOREGROUND_FRACTION if background_threshold is None else background_threshold
        how = (
            f"{'fraction given' if given else 'default fraction'}; foreground pixels are those "
            f"above {pixel_threshold:.4g}, Otsu's threshold of the image's pixels"
        )
        filtered = filter_background(
            sampler,
            [stack],
            mask_stacks=[foreground],
            coverage=threshold,
            filtered_prob=filtered_prob,
        )
    else:
        scores = np.asarray(
            region_statistics(stack, patch, stats=(background_stat,))[background_stat]
        )[0]
        stat_label = background_stat
        if background_threshold is None:
            threshold = float(threshold_otsu(scores))
            how = f"Otsu's threshold of the regions' {background_stat}"
        else:
            threshold = float(background_threshold)
            how = "the threshold given"
        filtered = filter_background(
            sampler,
            [stack],
            stat=background_stat,
            threshold=threshold,
            filtered_prob=filtered_prob,
        )
    n_background = sum(filtered.filtered.values())
    print(
        f"background: {stat_label} < {threshold:.4g} ({how}): {n_background} of "
        f"{scores.size} regions are background, {background_words(filtered_prob)} -> "
        f"{sampler.n_patches} "
        f"patches per epoch"
    )
    if sampler.n_patches == 0:
        raise ValueError(
            f"no patches left to compare: every region is held out or background at "
            f"probability {filtered_prob}; give background a probability above 0 or a "
            f"lower threshold"
        )

    excluded = sampler.get_excluded_cells(0, 0)
    probabilities = sampler.get_region_probs(0, 0)
    weights = corner_weights(excluded, probabilities, patch, shape)
    reachable = _box_sum((weights > 0).astype(np.int64), patch, shape) > 0
    expected = expected_coverage(weights, sampler.n_patches, patch, shape)
    # What every sampler's spread tends to as epochs add up (not a floor for
    # a finite run: see the module docstring).
    limit = float(expected[reachable].std())
    held_out = np.zeros(shape, dtype=bool)
    for spec in validation:
        y, x = spec["coords"]
        held_out[y : y + patch[0], x : x + patch[1]] = True

    scene = DemoScene(
        image=image,
        name=name,
        patch_size=patch,
        validation_corners=[tuple(spec["coords"]) for spec in validation],
        excluded=excluded,
        probabilities=probabilities,
        scores=scores,
        stat=stat_label,
        threshold=threshold,
        threshold_rule=how,
        background=background_words(filtered_prob),
        expected=expected,
        reachable=reachable,
        limit=limit,
        epochs=epochs,
    )
    measure = functools.partial(_measure, scene=scene, held_out=held_out, progress=progress)
    runs = [
        measure(
            f"ours ({sampler.backend})",
            sampler.n_patches,
            lambda epoch: sampler.sample_epoch(epoch).to_numpy().coords,
        )
    ]
    why_not = "left out on request"
    if compare_careamics:
        theirs, why_not = _careamics_sampler(sampler, stack.shape, seed % 2**32)
        if theirs is not None:
            runs.append(
                measure(
                    "CAREamics StratifiedPatching",
                    theirs.n_patches,
                    lambda epoch: np.array(
                        [theirs.get_patch_spec(i)["coords"] for i in range(theirs.n_patches)]
                    ),
                )
            )
    runs.append(
        measure(
            "independent random draws",
            sampler.n_patches,
            _independent_draws(weights, sampler.n_patches, seed),
        )
    )
    _print_table(runs, scene, why_not, filtered_prob if n_background else None)
    results: dict[str, Any] = {
        "runs": runs,
        "limit": limit,
        "threshold": threshold,
        "reachable_pixels": int(reachable.sum()),
        "careamics": why_not,
        "validation": len(validation),
        "background_regions": n_background,
        "region_probabilities": probabilities,
    }
    if output is not None:
        written = draw_demo_pictures(Path(output), scene, runs)
        print("pictures:", ", ".join(str(p) for p in written))
        results["pictures"] = written
    return results


def _print_table(
    runs: Sequence[CoverageRun],
    scene: DemoScene,
    careamics_missing: str,
    filtered_prob: float | None,
) -> None:
    epochs, limit = scene.epochs, scene.limit
    n_pixels = int(scene.reachable.sum())
    mean = float(scene.expected[scene.reachable].mean())
    counts = sorted({*SPREAD_EPOCHS, epochs})
    counts = [c for c in counts if c <= epochs]
    header = f"\n{'sampler':30s} {'patches':>7s} {'ms/epoch':>9s} {'uncovered@1':>11s}" + "".join(
        f" {f'spread@{c}':>10s}" for c in counts
    )
    print(header)
    print("-" * (len(header) - 1))
    for run in runs:
        spreads = "".join(f" {run.spreads[c - 1]:10.3f}" for c in counts)
        print(
            f"{run.label:30s} {run.n_patches:7d} {run.seconds_per_epoch * 1e3:9.2f} "
            f"{run.uncovered_first_epoch:11.1%}{spreads}"
        )
        if run is runs[0] and careamics_missing:
            # Its place in the table, with the reason it is empty.
            print(f"{'CAREamics StratifiedPatching':30s} not run: {careamics_missing}")
    print(
        f"{'limit (expected coverage)':30s} {'':7s} {'':9s} {'':11s}"
        + f" {limit:10.3f}" * len(counts)
    )
    # Only what this run set up explains the limit: background is named
    # only when some region got another probability.
    why = "pixels near the border or a held-out cell are reachable by fewer patches"
    if filtered_prob is not None:
        why += f", background is {background_words(filtered_prob)}"
    print(
        f"\nStratification is for even coverage within each epoch: every row draws each "
        f"corner with the same probability, so its spread (standard deviation of patches per "
        f"pixel per epoch over the {n_pixels} pixels a patch can reach, mean {mean:.2f}) "
        f"tends to the same limit as epochs add up: {limit:.3f}, the spread of the expected "
        f"coverage ({why}). A finite run can end above or below it; a sampler is better the "
        f"closer to it it starts and the fewer pixels one epoch leaves uncovered."
    )
    touched = ", ".join(f"{run.label} {run.touched_validation}" for run in runs)
    print(f"validation pixels covered by training patches: {touched}")
