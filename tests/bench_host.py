"""A host stand-in for the few CuPy calls the benchmark scripts make.

The benchmark tests run the scripts' measurement code on the host and feed its
real results to the report code. What the scripts use of CuPy is small:
events and streams (here ``perf_counter`` and no-ops), the memory pools, a few
array constructors (NumPy arrays whose ``data`` has CuPy's ``ptr`` and
``copy_from_device_async``), the two elementwise kernels of the bandwidth
measurement and the device's properties.
"""

from __future__ import annotations

import time
from types import SimpleNamespace
from typing import Any

import numpy as np


class HostEvent:
    """A CUDA event that reads ``perf_counter`` when recorded."""

    def record(self, stream: Any = None) -> None:
        self.at = time.perf_counter()

    def synchronize(self) -> None:
        return None


class HostArray(np.ndarray):
    """A NumPy array whose ``data`` looks like a CuPy MemoryPointer."""

    @property
    def data(self) -> Any:  # type: ignore[override]
        array = self

        def copy_from_device_async(source: Any, nbytes: int, stream: Any = None) -> None:
            target = array.reshape(-1).view(np.uint8)
            target[:nbytes] = source.array.reshape(-1).view(np.uint8)[:nbytes]

        return SimpleNamespace(
            array=self, ptr=int(self.ctypes.data), copy_from_device_async=copy_from_device_async
        )


class HostElementwiseKernel:
    """The bandwidth kernels: ``y = x`` and ``y = v`` both assign their input to the output."""

    def __init__(self, inputs: str, outputs: str, operation: str, name: str) -> None:
        if operation not in ("y = x", "y = v"):
            raise ValueError(f"the host stand-in has no kernel {operation!r}")

    def __call__(self, value: Any, out: Any) -> None:
        out[...] = value


def host_cupy() -> Any:
    """What the benchmark scripts use of CuPy, on the host."""
    pool = SimpleNamespace(free_all_blocks=lambda: None)
    stream = SimpleNamespace(synchronize=lambda: None)
    properties = {"name": b"Host stand-in", "multiProcessorCount": 2, "totalGlobalMem": 1 << 34}

    def asarray(value: Any, dtype: Any = None) -> HostArray:
        return np.ascontiguousarray(value, dtype=dtype).view(HostArray)

    return SimpleNamespace(
        __version__="host",
        ndarray=np.ndarray,
        uint64=np.uint64,
        int64=np.int64,
        float32=np.float32,
        asarray=asarray,
        array_equal=np.array_equal,
        arange=lambda *args, **kwargs: np.arange(*args, **kwargs).view(HostArray),
        empty=lambda shape, dtype: np.empty(shape, dtype).view(HostArray),
        ones=lambda n, dtype: np.ones(n, dtype).view(HostArray),
        zeros=lambda n, dtype: np.zeros(n, dtype).view(HostArray),
        ElementwiseKernel=HostElementwiseKernel,
        cuda=SimpleNamespace(
            Event=HostEvent,
            Device=lambda: SimpleNamespace(id=0, synchronize=lambda: None),
            get_current_stream=lambda: stream,
            get_elapsed_time=lambda start, end: (end.at - start.at) * 1e3,
            runtime=SimpleNamespace(
                memGetInfo=lambda: (1 << 34, 1 << 34),
                getDeviceProperties=lambda device: properties,
                runtimeGetVersion=lambda: 13000,
                driverGetVersion=lambda: 13000,
            ),
            memory=SimpleNamespace(OutOfMemoryError=MemoryError),
        ),
        get_default_memory_pool=lambda: pool,
        get_default_pinned_memory_pool=lambda: pool,
    )
