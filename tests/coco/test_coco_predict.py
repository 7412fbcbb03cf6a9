"""``samflow predict`` on COCO instances writes one mask per instance, ``<image id>_<annotation id>.png``,
each the prediction of its own prompt row: the instances of one image never overwrite each other."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import wandb
from PIL import Image

pytest.importorskip("pycocotools")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from tiny_coco import make_tiny_coco

from samflow.cli import main
from samflow.data.coco import CocoDataModule
from samflow.data.coco_batch import collate_coco
from samflow.module import SamflowModule, SamSpec
from samflow_plugins.decoder_tuning import DecoderTuning


@pytest.fixture(scope="module")
def predicted(tmp_path_factory) -> tuple[Path, Path, dict[int, dict[int, np.ndarray]]]:
    """``samflow predict`` of the tiny COCO set (4 images, 3 instances each but the 4th, which has none)
    with a random tiny SAM, 2 images a batch, masks and probabilities: (annotations, output, truth)."""
    work = tmp_path_factory.mktemp("coco_predict")
    coco, truth = make_tiny_coco(work / "coco")
    experiment = work / "coco.yaml"
    experiment.write_text(
        "seed_everything: 0\n"
        "model: {sam: {variant: tiny}, plugins: {decoder: {class_path: DecoderTuning}}}\n"
        "data:\n  class_path: samflow.data.coco.CocoDataModule\n"
        f"  init_args: {{img_size: 128, predict: {{annotations: {coco}}}, batch_size: 2, empty: keep}}\n"
        "trainer: {accelerator: cpu, enable_progress_bar: false}\n"
    )
    out = work / "out"
    args = ["predict", "--experiment", str(experiment), "--quiet", "--predictions.output_dir", str(out)]
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(work)  # the run folder is ./runs/coco/version_0
        patch.setattr(sys, "argv", list(sys.argv))
        try:
            assert main([*args, "--predictions.save_probabilities", "true"]) == 0
        finally:
            wandb.finish()
    return coco, out, truth


def test_every_instance_gets_its_own_files(predicted):
    _, out, truth = predicted
    stems = [f"{image}_{ann}" for image, anns in truth.items() for ann in anns]
    assert len(stems) == 9  # 3 instances on each of images 1-3, none on image 4
    expected = {f"{stem}.png" for stem in stems} | {f"{stem}_prob.png" for stem in stems}
    assert {p.name for p in out.iterdir()} == expected | {"samflow_predict.json"}  # and the run's record


def test_each_file_is_the_prediction_of_its_own_row(predicted):
    """Each instance's mask and probability equal the model's output for that instance's prompt row,
    recomputed on the run's batches (the rows of one image differ, so a file of another row would show)."""
    coco, out, truth = predicted
    module = SamflowModule(sam=SamSpec(variant="tiny"), plugins={"decoder": DecoderTuning()}).eval()
    dm = CocoDataModule(predict={"annotations": str(coco)}, img_size=128, empty="keep")
    dm.setup("predict")
    items = [dm.datasets["predict"][index] for index in range(4)]
    checked = 0
    for batch in (collate_coco(items[:2]), collate_coco(items[2:])):  # as the run's batch_size 2
        with torch.no_grad():
            rows, _ = module(batch)
            probs = module.probabilities(rows, batch)
        assert batch.ann_ids is not None and len(probs) == batch.num_rows
        images = batch.image_index.tolist()
        for row, (image, ann, prob) in enumerate(zip(images, batch.ann_ids.tolist(), probs)):
            image_id = int(batch.id[image])
            assert ann in truth[image_id]
            grey = (prob.numpy() * 255).round().astype(np.uint8)
            others = [
                (p.numpy() * 255).round() for r, p in enumerate(probs) if r != row and images[r] == image
            ]
            assert len(others) == 2 and all(not np.array_equal(grey, g) for g in others)
            stem = f"{image_id}_{ann}"
            mask = np.asarray(Image.open(out / f"{stem}.png"))
            assert mask.shape == truth[image_id][ann].shape  # the image's original size
            np.testing.assert_array_equal(mask, (prob > module.threshold).numpy().astype(np.uint8) * 255)
            np.testing.assert_array_equal(np.asarray(Image.open(out / f"{stem}_prob.png")), grey)
            checked += 1
    assert checked == 9


def test_a_second_run_into_the_folder_is_refused_unless_overwrite(predicted, capsys):
    """The instance files are planned before anything runs, as a folder's images are: an earlier run's
    masks are not replaced without ``--predictions.overwrite true``, and the images' folder is refused."""
    coco, out, _ = predicted
    work = out.parent
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    args = [
        "predict",
        "--experiment",
        str(work / "coco.yaml"),
        "--quiet",
        "--predictions.save_probabilities",
        "true",
    ]
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(work)
        patch.setattr(sys, "argv", list(sys.argv))
        try:
            assert main([*args, "--predictions.output_dir", str(out)]) == 1
            err = capsys.readouterr().err
            assert "already holds 18 of the 18 files" in err and "--predictions.overwrite true" in err, err
            assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
            assert main([*args, "--predictions.output_dir", str(coco.parent / "images")]) == 1
            assert "holds the input image" in capsys.readouterr().err
            assert main([*args, "--predictions.output_dir", str(out), "--predictions.overwrite", "true"]) == 0
        finally:
            wandb.finish()
