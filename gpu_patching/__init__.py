"""gpu-patching: a GPU-resident stratified patch sampler for microscopy training.

:class:`StratifiedPatching` (a drop-in replacement for CAREamics'),
:class:`PatchBatch` and :class:`PatchSpecs` (what it draws),
:func:`extract_patches` and :class:`PatchLoader` (patches cut out, batch by
batch), :func:`region_statistics`, :func:`filter_map`,
:func:`filter_background` and :func:`validation_split` (scores and policies
that change a sampler). PyTorch glue is in :mod:`gpu_patching.torch`,
CAREamics' datasets in :mod:`gpu_patching.careamics`. The module map:
``docs/design.md``, "Module map".
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
