"""The optional CAREamics tier: our sampler inside CAREamics' own training pipeline.

Runs only where CAREamics and its dependencies (PyTorch CPU, pydantic,
lightning, torchvision, ...) are installed (``make careamics-tier``); skipped
cleanly elsewhere, with the reason. It checks that

* the datasets of :mod:`gpu_patching.careamics` yield what CAREamics' own
  factory's yield (item types, keys, shapes, dtypes, normalisation), with our
  sampler from the start;
* CAREamics' helpers ``create_val_split``, ``filter_background`` and
  ``filter_background_with_mask`` run unchanged on our sampler and choose what
  they choose on CAREamics' sampler;
* with ``DataLoader`` workers (fork and spawn, persistent or not), every pass
  draws new patches, as with ``num_workers=0``, while a seed replays the same
  passes;
* ``CAREamist.train`` inside :func:`gpu_patching.careamics.using_gpu_patching`
  trains and validates on our sampler (its DataLoader worker included), the
  same seed replays the same patches, CAREamics is left as it was afterwards,
  and the README's CAREamist example runs as written.
"""

from __future__ import annotations

import math
import multiprocessing
import os
import pickle
import re
import subprocess
import sys
from collections import Counter
from multiprocessing.reduction import ForkingPickler
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from gpu_patching import StratifiedPatching
from gpu_patching.testing import import_careamics

try:
    import_careamics()
except ImportError as error:  # pragma: no cover - depends on the machine
    pytest.skip(
        f"the CAREamics tier needs CAREamics and its dependencies ({error}); install them "
        f"with 'make careamics-tier'",
        allow_module_level=True,
    )

import careamics
import torch
from careamics import CAREamist
from careamics.config import create_care_config, create_n2v_config
from careamics.config.data.patch_filter import MaxPatchFilterConfig
from careamics.config.data.patch_filter.mask_filter_config import (
    MaskPatchFilterConfig,
)
from careamics.config.data.patching_strategies import RandomPatchingConfig
from careamics.dataset.factory import (
    TrainValData,
    TrainValSplitData,
    init_patch_extractor,
)
from careamics.dataset.factory import (
    create_train_dataset as careamics_train_dataset,
)
from careamics.dataset.factory import (
    create_val_split_datasets as careamics_val_split_datasets,
)
from careamics.dataset.factory.filter_bg import (
    filter_background,
    filter_background_with_mask,
)
from careamics.dataset.factory.val_split import create_val_split
from careamics.dataset.image_stack_loader import load_arrays
from careamics.dataset.patch_extractor import PatchExtractor
from careamics.dataset.patching import StratifiedPatching as CareamicsStratified
from careamics.lightning import CareamicsDataModule
from lightning.pytorch import Callback
from torch.utils.data import DataLoader, Dataset

from gpu_patching.careamics import (
    create_stratified_patching,
    create_train_dataset,
    create_train_val_datasets,
    create_val_split_datasets,
    using_gpu_patching,
)

SEED = 7


def n2v_config(patch: int = 32, seed: int = SEED) -> Any:
    """A fresh N2V data configuration (normalisation and augmentations on)."""
    config = create_n2v_config(
        experiment_name="tier",
        data_type="array",
        axes="YX",
        patch_size=[patch, patch],
        batch_size=8,
        augmentations=["x_flip", "y_flip", "rotate_90"],
    ).data_config
    config.patching.seed = seed
    return config


def image(shape: tuple[int, ...] = (160, 192), seed: int = 0) -> np.ndarray:
    generator = np.random.default_rng(seed)
    return generator.random(shape, dtype=np.float32)


def describe(item: tuple[Any, ...]) -> list[tuple[Any, ...]]:
    """What a dataset item is, without its random content: type, keys, shape, dtype."""
    return [
        (
            type(region).__name__,
            region._fields,
            region.data.shape,
            region.data.dtype,
            region.axes,
            tuple(region.data_shape),
            sorted(region.region_spec),
        )
        for region in item
    ]


# -- the dataset builder ---------------------------------------------------------------


