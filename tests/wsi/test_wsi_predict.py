"""Slide prediction (samflow predict-slide), the slide data module and label-mask annotations on the
synthetic 3-level slide."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

pytest.importorskip("tiffslide")

from synthetic_slide import MPP, object_mask, write_geojson, write_slide

from samflow.data.prompts import PromptSampler
from samflow.data.wsi import SlideDataModule, load_annotations, load_label_mask, rasterize
from samflow.data.wsi.annotations import rasterize_grid
from samflow.data.wsi.slide import Slide
from samflow.data.wsi.tissue import tissue_mask
from samflow.module import SamflowModule, SamSpec
from samflow.wsi_predict import dice, predict_slide
from samflow.wsi_tiles import tile_origins, tile_probabilities
from samflow_plugins.wsi_sam import WSISam

HR_MPP = 1.0  # HR mask: 384 x 256 px for the 768 x 512 px slide at 0.5 um/px


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("slide")
    path, _ = write_slide(folder)
    return {"slide": path, "geojson": write_geojson(folder), "dir": folder}


@pytest.fixture(scope="module")
def module():
    torch.manual_seed(0)
    return SamflowModule(sam=SamSpec(variant="tiny"), plugins={"wsi": WSISam()}, losses={}).eval()


def read_levels(path):
    import tifffile

    with tifffile.TiffFile(path) as tif:
        levels = [level.asarray() for level in tif.series[0].levels]
        res = tif.pages[0].tags["XResolution"].value
    return levels, 1e4 * res[1] / res[0]  # mpp from pixels per cm


def tissue_tiles(slide, mpp, tile, overlap):
    """((height, width) of the mask at ``mpp``, origins of the tiles that hold tissue), found anew."""
    pixel = mpp / slide.mpp
    width, height = (int(np.ceil(d / pixel)) for d in slide.dimensions)
    tissue, ds = tissue_mask(slide, 16.0)
    origins = []
    for y0 in tile_origins(height, tile, tile - overlap):
        for x0 in tile_origins(width, tile, tile - overlap):
            r0, c0 = int(y0 * pixel / ds), int(x0 * pixel / ds)
            r1, c1 = int(np.ceil((y0 + tile) * pixel / ds)), int(np.ceil((x0 + tile) * pixel / ds))
            if tissue[r0:r1, c0:c1].any():
                origins.append((x0, y0))
    return (height, width), origins


def stitched_by_hand(module, slide_path, tile, overlap, threshold=0.5):
    """The mask stitched independently: every tissue tile's probabilities averaged over a full array,
    a pixel foreground where its probability is above ``threshold`` (glass, never predicted, is 0)."""
    slide = Slide(slide_path)
    (height, width), origins = tissue_tiles(slide, HR_MPP, tile, overlap)
    total = np.zeros((height + tile, width + tile), np.float32)
    count = np.zeros_like(total)
    for x0, y0 in origins:
        (p,) = tile_probabilities(module, slide, [(x0, y0)], mpp=HR_MPP, factor=2.0, tile=tile).numpy()
        total[y0 : y0 + tile, x0 : x0 + tile] += p
        count[y0 : y0 + tile, x0 : x0 + tile] += 1
    prob = np.where(count > 0, total / np.maximum(count, 1), 0)[:height, :width]
    return np.where(prob > threshold, 255, 0).astype(np.uint8), len(origins)


def covered(slide_path, mpp, tile, overlap):
    """255 on the pixels of the tissue tiles at ``mpp``, 0 on the glass no tile covers."""
    slide = Slide(slide_path)
    (height, width), origins = tissue_tiles(slide, mpp, tile, overlap)
    mask = np.zeros((height + tile, width + tile), np.uint8)
    for x0, y0 in origins:
        mask[y0 : y0 + tile, x0 : x0 + tile] = 255
    return mask[:height, :width]


def test_tile_origins_cover_the_length():
    assert tile_origins(384, 128, 96) == [0, 96, 192, 288]
    assert tile_origins(100, 128, 96) == [0]
    assert tile_origins(224, 128, 96) == [0, 96]


@pytest.mark.parametrize(("tile", "overlap", "threshold"), [(128, 32, 0.5), (512, 0, 0.5), (128, 64, 0.45)])
def test_stitched_mask_equals_the_tiles_averaged_by_hand(files, module, tmp_path, tile, overlap, threshold):
    """Overlapping tiles average their probabilities; a slide inside one tile is the untiled prediction."""
    result = predict_slide(
        module,
        files["slide"],
        tmp_path,
        mpp=HR_MPP,
        tile=tile,
        overlap=overlap,
        batch_size=1,
        threshold=threshold,
        progress=False,
    )
    levels, mpp = read_levels(result.mask_path)
    assert result.shape == (256, 384) and levels[0].shape == (256, 384) and mpp == pytest.approx(HR_MPP)
    expected, tiles = stitched_by_hand(module, files["slide"], tile, overlap, threshold)
    assert 0 < (expected > 0).mean() < 1  # the comparison is not trivially all-or-nothing
    np.testing.assert_array_equal(levels[0], expected)
    assert (
        result.tiles == tiles == {512: 1, 32: 9, 64: 12}[tile if tile == 512 else overlap]
    )  # blank glass skipped
    assert not list(tmp_path.glob(".*.u8"))  # the disk-backed scratch is removed


def test_glass_no_tile_covers_is_background_at_threshold_zero(files, module, tmp_path):
    """A pixel is foreground when its probability is above the threshold, on every path (``samflow
    predict``, ``Predictor``, the metrics). Glass without tissue is never predicted (probability 0), so
    it stays background at any threshold, 0 included; every tissue tile's sigmoid is above 0."""
    result = predict_slide(
        module, files["slide"], tmp_path, mpp=HR_MPP, tile=128, overlap=32, threshold=0.0, progress=False
    )
    levels, _ = read_levels(result.mask_path)
    expected = covered(files["slide"], HR_MPP, 128, 32)
    assert (expected == 0).sum() > 1000  # the slide has uncovered glass: 3 of the 12 tiles are skipped
    np.testing.assert_array_equal(levels[0], expected)


