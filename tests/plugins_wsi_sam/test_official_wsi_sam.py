"""WSI-SAM against the official code (HongLiuuuuu/WSI-SAM), run as released, on shared random weights.

Set SAMFLOW_WSI_SAM_SRC to a checkout of the official repository (the folder holding ``network.py``,
``inference.py`` and ``segment_anything_training/``); without it these tests skip. Nothing of it is
copied here: its ``inference.run_inference`` runs unchanged (MobileSAM's TinyViT at 1024 px, the
dual decoders ``MaskDecoderHigh`` / ``MaskDecoderLow``, k = k_HR + k_LR, SAM's logits added) on
checkpoints this test writes, in the layout the official code reads from its working directory:

- ``pretrained_checkpoint/mobile_sam.pt``: a random official MobileSAM, which samflow loads too;
- ``pretrained_checkpoint/vit_tiny_maskdecoder.pt``: its mask decoder, which both decoders load;
- ``net_high.pth`` / ``net_low.pth`` (``{"model": ...}``): that decoder plus samflow's randomised
  ``high.*`` / ``low.*`` heads under the official names.

Subclasses of the two decoders record what each returns (SAM's mask, the token's own mask, the
32-d kernel, the fused features U). The training losses come from ``train.py`` at c4ddff9 (deleted
later): the same kernel applied to U_LR, MONAI's squared Dice and BCE on both views.

The official TinyViT imports ``timm`` for ``DropPath``, ``to_2tuple``, ``trunc_normal_`` and
``register_model``; without timm a stand-in of exactly those names exists only while the official
package is imported (drop rate 0 makes DropPath the identity; the others initialise or register).
The official prompt encoder casts coordinates to float32, so both sides run in float32, as released:
they agree to float32 rounding (observed about 2e-6 of the largest logit; the tolerance is 1e-5).

LR box: the official inference maps ``box // 2 + 256``, the training script ``box / 2 + 256``;
samflow's default ``context_affine`` (0.5, S/4, S/4) maps pixel centres exactly, a quarter pixel
lower. The test passes ``context_affine`` (0.5, S/4 + 1/4, S/4 + 1/4), the official mapping, and a
box with even corners, where floor and division agree.
"""

from __future__ import annotations

import importlib
import os
import sys
import types
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from official_code import randomize_all
from torch import nn

from samflow.plugins.stack import PluginStack
from samflow.sam import HookedSam, build_sam
from samflow.testing import random_batch
from samflow_plugins.wsi_sam import WSISam

SRC = os.environ.get("SAMFLOW_WSI_SAM_SRC")
pytestmark = pytest.mark.skipif(not SRC, reason="SAMFLOW_WSI_SAM_SRC (a WSI-SAM checkout) is not set")

SIZE = 1024  # the official code's only size (TinyViT's 64 x 64 view, the 256 x 256 mask grid)
BOX = [100, 240, 612, 700]  # even corners: the official floor (// 2) is then exact
RTOL = 1e-5  # of the reference's largest magnitude: float32 rounding, both sides


def close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal to float32 rounding: ``RTOL`` of the largest magnitude of ``expected``."""
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    atol = RTOL * expected.abs().max().item()
    torch.testing.assert_close(actual, expected, atol=atol, rtol=0)


def _timm_stand_in() -> dict[str, types.ModuleType]:
    """The four names the official ``tiny_vit_sam.py`` takes from timm, as modules for ``sys.modules``."""

    class DropPath(nn.Identity):  # built with drop_path_rate 0.0: the identity
        def __init__(self, drop_prob: float = 0.0) -> None:
            super().__init__()
            self.drop_prob = drop_prob

    names = ("timm", "timm.models", "timm.models.layers", "timm.models.registry")
    modules = {name: types.ModuleType(name) for name in names}
    layers = modules["timm.models.layers"]
    layers.DropPath, layers.to_2tuple, layers.trunc_normal_ = (
        DropPath,
        lambda x: (x, x),
        nn.init.trunc_normal_,
    )
    modules["timm.models.registry"].register_model = lambda fn: fn
    return modules


def _import_official(src: Path, mp: pytest.MonkeyPatch) -> types.ModuleType:
    """The official ``inference`` module (importing ``network`` and ``segment_anything_training``)."""
    for name in ("inference", "network", "transform", "utils", "segment_anything_training"):
        mp.delitem(sys.modules, name, raising=False)
    mp.syspath_prepend(str(src))
    try:
        importlib.import_module("timm")
        stand_in: dict[str, types.ModuleType] = {}
    except ImportError:
        stand_in = _timm_stand_in()
    sys.modules.update(stand_in)
    try:
        return importlib.import_module("inference")
    finally:
        for name in stand_in:
            del sys.modules[name]


def _recording(cls: type, records: dict[str, Any], key: str) -> type:
    """``cls`` whose forward keeps (module, outputs) in ``records[key]``."""

    class Recording(cls):  # type: ignore[misc, valid-type]
        def forward(self, **kwargs: Any) -> Any:
            out = super().forward(**kwargs)
            records[key] = (self, out)
            return out

    return Recording


def _images() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(2)
    high = torch.randint(0, 256, (3, SIZE, SIZE), generator=gen, dtype=torch.uint8)
    low = torch.randint(0, 256, (3, SIZE, SIZE), generator=gen, dtype=torch.uint8)
    return high, low


def _batch(high: torch.Tensor, low: torch.Tensor, affine: list[float] | None):
    """The HR view with its box and HR/LR ground-truth rectangles; ``affine`` None keeps samflow's default."""
    x0, y0, x1, y1 = BOX
    mask = torch.zeros(1, 1, SIZE, SIZE)
    mask[..., y0 : y1 + 1, x0 : x1 + 1] = 1
    context_mask = torch.zeros(1, 1, SIZE, SIZE)
    context_mask[..., y0 // 2 + 256 : y1 // 2 + 257, x0 // 2 + 256 : x1 // 2 + 257] = 1
    return random_batch(1, size=SIZE).replace(
        image=high[None] / 255,
        mask=mask,
        gt_original=[mask[0, 0].bool()],
        box=torch.tensor([BOX], dtype=torch.float32),
        context_image=low[None] / 255,
        context_mask=context_mask,
        context_affine=None if affine is None else torch.tensor([affine]),
    )


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory):
    """Run the official inference and samflow once on the same weights and images -> a namespace."""
    src = Path(SRC or ".")
    before = set(sys.modules)
    try:
        with pytest.MonkeyPatch.context() as mp:
            return _run_both(src, tmp_path_factory.mktemp("wsi_sam_official"), mp)
    finally:  # the official modules leave with the checkout
        for name in set(sys.modules) - before:
            if str(getattr(sys.modules[name], "__file__", None) or "").startswith(str(src)):
                del sys.modules[name]


