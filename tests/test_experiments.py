"""Packaged experiments: each resolves and parses with the CLI, names things that exist, and keeps its recipe.

The configs are parsed in-process with ``samflow fit --experiment NAME --print_config`` (nothing is built
and no path is checked); one subprocess checks that a missing dataset root fails the run, naming it.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest
import yaml
from helpers import samflow_here, short_run

from samflow.cli import main
from samflow.data import GpuAugment, SegmentationDataModule, build_prompt
from samflow.data.coco import CocoDataModule
from samflow.data.wsi import SlideDataModule
from samflow.experiment_files import PACKAGED, describe
from samflow.losses import build_loss
from samflow.metrics.registry import build_metrics

EXPERIMENTS = sorted(p.stem for p in Path(str(PACKAGED)).glob("*.yaml"))

HQSEG_EVAL = ["DIS5K-VD", "COIFT", "HRSOD", "ThinObject5K-test"]
# Key values of each recipe (../shared/reference notes): plugin, optimizer, schedule, data.
RECIPES = {
    "sam_adapter_cod": dict(
        plugin="samflow_plugins.sam_adapter.SamAdapter",
        plugin_args={"scale_factor": 32, "hfc": "fft", "freq_rate": 0.25},
        optimizer="torch.optim.AdamW",
        lr=2e-4,
        weight_decay=0.01,
        scheduler="torch.optim.lr_scheduler.CosineAnnealingLR",
        scheduler_args={"T_max": 20, "eta_min": 1e-7},
        max_epochs=20,
        batch_size=2,
        variant="vit_b",
        losses={"bce": 1.0, "soft_iou": 1.0},
        metrics=["s_measure", "e_measure", "weighted_f", "mae_sod"],
        data={"img_size": 1024, "resize_mode": "stretch", "prompt": "none"},
        train_roots=2,
        val_names=[],
        test_names=["COD10K", "CAMO", "CHAMELEON"],
    ),
    "sam_adapter_shadow": dict(
        plugin="samflow_plugins.sam_adapter.SamAdapter",
        optimizer="torch.optim.AdamW",
        lr=2e-4,
        weight_decay=0.01,
        scheduler="torch.optim.lr_scheduler.CosineAnnealingLR",
        scheduler_args={"T_max": 20, "eta_min": 1e-7},
        max_epochs=20,
        batch_size=2,
        variant="vit_b",
        losses={"balanced_bce": 1.0},
        metrics=["ber"],
        data={"img_size": 1024, "resize_mode": "stretch", "prompt": "none"},
        train_roots=1,
        val_names=[],
        test_names=["ISTD"],
    ),
    "sam_adapter_polyp": dict(
        plugin="samflow_plugins.sam_adapter.SamAdapter",
        optimizer="torch.optim.AdamW",
        lr=2e-4,
        weight_decay=0.01,
        scheduler="torch.optim.lr_scheduler.CosineAnnealingLR",
        scheduler_args={"T_max": 20, "eta_min": 1e-7},
        max_epochs=20,
        batch_size=2,
        variant="vit_b",
        losses={"bce": 1.0, "soft_iou": 1.0},
        metrics=["dice", "iou"],
        data={"img_size": 1024, "resize_mode": "stretch", "prompt": "none"},
        train_roots=1,
        val_names=["val"],
        test_names=["Kvasir-SEG"],
    ),
    "lora_polyp": dict(
        plugins={
            "lora": "samflow_plugins.lora.LoRA",
            "decoder": "samflow_plugins.decoder_tuning.DecoderTuning",
        },
        plugin_args={"rank": 4, "alpha": 4.0, "targets": ["qkv"]},
        optimizer="torch.optim.AdamW",
        lr=2e-4,
        weight_decay=0.01,
        scheduler="torch.optim.lr_scheduler.CosineAnnealingLR",
        scheduler_args={"T_max": 20, "eta_min": 1e-7},
        max_epochs=20,
        batch_size=2,
        variant="vit_b",
        losses={"bce": 1.0, "soft_iou": 1.0},
        metrics=["dice", "iou"],
        data={"img_size": 1024, "resize_mode": "stretch", "prompt": "none"},
        train_roots=1,
        val_names=["val"],
        test_names=["Kvasir-SEG"],
    ),
    "hq_sam_hqseg": dict(
        plugin="samflow_plugins.hq_sam.HQSam",
        plugin_args={
            "output": "hq",
            "point_loss": True,
            "num_points": 12544,
            "oversample_ratio": 3.0,
            "importance_sample_ratio": 0.75,
        },
        optimizer="torch.optim.Adam",
        lr=1e-3,
        weight_decay=0.0,
        scheduler="torch.optim.lr_scheduler.StepLR",
        scheduler_args={"step_size": 10, "gamma": 0.1},
        max_epochs=12,
        batch_size=4,
        variant="vit_l",
        losses={},
        metrics=["iou", "boundary_iou"],
        data={"img_size": 1024, "eval_prompt": "box"},
        train_roots=7,
        val_names=HQSEG_EVAL,
        test_names=HQSEG_EVAL,
    ),
    "pa_sam_hqseg": dict(
        plugin="samflow_plugins.pa_sam.PASam",
        plugin_args={"layer": 1, "num_points": 4, "mining_start_epoch": 4},
        optimizer="torch.optim.Adam",
        lr=1e-3,
        weight_decay=0.0,
        scheduler="torch.optim.lr_scheduler.StepLR",
        scheduler_args={"step_size": 10, "gamma": 0.1},
        max_epochs=21,
        batch_size=4,
        variant="vit_l",
        losses={"bce": 1.0, "dice": 1.0},
        metrics=["iou", "boundary_iou"],
        data={"img_size": 1024, "eval_prompt": "box"},
        train_roots=7,
        val_names=HQSEG_EVAL,
        test_names=HQSEG_EVAL,
    ),
    "ba_sam_resolution": dict(
        plugin="samflow_plugins.ba_sam.BASam",
        plugin_args={"bias": "distance", "slopes": "alibi", "learnable": True, "train_decoder": True},
        optimizer="torch.optim.Adam",
        lr=1e-4,
        weight_decay=0.0,
        scheduler="torch.optim.lr_scheduler.ConstantLR",
        scheduler_args={"factor": 1.0, "total_iters": 0},
        max_epochs=50,
        batch_size=2,
        variant="vit_b",
        losses={"bce": 1.0, "dice": 1.0},
        metrics=["iou", "dice", "boundary_iou"],
        data={"img_size": 1024, "resize_mode": "stretch", "eval_prompt": "box"},
        train_roots=1,
        val_names=["DIS-VD"],
        test_names=["DIS-VD", "DIS-TE1", "DIS-TE2", "DIS-TE3", "DIS-TE4"],
    ),
    "wsi_sam_camelyon16": dict(
        plugin="samflow_plugins.wsi_sam.WSISam",
        plugin_args={"aggregation": "sum", "error_correction": True, "correct_in_training": False},
        optimizer="torch.optim.AdamW",
        lr=1e-3,
        weight_decay=0.01,
        scheduler="torch.optim.lr_scheduler.ConstantLR",
        scheduler_args={"factor": 1.0, "total_iters": 0},
        max_epochs=20,
        batch_size=1,
        variant="vit_b",
        losses={},
        metrics=["dice", "slide_dice"],
        data={"mpp": 1.0, "factor": 2.0, "patch_size": 1024, "img_size": 1024, "hflip_jitter": True},
        train_roots=3,
        slides=True,  # SlideDataModule: slide entries per split instead of named folder sets
    ),
    "sapnet_coco": dict(
        plugin="samflow_plugins.sapnet.SAPNet",
        plugin_args={"num_classes": 80, "hidden": 1024, "num_negatives": 500},
        optimizer="torch.optim.SGD",
        lr=0.015,
        weight_decay=1e-4,
        scheduler="torch.optim.lr_scheduler.MultiStepLR",
        scheduler_args={"milestones": [8, 11], "gamma": 0.1},
        max_epochs=12,
        batch_size=4,  # per GPU, x 8 devices = 32
        variant="vit_h",
        losses={},
        metrics=["iou"],
        data={"img_size": 1024, "points": "qc"},
        train_roots=1,
        coco=True,  # CocoDataModule: an annotation file and an images folder per split, and a proposal store
    ),
}


def resolved(args: list[str], tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch) -> dict:
    """The config ``samflow <args> --print_config`` prints, parsed in this process."""
    monkeypatch.chdir(tmp_path)  # no ./experiments here: the packaged files are used
    monkeypatch.setattr(sys, "argv", ["samflow"])  # main() rewrites sys.argv for DDP children
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main([*args, "--print_config"])
    assert exit_info.value.code in (0, None)
    return yaml.safe_load(capsys.readouterr().out)


def import_object(path: str):
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def test_the_packaged_experiments():
    assert set(RECIPES) | {"quickstart"} == set(EXPERIMENTS)


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_resolves_and_everything_it_names_exists(name, tmp_path, capsys, monkeypatch):
    path = Path(str(PACKAGED)) / f"{name}.yaml"
    first = path.read_text().splitlines()[0]
    assert first.startswith("# description: ") and describe(path) and len(describe(path)) <= 120
    config = resolved(["fit", "--experiment", name], tmp_path, capsys, monkeypatch)
    model, data = config["model"], config["data"]
    for key, plugin in model["plugins"].items():
        import_object(plugin["class_path"])(**plugin["init_args"])  # the plugin accepts its arguments
    build_loss(model["losses"])
    build_metrics(model["metrics"])
    import_object(model["optimizer"]["class_path"])
    if model["scheduler"]:
        import_object(model["scheduler"]["class_path"])
    init = dict(data["init_args"])
    if import_object(data["class_path"]) is SlideDataModule:  # slides: the default prompts (WSI-SAM's mix)
        SlideDataModule(**init)  # builds without opening the (placeholder) slides
        assert [type(s).__name__ for s in SlideDataModule(**init).prompt.samplers] == [
            "CentreSizeBoxPrompt",
            "PointPrompt",
            "NoisyMaskPrompt",
        ]
        return
    if import_object(data["class_path"]) is CocoDataModule:  # COCO: builds without reading the files
        assert CocoDataModule(**init).splits["train"]["annotations"].endswith(".json")
        return
    assert import_object(data["class_path"]) is SegmentationDataModule
    build_prompt(init["prompt"])
    build_prompt(init["eval_prompt"])
    augment = init.pop("augment")
    init["augment"] = GpuAugment(**augment["init_args"]) if augment else None
    SegmentationDataModule(**init)  # builds without touching the (placeholder) dataset paths
    for column in config.get("test_report", {}).get("columns") or []:  # metric keys the run will log
        assert column in model["metrics"] or (column.startswith("em_") and "e_measure" in model["metrics"])


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_experiment_keeps_its_recipe(name, tmp_path, capsys, monkeypatch):
    recipe = RECIPES[name]
    config = resolved(["fit", "--experiment", name], tmp_path, capsys, monkeypatch)
    model, data = config["model"], config["data"]["init_args"]
    if "plugins" in recipe:  # several plugins: the first one carries plugin_args
        assert {k: v["class_path"] for k, v in model["plugins"].items()} == recipe["plugins"]
        plugin = model["plugins"][next(iter(recipe["plugins"]))]
    else:
        (plugin,) = model["plugins"].values()
        assert plugin["class_path"] == recipe["plugin"]
    assert recipe.get("plugin_args", {}).items() <= plugin["init_args"].items()
    assert model["sam"]["variant"] == recipe["variant"] and model["sam"]["checkpoint"]
    optimizer = model["optimizer"]
    assert optimizer["class_path"] == recipe["optimizer"]
    assert optimizer["init_args"]["lr"] == pytest.approx(recipe["lr"])
    assert optimizer["init_args"]["weight_decay"] == recipe["weight_decay"]
    assert model["scheduler"]["class_path"] == recipe["scheduler"]
    assert recipe["scheduler_args"].items() <= model["scheduler"]["init_args"].items()
    assert config["trainer"]["max_epochs"] == recipe["max_epochs"]
    assert model["losses"] == recipe["losses"]
    assert set(recipe["metrics"]) <= set(model["metrics"])
    assert data["batch_size"] == recipe["batch_size"]
    assert recipe["data"].items() <= data.items()
    train = data["train"] if isinstance(data["train"], list) else [data["train"]]
    assert len(train) == recipe["train_roots"]
    if recipe.get("slides"):
        assert SlideDataModule(**data).entries["train"][0] == [e["slide"] for e in train]
        return
    if recipe.get("coco"):  # SAPNet: the warm-up, clipping and the total batch of the reference recipe
        trainer = config["trainer"]
        assert data["proposals"] and data["test"]["annotations"].endswith("instances_val2017.json")
        assert data["batch_size"] * trainer["devices"] == 32
        (warmup,) = trainer["callbacks"]
        assert warmup["class_path"] == "samflow.callbacks.warmup.LinearWarmup"
        assert warmup["init_args"] == {"steps": 500, "ratio": 0.001}
        assert trainer["gradient_clip_val"] == 35 and optimizer["init_args"]["momentum"] == 0.9
        return
    names = SegmentationDataModule(**{**data, "augment": None})
    assert names.val_names == recipe["val_names"] and names.test_names == recipe["test_names"]


def test_hqseg_prompts_mix_box_points_and_noisy_masks(tmp_path, capsys, monkeypatch):
    # HQ-SAM draws the three uniformly; PA-SAM's if/elif chain over 7 names gives box 4/7, points 2/7, mask 1/7
    for name, weights in (("hq_sam_hqseg", [1.0, 1.0, 1.0]), ("pa_sam_hqseg", [4.0, 2.0, 1.0])):
        data = resolved(["fit", "--experiment", name], tmp_path, capsys, monkeypatch)["data"]["init_args"]
        mixed = build_prompt(data["prompt"])
        assert [type(s).__name__ for s in mixed.samplers] == ["BoxPrompt", "PointPrompt", "NoisyMaskPrompt"]
        assert mixed.samplers[1].positive == 10 and mixed.samplers[1].negative == 0
        assert mixed.weights.tolist() == weights
        augment = data["augment"]["init_args"]
        assert augment["hflip"] == 0.5 and augment["scale"] == [0.1, 2.0] and augment["translate"] == 0.5


def test_overrides_reach_the_experiment(tmp_path, capsys, monkeypatch):
    args = [
        "fit",
        "--experiment",
        "sam_adapter_cod",
        "--model.sam.variant",
        "vit_h",
        "--model.sam.checkpoint",
        "/ckpt/sam_vit_h_4b8939.pth",
        "--data.init_args.test_sets.CAMO",
        "/mine/CAMO/test",
    ]
    config = resolved(args, tmp_path, capsys, monkeypatch)
    sam = config["model"]["sam"]
    assert sam["variant"] == "vit_h" and sam["checkpoint"] == "/ckpt/sam_vit_h_4b8939.pth"
    test_sets = config["data"]["init_args"]["test_sets"]
    assert list(test_sets) == ["COD10K", "CAMO", "CHAMELEON"] and test_sets["CAMO"] == "/mine/CAMO/test"


def test_a_missing_dataset_root_fails_the_run_naming_it(tmp_path):
    missing = tmp_path / "nowhere" / "Kvasir-SEG" / "test"
    args = [
        "validate",
        "--experiment",
        "sam_adapter_polyp",
        "--model.sam.variant",
        "tiny",
        "--model.sam.checkpoint",
        "null",
        "--data.init_args.img_size",
        "128",
        "--data.init_args.val",
        str(missing),
        "--data.init_args.num_workers",
        "0",
        "--trainer.accelerator",
        "cpu",
    ]
    proc = samflow_here(args, tmp_path, timeout=300)
    assert proc.returncode != 0
    assert f"data.val: Dataset root {missing} does not exist" in proc.stderr, proc.stderr[-3000:]


def test_a_copy_in_the_working_directory_is_found_first_and_run_report_can_be_off(tmp_path):
    """README: a copy in ./experiments/ is found before the packaged experiment; `--run_report.enabled
    false` (here in that copy) writes no report. The copy's description is listed, its values run."""
    local = tmp_path / "experiments"
    local.mkdir()
    text = (PACKAGED / "quickstart.yaml").read_text()
    text = text.replace(describe(PACKAGED / "quickstart.yaml"), "my edited quickstart", 1)
    (local / "quickstart.yaml").write_text(text + "\nrun_report:\n  enabled: false\n")
    listed = samflow_here(["experiments"], tmp_path)
    line = next(row for row in listed.stdout.splitlines() if row.startswith("quickstart "))
    assert "my edited quickstart" in line and str(local / "quickstart.yaml") in line
    data = [
        "--data.init_args.quickstart.root",
        str(tmp_path / "data"),
        "--data.init_args.quickstart.n_train",
        "2",
    ]
    flags = [*short_run(batch_size=2), *data, "--data.init_args.quickstart.n_val", "2"]
    proc = samflow_here(["fit", "--experiment", "quickstart", *flags], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    run = tmp_path / "runs" / "quickstart" / "version_0"
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["run_report"]["enabled"] is False  # the copy ran, not the packaged file
    assert (
        (run / "metrics.csv").is_file()
        and not (run / "report.md").exists()
        and not (run / "report.html").exists()
    )
