"""`samflow student --resume`: a student run stopped and resumed ends as the run that was never stopped.

The run is stopped at optimizer step 5 of 6 (mid-epoch 1) by a real signal: SIGTERM to the test's own
process (a scheduler's stop: Lightning ends the run after the batch), with ``last.ckpt`` written every 2
steps (the resume starts from step 4, mid-epoch), or SIGKILL to a ``samflow student`` process (nothing
runs after it), with ``last.ckpt`` at epoch ends only (from step 3). Resumed with ``--resume``, the head's
weights, momentum and scheduler equal the uninterrupted run's bit for bit (CPU, deterministic), and so do
``metrics.csv`` (the rows the stopped run logged after its checkpoint are logged again, not twice),
``student_metrics.json`` and ``results.json``. The run trains with momentum, an epoch scheduler, the
warm-up callback, shuffled batches and MPS masks, so the optimizer, scheduler and loader states all have
to come back. A run killed in its test resumes with its last validation's AP. Taken: experiment data options
the student never reads, head options at their defaults, and, before any validation, the head's
inference thresholds (the run then ends as the uninterrupted run with the new ones). The refusals: no
run in ``--out``, a checkpoint without a student's settings, a changed head, MPS weight, learning rate,
batch size, crowd option or pseudo-mask file, the thresholds after a validation, and ``--overwrite``
with ``--resume``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from overlap_coco import make_overlap_coco

from samflow.cli import main
from samflow.student import StudentModule

HEAD = json.dumps(  # low thresholds: the tiny run's test detections are kept (results.json not empty)
    {"feat_channels": 16, "mask_channels": 8, "num_convs": 1, "num_grids": [8, 6, 4]}
    | {"score_thr": 0.0, "filter_thr": 0.0, "mask_thr": 0.45}
)
FILES = ("metrics.csv", "student_metrics.json", "results.json")
STEPS = 6  # 3 images, batch 1, 2 epochs


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("student_resume")
    annotations = make_overlap_coco(root / "coco", n_images=3)
    held_out = make_overlap_coco(root / "eval", n_images=2, seed=1)  # val and test
    data = json.loads(annotations.read_text())
    for ann in data["annotations"]:  # one MPS mask per instance: the pseudo mask itself
        ann["mps_segmentation"] = [ann["segmentation"]]
    pseudo = root / "pseudo.json"
    pseudo.write_text(json.dumps(data))
    exp = root / "exp.yaml"
    exp.write_text(
        "seed_everything: 3\nmodel:\n  sam: {variant: tiny, encoder_cache: 8}\n  losses: {}\n"
        "  optimizer: {class_path: torch.optim.SGD, init_args: {lr: 0.01, momentum: 0.9}}\n"
        "  scheduler: {class_path: torch.optim.lr_scheduler.MultiStepLR, init_args: {milestones: [1]}}\n"
        "data:\n  class_path: samflow.data.coco.CocoDataModule\n  init_args:\n    img_size: 128\n"
        f"    train: {{annotations: {annotations}, images: {annotations.parent}}}\n"
        f"    val: {{annotations: {held_out}}}\n    test: {{annotations: {held_out}}}\n"
        "    batch_size: 1\n"
        "trainer:\n  accelerator: cpu\n  devices: 1\n  max_epochs: 2\n  log_every_n_steps: 1\n"
        "  enable_progress_bar: false\n"
        "  callbacks: [{class_path: samflow.callbacks.warmup.LinearWarmup, init_args: {steps: 3, ratio: 0.1}}]\n"
    )
    base = ["student", "--experiment", str(exp), "--pseudo", str(pseudo), "--head", HEAD]
    whole = root / "whole"
    assert main([*base, "--out", str(whole)]) == 0
    return root, base, whole, pseudo


def _student_state(out: Path) -> tuple[dict, dict]:
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    return ckpt, ckpt["state_dict"]


def _signal_at(step: int, sig: int) -> None:
    """Send ``sig`` to this process at the end of the batch that makes optimizer step ``step``."""

    def on_train_batch_end(self, outputs, batch, batch_idx):
        if self.trainer.global_step == step:
            os.kill(os.getpid(), sig)

    StudentModule.on_train_batch_end = on_train_batch_end


def _killed_run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """``samflow student ARGS`` in a new process killed with SIGKILL after optimizer step 5."""
    code = (
        f"import signal, sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
        "from test_student_resume import _signal_at; _signal_at(5, signal.SIGKILL); "
        "from samflow.cli import main; sys.exit(main(sys.argv[1:]))"
    )
    # the threads of this process, whose runs it is compared with bit for bit (float sums follow them)
    threads = str(torch.get_num_threads())
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": threads}
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        check=False,
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


# SIGTERM (a scheduler's stop; Lightning ends the run after the batch) with last.ckpt every 2 steps: from
# step 4, mid-epoch 1; SIGKILL (nothing runs after it) with last.ckpt at epoch ends: from step 3
@pytest.mark.parametrize(
    ("sig", "every", "saved"), [(signal.SIGTERM, 2, 4), (signal.SIGKILL, 0, 3)], ids=["sigterm", "sigkill"]
)
def test_resumed_student_run_equals_the_uninterrupted_run(setup, monkeypatch, capsys, sig, every, saved):
    root, base, whole, _ = setup
    out = root / f"stopped_{every}"
    args = [*base, "--out", str(out), "--last.every_n_train_steps", str(every)]
    if sig == signal.SIGTERM:
        with monkeypatch.context() as patch:
            patch.setattr(StudentModule, "on_train_batch_end", None, raising=False)
            _signal_at(5, sig)
            assert main(args) == 1
        err = capsys.readouterr().err
        assert "samflow student: stopped by SIGTERM at step 5" in err and "--resume" in err
    else:
        assert _killed_run(args, root).returncode == -signal.SIGKILL
    stopped, _ = _student_state(out)
    assert stopped["global_step"] == saved  # the last whole checkpoint before the signal
    assert not (out / "results.json").exists()
    rows = (out / "metrics.csv").read_text().splitlines()
    # the killed run's rows logged after its checkpoint are in the file: the resume logs them again
    assert int(rows[-1].split(",")[1]) >= saved

    assert main([*args, "--resume"]) == 0
    capsys.readouterr()
    ref, ref_weights = _student_state(whole)
    got, weights = _student_state(out)
    assert got["global_step"] == ref["global_step"] == STEPS
    assert weights.keys() == ref_weights.keys() and all(k.startswith("head.") for k in weights)
    for key, value in ref_weights.items():
        assert torch.equal(weights[key], value), key
    for a, b in zip(
        got["optimizer_states"][0]["state"].values(), ref["optimizer_states"][0]["state"].values()
    ):
        assert torch.equal(a["momentum_buffer"], b["momentum_buffer"])
    assert got["lr_schedulers"] == ref["lr_schedulers"]
    for name in FILES:
        assert (out / name).read_bytes() == (whole / name).read_bytes(), name
    assert json.loads((out / "student_metrics.json").read_text()).keys() == {"val", "test"}
    assert json.loads((out / "results.json").read_text())  # detections to compare


def test_a_run_stopped_in_its_test_resumes_with_its_validation_metrics(setup, capsys):
    """Killed after training, in the test: the checkpoint of the last epoch's end carries the last
    validation's AP into ``student_metrics.json`` (the resumed run trains and validates no more)."""
    root, base, whole, _ = setup
    out = root / "in_test"
    shutil.copytree(whole, out)
    for name in ("results.json", "student_metrics.json"):
        (out / name).unlink()
    rows = (out / "metrics.csv").read_bytes()
    (out / "metrics.csv").write_bytes(
        rows[: rows.rindex(b"\n2,6,") + 1] + b"2,6,0.1"
    )  # killed in the test row
    assert main([*base, "--out", str(out), "--resume"]) == 0
    for name in FILES:
        assert (out / name).read_bytes() == (whole / name).read_bytes(), name
    got, ref = _student_state(out)[1], _student_state(whole)[1]
    assert all(torch.equal(got[k], v) for k, v in ref.items())


