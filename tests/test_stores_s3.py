"""Remote stores: OME-Zarr images read from a real S3 server (moto's, on 127.0.0.1).

Each module run starts moto's S3 server on a free port of 127.0.0.1 (no
internet, no mock of S3 in our process: every read is an HTTP request),
uploads OME-Zarr images written by zarr, and reads them through the public
API and the command.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import subprocess
import sys
import urllib.request

import numpy as np
import pytest

from gpu_patching import PatchLoader, StratifiedPatching, extract_patches
from gpu_patching.cli import main

zarr = pytest.importorskip("zarr", minversion="3")
pytest.importorskip("s3fs")
pytest.importorskip("boto3")
pytest.importorskip("moto.server")

from conftest import sliced_patches  # noqa: E402
from local_servers import S3_KEY as _KEY  # noqa: E402
from local_servers import S3_SECRET as _SECRET  # noqa: E402
from local_servers import s3_options as _options  # noqa: E402
from local_servers import start_s3_server as _start_server  # noqa: E402
from ome_images import write_ome  # noqa: E402

from gpu_patching.stores import StoreError, open_stack  # noqa: E402

#: name -> (metadata axes, shape, zarr format, the pixels as SC(Z)YX)
IMAGES = {
    "2d-v04": ("cyx", (2, 96, 80), 2, lambda a: a[None]),
    "3d-v05": ("zyx", (24, 64, 48), 3, lambda a: a[None, None]),
    "2d-v05": ("tyx", (3, 64, 72), 3, lambda a: a[:, None]),
    "3d-v04": ("tczyx", (2, 1, 20, 48, 40), 2, lambda a: a),
}


@pytest.fixture(scope="module")
def s3():
    """A bucket on a running S3 server, with every image of IMAGES uploaded."""
    server, endpoint = _start_server()
    import s3fs

    s3fs.S3FileSystem(**_options(endpoint)).mkdir("images")
    pixels = {}
    for k, (name, (axes, shape, zarr_format, to_scyx)) in enumerate(IMAGES.items()):
        full = np.random.default_rng(k).integers(0, 60000, shape, dtype=np.uint16)
        write_ome(
            f"s3://images/{name}.ome.zarr",
            full,
            axes,
            zarr_format,
            chunk=16,
            storage_options=_options(endpoint),
        )
        pixels[name] = to_scyx(full)
    yield endpoint, pixels
    server.stop()


@pytest.mark.parametrize("name", list(IMAGES))
def test_every_patch_of_a_shuffled_epoch_from_s3_equals_slicing_the_image(s3, name):
    endpoint, pixels = s3
    stack = open_stack(f"s3://images/{name}.ome.zarr", storage_options=_options(endpoint))
    assert stack.shape == pixels[name].shape
    patch = (16, 16) if stack.ndim == 4 else (8, 16, 16)
    strategy = StratifiedPatching([stack.shape], patch, seed=3)
    loader = PatchLoader([stack], strategy, batch_size=8, shuffle=True)
    seen = 0
    for patches, batch in loader:
        np.testing.assert_array_equal(patches, sliced_patches(pixels[name], batch))
        seen += len(batch)
    assert seen == strategy.n_patches


def test_a_level_opened_by_its_url_has_the_image_axes_and_its_pixels(s3):
    endpoint, pixels = s3
    stack = open_stack("s3://images/2d-v04.ome.zarr/1", storage_options=_options(endpoint))
    level = pixels["2d-v04"][:, :, ::2, ::2]
    assert stack.shape == level.shape
    assert stack.name == "s3://images/2d-v04.ome.zarr/1"
    rows = StratifiedPatching([stack.shape], (8, 8), seed=0).sample_epoch(0)
    np.testing.assert_array_equal(extract_patches([stack], rows), sliced_patches(level, rows))


def test_indexing_a_remote_stack_reads_the_selection(s3):
    endpoint, pixels = s3
    stack = open_stack("s3://images/3d-v05.ome.zarr", storage_options=_options(endpoint))
    np.testing.assert_array_equal(stack[0, 0, 3:9], pixels["3d-v05"][0, 0, 3:9])


def test_the_command_samples_an_s3_image_with_the_endpoint_from_the_environment(
    s3, tmp_path, monkeypatch
):
    endpoint, pixels = s3
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", _KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", _SECRET)
    output = tmp_path / "epoch.csv"
    code = main(
        [
            "sample",
            "s3://images/3d-v05.ome.zarr",
            "--patch",
            "8",
            "16",
            "16",
            "--seed",
            "0",
            "-o",
            str(output),
        ]
    )
    assert code == 0
    table = np.loadtxt(output, delimiter=",", skiprows=1, dtype=np.int64)
    expected = StratifiedPatching([pixels["3d-v05"].shape], (8, 16, 16), seed=0).sample_epoch(0)
    np.testing.assert_array_equal(table[:, 3:], expected.coords)


def test_the_command_takes_storage_options(s3, tmp_path):
    endpoint, _ = s3
    output = tmp_path / "epoch.csv"
    options = [f"--storage-option={k}={v}" for k, v in _options(endpoint).items()]
    code = main(["sample", "s3://images/2d-v05.ome.zarr", *options, "--patch", "16", "16",
                 "-o", str(output)])  # fmt: skip
    assert code == 0
    table = np.loadtxt(output, delimiter=",", skiprows=1, dtype=np.int64)
    assert set(table[:, 2]) == {0, 1, 2}  # the three time points are the samples


def test_a_numeric_storage_option_reaches_the_file_system_as_a_number(s3, tmp_path):
    # s3fs compares max_concurrency with an int: as the string "4" the read fails.
    endpoint, _ = s3
    output = tmp_path / "epoch.csv"
    options = [f"--storage-option={k}={v}" for k, v in _options(endpoint).items()]
    code = main(["sample", "s3://images/2d-v05.ome.zarr", *options,
                 "--storage-option", "max_concurrency=4", "--patch", "16", "16",
                 "-o", str(output)])  # fmt: skip
    assert code == 0
    assert output.exists()


def test_a_credential_made_of_digits_stays_a_string(s3, tmp_path):
    # A key or secret of digits must reach s3fs unchanged (as text), not as a number.
    endpoint, _ = s3
    output = tmp_path / "epoch.csv"
    options = [f"--storage-option=endpoint_url={endpoint}", "--storage-option=key=123456",
               "--storage-option=secret=987654"]  # fmt: skip
    code = main(["sample", "s3://images/2d-v05.ome.zarr", *options, "--patch", "16", "16",
                 "-o", str(output)])  # fmt: skip
    # moto accepts any credentials unless its authentication is switched on: the
    # read succeeds only if botocore got strings (a number there is a TypeError).
    assert code == 0


def test_a_missing_image_is_a_file_not_found_error_naming_the_url(s3):
    endpoint, _ = s3
    with pytest.raises(FileNotFoundError, match=r"s3://images/absent\.ome\.zarr"):
        open_stack("s3://images/absent.ome.zarr", storage_options=_options(endpoint))


def test_storage_options_for_a_local_path_are_refused(tmp_path):
    with pytest.raises(ValueError, match="storage_options are for URLs"):
        open_stack(tmp_path / "x.zarr", storage_options={"anon": True})


def test_storage_options_that_are_not_a_dict_are_refused():
    with pytest.raises(TypeError, match="storage_options must be a dict, got list"):
        open_stack("s3://images/x.zarr", storage_options=[("anon", True)])


def test_a_server_stopped_mid_epoch_raises_store_error_naming_url_and_chunk():
    server, endpoint = _start_server()
    import s3fs

    s3fs.S3FileSystem(**_options(endpoint)).mkdir("gone")
    full = np.random.default_rng(5).integers(0, 60000, (128, 96), dtype=np.uint16)
    write_ome(
        "s3://gone/image.ome.zarr", full, "yx", 3, chunk=16, storage_options=_options(endpoint)
    )
    stack = open_stack("s3://gone/image.ome.zarr", storage_options=_options(endpoint))
    strategy = StratifiedPatching([stack.shape], (16, 16), seed=1)
    loader = PatchLoader([stack], strategy, batch_size=4, shuffle=True, cache_bytes=0)
    handed_over = []
    with pytest.raises(StoreError) as caught:
        for k, (patches, batch) in enumerate(loader):
            np.testing.assert_array_equal(patches, sliced_patches(full[None, None], batch))
            handed_over.append(len(batch))
            if k == 1:
                server.stop()
    assert 2 <= len(handed_over) < -(-strategy.n_patches // 4)
    assert set(handed_over) == {4}  # every batch handed over was whole
    assert "s3://gone/image.ome.zarr/0" in str(caught.value)
    assert caught.value.chunk is not None and f"chunk {caught.value.chunk}" in str(caught.value)


class _RequestLog(logging.Handler):
    """The requests moto's server answers, as ``(method, path)``, from its own log lines.

    werkzeug logs each request as it sends the response's status line, so a
    request is in the log before the client has its answer.
    """

    # A 404's line is coloured: the method comes after an escape sequence.
    _LINE = re.compile(r"\b(GET|HEAD|PUT|POST|DELETE) (/\S*) HTTP/")

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.requests: list[tuple[str, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        found = self._LINE.search(record.getMessage())
        if found:
            self.requests.append((found.group(1), found.group(2)))


@contextlib.contextmanager
def _server_requests():
    """Collect the requests every in-process moto server answers meanwhile."""
    logger = logging.getLogger("werkzeug")
    handler, level = _RequestLog(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield handler.requests
    finally:
        logger.setLevel(level)
        logger.removeHandler(handler)


def _chunk_order_epoch(stack) -> int:
    """Read one chunk-order epoch of (8, 16, 16) patches; return the patches handed over."""
    strategy = StratifiedPatching([stack.shape], (8, 16, 16), seed=2)
    # A cache that holds the whole image: each chunk is read once.
    loader = PatchLoader([stack], strategy, batch_size=8, order="chunks", cache_bytes=1 << 26)
    return sum(len(batch) for _, batch in loader)


def test_an_s3_epoch_gets_each_chunk_once_and_never_asks_an_objects_size_first(s3):
    # s3fs's _cat_file asks for an object's size (a HEAD request) before a
    # whole-object read whenever max_concurrency is above 1, its default.
    endpoint, _ = s3
    stack = open_stack("s3://images/3d-v05.ome.zarr", storage_options=_options(endpoint))
    with _server_requests() as requests:
        assert _chunk_order_epoch(stack) > 0
    # The chunks' requests (the loader also checks the array's metadata).
    chunks = [(m, p) for m, p in requests if p.startswith("/images/3d-v05.ome.zarr/0/c/")]
    assert [method for method, _ in chunks if method != "GET"] == []
    assert len(chunks) == len(set(chunks)) == np.prod(stack.chunk_grid)  # 2 x 4 x 3 chunks


def test_an_s3_max_concurrency_the_user_sets_is_kept(s3):
    endpoint, _ = s3
    options = {**_options(endpoint), "max_concurrency": 4}
    stack = open_stack("s3://images/3d-v05.ome.zarr", storage_options=options)
    with _server_requests() as requests:
        _chunk_order_epoch(stack)
    heads = [p for m, p in requests if m == "HEAD" and p.startswith("/images/3d-v05.ome.zarr/0/c/")]
    assert len(heads) == np.prod(stack.chunk_grid)  # s3fs's size request, as asked


def test_an_http_url_reads_the_image_without_s3_options(s3):
    # moto serves a public object over plain HTTP too: fsspec's HTTP file
    # system would refuse an S3 option (aiohttp takes no max_concurrency).
    endpoint, _ = s3
    public = {**_options(endpoint), "s3_additional_kwargs": {"ACL": "public-read"}}
    full = np.random.default_rng(9).integers(0, 60000, (20, 32, 48), dtype=np.uint16)
    write_ome("s3://images/public.ome.zarr", full, "zyx", 3, chunk=16, storage_options=public)
    stack = open_stack(f"{endpoint}/images/public.ome.zarr")
    assert stack.shape == (1, 1, *full.shape)
    np.testing.assert_array_equal(stack[0, 0, 3:9], full[3:9])


def _post(url: str, body: bytes) -> None:
    # Not a form: moto reads the raw body.
    headers = {"Content-Type": "text/plain"}
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    urllib.request.urlopen(request, timeout=10).close()


def test_a_wrong_secret_gives_a_clear_error_without_the_secret():
    import boto3

    server, endpoint = _start_server()
    try:
        iam = boto3.client("iam", endpoint_url=endpoint, region_name="us-east-1",
                           aws_access_key_id=_KEY, aws_secret_access_key=_SECRET)  # fmt: skip
        iam.create_user(UserName="trainer")
        allow = {"Effect": "Allow", "Action": "s3:*", "Resource": "*"}
        policy = {"Version": "2012-10-17", "Statement": [allow]}
        iam.put_user_policy(UserName="trainer", PolicyName="s3", PolicyDocument=json.dumps(policy))
        key = iam.create_access_key(UserName="trainer")["AccessKey"]
        good = _options(endpoint, key["AccessKeyId"], key["SecretAccessKey"])
        import s3fs

        s3fs.S3FileSystem(**good).mkdir("private")
        full = np.zeros((32, 32), dtype=np.uint16)
        write_ome("s3://private/image.ome.zarr", full, "yx", 3, chunk=16, storage_options=good)
        _post(f"{endpoint}/moto-api/reset-auth", b"0")  # every request signed from now on
        assert open_stack("s3://private/image.ome.zarr", storage_options=good).shape[-2:] == (
            32,
            32,
        )
        wrong_secret = "wrong-" + key["SecretAccessKey"][6:]
        bad = _options(endpoint, key["AccessKeyId"], wrong_secret)
        with pytest.raises(StoreError) as caught:
            open_stack("s3://private/image.ome.zarr", storage_options=bad)
    finally:
        _post(f"{endpoint}/moto-api/reset-auth", b"inf")  # moto's setting is per process
        server.stop()
    texts = []
    error: BaseException | None = caught.value
    while error is not None:
        texts.append(f"{error!s} {error!r}")
        error = error.__cause__ or error.__context__
    assert "s3://private/image.ome.zarr" in texts[0]
    for text in texts:
        assert wrong_secret not in text and key["SecretAccessKey"] not in text
        assert key["AccessKeyId"] not in text


def _readme_example() -> str:
    from pathlib import Path

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    # A ```py block: test_readme.py runs ```python blocks only (this one needs a server).
    blocks = [b for b in re.findall(r"```py\n(.*?)```", readme, flags=re.DOTALL) if "s3://" in b]
    assert len(blocks) == 1, "the README has one example of training from S3"
    return blocks[0]


def test_the_readme_example_trains_from_an_s3_image(tmp_path):
    server, endpoint = _start_server()
    try:
        import s3fs

        s3fs.S3FileSystem(**_options(endpoint)).mkdir("my-bucket")
        full = np.random.default_rng(7).integers(0, 60000, (160, 192), dtype=np.uint16)
        write_ome(
            "s3://my-bucket/cells.ome.zarr",
            full,
            "yx",
            3,
            chunk=16,
            storage_options=_options(endpoint),
        )
        # The endpoint and credentials from the environment, as the example says.
        environment = {**os.environ, "AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": _KEY,
                       "AWS_SECRET_ACCESS_KEY": _SECRET}  # fmt: skip
        result = subprocess.run(
            [sys.executable, "-c", _readme_example()],
            capture_output=True,
            text=True,
            cwd=tmp_path,
            env=environment,
            timeout=120,
            check=False,
        )
    finally:
        server.stop()
    assert result.returncode == 0, result.stderr
    assert "s3://my-bucket/cells.ome.zarr/0 (1, 1, 160, 192)" in result.stdout
