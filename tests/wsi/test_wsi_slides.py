"""Whole-slide reading on a synthetic pyramidal TIFF: levels by mpp, concentric HR / LR crops,
exact resampling, annotations rasterised at both levels, tissue filtering, the sampler, prompts."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from synthetic_slide import MPP, OBJECT_RGB, TISSUE_WIDTH, object_mask, write_asap, write_geojson, write_slide

pytest.importorskip("tiffslide")
pytest.importorskip("shapely")

from samflow.data.batch import collate
from samflow.data.prompts import PointPrompt
from samflow.data.wsi import (
    CentreSizeBoxPrompt,
    Slide,
    SlideError,
    SlidePatches,
    load_annotations,
    rasterize,
    tissue_mask,
)

P = 64  # patch side in the tests


@pytest.fixture(scope="module")
def slide_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("slide")
    path, levels = write_slide(folder)
    return {
        "slide": path,
        "levels": levels,
        "geojson": write_geojson(folder),
        "xml": write_asap(folder),
        "dir": folder,
    }


def slide_patches(files, **options) -> SlidePatches:
    """Patches of P px (and P px model input) of the synthetic slide with its GeoJSON tumour."""
    return SlidePatches([files["slide"]], [files["geojson"]], patch_size=P, img_size=P, **options)


def test_levels_are_chosen_by_mpp(slide_files):
    slide = Slide(slide_files["slide"])
    assert slide.mpp == MPP and slide.downsamples == [1.0, 2.0, 4.0]
    assert [slide.level_for(m) for m in (0.3, 0.5, 1.0, 1.5, 2.0, 8.0)] == [0, 0, 1, 1, 2, 2]


def test_patch_at_a_level_mpp_is_the_plain_crop(slide_files):
    slide, levels = Slide(slide_files["slide"]), slide_files["levels"]
    # centre (200, 180) level 0 -> level 1 (100, 90): the 64 px field starts at (68, 58)
    assert np.array_equal(slide.read((200.0, 180.0), 1.0, P), levels[1][58:122, 68:132])
    assert np.array_equal(slide.read((200.0, 180.0), 2.0, P), levels[2][13:77, 18:82])


def test_hr_field_is_the_lr_centre(slide_files):
    slide = Slide(slide_files["slide"])
    for centre in [(200.0, 180.0), (380.0, 340.0), (500.0, 256.0)]:
        hr = torch.from_numpy(slide.read(centre, 1.0, P)).permute(2, 0, 1).float()
        lr = torch.from_numpy(slide.read(centre, 2.0, P)).permute(2, 0, 1).float()
        # the pyramid's level 2 is the 2 x 2 mean of level 1, rounded to uint8: equal to 1 grey level
        assert (lr[:, P // 4 : 3 * P // 4, P // 4 : 3 * P // 4] - F.avg_pool2d(hr, 2)).abs().max() <= 1


def test_resamples_exactly_when_no_level_has_the_mpp(slide_files):
    slide, levels = Slide(slide_files["slide"]), slide_files["levels"]
    patch = slide.read((200.0, 200.0), 1.5, 32).astype(np.float64)  # from level 1: 48 px field at (76, 76)
    region = levels[1][76:124, 76:124].astype(np.float64)
    # area mean over 1.5 x 1.5 level-1 pixels = 3 x 3 mean after a 2x nearest upsampling
    fine = region.repeat(2, 0).repeat(2, 1)
    expected = fine.reshape(32, 3, 32, 3, 3).mean((1, 3))
    assert np.abs(patch - expected).max() <= 1  # PIL's fixed-point box filter rounds to uint8
    # and the field is right: a patch at 1.5 um/px centred elsewhere differs
    assert np.abs(slide.read((230.0, 200.0), 1.5, 32).astype(np.float64) - expected).max() > 10


def test_outside_the_slide_is_white(slide_files):
    patch = Slide(slide_files["slide"]).read((0.0, 0.0), 1.0, P)
    assert (patch[: P // 2, : P // 2] == 255).all() and not (patch[P // 2 :, P // 2 :] == 255).all()


def test_slide_without_mpp_needs_it(tmp_path):
    path, _ = write_slide(tmp_path, with_mpp=False)
    with pytest.raises(
        SlideError, match=r"no microns-per-pixel metadata.*data.init_args.slide_mpp, or --slide-mpp"
    ):
        Slide(path)
    assert Slide(path, mpp=0.5).level_mpp(2) == 2.0


@pytest.mark.parametrize("kind", ["geojson", "xml"])
def test_masks_rasterise_at_both_levels(slide_files, kind):
    region = load_annotations(slide_files[kind])
    for mpp, origin in [(1.0, (140.0, 100.0)), (2.0, (120.0, 96.0)), (0.5, (300.0, 290.0))]:
        pixel = mpp / MPP
        mask = rasterize(region, origin, pixel, P)
        centres = np.arange(P) + 0.5
        xs, ys = np.meshgrid(origin[0] + centres * pixel, origin[1] + centres * pixel)
        expected = object_mask(xs, ys)
        if kind == "xml":  # the ASAP file cuts a hole (group _2) out of the rectangle
            expected &= ~((xs > 200) & (xs < 220) & (ys > 160) & (ys < 180))
        assert expected.any() and np.array_equal(mask, expected)


def test_mask_matches_the_drawn_object(slide_files):
    dataset = slide_patches(slide_files, patches_per_slide=4, tumour_fraction=1.0)
    for centre in dataset.centres:
        hr, _, hr_gt, lr_gt = dataset.read_pair(centre)
        assert centre.tumour and hr_gt.any() and lr_gt.any()
        drawn = hr[..., 1] < 80  # the object's green is 30-49, tissue's >= 120 (mixed only on slanted edges)
        assert (drawn == hr_gt).mean() > 0.97 and (drawn & hr_gt).sum() > 0.95 * hr_gt.sum()
        assert np.abs(np.median(hr[hr_gt], 0) - np.array(OBJECT_RGB)).max() < 15


def test_tissue_detection_excludes_the_blank_area(slide_files):
    slide = Slide(slide_files["slide"])
    mask, downsample = tissue_mask(slide, mpp=2.0)
    assert downsample == 4.0 and mask.shape == (128, 192)
    cols = TISSUE_WIDTH // 4
    assert mask[:, :cols].mean() > 0.99 and not mask[:, cols:].any()


def test_sampler_is_seeded_draws_from_tissue_and_keeps_the_ratio(slide_files):
    def make(seed=0):
        return slide_patches(
            slide_files, patches_per_slide=20, tumour_fraction=0.25, seed=seed, tissue_mpp=2.0
        )

    dataset = make()
    assert len(dataset) == 20
    xs = np.array([c.x for c in dataset.centres])
    ys = np.array([c.y for c in dataset.centres])
    assert (xs < TISSUE_WIDTH).all()  # never on the blank glass
    tumour = np.array([c.tumour for c in dataset.centres])
    assert tumour.sum() == 5
    assert np.array_equal(object_mask(xs, ys), tumour)  # tumour centres in the object, the rest outside
    assert make().centres == dataset.centres and make(seed=1).centres != dataset.centres
    before = list(dataset.centres)
    dataset.set_epoch(1)
    assert dataset.centres != before


def test_every_sample_has_a_prompt_and_prompts_map_exactly(slide_files):
    dataset = slide_patches(
        slide_files, patches_per_slide=6, tumour_fraction=0.5, prompt=PointPrompt(positive=3)
    )
    batch = collate([dataset[i] for i in range(len(dataset))])
    assert (batch.point_labels != -1).any(1).all()  # every row prompted; background rows negative
    stacked = batch.with_context()
    lr_points = stacked.points[len(dataset) :]
    for i, centre in enumerate(dataset.centres):
        pixel_hr, pixel_lr = 1.0 / MPP, 2.0 / MPP  # level-0 px per patch px
        slide_hr = np.array([centre.x, centre.y]) + (batch.points[i].numpy() + 0.5 - P / 2) * pixel_hr
        slide_lr = np.array([centre.x, centre.y]) + (lr_points[i].numpy() + 0.5 - P / 2) * pixel_lr
        np.testing.assert_allclose(slide_lr, slide_hr, atol=1e-4)  # the same place on the slide
        labels = batch.point_labels[i]
        assert bool((labels == 1).any()) == bool(batch.mask[i].any())  # negatives only on empty patches
        assert not centre.tumour or bool((labels == 1).any())
        xs, ys = slide_hr[:, 0], slide_hr[:, 1]
        assert np.array_equal(object_mask(xs, ys), (labels == 1).numpy())


def test_noisy_box_is_near_the_tight_box():
    mask = torch.zeros(64, 64, dtype=torch.bool)
    mask[10:30, 20:60] = True
    boxes = torch.stack(
        [CentreSizeBoxPrompt()(mask, torch.Generator().manual_seed(s))["box"] for s in range(200)]
    )
    centre, size = (boxes[:, :2] + boxes[:, 2:]) / 2, boxes[:, 2:] - boxes[:, :2] + 1
    tight_centre = torch.tensor([39.5, 19.5])
    assert ((centre - tight_centre).abs() <= torch.tensor([4.0, 2.0]) + 1e-4).all()  # 0.1 * (w, h) = (4, 2)
    assert (size[:, 1] >= 16 - 1e-4).all() and (size[:, 1] <= 24 + 1e-4).all()  # h 20 +- 0.2 h
    assert (boxes[:, 2] <= 63).all()  # clipped to the image
    assert CentreSizeBoxPrompt(0, 0)(mask, torch.Generator())["box"].tolist() == [20, 10, 59, 29]


def test_folder_mode_pairs_and_end_to_end_with_wsi_sam(slide_files, tmp_path):
    from PIL import Image

    from samflow.data.wsi import PatchPairFolder
    from samflow.module import SamflowModule, SamSpec
    from samflow_plugins.wsi_sam import WSISam

    dataset = slide_patches(slide_files, patches_per_slide=2, tumour_fraction=1.0)
    for sub in ("hi/img/s1", "hi/msk/s1", "lo/img/s1", "lo/msk/s1"):
        (tmp_path / sub).mkdir(parents=True)
    for i, centre in enumerate(dataset.centres):
        hr, lr, hr_gt, lr_gt = dataset.read_pair(centre)
        Image.fromarray(hr).save(tmp_path / f"hi/img/s1/{i}_x.png")
        Image.fromarray(lr).save(tmp_path / f"lo/img/s1/{i}_y.png")
        Image.fromarray(hr_gt).save(tmp_path / f"hi/msk/s1/{i}_x.png")
        Image.fromarray(lr_gt).save(tmp_path / f"lo/msk/s1/{i}_y.png")
    folder = PatchPairFolder(
        tmp_path / "hi/img",
        tmp_path / "lo/img",
        tmp_path / "hi/msk",
        tmp_path / "lo/msk",
        img_size=128,
        match="prefix",
        prompt=CentreSizeBoxPrompt(0, 0),
    )
    assert len(folder) == 2
    batch = collate([folder[i] for i in range(2)])
    hr, _, hr_gt, lr_gt = dataset.read_pair(dataset.centres[0])
    assert torch.equal(batch.gt_original[0], torch.from_numpy(hr_gt))
    assert batch.image.shape == batch.context_image.shape == (2, 3, 128, 128)
    assert torch.equal(
        batch.context_mask[0, 0],
        torch.from_numpy(lr_gt).float().repeat_interleave(2, 0).repeat_interleave(2, 1),
    )
    module = SamflowModule(sam=SamSpec(variant="tiny"), plugins={"wsi": WSISam()}, losses={}).train()
    out, ctx = module(batch)
    terms = module.compute_losses(out, batch, ctx)
    assert {"wsi/dice_lr", "wsi/dice_hr"} <= set(terms) and torch.isfinite(terms["total"])
    with pytest.raises(FileNotFoundError, match="no partner"):
        PatchPairFolder(tmp_path / "hi/img", tmp_path / "lo/img", match="stem")
