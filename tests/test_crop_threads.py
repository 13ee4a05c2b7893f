"""The host crop's rows split over threads: the same patches, one thread in DataLoader workers.

``copy_patches`` copies contiguous runs of rows on a small shared pool
(``gpu_patching/_row_threads.py``); ``extract_patches`` and ``PatchLoader``
take ``threads``. Every result is compared with plain slicing.
"""

from __future__ import annotations

import multiprocessing
import threading
from typing import Any

import numpy as np
import pytest

from gpu_patching import PatchBatch, PatchLoader, StratifiedPatching, extract_patches
from gpu_patching._row_threads import (
    MAX_THREADS,
    MIN_BATCH_BYTES,
    MIN_ROW_BYTES,
    copy_threads,
    in_dataloader_worker,
    run_split,
    usable_cores,
)
from gpu_patching.crop import copy_patches

DTYPES = ["uint8", "<u2", ">u2", "<i4", ">f4", "<f8", ">c16", "bool"]


def _stack(shape: tuple[int, ...], dtype: str, seed: int) -> np.ndarray:
    values = np.random.default_rng(seed).integers(0, 1 << 30, size=shape)
    return values.astype(dtype)


def _batch(
    shapes: list[tuple[int, ...]], patch: tuple[int, ...], n_rows: int, seed: int
) -> PatchBatch:
    rng = np.random.default_rng(seed)
    data_idx = rng.integers(0, len(shapes), n_rows)
    sample_idx = np.array([rng.integers(0, shapes[d][0]) for d in data_idx], dtype=np.int64)
    coords = np.array(
        [
            [rng.integers(0, n - p + 1) for n, p in zip(shapes[d][2:], patch, strict=True)]
            for d in data_idx
        ],
        dtype=np.int64,
    ).reshape(n_rows, len(patch))
    return PatchBatch(data_idx, sample_idx, coords, np.arange(n_rows), patch)


def _sliced(stacks: list[np.ndarray], batch: PatchBatch) -> np.ndarray:
    rows = []
    for d, s, corner in zip(batch.data_idx, batch.sample_idx, batch.coords, strict=True):
        where = tuple(slice(c, c + p) for c, p in zip(corner, batch.patch_size, strict=True))
        rows.append(stacks[d][(s, slice(None), *where)])
    return np.stack(rows).astype(np.dtype(stacks[0].dtype).newbyteorder("="))


