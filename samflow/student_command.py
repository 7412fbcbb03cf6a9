"""``samflow student --experiment NAME --pseudo FILE --out DIR``: ``StudentModule`` (``samflow.student``) on
pseudo masks.

The stage after ``samflow fit`` and ``samflow pseudo-masks``: the same experiment supplies the SAM
(``model.sam``), the data settings (image size, batch size, workers, the ``val`` / ``test`` annotation
files and the train images folder), the optimizer and scheduler (``model.optimizer``,
``model.scheduler``) and every ``trainer.*`` setting (epochs, devices, precision, ``max_time``,
``limit_*``, ``trainer.callbacks`` such as the warm-up; its ``enable_checkpointing: false`` and
``barebones: true`` are refused, a ``default_root_dir`` is said to be unused, the logger is its own);
the train split becomes the pseudo-mask file. ``model.sam.embedding_store`` is refused (the student
runs the encoder; ``model.sam.encoder_cache`` works). It writes ``DIR/checkpoints/last.ckpt`` (the head
only), ``DIR/metrics.csv``, ``DIR/student_metrics.json`` and, with a test split, ``DIR/results.json``
(COCO results that pycocotools' ``COCO.loadRes`` reads). A ``DIR`` holding an earlier student run's
files is refused before anything runs; ``--overwrite`` removes them first (other files are left alone).

``--resume`` continues the run in ``DIR`` from its ``checkpoints/last.ckpt`` and ends with the files and
head weights of the run that was never stopped, as ``samflow fit --resume`` does, with the same pieces:
``LastCheckpoint`` writes ``last.ckpt`` (whole, by renaming) every ``--last.every_n_train_steps`` optimizer
steps (default 50; 0: epoch ends only) and at every epoch end, ``RandomState`` saves the generators, the
train loader (``ResumableLoader``) its position, and ``SameExperiment`` the run's settings
(``resume_config``: the experiment's, and the student's own ``--head``, ``--mps-weight`` and the
pseudo-mask file's content), so that a resume with a setting changed that would make it differ from an
uninterrupted run with the new settings is refused in one line naming it (``student.resume_views``: an
experiment data option the student never reads, and the head's thresholds before any validation, are
taken). On a resume ``metrics.csv`` is cut back to the rows logged before the checkpoint (the killed
run's later rows are logged again) and continued.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any

import yaml

from samflow.callbacks.resume import LastCheckpoint, RandomState, SlurmRequeue
from samflow.callbacks.resume_config import (
    ResumeError,
    SameExperiment,
    check_resume,
    saved_settings,
    training_settings,
)
from samflow.callbacks.run_folder import INFO_FILE, RunCSVLogger, read_run_info
from samflow.data.coco import CocoDataModule
from samflow.data.errors import DataError
from samflow.instance.solov2 import SOLOv2Head
from samflow.outputs import write_whole
from samflow.requeue_hold import slurm_job
from samflow.student import METRICS_KEY, StudentModule, resume_views
from samflow.usage import CommandParser

# trainer.* keys the student does not take from the experiment: its own logger (metrics.csv in --out),
# callbacks (the experiment's own are kept, samflow fit's are not) and run folder (--out, said in a
# warning line when the experiment sets one). Two settings would stop it writing --out: refused at
# those values. Every other trainer.* key the experiment or a flag sets goes to the student's Trainer.
OWN_TRAINER_KEYS = ("logger", "callbacks")
UNUSED_TRAINER_KEYS = {"default_root_dir": "the student writes to --out"}
REFUSED_TRAINER_VALUES = {
    "enable_checkpointing": (False, "the student always writes --out/checkpoints/last.ckpt"),
    "barebones": (True, "the student needs its logger and checkpoint"),
}


def _refuse_trainer_value(key: str, value: Any) -> None:
    """One line for a ``trainer.<key>`` value that would stop the student writing ``--out``."""
    refused, why = REFUSED_TRAINER_VALUES[key]
    if value == refused:
        raise DataError(
            f"samflow student: trainer.{key} {value} is not supported ({why}); drop it. The student "
            "honours every other trainer.* key and the experiment's trainer.callbacks."
        )


def _trainer_kwargs(cli: Any) -> dict[str, Any]:
    """The experiment's trainer.* keys that are set (differ from the parser's defaults), as Trainer
    arguments; a value the student cannot honour is refused with one line."""
    given = cli.config.get("trainer") or {}
    defaults = cli.parser.get_defaults().get("trainer") or {}
    config = cli.config_init.get("trainer") or {}
    kwargs: dict[str, Any] = {}
    for key, value in given.items():
        if key in OWN_TRAINER_KEYS or value == defaults.get(key):
            continue
        if key in UNUSED_TRAINER_KEYS:
            sys.stderr.write(
                f"samflow: warning: trainer.{key} {value} is not used ({UNUSED_TRAINER_KEYS[key]}).\n"
            )
            continue
        if key in REFUSED_TRAINER_VALUES:
            _refuse_trainer_value(key, value)
            continue  # the value the student has anyway
        kwargs[key] = config.get(key)
    return kwargs


def _parser() -> argparse.ArgumentParser:
    p = CommandParser(
        prog="samflow student",
        description="Train SAPNet's SOLOv2 student on SAM's frozen embedding from pseudo masks (`samflow pseudo-masks`) "
        "and evaluate it without prompts (COCO mask AP on the experiment's val / test annotations). The experiment "
        "gives SAM, data settings, optimizer, scheduler and trainer settings; other arguments override it.",
    )
    p.add_argument("--experiment", required=True, help="experiment name or YAML path (the SAPNet experiment)")
    p.add_argument("--pseudo", required=True, help="pseudo-mask COCO file written by `samflow pseudo-masks`")
    p.add_argument(
        "--out",
        required=True,
        help="output folder (checkpoints, metrics.csv, student_metrics.json, results.json)",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the outputs of an earlier student run in --out (refused otherwise)",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the student run in --out from its checkpoints/last.ckpt (written every "
        "--last.every_n_train_steps steps, default 50, and at every epoch end); give the run's experiment "
        "and flags: a changed setting that changes the training is refused",
    )
    p.add_argument(
        "--images",
        default=None,
        help="folder of the training images (default: the experiment's train images)",
    )
    p.add_argument(
        "--mps-weight",
        type=float,
        default=0.5,
        help="weight of the pseudo-mask file's MPS masks (SAPNet: 0.5, summed over the ranks / 6); 0 turns them off",
    )
    p.add_argument(
        "--head", default=None, help="SOLOv2Head options as YAML/JSON, e.g. '{num_grids: [40, 24, 16]}'"
    )
    return p


def _build_cli(experiment: str, overrides: list[str]) -> Any:
    import sys

    from samflow.commands import experiment_from_argv
    from samflow.lightning_cli import SamflowCLI

    class StudentCLI(SamflowCLI):
        def before_instantiate_classes(self) -> None:
            # before the experiment's Trainer is built: Lightning would refuse barebones with its
            # ModelCheckpoint in a message about enable_checkpointing, not the key the user set
            trainer = self.config.get("trainer") or {}
            for key in REFUSED_TRAINER_VALUES:
                _refuse_trainer_value(key, trainer.get(key))
            super().before_instantiate_classes()

    args, name = experiment_from_argv(["--experiment", experiment, *overrides])
    argv, sys.argv = sys.argv, sys.argv[:1]
    try:
        return StudentCLI(name or "student", args=[*args, "--trainer.logger=false"], run=False)
    finally:
        sys.argv = argv


OUTPUTS = ("metrics.csv", "hparams.yaml", "student_metrics.json", "results.json", INFO_FILE)


def _launching_process() -> bool:
    """Whether this is the process the user started (not a DDP rank that Lightning, torchrun or SLURM's
    ``srun`` started beside it): only that one checks and clears ``--out``."""
    ranks = ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID")
    return all(os.environ.get(key, "0") == "0" for key in ranks)


def _earlier_outputs(out: Path, pseudo: Path, overwrite: bool) -> list[Path]:
    """The files of an earlier student run in ``out`` (``checkpoints/*.ckpt`` and ``OUTPUTS``), which
    ``overwrite`` replaces; a DataError when ``out`` is a file, holds the pseudo-mask file as an output,
    or holds earlier outputs without ``overwrite`` (Lightning would write ``last-v1.ckpt`` beside the
    earlier ``last.ckpt`` and replace the metrics: two runs mixed in one folder)."""
    if out.exists() and not out.is_dir():
        raise DataError(f"samflow student: --out {out} is a file, not a folder; choose a folder.")
    planned = [out / name for name in OUTPUTS]
    if pseudo.resolve() in {p.resolve() for p in planned}:
        raise DataError(
            f"samflow student: --out {out} would replace the input --pseudo {pseudo}; choose another --out."
        )
    found = sorted((out / "checkpoints").glob("*.ckpt")) if (out / "checkpoints").is_dir() else []
    found += [p for p in planned if p.exists()]
    if found and not overwrite:
        raise DataError(
            f"samflow student: --out {out} holds an earlier student run ({', '.join(str(p) for p in found[:3])}"
            f"{' ...' if len(found) > 3 else ''}); pass --overwrite to replace it, or choose another --out."
        )
    return found


def _requeued_here(out: Path, command: list[str]) -> bool:
    """Whether this SLURM job, started again after a requeue (``SLURM_RESTART_COUNT`` 1 or more: by
    ``SlurmRequeue``, ``scontrol requeue`` or a preemption), started the student run in ``out`` with this
    command line (its ``run.json``): the job script's same command then continues that run."""
    job = slurm_job()
    if job is None or int(os.environ.get("SLURM_RESTART_COUNT") or 0) < 1:
        return False
    info = read_run_info(out)
    return info.get("slurm_job") == job and info.get("slurm_command") == command


def _resume_checkpoint(out: Path) -> Path:
    """``out``'s ``checkpoints/last.ckpt`` for ``--resume``; a DataError when ``out`` holds no student run."""
    ckpt = out / "checkpoints" / LastCheckpoint.FILE
    if not ckpt.is_file():
        raise DataError(
            f"samflow student: --resume: {out} holds no student run to continue ({ckpt} not found); "
            "start it without --resume."
        )
    return ckpt


#: the experiment's settings the student trains with, besides seed_everything (its plugins, losses and
#: metrics are samflow fit's)
STUDENT_SETTINGS = ("data.", "trainer.", "model.sam.", "model.optimizer.", "model.scheduler.")


def _student_settings(
    cli: Any, pseudo: Path, images: str, head: dict[str, Any], mps_weight: float
) -> dict[str, str]:
    """The training settings of this student run, as ``resume_config.training_settings`` gives a fit's
    (compared by ``check_resume``): the experiment's that the student uses, and its own. The pseudo-mask
    file counts by its content (a change is refused), its path and the images folder by where they are
    (a change is said, as a moved data folder of a fit)."""
    settings = {
        key: value
        for key, value in training_settings(cli.config).items()
        if key == "seed_everything" or key.startswith(STUDENT_SETTINGS)
    }
    digest = hashlib.sha256(pseudo.read_bytes()).hexdigest()
    own: dict[str, Any] = {
        "model.student.head": head,
        "model.student.mps_weight": mps_weight,
        "data.student.pseudo_sha256": digest,
        "data.student.train.pseudo": str(pseudo.resolve()),
        "data.student.train.images": str(Path(images).expanduser().resolve()),
    }
    settings.update({key: json.dumps(value, sort_keys=True) for key, value in own.items()})
    return settings


def _check_resume(ckpt: Path, settings: dict[str, str], random_seed: bool) -> dict[str, str]:
    """Refuse a resume from ``ckpt`` that is not a student run's or changes a setting that would make it
    differ from an uninterrupted run with the new settings (one line naming the key and both values,
    ``check_resume``); ``settings`` with the run's seed when it was drawn."""
    saved = saved_settings(ckpt)
    if saved is None or "model.student.head" not in saved:
        raise DataError(
            f"samflow student: --resume: {ckpt} holds no student run's settings (written by an earlier "
            "samflow, or not by samflow student), so it cannot be continued exactly; start the run again "
            "with --overwrite, or choose another --out."
        )
    restart = "start it again with --overwrite, or choose another --out"
    try:  # as the student compares them (resume_views: what it never reads, the head's thresholds)
        old, new = resume_views(saved, settings, "val" in _checkpoint_entry(ckpt, METRICS_KEY, {}), restart)
        seed = check_resume(old, new, random_seed, restart)["seed_everything"]
    except ResumeError as err:
        raise ResumeError(f"samflow student: --resume {ckpt.parent.parent}: {err}") from err
    return {**settings, "seed_everything": seed}


def _head_options(parser: argparse.ArgumentParser, text: str | None) -> dict[str, Any]:
    """``--head`` as ``SOLOv2Head`` options; a usage error naming ``--head`` when it is not YAML of a
    mapping or the head refuses it (an unknown option, levels of different lengths: a head is built)."""
    if not text:
        return {}
    try:
        head = yaml.safe_load(text)
        if not isinstance(head, dict):
            raise TypeError(f"expected a mapping of SOLOv2Head options, got {head!r}")
        if "in_channels" in head:  # the student sets it: SAM's embedding width
            raise ValueError("in_channels is the SAM embedding's width, which the student sets; leave it out")
        SOLOv2Head(1, **head)
    except (yaml.YAMLError, TypeError, ValueError) as err:
        parser.error(f"argument --head {text!r}: {' '.join(str(err).split())}")
    return head


def main(argv: list[str]) -> int:
    from lightning.pytorch import Trainer
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    parser = _parser()
    opts, overrides = parser.parse_known_args(argv)
    if opts.resume and opts.overwrite:
        parser.error("argument --resume: not allowed with --overwrite (which starts the run again)")
    head = _head_options(parser, opts.head)  # before any file is read or model built
    if not opts.mps_weight >= 0:  # NaN too
        parser.error(f"argument --mps-weight: must be 0 (off) or more, got {opts.mps_weight}")
    pseudo = Path(opts.pseudo).expanduser()
    if not pseudo.is_file():
        raise DataError(
            f"samflow student: --pseudo {pseudo} not found; write it with `samflow pseudo-masks`."
        )
    out = Path(opts.out).expanduser()
    command = ["student", *argv]
    if not opts.resume and _requeued_here(out, command):  # its requeued job: the run goes on
        continues = (out / "checkpoints" / LastCheckpoint.FILE).is_file()
        opts.resume, opts.overwrite = continues, not continues  # nothing trained yet: it starts again
        if _launching_process():
            goes_on = "continues the run in" if continues else "starts again the run it had not trained in"
            print(f"samflow student: SLURM job {slurm_job()} started again: it {goes_on} {out}.")
    # --resume continues the earlier run's files (never the input's: _earlier_outputs checks that)
    earlier = _earlier_outputs(out, pseudo, opts.overwrite or opts.resume) if _launching_process() else []
    ckpt = _resume_checkpoint(out) if opts.resume else None
    if ckpt is not None:
        earlier = []
    cli = _build_cli(opts.experiment, overrides)
    model, data = cli.model, cli.datamodule
    if model.sam_spec.embedding_store:
        raise DataError(
            "samflow student: model.sam.embedding_store is not read by the student (it runs SAM's encoder "
            "on every image); pass --model.sam.embedding_store null (model.sam.encoder_cache is honoured)."
        )
    if not isinstance(data, CocoDataModule):
        raise DataError(
            f"samflow student: the experiment's data is {type(data).__name__}; it needs samflow.data.coco.CocoDataModule."
        )
    train = data.splits.get("train") or {}
    images = (
        opts.images or train.get("images") or str(Path(train.get("annotations", pseudo)).expanduser().parent)
    )
    random_seed = bool(getattr(cli, "_random_seed", False))
    settings = _student_settings(cli, pseudo, images, head, opts.mps_weight)
    if ckpt is not None:  # before the data and the student are built: a drawn seed becomes the run's
        settings = _check_resume(ckpt, settings, random_seed)
        seed = json.loads(settings["seed_everything"])
        if random_seed and isinstance(seed, int):
            from lightning.pytorch import seed_everything

            seed_everything(seed, workers=True)
    first = (json.loads(pseudo.read_text()).get("annotations") or [{}])[0]
    student_data = CocoDataModule(
        train={"annotations": str(pseudo), "images": images},
        aux_masks="mps_segmentation" if "mps_segmentation" in first and opts.mps_weight else None,
        val=data.splits.get("val"),
        test=data.splits.get("test"),
        batch_size=data.batch_size,
        num_workers=data.num_workers,
        # images without instances count in COCO's evaluation (false positives): keep them
        **{**data.options, "empty": "keep"},
    )
    ids = student_data.dataset("train").category_ids
    for split in ("val", "test"):
        if student_data.splits.get(split) and student_data.dataset(split).category_ids != ids:
            raise DataError(
                f"samflow student: data.{split}'s categories differ from those of {pseudo}; the classes would not match."
            )
    student = StudentModule(
        len(ids),
        model.sam_spec,
        head=head,
        category_ids=ids,
        optimizer=model.optimizer,
        scheduler=model.scheduler,
        frozen_sam=model.model.sam,
        mps_weight=opts.mps_weight,
    )
    config = cli.config_init.get("trainer") or {}
    kwargs = {"enable_model_summary": False, "num_sanity_val_steps": 0, **_trainer_kwargs(cli)}
    if str(kwargs.get("strategy", "")).startswith("ddp_find_unused"):
        kwargs["strategy"] = "ddp"  # the student's head uses every parameter
    for path in earlier:  # --overwrite: none of them outlives this run beside its new files
        path.unlink(missing_ok=True)
    job = slurm_job()
    if job is not None and _launching_process():  # its job started again continues it (_requeued_here)
        out.mkdir(parents=True, exist_ok=True)
        record = json.dumps({"slurm_job": job, "slurm_command": command}, indent=2) + "\n"
        write_whole(out / INFO_FILE, lambda temp: temp.write_text(record))
    # the experiment's own trainer.callbacks (e.g. the warm-up) come first; samflow fit's (sample grids,
    # reports, its checkpointing) are for SamflowModule and are left out. last.ckpt as samflow fit's:
    # every --last.every_n_train_steps steps and each epoch end, with what an exact resume needs
    own = len(cli.config.get("trainer", {}).get("callbacks") or [])
    last = cli.config_init.get("last")
    every = last.every_n_train_steps if isinstance(last, LastCheckpoint) else 50
    last_ckpt = LastCheckpoint(every, dirpath=str(out / "checkpoints"))
    last_ckpt.command, last_ckpt.resume_flag = "student", "--resume"  # its line after a Ctrl-C
    requeue = SlurmRequeue()  # SLURM's requeue signal: stop after the batch, requeue, continue the run
    requeue.what = "student run"
    callbacks = [
        *(config.get("callbacks") or [])[:own],
        requeue,
        last_ckpt,
        RandomState(),
        SameExperiment(settings, random_seed, checked=True),
    ]
    # metrics.csv continued on a resume (Lightning's CSVLogger would delete it) without the rows the
    # resumed run logs again; Lightning writes each row as it is logged, so a killed run's rows up to
    # its checkpoint are all in the file
    step = None if ckpt is None else int(_checkpoint_entry(ckpt, "global_step"))
    logger = RunCSVLogger(out, name="", version="", drop_from_step=step)
    trainer = Trainer(**kwargs, callbacks=callbacks, logger=logger, default_root_dir=out)
    try:
        trainer.fit(student, datamodule=student_data, ckpt_path=ckpt)
        if student_data.splits.get("test"):
            trainer.test(student, datamodule=student_data, verbose=False)
    except (
        SIGTERMException
    ) as err:  # Lightning stopped after the batch; last.ckpt is the last one written whole
        if trainer.is_global_zero and requeue.requeue:  # LastCheckpoint's and SlurmRequeue's lines
            sys.stderr.write(f"samflow: error: {' '.join(getattr(err, '__notes__', []))}\n")
        elif trainer.is_global_zero:
            sys.stderr.write(
                f"samflow student: stopped by SIGTERM at step {trainer.global_step}; continue the run with "
                f"the same arguments and --resume (from {out / 'checkpoints' / LastCheckpoint.FILE}).\n"
            )
        return 1
    if student_data.splits.get("test") and trainer.is_global_zero:
        _write(out / "results.json", json.dumps(student.results))
    if trainer.is_global_zero:
        _write(out / "student_metrics.json", json.dumps(student.metrics, indent=2))
        for stage, values in student.metrics.items():
            print(f"samflow student {stage}: " + "  ".join(f"{k} {v:.4f}" for k, v in values.items()))
        print(f"samflow student: {out}")
    return 0


def _checkpoint_entry(ckpt: Path, key: str, default: Any = None) -> Any:
    """One entry of a checkpoint (memory-mapped: the weights are not read)."""
    import torch

    return torch.load(ckpt, map_location="cpu", weights_only=True, mmap=True).get(key, default)


def _write(path: Path, text: str) -> None:
    """``path`` whole or not at all (a run killed while writing keeps the earlier file)."""
    write_whole(path, lambda temp: temp.write_text(text))
