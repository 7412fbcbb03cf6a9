"""Short runs do not collapse: after 1, 2 or 5 epochs the quickstart is never below its frozen start.

Why the quickstart collapsed (``benchmarks/short_runs.py``, numbers in ``benchmarks/README.md``): the
untrained decoder's mask logits are nearly constant around 0 (about 80% of the pixels just above 0.5),
so the frozen start's IoU, 0.09, is that of an almost all-foreground mask. A decoder that has not yet
learned to tell object from background can only lower or raise that constant. Under ``bce + dice`` the
best constant is a probability near the foreground share of the pixels (about 0.12 here), below 0.5:
every mask is empty, IoU 0, until the decoder discriminates (about 30 steps of the quickstart). Lower
learning rates and a linear warm-up only delay the same fall. A loss balanced for small foreground
(``balanced_bce``: foreground and background pixels weigh the same) puts the best constant above 0.5,
an all-foreground mask (IoU = the foreground share, above the start), so every step from there on can
only add discrimination. The quickstart uses ``balanced_bce + dice``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from samflow.cli import main
from samflow.data.quickstart import make_quickstart_data
from samflow.losses import build_loss

QUICKSTART = Path(__file__).resolve().parents[2] / "experiments" / "quickstart.yaml"


def quickstart_losses() -> dict:
    return yaml.safe_load(QUICKSTART.read_text())["model"]["losses"]


@pytest.fixture(scope="module")
def masks(tmp_path_factory: pytest.TempPathFactory) -> torch.Tensor:
    """The quickstart's first 16 training masks at 64 px, as {0, 1} floats (16, 1, 64, 64)."""
    root = make_quickstart_data(tmp_path_factory.mktemp("qs"), n_train=16, n_val=0)
    files = sorted((root / "train" / "masks").glob("*.png"))
    arrays = [np.asarray(Image.open(f).resize((64, 64), Image.NEAREST)) > 127 for f in files]
    return torch.from_numpy(np.stack(arrays)).float()[:, None]


def best_constant_probability(losses: dict, masks: torch.Tensor) -> float:
    """σ(c*) for the constant logit c* that minimises ``losses`` on ``masks`` (grid of step 0.02 on [-6, 6]).

    A constant logit is what a decoder that cannot yet tell object from background can change.
    """
    loss = build_loss(losses)
    grid = torch.linspace(-6, 6, 601)
    values = [float(loss(torch.full_like(masks, float(c)), masks)["total"]) for c in grid]
    return float(torch.sigmoid(grid[int(np.argmin(values))]))


def test_the_foreground_of_the_quickstart_is_small(masks):
    share = float(masks.mean())
    assert 0.05 < share < 0.25, share  # the regime in which an unbalanced pixel loss prefers empty masks


def test_unbalanced_bce_and_dice_prefer_empty_masks_before_the_decoder_discriminates(masks):
    """The cause: under bce + dice the best constant is below 0.5, so every predicted mask is empty."""
    p = best_constant_probability({"bce": 1.0, "dice": 1.0}, masks)
    share = float(masks.mean())
    assert p < 0.5 and abs(p - share) < 0.1, (p, share)  # near the prior, pulled up a little by dice


def test_the_quickstart_loss_prefers_full_masks_before_the_decoder_discriminates(masks):
    """The fix: under the quickstart's loss the best constant is above 0.5 (all foreground, IoU > 0)."""
    losses = quickstart_losses()
    assert "balanced_bce" in losses, losses
    assert best_constant_probability(losses, masks) > 0.5


def test_balanced_bce_alone_is_indifferent_between_classes(masks):
    """Hand-worked: for a constant logit c, balanced BCE is (P N / M²)(softplus(c) + softplus(-c)),
    smallest at c = 0 (p = 0.5) whatever the foreground share."""
    assert best_constant_probability({"balanced_bce": 1.0}, masks) == pytest.approx(0.5, abs=0.006)
    loss = build_loss({"balanced_bce": 1.0})
    c = 1.3
    pos = float(masks.sum())
    total = masks.numel()
    expected = pos * (total - pos) / total**2 * (math.log1p(math.exp(c)) + math.log1p(math.exp(-c)))
    assert float(loss(torch.full_like(masks, c), masks)["total"]) == pytest.approx(expected, rel=1e-5)


def _epoch_ious(run: Path) -> list[float]:
    import csv

    with (run / "metrics.csv").open() as f:
        rows = [r for r in csv.DictReader(f) if r.get("val/iou")]
    return [float(r["val/iou"]) for r in sorted(rows, key=lambda r: int(r["epoch"]))]


def test_quickstart_recipe_never_ends_below_its_frozen_start_after_1_2_or_5_epochs(
    tmp_path, monkeypatch, capsys
):
    """The quickstart experiment as a user runs it (its loss, optimizer, learning rates, batch 16, 128 px),
    on a smaller set: 32 training images (2 steps per epoch, so 5 epochs = 10 steps, the window in which
    the old recipe sat at IoU 0) and 16 validation images. No scheduler: the IoU after epoch k of one
    5-epoch run is that of a k-epoch run."""
    recipe = yaml.safe_load(QUICKSTART.read_text())
    assert recipe["model"].get("scheduler") is None  # else epochs 1 and 2 of a 5-epoch run differ
    monkeypatch.chdir(tmp_path)
    data = json.dumps({"root": str(tmp_path / "data"), "n_train": 32, "n_val": 16})
    args = ["fit", "--experiment", "quickstart", "--trainer.max_epochs", "5"]
    args += ["--data.init_args.quickstart", data, "--trainer.enable_progress_bar", "false"]
    assert main(args) == 0, capsys.readouterr().err[-3000:]
    run = next(tmp_path.rglob("val_before_after.json")).parent
    start = json.loads((run / "val_before_after.json").read_text())["before"]["val/iou"]
    ious = _epoch_ious(run)
    assert len(ious) == 5, ious
    assert start > 0.0
    # Until the decoder discriminates, its undecided state is the all-foreground mask, whose IoU is the
    # foreground share; the frozen start is itself an almost all-foreground mask (about 80% of the
    # pixels), a hair above or below it (0.08402 vs 0.08403 here after 2 epochs): 1e-3 of slack for that.
    for epochs in (1, 2, 5):
        assert ious[epochs - 1] >= start - 1e-3, (
            f"after {epochs} epoch(s) IoU {ious[epochs - 1]:.5f} < start {start:.5f}"
        )
    assert ious[-1] > start, (start, ious)  # and after 10 steps it has begun to learn
