"""ModelCheckpoint monitors the experiment's main validation metric; file names carry no ``/``.

The main metric is the first of ``model.metrics`` (``val/<name>``; ``val/<name>/<first set>`` with
several ``val_sets``), maximised unless the metric says lower is better. A fit prints its run folder
and its best checkpoint with the score.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from quickstart_tiny import samflow

from samflow.main_metric import checkpoint_filename, main_metric

DATA = "samflow.data.SegmentationDataModule"


@pytest.mark.parametrize(
    ("metrics", "init_args", "expected"),
    [
        (None, {"quickstart": True}, ("val/iou", "max")),  # the module's default metrics
        (["iou", "dice", "mae"], {"val": "v"}, ("val/iou", "max")),
        (["mae", "iou"], {"val": "v"}, ("val/mae", "min")),  # order of the list, not of the names
        (["ber", "iou"], {"val_sets": {"ISTD": "a", "SBU": "b"}}, ("val/ber/ISTD", "min")),
        (["dice"], {"val_sets": {"only": "a"}}, ("val/dice", "max")),  # one set: no suffix
        ({"biou": {"class_path": "BoundaryIoU"}, "iou": None}, {"val": "v"}, ("val/biou", "max")),
        ([{"class_path": "SodMAE"}], {"val": "v"}, ("val/mae_sod", "min")),
        (["iou"], {"train": "t"}, None),  # no validation: nothing to monitor
        (["nope"], {"val": "v"}, None),  # a bad spec is the module's error to report
    ],
)
def test_main_metric(metrics, init_args, expected):
    assert main_metric(metrics, {"class_path": DATA, "init_args": init_args}) == expected


@pytest.mark.parametrize(
    ("data", "init_args", "expected"),
    [
        ("samflow.data.wsi.SlideDataModule", {"val": [{"slide": "s.tif"}]}, ("val/dice", "max")),
        ("samflow.data.wsi.SlideDataModule", {"train": [{"slide": "s.tif"}]}, None),
        (
            "samflow.data.CocoDataModule",
            {"val": {"annotations": "a.json", "images": "i"}},
            ("val/dice", "max"),
        ),
        ("samflow.data.CocoDataModule", {"test": {"annotations": "a.json", "images": "i"}}, None),
    ],
)
def test_samflows_other_data_modules_monitor_their_validation(data, init_args, expected):
    assert main_metric(["dice", "iou"], {"class_path": data, "init_args": init_args}) == expected


def test_other_data_modules_choose_their_own_monitor():
    assert main_metric(["iou"], {"class_path": "my.DataModule", "init_args": {"val": "v"}}) is None


def test_checkpoint_file_names_have_no_slash():
    checkpoint = ModelCheckpoint(
        filename=checkpoint_filename("val/iou/COD10K"), auto_insert_metric_name=False
    )
    name = checkpoint.format_checkpoint_name(
        {"epoch": 3, "step": 40, "val/iou/COD10K": torch.tensor(0.123456)}
    )
    assert Path(name).name == "epoch=3-step=40-val_iou_COD10K=0.1235.ckpt"


def test_a_fit_keeps_the_best_by_the_main_metric_and_prints_it(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    metrics = ["--model.metrics", "[mae, iou]", "--trainer.max_epochs", "2"]
    assert samflow("fit", *metrics, data=tmp_path / "data") == 0
    out = capsys.readouterr().out
    run = tmp_path / "runs" / "quickstart" / "version_0"
    best = [p for p in (run / "checkpoints").iterdir() if p.name != "last.ckpt"]
    assert len(best) == 1 and best[0].name.startswith("epoch=")
    state = torch.load(best[0], map_location="cpu", weights_only=False)
    checkpoint = next(v for k, v in state["callbacks"].items() if k.startswith("ModelCheckpoint"))
    assert checkpoint["monitor"] == "val/mae"
    last = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    maes = [
        float(row.split(",")[header.index("val/mae")])
        for header in [(run / "metrics.csv").read_text().splitlines()[0].split(",")]
        for row in (run / "metrics.csv").read_text().splitlines()[1:]
        if row.split(",")[header.index("val/mae")]
    ]
    assert len(maes) == 2 and float(checkpoint["best_model_score"]) == pytest.approx(min(maes))  # mode min
    assert best[0].name.endswith(f"-val_mae={min(maes):.4f}.ckpt")
    assert last["global_step"] == 2
    assert "run folder runs/quickstart/version_0\n" in out
    assert f"best checkpoint {best[0].relative_to(tmp_path)} (val/mae {min(maes):.4f})" in out
