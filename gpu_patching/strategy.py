"""``StratifiedPatching``: the public sampler (CAREamics' API, flat tables)."""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from threading import get_ident
from typing import Any

import numpy as np
from numpy.typing import NDArray

from . import _state
from . import _validation as check
from ._counters import DRAW_MASK, PatchCalls
from ._locking import OwnerLock, locked
from ._state import STATE_FORMAT, STATE_VERSION
from ._validation import SmallSampleWarning
from .arrays import as_array, to_host
from .backends import resolve_backend
from .permutation import EpochOrder
from .specs import PatchBatch, PatchSpecs
from .tables import RegionTables
from .views import GridQueries

__all__ = ["STATE_FORMAT", "STATE_VERSION", "SmallSampleWarning", "StratifiedPatching"]


class StratifiedPatching(GridQueries):
    """Stratified patching strategy allowing patches on a grid to be excluded.

    A drop-in replacement for CAREamics' ``StratifiedPatching`` whose state
    lives in flat arrays (on the GPU with ``backend="cuda"``) and whose draws
    are a pure function of the seed, the patch index and the draw number.

    Patches are sampled from sampling regions that are two times the patch size
    in each dimension and lie on a grid with a spacing of the patch size, so
    every patch position can be selected. Regions at the edge of an image, or
    next to an excluded grid cell, are smaller.

    Each epoch every sample's regions are laid along a line of integer "mass"
    (selectable corners times the quantised region probability) that is cut
    into as many equal strata as the sample has patches; patch index ``j`` of a
    sample draws one point of stratum ``j``. Hence the same index keeps coming
    from the same region (or its neighbours on the line) with high probability,
    every selectable position is chosen with a probability proportional to its
    region's probability, and the mean over pixels of the expected number of
    times a pixel is covered per epoch is 1.

    The number of patches is determined from the number of selectable patch
    coordinates, exactly as in CAREamics.

    Parameters
    ----------
    data_shapes : sequence of (sequence of int)
        Shapes of the underlying data, one per image stack (axes ``SC(Z)YX``).
    patch_size : sequence of int
        Patch size per spatial dimension (length 2 or 3).
    seed : int or None, default None
        Seed for reproducibility, in ``[0, 2**64)``. When None a seed is drawn
        from the operating system's entropy; either way it is available as
        :attr:`seed`, so any run can be replayed.
    backend : {"auto", "cuda", "numpy"}, default "auto"
        Where the tables live and the draws run. ``"auto"`` picks ``"cuda"``
        only when CuPy imports and a CUDA device is usable. All backends
        return the same patches.

    Attributes
    ----------
    seed : int
        The seed in use.
    backend : str
        The backend in use, ``"numpy"`` or ``"cuda"``.

    Notes
    -----
    Randomness is counter-based (Philox4x32-10): the ``k``-th call of
    ``get_patch_spec(i)`` returns row ``i`` of ``sample_epoch(k)``, and
    :meth:`set_epoch` moves the draw number of every index.

    ``sample_epoch(epoch, shuffle=True, rank=r, world_size=w)`` shuffles and
    shards an epoch by the rules of PyTorch's ``DistributedSampler`` (one
    kernel launch on the GPU, and no communication between ranks);
    :mod:`gpu_patching.torch` has the PyTorch sampler, dataset and DDP recipe.
    :meth:`state_dict` and :meth:`load_state_dict` checkpoint and resume the
    sampler exactly, as plain JSON data.

    The call counters and the epoch base live in memory shared with the
    processes that multiprocessing starts with the sampler as an argument
    (PyTorch ``DataLoader`` workers, ``fork`` or ``spawn``), so that their
    calls advance the draws of the whole training; any other copy (pickle,
    ``copy.deepcopy``) is independent (see :mod:`gpu_patching._counters`).
    Threads may share a sampler: concurrent calls give what some serial order
    of them gives. Every public call is all or nothing: when it raises, the
    state is what it was.

    Examples
    --------
    >>> from gpu_patching import StratifiedPatching
    >>> sampler = StratifiedPatching([(1, 1, 256, 256)], (64, 64), seed=42)
    >>> sampler.n_patches
    16
    >>> sampler.exclude_patches(0, 0, [(1, 1)])
    >>> sampler.n_patches
    15
    >>> spec = sampler.get_patch_spec(0)
    >>> sorted(spec)
    ['coords', 'data_idx', 'patch_size', 'sample_idx']
    """

    def __init__(
        self,
        data_shapes: Sequence[Sequence[int]],
        patch_size: Sequence[int],
        seed: int | None = None,
        *,
        backend: str = "auto",
    ) -> None:
        patch = check.validate_patch_size(patch_size)
        shapes = check.validate_data_shapes(data_shapes, patch)
        self._seed = check.validate_seed(seed)
        self._backend = resolve_backend(backend)
        self._patch_size = patch
        self._data_shapes = shapes
        self._tables = self._tables_with()
        # One lock serialises every call that reads or changes the state, so
        # threads sharing the sampler see some serial order of their calls.
        # Until a second thread uses the sampler, its owner (the thread that
        # built it) calls get_patch_spec without the lock (gpu_patching._locking).
        self._guard = OwnerLock()
        # Calls per index since the last set_epoch and the epoch base (shared
        # with the processes a DataLoader starts), and this process's cache of
        # the patches they point to (gpu_patching._counters).
        self._calls = PatchCalls(self._tables.total_patches)
        check.warn_small_samples(shapes, patch)

    # -- read-only state -------------------------------------------------------

    @property
    def n_patches(self) -> int:
        """The number of patches that this patching strategy will return.

        It also determines the maximum index that can be given to
        :meth:`get_patch_spec`.

        Returns
        -------
        int
            Number of patches.
        """
        return self._tables.total_patches

    @property
    def seed(self) -> int:
        """The 64-bit seed in use (drawn from OS entropy when None was given)."""
        return self._seed

    @property
    def backend(self) -> str:
        """The backend in use: ``"numpy"`` or ``"cuda"``."""
        return self._backend.name

    @property
    def patch_size(self) -> tuple[int, ...]:
        """The patch size, one int per spatial axis."""
        return self._patch_size

    @property
    def data_shapes(self) -> tuple[tuple[int, ...], ...]:
        """The ``SC(Z)YX`` shape of every image stack."""
        return self._data_shapes

    @property
    def epoch(self) -> int:
        """The draw number set by the last :meth:`set_epoch` (0 until it is called)."""
        return self._calls.counters.base

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(data_shapes={list(self._data_shapes)}, "
            f"patch_size={self._patch_size}, seed={self._seed}, "
            f"backend={self.backend!r}, n_patches={self.n_patches})"
        )

    # -- the seed API ----------------------------------------------------------

    @locked
    def exclude_patches(
        self, data_idx: int, sample_idx: int, grid_coords: Sequence[tuple[int, ...]] | NDArray[Any]
    ) -> None:
        """Exclude patches from being sampled.

        Excluded patches must lie on a grid which starts at (0, 0) and has a
        spacing of the given ``patch_size``.

        After calling this method the number of patches will be recalculated
        and the excluded patches will never be returned by
        :meth:`get_patch_spec`: no returned patch overlaps an excluded cell.

        Parameters
        ----------
        data_idx : int
            The index of the "image stack" that the patches will be excluded
            from.
        sample_idx : int
            An index that corresponds to the sample in the "image stack" that
            the patches will be excluded from.
        grid_coords : Sequence[tuple[int, ...]] or array
            A sequence of 2D or 3D tuples (or an int array of shape ``(k, d)``).
            Each tuple corresponds to a grid coordinate that will be excluded
            from sampling. The grid starts at (0, 0) and has a spacing of the
            given ``patch_size``. A boolean array of the sample's grid shape
            is also accepted: its True cells are excluded. Excluding a cell
            twice is harmless.

        Raises
        ------
        IndexError
            If ``data_idx`` or ``sample_idx`` is out of range.
        ValueError
            If a coordinate has the wrong length or lies outside the grid, or a
            dense mask has the wrong shape.
        TypeError
            If the coordinates are not integers, or a dense mask is not boolean.
        """
        sample = self._sample(data_idx, sample_idx)
        cells = self._tables.sample_grid(sample)
        xp = self._backend.xp
        # Tensors and other array-likes are read as NumPy or CuPy arrays first.
        dense = as_array(grid_coords, "grid_coords")
        if dense is not None and dense.dtype == np.bool_:
            new_cells = check.dense_grid_array(dense, cells, "grid_coords", xp)
        else:
            coords = grid_coords if dense is None else dense
            new_cells = xp.asarray(check.coords_to_mask(coords, cells, "grid_coords"))
        excluded = self._tables.excluded_grid(sample) | new_cells
        self._update(sample, excluded, self._tables.probability_grid(sample))

    @locked
    def set_region_probs(
        self,
        data_idx: int,
        sample_idx: int,
        probs: Mapping[tuple[int, ...], float] | Any,
    ) -> None:
        """Set the probability that regions will be sampled from at each epoch.

        A region's patches are drawn with a probability proportional to its
        probability (default 1; 0 switches it off, above 1 oversamples), and
        the number of patches shrinks by ``1 - p`` per region as in CAREamics.

        Parameters
        ----------
        data_idx : int
            The index of the "image stack" whose regions get the probabilities.
        sample_idx : int
            An index that corresponds to the sample in the "image stack".
        probs : dict[tuple[int, ...], float] or array
            The probabilities for each region. The keys of the dictionary
            correspond to the grid coordinates of the regions, the values are
            the probabilities; regions not named keep theirs. A float array of
            the sample's grid shape sets every region at once.

        Raises
        ------
        IndexError
            If ``data_idx`` or ``sample_idx`` is out of range.
        ValueError
            If a coordinate lies outside the grid or has the wrong length, an
            array has the wrong shape, or a probability is negative, NaN,
            infinite or above ``gpu_patching.grid.MAX_PROBABILITY``.
        TypeError
            If ``probs`` is neither a mapping nor an array, or holds non-numbers.
        """
        sample = self._sample(data_idx, sample_idx)
        cells = self._tables.sample_grid(sample)
        xp = self._backend.xp
        dense = as_array(probs, "probs")
        if dense is not None:
            values = check.dense_grid_array(dense, cells, "probs", np)
            probability = xp.asarray(check.check_probabilities(values, "probs"))
            # An array sets every region, as a dict of every cell in row-major order.
            set_cells = np.arange(math.prod(cells), dtype=np.int64)
        else:
            current = to_host(self._tables.probability_grid(sample))
            probability = xp.asarray(check.probabilities_to_grid(probs, current, cells, "probs"))
            coords = check.coords_array(list(probs.keys()), cells, "probs")
            set_cells = np.ravel_multi_index(tuple(coords.T), cells).astype(np.int64)
        # The count subtracts the probabilities in the order regions were first set.
        set_order = self._tables.set_order_after(sample, set_cells)
        self._update(sample, self._tables.excluded_grid(sample), probability, set_order)

    def get_patch_spec(self, index: int) -> PatchSpecs:
        """Return the patch specs for a given index.

        The ``k``-th call with the same index (counting from 0, or from the
        last :meth:`set_epoch`) returns row ``index`` of ``sample_epoch(k)``.

        Parameters
        ----------
        index : int
            A patch index, ``0 <= index < n_patches``.

        Returns
        -------
        PatchSpecs
            A dictionary that specifies a single patch in a series of image
            stacks: ``data_idx`` and ``sample_idx`` (int), ``coords`` (tuple of
            int) and ``patch_size`` (tuple of int).

        Raises
        ------
        IndexError
            If ``index`` is negative or not below :attr:`n_patches`.
        TypeError
            If ``index`` is not an integer.
        """
        if type(index) is not int:  # the fast path takes plain ints only
            index = check.as_int(index, "index")
        ident = get_ident()
        guard = self._guard
        if ident == guard.owner:
            # The only thread so far: no lock. Announce the call, then check
            # that no other thread has arrived (see OwnerLock.exclusive).
            guard.busy = True
            try:
                if guard.owner is not None:
                    # The usual call of a dataset's item, inline: a 2D patch
                    # in this process's cache (_patch_spec does the rest).
                    counters, upcoming = self._calls.counters, self._calls.upcoming
                    calls, n_patches = counters.view, counters.n_indices
                    if upcoming is not None and upcoming.compact_2d and 0 <= index < n_patches:
                        count = calls[index]
                        if upcoming.first_view[index] == (calls[n_patches] + count) & DRAW_MASK:
                            data_idx, sample_idx = upcoming.names[upcoming.sample_view[index]]
                            coords = upcoming.coords_view
                            calls[index] = (count + 1) & DRAW_MASK
                            return {
                                "data_idx": data_idx,
                                "sample_idx": sample_idx,
                                "coords": (coords[2 * index], coords[2 * index + 1]),
                                "patch_size": self._patch_size,
                            }
                    return self._patch_spec(index)
            finally:
                guard.busy = False
        with guard.exclusive(ident):
            return self._patch_spec(index)

    def _patch_spec(self, index: int) -> PatchSpecs:
        """:meth:`get_patch_spec` of a checked int, the caller holding the sampler."""
        patch = self._calls.next_patch(index, self._tables, self._seed, self._backend)
        return {
            "data_idx": patch[0],
            "sample_idx": patch[1],
            "coords": patch[2],
            "patch_size": self._patch_size,
        }

    # -- epochs ----------------------------------------------------------------

    @locked
    def sample_epoch(
        self,
        epoch: int,
        *,
        shuffle: bool = False,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = False,
    ) -> PatchBatch:
        """Return every patch of an epoch at once, optionally shuffled and sharded.

        Row ``j`` holds the patch of global index ``indices[j]``, and that
        patch is what the ``epoch``-th call of ``get_patch_spec(indices[j])``
        returns: where an index lands in the order never changes its draw. By
        default the rows are all ``n_patches`` indices in order. On the CUDA
        backend this is one kernel launch, shuffled and sharded or not, and
        the arrays are CuPy arrays.

        Shuffling and sharding follow PyTorch's ``DistributedSampler``: the
        epoch's order is a permutation of ``range(n_patches)`` (a function of
        the seed and ``epoch`` only, so every rank computes the same one
        without communicating); with ``N = n_patches`` each rank gets
        ``ceil(N / world_size)`` rows, the order padded by wrapping round to
        its start, or ``N // world_size`` rows with ``drop_last``; rank ``r``
        takes positions ``r, r + world_size, ...`` of the order.

        Parameters
        ----------
        epoch : int
            The draw number, in ``[0, 2**32)``; it also keys the shuffle.
        shuffle : bool, default False
            Permute the order of the indices (a different permutation every
            epoch).
        rank : int, default 0
            This process's rank, ``0 <= rank < world_size``.
        world_size : int, default 1
            Number of processes sharing the epoch (one per GPU with DDP).
        drop_last : bool, default False
            Drop the tail of the order so that the shards are disjoint and of
            equal size, instead of padding it so that every index is drawn.

        Returns
        -------
        PatchBatch
            This rank's rows of the epoch.

        Raises
        ------
        ValueError
            If ``epoch`` is negative or not below ``2**32``, ``world_size`` is
            below 1 or ``rank`` is outside ``[0, world_size)``.
        TypeError
            If ``epoch``, ``rank`` or ``world_size`` is not an integer, or
            ``shuffle`` or ``drop_last`` is not a bool.

        Examples
        --------
        Each of two DDP ranks draws its own half of a shuffled epoch:

        >>> from gpu_patching import StratifiedPatching
        >>> sampler = StratifiedPatching([(1, 1, 256, 256)], (64, 64), seed=42)
        >>> shard = sampler.sample_epoch(3, shuffle=True, rank=1, world_size=2)
        >>> len(shard)
        8
        """
        draw = check.check_epoch(epoch)
        order = EpochOrder.shard(
            self.n_patches, shuffle=shuffle, rank=rank, world_size=world_size, drop_last=drop_last
        )
        data_idx, sample_idx, coords, indices = self._backend.draw(
            self._tables, order, draw, self._seed
        )
        return PatchBatch(
            data_idx=data_idx,
            sample_idx=sample_idx,
            coords=coords,
            indices=indices,
            patch_size=self._patch_size,
        )

    @locked
    def epoch_indices(
        self,
        epoch: int,
        *,
        shuffle: bool = False,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = False,
    ) -> NDArray[np.int64]:
        """Return the global patch indices of this rank's rows of an epoch.

        The ``indices`` column of :meth:`sample_epoch` with the same
        arguments, computed on the host without drawing any patch: what a
        sampler hands to a dataset that calls :meth:`get_patch_spec`.

        Parameters
        ----------
        epoch : int
            The epoch, in ``[0, 2**32)`` (keys the shuffle).
        shuffle, rank, world_size, drop_last
            As in :meth:`sample_epoch`.

        Returns
        -------
        numpy.ndarray of int64
            ``ceil(n_patches / world_size)`` indices, or
            ``n_patches // world_size`` with ``drop_last``.

        Raises
        ------
        ValueError, TypeError
            As in :meth:`sample_epoch`.
        """
        draw = check.check_epoch(epoch)
        order = EpochOrder.shard(
            self.n_patches, shuffle=shuffle, rank=rank, world_size=world_size, drop_last=drop_last
        )
        return order.indices(self._seed, draw)

    def set_epoch(self, epoch: int) -> None:
        """Make the next call of every index use draw number ``epoch``.

        After ``set_epoch(e)``, the ``k``-th call of ``get_patch_spec(i)``
        returns row ``i`` of ``sample_epoch(e + k)``. Call it at the start of
        every epoch (as with PyTorch's ``DistributedSampler``) to make the
        patches of an epoch independent of how often indices were used before.

        Parameters
        ----------
        epoch : int
            The draw number, in ``[0, 2**32)``.
        """
        base = check.check_epoch(epoch)
        with self._guard.exclusive():
            # In place: processes sharing the counters see the new epoch too.
            self._calls.reset(base)

    # -- checkpoints -----------------------------------------------------------

    @locked
    def state_dict(self) -> dict[str, Any]:
        """Return everything that determines future draws, as plain JSON data.

        Save it with ``json.dump`` (or inside a PyTorch checkpoint) and give it
        to :meth:`load_state_dict` of a sampler built on the same shapes, on
        either backend, to continue exactly where this one is: the same
        :meth:`get_patch_spec` results and the same epochs.

        Returns
        -------
        dict
            ``format`` and ``version``; ``seed``, ``data_shapes``,
            ``patch_size``; ``epoch_base`` (the last :meth:`set_epoch`);
            ``n_patches``; ``excluded`` (one bool per grid cell of every
            sample), ``probability`` (one float64 per cell) and ``calls``
            (the per-index call counters since the last :meth:`set_epoch`),
            each encoded as ``{"dtype", "length", "encoding", "data"}`` with
            the bytes zlib-compressed and base64-encoded (compact: mostly runs
            of one value); and ``checksum``, the SHA-256 of everything else, so
            that a modified or corrupted state is refused. Only dicts, lists,
            strings and ints: no pickle.
        """
        tables = self._tables
        return _state.encode_state(
            seed=self._seed,
            data_shapes=self._data_shapes,
            patch_size=self._patch_size,
            epoch_base=self._calls.counters.base,
            excluded=to_host(tables.excluded, bool),
            probability=to_host(tables.probability, np.float64),
            probability_order=to_host(tables.set_order, np.int64),
            calls=self._calls.counters.counts,
        )

    @locked
    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from a state made by :meth:`state_dict`.

        The seed, exclusions, probabilities, call counters and epoch base are
        replaced by the state's; the backend stays this sampler's. The whole
        state is checked before anything changes: a refused state leaves the
        sampler exactly as it was.

        Parameters
        ----------
        state : Mapping
            What :meth:`state_dict` returned (possibly through JSON).

        Raises
        ------
        TypeError
            If ``state`` is not a mapping.
        ValueError
            If it is not a state of this format and of a version that loads
            (1 or 2), its checksum does not match its contents (it was
            modified or corrupted), it was made for other data shapes or
            another patch size, or its contents are inconsistent.

        Notes
        -----
        A version 1 state does not say in which order the probabilities were
        set; they count as set in row order, so its patch counts can differ
        from the saving sampler's in rare cases (see
        :func:`gpu_patching._state.decode_state`).
        """
        decoded = _state.decode_state(
            state, self._data_shapes, self._patch_size, int(self._tables.region_offset[-1])
        )
        n_patches = decoded.n_patches
        tables = self._tables_with(decoded.excluded, decoded.probability, decoded.probability_order)
        if tables.total_patches != n_patches:
            raise ValueError(
                f"the state is inconsistent: its exclusions and probabilities give "
                f"{tables.total_patches} patches, but it says n_patches = {n_patches}"
            )
        calls = _state.decode_calls(state, n_patches)
        # The counters first (new shared ones when the length changes): their
        # allocation is the last thing that can fail. Then commit.
        self._calls.reset(decoded.epoch_base, calls)
        self._seed = decoded.seed
        self._tables = tables

    def __getstate__(self) -> dict[str, Any]:
        """Pickle as the backend's name, :meth:`state_dict` and the call counters.

        The tables hold their array module (NumPy or CuPy), which does not
        pickle; PyTorch's DataLoader pickles the dataset, and with it the
        sampler, for each worker it starts with ``spawn`` or ``forkserver``.
        Pickled that way (while multiprocessing starts a process), the copy
        shares this sampler's call counters and epoch base, so that the
        workers' calls advance the draws of the whole training; any other
        pickle or ``copy.deepcopy`` is an independent copy.
        """
        with self._guard.exclusive():
            return {
                "backend": self.backend,
                "state": self.state_dict(),
                "counters": self._calls.counters,
            }

    def __setstate__(self, pickled: dict[str, Any]) -> None:
        state = pickled["state"]
        with warnings.catch_warnings():
            # The sampler that was pickled has warned already (DataLoader
            # workers unpickle one copy each).
            warnings.simplefilter("ignore", SmallSampleWarning)
            fresh = StratifiedPatching(
                state["data_shapes"], state["patch_size"], state["seed"], backend=pickled["backend"]
            )
        fresh.load_state_dict(state)
        fresh._calls.share(pickled.get("counters"))
        self.__dict__.update(fresh.__dict__)

    def _tables_with(self, *rows: Any) -> RegionTables:
        """Return new tables on this backend: fresh, or with the given per-cell rows.

        ``rows``: none, or ``excluded``, ``probability`` and ``set_order``.
        """
        shapes = self._data_shapes
        spatial, samples = [shape[2:] for shape in shapes], [shape[0] for shape in shapes]
        tables = RegionTables(spatial, samples, self._patch_size, self._backend.xp)
        if rows:
            tables.replace_all_rows(*rows)
        return tables

    # -- internals -------------------------------------------------------------

    def _update(
        self,
        sample: int,
        excluded: Any,
        probability: Any,
        set_order: tuple[Any, int] | None = None,
    ) -> None:
        """Rebuild one sample's rows; indices keep their call counts."""
        tables = self._tables
        previous = (
            tables.excluded_grid(sample),
            tables.probability_grid(sample),
            tables.set_order_grid(sample),
            tables.next_order,
        )
        tables.update_sample(sample, excluded, probability, *(set_order or ()))
        self._calls.forget_patches()
        # New shared counters if the count changed: processes started before
        # keep the old ones (and the old tables: updates never reach them).
        try:
            self._calls.resize(self.n_patches)
        except BaseException:  # no shared memory left, say: undo the rows too
            tables.update_sample(sample, *previous)
            raise

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """Run several changes of the sampler as one: if the block raises, undo all of them.

        For calls made of several updates (``filter_background``,
        ``validation_split``): the exclusions, probabilities, seed, call
        counters and epoch base come back exactly as they were, so
        :meth:`state_dict` is identical after the exception. Holds the lock
        throughout, so other threads never see the state half changed.

        Yields
        ------
        None
            Inside the block, calls on this sampler change it as usual.

        Examples
        --------
        >>> from gpu_patching import StratifiedPatching
        >>> sampler = StratifiedPatching([(1, 1, 256, 256)], (64, 64), seed=42)
        >>> try:
        ...     with sampler.transaction():
        ...         sampler.exclude_patches(0, 0, [(1, 1)])
        ...         raise RuntimeError("changed my mind")
        ... except RuntimeError:
        ...     pass
        >>> sampler.n_patches
        16
        """
        with self._guard.exclusive():
            tables, version, seed = self._tables, self._tables.version, self._seed
            excluded = np.array(to_host(tables.excluded, bool))
            probability = np.array(to_host(tables.probability, np.float64))
            set_order = np.array(to_host(tables.set_order, np.int64))
            calls = self._calls.snapshot()
            try:
                yield
            except BaseException:
                if self._tables is not tables or tables.version != version:
                    self._tables = self._tables_with(excluded, probability, set_order)
                self._seed = seed
                self._calls.restore(calls)  # the original block, shared as before
                raise
