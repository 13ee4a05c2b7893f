"""gpu-patching: a GPU-resident stratified patch sampler for microscopy training.

The public names:

* :class:`StratifiedPatching`, a drop-in replacement for CAREamics'
  stratified patching strategy, on a NumPy or a CUDA backend;
* :class:`PatchBatch`, every patch of an epoch as parallel arrays;
* :class:`PatchSpecs`, the dictionary that names one patch.
"""

from .backends import BackendUnavailableError
from .crop import extract_patches
from .filters import (
    FilterResult,
    filter_background,
    filter_map,
    region_statistics,
    validation_split,
)
from .specs import PatchBatch, PatchSpecs
from .strategy import StratifiedPatching

__all__ = [
    "BackendUnavailableError",
    "FilterResult",
    "PatchBatch",
    "PatchSpecs",
    "StratifiedPatching",
    "__version__",
    "extract_patches",
    "filter_background",
    "filter_map",
    "region_statistics",
    "validation_split",
]

__version__ = "0.1.0"
