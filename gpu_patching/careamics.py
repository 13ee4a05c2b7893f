"""Build CAREamics' training datasets with our sampler in place of CAREamics' (optional).

CAREamics builds its sampler, then runs a normalisation pass that asks for
every patch once: swapping ours in afterwards is too late. The functions here
(:func:`create_val_split_datasets` and the others, with the arguments of
CAREamics' factory functions) build the same ``CareamicsDataset`` objects with
ours from the start, and :func:`using_gpu_patching` makes ``CAREamist.train``
do so. Everything else is CAREamics' own. CAREamics is imported when a
function is called (``pip install gpu-patching[careamics]``); the README shows
both paths.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np

from .backends import resolve_backend
from .strategy import StratifiedPatching

__all__ = [
    "create_stratified_patching",
    "create_train_dataset",
    "create_train_val_datasets",
    "create_val_split_datasets",
    "using_gpu_patching",
]


def _module(name: str) -> Any:
    """Import a CAREamics module, or say how to install CAREamics."""
    try:
        return importlib.import_module(name)
    except ImportError as error:
        raise ImportError(
            f"gpu_patching.careamics needs CAREamics and its dependencies ({name} cannot be "
            f"imported: {error}); install them with 'pip install gpu-patching[careamics]'"
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
    config, loading, model_constraints, backend
        As :func:`create_val_split_datasets`.
    data : careamics.dataset.factory.TrainValData
        Training and validation data (targets and a training mask optional).

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


# What CAREamics 0.3.5 offers and what using_gpu_patching relies on. CAREamist.train
# takes no data module or dataset factory: it builds a CareamicsDataModule from its
# arguments and hands it to ``self.trainer.fit(model, datamodule=...)``, whose
# setup() builds the datasets with CAREamics' factory unless both are set already.
# So the datasets are built here, inside Trainer.fit (after CAREamist.train's
# seed_everything, as CAREamics' setup would be), from the module's validated data
# (the private ``_data``), and the configuration with its new normalisation is saved
# to the module's hyperparameters as its setup() does (the private
# ``_save_hparams``). tests/test_careamics_tier.py pins these names on 0.3.5; every
# assumption is also checked here at run time, and a broken one raises instead of
# silently training on CAREamics' sampler.
_CAREAMICS_NOTE = (
    "using_gpu_patching supports CAREamics 0.3.5 (the version gpu-patching[careamics] "
    "installs); this CAREamics ({version}) {problem}"
)


def _unsupported(problem: str) -> RuntimeError:
    version = getattr(_module("careamics"), "__version__", "of unknown version")
    return RuntimeError(_CAREAMICS_NOTE.format(version=version, problem=problem))


def _prepare_data_module(datamodule: Any, backend: str) -> tuple[Any, Any]:
    """Build the data module's datasets with our sampler; return them."""
    data_module_type = _module("careamics.lightning").CareamicsDataModule
    if not isinstance(datamodule, data_module_type):
        raise _unsupported(
            f"gave Trainer.fit a {type(datamodule).__name__} instead of a CareamicsDataModule"
        )
    save_hparams = getattr(datamodule, "_save_hparams", None)
    data = getattr(datamodule, "_data", None)
    factory = _module("careamics.dataset.factory")
    if not callable(save_hparams):
        raise _unsupported("has no CareamicsDataModule._save_hparams")
    arguments = (datamodule.config, data, datamodule.loading)
    if isinstance(data, factory.TrainValSplitData):
        # The data module's own generator: the same validation split as CAREamics'.
        train, val = create_val_split_datasets(
            *arguments, datamodule.rng, datamodule.model_constraints, backend=backend
        )
    elif isinstance(data, factory.TrainValData):
        train, val = create_train_val_datasets(
            *arguments, datamodule.model_constraints, backend=backend
        )
    else:
        raise _unsupported(
            f"keeps {type(data).__name__} in CareamicsDataModule._data, not the "
            f"TrainValSplitData or TrainValData of training"
        )
    datamodule.train_dataset, datamodule.val_dataset = train, val
    save_hparams()
    return train, val