def _stop(monkeypatch, args: list[str], step: int) -> Path:
    """``samflow student ARGS`` stopped by SIGTERM after optimizer step ``step``; its last.ckpt."""
    with monkeypatch.context() as patch:
        patch.setattr(StudentModule, "on_train_batch_end", None, raising=False)
        _signal_at(step, signal.SIGTERM)
        assert main(args) == 1
    return Path(args[args.index("--out") + 1]) / "checkpoints" / "last.ckpt"


def _with_head(base: list[str], **options) -> list[str]:
    """``base`` with ``--head`` HEAD and ``options``."""
    assert base[-2] == "--head"
    return [*base[:-1], json.dumps(json.loads(HEAD) | options)]


def test_a_resume_takes_changes_of_what_the_student_never_reads(setup, monkeypatch, capsys):
    """Experiment data options the student never reads (the prompts' points and seed; empty images,
    which it keeps anyway) and head options given at their defaults are no change: the resume is taken
    and ends as the uninterrupted run."""
    root, base, whole, _ = setup
    args = ["--out", str(root / "unused"), "--last.every_n_train_steps", "2"]
    assert _checkpoint(_stop(monkeypatch, [*base, *args], step=5))["global_step"] == 4
    capsys.readouterr()
    unused = ["--data.init_args.empty", "keep", "--data.init_args.points_per_instance", "2"]
    unused += ["--data.init_args.seed", "7"]
    assert main([*_with_head(base, sigma=0.2, nms_pre=500), *args, "--resume", *unused]) == 0
    _same_run(root / "unused", whole)


