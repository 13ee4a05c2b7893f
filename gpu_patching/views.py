"""The sampler's read-only queries, and per-sample views in the shape CAREamics reads.

:class:`GridQueries` (mixed into the sampler) answers counts, grid coordinates,
probabilities and exclusions. CAREamics' helpers (``create_val_split``) read
``image_patching[data_idx][sample_idx]``; our flat tables keep no object per
sample, so :class:`ImagePatchingView` and its parts present that interface,
read from the sampler whenever asked (a view taken before an update answers
with the counts after it). They index like lists but cannot be changed.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar, cast, overload

import numpy as np
from numpy.typing import NDArray

from . import _validation as check
from . import grid
from ._locking import OwnerLock, locked
from .arrays import to_host

if TYPE_CHECKING:
    from .strategy import StratifiedPatching
    from .tables import RegionTables

__all__ = ["GridQueries", "ImagePatchingView", "SamplePatchingView", "StackPatchingView"]


def _position(index: Any, length: int, name: str) -> int:
    """Return a list-style index (negative counts from the end) as ``[0, length)``."""
    value = check.as_int(index, name)
    position = value + length if value < 0 else value
    if not 0 <= position < length:
        raise IndexError(f"{name} {value} is out of range for {length} entries")
    return position


_View = TypeVar("_View")


class _ViewSequence(Sequence[_View]):
    """A read-only sequence of views: list-style indices and slices, made on demand."""

    __slots__ = ()
    #: How errors name an index of this sequence.
    _index_name: str

    def _view(self, position: int) -> _View:
        raise NotImplementedError

    @overload
    def __getitem__(self, index: int) -> _View: ...

    @overload
    def __getitem__(self, index: slice) -> tuple[_View, ...]: ...

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, slice):
            return tuple(self._view(k) for k in range(len(self))[index])
        return self._view(_position(index, len(self), self._index_name))

    def __iter__(self) -> Iterator[_View]:
        return (self._view(k) for k in range(len(self)))


@dataclass(frozen=True, eq=False, repr=False)
class SamplePatchingView:
    """One sample of a sampler: its shape, grid and current patch count.

    What ``image_patching[data_idx][sample_idx]`` is in CAREamics, reduced to
    its read-only attributes (frozen: assigning one raises ``AttributeError``).

    Attributes
    ----------
    data_idx, sample_idx : int
        Which sample: its image stack, and its index in that stack.
    """

    _sampler: StratifiedPatching
    data_idx: int
    sample_idx: int

    @property
    def shape(self) -> tuple[int, ...]:
        """The sample's spatial ``(Z)YX`` shape."""
        return self._sampler.data_shapes[self.data_idx][2:]

    @property
    def patch_size(self) -> tuple[int, ...]:
        """The patch size, one int per spatial axis."""
        return self._sampler.patch_size

    @property
    def grid_shape(self) -> tuple[int, ...]:
        """Grid cells per axis, ``(D + 1) // P`` (0 along an axis shorter than ``P - 1``)."""
        return grid.grid_shape(self.shape, self._sampler.patch_size)

    @property
    def n_patches(self) -> int:
        """The sample's current number of patches (0 for a sample smaller than the patch)."""
        sampler = self._sampler
        first = sum(shape[0] for shape in sampler.data_shapes[: self.data_idx])
        return int(sampler.n_patches_per_sample[first + self.sample_idx])

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(data_idx={self.data_idx}, sample_idx={self.sample_idx}, "
            f"shape={self.shape}, grid_shape={self.grid_shape}, n_patches={self.n_patches})"
        )


class StackPatchingView(_ViewSequence[SamplePatchingView]):
    """The samples of one image stack, as a read-only sequence of :class:`SamplePatchingView`.

    Parameters
    ----------
    sampler : StratifiedPatching
        The sampler the view reads.
    data_idx : int
        The image stack (already checked by the caller).
    """

    __slots__ = ("_data_idx", "_sampler")

    def __init__(self, sampler: StratifiedPatching, data_idx: int) -> None:
        self._sampler = sampler
        self._data_idx = data_idx

    _index_name = "sample_idx"

    def __len__(self) -> int:
        return self._sampler.data_shapes[self._data_idx][0]

    def _view(self, position: int) -> SamplePatchingView:
        return SamplePatchingView(self._sampler, self._data_idx, position)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(data_idx={self._data_idx}, samples={len(self)})"


