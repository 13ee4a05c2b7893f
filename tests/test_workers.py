"""DataLoader worker processes advance the draws, as one process does.

A map-style dataset whose item ``i`` calls ``get_patch_spec(i)`` (CAREamics'
pattern) is read through ``torch.utils.data.DataLoader(shuffle=True,
num_workers=2)`` for a few passes, without ``set_epoch``: with workers started
by ``fork`` or ``spawn``, persistent or not, pass ``k`` must return row ``i``
of epoch ``k`` for every index (so passes draw new patches), and the same seed
must replay the same passes.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from gpu_patching import StratifiedPatching  # noqa: E402
from gpu_patching._state import decode_calls  # noqa: E402

#: Passes per loader: spawned workers import PyTorch, which takes seconds.
N_PASSES = {"fork": 3, "spawn": 2}


class SpecItems(torch.utils.data.Dataset):  # type: ignore[misc]
    """Item ``i``: ``[i, data_idx, sample_idx, *coords]`` of ``get_patch_spec(i)``."""

    def __init__(self, sampler: StratifiedPatching) -> None:
        self.sampler = sampler

    def __len__(self) -> int:
        return self.sampler.n_patches

    def __getitem__(self, index: int) -> Any:
        spec = self.sampler.get_patch_spec(index)
        return torch.tensor([index, spec["data_idx"], spec["sample_idx"], *spec["coords"]])


def _passes(start_method: str, persistent: bool) -> tuple[list[np.ndarray], StratifiedPatching]:
    sampler = StratifiedPatching(
        [(2, 1, 96, 64), (1, 1, 80, 80)], (16, 16), seed=99, backend="numpy"
    )
    generator = torch.Generator()
    generator.manual_seed(0)
    loader = torch.utils.data.DataLoader(
        SpecItems(sampler),
        batch_size=8,
        shuffle=True,
        num_workers=2,
        multiprocessing_context=start_method,
        persistent_workers=persistent,
        generator=generator,
    )
    n_passes = N_PASSES[start_method]
    return [torch.cat(list(loader)).numpy() for _ in range(n_passes)], sampler


@pytest.mark.parametrize("persistent", [False, True], ids=["fresh workers", "persistent"])
@pytest.mark.parametrize("start_method", ["fork", "spawn"])
def test_each_pass_of_workers_draws_the_next_epoch(start_method: str, persistent: bool) -> None:
    passes, sampler = _passes(start_method, persistent)
    for number, rows in enumerate(passes):
        epoch = sampler.sample_epoch(number).to_numpy()
        order = rows[:, 0]
        assert sorted(order.tolist()) == list(range(sampler.n_patches))
        assert np.array_equal(rows[:, 1], epoch.data_idx[order])
        assert np.array_equal(rows[:, 2], epoch.sample_idx[order])
        assert np.array_equal(rows[:, 3:], epoch.coords[order])
    # Every index was called once per pass, in whichever worker: the main
    # process's counters (its checkpoint's) know all of it.
    calls = decode_calls(sampler.state_dict(), sampler.n_patches)
    assert calls.tolist() == [len(passes)] * sampler.n_patches
    # Passes draw new patches: few (index, corner) pairs repeat.
    first = {tuple(row) for row in passes[0].tolist()}
    second = {tuple(row) for row in passes[1].tolist()}
    assert len(first & second) <= len(first) // 10


def test_the_same_seed_replays_the_same_passes() -> None:
    passes, _ = _passes("fork", True)
    again, _ = _passes("fork", True)
    assert all(np.array_equal(a, b) for a, b in zip(passes, again, strict=True))
