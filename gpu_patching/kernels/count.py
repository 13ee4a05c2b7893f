"""``subtract_in_order`` (``count.cu``): the patch count's in-order float fold.

Its launcher is :func:`gpu_patching.grid.patch_budget`'s device branch;
:func:`subtract_in_order_args` builds the argument tuple over NumPy or CuPy
arrays, so the tests run it without a GPU.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .descriptor import Kernel, check_launch_array

__all__ = ["SUBTRACT_IN_ORDER", "subtract_in_order_args"]

#: ``subtract_in_order`` of ``kernels/count.cu``.
SUBTRACT_IN_ORDER = Kernel.from_source("count.cu", "subtract_in_order")


def subtract_in_order_args(terms: Any, total: Any) -> tuple[Any, ...]:
    """Build the argument tuple of ``subtract_in_order`` (:data:`SUBTRACT_IN_ORDER`).

    The kernel trusts the lengths of its arrays, so they are checked here.

    Parameters
    ----------
    terms : array of float64, shape (n_rows, n_terms)
        C-contiguous; row ``r`` holds the terms subtracted from ``total[r]``,
        in order.
    total : array of float64, shape (n_rows,)
        C-contiguous; the start of every row before the launch, the result after.

    Returns
    -------
    tuple
        The arguments of ``subtract_in_order``.

    Raises
    ------
    ValueError
        If ``terms`` is not two-dimensional, or an array is not C-contiguous
        or has another number of values than the rows need.
    TypeError
        If an array is not float64.
    """
    if terms.ndim != 2:
        raise ValueError(f"terms must have shape (n_rows, n_terms), got shape {terms.shape}")
    n_rows, n_terms = (int(size) for size in terms.shape)
    check_launch_array("terms", terms, n_rows * n_terms, np.float64)
    check_launch_array("total", total, n_rows, np.float64)
    return SUBTRACT_IN_ORDER.arguments(
        {"terms": terms, "n_rows": n_rows, "n_terms": n_terms, "total": total}
    )
