"""The CUDA kernels: each ``.cu`` source beside the Python that describes it.

:mod:`.descriptor` holds the :class:`~.descriptor.Kernel` type;
:mod:`.sample_epoch`, :mod:`.crop_patches` and :mod:`.count` each kernel's
descriptor (and for the crop and the count, their arguments; for the crop, its
launch configuration). :data:`KERNELS` lists
every kernel we ship.
"""

from __future__ import annotations

from .count import SUBTRACT_IN_ORDER
from .crop_patches import CHECK_CROP_ROWS, ELEMENT_C_TYPES, crop_kernel
from .descriptor import Kernel
from .sample_epoch import SAMPLE_EPOCH

__all__ = ["KERNELS"]

#: Every kernel we ship; a test checks that these are exactly the
#: ``__global__`` functions (and template instantiations) of the ``.cu`` files.
KERNELS: tuple[Kernel, ...] = (
    SAMPLE_EPOCH,
    *(crop_kernel(size) for size in sorted(ELEMENT_C_TYPES)),
    CHECK_CROP_ROWS,
    SUBTRACT_IN_ORDER,
)
