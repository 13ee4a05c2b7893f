"""Build CAREamics' training datasets with our sampler in place of CAREamics' (optional).

CAREamics (``careamics>=0.3.5``) trains from a ``CareamicsDataset`` whose item
``i`` asks its patching strategy for ``get_patch_spec(i)``. Its dataset factory
builds the strategy from the ``DataConfig`` and then, inside the dataset's
constructor, runs a normalisation pass that asks for every patch once. Putting
our :class:`~gpu_patching.StratifiedPatching` in after the factory has run is
too late: that pass (the most expensive part of the build) has gone through
CAREamics' sampler. The functions here build the same datasets with ours from
the start, from the same arguments as CAREamics' factory functions::

    from careamics.config import create_n2v_config
    from careamics.dataset.factory import TrainValSplitData
    from gpu_patching.careamics import create_val_split_datasets

    config = create_n2v_config(...)  # stratified patching is CAREamics' default
    train, val = create_val_split_datasets(
        config.data_config, TrainValSplitData(train_data=[image], n_val_patches=8),
        loading=None, rng=np.random.default_rng(0),
    )

Everything else is CAREamics' own: the image-stack loaders and patch
extractors, the background filters of ``patch_filter`` and ``mask_filter``
(which run on our sampler through the views of :mod:`gpu_patching.views`),
``create_val_split`` for the validation patches, the patch constructor, the
normalisation and the augmentations. The datasets are ``CareamicsDataset``
objects that CAREamics' data module and ``torch.utils.data.DataLoader`` take
as they are.

CAREamics and its dependencies (PyTorch, pydantic, ...) are not dependencies
of gpu-patching; this module imports them when a function is called.
"""

from __future__ import annotations

import importlib
from typing import Any

import numpy as np

from .strategy import StratifiedPatching

__all__ = [
    "create_stratified_patching",
    "create_train_dataset",
    "create_train_val_datasets",
    "create_val_split_datasets",
]


def _module(name: str) -> Any:
    """Import a CAREamics module, or say how to install CAREamics."""
    try:
        return importlib.import_module(name)
    except ImportError as error:
        raise ImportError(
            f"gpu_patching.careamics needs CAREamics and its dependencies ({name} cannot be "
            f"imported: {error}); install them with 'pip install careamics'"
        ) from error


def _check_training_config(config: Any) -> None:
    """Refuse a configuration that is not for stratified training, before any loading."""
    data_config_type = _module("careamics.config.data.data_config").DataConfig
    if not isinstance(config, data_config_type):
        raise TypeError(
            f"config must be a CAREamics DataConfig (e.g. Configuration.data_config), "
            f"got {type(config).__name__}"
        )
    if config.mode != "training":
        raise ValueError(
            f"config.mode is {config.mode!r}: training datasets need a DataConfig with "
            f"mode='training'"
        )
    if config.patching.name != "stratified":
        raise ValueError(
            f"config.patching.name is {config.patching.name!r}: gpu-patching replaces "
            f"CAREamics' stratified patching, so the configuration must use "
            f"patching='stratified'"
        )


def create_stratified_patching(
    config: Any, data_shapes: Any, *, backend: str = "auto"
) -> StratifiedPatching:
    """Return our sampler for a CAREamics ``DataConfig`` with stratified patching.

    Parameters
    ----------
    config : careamics.config.DataConfig
        A configuration whose ``patching`` is stratified: its ``patch_size``
        and ``seed`` (None draws one, available as the sampler's ``seed``) are
        used.
    data_shapes : sequence of (sequence of int)
        The ``SC(Z)YX`` shapes of the image stacks (a patch extractor's
        ``shapes``).
    backend : {"auto", "cuda", "numpy"}, default "auto"
        Where the sampler's tables live and its draws run.

    Returns
    -------
    StratifiedPatching
        The sampler, with nothing excluded.

    Raises
    ------
    ValueError
        If the configuration's patching is not stratified.
    """
    if config.patching.name != "stratified":
        raise ValueError(f"config.patching.name is {config.patching.name!r}, expected 'stratified'")
    patching = config.patching
    return StratifiedPatching(
        [tuple(shape) for shape in data_shapes],
        tuple(patching.patch_size),
        seed=patching.seed,
        backend=backend,
    )


