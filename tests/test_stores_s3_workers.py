"""An ``s3://`` stack read by DataLoader worker processes gives the in-memory patches.

fsspec's S3 file system binds its connections to an event loop and caches
its instances: a forked worker inherits both from the process that read
first, and a spawned one gets the stack by pickling. Every image here is an
OME-Zarr image on moto's S3 server (127.0.0.1), read by a real ``DataLoader``
with two workers started by fork and by spawn, and compared with slicing the
same array in memory. A hang fails its test (``timeout``) instead of the run.
"""

from __future__ import annotations

import pickle

import numpy as np
import pytest

torch = pytest.importorskip("torch")
zarr = pytest.importorskip("zarr", minversion="3")
pytest.importorskip("s3fs")
pytest.importorskip("moto.server")

from local_servers import s3_options, start_s3_server  # noqa: E402
from ome_images import write_ome  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from gpu_patching import PatchLoader, StratifiedPatching, extract_patches  # noqa: E402
from gpu_patching.stores import open_stack  # noqa: E402
from gpu_patching.torch import PatchDataset, PatchIterableDataset  # noqa: E402

URL = "s3://workers/image.ome.zarr"
PATCH = (24, 24)
# Seconds for a test: a worker stuck on an inherited connection or loop fails
# it. The thread method ends the run even where the stuck read is this process's
# own (the signal's would fail the test, then wait on that read at exit).
pytestmark = pytest.mark.timeout(120, method="thread")


@pytest.fixture(scope="module")
def s3():
    """An OME-Zarr image (time points are samples) on a running S3 server; and its pixels."""
    server, endpoint = start_s3_server()
    import s3fs

    s3fs.S3FileSystem(**s3_options(endpoint)).mkdir("workers")
    full = np.random.default_rng(11).integers(0, 60000, (4, 96, 80), dtype=np.uint16)
    write_ome(URL, full, "tyx", 3, chunk=32, storage_options=s3_options(endpoint))
    yield endpoint, full[:, None]
    server.stop()


def _opened(endpoint: str, data: np.ndarray):
    stack = open_stack(URL, storage_options=s3_options(endpoint))
    # The parent reads first: a forked worker inherits a used file system.
    assert np.array_equal(stack[1, 0], data[1, 0])
    return stack


def _strategy(data: np.ndarray) -> StratifiedPatching:
    return StratifiedPatching([data.shape], PATCH, seed=5, backend="numpy")


# A spawned worker imports torch, zarr and s3fs anew (seconds each): spawn
# once per dataset, with workers that stay for both passes.
@pytest.mark.parametrize(
    ("start_method", "persistent"),
    [("fork", False), ("fork", True), ("spawn", True)],
    ids=["fork", "fork-persistent", "spawn-persistent"],
)
def test_workers_read_an_s3_stack_through_the_map_style_dataset_like_the_array_in_memory(
    s3, start_method, persistent
):
    endpoint, data = s3
    strategy = _strategy(data)
    loader = DataLoader(
        PatchDataset(strategy, [_opened(endpoint, data)]),
        batch_size=8,
        num_workers=2,
        multiprocessing_context=start_method,
        persistent_workers=persistent,
    )
    # Pass k of an in-order loader is epoch k: item i is row i of that epoch.
    for epoch in range(2):
        patches = torch.cat(list(loader)).numpy()
        expected = extract_patches([data], strategy.sample_epoch(epoch).to_numpy())
        assert np.array_equal(patches, expected)


@pytest.mark.parametrize(
    ("start_method", "order"), [("fork", "chunks"), ("fork", "shuffled"), ("spawn", "chunks")]
)
def test_workers_read_an_s3_stack_through_the_iterable_dataset_once_per_patch(
    s3, start_method, order
):
    endpoint, data = s3
    strategy = _strategy(data)
    options = {"order": "chunks"} if order == "chunks" else {"shuffle": True}
    dataset = PatchIterableDataset([_opened(endpoint, data)], strategy, 8, **options)
    dataset.set_epoch(2)
    loader = DataLoader(
        dataset, batch_size=None, num_workers=2, multiprocessing_context=start_method
    )
    batches = list(loader)
    indices = np.concatenate([batch.indices for _, batch in batches])
    assert sorted(indices.tolist()) == list(range(strategy.n_patches))
    plain = strategy.sample_epoch(2).to_numpy()
    patches = torch.cat([p for p, _ in batches]).numpy()
    assert np.array_equal(patches, extract_patches([data], plain[indices]))


def test_an_unpickled_s3_stack_reads_its_first_chunks_through_the_chunk_reader(s3):
    # The copy opens the store again at its first read; the chunk reader's
    # first read runs on the read loop, which that opening needs too.
    endpoint, data = s3
    copy = pickle.loads(pickle.dumps(_opened(endpoint, data)))
    strategy = _strategy(data)
    loader = PatchLoader([copy], strategy, batch_size=8, order="chunks")
    batches = list(loader)
    indices = np.concatenate([batch.indices for _, batch in batches])
    assert sorted(indices.tolist()) == list(range(strategy.n_patches))
    patches = np.concatenate([p for p, _ in batches])
    plain = strategy.sample_epoch(0).to_numpy()
    assert np.array_equal(patches, extract_patches([data], plain[indices]))
