"""Patch specifications: one patch (``PatchSpecs``) and a whole epoch (``PatchBatch``)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypedDict

import numpy as np

from ._validation import as_int
from .arrays import to_host

__all__ = ["PatchBatch", "PatchSpecs"]


class PatchSpecs(TypedDict):
    """A dictionary that names one patch in a series of image stacks.

    The same keys as CAREamics' ``PatchSpecs``.

    Attributes
    ----------
    data_idx : int
        Which image stack the patch comes from.
    sample_idx : int
        Which sample of that stack the patch comes from.
    coords : sequence of int
        The top-left corner (and first z-slice in 3D) of the patch, a tuple of
        2 or 3 ints.
    patch_size : sequence of int
        The patch size, a tuple of 2 or 3 ints.
    """

    data_idx: int
    sample_idx: int
    coords: Sequence[int]
    patch_size: Sequence[int]


@dataclass(frozen=True)
class PatchBatch:
    """Many patches at once, as parallel arrays (NumPy, or CuPy on the GPU).

    Attributes
    ----------
    data_idx : array of int64, shape (N,)
        Stack of each patch.
    sample_idx : array of int64, shape (N,)
        Sample (within its stack) of each patch.
    coords : array of int64, shape (N, d)
        Top-left corner (and first z-slice in 3D) of each patch.
    indices : array of int64, shape (N,)
        Global patch index of each row: row ``k`` is what
        ``get_patch_spec(indices[k])`` returns for the same draw number. In
        index order for a plain epoch; in the epoch's order for a shuffled or
        sharded one (a row's patch never depends on where its index lands).
    patch_size : tuple of int
        The patch size.
    """

    data_idx: Any
    sample_idx: Any
    coords: Any
    indices: Any
    patch_size: tuple[int, ...]

    def __len__(self) -> int:
        return int(self.indices.shape[0])

    def __getitem__(self, rows: Any) -> PatchBatch:
        """Return the rows selected by a slice, an index array or a boolean mask."""
        if isinstance(rows, (int, np.integer)):
            raise TypeError(
                "index a PatchBatch with a slice or an index array; use .spec(k) for a single patch"
            )
        if not isinstance(rows, slice):
            dtype = str(getattr(rows, "dtype", ""))
            is_array = len(getattr(rows, "shape", ())) >= 1 and ("int" in dtype or "bool" in dtype)
            is_list = isinstance(rows, (list, tuple)) and all(
                isinstance(row, (int, np.integer)) for row in rows
            )
            if not (is_array or is_list):
                raise TypeError(
                    "PatchBatch rows are selected by a slice, an integer or boolean array or a "
                    f"list of ints, got {rows!r} ({type(rows).__name__})"
                )
        return PatchBatch(
            data_idx=self.data_idx[rows],
            sample_idx=self.sample_idx[rows],
            coords=self.coords[rows],
            indices=self.indices[rows],
            patch_size=self.patch_size,
        )

    def spec(self, row: int) -> PatchSpecs:
        """Return row ``row`` as a ``PatchSpecs`` dictionary of Python ints.

        Parameters
        ----------
        row : int
            Row number, ``-len(self) <= row < len(self)``.

        Returns
        -------
        PatchSpecs
            The patch of that row.

        Raises
        ------
        TypeError
            If ``row`` is not an integer (a bool, a float and a string are not).
        IndexError
            If ``row`` is out of range.
        """
        n_rows = len(self)
        row = as_int(row, "row")
        if not -n_rows <= row < n_rows:
            raise IndexError(
                f"row {row} is out of range for a batch of {n_rows}: expected "
                f"{-n_rows} <= row < {n_rows}"
            )
        return {
            "data_idx": int(self.data_idx[row]),
            "sample_idx": int(self.sample_idx[row]),
            "coords": tuple(int(c) for c in self.coords[row].tolist()),
            "patch_size": self.patch_size,
        }

    def to_numpy(self) -> PatchBatch:
        """Return a copy whose arrays are NumPy arrays (copies from the GPU)."""
        return PatchBatch(
            data_idx=to_host(self.data_idx),
            sample_idx=to_host(self.sample_idx),
            coords=to_host(self.coords),
            indices=to_host(self.indices),
            patch_size=self.patch_size,
        )
