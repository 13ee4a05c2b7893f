"""``PatchIterableDataset``: an epoch of batches shared out between DataLoader workers.

Every store is a real zarr array in ``tmp_path``; the DataLoaders are real,
with worker processes started by fork and by spawn.
"""

from __future__ import annotations

import pickle

import numpy as np
import pytest

torch = pytest.importorskip("torch")
zarr = pytest.importorskip("zarr", minversion="3")

from torch.utils.data import DataLoader  # noqa: E402

from gpu_patching import PatchLoader, StratifiedPatching, extract_patches  # noqa: E402
from gpu_patching.stores import chunk_order, open_stack  # noqa: E402
from gpu_patching.torch import PatchIterableDataset  # noqa: E402

SHAPE, CHUNKS, PATCH = (2, 1, 128, 128), (1, 1, 32, 32), (8, 8)


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    data = np.random.default_rng(7).integers(0, 60000, SHAPE, dtype=np.uint16)
    path = tmp_path_factory.mktemp("torch_chunks") / "image.zarr"
    array = zarr.create_array(str(path), shape=SHAPE, chunks=CHUNKS, dtype=data.dtype)
    array[...] = data
    return data, open_stack(str(path))


def _strategy() -> StratifiedPatching:
    return StratifiedPatching([SHAPE], PATCH, seed=21, backend="numpy")


def _pass(dataset, num_workers: int, context: str | None = None):
    loader = DataLoader(
        dataset, batch_size=None, num_workers=num_workers, multiprocessing_context=context
    )
    return [(patches, batch) for patches, batch in loader]


@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_two_workers_together_yield_the_epochs_patches_once(image, context):
    data, stack = image
    strategy = _strategy()
    dataset = PatchIterableDataset([stack], strategy, 16, order="chunks", workers=2)
    dataset.set_epoch(3)
    batches = _pass(dataset, 2, context)
    indices = np.concatenate([batch.indices for _, batch in batches])
    assert sorted(indices.tolist()) == list(range(strategy.n_patches))
    # Each patch is the one its index has in epoch 3, cut as plain slicing cuts it.
    plain = strategy.sample_epoch(3).to_numpy()
    patches = torch.cat([p for p, _ in batches]).numpy()
    assert np.array_equal(patches, extract_patches([data], plain[indices]))


def test_no_tile_is_split_between_workers(image):
    _, stack = image
    strategy = _strategy()
    dataset = PatchIterableDataset([stack], strategy, 16, order="chunks", chunk_tile=(1, 2))
    parts = [np.concatenate([batch.indices for _, batch in dataset.loader(w, 2)]) for w in range(2)]
    plain = strategy.sample_epoch(0).to_numpy()
    whole = chunk_order(plain, [stack.chunks], seed=strategy.seed, epoch=0, tile=(1, 2))
    tile_of = dict(zip(whole.rows.tolist(), whole.tile.tolist(), strict=True))
    tiles = [{tile_of[i] for i in part.tolist()} for part in parts]
    assert tiles[0] and tiles[1] and not tiles[0] & tiles[1]
    assert sorted(np.concatenate(parts).tolist()) == list(range(strategy.n_patches))


def test_worker_batches_are_the_same_for_the_same_seed_and_epoch(image):
    _, stack = image
    dataset = PatchIterableDataset([stack], _strategy(), 16, order="chunks")
    dataset.set_epoch(1)
    first = [batch.indices for _, batch in _pass(dataset, 2, "fork")]
    again = [batch.indices for _, batch in _pass(dataset, 2, "fork")]
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    dataset.set_epoch(2)
    other = np.concatenate([batch.indices for _, batch in _pass(dataset, 2, "fork")])
    assert not np.array_equal(np.concatenate(first), other)


