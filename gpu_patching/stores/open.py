"""Opening stores and files: the one place that opens a path.

:func:`open_stack` opens a zarr array, an OME-Zarr image or a TIFF as a
:class:`~gpu_patching.stores.ChunkedStack` (metadata only);
:func:`open_file` and :func:`read_file` (from :mod:`.files`, re-exported)
open the files the command reads whole (``.npy``, ``.zarr``, ``.tif``) for
:mod:`gpu_patching.io`. Errors name
the file they are about.
"""

from __future__ import annotations

import base64
import functools
import re
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

from .. import _validation as check
from ..arrays import is_zarr_array, is_zarr_object
from ._loop import run
from .axes import as_sample_axes
from .files import SUPPORTED_SUFFIXES, open_file, read_file, read_file_shape
from .stack import ChunkedStack, StoreError, store_url

__all__ = [
    "REMOTE_RETRIES",
    "S3_DEFAULT_OPTIONS",
    "SUPPORTED_SUFFIXES",
    "is_url",
    "ome_zarr_axes",
    "open_file",
    "open_stack",
    "read_file",
    "read_file_shape",
]

# OME-Zarr axis names, or else types, to our letters (time points are samples: T).
_OME_AXES = {"t": "T", "c": "C", "z": "Z", "y": "Y", "x": "X"}
_OME_AXIS_TYPES = {"time": "T", "channel": "C"}
#: How to install what chunked stores need (zarr-python 3 and tifffile's zarr 3 stores).
_STORES_EXTRA = "pip install 'gpu-patching[stores]'"
# tifffile's zarr store speaks zarr-python 3 from this release on.
_TIFFFILE_MIN = (2025, 5, 21)
#: URL schemes of the remote stores :func:`open_stack` reads (through fsspec).
_URL_SCHEMES = ("s3", "gs", "gcs", "http", "https")
#: How to install what remote stores need (fsspec and its S3, GCS and HTTP file systems).
_REMOTE_EXTRA = "pip install 'gpu-patching[remote]'"
#: Times a failed chunk read of a remote store is tried again (see ChunkedStack).
REMOTE_RETRIES = 3
#: storage_options an ``s3://`` URL gets unless they are given. s3fs asks for an
#: object's size (a HEAD request) before every whole-object read while
#: ``max_concurrency`` is above 1 (its default 10), to split objects over its
#: block size (50 MiB) into concurrent ranged reads; a chunk is read whole, and
#: the reader keeps many chunk reads in flight, so one GET each is the right
#: request (docs/design.md, "Remote stores").
S3_DEFAULT_OPTIONS: Mapping[str, Any] = MappingProxyType({"max_concurrency": 1})
# Keys of storage_options whose values are credentials: never in an error.
_SECRET_KEY = re.compile(r"key|secret|token|password|credential|session|auth", re.IGNORECASE)


