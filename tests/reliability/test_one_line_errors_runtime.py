"""Bad input found after the config is built (data setup, training steps) is one line too.

``samflow fit`` in this process with the tiny SAM: a plugin option that the data cannot serve (SAPNet's
``num_classes`` below the data's categories, ``pdg_box_centres`` on data without boxes) stops at the first
training step, and a COCO option that no dataset can take (``points_per_instance: 0``) stops when the
config is built, not when ``setup`` reads the data: exit status 1, one ``samflow: error:`` line naming
the option, no traceback.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from helpers import samflow_in_process

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "coco"))
from tiny_coco import make_tiny_coco

SHORT = [
    "--quiet",
    "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "1", "--trainer.limit_val_batches", "1",
    "--trainer.num_sanity_val_steps", "0", "--trainer.log_every_n_steps", "1",
]  # fmt: skip


def one_error_line(args: list[str], capsys) -> str:
    """``samflow ARGS`` in this process: exit status 1, no traceback, exactly one ``samflow: error:``
    line on stderr and it is the last; returns it."""
    status = samflow_in_process(args)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("samflow: error:")]
    assert status == 1 and "Traceback" not in err, err[-3000:]
    assert len(errors) == 1 and lines[-1] == errors[0], err[-3000:]
    return errors[0]


@pytest.fixture
def coco_experiment(tmp_path, monkeypatch) -> Path:
    """The tiny COCO set (two categories) as train and val data of the tiny SAM, one image a batch."""
    monkeypatch.chdir(tmp_path)
    coco, _ = make_tiny_coco(tmp_path / "coco")
    experiment = tmp_path / "coco.yaml"
    experiment.write_text(
        "seed_everything: 0\n"
        "model: {sam: {variant: tiny}, losses: {}, metrics: [iou], plugins: {decoder: {class_path: DecoderTuning}}}\n"
        "data:\n  class_path: samflow.data.coco.CocoDataModule\n"
        f"  init_args: {{img_size: 128, train: {{annotations: {coco}}}, val: {{annotations: {coco}}}, batch_size: 2}}\n"
        "trainer: {accelerator: cpu, enable_progress_bar: false}\n"
    )
    return experiment


SAPNET = ["--model.plugins", "{}", "--model.plugins.sap.class_path", "SAPNet"]
SAPNET_SMALL = [
    "--model.plugins.sap.init_args.hidden",
    "16",
    "--model.plugins.sap.init_args.num_negatives",
    "4",
]


def test_sapnet_with_fewer_classes_than_the_data_is_one_line(coco_experiment, capsys):
    """Two categories in the data, ``num_classes: 1``: the first training step refuses the class index 1."""
    classes = ["--model.plugins.sap.init_args.num_classes", "1"]
    args = ["fit", "--experiment", str(coco_experiment), *SHORT, *SAPNET, *SAPNET_SMALL, *classes]
    line = one_error_line(args, capsys)
    assert line.startswith("samflow: error: Plugin 'sap' (sapnet): ") and "0..1, outside [0, 1)" in line
    assert "model.plugins.sap.init_args.num_classes" in line and "at least 2" in line


def test_sapnet_pdg_box_centres_on_data_without_boxes_is_one_line(tmp_path, monkeypatch, capsys):
    """Point prompts give no boxes, whose centres ``pdg_box_centres`` reads."""
    monkeypatch.chdir(tmp_path)
    data = [
        "--data.init_args.quickstart.root", str(tmp_path / "data"), "--data.init_args.quickstart.n_train", "2",
        "--data.init_args.quickstart.n_val", "2", "--data.init_args.batch_size", "2",
        "--data.init_args.prompt", "points",
    ]  # fmt: skip
    centres = ["--model.plugins.sap.init_args.pdg_box_centres", "true"]
    args = ["fit", "--experiment", "quickstart", *SHORT, *data, *SAPNET, *SAPNET_SMALL, *centres]
    line = one_error_line(args, capsys)
    assert line.startswith("samflow: error: Plugin 'sap' (sapnet): pdg_box_centres")
    assert "gives no boxes" in line and "model.plugins.sap.init_args.pdg_box_centres false" in line
    assert not list(tmp_path.rglob("*.ckpt"))


def test_coco_points_per_instance_below_one_is_one_line_before_the_data_is_read(coco_experiment, capsys):
    args = ["fit", "--experiment", str(coco_experiment), *SHORT, "--data.init_args.points_per_instance", "0"]
    # a loss term: the fixture's DecoderTuning with ``losses: {}`` is refused first, before the build
    line = one_error_line([*args, "--model.losses", "{bce: 1.0}"], capsys)
    assert "data.init_args.points_per_instance must be >= 1, got 0" in line
    assert not (coco_experiment.parent / "runs").exists()  # stopped before a run folder


@pytest.mark.parametrize(
    ("option", "expected"),
    [
        (["--data.init_args.img_size", "130"], "data.img_size must be a positive multiple of 4 (mask prompts are S/4), got 130"),
        (["--data.init_args.batch_size", "0"], "data.batch_size must be at least 1, got 0"),
        (["--data.init_args.eval_batch_size", "-2"], "data.eval_batch_size must be at least 1, got -2"),
        (["--data.init_args.num_workers", "-1"], "data.num_workers must be 0 (load in the main process) or more, got -1"),
        (["--data.init_args.quickstart.n_trian", "3"], "data.quickstart: unknown key(s) ['n_trian']; the keys are ['root', "),
        (["--data.init_args.quickstart.size", "[0, 10]"], "0 < smallest <= largest; got n_train=160, n_val=40, size=[0, 10]"),
    ],
)  # fmt: skip
def test_a_data_size_no_dataset_or_loader_can_take_is_one_line_before_the_data_is_read(
    tmp_path, monkeypatch, capsys, option, expected
):
    """Refused when the config is built (the dataset built at setup, the loader after it, raised a
    traceback)."""
    monkeypatch.chdir(tmp_path)
    data = ["--data.init_args.quickstart.root", str(tmp_path / "data")]
    line = one_error_line(["fit", "--experiment", "quickstart", *SHORT, *data, *option], capsys)
    assert expected in line
    assert not (tmp_path / "runs").exists() and not (tmp_path / "data").exists()


@pytest.mark.parametrize(
    ("head", "expected"),
    [
        ("{num_grids: [40, 24]}", "strides, num_grids and scale_ranges need one entry per level, got 3, 2 and 3"),
        ("{num_grid: [40, 24, 16]}", "unexpected keyword argument 'num_grid'"),
        ("[40, 24, 16]", "expected a mapping of SOLOv2Head options"),
    ],
)  # fmt: skip
def test_student_head_options_the_head_refuses_are_one_line_naming_head(
    coco_experiment, capsys, head, expected
):
    """Checked before any file is read (was a traceback once the data was read and the student built)."""
    pseudo = coco_experiment.parent / "coco" / "instances.json"  # a COCO file: what pseudo-masks writes
    out = coco_experiment.parent / "student"
    args = ["student", "--experiment", str(coco_experiment), "--pseudo", str(pseudo), "--out", str(out)]
    line = one_error_line([*args, "--head", head], capsys)
    assert (
        line.startswith(f"samflow: error: samflow student: argument --head {head!r}: ") and expected in line
    )
    assert "`samflow student --help`" in line and not out.exists()


def test_coco_batch_size_or_workers_below_what_a_loader_takes_is_one_line_before_the_data_is_read(
    coco_experiment, capsys
):
    args = ["fit", "--experiment", str(coco_experiment), *SHORT, "--model.losses", "{bce: 1.0}"]
    args += ["--data.init_args.batch_size", "0"]  # a loss term: ``losses: {}`` alone is refused first
    assert "data.init_args.batch_size must be at least 1, got 0" in one_error_line(args, capsys)
    args[-2:] = ["--data.init_args.num_workers", "-1"]
    assert (
        "data.init_args.num_workers must be 0 (load in the main process) or more, got -1"
        in one_error_line(args, capsys)
    )
    assert not (coco_experiment.parent / "runs").exists()


@pytest.mark.parametrize(
    ("option", "expected"),
    [
        ("tumour_fraction 50", "data.init_args.tumour_fraction is a share of the patches, in [0, 1]; got 50.0"),
        ("patch_size 0", "data.init_args.patch_size must be at least 1, got 0"),  # was a ZeroDivisionError
        ("factor 0", "data.init_args.factor must be positive, got 0.0"),  # was a ZeroDivisionError
        ("batch_size 0", "data.init_args.batch_size must be at least 1, got 0"),
        ("patches_per_slide 0", "data.init_args.patches_per_slide must be at least 1, got 0"),  # trained nothing
        ("num_workers -1", "data.init_args.num_workers must be 0 (load in the main process) or more, got -1"),
    ],
)  # fmt: skip
def test_a_slide_option_the_patches_cannot_use_is_one_line_before_a_slide_is_read(
    tmp_path, monkeypatch, capsys, option, expected
):
    pytest.importorskip("tiffslide")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "wsi"))
    from synthetic_slide import write_geojson, write_slide

    monkeypatch.chdir(tmp_path)
    slide, _ = write_slide(tmp_path)
    entry = f'[{{"slide": "{slide}", "annotations": "{write_geojson(tmp_path)}"}}]'
    name, value = option.split()
    data = {"train": entry, "val": entry, "test": "[]", "patch_size": "64", "img_size": "128", name: value}
    flags = [item for key, text in data.items() for item in (f"--data.init_args.{key}", text)]
    args = [
        "fit",
        "--experiment",
        "wsi_sam_camelyon16",
        "--model.sam.variant",
        "tiny",
        "--model.sam.checkpoint",
    ]
    line = one_error_line([*args, "null", *SHORT, *flags], capsys)
    assert expected in line and not (tmp_path / "runs").exists()


def predict_slide_args(tmp_path: Path, monkeypatch) -> list[str]:
    """``predict-slide`` of a synthetic slide in ``tmp_path`` with the tiny SAM, writing ``tmp_path/out``."""
    pytest.importorskip("tiffslide")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "wsi"))
    from synthetic_slide import write_slide

    monkeypatch.chdir(tmp_path)
    slide, _ = write_slide(tmp_path)
    args = ["predict-slide", str(slide), "--experiment", "wsi_sam_camelyon16", "--out", str(tmp_path / "out")]
    tiny = ["--tile", "64", "--overlap", "0", "--model.sam.variant", "tiny", "--model.sam.checkpoint", "null"]
    return [*args, *tiny]


@pytest.mark.parametrize("flag", [["--mpp", "0"], ["--mpp", "-1"], ["--factor", "0"]])
def test_predict_slide_resolution_flags_that_are_not_positive_are_one_line(
    tmp_path, monkeypatch, capsys, flag
):
    """Refused before the slide is read (was a ZeroDivisionError or numpy's error while it was read)."""
    sizes = ["--data.init_args.img_size", "128", "--data.init_args.patch_size", "64"]
    line = one_error_line([*predict_slide_args(tmp_path, monkeypatch), *sizes, *flag], capsys)
    assert f"samflow predict-slide: argument {flag[0]}: must be positive, got {float(flag[1])}" in line
    assert "`samflow predict-slide --help`" in line and not (tmp_path / "out").exists()


@pytest.mark.parametrize("value", ["1.0", "2", "-0.5"])
def test_a_model_threshold_outside_a_probability_is_one_line(tmp_path, monkeypatch, capsys, value):
    """``model.threshold`` 2 gave empty masks and IoU 0 with exit 0; now refused as the model is built."""
    monkeypatch.chdir(tmp_path)
    args = ["fit", "--experiment", "quickstart", *SHORT, "--model.threshold", value]
    line = one_error_line(args, capsys)
    assert f"model.threshold is a probability in [0, 1), got {float(value)}" in line
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    "flags, expected",
    [
        (["--mps-weight", "-1"], "argument --mps-weight: must be 0 (off) or more, got -1.0"),
        (["--head", "{in_channels: 64}"], "in_channels is the SAM embedding's width, which the student sets"),
    ],
)
def test_student_options_the_student_cannot_take_are_one_line(coco_experiment, capsys, flags, expected):
    """Refused before any file is read: a negative MPS weight (was accepted, a loss rewarding errors) and the
    head's ``in_channels`` (was a traceback: the student passes it itself)."""
    pseudo = coco_experiment.parent / "coco" / "instances.json"
    out = coco_experiment.parent / "student"
    args = ["student", "--experiment", str(coco_experiment), "--pseudo", str(pseudo), "--out", str(out)]
    line = one_error_line([*args, *flags], capsys)
    assert expected in line and "`samflow student --help`" in line and not out.exists()


@pytest.mark.parametrize("value", ["1", "1.5", "-0.1"])
def test_predict_slide_threshold_outside_a_probability_is_one_line(tmp_path, monkeypatch, capsys, value):
    """``--threshold 2`` predicted no tumour anywhere with exit 0; now refused before the slide is read."""
    line = one_error_line([*predict_slide_args(tmp_path, monkeypatch), "--threshold", value], capsys)
    assert f"argument --threshold: a probability in [0, 1), got {float(value)}" in line
    assert not (tmp_path / "out").exists()
