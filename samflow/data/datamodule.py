"""``SegmentationDataModule``: folder datasets, prompts and GPU augmentation for Lightning.

The batches follow the contract in ``samflow.data.batch``. Training prompts are drawn afresh each epoch,
seeded from (run seed, epoch, sample index); the training loader is a ``ResumableLoader``, so a run
killed mid-epoch resumes with the same batches (``samflow.data.resumable``). Validation, test and
predict prompts are seeded per sample, from ``seed`` and the sample's id (its file stem), so they are
the same every epoch, and adding or removing a file leaves every other sample's prompt as it was
(which is why two different images of one train, val or test split may not share a stem).

Under DDP each process evaluates its own contiguous part of every validation and test set
(``EvalShardSampler``): no image is repeated to even the parts out, so a process may get one image,
and one batch, fewer than another, and metrics summed over processes count every image once.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn
from torch.utils.data import DataLoader

from samflow.batch import SamBatch
from samflow.data.augment import BatchAugment, augment_training_batch
from samflow.data.augment_spec import build_augment
from samflow.data.bad_files import OnBadSample, SkippedFiles, check_set_files
from samflow.data.batch import collate
from samflow.data.errors import DataError, check_loader_counts
from samflow.data.eval_shard import EvalShardSampler, eval_shard_sampler
from samflow.data.folder import MaskFolderDataset
from samflow.data.prompts import NoPrompt, PromptSpec, build_prompt
from samflow.data.quickstart import MARKER, make_quickstart_data
from samflow.data.resumable import ResumableLoader
from samflow.data.split_spec import SplitSpec, check_named_sets, check_split_spec
from samflow.data.transforms import GpuAugment, ImageResize, ResizeMode

_STAGE_SPLITS = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("predict",)}


def default_quickstart_root() -> Path:
    """``$XDG_CACHE_HOME/samflow/quickstart`` (``~/.cache/samflow/quickstart`` by default)."""
    return Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "samflow" / "quickstart"


def _check_quickstart(options: dict[str, Any]) -> None:
    """Refuse ``data.quickstart`` keys or values ``make_quickstart_data`` cannot take, as the config is
    built (it runs in ``prepare_data``, once the run has started)."""
    defaults = {k: p.default for k, p in inspect.signature(make_quickstart_data).parameters.items()}
    unknown = sorted(set(options) - set(defaults))
    if unknown:
        raise ValueError(f"data.quickstart: unknown key(s) {unknown}; the keys are {list(defaults)}.")
    merged = {**defaults, **options}
    try:
        low, high = (int(v) for v in merged["size"])
        counts = int(merged["n_train"]), int(merged["n_val"])
    except (TypeError, ValueError):
        low, high, counts = 0, 0, (0, 0)
    if not 0 < low <= high or min(counts) < 0:
        raise ValueError(
            f"data.quickstart: n_train and n_val must be counts (0 or more) and size the smallest and largest "
            f"image side, 0 < smallest <= largest; got n_train={merged['n_train']!r}, n_val={merged['n_val']!r}, "
            f"size={merged['size']!r}."
        )


class SegmentationDataModule(L.LightningDataModule):
    """Image / mask folders as train, val, test and predict splits, with named evaluation sets.

    A *split spec* is a dataset root (holding ``images/`` and ``masks/``), a dict
    ``{"root": ..., "images": "Imgs", "masks": "GT", "image_suffixes": [...], "mask_suffixes": [...]}``
    (the key ``root`` is required), or a list of those, concatenated into one dataset (e.g. the
    HQSeg-44K parts).

    **Named evaluation sets.** Benchmarks report each test dataset separately. ``val_sets`` and
    ``test_sets`` map a dataset name to a split spec; each name gets its own data loader, in the order
    given, and metric names get the dataset name as a suffix when there are several
    (``test/iou/COD10K``, ``test/iou/CAMO``):

    .. code-block:: yaml

        test_sets:
          COD10K: /data/COD10K/test
          CAMO: {root: /data/CAMO/test, images: Imgs, masks: GT}
          CHAMELEON: /data/CHAMELEON

    ``test`` and ``test_sets`` (likewise ``val`` and ``val_sets``) exclude each other. The two forms
    cannot be confused: a split spec dict always has a ``root`` key, and a ``test`` dict without one is
    rejected with a pointer to ``test_sets``. ``val_names`` and ``test_names`` list the dataset names in
    data-loader order (``["val"]`` / ``["test"]`` for a single unnamed split, ``[]`` when there is none);
    ``SamflowModule`` and ``TestReport`` read them.

    Paths are checked when the datasets are built (``setup``, i.e. when a run starts), not when the
    config is parsed; a missing folder is a ``DataError`` that names the config key and the path. Then,
    with ``check_files``, every image and mask file of the set is checked
    (``MaskFolderDataset.check_files``: a corrupt, truncated, empty or non-image file, a mask of
    another size than its image), with a progress bar on process 0 above 500 files, so a bad file
    stops the run before training, not at some batch of some epoch.

    Args:
        train: training split (a split spec).
        val: validation split (a split spec); or use ``val_sets``.
        test: test split (a split spec); or use ``test_sets``.
        predict: predict split, same forms; masks are optional (a root without a mask folder, or even a
            plain folder of images, predicts without ground truth and without prompts).
        val_sets: several named validation sets, name -> split spec (one data loader each).
        test_sets: several named test sets, name -> split spec (one data loader each).
        img_size: S, the side of the model's square input (1024 for SAM, 128 for the tiny test SAM).
        resize_mode: ``"longest"`` (SAM's: longest side to S, zero-pad bottom / right) or ``"stretch"``.
        image_resize: how images are resized: ``"sam"`` (default; segment-anything's Pillow resize on
            the 8-bit image, exactly ``ResizeLongestSide.apply_image``) or ``"bilinear"`` (torch's
            antialiased bilinear: faster, up to one grey level away from SAM's).
        prompt: training prompt sampler: a ``class_path`` spec of any ``PromptSampler`` subclass
            (``{class_path: BoxPrompt, init_args: {jitter: 0.1}}``, ``{class_path: my_pkg.MySampler}``;
            ``--data.init_args.prompt.help BoxPrompt`` lists its arguments), or a short alias:
            ``none``, ``box``, ``points``, ``noisy_mask``, ``mixed``, alone or as
            ``{name: points, positive: 2}``.
        eval_prompt: prompt for val / test / predict, same forms; ``None`` uses ``prompt``. Seeded per
            sample.
        batch_size: training batch size.
        eval_batch_size: batch size for val / test / predict; ``None`` uses ``batch_size``.
        num_workers: data-loader worker processes.
        seed: seed of the evaluation prompts (a sample's prompt is drawn from ``(seed, its id)``, so it
            does not depend on the other files of the set).
        augment: augmentation of training batches on the device (after the transfer): a
            ``class_path`` spec of ``GpuAugment`` (kornia) or of any ``BatchAugment`` subclass
            (``{class_path: my_pkg.MixUp, init_args: {...}}``); ``GpuAugment``'s arguments alone
            (``{hflip: 0.5, scale: [0.1, 2.0]}``) are short for ``{class_path: GpuAugment, init_args: ...}``.
        quickstart: generate the procedural quickstart dataset in ``prepare_data`` and use it for every
            split left ``None`` (train, val; test falls back to val). ``True`` uses the defaults of
            ``make_quickstart_data``; a dict passes its keys (``root``, ``n_train``, ``n_val``, ``size``,
            ``seed``).
        pin_memory: pin host memory for faster copies to a GPU.
        on_bad_sample: what the file check does with bad files: ``"error"`` stops with one line listing
            up to 10 of them (path and reason) and their count; ``"skip"`` leaves out the samples with a
            bad file (image and mask together) and, at the end of ``setup``, warns with the list of
            skipped files and logs their count (``skipped`` holds them by set). ``"skip"`` needs
            ``check_files``.
        check_files: check every image and mask file when the datasets are built (fast: headers,
            PNG chunk checksums, JPEG end markers). ``False`` for huge trusted sets: a bad file is then
            only found when it is read, and stops the run there.
    """

    def __init__(
        self,
        train: SplitSpec = None,
        val: SplitSpec = None,
        test: SplitSpec = None,
        predict: SplitSpec = None,
        val_sets: dict[str, SplitSpec] | None = None,
        test_sets: dict[str, SplitSpec] | None = None,
        img_size: int = 1024,
        resize_mode: ResizeMode = "longest",
        image_resize: ImageResize = "sam",
        prompt: PromptSpec = "box",
        eval_prompt: PromptSpec | None = None,
        batch_size: int = 4,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        seed: int = 0,
        augment: GpuAugment | BatchAugment | None = None,
        quickstart: bool | dict[str, Any] = False,
        pin_memory: bool = False,
        on_bad_sample: OnBadSample = "error",
        check_files: bool = True,
    ) -> None:
        super().__init__()
        if on_bad_sample not in ("error", "skip"):
            raise ValueError(f"data.on_bad_sample must be 'error' or 'skip', got {on_bad_sample!r}.")
        if on_bad_sample == "skip" and not check_files:
            raise ValueError(
                "data.on_bad_sample: skip needs data.check_files: true; without the check a bad file is "
                "only found when it is read, and stops the run there."
            )
        if img_size <= 0 or img_size % 4:  # else the first dataset setup builds refuses it
            raise ValueError(
                f"data.img_size must be a positive multiple of 4 (mask prompts are S/4), got {img_size}; "
                "set it to model.sam.img_size (the SAM variant's input side unless set)."
            )
        sizes = {"batch_size": batch_size, "eval_batch_size": eval_batch_size or 1}
        check_loader_counts("data.", sizes, num_workers)
        if isinstance(quickstart, dict):
            _check_quickstart(quickstart)
        self.save_hyperparameters(ignore=["augment"])
        self.splits: dict[str, SplitSpec] = {"train": train, "val": val, "test": test, "predict": predict}
        for split, spec in self.splits.items():
            check_split_spec(split, spec)
        self.named_sets: dict[str, dict[str, SplitSpec] | None] = {
            "val": check_named_sets("val", val, val_sets),
            "test": check_named_sets("test", test, test_sets),
        }
        self.img_size = img_size
        self.resize_mode = resize_mode
        self.image_resize = image_resize
        # Built now, so a bad prompt fails when the config is read, naming its key.
        self.prompt = build_prompt(prompt, key="data.prompt")
        self.eval_prompt = (
            self.prompt if eval_prompt is None else build_prompt(eval_prompt, key="data.eval_prompt")
        )
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.augment = build_augment(augment)
        self.quickstart = {} if quickstart is True else (dict(quickstart) if quickstart else None)
        self.pin_memory = pin_memory
        self.on_bad_sample: OnBadSample = on_bad_sample
        self.check_files = check_files
        self.datasets: dict[str, MaskFolderDataset] = {}
        # Bad files left out per set (``datasets`` key); reported by ``setup``.
        self.skipped = SkippedFiles()

    @property
    def val_names(self) -> list[str]:
        """Names of the validation sets in data-loader order (``["val"]`` for a plain ``val``)."""
        return list(self._sets("val"))

    @property
    def test_names(self) -> list[str]:
        """Names of the test sets in data-loader order (``["test"]`` for a plain ``test``)."""
        return list(self._sets("test"))

    def _quickstart_root(self) -> Path:
        assert self.quickstart is not None
        return Path(self.quickstart.get("root") or default_quickstart_root()).expanduser()

    def prepare_data(self) -> None:
        """Write the quickstart data (once, on one process per node) when ``quickstart`` is set."""
        if self.quickstart is not None:
            kwargs = {k: v for k, v in self.quickstart.items() if k != "root"}
            make_quickstart_data(self._quickstart_root(), **kwargs)

    def _spec(self, split: str) -> SplitSpec:
        spec = self.splits[split]
        if spec is None and self.quickstart is not None and split != "predict":
            return str(self._quickstart_root() / ("train" if split == "train" else "val"))
        return spec

    def _sets(self, split: str) -> dict[str, SplitSpec]:
        """Dataset name -> split spec of ``split``, in loader order; ``{}`` when the split is not set."""
        named = self.named_sets.get(split)
        if named is not None:
            return dict(named)
        spec = self._spec(split)
        return {} if spec is None else {split: spec}

    def _named(self, split: str) -> bool:
        return self.named_sets.get(split) is not None

    def _default_name(self, split: str) -> str:
        """The set a bare ``split`` refers to: the first named set, or the split itself."""
        return next(iter(self._sets(split)), split) if self._named(split) else split

    def _key(self, split: str, name: str | None = None) -> str:
        """The ``datasets`` key of one set: the split itself, or ``split/name`` for a named set."""
        return f"{split}/{name or self._default_name(split)}" if self._named(split) else split

    def _config_key(self, split: str, name: str) -> str:
        if self._named(split):
            return f"data.{split}_sets.{name}"
        if self.splits[split] is None and self.quickstart is not None:
            return "data.quickstart"
        return f"data.{split}"

    def build_dataset(self, split: str, name: str | None = None) -> MaskFolderDataset:
        """Build the dataset of ``split`` ("train", "val", "test" or "predict").

        Args:
            split: the split.
            name: for ``val`` / ``test`` given as named sets, which set (default: the first).
        """
        sets = self._sets(split)
        name = self._default_name(split) if name is None else name
        if not sets:
            alternative = f" or data.{split}_sets (named sets)" if split in self.named_sets else ""
            raise DataError(
                f"SegmentationDataModule: no '{split}' data; set data.{split} (a folder root){alternative}."
            )
        if name not in sets:
            raise DataError(
                f"SegmentationDataModule: no {split} set named {name!r}; the sets are {list(sets)}."
            )
        spec = sets[name]
        assert spec is not None  # _sets leaves out the splits that are not set
        training = split == "train"
        try:
            dataset = MaskFolderDataset(
                spec,
                prompt=self.prompt if training else self.eval_prompt,
                img_size=self.img_size,
                resize_mode=self.resize_mode,
                image_resize=self.image_resize,
                prompt_seed=None if training else self.seed,
                require_masks=split != "predict",
                unique_ids=split != "predict",  # MaskWriter names the file both would write
            )
            if self.check_files:
                total, config_key = len(dataset), self._config_key(split, name)
                bad = check_set_files(dataset, config_key, self.on_bad_sample, self._rank)
                self.skipped.record(self._key(split, name), config_key, total, bad)
        except DataError as err:
            raise DataError(f"{self._config_key(split, name)}: {err}") from err
        wants_prompts = not isinstance(self.eval_prompt, NoPrompt)
        if split == "predict" and not dataset.has_masks and wants_prompts:
            rank_zero_warn(f"The predict data {spec} has no masks, so it is predicted without prompts.")
        return dataset

    def setup(self, stage: str | None = None) -> None:
        """Build the datasets the stage needs that are set (all of them when ``stage`` is None).

        This is where dataset paths are checked: a missing folder fails here, naming the config key.
        The other splits that are set are listed too (their folders found and images paired with
        masks, their files not checked), so a wrong ``test_sets`` path stops a ``fit`` before training.
        """
        if self.quickstart is not None and not (self._quickstart_root() / MARKER).is_file():
            self.prepare_data()  # outside a Trainer nobody called prepare_data
        splits = _STAGE_SPLITS.get(stage or "", ("train", "val", "test", "predict"))
        for split in splits:
            for name in self._sets(split):
                key = self._key(split, name)
                if key not in self.datasets:
                    self.datasets[key] = self.build_dataset(split, name)
        for split in [s for s in ("train", "val", "test", "predict") if s not in splits]:
            for name in self._sets(split):
                if self._key(split, name) not in self.datasets:
                    self._find(split, name)
        self.skipped.report()

    @classmethod
    def list_before_build(cls, options: Mapping[str, Any], stage: str) -> None:
        """List the sets ``setup(stage)`` would, from the data's config ``options`` (``data.init_args``),
        without opening a file: a missing or empty folder, or images without masks, raise the
        ``DataError`` ``setup`` would. ``check_before_build`` asks it before SAM is built. The
        quickstart's own sets are left out (``prepare_data`` makes them once the run starts); options
        the data module refuses are left to its construction, which names them."""
        keys = ("train", "val", "test", "predict", "val_sets", "test_sets", "img_size")
        try:
            module = SegmentationDataModule(**{key: options[key] for key in keys if key in options})
        except (ValueError, TypeError):
            return
        module.list_sets(stage)

    def list_sets(self, stage: str | None = None) -> None:
        """List every set that is set, the stage's first (as ``setup``), without keeping or checking them."""
        every = ("train", "val", "test", "predict")
        splits = _STAGE_SPLITS.get(stage or "", every)
        for split in [*splits, *(s for s in every if s not in splits)]:
            for name in self._sets(split):
                self._find(split, name)

    def _find(self, split: str, name: str) -> None:
        """List a set's samples without keeping or checking them: its paths exist and pair up."""
        spec = self._sets(split)[name]
        assert spec is not None  # _sets leaves out the splits that are not set
        try:
            predict = split == "predict"
            MaskFolderDataset(spec, img_size=self.img_size, require_masks=not predict, unique_ids=not predict)
        except DataError as err:
            raise DataError(f"{self._config_key(split, name)}: {err}") from err

    def _rank(self) -> int:
        """This process's rank: the trainer's, else Lightning's (outside a Trainer, or a trainer-like
        object without ``global_rank``)."""
        rank = getattr(self.trainer, "global_rank", None)
        return int(getattr(rank_zero_only, "rank", 0)) if rank is None else int(rank)

    def _dataset(self, split: str, name: str | None = None) -> MaskFolderDataset:
        """The (cached) dataset of one set of ``split``; ``name`` None means the split's default set."""
        if name is not None and name not in self._sets(split):
            sets = list(self._sets(split))
            raise ValueError(f"SegmentationDataModule: no {split} set named {name!r}; the sets are {sets}.")
        key = self._key(split, name)
        if key not in self.datasets:
            self.datasets[key] = self.build_dataset(split, name)
            self.skipped.report()
        return self.datasets[key]

    def _eval_sampler(
        self, split: str, name: str | None, dataset: MaskFolderDataset
    ) -> EvalShardSampler | None:
        """This process's unpadded part of a val / test set under DDP; None in one process (or when the
        trainer's ``use_distributed_sampler`` is off: then the loaders are the user's business)."""
        return eval_shard_sampler(
            self.trainer, dataset, self._config_key(split, name or self._default_name(split))
        )

    def _loader(self, split: str, shuffle: bool, name: str | None = None) -> DataLoader:
        dataset = self._dataset(split, name)
        common: dict[str, Any] = {
            "num_workers": self.num_workers,
            "collate_fn": collate,
            "pin_memory": self.pin_memory,
            "persistent_workers": self.num_workers > 0,
        }
        if split == "train":  # order and prompts from (seed, epoch, index); resumable mid-epoch
            return ResumableLoader(dataset, shuffle=shuffle, batch_size=self.batch_size, **common)
        sampler = self._eval_sampler(split, name, dataset) if split in ("val", "test") else None
        return DataLoader(
            dataset, batch_size=self.eval_batch_size, shuffle=shuffle, sampler=sampler, **common
        )

    def _eval_loaders(self, split: str) -> DataLoader | list[DataLoader]:
        """One loader for a plain split, a list (one per name, in order) for named sets."""
        if not self._named(split):
            return self._loader(split, shuffle=False)
        return [self._loader(split, shuffle=False, name=name) for name in self._sets(split)]

    def train_dataloader(self) -> DataLoader:
        """Shuffled training batches."""
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader | list:
        """Validation batches in a fixed order: one loader, one per named set (``val_sets``), or an empty
        list (no validation) when neither ``val`` nor ``val_sets`` is set."""
        if not self._sets("val"):
            return []
        return self._eval_loaders("val")

    def test_dataloader(self) -> DataLoader | list[DataLoader]:
        """Test batches in a fixed order: one loader, or one per named set (``test_sets``). The
        quickstart's val data when only ``quickstart`` is set."""
        return self._eval_loaders("test")

    def predict_dataloader(self) -> DataLoader:
        """Predict batches in a fixed order."""
        return self._loader("predict", shuffle=False)

    def on_after_batch_transfer(self, batch: SamBatch, dataloader_idx: int) -> SamBatch:
        """Apply ``augment`` to training batches, on the device (``augment_training_batch``: an
        augmentation with ``set_epoch`` learns the trainer's epoch first, whatever the LightningModule)."""
        return augment_training_batch(self.augment, self.trainer, batch)

    def batch_example(self, split: str = "val", size: int = 2) -> SamBatch:
        """A collated batch of the first ``size`` samples of ``split`` (for tests and logging).

        ``split`` is a split name (the first set for named sets) or ``"val/NAME"`` / ``"test/NAME"``.
        """
        split, _, name = split.partition("/")
        dataset = self._dataset(split, name or None)
        return collate([dataset[i] for i in range(min(size, len(dataset)))])

    def __repr__(self) -> str:
        sizes = {k: len(v) for k, v in self.datasets.items()}
        name = type(self).__name__
        return f"{name}(img_size={self.img_size}, resize_mode={self.resize_mode!r}, datasets={sizes})"