def open_stack(
    source: Any,
    axes: str | None = None,
    *,
    level: int = 0,
    storage_options: dict[str, Any] | None = None,
) -> ChunkedStack:
    """Open a chunked store as an ``SC(Z)YX`` stack, reading only metadata.

    Parameters
    ----------
    source : str, pathlib.Path, zarr.Array or zarr.Group
        A zarr store (``.zarr`` folder, format 2 or 3), an OME-Zarr image
        (a group with ``multiscales`` metadata, version 0.4 or 0.5), a
        ``.tif``/``.tiff`` file (read through tifffile's zarr store: tiles or
        strips are its chunks), an opened zarr array or group, or the URL of
        a zarr store or OME-Zarr image in object storage (``s3://``,
        ``gs://``, ``https://``; read through fsspec, chunk reads retried
        :data:`REMOTE_RETRIES` times).
    axes : str, optional
        The stored array's axes (see :class:`ChunkedStack`). OME-Zarr images
        default to their own axes (``t`` is read as samples ``S``).
    level : int, default 0
        The multiscale level of an OME-Zarr image or a pyramidal TIFF (0 is
        full resolution); other stores have only level 0.
    storage_options : dict, optional
        For a URL: the options of its fsspec file system, as pandas, dask and
        xarray take them (e.g. ``{"anon": True}``, ``{"profile": "lab"}``,
        ``{"endpoint_url": "https://s3.example.org"}``, or ``key``/``secret``).
        Without them credentials come from the usual places (environment,
        profile, instance metadata). They never appear in an error. An
        ``s3://`` URL gets :data:`S3_DEFAULT_OPTIONS` where they do not set
        those keys (one GET per chunk, no size request before it).

    Returns
    -------
    ChunkedStack
        The stack; ``stack.shape`` is what a sampler's ``data_shapes`` takes.

    Raises
    ------
    FileNotFoundError
        If the path (or the URL) does not exist.
    ValueError
        If the group is not a multiscale image or its metadata is malformed
        (the error names the field), the level does not exist, the axes do
        not fit the array, or a URL has a query (``?...``, e.g. a presigned
        URL's signature: the error names the URL without it) or a fragment
        (``#...``), or an ``s3://``/``gs://`` URL carries credentials
        (``user:password@``; give them in ``storage_options``). The user part
        of an ``https://`` URL is sent as basic auth; the URL's scheme may be
        in any case.
    TypeError
        If ``source`` is of another type, or ``storage_options`` is not a dict.
    StoreError
        If a remote store cannot be read (unreachable, access refused, a
        certificate not trusted): the error names the URL, never the
        credentials.
    ImportError
        If zarr-python 3 (or, for a TIFF, tifffile 2025.5.21 or later; for a
        URL, fsspec and its file system) is not installed:
        ``pip install 'gpu-patching[stores]'`` (``[remote]`` for URLs).
    """
    level = check.as_int(level, "level")
    if level < 0:
        raise ValueError(f"level must be at least 0, got {level}")
    if storage_options is not None:
        if not isinstance(storage_options, dict):
            raise TypeError(f"storage_options must be a dict, got {type(storage_options).__name__}")
        if not is_url(source):
            raise ValueError(
                "storage_options are for URLs (s3://, gs://, https://), "
                f"not for a {type(source).__name__} source"
            )
    if is_url(source):
        url, options = _checked_url(str(source), storage_options)
        return _open_url(url, axes, level, options)
    if isinstance(source, ChunkedStack):
        if axes is not None or level:
            raise ValueError("source is already a ChunkedStack; give axes and level when opening")
        return source
    if isinstance(source, (str, Path)):
        return _open_path(Path(source), axes, level)
    if is_zarr_array(source):
        _check_level(level, 1, store_url(source))
        return ChunkedStack(source, axes)
    if is_zarr_object(source):  # a group
        return _open_group(source, axes, level, store_url(source))
    raise TypeError(
        f"source must be a path, a zarr array or a zarr group, got {type(source).__name__}"
    )


def _check_level(level: int, n_levels: int, name: str) -> None:
    if level >= n_levels:
        raise ValueError(f"{name} has {n_levels} level(s); level {level} does not exist")


def _open_path(path: Path, axes: str | None, level: int) -> ChunkedStack:
    if not path.exists():
        raise FileNotFoundError(f"no such file or folder: {path}")
    zarr = _import_zarr()
    if path.suffix.lower() in (".tif", ".tiff"):
        array, close = _open_tiff(path, level)
        # Each process reads a TIFF through its own file (docs/design.md,
        # "Chunked stores"): the stack opens it again elsewhere with this.
        reopen = functools.partial(_open_tiff, path.absolute(), level)
        try:
            return ChunkedStack(array, axes, name=str(path), reopen=reopen, close=close)
        except BaseException:
            close()
            raise
    opened = zarr.open(str(path), mode="r")
    if not is_zarr_array(opened):
        return _open_group(opened, axes, level, str(path))
    _check_level(level, 1, str(path))
    parent = _ome_parent(path)
    if parent is not None:
        # A level of an OME-Zarr image, named by its path: it has the image's axes.
        group, parent_level = parent
        return _open_group(group, axes, parent_level, str(path.parent))
    return ChunkedStack(opened, axes, name=str(path))