def test_train_dataset_yields_what_careamics_yields():
    data = TrainValSplitData(train_data=[image(), image(seed=1)], n_val_patches=0)
    ours = create_train_dataset(n2v_config(), data, backend="numpy")
    theirs = careamics_train_dataset(n2v_config(), data, None)
    sampler = ours.patch_constructor.patching_strategy
    assert isinstance(sampler, StratifiedPatching)
    assert len(ours) == len(theirs) == sampler.n_patches
    assert describe(ours[0]) == describe(theirs[0])
    assert ours[0][0].data.dtype == np.float32
    # Both normalised from the same images: statistics of different patches,
    # of the same pixels (every pixel is covered about once per pass).
    ours_stats = ours.config.normalization
    theirs_stats = theirs.config.normalization
    assert ours_stats.name == theirs_stats.name == "mean_std"
    np.testing.assert_allclose(ours_stats.input_means, theirs_stats.input_means, rtol=0.05)
    np.testing.assert_allclose(ours_stats.input_stds, theirs_stats.input_stds, rtol=0.05)


def test_the_normalisation_pass_draws_through_our_sampler():
    data = TrainValSplitData(train_data=[image()], n_val_patches=0)
    dataset = create_train_dataset(n2v_config(), data, backend="numpy")
    sampler = dataset.patch_constructor.patching_strategy
    # The pass asked for every index once: the next call of index i is its
    # second, the patch of epoch 1 (no set_epoch in CAREamics' pipeline).
    spec = dataset[0][0].region_spec
    corner = sampler.sample_epoch(1).coords[0]
    assert tuple(spec["coords"]) == tuple(int(c) for c in corner)


def test_paired_targets_yield_what_careamics_yields():
    config = create_care_config(
        experiment_name="tier", data_type="array", axes="YX", patch_size=[32, 32], batch_size=8
    ).data_config
    config.patching.seed = SEED
    inputs, targets = [image()], [image(seed=3)]
    data = TrainValData(
        train_data=inputs,
        val_data=[image((64, 64))],
        train_data_target=targets,
        val_data_target=[image((64, 64), 4)],
    )
    ours_train, ours_val = create_train_val_datasets(config, data, backend="numpy")
    config_theirs = config.model_copy(deep=True)
    theirs_train = careamics_train_dataset(config_theirs, data, None)
    assert len(ours_train[0]) == 2  # input and target
    assert describe(ours_train[0]) == describe(theirs_train[0])
    assert ours_val.config.mode == "validating" and len(ours_val) > 0


