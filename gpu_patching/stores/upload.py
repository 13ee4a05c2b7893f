"""Copy a batch assembled on the host to the GPU: :func:`upload_batch`."""

from __future__ import annotations

from typing import Any

from numpy.typing import NDArray

__all__ = ["upload_batch"]


def upload_batch(patches: NDArray[Any], stream: Any = None) -> Any:
    """Copy an assembled batch to the current CUDA device, ordered for the current stream.

    The copy is enqueued on ``stream``; the current stream then waits for it
    through an event, without blocking the host. Uploading the assembled
    batch moves ``len(batch) * C * prod(patch_size)`` elements, while
    uploading the chunks to crop them on the device would move every decoded
    chunk the batch touches (see ``benchmarks/results/stores.md``).

    Parameters
    ----------
    patches : numpy.ndarray
        The batch.
    stream : cupy.cuda.Stream, optional
        The stream of the copy; default: the current stream.

    Returns
    -------
    cupy.ndarray
        The batch on the device.
    """
    import cupy

    current = cupy.cuda.get_current_stream()
    stream = current if stream is None else stream
    with stream:
        device = cupy.asarray(patches)
        done = cupy.cuda.Event(disable_timing=True)
        done.record(stream)
    current.wait_event(done)
    return device
