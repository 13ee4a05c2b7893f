"""gpu-patching: a GPU-resident stratified patch sampler for microscopy training.

The public names:

* :class:`StratifiedPatching`, a drop-in replacement for CAREamics'
  stratified patching strategy, on a NumPy or a CUDA backend
  (:class:`SmallSampleWarning` names samples smaller than the patch);
* :class:`PatchBatch`, patches as parallel arrays (an epoch, or a slice);
  :class:`PatchSpecs`, the dictionary that names one patch;
* :func:`extract_patches`, patches cut out of host or device stacks, and
  :class:`PatchLoader`, an epoch of cropped batches ready to train on;
* :func:`region_statistics` and :func:`filter_map` (:mod:`gpu_patching.stats`):
  per-region statistics computed in one pass; :func:`filter_background` and
  :func:`validation_split` (:mod:`gpu_patching.policies`): background
  filtering and validation splits that change a sampler.

PyTorch glue (samplers, datasets, DDP) lives in :mod:`gpu_patching.torch`;
CAREamics' training datasets built with our sampler in :mod:`gpu_patching.careamics`.
"""

from .backends import BackendUnavailableError
from .crop import extract_patches
from .loader import PatchLoader
from .policies import FilterResult, filter_background, validation_split
from .specs import PatchBatch, PatchSpecs
from .stats import filter_map, region_statistics
from .stores import ChunkedStack, StoreError, open_stack
from .strategy import SmallSampleWarning, StratifiedPatching

__all__ = [
    "BackendUnavailableError",
    "ChunkedStack",
    "FilterResult",
    "PatchBatch",
    "PatchLoader",
    "PatchSpecs",
    "SmallSampleWarning",
    "StoreError",
    "StratifiedPatching",
    "__version__",
    "extract_patches",
    "filter_background",
    "filter_map",
    "open_stack",
    "region_statistics",
    "validation_split",
]

__version__ = "0.1.0"
