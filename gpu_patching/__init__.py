"""gpu-patching: a GPU-resident stratified patch sampler for microscopy training.

The public names:

* :class:`StratifiedPatching`, a drop-in replacement for CAREamics'
  stratified patching strategy, on a NumPy or a CUDA backend;
* :class:`PatchBatch`, every patch of an epoch as parallel arrays;
* :class:`PatchSpecs`, the dictionary that names one patch.
"""

from .backends import BackendUnavailableError
from .specs import PatchBatch, PatchSpecs
from .strategy import StratifiedPatching

__all__ = [
    "BackendUnavailableError",
    "PatchBatch",
    "PatchSpecs",
    "StratifiedPatching",
    "__version__",
]

__version__ = "0.1.0"