def ome_zarr_axes(path: str | Path) -> str | None:
    """Return the axes an OME-Zarr image declares, or None for anything else.

    Parameters
    ----------
    path : str or pathlib.Path
        An OME-Zarr image (its group, or the array of one of its levels), or
        any other file or folder.

    Returns
    -------
    str or None
        The image's axes as letters (``T``, ``C``, ``Z``, ``Y``, ``X``), or
        None where ``path`` is not an OME-Zarr image or zarr-python 3 is not
        installed.

    Raises
    ------
    ValueError
        If the OME-Zarr metadata is malformed (naming the store and field).
    """
    path = Path(path)
    if not path.is_dir():
        return None
    try:
        zarr = _import_zarr()
        opened = zarr.open(str(path), mode="r")
    except Exception:  # no zarr 3, or not a zarr store: not an OME-Zarr image either
        return None
    if is_zarr_array(opened):
        parent = _ome_parent(path)
        if parent is None:
            return None
        opened, path = parent[0], path.parent
    attributes = dict(opened.attrs)
    if "ome" not in attributes and "multiscales" not in attributes:
        return None
    return _ome_image(attributes, str(path))[1]


def _ome_parent(path: Path) -> tuple[Any, int] | None:
    """Return the OME-Zarr image whose level the array at ``path`` is, and the level."""
    zarr = _import_zarr()
    try:
        group = zarr.open_group(str(path.parent), mode="r")
    except Exception:  # no group above: a plain array
        return None
    attributes = dict(group.attrs)
    if "ome" not in attributes and "multiscales" not in attributes:
        return None
    multiscale, _ = _ome_image(attributes, str(path.parent))
    paths = [dataset.path for dataset in multiscale.datasets]
    return (group, paths.index(path.name)) if path.name in paths else None


def _ome_level(
    attributes: dict[str, Any], axes: str | None, level: int, name: str
) -> tuple[str, str]:
    """Return the array path of level ``level`` of an OME-Zarr image and the axes to read it by."""
    if "ome" not in attributes and "multiscales" not in attributes:
        raise ValueError(
            f"{name} is a zarr group without OME-Zarr 'multiscales' metadata; "
            "open the array inside it instead"
        )
    multiscale, image_axes = _ome_image(attributes, name)
    _check_level(level, len(multiscale.datasets), name)
    if axes is None:
        axes = image_axes
    elif as_sample_axes(axes) != as_sample_axes(image_axes):
        raise ValueError(
            f"{name}: axes {axes.upper()!r} contradict the OME-Zarr metadata's axes "
            f"{image_axes!r}; leave axes out to use the metadata's"
        )
    return multiscale.datasets[level].path, axes


def _open_group(group: Any, axes: str | None, level: int, name: str) -> ChunkedStack:
    """Level ``level`` of an OME-Zarr image (0.4: attrs; 0.5: attrs['ome'])."""
    path, axes = _ome_level(dict(group.attrs), axes, level, name)
    field = f"multiscales[0].datasets[{level}].path"
    try:
        array = group[path]
    except (KeyError, FileNotFoundError) as error:
        raise ValueError(
            f"{name}: OME-Zarr '{field}' is {path!r}, which does not exist in the group"
        ) from error
    if not is_zarr_array(array):
        raise ValueError(f"{name}: OME-Zarr '{field}' is {path!r}, which is not an array")
    return ChunkedStack(array, axes, name=f"{name}/{path}")


def is_url(source: Any) -> bool:
    """Tell a URL of a remote store (``s3://``, ``gs://``, ``https://``) from a path.

    Parameters
    ----------
    source : Any
        What :func:`open_stack` was given.

    Returns
    -------
    bool
        True for a string whose scheme is one of the remote stores'.
    """
    if not isinstance(source, str):
        return False
    scheme, separator, _ = source.partition("://")
    return bool(separator) and scheme.lower() in _URL_SCHEMES


