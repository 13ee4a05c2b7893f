"""Side views of the NumPy draw, for the tests: one stratum's point, one point's corner.

The backend draws whole chunks at once; these two functions expose its steps
one at a time (the mass point drawn in a stratum, the corner that owns a mass
point) so that tests can check each against an independent derivation. They
use the backend's own primitives, so they are views of the draw path, not a
second implementation of it.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

from gpu_patching.backends.host_tables import box_index
from gpu_patching.backends.numpy_backend import mulhi64_halves, stratum_bounds
from gpu_patching.tables import RegionTables


def mulhi64(a: NDArray[np.uint64], b: NDArray[np.uint64]) -> NDArray[np.uint64]:
    """The backend's exact high 64 bits of ``a * b``, for uint64 arrays."""
    mask, shift = np.uint64(0xFFFFFFFF), np.uint64(32)
    return mulhi64_halves(a & mask, a >> shift, b & mask, b >> shift)


def stratum_points(
    stratum: NDArray[np.int64],
    n_patches: NDArray[np.int64],
    mass_total: NDArray[np.int64],
    word: NDArray[np.uint64],
) -> NDArray[np.int64]:
    """Return the mass point drawn in each stratum.

    Parameters
    ----------
    stratum : numpy.ndarray of int64
        Stratum ``j`` of each draw, ``0 <= j < n``.
    n_patches : numpy.ndarray of int64
        Number of strata ``n`` (the sample's patch count), ``0 < n < 2**31``.
    mass_total : numpy.ndarray of int64
        Total mass ``M`` of the sample, ``0 < M < 2**62``.
    word : numpy.ndarray of uint64
        A uniform 64-bit random word per draw.

    Returns
    -------
    numpy.ndarray of int64
        ``x = lo + floor(word * (hi - lo) / 2**64)`` in ``[lo, hi)`` with
        ``lo = floor(j M / n)`` and ``hi = floor((j + 1) M / n)``, or ``lo``
        when the stratum is empty (only possible when ``M < n``). A stratum is
        narrower than ``2**62``, so 64 random bits reach every one of its points.
    """
    quotient, remainder = np.divmod(mass_total, n_patches)
    lower, upper = stratum_bounds(stratum, quotient, remainder, n_patches, 0)
    width = (upper - lower).astype(np.uint64)
    return lower + mulhi64(word, width).astype(np.int64)


def locate_corners(
    tables: RegionTables, sample: NDArray[np.int64], point: NDArray[np.int64]
) -> NDArray[np.int64]:
    """Return the corner that owns each mass point of a sample.

    The region is the one whose mass interval holds the point; inside it each
    corner owns ``weight`` consecutive points, in the order of the selectable
    sub-boxes (bit order) and row-major inside a sub-box.

    Parameters
    ----------
    tables : RegionTables
        Tables on the NumPy backend.
    sample : numpy.ndarray of int64
        Flat sample number of each point.
    point : numpy.ndarray of int64
        Mass point relative to the sample, ``0 <= point < M``.

    Returns
    -------
    numpy.ndarray of int64, shape (len(point), d)
        Patch corners (top-left, and first slice in 3D).
    """
    corner = np.empty((len(point), tables.ndim), dtype=np.int64)
    global_point = np.asarray(tables.mass_offset[sample] + point, dtype=np.int64)
    index = box_index(tables)
    index.locate(global_point, np.asarray(sample, dtype=np.int64), corner)
    return corner
