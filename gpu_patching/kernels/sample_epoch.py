"""``sample_epoch`` (``sample_epoch.cu``): the per-patch draw of a whole epoch, one thread per row.

Its launcher is :class:`gpu_patching.backends.cuda_backend.CudaBackend`.
"""

from __future__ import annotations

from .descriptor import Kernel

__all__ = ["SAMPLE_EPOCH"]

#: Parameters of ``sample_epoch`` (``kernels/sample_epoch.cu``) in order.
SAMPLE_EPOCH = Kernel(
    file="sample_epoch.cu",
    name="sample_epoch",
    params=(
        ("patch_offset", "const long long*"),
        ("n_patches", "const long long*"),
        ("mass_offset", "const long long*"),
        ("region_offset", "const long long*"),
        ("grid_shape", "const long long*"),
        ("spatial_shape", "const long long*"),
        ("patch_size", "const long long*"),
        ("stack_of_sample", "const long long*"),
        ("sample_in_stack", "const long long*"),
        ("mass_prefix", "const long long*"),
        ("weight", "const long long*"),
        ("subbox_mask", "const unsigned char*"),
        ("n_samples", "long long"),
        ("n_regions", "long long"),
        ("ndim", "int"),
        ("indices", "const long long*"),
        ("first_position", "long long"),
        ("position_step", "long long"),
        ("n_positions", "long long"),
        ("shuffle", "int"),
        ("n_rows", "long long"),
        ("draw_number", "unsigned int"),
        ("seed", "unsigned long long"),
        ("data_idx", "long long*"),
        ("sample_idx", "long long*"),
        ("coords", "long long*"),
        ("patch_index", "long long*"),
    ),
)