def _checked_url(source: str, storage_options: dict[str, Any] | None) -> tuple[str, dict[str, Any]]:
    """Return a URL as the file systems take it, and its options; refuse what they misread."""
    scheme, _, rest = source.partition("://")
    # Schemes are case-insensitive (RFC 3986); fsspec's registry of them is not.
    url = f"{scheme.lower()}://{rest}"
    # zarr reads each object at the store's URL followed by its key, so a query
    # (a presigned URL's signature) or a fragment would land inside every key.
    if "?" in url:
        raise ValueError(
            f"{public_url(url)}: a store URL cannot carry a query ('?...'); "
            "give credentials in storage_options"
        )
    if "#" in url:
        raise ValueError(
            f"{public_url(url)}: a store URL cannot carry a fragment ('#...'); "
            "name the image or array by its path"
        )
    options = _url_options(url, storage_options)
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url, options
    if parts.scheme not in ("http", "https"):
        raise ValueError(
            f"{public_url(url)}: a {parts.scheme}:// URL cannot carry credentials "
            "('user:password@'); give them in storage_options"
        )
    headers = dict(options.get("headers") or {})
    if "auth" in options or any(str(key).lower() == "authorization" for key in headers):
        raise ValueError(
            f"{public_url(url)}: credentials both in the URL and in storage_options; give them once"
        )
    # Sent as every request's basic auth (what aiohttp makes of a URL's user
    # part), so no URL that fsspec logs or zarr names carries the password.
    user_pass = f"{unquote(parts.username or '')}:{unquote(parts.password or '')}"
    headers["Authorization"] = "Basic " + base64.b64encode(user_pass.encode()).decode("ascii")
    options["headers"] = headers
    return public_url(url), options


def public_url(url: str) -> str:
    """Return a URL as errors may name it: without user, password and query.

    The query of an ``https://`` URL may be a signature (a presigned URL),
    and its user part a password.

    Parameters
    ----------
    url : str
        A store's URL.

    Returns
    -------
    str
        ``scheme://host/path``.
    """
    parts = urlsplit(url)
    # The host as written (an IPv6 host keeps its brackets), without a user part.
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


def _secrets(options: Any) -> list[str]:
    """Every credential in storage_options (values of secret-sounding keys, nested too)."""
    found: list[str] = []
    if isinstance(options, dict):
        for key, value in options.items():
            if isinstance(value, str) and _SECRET_KEY.search(str(key)) and value:
                found.append(value)
            else:
                found.extend(_secrets(value))
    elif isinstance(options, (list, tuple)):
        for value in options:
            found.extend(_secrets(value))
    return found


def _redacted(text: str, *, url: str, options: dict[str, Any]) -> str:
    """Return ``text`` without the credentials of ``url`` and ``options``."""
    parts = urlsplit(url)
    hidden = [parts.password, parts.username, parts.query, *_secrets(options)]
    for secret in sorted((h for h in hidden if h), key=len, reverse=True):
        text = text.replace(secret, "***")
    return text


def _url_options(url: str, options: dict[str, Any] | None) -> dict[str, Any]:
    """Return a copy of a URL's storage_options with its scheme's defaults where not set."""
    scheme = url.partition("://")[0].lower()
    # Only s3fs takes these: fsspec's HTTP file system hands unknown options to
    # aiohttp, which refuses them.
    defaults = S3_DEFAULT_OPTIONS if scheme == "s3" else {}
    return {**defaults, **(options or {})}


def _fsspec_store(url: str, options: dict[str, Any]) -> Any:
    """Build zarr's fsspec store of a URL (read-only), or say which extra installs it."""
    try:
        from zarr.storage import FsspecStore

        return FsspecStore.from_url(url, storage_options=options, read_only=True)
    except ImportError as error:
        raise ImportError(
            f"{public_url(url)} needs fsspec and its file system for this URL "
            f"({error}): {_REMOTE_EXTRA}"
        ) from None