def _extractor(config: Any, loading: Any, source: Any, axes: str) -> Any:
    """Load ``source`` into the patch extractor CAREamics would use for this configuration."""
    factory = _module("careamics.dataset.factory")
    data_type = _module("careamics.config.support").SupportedData(config.data_type)
    loader = factory.select_image_stack_loader(
        data_type=data_type, in_memory=config.in_memory, loading=loading
    )
    extractor_type = factory.select_patch_extractor_type(
        data_type=data_type, in_memory=config.in_memory
    )
    return factory.init_patch_extractor(extractor_type, loader, source, axes)


def _dataset(config: Any, patching: Any, inputs: Any, targets: Any, constraints: Any) -> Any:
    """Return a ``CareamicsDataset`` over ``patching`` (its constructor normalises)."""
    constructors = _module("careamics.dataset.patch_constructor")
    dataset = _module("careamics.dataset.dataset")
    patch_constructor = constructors.BasicPatchConstr(
        patching_strategy=patching,
        input_extractor=inputs,
        target_extractor=targets,
        channels=config.channels,
    )
    return dataset.CareamicsDataset(
        data_config=config, patch_constructor=patch_constructor, model_constraints=constraints
    )


def create_train_dataset(
    config: Any,
    data: Any,
    loading: Any = None,
    model_constraints: Any = None,
    *,
    backend: str = "auto",
) -> Any:
    """Return CAREamics' training dataset, sampled by our :class:`StratifiedPatching`.

    Takes what ``careamics.dataset.factory.create_train_dataset`` takes and
    returns the same kind of dataset; only the sampler differs, from the start
    (so the normalisation pass of the dataset's constructor already draws
    through ours).

    Parameters
    ----------
    config : careamics.config.DataConfig
        Data configuration with ``mode='training'`` and stratified patching.
    data : careamics.dataset.factory.TrainValData or TrainValSplitData
        ``train_data`` and the optional ``train_data_target`` and
        ``train_data_mask`` are used.
    loading : ReadFuncLoading or ImageStackLoading or None, default None
        How to read ``data_type='custom'`` data, as in CAREamics.
    model_constraints : ModelConstraints or None, default None
        Passed on to ``CareamicsDataset``.
    backend : {"auto", "cuda", "numpy"}, default "auto"
        The sampler's backend.

    Returns
    -------
    careamics.dataset.dataset.CareamicsDataset
        The dataset; its sampler is
        ``dataset.patch_constructor.patching_strategy``.

    Raises
    ------
    TypeError
        If ``config`` is not a CAREamics ``DataConfig``.
    ValueError
        If ``config`` is not for training with stratified patching, or a mask
        is given without ``config.mask_filter``.
    ImportError
        If CAREamics or one of its dependencies is missing.
    """
    _check_training_config(config)
    if not hasattr(data, "train_data"):
        raise TypeError(
            f"data must be a CAREamics TrainValData or TrainValSplitData, got {type(data).__name__}"
        )
    masks = getattr(data, "train_data_mask", None)
    if masks is not None and config.mask_filter is None:
        raise ValueError(
            "data.train_data_mask is given but config.mask_filter is None: set a "
            "MaskFilterConfig to filter with the mask"
        )
    inputs = _extractor(config, loading, data.train_data, config.axes)
    target_data = getattr(data, "train_data_target", None)
    targets = (
        None
        if target_data is None
        else _extractor(config, loading, target_data, config.target_axes or config.axes)
    )
    patching = create_stratified_patching(config, inputs.shapes, backend=backend)
    # CAREamics' own filters: they only call get_all_grid_coords, n_patches and
    # set_region_probs, which ours answers as CAREamics' sampler does.
    filters = _module("careamics.dataset.factory.filter_bg")
    if config.patch_filter is not None:
        filters.filter_background(config.patch_filter, patching, inputs)
    if masks is not None:
        mask_extractor = _extractor(config, loading, masks, config.axes)
        filters.filter_background_with_mask(config.mask_filter, patching, mask_extractor)
    return _dataset(config, patching, inputs, targets, model_constraints)


