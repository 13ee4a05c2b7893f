"""Read-only, per-sample views of a sampler in the shape CAREamics' helpers read.

CAREamics' own ``StratifiedPatching`` keeps one object per sample in
``image_patching[data_idx][sample_idx]`` and three cumulative count arrays, and
its helpers (``create_val_split``, CAREamics' tests) read those. Our sampler
keeps flat tables instead (a sample is a range of rows), so these classes
present the same reading interface over the tables: nothing here is stored,
every attribute is read from the sampler when it is asked for, so a view taken
before an update (:meth:`~gpu_patching.StratifiedPatching.exclude_patches`,
:meth:`~gpu_patching.StratifiedPatching.set_region_probs`, a state load)
answers with the counts after it.

The sequences index like lists (negative indices and slices included) but
cannot be changed: they have no item assignment and their attributes have no
setters.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any, overload

from . import _validation as check
from . import grid

if TYPE_CHECKING:
    from .strategy import StratifiedPatching

__all__ = ["ImagePatchingView", "SamplePatchingView", "StackPatchingView"]


def _position(index: Any, length: int, name: str) -> int:
    """Return a list-style index (negative counts from the end) as ``[0, length)``."""
    value = check.as_int(index, name)
    position = value + length if value < 0 else value
    if not 0 <= position < length:
        raise IndexError(f"{name} {value} is out of range for {length} entries")
    return position


class SamplePatchingView:
    """One sample of a sampler: its shape, grid and current patch count.

    What ``image_patching[data_idx][sample_idx]`` is in CAREamics, reduced to
    its read-only attributes.

    Parameters
    ----------
    sampler : StratifiedPatching
        The sampler the view reads.
    data_idx, sample_idx : int
        The sample (already checked by the caller).
    """

    __slots__ = ("_data_idx", "_sample_idx", "_sampler")

    def __init__(self, sampler: StratifiedPatching, data_idx: int, sample_idx: int) -> None:
        self._sampler = sampler
        self._data_idx = data_idx
        self._sample_idx = sample_idx

    @property
    def data_idx(self) -> int:
        """The index of the image stack."""
        return self._data_idx

    @property
    def sample_idx(self) -> int:
        """The index of the sample in its stack."""
        return self._sample_idx

    @property
    def shape(self) -> tuple[int, ...]:
        """The sample's spatial ``(Z)YX`` shape."""
        return self._sampler.data_shapes[self._data_idx][2:]

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
        first = sum(shape[0] for shape in sampler.data_shapes[: self._data_idx])
        return int(sampler.n_patches_per_sample[first + self._sample_idx])

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(data_idx={self._data_idx}, sample_idx={self._sample_idx}, "
            f"shape={self.shape}, grid_shape={self.grid_shape}, n_patches={self.n_patches})"
        )


class StackPatchingView(Sequence[SamplePatchingView]):
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

    def __len__(self) -> int:
        return self._sampler.data_shapes[self._data_idx][0]

    @overload
    def __getitem__(self, index: int) -> SamplePatchingView: ...

    @overload
    def __getitem__(self, index: slice) -> tuple[SamplePatchingView, ...]: ...

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, slice):
            return tuple(self[k] for k in range(len(self))[index])
        sample_idx = _position(index, len(self), "sample_idx")
        return SamplePatchingView(self._sampler, self._data_idx, sample_idx)

    def __iter__(self) -> Iterator[SamplePatchingView]:
        return (SamplePatchingView(self._sampler, self._data_idx, k) for k in range(len(self)))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(data_idx={self._data_idx}, samples={len(self)})"


class ImagePatchingView(Sequence[StackPatchingView]):
    """Every image stack of a sampler, as a read-only sequence of :class:`StackPatchingView`.

    Parameters
    ----------
    sampler : StratifiedPatching
        The sampler the view reads.
    """

    __slots__ = ("_sampler",)

    def __init__(self, sampler: StratifiedPatching) -> None:
        self._sampler = sampler

    def __len__(self) -> int:
        return len(self._sampler.data_shapes)

    @overload
    def __getitem__(self, index: int) -> StackPatchingView: ...

    @overload
    def __getitem__(self, index: slice) -> tuple[StackPatchingView, ...]: ...

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, slice):
            return tuple(self[k] for k in range(len(self))[index])
        return StackPatchingView(self._sampler, _position(index, len(self), "data_idx"))

    def __iter__(self) -> Iterator[StackPatchingView]:
        return (StackPatchingView(self._sampler, k) for k in range(len(self)))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(stacks={len(self)})"