def test_without_workers_the_dataset_yields_the_loaders_batches(image):
    _, stack = image
    strategy = _strategy()
    dataset = PatchIterableDataset([stack], strategy, 16, order="chunks")
    dataset.set_epoch(4)
    loader = PatchLoader([stack], strategy, 16, order="chunks")
    loader.set_epoch(4)
    expected = [batch.indices for _, batch in loader]
    seen = [batch.indices for _, batch in _pass(dataset, 0)]
    assert all(np.array_equal(a, b) for a, b in zip(seen, expected, strict=True))
    assert len(seen) == len(expected)


def test_ranks_times_workers_share_the_epoch_without_overlap(image):
    _, stack = image
    strategy = _strategy()
    seen = []
    for rank in range(2):
        dataset = PatchIterableDataset(
            [stack], strategy, 16, order="chunks", rank=rank, world_size=2, drop_last=True
        )
        seen.append(np.concatenate([b.indices for _, b in _pass(dataset, 2, "fork")]))
    # drop_last: disjoint ranks; within a rank the workers never repeat a row.
    assert len(set(seen[0].tolist()) | set(seen[1].tolist())) == len(seen[0]) + len(seen[1])


def test_the_shuffled_order_is_split_into_equal_runs_between_workers(image):
    _, stack = image
    strategy = _strategy()
    dataset = PatchIterableDataset([stack], strategy, 16)
    parts = [np.concatenate([b.indices for _, b in dataset.loader(w, 2)]) for w in range(2)]
    order = strategy.epoch_indices(0, shuffle=True)
    assert np.array_equal(np.concatenate(parts), order)
    assert abs(len(parts[0]) - len(parts[1])) <= 1


def test_the_dataset_pickles_and_its_copy_yields_the_same_batches(image):
    _, stack = image
    dataset = PatchIterableDataset([stack], _strategy(), 16, order="chunks")
    copy = pickle.loads(pickle.dumps(dataset))
    first = [b.indices for _, b in dataset.loader(1, 2)]
    again = [b.indices for _, b in copy.loader(1, 2)]
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"order": "chunks", "chunk_window": 0}, ValueError, "chunk_window"),
        ({"rank": 2, "world_size": 2}, ValueError, "rank"),
        ({"num_workers": 2}, TypeError, "num_workers"),
        ({"as_torch": False}, TypeError, "as_torch"),
    ],
)
def test_bad_options_are_refused_when_the_dataset_is_built(image, kwargs, error, message):
    _, stack = image
    with pytest.raises(error, match=message):
        PatchIterableDataset([stack], _strategy(), 16, **kwargs)


@pytest.mark.parametrize(
    ("worker_id", "num_workers", "message"),
    [(2, 2, "worker_id"), (0, 0, "num_workers")],
)
def test_bad_worker_numbers_are_refused_by_the_loader(image, worker_id, num_workers, message):
    _, stack = image
    with pytest.raises(ValueError, match=message):
        PatchLoader([stack], _strategy(), 16, worker_id=worker_id, num_workers=num_workers)


def test_two_workers_together_decode_about_what_one_process_decodes(tmp_path):
    # Two images of 8x8 chunks, a cache that holds them: one process decodes
    # each chunk once; two workers cut each image once (4 tiles of 4x8 chunks).
    shape = (2, 1, 256, 256)
    array = zarr.create_array(str(tmp_path / "i.zarr"), shape=shape, chunks=CHUNKS, dtype="uint16")
    array[...] = np.random.default_rng(3).integers(0, 60000, shape, dtype=np.uint16)
    strategy = StratifiedPatching([shape], PATCH, seed=21, backend="numpy")
    dataset = PatchIterableDataset(
        [open_stack(str(tmp_path / "i.zarr"))], strategy, 16, order="chunks", cache_bytes=4 << 20
    )

    def decodes(loader: PatchLoader) -> int:
        for _ in loader:
            pass
        return loader._reader.chunks_read

    alone = decodes(dataset.loader())
    together = sum(decodes(dataset.loader(w, 2)) for w in range(2))
    assert alone == 128
    assert together <= 1.2 * alone  # 144: one row of chunks more per image