def test_a_resume_before_any_validation_takes_new_thresholds_for_its_test(setup, monkeypatch, capsys):
    """The head's inference thresholds never change its weights; before any validation they have scored
    nothing yet: the resume is taken, and the run (its validations and test) ends as the uninterrupted
    run with the new thresholds."""
    root, base, whole, _ = setup
    new = _with_head(base, mask_thr=0.6)
    reference = root / "whole_new_thresholds"
    assert main([*new, "--out", str(reference)]) == 0
    args = ["--out", str(root / "thresholds"), "--last.every_n_train_steps", "2"]
    stopped = _checkpoint(_stop(monkeypatch, [*base, *args], step=2))
    assert stopped["global_step"] == 2 and "val" not in stopped["student_metrics"]  # no validation yet
    with pytest.warns(UserWarning, match="resuming with model.student.head.inference .*0.6"):
        assert main([*new, *args, "--resume"]) == 0
    _same_run(root / "thresholds", reference)
    assert _student_state(reference)[1].keys() == _student_state(whole)[1].keys()
    assert all(torch.equal(v, _student_state(whole)[1][k]) for k, v in _student_state(reference)[1].items())
    assert (reference / "results.json").read_bytes() != (whole / "results.json").read_bytes()  # they matter


def _checkpoint(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def _same_run(out: Path, reference: Path) -> None:
    """``out``'s files and head weights are ``reference``'s."""
    for name in FILES:
        assert (out / name).read_bytes() == (reference / name).read_bytes(), name
    got, ref = _student_state(out)[1], _student_state(reference)[1]
    assert got.keys() == ref.keys() and all(torch.equal(got[k], v) for k, v in ref.items())


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("samflow: error:"), err
    return err


def test_resume_refusals(setup, capsys, monkeypatch):
    """Each refusal is one line, before anything runs; the run's files stay as they were."""
    root, base, whole, pseudo = setup
    before = {p: p.read_bytes() for p in whole.rglob("*") if p.is_file()}
    run = [*base, "--out", str(whole), "--resume"]
    # no student run to continue: an empty folder, a missing one
    for out in (root / "empty", root / "missing"):
        (root / "empty").mkdir(exist_ok=True)
        assert main([*base, "--out", str(out), "--resume"]) == 1
        assert "holds no student run to continue" in _one_line_error(capsys)
    assert not (root / "missing").exists()
    assert main([*run, "--overwrite"]) == 1
    assert "--resume: not allowed with --overwrite" in _one_line_error(capsys)
    # a setting that changes the training, named with both values
    changed = {
        "model.student.mps_weight: run 0.5, now 0.25": ["--mps-weight", "0.25"],
        "data.init_args.batch_size: run 1, now 2": ["--data.init_args.batch_size", "2"],
        "model.student.head": ["--head", HEAD.replace('"num_convs": 1', '"num_convs": 2')],
        "model.optimizer.init_args.lr: run 0.01, now 0.02": ["--model.optimizer.init_args.lr", "0.02"],
        'data.init_args.crowd: run "skip", now "keep"': ["--data.init_args.crowd", "keep"],  # train rows
    }
    for key, flags in changed.items():
        assert main([*run, *flags]) == 1
        err = _one_line_error(capsys)
        assert f"--resume {whole}: the resumed run was trained with other settings ({key}" in err, err
        assert err.rstrip().endswith(
            "Resume with them, or start it again with --overwrite, or choose another --out."
        ), err
    # other thresholds after a validation: its AP in metrics.csv was scored with the run's
    assert main([*_with_head(base, mask_thr=0.6), "--out", str(whole), "--resume"]) == 1
    err = _one_line_error(capsys)
    assert "the head's inference options changed (model.student.head.inference: run " in err, err
    assert (
        '"mask_thr": 0.45' in err and '"mask_thr": 0.6' in err and "validations before its checkpoint" in err
    )
    # other pseudo masks: refused by their content
    other = root / "other_pseudo.json"
    data = json.loads(pseudo.read_text())
    data["annotations"] = data["annotations"][1:]
    other.write_text(json.dumps(data))
    assert run[4] == str(pseudo) and main([*run[:4], str(other), *run[5:]]) == 1
    assert "data.student.pseudo_sha256: run " in _one_line_error(capsys)
    # a checkpoint without the student's settings: an earlier samflow's, or not a student's
    (root / "old" / "checkpoints").mkdir(parents=True)
    torch.save({"state_dict": {}, "global_step": 3}, root / "old" / "checkpoints" / "last.ckpt")
    assert main([*base, "--out", str(root / "old"), "--resume"]) == 1
    assert "last.ckpt holds no student run's settings" in _one_line_error(capsys)
    assert {p: p.read_bytes() for p in whole.rglob("*") if p.is_file()} == before
