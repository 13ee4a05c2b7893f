"""PyTorch glue: a DDP-aware sampler, a map-style dataset, and batches as tensors.

Optional: it needs PyTorch (``pip install gpu-patching[torch]``), and the rest
of the package never imports it. :class:`PatchSampler` is a
``torch.utils.data.Sampler`` with ``DistributedSampler``'s rules whose
:meth:`~PatchSampler.set_epoch` also moves the strategy (and so every
DataLoader worker) to that epoch; :class:`PatchDataset` is CAREamics'
map-style path (item ``i`` crops ``get_patch_spec(i)``); :func:`to_tensors`
turns a :class:`~gpu_patching.PatchBatch` into tensors, zero-copy. Workers,
epochs and the DDP recipe: README.md, "Shuffled and sharded epochs, ...".
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import Dataset, IterableDataset, Sampler, get_worker_info

from . import _validation as check
from .loader import PatchLoader
from .permutation import EpochOrder
from .specs import PatchBatch
from .strategy import StratifiedPatching

__all__ = ["PatchDataset", "PatchIterableDataset", "PatchSampler", "PatchTensors", "to_tensors"]


def _check_strategy(strategy: Any) -> StratifiedPatching:
    if not isinstance(strategy, StratifiedPatching):
        raise TypeError(f"strategy must be a StratifiedPatching, got {type(strategy).__name__}")
    return strategy


class PatchSampler(Sampler[int]):
    """Yield this rank's patch indices of the current epoch (``DistributedSampler`` rules).

    With ``N = strategy.n_patches``, each of ``num_replicas`` ranks gets
    ``ceil(N / num_replicas)`` indices (the epoch's order padded by wrapping
    round to its start) or ``N // num_replicas`` with ``drop_last``; rank
    ``r`` takes positions ``r, r + num_replicas, ...`` of the order. The
    order is ``range(N)``, or with ``shuffle`` a permutation that depends only
    on the strategy's seed and the epoch, so every rank computes the same one.

    Parameters
    ----------
    strategy : StratifiedPatching
        The sampling strategy; the dataset that gets these indices calls its
        ``get_patch_spec``.
    num_replicas : int, optional
        Number of ranks; ``torch.distributed``'s world size when it is
        initialised, else 1.
    rank : int, optional
        This rank; ``torch.distributed``'s rank when it is initialised, else 0.
    shuffle : bool, default True
        Shuffle the order every epoch.
    drop_last : bool, default False
        Drop the tail of the order instead of padding it (disjoint shards).

    Raises
    ------
    ValueError
        If ``num_replicas`` is outside ``[1, 2**32]`` or ``rank`` outside
        ``[0, num_replicas)``.
    TypeError
        If ``strategy`` is not a :class:`~gpu_patching.StratifiedPatching`,
        ``num_replicas`` or ``rank`` is not an integer, or ``shuffle`` or
        ``drop_last`` is not a bool.

    Notes
    -----
    :meth:`set_epoch` forwards the epoch to ``strategy.set_epoch``, and so
    does the start of every pass: each pass of epoch ``e`` hands out the
    patches of ``strategy.sample_epoch(e)`` (row ``i`` for index ``i``), in
    the main process or in DataLoader workers alike. See the module
    docstring for the DDP recipe.
    """

    def __init__(
        self,
        strategy: StratifiedPatching,
        *,
        num_replicas: int | None = None,
        rank: int | None = None,
        shuffle: bool = True,
        drop_last: bool = False,
    ) -> None:
        strategy = _check_strategy(strategy)
        distributed = dist.is_available() and dist.is_initialized()
        if num_replicas is None:
            num_replicas = dist.get_world_size() if distributed else 1
        if rank is None:
            rank = dist.get_rank() if distributed else 0
        # Everything is checked before anything is set.
        self.rank, self.num_replicas = check.check_rank_world_size(
            rank, num_replicas, world_size_name="num_replicas"
        )
        self.shuffle = check.check_flag(shuffle, "shuffle")
        self.drop_last = check.check_flag(drop_last, "drop_last")
        self.strategy = strategy
        self.epoch = 0

    def _options(self) -> dict[str, Any]:
        return {
            "shuffle": self.shuffle,
            "rank": self.rank,
            "world_size": self.num_replicas,
            "drop_last": self.drop_last,
        }

    def __iter__(self) -> Iterator[int]:
        # Reset the call counters in this process too, so that a pass in the
        # main process (num_workers=0) draws the same patches as workers do.
        self.strategy.set_epoch(self.epoch)
        indices = self.strategy.epoch_indices(self.epoch, **self._options())
        return iter(indices.tolist())

    def __len__(self) -> int:
        return EpochOrder.shard(
            self.strategy.n_patches,
            shuffle=self.shuffle,
            rank=self.rank,
            world_size=self.num_replicas,
            drop_last=self.drop_last,
        ).n_rows

    def set_epoch(self, epoch: int) -> None:
        """Set the epoch of the order, and move the strategy to it.

        Call it at the start of every epoch, before iterating a DataLoader
        over this sampler (as with ``DistributedSampler``): its workers copy
        the strategy when they start.

        Parameters
        ----------
        epoch : int
            The epoch, in ``[0, 2**32)``.
        """
        epoch = check.check_epoch(epoch)
        self.strategy.set_epoch(epoch)
        self.epoch = epoch


def _owned_copy(window: Any) -> np.ndarray:
    """Return a patch as a C-contiguous, writable array in native byte order, owning its memory.

    A slice of a NumPy stack is a view of the user's array whenever the patch
    spans whole rows (or the whole image): an in-place transform of the tensor
    would then write into the user's stack, or crash on a read-only memory map.
    ``torch.from_numpy`` also needs the native byte order. Arrays that the
    slice created (e.g. read from a zarr store) already own their memory and
    are returned without a second copy.
    """
    patch = np.asarray(window)
    dtype = patch.dtype.newbyteorder("=")
    owned = patch.flags.owndata and patch.flags.writeable and patch.flags.c_contiguous
    if owned and patch.dtype == dtype and not isinstance(patch, np.memmap):
        return patch
    return np.array(patch, dtype=dtype, order="C", copy=True)


class _FollowsStrategy:
    """A dataset whose epoch is its strategy's: both datasets' :meth:`set_epoch`."""

    strategy: StratifiedPatching

    def set_epoch(self, epoch: int) -> None:
        """Move the strategy, and so every process's next pass, to ``epoch``.

        For samplers that do not move it themselves (:class:`PatchSampler`
        does).

        Parameters
        ----------
        epoch : int
            The epoch, in ``[0, 2**32)``.
        """
        self.strategy.set_epoch(epoch)


class PatchDataset(_FollowsStrategy, Dataset[torch.Tensor]):
    """Map-style dataset: item ``i`` is the patch ``strategy.get_patch_spec(i)`` names.

    The CAREamics way to use a patching strategy: a sampler (e.g.
    :class:`PatchSampler`) hands out patch indices, and the dataset asks the
    strategy where each patch lies and cuts it out.

    Parameters
    ----------
    strategy : StratifiedPatching
        The sampling strategy.
    stacks : sequence of array_like
        One ``SC(Z)YX`` array per image stack, of the shapes the strategy was
        built for (NumPy arrays, memory maps, or anything that slices like
        them).
    transform : callable, optional
        Applied to each patch tensor (e.g. a normalisation or augmentation).
        It may work in place: every item is a tensor of its own (a copy, in
        native byte order), never a view of a stack, so a transform cannot
        change the stacks, and read-only stacks (``numpy.memmap`` opened with
        mode ``"r"``, arrays with ``writeable=False``) give writable items.

    Raises
    ------
    TypeError
        If ``strategy`` is not a :class:`~gpu_patching.StratifiedPatching`,
        ``stacks`` is not a sequence of arrays or ``transform`` is not
        callable.
    ValueError
        If the stacks' shapes are not the strategy's ``data_shapes``.
    """

    def __init__(
        self,
        strategy: StratifiedPatching,
        stacks: Sequence[Any],
        *,
        transform: Callable[[torch.Tensor], Any] | None = None,
    ) -> None:
        strategy = _check_strategy(strategy)
        if isinstance(stacks, (str, bytes)) or not isinstance(stacks, Sequence):
            raise TypeError(f"stacks must be a sequence of arrays, got {type(stacks).__name__}")
        for k, stack in enumerate(stacks):
            if not hasattr(stack, "shape"):
                raise TypeError(
                    f"stacks[{k}] must be an array (NumPy, memory map, or anything that "
                    f"slices like one), got {stack!r} ({type(stack).__name__})"
                )
        if transform is not None and not callable(transform):
            raise TypeError(f"transform must be callable or None, got {transform!r}")
        shapes = tuple(tuple(int(s) for s in stack.shape) for stack in stacks)
        if shapes != strategy.data_shapes:
            raise ValueError(
                f"the stacks have shapes {list(shapes)}, but the strategy was built for "
                f"{list(strategy.data_shapes)}"
            )
        self.strategy = strategy
        self.stacks = list(stacks)
        self.transform = transform

    def __len__(self) -> int:
        return self.strategy.n_patches

    def __getitem__(self, index: int) -> Any:
        """Return the patch of index ``index``: a ``C(Z)YX`` tensor (or its transform)."""
        spec = self.strategy.get_patch_spec(index)
        window = tuple(
            slice(start, start + size)
            for start, size in zip(spec["coords"], spec["patch_size"], strict=True)
        )
        where = (spec["sample_idx"], slice(None), *window)
        patch = _owned_copy(self.stacks[spec["data_idx"]][where])
        tensor = torch.from_numpy(patch)
        return tensor if self.transform is None else self.transform(tensor)


class PatchIterableDataset(_FollowsStrategy, IterableDataset[tuple[torch.Tensor, PatchBatch]]):
    """Iterable dataset of whole batches, shared out between ranks and DataLoader workers.

    Each process that iterates it (the main process, or each DataLoader
    worker) builds its own :class:`~gpu_patching.PatchLoader`, so workers
    read chunked stores through chunk caches of their own, and yields that
    loader's ``(patches, batch)`` pairs: ``patches`` a ``(B, C, *patch_size)``
    tensor, ``batch`` the :class:`~gpu_patching.PatchBatch` of its rows. Use
    it with ``DataLoader(dataset, batch_size=None, num_workers=...)``.

    Worker ``w`` of ``W`` on rank ``r`` takes the ``w``-th part of rank
    ``r``'s rows (``PatchLoader(..., worker_id=w, num_workers=W)``): with
    ``order="chunks"`` runs of whole tiles, so a chunk is decoded by one
    worker of one rank; else equal runs of the shuffled order. Together the
    workers yield the rank's rows once, in an order that depends on how
    their batches interleave but with the same batches for the same seed,
    epoch and ``num_workers``.

    Parameters
    ----------
    stacks : sequence of arrays
        As for :class:`~gpu_patching.PatchLoader`: chunked stores (from
        :func:`gpu_patching.stores.open_stack`) or host arrays. They are
        pickled into spawned workers (stores reopen themselves there).
    strategy : StratifiedPatching
        The sampler.
    batch_size : int
        Patches per batch.
    rank, world_size : int, optional
        This rank and the number of ranks; ``torch.distributed``'s when it is
        initialised, else 0 and 1.
    **loader_options
        Further :class:`~gpu_patching.PatchLoader` keywords (``shuffle``,
        ``drop_last``, ``order``, ``chunk_window``, ``chunk_tile``,
        ``cache_bytes``, ``workers``, ``threads``). ``cache_bytes`` is each
        worker's budget. With ``threads`` left out (automatic), the host
        crop in a DataLoader worker copies on that worker's thread alone
        (the workers already use the cores); a number is taken as given.

    Raises
    ------
    TypeError, ValueError
        As :class:`~gpu_patching.PatchLoader` raises them, when the dataset
        is built (a loader for this rank is built and dropped to check them).

    Notes
    -----
    :meth:`set_epoch` moves the strategy, whose epoch every process of the
    training shares (see "Epochs and DataLoader workers" above), so
    persistent workers follow it too. Call it at the start of every epoch.
    """

    def __init__(
        self,
        stacks: Sequence[Any],
        strategy: StratifiedPatching,
        batch_size: int,
        *,
        rank: int | None = None,
        world_size: int | None = None,
        **loader_options: Any,
    ) -> None:
        strategy = _check_strategy(strategy)
        for name in ("as_torch", "worker_id", "num_workers", "device_output", "stream"):
            if name in loader_options:
                raise TypeError(f"PatchIterableDataset sets {name} itself; do not pass it")
        distributed = dist.is_available() and dist.is_initialized()
        if world_size is None:
            world_size = dist.get_world_size() if distributed else 1
        if rank is None:
            rank = dist.get_rank() if distributed else 0
        rank, world_size = check.check_rank_world_size(rank, world_size)
        # Every option is checked now, by the loader itself, not in a worker.
        PatchLoader(
            stacks,
            strategy,
            batch_size,
            rank=rank,
            world_size=world_size,
            as_torch=True,
            **loader_options,
        )
        self.stacks = list(stacks)
        self.strategy = strategy
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.loader_options = dict(loader_options)

    def loader(self, worker_id: int = 0, num_workers: int = 1) -> PatchLoader:
        """Return the loader of one worker of this rank, at the strategy's epoch.

        Parameters
        ----------
        worker_id, num_workers : int, default 0 and 1
            The worker and the number of workers.

        Returns
        -------
        PatchLoader
            A new loader (with a chunk cache of its own).
        """
        loader = PatchLoader(
            self.stacks,
            self.strategy,
            self.batch_size,
            rank=self.rank,
            world_size=self.world_size,
            as_torch=True,
            worker_id=worker_id,
            num_workers=num_workers,
            **self.loader_options,
        )
        loader.set_epoch(self.strategy.epoch)
        return loader

    def __iter__(self) -> Iterator[tuple[torch.Tensor, PatchBatch]]:
        info = get_worker_info()
        if info is None:
            return iter(self.loader())
        # A batch's tensor is a view of the reader's window of batches (or of
        # a buffer the loader reuses); sent to the main process as it is, the
        # whole window would travel. A copy of the batch travels instead.
        batches = self.loader(info.id, info.num_workers)
        return ((patches.clone(), batch) for patches, batch in batches)


class PatchTensors(NamedTuple):
    """The columns of a :class:`~gpu_patching.PatchBatch` as tensors (int64)."""

    data_idx: torch.Tensor
    sample_idx: torch.Tensor
    coords: torch.Tensor
    indices: torch.Tensor


def _tensor(values: Any) -> torch.Tensor:
    if isinstance(values, np.ndarray):
        return torch.from_numpy(values)
    # CuPy (and any other DLPack producer): the tensor shares the memory.
    return torch.from_dlpack(values)


def to_tensors(batch: PatchBatch) -> PatchTensors:
    """Return the columns of a batch as tensors that share its memory.

    Parameters
    ----------
    batch : PatchBatch
        From ``sample_epoch``: CuPy arrays on the CUDA backend, NumPy arrays
        on the NumPy backend.

    Returns
    -------
    PatchTensors
        ``data_idx``, ``sample_idx``, ``coords`` (``(N, d)``) and ``indices``
        as int64 tensors on the batch's device, without a copy: through DLPack
        for CuPy arrays, ``torch.from_numpy`` for NumPy arrays.

    Raises
    ------
    TypeError
        If ``batch`` is not a :class:`~gpu_patching.PatchBatch`.
    """
    if not isinstance(batch, PatchBatch):
        raise TypeError(
            f"batch must be a PatchBatch (from sample_epoch), got {type(batch).__name__}"
        )
    return PatchTensors(
        data_idx=_tensor(batch.data_idx),
        sample_idx=_tensor(batch.sample_idx),
        coords=_tensor(batch.coords),
        indices=_tensor(batch.indices),
    )