def test_val_split_datasets_match_careamics_and_never_overlap():
    data = TrainValSplitData(train_data=[image()], n_val_patches=5)
    ours_train, ours_val = create_val_split_datasets(
        n2v_config(), data, rng=np.random.default_rng(2), backend="numpy"
    )
    theirs_train, theirs_val = careamics_val_split_datasets(
        n2v_config(), data, None, np.random.default_rng(2)
    )
    assert len(ours_val) == len(theirs_val) == 5
    assert len(ours_train) == len(theirs_train)
    assert describe(ours_val[0]) == describe(theirs_val[0])
    assert ours_val.config.mode == "validating"
    patch = np.array([32, 32])
    val_cells = {tuple(np.array(ours_val[k][0].region_spec["coords"]) // patch) for k in range(5)}
    sampler = ours_train.patch_constructor.patching_strategy
    for epoch in range(3):
        corners = sampler.sample_epoch(epoch).coords
        first = corners // patch
        last = (corners + patch - 1) // patch
        for low, high in zip(first.tolist(), last.tolist(), strict=True):
            touched = {
                (y, x) for y in range(low[0], high[0] + 1) for x in range(low[1], high[1] + 1)
            }
            assert not touched & val_cells


def test_builder_refuses_a_configuration_it_does_not_replace():
    config = n2v_config()
    data = TrainValSplitData(train_data=[image()], n_val_patches=0)
    with pytest.raises(ValueError, match="validating"):
        create_train_dataset(config.convert_mode("validating"), data)
    with pytest.raises(TypeError, match="DataConfig"):
        create_train_dataset({"patching": "stratified"}, data)
    with pytest.raises(ValueError, match="n_val_patches"):
        create_val_split_datasets(config, TrainValData(train_data=[image()], val_data=[image()]))


# -- CAREamics' helpers on our sampler -------------------------------------------------


def extractor(arrays: list[np.ndarray]) -> Any:
    return init_patch_extractor(PatchExtractor, load_arrays, arrays, "YX")


def test_create_val_split_runs_on_ours():
    shapes = [(1, 1, 160, 192), (1, 1, 96, 96)]
    ours = StratifiedPatching(shapes, [32, 32], seed=SEED, backend="numpy")
    before = ours.n_patches
    train, val = create_val_split(ours, 6, np.random.default_rng(0))
    assert train is ours and val.n_patches == 6
    assert ours.n_patches == before - 6  # each validation cell is excluded
    excluded = [int(ours.get_excluded_cells(k, 0).sum()) for k in range(2)]
    assert sum(excluded) == 6
    specs = [val.get_patch_spec(k) for k in range(6)]
    for spec in specs:  # each validation patch covers exactly one excluded cell
        cell = tuple(c // 32 for c in spec["coords"])
        assert ours.get_excluded_cells(spec["data_idx"], spec["sample_idx"])[cell]
    assert ours.cumulative_image_patches[-1] == ours.n_patches


def regions_changed_by_filter(sampler: Any) -> dict[tuple[int, int], set[tuple[int, ...]]]:
    """The regions whose probability a filter changed, per sample, for either sampler."""
    changed: dict[tuple[int, int], set[tuple[int, ...]]] = {}
    for data_idx, stack in enumerate(sampler.image_patching):
        for sample_idx, sample in enumerate(stack):
            if isinstance(sampler, StratifiedPatching):
                probs = sampler.get_region_probs(data_idx, sample_idx)
                cells = {tuple(int(c) for c in cell) for cell in np.argwhere(probs != 1.0)}
            else:
                grid = {index: cell for cell, index in sample.grid_coords.items()}
                cells = {grid[k] for k, p in sample.relative_probs.items() if p != 1.0}
            changed[(data_idx, sample_idx)] = cells
    return changed


def test_filter_background_chooses_on_ours_what_it_chooses_on_careamics():
    arrays = [image(), image((96, 128), 5)]
    arrays[0][:80] = 0.0  # a dark top half: background
    shapes = [(1, 1, *a.shape) for a in arrays]
    config = MaxPatchFilterConfig(threshold=0.5, filtered_patch_prob=0.25, coverage=0.25)
    ours = StratifiedPatching(shapes, [32, 32], seed=SEED, backend="numpy")
    theirs = CareamicsStratified(shapes, [32, 32], seed=SEED)
    filter_background(config, ours, extractor(arrays))
    filter_background(config, theirs, extractor(arrays))
    changed = regions_changed_by_filter(ours)
    assert changed == regions_changed_by_filter(theirs)
    assert len(changed[(0, 0)]) > 0
    assert ours.n_patches == theirs.n_patches  # 0.25 is exact in our quantisation


def test_filter_background_with_mask_chooses_on_ours_what_it_chooses_on_careamics():
    arrays = [image()]
    mask = np.zeros_like(arrays[0])
    mask[40:120, 64:160] = 1.0
    config = MaskPatchFilterConfig(coverage=0.25, filtered_patch_prob=0.0)
    shapes = [(1, 1, *arrays[0].shape)]
    ours = StratifiedPatching(shapes, [32, 32], seed=SEED, backend="numpy")
    theirs = CareamicsStratified(shapes, [32, 32], seed=SEED)
    filter_background_with_mask(config, ours, extractor([mask]))
    filter_background_with_mask(config, theirs, extractor([mask]))
    assert regions_changed_by_filter(ours) == regions_changed_by_filter(theirs)
    assert ours.n_patches == theirs.n_patches


def test_sampler_from_a_config_uses_its_patch_size_and_seed():
    sampler = create_stratified_patching(n2v_config(64), [(2, 1, 160, 80)], backend="numpy")
    assert sampler.patch_size == (64, 64) and sampler.seed == SEED
    with pytest.raises(ValueError, match="stratified"):
        create_stratified_patching(n2v_config().convert_mode("validating"), [(1, 1, 64, 64)])


# -- DataLoader workers: every pass draws new patches ----------------------------------


def corners_of(batch: list[tuple[Any, ...]]) -> list[tuple[int, int, tuple[int, ...]]]:
    """A batch's patches as (data_idx, sample_idx, corner); module level for spawn."""
    return [
        (
            int(item[0].region_spec["data_idx"]),
            int(item[0].region_spec["sample_idx"]),
            tuple(int(c) for c in item[0].region_spec["coords"]),
        )
        for item in batch
    ]


class _SpawnSafe(Dataset):
    """A dataset that loads CAREamics the tier's way in a spawned worker first.

    Only needed on machines whose torchvision is a CUDA build beside CPU
    PyTorch (see ``gpu_patching.testing.import_careamics``): a spawned worker
    unpickles CAREamics' dataset, which imports torchvision. The inner dataset
    is pickled by multiprocessing's own pickler, exactly as the DataLoader
    would pickle it.
    """

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Any:
        return self.dataset[index]

    def __reduce__(self) -> Any:
        return (_rebuild, (bytes(ForkingPickler.dumps(self.dataset)),))


def _rebuild(payload: bytes) -> _SpawnSafe:
    import_careamics()
    return _SpawnSafe(pickle.loads(payload))


def passes(dataset: Any, n_passes: int, **loader: Any) -> list[list[tuple[Any, ...]]]:
    """The patches of ``n_passes`` shuffled passes of a DataLoader over ``dataset``."""
    generator = torch.Generator().manual_seed(0)
    data_loader = DataLoader(
        _SpawnSafe(dataset),
        batch_size=16,
        shuffle=True,
        collate_fn=corners_of,
        generator=generator,
        **loader,
    )
    return [[corner for batch in data_loader for corner in batch] for _ in range(n_passes)]


def repeated_fraction(earlier: list[Any], later: list[Any]) -> float:
    """The fraction of ``later``'s patches that ``earlier`` already had."""
    seen = Counter(earlier)
    return sum(1 for corner in later if seen[corner]) / len(later)


def worker_dataset() -> Any:
    data = TrainValSplitData(train_data=[image((512, 512), 8)], n_val_patches=0)
    return create_train_dataset(n2v_config(32), data, backend="numpy")


# A spawned worker imports CAREamics anew (~15 s of CPU each, more on a busy
# machine): 4 to 12 imports per test, too slow for every run of the suite.
SPAWN = pytest.mark.skipif(
    os.environ.get("GPU_PATCHING_SPAWN_TIER") != "1",
    reason="spawned DataLoader workers import CAREamics anew (minutes of CPU); "
    "run them with 'make careamics-tier' (GPU_PATCHING_SPAWN_TIER=1)",
)


@pytest.mark.parametrize(
    ("context", "persistent"),
    [
        ("fork", False),
        ("fork", True),
        pytest.param("spawn", False, marks=SPAWN),
        pytest.param("spawn", True, marks=SPAWN),
    ],
)
def test_every_pass_through_dataloader_workers_draws_new_patches(context, persistent):
    if context not in multiprocessing.get_all_start_methods():
        pytest.skip(f"the {context} start method is not available here")
    loader = {
        "num_workers": 2,
        "multiprocessing_context": context,
        "persistent_workers": persistent,
    }
    runs = passes(worker_dataset(), 3, **loader)
    n = len(runs[0])
    assert n == len(worker_dataset()) and all(len(run) == n for run in runs)
    # CAREamics' sampler repeats 0-1% of its patches from one pass to the next,
    # ours with num_workers=0 about as few; a stuck pass repeats 100%.
    for earlier, later in ((runs[0], runs[1]), (runs[1], runs[2]), (runs[0], runs[2])):
        assert repeated_fraction(earlier, later) < 0.1
    # The same seed replays the same training.
    assert passes(worker_dataset(), 3, **loader) == runs


def test_passes_without_workers_draw_new_patches_too():
    runs = passes(worker_dataset(), 2, num_workers=0)
    assert repeated_fraction(runs[0], runs[1]) < 0.1
    assert passes(worker_dataset(), 2, num_workers=0) == runs


# -- CAREamist.train on our sampler ----------------------------------------------------


class PatchRecorder(Callback):
    """Records the corner of every training patch and every training loss, in order."""

    def __init__(self) -> None:
        self.corners: list[tuple[int, int, tuple[int, ...]]] = []
        self.losses: list[float] = []

    def on_train_batch_start(
        self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int
    ) -> None:
        spec = batch[0].region_spec
        coords = [axis.tolist() for axis in spec["coords"]]
        for k, (data_idx, sample_idx) in enumerate(
            zip(spec["data_idx"].tolist(), spec["sample_idx"].tolist(), strict=True)
        ):
            self.corners.append((data_idx, sample_idx, tuple(axis[k] for axis in coords)))

    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.losses.append(float(loss))


N_VAL = 4


def careamist(work_dir: Path, recorder: Callback | None = None, seed: int = SEED) -> Any:
    """A CAREamist for one epoch of N2V with a two-level UNet (one DataLoader worker)."""
    config = create_n2v_config(
        experiment_name="tier",
        data_type="array",
        axes="YX",
        patch_size=[32, 32],
        batch_size=8,
        num_epochs=1,
        n_val_patches=N_VAL,
    )
    config.algorithm_config.model.depth = 2
    config.data_config.seed = seed
    config.data_config.patching.seed = seed
    # One DataLoader worker each, as CAREamics gives on Linux outside pytest.
    for params in (
        config.data_config.train_dataloader_params,
        config.data_config.val_dataloader_params,
    ):
        params.update(num_workers=1, persistent_workers=True)
    return CAREamist(
        config,
        work_dir=work_dir,
        enable_progress_bar=False,
        callbacks=[] if recorder is None else [recorder],
    )


def train_image() -> np.ndarray:
    return image((160, 192), 11)


def trained(work_dir: Path) -> tuple[Any, PatchRecorder]:
    """Train one epoch inside ``using_gpu_patching``; the CAREamist and what it drew."""
    recorder = PatchRecorder()
    model = careamist(work_dir, recorder)
    with using_gpu_patching(model) as entered:
        assert entered is model
        model.train(train_data=train_image())
    return model, recorder


@pytest.fixture(scope="module")
def first_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, PatchRecorder]:
    return trained(tmp_path_factory.mktemp("first"))


def training_sampler(model: Any) -> Any:
    return model.train_datamodule.train_dataset.patch_constructor.patching_strategy


def epoch_rows(sampler: StratifiedPatching, epoch: int) -> list[tuple[Any, ...]]:
    """The patches of one epoch of ``sampler`` as (data_idx, sample_idx, corner)."""
    batch = sampler.sample_epoch(epoch)
    return [
        (int(d), int(s), tuple(int(c) for c in corner))
        for d, s, corner in zip(batch.data_idx, batch.sample_idx, batch.coords, strict=True)
    ]


def test_careamist_train_draws_every_training_patch_from_our_sampler(first_run):
    model, recorder = first_run
    sampler = training_sampler(model)
    assert isinstance(sampler, StratifiedPatching)
    # The normalisation pass drew epoch 0 of every index; the epoch of training,
    # in the DataLoader worker, drew epoch 1: each patch trained on is a row of it.
    assert len(recorder.corners) == sampler.n_patches
    assert Counter(recorder.corners) == Counter(epoch_rows(sampler, 1))


def test_the_worker_draws_of_careamist_training_advance_our_shared_counters(first_run):
    model, _ = first_run
    sampler = training_sampler(model)
    # Two calls of every index happened (one in this process, one in the
    # worker): the next call here is the third, row 0 of epoch 2.
    spec = sampler.get_patch_spec(0)
    assert tuple(spec["coords"]) == tuple(int(c) for c in sampler.sample_epoch(2).coords[0])


def test_careamist_validation_patches_are_split_off_our_sampler(first_run):
    model, _ = first_run
    sampler = training_sampler(model)
    assert len(model.train_datamodule.val_dataset) == N_VAL
    assert int(sampler.get_excluded_cells(0, 0).sum()) == N_VAL


def test_careamist_training_loss_is_finite(first_run):
    _, recorder = first_run
    assert recorder.losses and all(math.isfinite(loss) for loss in recorder.losses)


def test_careamist_prediction_after_our_training_has_the_input_shape(first_run):
    model, _ = first_run
    predictions, _ = model.predict(train_image())
    assert predictions[0].shape == train_image().shape


def test_careamist_training_with_the_same_seed_draws_the_same_patches(first_run, tmp_path):
    _, recorder = first_run
    _, again = trained(tmp_path)
    assert again.corners == recorder.corners


def test_careamist_with_separate_validation_data_trains_on_our_sampler(tmp_path):
    recorder = PatchRecorder()
    model = careamist(tmp_path, recorder)
    with using_gpu_patching(model):
        model.train(train_data=train_image(), val_data=image((64, 64), 12))
    sampler = training_sampler(model)
    assert isinstance(sampler, StratifiedPatching)
    assert not sampler.get_excluded_cells(0, 0).any()  # nothing split off
    assert len(recorder.corners) == sampler.n_patches
    assert Counter(recorder.corners) == Counter(epoch_rows(sampler, 1))


def test_careamist_is_left_as_it_was_after_the_block(tmp_path):
    recorder = PatchRecorder()
    model = careamist(tmp_path, recorder)
    methods = (dict(vars(model)), dict(vars(model.trainer)))
    classes = (CAREamist.__dict__["train"], type(model.trainer).__dict__["fit"])
    with pytest.raises(KeyError), using_gpu_patching(model):
        raise KeyError("leaves the block")
    assert (dict(vars(model)), dict(vars(model.trainer))) == methods
    assert (CAREamist.__dict__["train"], type(model.trainer).__dict__["fit"]) == classes
    model.train(train_data=train_image())
    assert isinstance(training_sampler(model), CareamicsStratified)


def test_using_gpu_patching_refuses_bad_input_before_changing_anything(tmp_path):
    model = careamist(tmp_path)
    before = dict(vars(model))
    with pytest.raises(TypeError, match="CAREamist"), using_gpu_patching(model.config):
        pass
    with pytest.raises(ValueError, match="'gpu'"), using_gpu_patching(model, backend="gpu"):
        pass
    model.config.data_config.patching = RandomPatchingConfig(patch_size=[32, 32])
    with pytest.raises(ValueError, match="'random'"), using_gpu_patching(model):
        pass
    assert dict(vars(model)) == before


def test_using_gpu_patching_refuses_to_be_entered_twice_on_one_careamist(tmp_path):
    model = careamist(tmp_path)
    with using_gpu_patching(model):
        inside = dict(vars(model))
        with pytest.raises(ValueError, match="already"), using_gpu_patching(model):
            pass
        assert dict(vars(model)) == inside


def test_careamics_private_hooks_we_rely_on_are_those_of_0_3_5():
    # using_gpu_patching hands CAREamics' data module datasets built before
    # Trainer.fit: it reads the module's private _data and calls its private
    # _save_hparams, and relies on setup() keeping datasets set beforehand. A
    # CAREamics upgrade must fail here first, whatever its names.
    assert careamics.__version__ == "0.3.5"
    module = CareamicsDataModule(
        create_n2v_config(
            experiment_name="tier", data_type="array", axes="YX", patch_size=[32, 32], batch_size=8
        ).data_config,
        train_data=train_image(),
    )
    assert isinstance(module._data, TrainValSplitData)
    assert callable(module._save_hparams)
    module.train_dataset = module.val_dataset = "kept"
    module.setup("fit")
    assert module.train_dataset == module.val_dataset == "kept"


# -- the README's CAREamist example ----------------------------------------------------

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_careamist_example_runs_as_written(tmp_path):
    blocks = re.findall(r"```py\n(.*?)```", README.read_text(), flags=re.DOTALL)
    (block,) = [block for block in blocks if "using_gpu_patching" in block]
    # import_careamics is a no-op where torchvision matches PyTorch; on a CPU
    # PyTorch beside a CUDA torchvision (this tier's machines) it lets it import.
    prelude = "from gpu_patching.testing import import_careamics; import_careamics()\n"
    result = subprocess.run(
        [sys.executable, "-c", prelude + block],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "prediction" in result.stdout
