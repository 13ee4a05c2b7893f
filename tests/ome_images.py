"""OME-Zarr images written by zarr for the store tests: one writer, local or remote."""

from __future__ import annotations

from typing import Any

import numpy as np
import zarr

#: The OME-Zarr axis type of each axis letter.
AXIS_TYPES = {"t": "time", "c": "channel", "z": "space", "y": "space", "x": "space"}


def write_ome(
    target: Any,
    full: np.ndarray,
    axes: str,
    zarr_format: int,
    *,
    levels: int = 2,
    chunk: int = 8,
    storage_options: dict | None = None,
) -> Any:
    """Write an OME-Zarr image to a path or URL: level k halves Y and X ``k`` times.

    Format 2 gets OME-Zarr 0.4 metadata, format 3 0.5; spatial axes are chunked
    by ``chunk``, the others by 1. Returns ``target``.
    """
    group = zarr.open_group(
        str(target), mode="w", zarr_format=zarr_format, storage_options=storage_options
    )
    datasets = []
    for k in range(levels):
        step = tuple(2**k if a in "yx" else 1 for a in axes)
        level = full[tuple(slice(None, None, s) for s in step)]
        chunks = tuple(chunk if a in "zyx" else 1 for a in axes)
        group.create_array(str(k), shape=level.shape, chunks=chunks, dtype=level.dtype)[...] = level
        datasets.append(
            {"path": str(k), "coordinateTransformations": [{"type": "scale", "scale": list(step)}]}
        )
    image = {"axes": [{"name": a, "type": AXIS_TYPES[a]} for a in axes], "datasets": datasets}
    if zarr_format == 2:
        group.attrs["multiscales"] = [{"version": "0.4", **image}]
    else:
        group.attrs["ome"] = {"version": "0.5", "multiscales": [image]}
    return target