def _open_url(url: str, axes: str | None, level: int, options: dict[str, Any]) -> ChunkedStack:
    """Open a remote zarr array or OME-Zarr image; every request on the read loop."""
    _import_zarr()
    url = url.rstrip("/")
    name = public_url(url)
    node = _remote(url, options, _open_node, url, options)
    path = ""
    if not is_zarr_array(node):
        path, axes = _ome_level(dict(node.attrs), axes, level, name)
    else:
        _check_level(level, 1, name)
        parent_url = url.rsplit("/", 1)[0]
        parent = _remote(url, options, _open_parent, parent_url, options)
        attributes = {} if parent is None else dict(parent.attrs)
        if "ome" in attributes or "multiscales" in attributes:
            # A level of an OME-Zarr image, named by its URL: it has the image's axes.
            multiscale, _ = _ome_image(attributes, public_url(parent_url))
            paths = [dataset.path for dataset in multiscale.datasets]
            leaf = url.rsplit("/", 1)[1]
            if leaf in paths:
                url, name = parent_url, public_url(parent_url)
                path, axes = _ome_level(attributes, axes, paths.index(leaf), name)
    array_url = f"{url}/{path}" if path else url
    array = node if not path else _remote(array_url, options, _open_level, url, path, options)
    reopen = functools.partial(_reopen_url, array_url, options)
    return ChunkedStack(
        array,
        axes,
        name=public_url(array_url),
        reopen=reopen,
        retries=REMOTE_RETRIES,
        redact=functools.partial(_redacted, url=array_url, options=options),
    )


def _remote(url: str, options: dict[str, Any], opener: Any, *args: Any) -> Any:
    """Run ``opener(*args)`` on the read loop; its errors name the URL without credentials."""
    name = public_url(url)
    try:
        return run(opener(*args))
    except FileNotFoundError:
        missing = True
    except OSError as error:
        # A request that failed; before ValueError: aiohttp's refused
        # certificate is both (ssl.CertificateError is a ValueError).
        missing = False
        message = _redacted(f"{type(error).__name__}: {error}", url=url, options=options)
    except (ImportError, ValueError):
        raise
    except Exception as error:
        missing = False
        message = _redacted(f"{type(error).__name__}: {error}", url=url, options=options)
    # Raised outside the handler, with no cause or context: their text (a
    # request, a signed URL) is not ours to show.
    if missing:
        raise FileNotFoundError(f"no zarr array or group at {name}")
    raise StoreError(f"cannot open {name}: {message}", name)


async def _open_node(url: str, options: dict[str, Any]) -> Any:
    import zarr
    from zarr.api.asynchronous import AsyncArray
    from zarr.api.asynchronous import open as open_node

    node = await open_node(store=_fsspec_store(url, options), mode="r")
    return zarr.Array(node) if isinstance(node, AsyncArray) else zarr.Group(node)


async def _open_parent(url: str, options: dict[str, Any]) -> Any:
    import zarr
    from zarr.api.asynchronous import open_group

    try:
        return zarr.Group(await open_group(store=_fsspec_store(url, options), mode="r"))
    except (FileNotFoundError, ValueError):  # no group above: a plain array
        return None


async def _open_level(url: str, path: str, options: dict[str, Any]) -> Any:
    import zarr
    from zarr.api.asynchronous import open_array

    store = _fsspec_store(url, options)
    return zarr.Array(await open_array(store=store, path=path, mode="r"))


async def _open_array_url(url: str, options: dict[str, Any]) -> Any:
    import zarr
    from zarr.api.asynchronous import open_array

    return zarr.Array(await open_array(store=_fsspec_store(url, options), mode="r"))


def _reopen_url(url: str, options: dict[str, Any]) -> tuple[Any, Any]:
    """Open a remote array again in another process (its connections are this process's)."""
    return _remote(url, options, _open_array_url, url, options), _nothing_to_close


def _nothing_to_close() -> None:
    """Close nothing: a remote store keeps no file open."""


def _ome_image(attributes: dict[str, Any], name: str) -> tuple[Any, str]:
    """Validate an image's OME-Zarr metadata; return its first multiscale and its axes letters.

    v0.5 keeps the image under ``ome`` (zarr format 3), v0.4 at the top of
    the attributes (zarr format 2). yaozarrs' models check every field; a
    malformed image is a ``ValueError`` that names the store and the field.
    """
    yaozarrs = _import_yaozarrs()
    from pydantic import ValidationError  # yaozarrs' models are pydantic's

    if "ome" in attributes:
        models, node, prefix = yaozarrs.v05, attributes["ome"], "ome"
    else:
        models, node, prefix = yaozarrs.v04, attributes, ""
    try:
        image = yaozarrs.validate_ome_object(node, models.Image)
    except ValidationError as error:
        raise _metadata_error(error, name, prefix, models) from None
    multiscale = image.multiscales[0]
    letters = []
    for k, axis in enumerate(multiscale.axes):
        letter = _OME_AXES.get(axis.name.lower()) or _OME_AXIS_TYPES.get(str(axis.type))
        if letter is None:
            raise ValueError(
                f"{name}: OME-Zarr 'multiscales[0].axes[{k}]' is {axis.name!r} "
                f"(type {axis.type!r}), which has no SC(Z)YX meaning"
            )
        letters.append(letter)
    return multiscale, "".join(letters)