CASES = {
    "2d": ([(3, 2, 40, 50), (2, 2, 33, 47)], (8, 16)),
    "3d": ([(2, 1, 12, 30, 31), (3, 1, 10, 20, 24)], (4, 8, 16)),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("n_rows", [1, 2, 7, 61])
@pytest.mark.parametrize("threads", [None, 1, 2, 3, 4])
def test_every_thread_count_copies_the_patches_of_plain_slicing(
    dtype: str, case: str, n_rows: int, threads: int | None
) -> None:
    shapes, patch = CASES[case]
    stacks = [_stack(shape, dtype, seed=k) for k, shape in enumerate(shapes)]
    batch = _batch(shapes, patch, n_rows, seed=n_rows)
    patches = extract_patches(stacks, batch, threads=threads)
    expected = _sliced(stacks, batch)
    assert patches.dtype == expected.dtype and patches.dtype.isnative
    assert np.array_equal(patches, expected)


@pytest.mark.parametrize("threads", [None, 1, 3])
def test_a_batch_over_the_automatic_thresholds_is_the_same_for_every_count(
    threads: int | None,
) -> None:
    # Rows of 2 x 8 x 32 x 32 float32 (64 KiB, after the byte swap) in a
    # batch of 8 MiB or more: None splits it wherever there are cores.
    patch = (8, 32, 32)
    row_bytes = 2 * 8 * 32 * 32 * 4
    n_rows = MIN_BATCH_BYTES // row_bytes + 5
    assert copy_threads(None, n_rows, row_bytes) == min(usable_cores(), MAX_THREADS)
    shapes = [(4, 2, 20, 64, 64)]
    stacks = [_stack(shapes[0], ">f4", seed=3)]
    batch = _batch(shapes, patch, n_rows, seed=4)
    out = np.full((n_rows, 2, *patch), np.nan, dtype=np.float32)
    assert extract_patches(stacks, batch, out=out, threads=threads) is out
    assert np.array_equal(out, _sliced(stacks, batch))


def test_automatic_threads_split_only_batches_of_large_rows() -> None:
    cores = min(usable_cores(), MAX_THREADS)
    big_rows = MIN_BATCH_BYTES // MIN_ROW_BYTES
    assert copy_threads(None, big_rows, MIN_ROW_BYTES) == min(cores, big_rows)
    assert copy_threads(None, big_rows - 1, MIN_ROW_BYTES) == 1  # batch under the bytes
    assert copy_threads(None, 10_000, MIN_ROW_BYTES - 1) == 1  # rows under the bytes


def test_a_given_thread_count_is_taken_up_to_one_per_row() -> None:
    assert copy_threads(1, 10_000, 1 << 20) == 1
    assert copy_threads(3, 10_000, 16) == 3
    assert copy_threads(6, 2, 16) == 2
    assert copy_threads(5, 0, 16) == 1


def test_the_main_process_is_no_dataloader_worker() -> None:
    assert not in_dataloader_worker()


def test_runs_are_contiguous_disjoint_and_on_named_daemon_threads() -> None:
    seen: list[tuple[int, int, str, bool]] = []
    lock = threading.Lock()

    def record(start: int, stop: int) -> None:
        thread = threading.current_thread()
        with lock:
            seen.append((start, stop, thread.name, thread.daemon))

    run_split(record, 10, 3)
    assert sorted((a, b) for a, b, _, _ in seen) == [(0, 3), (3, 6), (6, 10)]
    helpers = [(name, daemon) for a, _, name, daemon in seen if a > 0]
    assert all(name.startswith("gpu_patching_copy_") and daemon for name, daemon in helpers)
    own = [name for a, _, name, _ in seen if a == 0]
    assert own == [threading.current_thread().name]


def test_one_thread_runs_every_row_on_the_calling_thread() -> None:
    seen: list[tuple[int, int, str]] = []
    run_split(lambda a, b: seen.append((a, b, threading.current_thread().name)), 10, 1)
    assert seen == [(0, 10, threading.current_thread().name)]


def test_an_error_in_a_pool_thread_is_raised_to_the_caller() -> None:
    shapes, patch = CASES["2d"]
    stacks = [_stack(shape, "f4", seed=k) for k, shape in enumerate(shapes)]
    batch = _batch(shapes, patch, 10, seed=1)
    rows = (batch.data_idx, batch.sample_idx, batch.coords)
    # copy_patches trusts its inputs: a target of 5 rows for 10 makes the
    # second run (a pool thread's) index past its end.
    target = np.zeros((5, 2, *patch), dtype=np.float32)
    with pytest.raises(IndexError):
        copy_patches(stacks, rows, patch, target, threads=2)
    assert np.array_equal(target, _sliced(stacks, batch)[:5])  # the first run finished


def test_the_first_error_in_row_order_is_raised_after_every_run_ended() -> None:
    ended: list[int] = []
    lock = threading.Lock()

    def fail_in_two_runs(start: int, stop: int) -> None:
        with lock:
            ended.append(start)
        if start > 0:
            raise RuntimeError(f"run from {start}")

    with pytest.raises(RuntimeError, match="run from 4"):
        run_split(fail_in_two_runs, 12, 3)
    assert sorted(ended) == [0, 4, 8]


@pytest.mark.parametrize("bad", ["2", 1.5, True, [2], np.array([1, 2])])
def test_threads_of_another_type_are_refused_before_anything_is_written(bad: Any) -> None:
    shapes, patch = CASES["2d"]
    stacks = [_stack(shape, "f4", seed=k) for k, shape in enumerate(shapes)]
    out = np.zeros((3, 2, *patch), dtype=np.float32)
    with pytest.raises(TypeError, match="threads"):
        extract_patches(stacks, _batch(shapes, patch, 3, seed=0), out=out, threads=bad)
    assert not out.any()


@pytest.mark.parametrize("bad", [0, -1])
def test_threads_below_one_are_refused_before_anything_is_written(bad: int) -> None:
    shapes, patch = CASES["2d"]
    stacks = [_stack(shape, "f4", seed=k) for k, shape in enumerate(shapes)]
    out = np.zeros((3, 2, *patch), dtype=np.float32)
    with pytest.raises(ValueError, match=f"threads must be at least 1.*got {bad}"):
        extract_patches(stacks, _batch(shapes, patch, 3, seed=0), out=out, threads=bad)
    assert not out.any()


def _loader(stacks: list[np.ndarray], **options: Any) -> PatchLoader:
    patching = StratifiedPatching([s.shape for s in stacks], (8, 16), seed=5)
    return PatchLoader(stacks, patching, batch_size=13, **options)


@pytest.mark.parametrize(("bad", "error"), [("4", TypeError), (0, ValueError), (2.0, TypeError)])
def test_the_loader_refuses_bad_threads_when_built(bad: Any, error: type[Exception]) -> None:
    stacks = [_stack((3, 2, 40, 50), "f4", seed=0)]
    with pytest.raises(error, match="threads"):
        _loader(stacks, threads=bad)


@pytest.mark.parametrize("threads", [None, 1, 3])
def test_the_loader_yields_the_patches_of_plain_slicing_for_every_thread_count(
    threads: int | None,
) -> None:
    stacks = [_stack((3, 2, 40, 50), ">u2", seed=0), _stack((2, 2, 33, 47), ">u2", seed=1)]
    loader = _loader(stacks, threads=threads)
    n_batches = 0
    for patches, batch in loader:
        assert np.array_equal(patches, _sliced(stacks, batch))
        n_batches += 1
    assert n_batches == len(loader) > 1


def _fork_child_copy(queue: Any) -> None:
    shapes, patch = CASES["3d"]
    stacks = [_stack(shape, "f4", seed=k) for k, shape in enumerate(shapes)]
    batch = _batch(shapes, patch, 9, seed=2)
    patches = extract_patches(stacks, batch, threads=3)
    queue.put(bool(np.array_equal(patches, _sliced(stacks, batch))))


def test_a_forked_child_copies_on_threads_of_its_own() -> None:
    run_split(lambda a, b: None, 4, 3)  # the parent's pool exists before the fork
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_fork_child_copy, args=(queue,))
    child.start()
    # The parent's pool threads are not in the child: without a pool of its
    # own the child would wait for ever, so a timeout marks that failure.
    result = queue.get(timeout=60)
    child.join()
    assert result is True and child.exitcode == 0


