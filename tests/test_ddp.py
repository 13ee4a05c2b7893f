"""DDP on torch.distributed: two processes, gloo on the CPU, one shard each.

Each process is started the way ``torchrun`` starts one (``RANK``,
``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT`` in the environment), builds
the same strategy with the same seed, takes its rank's shard from a
``PatchSampler`` (rank and world size read from the process group) and
``all_gather``s the shards. No communication takes part in computing them.
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("torch")
if not __import__("torch").distributed.is_available():
    pytest.skip("this PyTorch build has no torch.distributed", allow_module_level=True)

from gpu_patching import StratifiedPatching

WORLD_SIZE = 2
EPOCHS = (0, 1)

WORKER = textwrap.dedent(
    """
    import json, os, sys

    import torch
    import torch.distributed as dist

    from gpu_patching import StratifiedPatching
    from gpu_patching.torch import PatchSampler

    dist.init_process_group("gloo")  # env:// rendezvous, as under torchrun
    rank, world_size = dist.get_rank(), dist.get_world_size()
    strategy = StratifiedPatching(
        [(3, 1, 97, 64), (2, 1, 40, 50)], (8, 6), seed=1234, backend="numpy"
    )
    strategy.exclude_patches(0, 1, [(2, 2)])
    result = {"rank": rank, "world_size": world_size, "n_patches": strategy.n_patches}
    for drop_last in (False, True):
        sampler = PatchSampler(strategy, shuffle=True, drop_last=drop_last)
        for epoch in (0, 1):
            sampler.set_epoch(epoch)
            shard = torch.tensor(list(sampler), dtype=torch.int64)
            gathered = [torch.empty_like(shard) for _ in range(world_size)]
            dist.all_gather(gathered, shard)
            batch = strategy.sample_epoch(
                epoch, shuffle=True, rank=rank, world_size=world_size, drop_last=drop_last
            )
            coords = torch.from_numpy(batch.coords)
            all_coords = [torch.empty_like(coords) for _ in range(world_size)]
            dist.all_gather(all_coords, coords)
            result[f"{drop_last}/{epoch}"] = {
                "indices": [g.tolist() for g in gathered],
                "coords": [c.tolist() for c in all_coords],
            }
    with open(sys.argv[1], "w") as handle:
        json.dump(result, handle)
    dist.barrier()
    dist.destroy_process_group()
    """
)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture(scope="module")
def gathered(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """What each of the two ranks saw after all_gather."""
    folder = tmp_path_factory.mktemp("ddp")
    script = folder / "worker.py"
    script.write_text(WORKER)
    environment = {
        **os.environ,
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
        "WORLD_SIZE": str(WORLD_SIZE),
        "OMP_NUM_THREADS": "1",
    }
    if sys.platform.startswith("linux"):
        # Gloo on the loopback interface: no network, and no guessing which.
        environment.setdefault("GLOO_SOCKET_IFNAME", "lo")
    processes = [
        subprocess.Popen(
            [sys.executable, str(script), str(folder / f"rank{rank}.json")],
            env={**environment, "RANK": str(rank), "LOCAL_RANK": str(rank)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in range(WORLD_SIZE)
    ]
    outputs = []
    for process in processes:
        try:
            outputs.append(process.communicate(timeout=120))
        except subprocess.TimeoutExpired:
            for other in processes:
                other.kill()
            raise
    for process, (_, stderr) in zip(processes, outputs, strict=True):
        assert process.returncode == 0, stderr[-4000:]
    return [json.loads(Path(folder / f"rank{rank}.json").read_text()) for rank in range(WORLD_SIZE)]


def local_strategy() -> StratifiedPatching:
    strategy = StratifiedPatching(
        [(3, 1, 97, 64), (2, 1, 40, 50)], (8, 6), seed=1234, backend="numpy"
    )
    strategy.exclude_patches(0, 1, [(2, 2)])
    return strategy


def test_every_rank_sees_the_process_group_and_the_same_strategy(
    gathered: list[dict[str, Any]],
) -> None:
    assert [result["rank"] for result in gathered] == list(range(WORLD_SIZE))
    assert {result["world_size"] for result in gathered} == {WORLD_SIZE}
    n_patches = {result["n_patches"] for result in gathered}
    assert n_patches == {local_strategy().n_patches}
    assert n_patches.pop() % WORLD_SIZE == 1, "an odd epoch makes padding matter"


@pytest.mark.parametrize("epoch", EPOCHS)
def test_shards_without_drop_last_have_equal_sizes_and_cover_every_index(
    gathered: list[dict[str, Any]], epoch: int
) -> None:
    n = gathered[0]["n_patches"]
    for result in gathered:
        shards = result[f"False/{epoch}"]["indices"]
        assert [len(shard) for shard in shards] == [math.ceil(n / WORLD_SIZE)] * WORLD_SIZE
        assert set().union(*shards) == set(range(n))


@pytest.mark.parametrize("epoch", EPOCHS)
def test_shards_with_drop_last_are_disjoint(gathered: list[dict[str, Any]], epoch: int) -> None:
    n = gathered[0]["n_patches"]
    for result in gathered:
        shards = result[f"True/{epoch}"]["indices"]
        assert [len(shard) for shard in shards] == [n // WORLD_SIZE] * WORLD_SIZE
        assert not set(shards[0]) & set(shards[1])


@pytest.mark.parametrize("key", ["False/0", "False/1", "True/0", "True/1"])
def test_both_ranks_gathered_the_shards_a_single_process_computes(
    gathered: list[dict[str, Any]], key: str
) -> None:
    drop_last, epoch = key.split("/")
    strategy = local_strategy()
    plain = strategy.sample_epoch(int(epoch))
    for result in gathered:
        for rank in range(WORLD_SIZE):
            expected = strategy.epoch_indices(
                int(epoch),
                shuffle=True,
                rank=rank,
                world_size=WORLD_SIZE,
                drop_last=drop_last == "True",
            )
            assert result[key]["indices"][rank] == expected.tolist()
            # Each rank's patches are the epoch's rows of its indices.
            np.testing.assert_array_equal(result[key]["coords"][rank], plain.coords[expected])


def test_the_order_changes_between_epochs(gathered: list[dict[str, Any]]) -> None:
    first, second = (gathered[0][f"False/{epoch}"]["indices"] for epoch in EPOCHS)
    assert first != second
