"""The contract every backend keeps, and the checks they share.

A backend holds a sampler's tables in its array namespace (``xp``) and runs
the per-patch draw. The two backends (:class:`~.numpy_backend.NumpyBackend`
and :class:`~.cuda_backend.CudaBackend`) give the same integers for the same
call, and the same exception for the same bad call: :func:`check_indices` is
the one rule for index arrays on both.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from .._validation import check_epoch, validate_seed
from ..permutation import EpochOrder
from ..tables import RegionTables

__all__ = ["Backend", "check_draw", "check_indices"]


@runtime_checkable
class Backend(Protocol):
    """What the sampler needs of a backend.

    Attributes
    ----------
    name : str
        ``"numpy"`` or ``"cuda"``: the ``backend`` argument that selects it.
    xp : module
        The array namespace of its tables and results (NumPy or CuPy).
    """

    name: str
    xp: Any

    def draw(
        self,
        tables: RegionTables,
        indices: EpochOrder | range | Any,
        draw_number: int,
        seed: int,
    ) -> tuple[Any, Any, Any, Any]:
        """Draw the patches of the given global patch indices.

        Parameters
        ----------
        tables : RegionTables
            The sampler's tables, in ``xp``.
        indices : EpochOrder, range or 1-D integer array
            Global patch indices, each in ``[0, tables.total_patches)``.
        draw_number : int
            The draw number, in ``[0, 2**32)``.
        seed : int
            The 64-bit seed.

        Returns
        -------
        data_idx, sample_idx, coords, indices : arrays of int64
            Shapes ``(N,)``, ``(N,)``, ``(N, d)`` and ``(N,)``, in ``xp``.

        Raises
        ------
        IndexError
            If an index is outside ``[0, tables.total_patches)``
            (:func:`check_indices` for arrays).
        """
        ...


def check_draw(draw_number: Any, seed: Any) -> tuple[int, int]:
    """Return a draw's number and seed as ints, or raise as both backends do.

    Parameters
    ----------
    draw_number : int
        In ``[0, 2**32)``.
    seed : int
        In ``[0, 2**64)``.

    Returns
    -------
    draw_number, seed : int

    Raises
    ------
    TypeError
        If either is not an integer.
    ValueError
        If either is out of range (``None`` is not a seed here).
    """
    if seed is None:
        raise TypeError("seed must be an integer, got None")
    return check_epoch(draw_number, "draw_number"), validate_seed(seed)


def check_indices(xp: Any, indices: Any, total_patches: int) -> None:
    """Raise unless every value of a 1-D integer index array is a patch index.

    Parameters
    ----------
    xp : module
        The array namespace of ``indices`` (NumPy or CuPy: on the device this
        is two reductions and one small copy back).
    indices : array of int
        1-D, integer dtype.
    total_patches : int
        The number of patches; valid indices are ``[0, total_patches)``.

    Raises
    ------
    IndexError
        Naming the first offending position and value, and the valid range.
    """
    if int(indices.size) == 0:
        return
    low = int(indices.min())
    high = int(indices.max())
    if low >= 0 and high < total_patches:
        return
    bad = (indices < 0) | (indices >= total_patches)
    position = int(xp.argmax(bad))
    value = int(indices[position])
    raise IndexError(
        f"indices[{position}] = {value} is not a patch index: expected a value in "
        f"[0, {total_patches})"
    )
