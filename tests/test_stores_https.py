"""Remote stores: OME-Zarr images read over HTTPS from a server with a certificate of its own.

A ``ThreadingHTTPServer`` on 127.0.0.1 serves a folder holding an OME-Zarr
image written by zarr, over TLS with a certificate for ``127.0.0.1`` signed
by a certificate authority made in the test (``trustme``). The client trusts
that authority as a user would: an ``ssl`` context in the storage options
(fsspec's HTTP file system hands them to aiohttp's requests), or
``SSL_CERT_FILE`` for the command.
"""

from __future__ import annotations

import os
import ssl
import subprocess
import sys

import numpy as np
import pytest

zarr = pytest.importorskip("zarr", minversion="3")
pytest.importorskip("aiohttp")
trustme = pytest.importorskip("trustme")

from conftest import sliced_patches  # noqa: E402
from local_servers import start_https_server  # noqa: E402
from ome_images import write_ome  # noqa: E402

from gpu_patching import PatchLoader, StratifiedPatching  # noqa: E402
from gpu_patching.stores import StoreError, open_stack  # noqa: E402

pytestmark = pytest.mark.timeout(120, method="thread")
SIGNATURE = "X-Amz-Signature=0123456789abcdef0123456789abcdef"


@pytest.fixture(scope="module")
def authority():
    return trustme.CA()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A folder with a 3D OME-Zarr image (0.5) and its pixels."""
    folder = tmp_path_factory.mktemp("https")
    full = np.random.default_rng(4).integers(0, 60000, (20, 48, 64), dtype=np.uint16)
    write_ome(folder / "image.ome.zarr", full, "zyx", 3, chunk=16)
    return folder, full[None, None]


@pytest.fixture(scope="module")
def https(authority, folder):
    """The folder served over HTTPS; its URL, the options that trust it, and the pixels."""
    server, url = start_https_server(folder[0], authority.issue_cert("127.0.0.1"))
    trusting = ssl.create_default_context()
    authority.configure_trust(trusting)
    yield url, {"ssl": trusting}, folder[1]
    server.shutdown()
    server.server_close()


def test_every_patch_of_a_shuffled_epoch_over_https_equals_slicing_the_image(https):
    url, options, pixels = https
    stack = open_stack(f"{url}/image.ome.zarr", storage_options=options)
    assert stack.shape == pixels.shape
    strategy = StratifiedPatching([stack.shape], (8, 16, 16), seed=3)
    seen = 0
    for patches, batch in PatchLoader([stack], strategy, batch_size=8, shuffle=True):
        np.testing.assert_array_equal(patches, sliced_patches(pixels, batch))
        seen += len(batch)
    assert seen == strategy.n_patches


def test_the_command_trusts_the_certificate_authority_of_ssl_cert_file(https, authority, tmp_path):
    # aiohttp reads SSL_CERT_FILE when it is imported: a process of its own.
    url, _, pixels = https
    authority_file = tmp_path / "authority.pem"
    authority.cert_pem.write_to_path(str(authority_file))
    output = tmp_path / "epoch.csv"
    result = subprocess.run(
        [sys.executable, "-m", "gpu_patching", "sample", f"{url}/image.ome.zarr",
         "--patch", "8", "16", "16", "--seed", "0", "-o", str(output)],
        capture_output=True, text=True, timeout=120, check=False,
        env={**os.environ, "SSL_CERT_FILE": str(authority_file)},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    table = np.loadtxt(output, delimiter=",", skiprows=1, dtype=np.int64)
    expected = StratifiedPatching([pixels.shape], (8, 16, 16), seed=0).sample_epoch(0)
    np.testing.assert_array_equal(table[:, 3:], expected.coords)


def test_a_certificate_nobody_trusts_is_a_store_error_naming_the_url(https):
    url, _, _ = https
    with pytest.raises(StoreError, match="CERTIFICATE_VERIFY_FAILED") as caught:
        open_stack(f"{url}/image.ome.zarr")
    assert f"{url}/image.ome.zarr" in str(caught.value)


def test_a_url_with_a_query_is_refused_without_the_query(https):
    # zarr adds each object's key after the store's URL: a query (a presigned
    # URL's signature) would land inside every object's path.
    url, options, _ = https
    with pytest.raises(ValueError, match="query") as caught:
        open_stack(f"{url}/image.ome.zarr?{SIGNATURE}", storage_options=options)
    assert f"{url}/image.ome.zarr" in str(caught.value)
    assert SIGNATURE.split("=")[1] not in str(caught.value)


def test_a_server_stopped_mid_epoch_raises_store_error_naming_url_and_chunk(authority, folder):
    server, url = start_https_server(folder[0], authority.issue_cert("127.0.0.1"))
    trusting = ssl.create_default_context()
    authority.configure_trust(trusting)
    stack = open_stack(f"{url}/image.ome.zarr", storage_options={"ssl": trusting})
    strategy = StratifiedPatching([stack.shape], (8, 16, 16), seed=1)
    loader = PatchLoader([stack], strategy, batch_size=4, shuffle=True, cache_bytes=0)
    handed_over = []
    try:
        with pytest.raises(StoreError) as caught:
            for k, (patches, batch) in enumerate(loader):
                np.testing.assert_array_equal(patches, sliced_patches(folder[1], batch))
                handed_over.append(len(batch))
                if k == 1:
                    server.shutdown()
                    server.server_close()
    finally:
        server.server_close()
    assert 2 <= len(handed_over) < -(-strategy.n_patches // 4)
    assert f"{url}/image.ome.zarr/0" in str(caught.value)
    assert caught.value.chunk is not None and f"chunk {caught.value.chunk}" in str(caught.value)


def test_a_certificate_that_turns_untrusted_mid_epoch_fails_the_read_without_retrying(
    authority, folder
):
    # The server is replaced, on the same port, by one whose certificate no
    # authority the client trusts has signed: a refusal, not a read that
    # failed on its way, so the chunk is not asked for again (3 retries).
    server, url = start_https_server(folder[0], authority.issue_cert("127.0.0.1"))
    trusting = ssl.create_default_context()
    authority.configure_trust(trusting)
    stack = open_stack(f"{url}/image.ome.zarr", storage_options={"ssl": trusting})
    strategy = StratifiedPatching([stack.shape], (8, 16, 16), seed=2)
    loader = PatchLoader([stack], strategy, batch_size=4, shuffle=True, cache_bytes=0, workers=1)
    batches = iter(loader)
    patches, batch = next(batches)
    np.testing.assert_array_equal(patches, sliced_patches(folder[1], batch))
    server.shutdown()
    server.server_close()
    impostor, _ = start_https_server(
        folder[0], trustme.CA().issue_cert("127.0.0.1"), port=server.server_address[1]
    )
    try:
        with pytest.raises(StoreError, match="CERTIFICATE_VERIFY_FAILED") as caught:
            for _ in batches:
                pass
    finally:
        impostor.shutdown()
        impostor.server_close()
    assert f"{url}/image.ome.zarr/0" in str(caught.value) and caught.value.chunk is not None
    assert impostor.connections == 1


def test_a_password_in_an_https_url_is_not_in_the_error_of_a_stopped_server(authority, folder):
    server, url = start_https_server(folder[0], authority.issue_cert("127.0.0.1"))
    server.shutdown()
    server.server_close()
    secret = "pass-word-0123456789"
    with_user = url.replace("https://", f"https://reader:{secret}@")
    with pytest.raises(StoreError) as caught:
        open_stack(f"{with_user}/image.ome.zarr")
    texts = []
    error: BaseException | None = caught.value
    while error is not None:
        texts.append(f"{error!s} {error!r}")
        error = error.__cause__ or error.__context__
    assert f"{url}/image.ome.zarr" in texts[0]
    assert all(secret not in text for text in texts)
