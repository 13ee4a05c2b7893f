"""Axes letters of stored arrays, and the transpose to the sampler's ``SC(Z)YX``.

Used by every reader: ``axes=`` of :func:`~gpu_patching.stores.open_stack`,
the ``--axes`` of the command and the axes of OME-Zarr metadata.
"""

from __future__ import annotations

__all__ = ["KNOWN_AXES", "as_sample_axes", "scyx_shape", "to_scyx_axes"]

#: The axes letters, in the sampler's order.
KNOWN_AXES = "SCZYX"


def as_sample_axes(axes: str) -> str:
    """Return ``axes`` in capitals with a time axis ``T`` read as samples ``S``.

    Time points are samples to the sampler (a time series is a stack of
    independent images). ``T`` and ``S`` together are refused rather than
    flattened: which of them varies faster is not something the letters say.

    Parameters
    ----------
    axes : str
        One letter per array axis.

    Returns
    -------
    str
        The letters, ``T`` replaced by ``S``.

    Raises
    ------
    ValueError
        If ``axes`` has both ``T`` and ``S``.
    """
    if not isinstance(axes, str):
        raise TypeError(f"axes must be a string such as 'SYX', got {axes!r}")
    letters = axes.upper()
    if "T" in letters and "S" in letters:
        raise ValueError(
            f"axes {axes!r} has both T and S; time points are samples: give one of them "
            "(or open each time point's samples as a stack of their own)"
        )
    return letters.replace("T", "S")


def to_scyx_axes(axes: str, ndim: int) -> tuple[list[int], str]:
    """Check an axes string and say how to reach ``SC(Z)YX``.

    Parameters
    ----------
    axes : str
        One letter per array axis, from ``S`` (samples; or ``T``, time
        points, which are samples), ``C`` (channels), ``Z``, ``Y``, ``X``;
        for example ``"YX"``, ``"SYX"``, ``"ZYX"``,
        ``"SCZYX"``. ``Y`` and ``X`` are required.
    ndim : int
        The number of axes of the array.

    Returns
    -------
    order : list of int
        The transpose that puts the present axes in ``SC(Z)YX`` order.
    target : str
        The axes after the transpose, before missing ``S``/``C`` are added.

    Raises
    ------
    ValueError
        If a letter is unknown or repeated, ``Y`` or ``X`` is missing, ``T``
        and ``S`` are both given, or the string does not have one letter per
        axis.
    """
    letters = as_sample_axes(axes)
    unknown = sorted({a for a in letters if a not in KNOWN_AXES})
    if unknown:
        raise ValueError(
            f"axes {axes!r} has unknown letter(s) {''.join(unknown)}; "
            f"use letters from {KNOWN_AXES} (T for S)"
        )
    if len(set(letters)) != len(letters):
        raise ValueError(f"axes {axes!r} repeats a letter")
    if "Y" not in letters or "X" not in letters:
        raise ValueError(f"axes {axes!r} must contain Y and X")
    if len(letters) != ndim:
        raise ValueError(f"axes {axes!r} has {len(letters)} letters but the data has {ndim} axes")
    target = "".join(a for a in KNOWN_AXES if a in letters)
    return [letters.index(a) for a in target], target


def scyx_shape(shape: tuple[int, ...], axes: str) -> tuple[int, ...]:
    """Return the ``SC(Z)YX`` shape of an array of ``shape`` with ``axes``.

    Parameters
    ----------
    shape : tuple of int
        The stored array's shape.
    axes : str
        Its axes (see :func:`to_scyx_axes`).

    Returns
    -------
    tuple of int
        The shape with axes ``SCYX`` or ``SCZYX`` (missing ``S``/``C`` are 1).
    """
    order, target = to_scyx_axes(axes, len(shape))
    sizes = dict(zip(target, (shape[i] for i in order), strict=True))
    spatial = [sizes[a] for a in "ZYX" if a in sizes]
    return (sizes.get("S", 1), sizes.get("C", 1), *spatial)
