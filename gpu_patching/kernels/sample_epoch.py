"""``sample_epoch`` (``sample_epoch.cu``): the per-patch draw of a whole epoch, one thread per row.

Its launcher is :class:`gpu_patching.backends.cuda_backend.CudaBackend`.
"""

from __future__ import annotations

from .descriptor import Kernel

__all__ = ["SAMPLE_EPOCH"]

#: ``sample_epoch`` of ``kernels/sample_epoch.cu``.
SAMPLE_EPOCH = Kernel.from_source("sample_epoch.cu", "sample_epoch")