def create_val_split_datasets(
    config: Any,
    data: Any,
    loading: Any = None,
    rng: Any = None,
    model_constraints: Any = None,
    *,
    backend: str = "auto",
) -> tuple[Any, Any]:
    """Return training and validation datasets, the validation patches split off the training data.

    As ``careamics.dataset.factory.create_val_split_datasets``: the training
    dataset is built (and normalised) first, then CAREamics'
    ``create_val_split`` picks ``data.n_val_patches`` grid cells, excludes
    them from our sampler and gives them to a fixed validation sampler, so no
    training patch overlaps a validation patch.

    Parameters
    ----------
    config : careamics.config.DataConfig
        Data configuration with ``mode='training'`` and stratified patching.
    data : careamics.dataset.factory.TrainValSplitData
        Training data (targets and masks optional) and ``n_val_patches``.
    loading : ReadFuncLoading or ImageStackLoading or None, default None
        How to read ``data_type='custom'`` data.
    rng : numpy.random.Generator or None, default None
        Chooses the validation patches; None uses
        ``numpy.random.default_rng(sampler.seed)``, so a seeded configuration
        gives the same split every time.
    model_constraints : ModelConstraints or None, default None
        Passed on to both datasets.
    backend : {"auto", "cuda", "numpy"}, default "auto"
        The sampler's backend.

    Returns
    -------
    train_dataset, val_dataset : careamics.dataset.dataset.CareamicsDataset
        The validation dataset has ``mode='validating'`` and reads the same
        image stacks.

    Raises
    ------
    TypeError, ValueError, ImportError
        As :func:`create_train_dataset`; ``ValueError`` also when
        ``n_val_patches`` is not below the number of training patches.
    """
    _check_training_config(config)
    n_val = getattr(data, "n_val_patches", None)
    if isinstance(n_val, bool) or not isinstance(n_val, int) or n_val < 0:
        raise ValueError(
            f"data.n_val_patches must be a non-negative int (data must be a "
            f"TrainValSplitData), got {n_val!r}"
        )
    train = create_train_dataset(config, data, loading, model_constraints, backend=backend)
    constructor = train.patch_constructor
    patching = constructor.patching_strategy
    if rng is None:
        rng = np.random.default_rng(patching.seed)
    split = _module("careamics.dataset.factory.val_split")
    _, val_patching = split.create_val_split(patching, n_val, rng=rng)
    val = _dataset(
        config.convert_mode("validating"),
        val_patching,
        constructor.input_extractor,
        constructor.target_extractor,
        model_constraints,
    )
    return train, val


def create_train_val_datasets(
    config: Any,
    data: Any,
    loading: Any = None,
    model_constraints: Any = None,
    *,
    backend: str = "auto",
) -> tuple[Any, Any]:
    """Return a training dataset sampled by ours and CAREamics' validation dataset.

    As ``careamics.dataset.factory.create_train_val_datasets``: the validation
    data are given separately (``data.val_data``) and patched by CAREamics'
    validation strategy (fixed random patches, no stratified sampler), so only
    the training dataset changes.

    Parameters
    ----------
    config : careamics.config.DataConfig
        Data configuration with ``mode='training'`` and stratified patching.
    data : careamics.dataset.factory.TrainValData
        Training and validation data (targets and a training mask optional).
    loading : ReadFuncLoading or ImageStackLoading or None, default None
        How to read ``data_type='custom'`` data.
    model_constraints : ModelConstraints or None, default None
        Passed on to both datasets.
    backend : {"auto", "cuda", "numpy"}, default "auto"
        The sampler's backend.

    Returns
    -------
    train_dataset, val_dataset : careamics.dataset.dataset.CareamicsDataset

    Raises
    ------
    TypeError, ValueError, ImportError
        As :func:`create_train_dataset`.
    """
    _check_training_config(config)
    if not hasattr(data, "val_data"):
        raise ValueError(
            f"data must be a TrainValData with val_data, got {type(data).__name__}; use "
            f"create_val_split_datasets to split validation patches off the training data"
        )
    train = create_train_dataset(config, data, loading, model_constraints, backend=backend)
    val = _module("careamics.dataset.factory").create_dataset(
        config=config.convert_mode("validating"),
        inputs=data.val_data,
        targets=getattr(data, "val_data_target", None),
        loading=loading,
        model_constraints=model_constraints,
    )
    return train, val