@contextmanager
def using_gpu_patching(careamist: Any, *, backend: str = "numpy") -> Iterator[Any]:
    """Make ``careamist.train(...)`` train and validate on our sampler within the block.

    Inside the ``with`` block, every ``careamist.train(...)`` call builds its
    training and validation datasets as :func:`create_val_split_datasets`
    (``n_val_patches`` split off the training data) or
    :func:`create_train_val_datasets` (with ``val_data``) do: CAREamics'
    datasets, normalisation pass and validation split, with our
    :class:`~gpu_patching.StratifiedPatching` in place of CAREamics' sampler
    from the start. Everything else is ``CAREamist.train``'s own (its
    arguments, seeding, callbacks, DataLoader workers, checkpoints). Its
    DataLoader workers draw through counters shared with this process (see the
    README's "DataLoader workers"), so every epoch draws new patches and the
    same seed (``config.data_config.patching.seed``) replays the same ones.

    Only this ``careamist`` is changed, and only until the block ends (even by
    an exception): then ``careamist.train`` is CAREamics' again. Prediction
    is not affected.

    Parameters
    ----------
    careamist : careamics.CAREamist
        A CAREamist whose configuration uses stratified patching (CAREamics'
        default for training).
    backend : {"auto", "cuda", "numpy"}, default "numpy"
        The sampler's backend. CAREamics' dataset asks for one patch per item,
        usually in DataLoader workers that Linux forks, where CUDA cannot run,
        so the default is the NumPy backend.

    Yields
    ------
    careamics.CAREamist
        ``careamist`` itself.

    Raises
    ------
    TypeError
        If ``careamist`` is not a ``CAREamist``, or ``backend`` not a string.
    ValueError
        If the configuration's patching is not stratified, ``backend`` is not
        a backend's name, or the block is entered again for the same
        ``careamist`` inside itself.
    BackendUnavailableError
        If ``backend="cuda"`` cannot run here.
    ImportError
        If CAREamics or one of its dependencies is missing.
    RuntimeError
        From ``careamist.train`` inside the block, if this CAREamics does not
        build its training data module as CAREamics 0.3.5 does (see Notes).

    Notes
    -----
    ``CAREamist.train`` of CAREamics 0.3.5 accepts no data module or dataset
    factory, so this relies on two of its private names:
    ``CareamicsDataModule._data`` (the validated training data) and
    ``CareamicsDataModule._save_hparams``. Within the block the CAREamist's
    ``train`` is wrapped, and for each call its trainer's ``fit`` builds the
    data module's datasets before Lightning's ``setup`` (which keeps datasets
    that are set). Each of these is checked when it is used and raises
    ``RuntimeError`` instead of training on CAREamics' sampler, and the
    CAREamics tier of the tests pins them on 0.3.5.

    Examples
    --------
    >>> with using_gpu_patching(CAREamist(config)) as careamist:  # doctest: +SKIP
    ...     careamist.train(train_data=image)
    >>> careamist.predict(image)  # doctest: +SKIP
    """
    careamist_type = _module("careamics").CAREamist
    if not isinstance(careamist, careamist_type):
        raise TypeError(f"careamist must be a careamics.CAREamist, got {type(careamist).__name__}")
    resolve_backend(backend)  # validates the name (and CUDA) before anything changes
    patching = careamist.config.data_config.patching
    if patching.name != "stratified":
        raise ValueError(
            f"careamist.config.data_config.patching.name is {patching.name!r}: gpu-patching "
            f"replaces CAREamics' stratified patching, so the configuration must use "
            f"patching='stratified'"
        )
    if "train" in vars(careamist):
        raise ValueError(
            "careamist is already inside using_gpu_patching (or its train method was "
            "replaced): enter the block once per CAREamist"
        )
    careamics_train = careamist.train

    @functools.wraps(careamics_train)
    def train(*args: Any, **kwargs: Any) -> None:
        trainer = careamist.trainer
        careamics_fit = trainer.fit
        built: list[Any] = []

        @functools.wraps(careamics_fit)
        def fit(*fit_args: Any, **fit_kwargs: Any) -> Any:
            datamodule: Any = fit_kwargs.get("datamodule")
            built.append(_prepare_data_module(datamodule, backend))
            result = careamics_fit(*fit_args, **fit_kwargs)
            if datamodule.train_dataset is not built[0][0]:
                raise _unsupported("replaced the training dataset that was set before setup()")
            return result

        # An attribute of this trainer only, shadowing Trainer.fit for this call.
        trainer.fit = fit
        try:
            careamics_train(*args, **kwargs)
        finally:
            del trainer.fit
        if not built:
            raise _unsupported("trained without calling careamist.trainer.fit")

    # An attribute of this CAREamist only, shadowing CAREamist.train in the block.
    careamist.train = train
    try:
        yield careamist
    finally:
        del careamist.train