def _run_both(src: Path, work: Path, mp: pytest.MonkeyPatch) -> types.SimpleNamespace:
    inference = _import_official(src, mp)
    ckpt = work / "pretrained_checkpoint"
    ckpt.mkdir()
    mp.chdir(work)  # the decoders read pretrained_checkpoint/vit_tiny_maskdecoder.pt from here
    from segment_anything_training import build_sam_vit_t

    full = build_sam_vit_t()  # the official MobileSAM of WSI-SAM's package
    randomize_all(full, seed=0)
    torch.save(full.state_dict(), ckpt / "mobile_sam.pt")
    prefix = "mask_decoder."
    decoder = {k[len(prefix) :]: v for k, v in full.state_dict().items() if k.startswith(prefix)}
    torch.save(decoder, ckpt / "vit_tiny_maskdecoder.pt")

    sam = build_sam("mobile_sam", checkpoint=ckpt / "mobile_sam.pt")
    plugin = WSISam()
    hooked = HookedSam(sam, PluginStack({"wsi": plugin})).eval()
    randomize_all(plugin, seed=1)
    nets = {}
    for name in ("high", "low"):
        nets[name] = {**decoder, **getattr(plugin, name).state_dict()}
        torch.save({"model": nets[name]}, ckpt / f"net_{name}.pth")

    records: dict[str, Any] = {}
    mp.setattr(inference, "MaskDecoderHigh", _recording(inference.MaskDecoderHigh, records, "high"))
    mp.setattr(inference, "MaskDecoderLow", _recording(inference.MaskDecoderLow, records, "low"))
    args = types.SimpleNamespace(
        device="cpu",
        model_type="vit_tiny",
        checkpoint_SAM=str(ckpt / "mobile_sam.pt"),
        checkpoint_net_high=str(ckpt / "net_high.pth"),
        checkpoint_net_low=str(ckpt / "net_low.pth"),
    )
    high, low = _images()
    reference = inference.run_inference(high, low, BOX, args)  # (1, 1, 1024, 1024)

    batch = _batch(high, low, [0.5, SIZE / 4 + 0.25, SIZE / 4 + 0.25])
    captured: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        with pytest.MonkeyPatch.context() as heads:
            for name in ("high", "low"):  # samflow's kernel k and fused features U of each head
                head = getattr(plugin, name)
                heads.setattr(head, "kernel", _keep(head.kernel, captured, f"k_{name}"))
                heads.setattr(head, "fused_features", _keep(head.fused_features, captured, f"u_{name}"))
            out, ctx = hooked.run(batch)
        losses = plugin.losses(out, batch, ctx)
        hr_alone = hooked(batch.replace(context_image=None, context_mask=None, context_affine=None))
    return types.SimpleNamespace(
        reference=reference, records=records, nets=nets, out=out, hr_alone=hr_alone,
        losses=losses, captured=captured, batch=batch,
    )  # fmt: skip


def _keep(method: Any, captured: dict[str, torch.Tensor], key: str) -> Any:
    """``method`` that also stores its result in ``captured[key]`` (each key set once)."""

    def call(*args: Any) -> torch.Tensor:
        result = method(*args)
        assert key not in captured, f"{key} computed twice"
        captured[key] = result
        return result

    return call


