"""Sample grids: the prompt, overlays and error map drawn at known pixels, IoU per row, plugin panels."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from samflow.callbacks.sample_drawing import BASE_PANELS, STRIP, SampleRow, row_iou, sample_grid
from samflow.callbacks.samples import SampleGrid, batch_rows, wandb_image
from samflow.module import SamflowModule, SamSpec
from samflow.plugins import SamplePanel
from samflow.testing import random_batch

S = 32


def black_row(**prompts) -> SampleRow:
    """A black image; ground truth x, y in [4, 12); prediction x in [8, 16), y in [4, 12)."""
    target = torch.zeros(1, S, S)
    target[0, 4:12, 4:12] = 1
    prob = torch.zeros(1, S, S)
    prob[0, 4:12, 8:16] = 0.9
    return SampleRow(
        id="a", image=torch.zeros(3, S, S), target=target, prob=prob, size=(S, S), iou=1 / 3, **prompts
    )


def cell(grid: np.ndarray, row: int, panel: int, y: int, x: int) -> tuple[int, ...]:
    """The RGB value at (y, x) of panel ``panel`` of grid row ``row`` (layout of ``sample_grid``)."""
    top = STRIP + row * (STRIP + S) + STRIP
    return tuple(int(v) for v in grid[top + y, panel * S + x])


def test_row_iou_by_hand():
    row = black_row()
    pred, target = row.prob[0] > 0.5, row.target[0] > 0.5
    assert row_iou(pred, target) == pytest.approx(32 / 96)  # 4 x 8 shared of 8 x 12
    assert row_iou(torch.zeros(4, 4, dtype=torch.bool), torch.zeros(4, 4, dtype=torch.bool)) == 1.0


def test_panels_and_colours_at_known_pixels():
    points = torch.tensor([[20.0, 20.0], [26.0, 26.0], [0.0, 0.0]])
    labels = torch.tensor([1, 0, -1])
    row = black_row(box=torch.tensor([2.0, 2.0, 29.0, 29.0]), points=points, labels=labels)
    grid = sample_grid([row, black_row()])
    assert grid.shape == (STRIP + 2 * (STRIP + S), 4 * S, 3)
    # prompt: the box edge yellow, the positive point green, the negative red, the padding slot not drawn
    assert cell(grid, 0, 0, 2, 15) == (255, 255, 0)
    assert cell(grid, 0, 0, 20, 20) == (0, 255, 0)
    assert cell(grid, 0, 0, 26, 26) == (255, 0, 0)
    assert cell(grid, 0, 0, 0, 0) == (0, 0, 0)
    assert cell(grid, 1, 0, 2, 15) == (0, 0, 0)  # the second row has no prompt
    # ground truth green and prediction orange at half opacity over black: floor(0.5 * colour)
    assert cell(grid, 0, 1, 5, 5) == (0, 127, 0) and cell(grid, 0, 1, 5, 13) == (0, 0, 0)
    assert cell(grid, 0, 2, 5, 13) == (127, 82, 0) and cell(grid, 0, 2, 5, 5) == (0, 0, 0)
    # errors: false positive red, false negative blue, true positive and true negative unpainted
    assert cell(grid, 0, 3, 5, 13) == (255, 0, 0)
    assert cell(grid, 0, 3, 5, 5) == (0, 0, 255)
    assert cell(grid, 0, 3, 5, 9) == (0, 0, 0) and cell(grid, 0, 3, 20, 20) == (0, 0, 0)
    # the text strips hold white (anti-aliased) text: the header above every panel, the IoU above every row
    for panel in range(4):
        assert grid[:STRIP, panel * S : (panel + 1) * S].max() > 200
    assert grid[STRIP : 2 * STRIP].max() > 200 and grid[2 * STRIP + S : 3 * STRIP + S].max() > 200


def test_mask_prompt_outline_and_padding():
    low = torch.zeros(1, S // 4, S // 4)
    low[0, 2:6, 2:6] = 1  # 8 .. 23 at full size
    row = black_row(mask_prompt=low)
    row.size = (S, 10)  # the image is 10 px wide: the rest is padding, out of the error map
    grid = sample_grid([row])
    assert cell(grid, 0, 0, 8, 15) == (0, 255, 255)  # on the outline
    assert cell(grid, 0, 0, 15, 15) == (0, 0, 0)  # inside, not filled
    assert cell(grid, 0, 3, 5, 13) == (0, 0, 0)  # a false positive in the padding is not counted


def test_plugin_panels_get_their_own_columns():
    values = torch.zeros(1, 1, 8, 8)
    values[..., :4, :4] = 1.0  # 0 .. 15 at full size
    heat = SamplePanel(
        torch.full((1, 1, 8, 8), 0.5), "heat", torch.tensor([[[24.0, 24.0]]]), torch.tensor([[0]])
    )
    row = black_row(panels={"hq/hq": SamplePanel(values), "pa/uncertainty": heat})
    grid = sample_grid([row, black_row()])
    assert grid.shape[1] == (len(BASE_PANELS) + 2) * S
    assert cell(grid, 0, 4, 4, 4) == (127, 0, 127) and cell(grid, 0, 4, 24, 24) == (0, 0, 0)
    assert cell(grid, 0, 5, 24, 24) == (255, 0, 0)  # a negative point on the heat map
    assert cell(grid, 0, 5, 4, 4) != (0, 0, 0)  # the heat map is drawn
    assert cell(grid, 1, 4, 4, 4) == (0, 0, 0)  # a row without that panel stays black


def test_hq_sam_and_pa_sam_add_their_panels():
    from samflow_plugins.hq_sam import HQSam
    from samflow_plugins.pa_sam import PASam

    module = SamflowModule(SamSpec(variant="tiny"), plugins={"hq": HQSam(), "pa": PASam(num_points=2)}).eval()
    batch = random_batch(2)
    with torch.no_grad():
        out, ctx = module(batch)
    outputs = {"out": out, "ctx": ctx, "probs": module.upsample(out.pred).sigmoid(), "model": module.model}
    rows = batch_rows(batch, outputs, 0.5)
    assert [list(r.panels) for r in rows] == [["hq/hq", "pa/uncertainty"]] * 2
    torch.testing.assert_close(rows[1].panels["hq/hq"].values, out.masks["hq/hq"][1:2].sigmoid())
    pa = rows[0].panels["pa/uncertainty"]
    assert pa.style == "heat" and pa.points is not None and pa.point_labels is not None
    assert pa.points.shape == (1, 4, 2) and pa.point_labels.tolist() == [[1, 1, 0, 0]]
    assert bool((pa.points >= 0).all() and (pa.points <= batch.size).all())
    # each row's IoU is that of its own prediction and ground truth
    pred = outputs["probs"][1, 0] > 0.5
    assert rows[1].iou == pytest.approx(row_iou(pred, batch.mask[1, 0] > 0.5))
    assert sample_grid(rows).shape[1] == 6 * batch.size


def test_best_and_worst_rows():
    callback = SampleGrid(num_samples=2, num_extremes=2)
    ious = [0.5, 0.9, 0.1, 0.7, 0.3, 0.2]
    for start in (0, 3):
        batch = random_batch(3, size=16)
        probs = torch.zeros(3, 1, 16, 16)
        batch.mask = torch.zeros(3, 1, 16, 16)
        for n in range(3):  # a prediction of 100 px, ground truth the first 100 * IoU of them
            probs[n, 0].view(-1)[:100] = 1
            batch.mask[n, 0].view(-1)[: round(100 * ious[start + n])] = 1
        outputs = {"out": SimpleNamespace(image_index=torch.arange(3)), "probs": probs}
        callback.on_validation_batch_end(None, None, outputs, batch, start)  # type: ignore[arg-type]
    best, worst = callback.extremes()
    assert [round(r.iou, 2) for r in best] == [0.9, 0.7]
    assert [round(r.iou, 2) for r in worst] == [0.1, 0.2]
    assert [r.iou for r in callback._rows] == pytest.approx([0.5, 0.9])  # the first two rows


def test_wandb_image_has_mask_and_prompt_layers():
    row = black_row(
        box=torch.tensor([2.0, 2.0, 29.0, 29.0]), points=torch.tensor([[20.0, 20.0]]), labels=None
    )
    image = wandb_image(row, 0.5)
    assert set(image._masks) == {"prediction", "ground_truth"}
    np.testing.assert_array_equal(
        image._masks["ground_truth"]._val["mask_data"], (row.target[0] > 0.5).numpy()
    )
    boxes = image._boxes["prompt"]._val
    assert boxes[0]["position"] == {"minX": 2.0, "minY": 2.0, "maxX": 29.0, "maxY": 29.0}
    assert [b["class_id"] for b in boxes] == [1, 2]  # the box, then a positive point
    assert image._caption == "a IoU 0.333"


def test_num_samples_0_keeps_the_best_and_worst_pictures(tmp_path):
    callback = SampleGrid(num_samples=0, num_extremes=2)
    batch = random_batch(3, size=16)
    batch.mask = torch.zeros(3, 1, 16, 16)
    batch.mask[:, 0, :8] = 1
    outputs = {"out": SimpleNamespace(image_index=torch.arange(3)), "probs": torch.rand(3, 1, 16, 16)}
    callback.on_validation_batch_end(None, None, outputs, batch, 0)  # type: ignore[arg-type]
    trainer = SimpleNamespace(
        is_global_zero=True,
        loggers=[],
        default_root_dir=str(tmp_path),
        sanity_checking=False,
        current_epoch=0,
        global_step=0,
    )
    callback.on_validation_epoch_end(trainer, None)  # type: ignore[arg-type]
    assert sorted(p.name for p in (tmp_path / "samples").iterdir()) == ["val_best.png", "val_worst.png"]


@pytest.mark.parametrize("name", ["num_samples", "num_extremes"])
def test_negative_counts_are_refused_by_name(name):
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    with pytest.raises(MisconfigurationException, match=rf"^samples\.{name} is -1; give a count >= 0"):
        SampleGrid(**{name: -1})
