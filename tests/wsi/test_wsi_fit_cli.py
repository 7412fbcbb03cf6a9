"""`samflow fit --experiment wsi_sam_camelyon16` on the synthetic slide (tiny SAM): the packaged recipe
keeps the best checkpoint by its main metric, per-patch Dice (`val/dice`), and prints it."""

from __future__ import annotations

import csv
import json
import sys

import pytest
import torch
import wandb

pytest.importorskip("tiffslide")

from synthetic_slide import write_geojson, write_slide

from samflow.cli import main


def test_the_wsi_recipe_keeps_the_best_checkpoint_by_val_dice(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    slide, _ = write_slide(tmp_path)
    entry = json.dumps([{"slide": str(slide), "annotations": str(write_geojson(tmp_path))}])
    argv = sys.argv
    try:
        options = {
            "model.sam.variant": "tiny",
            "model.sam.checkpoint": "null",
            "data.init_args.train": entry,
            "data.init_args.val": entry,
            "data.init_args.test": "[]",
            "data.init_args.patch_size": "64",
            "data.init_args.img_size": "128",
            "data.init_args.patches_per_slide": "2",
            "data.init_args.eval_patches_per_slide": "2",
            "data.init_args.num_workers": "0",
            "trainer.max_epochs": "2",
            "trainer.num_sanity_val_steps": "0",
            "trainer.enable_progress_bar": "false",
        }
        flags = [item for key, value in options.items() for item in (f"--{key}", value)]
        status = main(["fit", "--experiment", "wsi_sam_camelyon16", *flags])
    finally:
        sys.argv = argv
        wandb.finish()
    assert status == 0
    run = tmp_path / "runs" / "wsi_sam_camelyon16" / "version_0"
    best = [p for p in (run / "checkpoints").iterdir() if p.name != "last.ckpt"]
    assert len(best) == 1 and "-val_dice=" in best[0].name
    state = torch.load(best[0], map_location="cpu", weights_only=False)
    checkpoint = next(v for k, v in state["callbacks"].items() if k.startswith("ModelCheckpoint"))
    assert checkpoint["monitor"] == "val/dice"
    dices = [row["val/dice"] for row in csv.DictReader((run / "metrics.csv").open()) if row["val/dice"]]
    assert len(dices) == 2 and float(checkpoint["best_model_score"]) == pytest.approx(max(map(float, dices)))
    assert f"best checkpoint {best[0].relative_to(tmp_path)} (val/dice " in capsys.readouterr().out