# -- DataLoader workers ------------------------------------------------------------------


class _WorkerThreads:
    """A map-style dataset: what a worker decides for a batch the main process would split."""

    def __len__(self) -> int:
        return 4

    def __getitem__(self, index: int) -> tuple[bool, int]:
        n_rows = MIN_BATCH_BYTES // MIN_ROW_BYTES
        return in_dataloader_worker(), copy_threads(None, n_rows, MIN_ROW_BYTES)


def test_a_dataloader_worker_copies_on_its_own_thread_alone() -> None:
    torch_data = pytest.importorskip("torch.utils.data")
    loader = torch_data.DataLoader(
        _WorkerThreads(), batch_size=None, num_workers=2, multiprocessing_context="fork"
    )
    assert [(bool(w), int(n)) for w, n in loader] == [(True, 1)] * 4


def test_dataloader_workers_yield_the_patches_of_plain_slicing() -> None:
    torch_data = pytest.importorskip("torch.utils.data")
    from gpu_patching.torch import PatchIterableDataset

    # 64 KiB rows in batches of 8 MiB: over the automatic thresholds.
    stacks = [_stack((4, 1, 64, 128, 128), "<f4", seed=6)]
    patching = StratifiedPatching([stacks[0].shape], (16, 32, 32), seed=7)
    dataset = PatchIterableDataset(stacks, patching, batch_size=128)
    loader = torch_data.DataLoader(
        dataset, batch_size=None, num_workers=2, multiprocessing_context="fork"
    )
    rows = 0
    for patches, batch in loader:
        assert np.array_equal(patches.numpy(), _sliced(stacks, batch))
        rows += len(batch)
    assert rows == patching.n_patches


class _RefusedAfter(threading.Thread):
    """A thread class whose start is refused once ``allowed`` threads have started.

    Stands in for the operating system's limit on threads ("can't start new
    thread"), which cannot be reached on purpose here.
    """

    allowed = 0
    started = 0

    def start(self) -> None:
        if type(self).started >= type(self).allowed:
            raise RuntimeError("can't start new thread")
        type(self).started += 1
        super().start()


@pytest.mark.parametrize("allowed", [0, 1])
def test_a_split_whose_threads_are_refused_copies_every_row_once_with_the_threads_it_got(
    monkeypatch: pytest.MonkeyPatch, allowed: int
) -> None:
    from gpu_patching import _row_threads
    from gpu_patching._per_process import PerProcess

    monkeypatch.setattr(_RefusedAfter, "allowed", allowed)
    monkeypatch.setattr(_RefusedAfter, "started", 0)
    monkeypatch.setattr(_row_threads.threading, "Thread", _RefusedAfter)
    monkeypatch.setattr(_row_threads, "_SHARED", PerProcess(_row_threads._Pool))
    copied = np.zeros(100, dtype=np.int64)
    lock = threading.Lock()

    def copy_run(start: int, stop: int) -> None:
        with lock:
            copied[start:stop] += 1

    _row_threads.run_split(copy_run, 100, 4)
    assert copied.tolist() == [1] * 100
    assert _RefusedAfter.started == allowed