class ImagePatchingView(_ViewSequence[StackPatchingView]):
    """Every image stack of a sampler, as a read-only sequence of :class:`StackPatchingView`.

    Parameters
    ----------
    sampler : StratifiedPatching
        The sampler the view reads.
    """

    __slots__ = ("_sampler",)

    def __init__(self, sampler: StratifiedPatching) -> None:
        self._sampler = sampler

    _index_name = "data_idx"

    def __len__(self) -> int:
        return len(self._sampler.data_shapes)

    def _view(self, position: int) -> StackPatchingView:
        return StackPatchingView(self._sampler, position)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(stacks={len(self)})"


def _read_only(values: NDArray[Any]) -> NDArray[Any]:
    """Return an array the caller cannot write to (it is the caller's own copy)."""
    values.flags.writeable = False
    return values


class GridQueries:
    """The read-only queries of :class:`~gpu_patching.StratifiedPatching`: grid, counts, views.

    A mixin of the sampler: it reads the sampler's tables (``_tables``) under
    its lock (``_guard``), and changes nothing.
    """

    _tables: RegionTables
    _guard: OwnerLock

    @property
    def n_patches_per_sample(self) -> NDArray[np.int64]:
        """The number of patches of every sample, in ``(data_idx, sample_idx)`` order.

        Entry ``s`` counts the patch indices of the ``s``-th sample when the
        samples of all stacks are listed stack by stack; global indices are
        numbered in that order, so the cumulative sum of this array gives the
        first patch index of every sample. It is recomputed by every update
        (:meth:`exclude_patches`, :meth:`set_region_probs`,
        :meth:`load_state_dict`) and reads no epoch.

        Returns
        -------
        numpy.ndarray of int64
            A read-only host view, one entry per sample; its sum is
            :attr:`n_patches`. An update replaces the array, so a view taken
            earlier keeps the counts of its time.
        """
        view = self._tables.n_patches.view()
        view.flags.writeable = False
        return view

    @property
    def image_patching(self) -> ImagePatchingView:
        """Every sample as CAREamics' ``image_patching[data_idx][sample_idx]`` reads it.

        Each entry has ``n_patches``, ``grid_shape``, ``shape`` and
        ``patch_size``, read from the sampler whenever they are asked for, so
        they stay right after every update. This is what CAREamics'
        ``create_val_split`` reads.

        Returns
        -------
        ImagePatchingView
            A read-only sequence (one entry per stack) of read-only sequences
            (one :class:`~gpu_patching.views.SamplePatchingView` per sample).
        """
        # Mixed into StratifiedPatching only: self is the sampler.
        return ImagePatchingView(cast("StratifiedPatching", self))

    @property
    def cumulative_image_patches(self) -> NDArray[np.int64]:
        """Cumulative patch counts of the image stacks (entry ``k``: stacks ``0..k``).

        Returns
        -------
        numpy.ndarray of int64
            A read-only copy, one entry per stack; the last is :attr:`n_patches`.
        """
        tables = self._tables
        return _read_only(tables.patch_offset[tables.first_sample[1:]])

    @property
    def cumulative_sample_patches(self) -> NDArray[np.int64]:
        """Cumulative patch counts of the samples, in ``(data_idx, sample_idx)`` order.

        Returns
        -------
        numpy.ndarray of int64
            A read-only copy, one entry per sample (the cumulative sum of
            :attr:`n_patches_per_sample`).
        """
        return _read_only(self._tables.patch_offset[1:].copy())

    @property
    def cumulative_image_samples(self) -> NDArray[np.int64]:
        """Cumulative sample counts of the image stacks (entry ``k``: stacks ``0..k``).

        Returns
        -------
        numpy.ndarray of int64
            A read-only copy, one entry per stack.
        """
        return _read_only(self._tables.first_sample[1:].copy())

    @locked
    def get_patch_indices(self, data_idx: int) -> Sequence[int]:
        """Return the patch indices for a specific image stack.

        The image stack corresponds to the given ``data_idx``.

        Parameters
        ----------
        data_idx : int
            An index that corresponds to a given image stack.

        Returns
        -------
        sequence of int
            The contiguous range of patch indices (a list of int) whose patches
            come from that image stack.

        Raises
        ------
        IndexError
            If ``data_idx`` is out of range.
        """
        stack = check.check_index(data_idx, "data_idx", self._tables.n_stacks)
        offsets = self._tables.patch_offset
        first = self._tables.first_sample
        return list(range(int(offsets[first[stack]]), int(offsets[first[stack + 1]])))

    def get_all_grid_coords(self) -> dict[tuple[int, int], list[tuple[int, ...]]]:
        """Get all the grid coordinates for sampling regions in the patching strategy.

        Returns
        -------
        dict[tuple[int, int], list[tuple, ...]]
            Dictionary with keys being (data_idx, sample_idx) and values
            corresponding to the grid coords, in row-major order.
        """
        coords: dict[tuple[int, int], list[tuple[int, ...]]] = {}
        tables = self._tables
        for stack in range(tables.n_stacks):
            first, last = (
                int(tables.first_sample[stack]),
                int(tables.first_sample[stack + 1]),
            )
            cells = tables.sample_grid(first)
            stack_coords = list(itertools.product(*(range(g) for g in cells)))
            for sample_idx in range(last - first):
                coords[(stack, sample_idx)] = list(stack_coords)
        return coords

    @locked
    def get_included_grid_coords(self) -> dict[tuple[int, int], list[tuple[int, ...]]]:
        """Get all grid coordinates included in the patching strategy.

        If a grid coordinate is not included, a patch can never be selected
        from the region ``[grid_coord*patch_size, (grid_coord+1)*patch_size]``.

        Returns
        -------
        dict[tuple[int, int], list[tuple, ...]]
            Dictionary with keys being (data_idx, sample_idx) and values
            corresponding to the grid coords that are not excluded, in
            row-major order.
        """
        tables = self._tables
        included: dict[tuple[int, int], list[tuple[int, ...]]] = {}
        for sample in range(tables.n_samples):
            kept = ~to_host(tables.excluded_grid(sample))
            columns = [axis.tolist() for axis in np.nonzero(kept)]
            key = (
                int(tables.stack_of_sample[sample]),
                int(tables.sample_in_stack[sample]),
            )
            included[key] = list(zip(*columns, strict=True))
        return included

    @locked
    def get_region_probs(self, data_idx: int, sample_idx: int) -> NDArray[np.float64]:
        """Return the probability of every region of a sample, shaped like its grid.

        The values given to :meth:`set_region_probs` (1 where none was).

        Parameters
        ----------
        data_idx : int
            The index of the image stack.
        sample_idx : int
            The index of the sample in that stack.

        Returns
        -------
        numpy.ndarray of float64
            A host copy, of the sample's grid shape.

        Raises
        ------
        IndexError
            If ``data_idx`` or ``sample_idx`` is out of range.
        """
        sample = self._sample(data_idx, sample_idx)
        return to_host(self._tables.probability_grid(sample), np.float64)

    @locked
    def get_excluded_cells(self, data_idx: int, sample_idx: int) -> NDArray[np.bool_]:
        """Return which grid cells of a sample are excluded, shaped like its grid.

        The dense form of :meth:`get_included_grid_coords` for one sample, in
        the form :meth:`exclude_patches` accepts.

        Parameters
        ----------
        data_idx, sample_idx : int
            The sample, as for :meth:`get_region_probs` (same checks, same errors).

        Returns
        -------
        numpy.ndarray of bool
            True where a cell is excluded: a host copy, shaped like the grid.
        """
        sample = self._sample(data_idx, sample_idx)
        return to_host(self._tables.excluded_grid(sample), np.bool_)

    def _sample(self, data_idx: Any, sample_idx: Any) -> int:
        tables = self._tables
        stack = check.check_index(data_idx, "data_idx", tables.n_stacks)
        n_samples = int(tables.first_sample[stack + 1] - tables.first_sample[stack])
        sample = check.check_index(sample_idx, "sample_idx", n_samples)
        return tables.sample_id(stack, sample)