def upsampled(logits: torch.Tensor) -> torch.Tensor:
    """(N, 1, 256, 256) -> 1024 px, bilinear: the official ``F.interpolate`` of masks_wsi."""
    return F.interpolate(logits, (SIZE, SIZE), mode="bilinear", align_corners=False)


def test_official_decoders_hold_the_written_weights_whole(runs):
    # the official loads are strict=False: a key mismatch would pass silently, so check every tensor
    for name in ("high", "low"):
        net = runs.records[name][0]
        state = net.state_dict()
        assert set(state) == set(runs.nets[name])
        for key, value in runs.nets[name].items():
            assert torch.equal(state[key], value), (name, key)


def test_lr_box_is_the_official_mapping():
    high, low = _images()
    official = torch.tensor([BOX]) // 2 + 256  # inference.py: box_tensor // 2 + 256
    mapped = _batch(high, low, [0.5, SIZE / 4 + 0.25, SIZE / 4 + 0.25]).with_context().box[1:]
    assert torch.equal(mapped, official.float())
    default = _batch(high, low, None).with_context().box[1:]  # exact pixel-centre geometry
    assert torch.equal(default, official.float() - 0.25)


def test_hr_and_lr_kernels_equal_the_official_tokens(runs):
    # masks_wsi_token: hf_mlp of the extra token after each decoder's transformer, (1, 1, 32)
    close(runs.captured["k_high"], runs.records["high"][1][2][:, 0])
    close(runs.captured["k_low"], runs.records["low"][1][2][:, 0])


def test_fused_features_equal_the_official_wsi_embeddings(runs):
    # wsi_image_embeddings: embedding_maskfeature(U_sam) + embedding_encoder(E) + compress_vit_feat(F_early)
    close(runs.captured["u_high"].flatten(2), runs.records["high"][1][3])
    close(runs.captured["u_low"].flatten(2), runs.records["low"][1][3])


def test_sam_masks_equal_the_official_single_mask(runs):
    # masks_sam of each decoder: SAM's token-0 mask, its transformer having seen the extra token
    close(runs.out.masks["sam"][:, :1], runs.records["high"][1][0])
    close(runs.out.context.masks["sam"][:, :1], runs.records["low"][1][0])


def test_fused_kernel_masks_equal_the_official_fusion(runs):
    (_, (_, _, k_hr, u_hr)), (_, (_, _, k_lr, u_lr)) = runs.records["high"], runs.records["low"]
    k = k_hr + k_lr  # inference.py L154 / train.py@c4ddff9: masks_wsi_token_high + masks_wsi_token_low
    close(runs.out.masks["wsi/wsi"], (k @ u_hr).view(1, -1, 256, 256))  # y_HR (inference L155)
    close(runs.out.context.masks["wsi/wsi"], (k @ u_lr).view(1, -1, 256, 256))  # y_LR (train.py)


def test_prediction_equals_run_inference(runs):
    # y_HR + SAM's HR logits, upsampled to 1024 (run_inference's postprocess_masks at 1024 px)
    close(upsampled(runs.out.pred), runs.reference)
    close(upsampled(runs.out.masks["wsi/wsi_sam"]), runs.reference)


def test_hr_head_alone_equals_the_official_high_decoders_own_mask(runs):
    # without context views samflow runs the HR head alone (k = k_HR): MaskDecoderHigh's masks_wsi
    close(upsampled(runs.hr_alone.masks["wsi/wsi"]), runs.records["high"][1][1])


def test_losses_equal_the_official_training_losses(runs):
    from monai.losses import DiceLoss

    seg_loss = DiceLoss(sigmoid=True, squared_pred=True, reduction="mean")  # train.py@c4ddff9 L247-249
    ce_loss = nn.BCEWithLogitsLoss(reduction="mean")
    (_, (_, _, k_hr, u_hr)), (_, (_, _, k_lr, u_lr)) = runs.records["high"], runs.records["low"]
    k = k_hr + k_lr
    # in float64: MONAI's float32 sums over 1024 x 1024 pixels are themselves ~6e-5 off (dice_lr here)
    masks_high = upsampled((k @ u_hr).view(1, -1, 256, 256)).double()
    masks_low = upsampled((k @ u_lr).view(1, -1, 256, 256)).double()
    mask, context_mask = runs.batch.mask.double(), runs.batch.context_mask.double()
    expected = {
        "dice_hr": seg_loss(masks_high, mask),
        "bce_hr": ce_loss(masks_high, mask),
        "dice_lr": seg_loss(masks_low, context_mask),
        "bce_lr": ce_loss(masks_low, context_mask),
    }
    assert set(runs.losses) == set(expected)
    for name, value in expected.items():
        torch.testing.assert_close(runs.losses[name].double(), value, atol=0, rtol=RTOL, msg=name)
