"""Adversarial inputs against the code paths of the host crop's threads, kernels and stores.

Each test pins an input that once gave a crash, a hang, a leak or a wrong
message; the results are compared with plain slicing or the documented error.
"""

from __future__ import annotations

import base64
import functools
import http.server
import logging
import re
import subprocess
import sys
import threading
from typing import Any, ClassVar

import numpy as np
import pytest

from gpu_patching import PatchBatch, _row_threads, extract_patches
from gpu_patching._row_threads import THREAD_LIMIT


def _copy_threads() -> int:
    # The shared pool's threads (another test may leave a pool of its own).
    return sum(thread.is_alive() for thread in _row_threads._SHARED.get()._threads)


def test_a_huge_thread_count_starts_at_most_the_thread_limit_and_equals_slicing() -> None:
    n_rows = 3 * THREAD_LIMIT
    stack = np.arange(2 * 9 * 10, dtype=np.int16).reshape(1, 2, 9, 10)
    rng = np.random.default_rng(7)
    coords = np.stack([rng.integers(0, 8, n_rows), rng.integers(0, 9, n_rows)], axis=1)
    zeros = np.zeros(n_rows, dtype=np.int64)
    batch = PatchBatch(zeros, zeros, coords, np.arange(n_rows), (2, 2))
    patches = extract_patches([stack], batch, threads=2**62)
    expected = np.stack([stack[0, :, y : y + 2, x : x + 2] for y, x in coords])
    np.testing.assert_array_equal(patches, expected)
    # The calling thread takes one run; the pool never grows past the limit.
    assert _copy_threads() <= THREAD_LIMIT - 1


# -- remote URLs ----------------------------------------------------------------------

PASSWORD = "hunter2-url-password"


class _RecordingFiles(http.server.SimpleHTTPRequestHandler):
    """Serves a folder's files and records each request's Authorization header."""

    authorizations: ClassVar[list[str | None]] = []

    def do_GET(self) -> None:
        self.authorizations.append(self.headers.get("Authorization"))
        super().do_GET()

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def http_image(tmp_path_factory):
    """A 2D OME-Zarr image served over plain HTTP from 127.0.0.1: its URL and pixels."""
    pytest.importorskip("zarr", minversion="3")
    pytest.importorskip("aiohttp")
    from ome_images import write_ome

    folder = tmp_path_factory.mktemp("http")
    full = np.random.default_rng(5).integers(0, 60000, (2, 32, 40), dtype=np.uint16)
    write_ome(folder / "image.ome.zarr", full, "cyx", 3, chunk=16)
    handler = functools.partial(_RecordingFiles, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, name="http_server", daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/image.ome.zarr", full[None]
    server.shutdown()
    server.server_close()


def test_an_upper_case_url_scheme_opens_the_store(http_image) -> None:
    from gpu_patching.stores import open_stack

    url, pixels = http_image
    stack = open_stack("HTTP" + url.removeprefix("http"))
    np.testing.assert_array_equal(np.asarray(stack[0]), pixels[0])


@pytest.mark.parametrize("tail", ["#level-0", "#", "?"])
def test_a_url_with_a_fragment_or_an_empty_query_is_refused_naming_it(http_image, tail) -> None:
    # Each object's key would follow the '#' or '?': the reads miss the image.
    from gpu_patching.stores import open_stack

    url, _ = http_image
    with pytest.raises(ValueError, match=re.escape(url) + r": a store URL cannot carry"):
        open_stack(url + tail)


def test_a_password_in_an_http_url_is_sent_but_never_logged(http_image, caplog) -> None:
    from gpu_patching.stores import open_stack

    url, pixels = http_image
    _RecordingFiles.authorizations.clear()
    with caplog.at_level(logging.DEBUG):
        stack = open_stack(url.replace("http://", f"http://reader:{PASSWORD}@"))
        np.testing.assert_array_equal(np.asarray(stack[0]), pixels[0])
    token = base64.b64encode(f"reader:{PASSWORD}".encode()).decode()
    assert _RecordingFiles.authorizations
    assert set(_RecordingFiles.authorizations) == {f"Basic {token}"}
    assert not [r.name for r in caplog.records if PASSWORD in r.getMessage()]


@pytest.mark.parametrize("scheme", ["s3", "gs", "gcs"])
def test_credentials_in_an_object_store_url_are_refused_without_them(scheme) -> None:
    from gpu_patching.stores import open_stack

    url = f"{scheme}://AKIAUSER:{PASSWORD}@bucket/image.ome.zarr"
    with pytest.raises(ValueError, match="storage_options") as raised:
        open_stack(url, storage_options={"endpoint_url": "http://127.0.0.1:9"})
    assert PASSWORD not in str(raised.value) and "AKIAUSER" not in str(raised.value)


def test_an_ipv6_host_keeps_its_brackets_in_the_name_an_error_gives() -> None:
    from gpu_patching.stores import open_stack

    with pytest.raises(ValueError, match=re.escape("https://[::1]:9/image.zarr: a store URL")):
        open_stack("https://[::1]:9/image.zarr?X-Amz-Signature=0")


# -- the host crop's pool, used from inside itself ---------------------------------------

NESTED = """
from gpu_patching._row_threads import run_split
seen = []
def inner(start, stop):
    seen.extend(range(start, stop))
def outer(start, stop):
    for _ in range(start, stop):
        run_split(inner, 3, 3)
run_split(outer, 3, 3)
print(sorted(seen) == sorted(list(range(3)) * 3))
"""


def test_a_split_run_inside_a_pool_task_finishes() -> None:
    # In a fresh process the pool has exactly the threads the outer split
    # asked for; nested splits on them waited for tasks queued behind themselves.
    result = subprocess.run(
        [sys.executable, "-c", NESTED], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.stdout.strip() == "True", result.stderr


def test_credentials_both_in_an_http_url_and_its_options_are_refused_without_them() -> None:
    from gpu_patching.stores import open_stack

    url = f"https://reader:{PASSWORD}@127.0.0.1:9/image.zarr"
    with pytest.raises(ValueError, match="both in the URL and in storage_options") as raised:
        open_stack(url, storage_options={"headers": {"authorization": "Bearer other-token"}})
    assert PASSWORD not in str(raised.value) and "other-token" not in str(raised.value)
