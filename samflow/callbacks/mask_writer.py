"""Predicted masks written as PNGs: ``MaskWriter``, which never overwrites its inputs and can continue
a killed run."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter
from PIL import Image
from torch.utils.data import DataLoader, Subset
from typing_extensions import override

from samflow.callbacks.predict_samples import InstanceImage, dataset_samples, predict_samples
from samflow.callbacks.run_folder import RunLock, first_process, folder_in_use, hold_folder
from samflow.console import console
from samflow.data.errors import DataError
from samflow.data.eval_shard import EvalShardSampler
from samflow.outputs import (
    PREDICT_LOCK,
    case_clash,
    file_record,
    partial_path,
    record_problem,
    write_whole,
)

# the settings of the predict data that change its masks (batch size and workers do not)
_RECORD_DATA_KEYS = ("eval_prompt", "prompt", "img_size", "resize_mode", "image_resize", "seed")


class PredictionOutputError(DataError):
    """The predictions folder would overwrite an input, ground truth or earlier outputs (a user error)."""


def check_resume_options(resume: bool, overwrite: bool, data_module: bool) -> None:
    """Refuse ``--predictions.resume`` with ``--predictions.overwrite``, or without a data module;
    ``samflow predict`` checks its config with this before anything is built (``check_before_build``)."""
    if not resume:
        return
    if overwrite:
        raise PredictionOutputError(
            "--predictions.resume true continues the run in the predictions folder and "
            "--predictions.overwrite true starts it again: pass one of them."
        )
    if not data_module:
        raise PredictionOutputError(
            "--predictions.resume true needs the predict data from a data module (--data)."
        )


def folder_busy(folder: Path, holder: str) -> str:
    """The one line refusing a predictions folder that another live samflow process writes into now."""
    return (
        f"The predictions folder {folder} (--predictions.output_dir) is being written by another samflow "
        f"process ({holder}); wait until it ends, or choose another folder with --predictions.output_dir."
    )


def check_output_dir_free(output_dir: str | None) -> None:
    """Refuse an explicit ``--predictions.output_dir`` that another live samflow process writes into now
    (its ``PREDICT_LOCK``); ``samflow predict`` asks before anything is built (``check_before_build``),
    on its first process. The ``MaskWriter`` takes the lock itself before it writes."""
    if not output_dir or not first_process():
        return
    folder = Path(output_dir).expanduser()
    holder = folder_in_use(folder, PREDICT_LOCK)
    if holder is not None:
        raise PredictionOutputError(folder_busy(folder, holder))


def _file_id(path: Path) -> tuple[int, int] | None:
    """``(device, inode)`` of an existing path (following links), the identity ``os.path.samefile`` uses."""
    try:
        stat = path.stat()
    except OSError:
        return None
    return stat.st_dev, stat.st_ino


class MaskWriter(BasePredictionWriter):
    """Write one binary mask PNG (0 / 255) per prompt row, at its image's original size.

    The mask of ``<folder>/<stem>.<ext>`` is ``<output_dir>/<stem>.png``. Instance data (COCO, one row
    per annotation) writes one mask per instance, ``<output_dir>/<image id>_<annotation id>.png``, and
    nothing for an image without instances; rows that would write one file twice stop the run. Before
    anything is predicted the run is refused, with one line naming the folder and a conflicting file, when

    - the output folder holds an input image or ground-truth mask of the predict data (compared as
      files, so links and another spelling of the same folder count), or an output file is an input;
    - two predict images have the same stem (``a/x.jpg`` and ``b/x.png`` would both write ``x.png``), or
      stems equal but for case (``X.png`` and ``x.png``: one file on a case-insensitive disk);
    - the folder already holds a mask this run would write, unless ``overwrite`` is true;
    - another live samflow process writes into the folder (it holds the folder's ``PREDICT_LOCK``, which
      the first process of this run holds from its check until every process has written its last mask;
      a killed run holds nothing).

    Other files in the folder are left alone. Each file is written as ``<name>.partial`` and renamed into
    place, so a killed run leaves no truncated mask; the next run removes its ``.partial`` leftovers.

    Every run records what makes its masks in ``samflow_predict.json`` (``RECORD``) beside them,
    before the first mask: the checkpoint (by SHA-256), threshold, ``save_probabilities``, precision
    and predict data (folder, prompt, size, seed); a later run into the folder replaces it. With
    ``resume`` a run continues an interrupted one (started with or without ``resume``): the images
    whose files are all in the folder are left out of the predict data before the model sees them (on
    every DDP process: the images left are split among them), the others are predicted (again), so the
    folder ends as an uninterrupted run's. A continued run whose settings differ from the record is
    refused naming what differs, and so is a folder holding this run's files without a record (written
    by a samflow older than the record, or by another tool).

    Args:
        output_dir: folder for the masks (default: ``<run folder>/predictions``). Never the image or
            mask folder of the predict data.
        save_probabilities: also write the foreground probability as an 8-bit PNG (``<stem>_prob.png``).
        overwrite: replace the files this run writes when ``output_dir`` already holds them (an
            earlier run's masks); by default such a run is refused. A folder holding the predict
            images or masks is refused either way.
        resume: continue a killed run (or start one): predict only the images whose files are not
            all in ``output_dir`` yet (a killed run's ``.partial`` leftovers do not count and are
            removed), after checking ``samflow_predict.json`` against this run's settings. Not with
            ``overwrite``.
    """

    PARTIAL = "{name}.partial"  # a mask being written: ``x.png.partial``, renamed to ``x.png`` when whole
    RECORD = "samflow_predict.json"  # what makes the masks of a folder written with ``resume``

    def __init__(
        self,
        output_dir: str | None = None,
        save_probabilities: bool = False,
        overwrite: bool = False,
        resume: bool = False,
    ) -> None:
        super().__init__(write_interval="batch")
        self.output_dir = output_dir
        self.save_probabilities = save_probabilities
        self.overwrite = overwrite
        self.resume = resume
        self._patched: Any = None  # the data module whose predict_dataloader ``resume`` wraps
        self._lock: RunLock | None = None  # the folder's PREDICT_LOCK, held by the first process

    def _output_folder(self, trainer: Trainer) -> Path:
        # trainer.log_dir is a collective call under DDP: every rank asks
        base = self.output_dir or str(Path(trainer.log_dir or trainer.default_root_dir) / "predictions")
        return Path(base).expanduser()

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "predict" or not self.resume:
            return
        datamodule = getattr(trainer, "datamodule", None)
        check_resume_options(self.resume, self.overwrite, datamodule is not None)
        assert datamodule is not None
        original = datamodule.predict_dataloader

        def predict_dataloader() -> Any:  # the loader of the images left (every rank calls it)
            return self.loader_left(trainer, pl_module, original())

        datamodule.predict_dataloader = predict_dataloader  # Lightning asks the data module's attribute
        self._patched = datamodule

    @override
    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._release()
        if self._patched is not None:
            vars(self._patched).pop("predict_dataloader", None)  # the class's method again
            self._patched = None

    @override
    def on_predict_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        trainer.strategy.barrier("predictions written")  # every process's last mask is in the folder
        self._release()

    @override
    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._release()

    def _checked(self, folder: Path, samples: Sequence[Any]) -> str | None:
        """``check_output``, then the folder's ``PREDICT_LOCK`` (on the first process): why this run may
        not write into ``folder`` (one line), or None. Once the lock is taken the folder is checked
        again (files that another run wrote before it ended)."""
        problem = self.check_output(folder, samples)
        if problem is not None or self._lock is not None:
            return problem
        try:
            self._lock = hold_folder(
                folder, PREDICT_LOCK, lambda holder: PredictionOutputError(folder_busy(folder, holder))
            )
        except PredictionOutputError as busy:
            return str(busy)
        return self.check_output(folder, samples)

    def _release(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def record(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, Any]:
        """What makes this run's files (``RECORD``): checkpoint, threshold, probabilities, precision and
        the predict data's settings, as JSON values."""
        ckpt = getattr(trainer, "ckpt_path", None)
        datamodule = getattr(trainer, "datamodule", None)
        hparams = dict(getattr(datamodule, "hparams", None) or {})
        data = {key: hparams[key] for key in _RECORD_DATA_KEYS if key in hparams}
        splits = getattr(datamodule, "splits", None)
        if isinstance(splits, Mapping):
            data["predict"] = splits.get("predict")
        data.update(
            {key: getattr(datamodule, key) for key in ("options", "crowd") if hasattr(datamodule, key)}
        )
        # the prompts the masks are made with: a predict set without masks has none, whatever the setting
        datasets = getattr(datamodule, "datasets", None)
        if isinstance(datasets, Mapping):
            used = {
                key: repr(dataset.prompt)
                for key, dataset in datasets.items()
                if key.split("/")[0] == "predict" and hasattr(dataset, "prompt")
            }
            if used:
                data["predicted_with"] = used
        record = {
            "checkpoint": file_record(ckpt) if ckpt else None,
            "threshold": getattr(pl_module, "threshold", None),
            "save_probabilities": self.save_probabilities,
            "precision": str(getattr(trainer, "precision", "")),
            "predict_data": data,
        }
        return json.loads(json.dumps(record, default=str))  # as it reads back from the file

    def check_record(
        self, folder: Path, record: dict[str, Any], found_outputs: int, planned: int
    ) -> str | None:
        """Why the run recorded by ``record`` may not continue in ``folder``, which holds
        ``found_outputs`` of its ``planned`` files (one line, ``record_problem``), or None."""
        held = f"{found_outputs} of the {planned} files this run would write" if found_outputs else None
        redo = (
            "pass --predictions.overwrite true to predict them again, or choose another folder with "
            "--predictions.output_dir"
        )
        record = self._as_earlier_release(folder / self.RECORD, record)
        problem = record_problem(folder / self.RECORD, record, held, redo)
        return None if problem is None else f"The predictions folder: {problem}"

    @staticmethod
    def _as_earlier_release(path: Path, record: dict[str, Any]) -> dict[str, Any]:
        """``record`` as a release before ``predicted_with`` wrote it, when the record at ``path`` is one
        of theirs (its ``predict_data`` has no ``predicted_with``): those predicted each set with the
        prompts ``predicted_with`` names (the setting, ``NoPrompt()`` for a folder without masks) but did
        not write them, so their folders are continued when the rest is equal."""
        try:
            earlier = json.loads(path.read_text())
        except (OSError, ValueError):
            return record  # record_problem names it
        data = record.get("predict_data")
        old = earlier.get("predict_data") if isinstance(earlier, Mapping) else None
        if not isinstance(old, Mapping) or "predicted_with" in old or not isinstance(data, Mapping):
            return record
        return {**record, "predict_data": {k: v for k, v in data.items() if k != "predicted_with"}}

    def write_record(self, folder: Path, record: dict[str, Any]) -> None:
        """Write ``record`` as ``folder``'s ``RECORD`` (whole or not at all), replacing an earlier one."""
        folder.mkdir(parents=True, exist_ok=True)
        text = json.dumps(record, indent=2) + "\n"
        write_whole(folder / self.RECORD, lambda temp: temp.write_text(text))

    def loader_left(self, trainer: Trainer, pl_module: LightningModule, loader: Any) -> Any:
        """``loader`` over the images whose files are not all in the folder yet (``resume``)."""
        folder = self._output_folder(trainer)
        samples = dataset_samples(getattr(loader, "dataset", None))
        if not isinstance(loader, DataLoader) or len(samples) != len(loader.dataset):  # type: ignore[arg-type]
            raise PredictionOutputError(
                "--predictions.resume true needs predict data of samflow's data modules "
                "(SegmentationDataModule, CocoDataModule): the images of this one are not known."
            )
        verdict: tuple[str | None, list[int]] = (None, [])
        if trainer.is_global_zero:  # one look at the folder; every rank gets the same images
            problem = self._checked(folder, samples)
            left: list[int] = []
            if problem is None:
                self.remove_partial(folder, samples)
                names = [self.output_names(sample) for sample in samples]
                there = {n for ns in names for n in ns if (folder / n).is_file()}
                left = [index for index, ns in enumerate(names) if not there.issuperset(ns)]
                planned = len({n for ns in names for n in ns})
                record = self.record(trainer, pl_module)
                problem = self.check_record(folder, record, len(there), planned)
                if problem is None and not there:  # nothing to mix with: this run's record
                    self.write_record(folder, record)  # before the first mask
            verdict = (problem, left)
        problem, left = trainer.strategy.broadcast(verdict, src=0)
        if problem:
            raise PredictionOutputError(problem)
        world = int(getattr(trainer, "world_size", 1) or 1)
        if 0 < len(left) < world:
            raise PredictionOutputError(
                f"{len(left)} image(s) of the predict data are left to predict in {folder}, fewer than "
                f"the {world} processes of this run (each needs one): continue on at most {len(left)} "
                "device(s)."
            )
        if trainer.is_global_zero:
            done = len(samples) - len(left)
            console().print(
                f"samflow: predict: {done} of {len(samples)} images have all their files in {folder} "
                f"already; {f'predicting the other {len(left)}' if left else 'nothing left to predict'}.",
                markup=False,
                highlight=False,
                soft_wrap=True,
            )
        dataset = Subset(loader.dataset, left)
        sampler = loader.sampler
        shard = (
            EvalShardSampler(dataset, sampler.num_replicas, sampler.rank, "the images left to predict")
            if isinstance(sampler, EvalShardSampler) and left
            else None  # one process, or Lightning splits the images left among the processes
        )
        return DataLoader(
            dataset,
            batch_size=loader.batch_size,
            sampler=shard,
            num_workers=loader.num_workers,
            collate_fn=loader.collate_fn,
            pin_memory=loader.pin_memory,
            persistent_workers=loader.persistent_workers,
        )

    @override
    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._folder = self._output_folder(trainer)  # a collective call under DDP: every rank asks, once
        # Rank 0 checks (and removes a killed run's leftovers), before any rank writes; every rank gets
        # its verdict and stops alike.
        problem = None
        if trainer.is_global_zero:
            samples = predict_samples(trainer)
            problem = self._checked(self._folder, samples)
            if problem is None:
                self.remove_partial(self._folder, samples)
                if not self.resume:  # (a continued run's record was checked, or written, with its loader)
                    self.write_record(self._folder, self.record(trainer, pl_module))
        problem = trainer.strategy.broadcast(problem, src=0)
        if problem:
            raise PredictionOutputError(problem)
        self._folder.mkdir(parents=True, exist_ok=True)
        self._written: set[str] = set()

    @staticmethod
    def row_stems(prediction: Mapping[str, Any]) -> list[str]:
        """The file stem of each row of ``predict_step``'s output: ``<id>``, or ``<id>_<instance>``."""
        if "instance" not in prediction:
            return [str(i) for i in prediction["id"]]
        return [f"{i}_{n}" for i, n in zip(prediction["id"], prediction["instance"], strict=True)]

    def output_names(self, sample: Any) -> list[str]:
        """The file names written for one image (a sample of ``dataset_samples``): ``<id>.png``, or one
        per instance (``stems``), each with its ``_prob.png`` when probabilities are saved."""
        stems = sample.stems if isinstance(sample, InstanceImage) else (sample.id,)
        names = [f"{stem}.png" for stem in stems]
        return names + [f"{stem}_prob.png" for stem in stems] if self.save_probabilities else names

    def check_output(self, folder: Path, samples: Sequence[Any]) -> str | None:
        """Why writing the masks of ``samples`` into ``folder`` is refused (one line), or None."""
        where = f"The predictions folder {folder} (--predictions.output_dir)"
        # 1. Two images that would write the same file (one image listed twice writes it once).
        named = dict.fromkeys(
            (name, sample.image) for sample in samples for name in self.output_names(sample)
        )
        clash = case_clash((str(folder / name), image) for name, image in named)
        if clash is not None:
            return clash.message(
                "The predict images",
                "give them different file names, or predict their folders separately into different "
                "--predictions.output_dir.",
            )
        planned = {name: image for name, image in named}
        if folder.exists() and not folder.is_dir():
            return f"{where} is a file, not a folder. Choose a folder with --predictions.output_dir."
        folder_id = _file_id(folder)
        if folder_id is None:
            return None  # a new folder holds nothing yet
        # 2. The folder holds an input (as given or after links), or an output file is an input.
        inputs: dict[tuple[int, int], tuple[str, Path]] = {}
        for sample in samples:
            for kind, path in (("input image", sample.image), ("ground-truth mask", sample.mask)):
                if path is None:
                    continue
                path = Path(path)
                for parent in {path.parent, Path(os.path.realpath(path)).parent}:
                    if _file_id(parent) == folder_id:
                        return (
                            f"{where} holds the {kind} {path}; writing masks there would overwrite the "
                            "predict data. Choose another folder with --predictions.output_dir."
                        )
                file_id = _file_id(path)
                if file_id is not None:
                    inputs[file_id] = (kind, path)
        existing = [folder / name for name in planned if os.path.lexists(folder / name)]
        for out in existing:
            found = inputs.get(_file_id(out) or (-1, -1))
            if found is not None:
                return (
                    f"{where}: the output file {out} is the {found[0]} {found[1]} (a link); writing it "
                    "would overwrite the predict data. Choose another folder with --predictions.output_dir."
                )
        # 3. Masks of an earlier run (with ``resume``: the images' files are checked as a whole there).
        if existing and not (self.overwrite or self.resume):
            return (
                f"{where} already holds {len(existing)} of the {len(planned)} files this run would write "
                f"(e.g. {existing[0]}). Pass --predictions.overwrite true to replace them, or choose another "
                "folder with --predictions.output_dir."
            )
        return None

    def remove_partial(self, folder: Path, samples: Sequence[Any]) -> None:
        """Remove the ``<name>.partial`` files a killed run left for the masks of ``samples`` (never taken
        for outputs: ``check_output`` looks at the final names only)."""
        for name in {name for sample in samples for name in self.output_names(sample)}:
            partial_path(folder / name, self.PARTIAL).unlink(missing_ok=True)

    @override
    def write_on_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        prediction: Any,
        batch_indices: Sequence[int] | None,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int,
    ) -> None:
        folder = self._folder
        for name, mask, prob in zip(self.row_stems(prediction), prediction["masks"], prediction["probs"]):
            if name in self._written:  # several rows of one image without instance ids: never lose one
                raise PredictionOutputError(
                    f"Two prompt rows would write the same mask {folder / name}.png; predict data with "
                    "several rows per image needs instance ids (ann_ids, as CocoDataModule's batches)."
                )
            self._written.add(name)
            self.save_whole(
                Image.fromarray(mask.cpu().numpy().astype(np.uint8) * 255), folder / f"{name}.png"
            )
            if self.save_probabilities:
                values = (prob.float().cpu().numpy() * 255).round().astype(np.uint8)
                self.save_whole(Image.fromarray(values), folder / f"{name}_prob.png")

    def save_whole(self, image: Image.Image, path: Path) -> None:
        """Save ``image`` as the PNG ``path``, whole or not at all (``write_whole``, through
        ``<name>.partial``: a run killed mid-write leaves at most that file, which the next run removes)."""
        write_whole(path, lambda temp: image.save(temp, format="PNG"), partial=self.PARTIAL)
