"""Remote stores: OME-Zarr images read from a Google Cloud Storage emulator (gs:// URLs).

gcp-storage-emulator serves GCS's JSON API from a thread of this process on
127.0.0.1; gcsfs reaches it through the ``endpoint_url`` storage option, with
``token="anon"``. The images are written by zarr into a local folder and
uploaded through gcsfs, then read through the public API and the command.

Not written by zarr to the ``gs://`` URL: gcsfs sends an object under its
block size as a multipart upload, and the emulator's parser of that body drops
a last byte ``\\r`` (a chunk whose compressed bytes end so loses it, and no
longer decodes). A resumable upload (each file as one piece) keeps every byte.

gcsfs 2025.x and later use, by default (``GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT``),
a file system that first asks Google's gRPC storage-control service for each
bucket's layout; an emulator speaks no gRPC, so every request would wait out
that call's retries (about a minute). The module reads through gcsfs's plain
JSON-API file system, as that variable set to ``false`` does.
"""

from __future__ import annotations

import numpy as np
import pytest

zarr = pytest.importorskip("zarr", minversion="3")
fsspec = pytest.importorskip("fsspec")
gcsfs = pytest.importorskip("gcsfs")
pytest.importorskip("gcp_storage_emulator")

from conftest import sliced_patches  # noqa: E402
from local_servers import start_gcs_server  # noqa: E402
from ome_images import write_ome  # noqa: E402

from gpu_patching import PatchLoader, StratifiedPatching  # noqa: E402
from gpu_patching.cli import main  # noqa: E402
from gpu_patching.stores import open_stack  # noqa: E402

pytestmark = pytest.mark.timeout(120, method="thread")

#: name -> (metadata axes, shape, zarr format, the pixels as SC(Z)YX)
IMAGES = {
    "2d-v04": ("cyx", (2, 64, 80), 2, lambda a: a[None]),
    "3d-v05": ("zyx", (20, 48, 64), 3, lambda a: a[None, None]),
}


def _upload(file_system, local, remote: str) -> None:
    """Upload every file of a local folder, each as a one-piece resumable upload."""
    for path in sorted(p for p in local.rglob("*") if p.is_file()):
        data = path.read_bytes()
        key = f"{remote}/{path.relative_to(local).as_posix()}"
        file_system.pipe_file(key, data, chunksize=max(1, len(data)))


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
    """A bucket on a running GCS emulator, with every image of IMAGES uploaded."""
    from gcsfs.core import GCSFileSystem

    before = {p: fsspec.get_filesystem_class(p) for p in ("gs", "gcs")}
    for protocol in before:
        fsspec.register_implementation(protocol, GCSFileSystem, clobber=True)
    folder = tmp_path_factory.mktemp("gcs")
    server, endpoint = start_gcs_server("images")
    options = {"endpoint_url": endpoint, "token": "anon"}
    try:
        file_system = GCSFileSystem(**options)
        pixels = {}
        for k, (name, (axes, shape, zarr_format, to_scyx)) in enumerate(IMAGES.items()):
            full = np.random.default_rng(k).integers(0, 60000, shape, dtype=np.uint16)
            local = write_ome(folder / f"{name}.ome.zarr", full, axes, zarr_format, chunk=16)
            _upload(file_system, local, f"images/{name}.ome.zarr")
            pixels[name] = to_scyx(full)
        yield options, pixels
    finally:
        server.stop()
        for protocol, cls in before.items():
            fsspec.register_implementation(protocol, cls, clobber=True)


@pytest.mark.parametrize("name", list(IMAGES))
def test_every_patch_of_a_shuffled_epoch_from_gcs_equals_slicing_the_image(gcs, name):
    options, pixels = gcs
    stack = open_stack(f"gs://images/{name}.ome.zarr", storage_options=options)
    assert stack.shape == pixels[name].shape
    assert stack.name == f"gs://images/{name}.ome.zarr/0"
    patch = (16, 16) if stack.ndim == 4 else (8, 16, 16)
    strategy = StratifiedPatching([stack.shape], patch, seed=3)
    seen = 0
    for patches, batch in PatchLoader([stack], strategy, batch_size=8, shuffle=True):
        np.testing.assert_array_equal(patches, sliced_patches(pixels[name], batch))
        seen += len(batch)
    assert seen == strategy.n_patches


def test_the_command_samples_a_gcs_image_with_storage_options(gcs, tmp_path):
    options, pixels = gcs
    output = tmp_path / "epoch.csv"
    flags = [f"--storage-option={k}={v}" for k, v in options.items()]
    code = main(["sample", "gs://images/3d-v05.ome.zarr", *flags, "--patch", "8", "16", "16",
                 "--seed", "0", "-o", str(output)])  # fmt: skip
    assert code == 0
    table = np.loadtxt(output, delimiter=",", skiprows=1, dtype=np.int64)
    expected = StratifiedPatching([pixels["3d-v05"].shape], (8, 16, 16), seed=0).sample_epoch(0)
    np.testing.assert_array_equal(table[:, 3:], expected.coords)


def test_a_missing_gcs_image_is_a_file_not_found_error_naming_the_url(gcs):
    options, _ = gcs
    with pytest.raises(FileNotFoundError, match=r"gs://images/absent\.ome\.zarr"):
        open_stack("gs://images/absent.ome.zarr", storage_options=options)