def test_pyramid_and_geojson_trace_the_mask(files, module, tmp_path):
    result = predict_slide(module, files["slide"], tmp_path, mpp=0.5, tile=128, overlap=32, progress=False)
    levels, _ = read_levels(result.mask_path)
    assert [lv.shape for lv in levels] == [(512, 768), (256, 384)]
    h, w = levels[1].shape
    np.testing.assert_array_equal(levels[1], levels[0].reshape(h, 2, w, 2).max((1, 3)))
    region = load_annotations(result.geojson_path)  # the written GeoJSON reads back as annotations
    assert json.loads(result.geojson_path.read_text())["features"]
    np.testing.assert_array_equal(rasterize_grid(region, 0.5 / MPP, levels[0].shape), levels[0] > 0)


class WholeTileBox(PromptSampler):
    """The box prompt predict-slide gives: the whole patch."""

    def __call__(self, mask, generator):
        h, w = mask.shape
        return {"box": torch.tensor([0.0, 0.0, w - 1.0, h - 1.0])}


def test_short_fit_improves_slide_dice(files, tmp_path):
    """Train the heads on patches of the slide (the data module's loader), then predict the slide."""
    torch.manual_seed(0)
    data = SlideDataModule(
        train=[{"slide": str(files["slide"]), "annotations": str(files["geojson"])}],
        patch_size=64,
        img_size=128,
        patches_per_slide=8,
        tumour_fraction=0.5,
        prompt=WholeTileBox(),
        hflip_jitter=False,
        batch_size=8,
    )
    batch = next(iter(data.train_dataloader()))
    module = SamflowModule(sam=SamSpec(variant="tiny"), plugins={"wsi": WSISam()}, losses={})
    options = dict(mpp=HR_MPP, tile=64, overlap=16, annotations=files["geojson"], progress=False)
    before = predict_slide(module.eval(), files["slide"], tmp_path / "before", **options).dice
    optimizer = torch.optim.AdamW(
        [p for p in module.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.01
    )
    for _ in range(15):
        module.train()
        out, ctx = module(batch)
        loss = module.compute_losses(out, batch, ctx)["total"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = predict_slide(module.eval(), files["slide"], tmp_path / "after", **options).dice
    print(f"slide Dice before {before:.3f} after {after:.3f}")
    assert after > before + 0.1, (before, after)
    saved = json.loads((tmp_path / "after" / "slide.json").read_text())
    assert saved["dice"] == pytest.approx(after)


def test_dice_by_hand():
    a = np.array([[1, 1, 0, 0]], bool)
    b = np.array([[0, 1, 1, 1]], bool)
    assert dice(a, b) == pytest.approx(2 * 1 / 5) and dice(a & False, b & False) == 1.0


def test_slide_data_module_draws_per_epoch_and_fixed_eval(files):
    entry = {"slide": str(files["slide"]), "annotations": str(files["geojson"])}
    data = SlideDataModule(
        train=[entry],
        val=[entry],
        patch_size=32,
        img_size=32,
        patches_per_slide=4,
        eval_patches_per_slide=3,
        batch_size=2,
    )
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    assert batch.image.shape == batch.context_image.shape == (2, 3, 32, 32)
    assert batch.context_mask.shape == batch.mask.shape == (2, 1, 32, 32)
    assert len(data.val_dataloader().dataset) == 3
    first = list(data.dataset("train").centres)
    data.dataset("train").set_epoch(1)
    assert data.dataset("train").centres != first
    data.dataset("train").set_epoch(0)
    assert data.dataset("train").centres == first
    with pytest.raises(ValueError, match=r"data.init_args.train\[0\]"):
        SlideDataModule(train=[{"path": "x"}])
    with pytest.raises(ValueError, match="no slides for 'test'"):
        data.dataset("test")


def test_label_mask_at_level_1_rasterises_exactly(files, tmp_path):
    from PIL import Image

    yy, xx = np.mgrid[0:256, 0:384]
    label = object_mask(2 * xx + 1.0, 2 * yy + 1.0).astype(np.uint8) * 2  # level 1 (downsample 2), label 2
    Image.fromarray(label).save(tmp_path / "labels.png")
    region = load_label_mask(tmp_path / "labels.png", downsample=2)
    expected = np.kron(label > 0, np.ones((2, 2), bool))  # level 0
    np.testing.assert_array_equal(rasterize(region, (100.0, 80.0), 1.0, 400), expected[80:480, 100:500])
    assert load_label_mask(tmp_path / "labels.png", 2, labels=[1]).is_empty
    same = load_annotations(tmp_path / "labels.png", label_downsample=2)
    assert same.equals(region)


def test_predict_slide_command(files, tmp_path):
    """`samflow predict-slide` from an experiment: the files, the Dice line; a count mismatch is one line."""
    from helpers import samflow_here

    common = [
        "--experiment",
        "wsi_sam_camelyon16",
        "--model.sam.variant",
        "tiny",
        "--model.sam.checkpoint",
        "null",
    ]
    slide, ann = str(files["slide"]), str(files["geojson"])
    done = samflow_here(
        [
            "predict-slide",
            slide,
            *common,
            "--out",
            "preds",
            "--tile",
            "128",
            "--overlap",
            "32",
            "--annotations",
            ann,
        ],
        tmp_path,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "preds" / "slide_mask.tif").is_file() and (
        tmp_path / "preds" / "slide.geojson"
    ).is_file()
    assert "slide.tif: 9 tiles" in done.stdout and "Dice" in done.stdout
    bad = samflow_here(["predict-slide", slide, slide, *common, "--out", "p", "--annotations", ann], tmp_path)
    assert bad.returncode == 1 and "2 slides but 1 --annotations" in bad.stderr + bad.stdout


def test_predict_slide_takes_mpp_factor_tile_and_threshold_from_the_experiment(
    files, tmp_path, capsys, monkeypatch
):
    """A model trained at 0.5 um/px on 256 px patches runs at 0.5 um/px (not the old 1.0 default) on
    256 px tiles (not the old 1024: each tile is resized to the model's input, as its patches were)
    with the experiment's threshold; a flag that differs from the experiment wins and says so in one
    line."""
    import sys

    import tifffile

    from samflow.cli import main

    monkeypatch.setattr(sys, "argv", ["samflow"])
    monkeypatch.chdir(tmp_path)
    common = [
        "predict-slide",
        str(files["slide"]),
        "--experiment",
        "wsi_sam_camelyon16",
        "--model.sam.variant",
        "tiny",
        "--model.sam.checkpoint",
        "null",
        "--data.init_args.mpp",
        "0.5",
        "--model.threshold",
        "0.0",
        "--data.init_args.patch_size",
        "256",
        "--overlap",
        "0",
    ]
    assert main([*common, "--out", "a"]) == 0
    out = capsys.readouterr().out
    assert "differs" not in out
    mask = tifffile.imread(tmp_path / "a" / "slide_mask.tif")
    # 0.5 um/px at the experiment's threshold 0: every predicted probability (a sigmoid) is above 0, so
    # each tissue tile is foreground; glass that no tile covers holds probability 0 and is background
    # (p > t, as every other path thresholds)
    assert mask.shape == (512, 768)
    np.testing.assert_array_equal(mask, covered(files["slide"], 0.5, 256, 0))
    record = json.loads((tmp_path / "a" / "samflow_slides.json").read_text())
    assert (record["tile"], record["tissue_mpp"]) == (256, 16.0)
    other = ["--mpp", "1.0", "--threshold", "0.5", "--factor", "2", "--tile", "128"]
    assert main([*common, "--out", "b", *other]) == 0
    out = capsys.readouterr().out
    assert (
        "samflow predict-slide: --tile 128 differs from the experiment's data.init_args.patch_size 256: the "
        "tiles reach the model at another scale than its patches in training; using --tile 128." in out
    )
    assert (
        "samflow predict-slide: --mpp 1 differs from the experiment's data.init_args.mpp 0.5; using --mpp 1."
        in out
    )
    assert "--threshold 0.5 differs from the experiment's model.threshold 0; using --threshold 0.5." in out
    assert "--factor" not in out  # the experiment's factor is 2 too
    mask = tifffile.imread(tmp_path / "b" / "slide_mask.tif")
    assert mask.shape == (256, 384) and not (mask == 255).all()


@pytest.mark.parametrize(("flag", "value"), [("--tile", "-5"), ("--batch-size", "0")])
def test_predict_slide_refuses_sizes_below_one(files, tmp_path, capsys, flag, value):
    from samflow.cli import main

    args = ["predict-slide", str(files["slide"]), "--experiment", "wsi_sam_camelyon16", "--out", "p"]
    assert main([*args, flag, value]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert f"samflow predict-slide: argument {flag}: must be an integer >= 1, got {value}" in err