def _metadata_error(error: Any, name: str, prefix: str, models: Any) -> ValueError:
    """Turn a pydantic error of OME-Zarr metadata into one line naming the store and field."""
    first = error.errors()[0]
    parts = [prefix] if prefix else []
    for item in first["loc"]:
        if isinstance(item, int):
            parts[-1:] = [f"{parts[-1] if parts else ''}[{item}]"]
        else:
            parts.append(str(item))
    field = ".".join(parts) or "attributes"
    message = first["msg"]
    expected = getattr(models, (first.get("ctx") or {}).get("class_name", ""), None)
    if first["type"] == "model_type" and expected is not None:
        required = [k for k, f in expected.model_fields.items() if f.is_required()]
        message += f" (an OME-Zarr {expected.__name__}: {', '.join(required)})"
    if first["type"] != "missing":
        message += f", got {_kind(first['input'])}"
    return ValueError(f"{name}: OME-Zarr metadata '{field}': {message}")


def _kind(value: Any) -> str:
    """Describe a metadata value for an error: its type, and the value when short."""
    if value is None:
        return "nothing"
    text = repr(value)
    return f"{type(value).__name__} {text}" if len(text) <= 40 else type(value).__name__


def _import_yaozarrs() -> Any:
    """Import yaozarrs (the OME-Zarr metadata models), or say which extra installs it."""
    try:
        import yaozarrs
    except ImportError as error:
        raise ImportError(f"OME-Zarr images need yaozarrs: {_STORES_EXTRA}") from error
    return yaozarrs


def _version(text: str) -> tuple[int, ...]:
    """Return the leading numbers of a version string: ``"3.1.6"`` -> ``(3, 1, 6)``."""
    numbers = re.match(r"\d+(\.\d+)*", text)
    return tuple(int(n) for n in numbers.group(0).split(".")) if numbers else ()


def _import_zarr() -> Any:
    """Import zarr-python 3, or say which extra installs it."""
    try:
        import zarr
    except ImportError as error:
        raise ImportError(
            f"chunked stores need zarr-python 3 (Python 3.11 or later): {_STORES_EXTRA}"
        ) from error
    if _version(zarr.__version__)[:1] < (3,):
        raise ImportError(
            f"chunked stores need zarr-python 3, found zarr {zarr.__version__}: {_STORES_EXTRA}"
        )
    return zarr


def _import_tifffile() -> Any:
    """Import a tifffile whose zarr store speaks zarr-python 3, or say which extra installs it."""
    wanted = ".".join(str(n) for n in _TIFFFILE_MIN)
    try:
        import tifffile
    except ImportError as error:
        raise ImportError(
            f"TIFF stacks need tifffile {wanted} or later: {_STORES_EXTRA}"
        ) from error
    if _version(tifffile.__version__) < _TIFFFILE_MIN:
        raise ImportError(
            f"TIFF stacks need tifffile {wanted} or later, found {tifffile.__version__}: "
            f"{_STORES_EXTRA}"
        )
    return tifffile


def _open_tiff(path: Path, level: int) -> tuple[Any, Any]:
    """Open level ``level`` of a TIFF as a zarr array; return it and what closes its file."""
    tifffile = _import_tifffile()
    zarr = _import_zarr()
    tiff = tifffile.TiffFile(path)
    try:
        n_levels = len(tiff.series[0].levels)
        _check_level(level, n_levels, str(path))
        array = zarr.open_array(store=tiff.aszarr(level=level), mode="r")
    except BaseException:
        tiff.close()
        raise
    return array, tiff.close
