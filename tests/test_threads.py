"""Threads sharing one sampler get what some serial order of their calls gives.

Each thread's calls of ``get_patch_spec`` are checked against epoch rows: over
all threads, the calls of index ``i`` must have returned the rows ``i`` of
epochs ``0 .. k - 1`` once each (no draw lost, none repeated), however the
calls interleaved. The interpreter switches threads every microsecond here,
so the interleavings are many.
"""

from __future__ import annotations

import sys
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest

from gpu_patching import StratifiedPatching
from gpu_patching._state import decode_calls

N_THREADS = 4
ROUNDS = 8


@pytest.fixture(autouse=True)
def frequent_switches() -> Iterator[None]:
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        yield
    finally:
        sys.setswitchinterval(interval)


def _run(workers: list[Callable[[], Any]]) -> list[Any]:
    results: list[Any] = [None] * len(workers)
    barrier = threading.Barrier(len(workers))

    def run(slot: int) -> None:
        barrier.wait()
        results[slot] = workers[slot]()

    threads = [threading.Thread(target=run, args=(slot,)) for slot in range(len(workers))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


def _rows(batch: Any) -> list[tuple[int, int, tuple[int, ...]]]:
    return [
        (int(d), int(s), tuple(c))
        for d, s, c in zip(batch.data_idx, batch.sample_idx, batch.coords.tolist(), strict=True)
    ]


def _assert_each_draw_once(
    sampler: StratifiedPatching, per_thread: list[list[tuple[int, Any]]], calls_per_index: int
) -> None:
    got: dict[int, Counter[Any]] = {}
    for calls in per_thread:
        for index, spec in calls:
            key = (spec["data_idx"], spec["sample_idx"], spec["coords"])
            got.setdefault(index, Counter())[key] += 1
    epochs = [_rows(sampler.sample_epoch(k).to_numpy()) for k in range(calls_per_index)]
    for index, patches in got.items():
        assert patches == Counter(epoch[index] for epoch in epochs), index


def test_threads_calling_the_same_indices_lose_no_draw() -> None:
    sampler = StratifiedPatching([(1, 1, 512, 512)], (16, 16), seed=21, backend="numpy")
    n_patches = sampler.n_patches  # 1,024

    def worker(offset: int) -> Callable[[], list[tuple[int, Any]]]:
        order = np.random.default_rng(offset).permutation(n_patches).tolist()
        return lambda: [(i, sampler.get_patch_spec(i)) for _ in range(ROUNDS) for i in order]

    per_thread = _run([worker(t) for t in range(N_THREADS)])
    _assert_each_draw_once(sampler, per_thread, N_THREADS * ROUNDS)
    # The checkpoint's call counters: every call of every thread counted once.
    calls = decode_calls(sampler.state_dict(), n_patches)
    assert calls.tolist() == [N_THREADS * ROUNDS] * n_patches


def _owner_and_another_thread(seed: int) -> None:
    sampler = StratifiedPatching([(1, 1, 256, 256)], (16, 16), seed=seed, backend="numpy")
    n_patches = sampler.n_patches
    started = threading.Event()
    theirs: list[tuple[int, Any]] = []

    def other() -> None:
        started.wait()
        theirs.extend((i, sampler.get_patch_spec(i)) for _ in range(4) for i in range(n_patches))

    thread = threading.Thread(target=other)
    thread.start()
    mine = []
    for round_number in range(4):
        for index in range(n_patches):
            if round_number == 0 and index == n_patches // 2:
                started.set()
            mine.append((index, sampler.get_patch_spec(index)))
    thread.join()
    _assert_each_draw_once(sampler, [mine, theirs], 8)


@pytest.mark.parametrize("seed", range(4))
def test_the_building_thread_and_another_thread_lose_no_draw(seed: int) -> None:
    # The thread that built the sampler calls without the lock until another
    # thread arrives; the hand-over happens while both are calling.
    _owner_and_another_thread(seed)


def test_threads_drawing_with_replacement_lose_no_draw() -> None:
    sampler = StratifiedPatching([(2, 1, 200, 300)], (32, 32), seed=4, backend="numpy")
    n_patches = sampler.n_patches

    def worker(seed: int) -> Callable[[], list[tuple[int, Any]]]:
        order = np.random.default_rng(seed).integers(0, n_patches, 600).tolist()
        return lambda: [(i, sampler.get_patch_spec(i)) for i in order]

    per_thread = _run([worker(t) for t in range(N_THREADS)])
    counts = Counter(index for calls in per_thread for index, _ in calls)
    most = max(counts.values())
    got: dict[int, Counter[Any]] = {}
    for calls in per_thread:
        for index, spec in calls:
            got.setdefault(index, Counter())[
                (spec["data_idx"], spec["sample_idx"], spec["coords"])
            ] += 1
    epochs = [_rows(sampler.sample_epoch(k).to_numpy()) for k in range(most)]
    for index, patches in got.items():
        assert patches == Counter(epochs[k][index] for k in range(counts[index])), index


def test_epochs_and_checkpoints_taken_by_other_threads_are_consistent() -> None:
    sampler = StratifiedPatching([(1, 1, 256, 256)], (16, 16), seed=8, backend="numpy")
    n_patches = sampler.n_patches
    epoch_rows = _rows(sampler.sample_epoch(5).to_numpy())

    def caller() -> list[tuple[int, Any]]:
        return [(i, sampler.get_patch_spec(i)) for _ in range(3) for i in range(n_patches)]

    def epochs() -> bool:
        return all(_rows(sampler.sample_epoch(5).to_numpy()) == epoch_rows for _ in range(20))

    def checkpoints() -> list[int]:
        # Every checkpoint holds a whole number of calls: totals only grow.
        totals = []
        for _ in range(20):
            restored = StratifiedPatching([(1, 1, 256, 256)], (16, 16), backend="numpy")
            restored.load_state_dict(sampler.state_dict())
            totals.append(sum(decode_calls(restored.state_dict(), restored.n_patches).tolist()))
        return totals

    per_thread, same_epochs, totals = (lambda r: (r[:2], r[2], r[3]))(
        _run([caller, caller, epochs, checkpoints])
    )
    assert same_epochs
    assert totals == sorted(totals) and totals[-1] <= 6 * n_patches
    _assert_each_draw_once(sampler, per_thread, 6)


def test_checkpoints_taken_during_updates_hold_whole_updates() -> None:
    sampler = StratifiedPatching([(1, 1, 256, 256)], (16, 16), seed=2, backend="numpy")
    cells = [(row, column) for row in range(0, 16, 3) for column in range(0, 16, 5)]

    def updater() -> None:
        for cell in cells:
            sampler.exclude_patches(0, 0, [cell])

    def checkpoints() -> list[dict[str, Any]]:
        return [sampler.state_dict() for _ in range(30)]

    _, states = _run([updater, checkpoints])
    # Each checkpoint is the state after some number of whole updates.
    prefixes = []
    for count in range(len(cells) + 1):
        serial = StratifiedPatching([(1, 1, 256, 256)], (16, 16), seed=2, backend="numpy")
        for cell in cells[:count]:
            serial.exclude_patches(0, 0, [cell])
        prefixes.append(serial.state_dict())
    for state in states:
        assert state in prefixes
