"""WSI-SAM against the official code (HongLiuuuuu/WSI-SAM), run as released, on shared random weights.

The official code comes from SAMFLOW_WSI_SAM_SRC, a checkout of the official repository (the folder
holding ``network.py``, ``inference.py`` and ``segment_anything_training/``). Without it the tests
compare samflow with the official outputs recorded in ``tests/reference_outputs/wsi_sam.pt``
(``official_code.ReferenceOutputs``: record them again with SAMFLOW_RECORD_REFERENCE=1 and the
checkout), checked against a fingerprint of the weights, images, box and targets that went in. An
official tensor of over 4096 elements (the masks, the fused features U) is recorded as a sketch
(``official_code.Sketch``: its values at 4096 seeded positions, its sum and its marginals) beside its
largest magnitude, which sets the tolerance; ``official_code.assert_close`` compares it, and whole
tensors whenever the checkout is given. One test needs the official modules themselves and skips
without the checkout: the weights the official decoders hold (their state-dict keys, after their
non-strict loads).

Nothing of the official code is copied here: its ``inference.run_inference`` runs unchanged
(MobileSAM's TinyViT at 1024 px, the dual decoders ``MaskDecoderHigh`` / ``MaskDecoderLow``,
k = k_HR + k_LR, SAM's logits added) on checkpoints this test writes from samflow's random weights,
in the layout the official code reads from its working directory:

- ``pretrained_checkpoint/mobile_sam.pt``: samflow's random MobileSAM, loaded into an official one
  (whose TinyViT classifier head, never run, keeps its own initial values);
- ``pretrained_checkpoint/vit_tiny_maskdecoder.pt``: its mask decoder, which both decoders load;
- ``net_high.pth`` / ``net_low.pth`` (``{"model": ...}``): that decoder plus samflow's randomised
  ``high.*`` / ``low.*`` heads under the official names.

Subclasses of the two decoders record what each returns (SAM's mask, the token's own mask, the
32-d kernel, the fused features U). The training losses come from ``train.py`` at c4ddff9 (deleted
later): the same kernel applied to U_LR, MONAI's squared Dice and BCE on both views. The 1024 px
masks the official code returns (``run_inference``'s output, ``MaskDecoderHigh``'s own mask) are
compared as returned; with the checkout the test also checks that they are its 256 x 256 masks
upsampled, bit for bit.

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
import math
import sys
import types
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from official_code import ReferenceOutputs, assert_close, fingerprint, randomize_all
from torch import nn

from samflow.plugins.stack import PluginStack
from samflow.sam import HookedSam, build_sam
from samflow.testing import random_batch
from samflow_plugins.wsi_sam import WSISam

REF = ReferenceOutputs("wsi_sam", "SAMFLOW_WSI_SAM_SRC")
CHECKOUT_ONLY = pytest.mark.skipif(
    not REF.src, reason="needs the official modules themselves: set SAMFLOW_WSI_SAM_SRC (a WSI-SAM checkout)"
)

SIZE = 1024  # the official code's only size (TinyViT's 64 x 64 view, the 256 x 256 mask grid)
BOX = [100, 240, 612, 700]  # even corners: the official floor (// 2) is then exact
RTOL = 1e-5  # of the reference's largest magnitude: float32 rounding, both sides


def close(actual: torch.Tensor, expected: dict[str, Any], key: str) -> None:
    """Equal to the official output ``expected[key]`` (a tensor, or a recorded ``Sketch``) to float32
    rounding: ``RTOL`` of its largest magnitude, ``expected["largest"][key]`` (computed on the whole
    official tensor, so the same tolerance live and recorded)."""
    atol = RTOL * expected["largest"][key].item()
    assert_close(actual, expected[key], atol=atol, rtol=0)


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
    generic = ("inference", "network", "transform", "utils", "segment_anything_training")
    # submodules too: PA-SAM's checkout ships a package of the same name, whose cached
    # ``segment_anything_training.build_sam`` the import below would otherwise find
    for name in [n for n in sys.modules if n.split(".")[0] in generic]:
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


def _carrying_the_image(encoder: nn.Module) -> None:
    """Scale every convolution and linear weight of ``encoder`` (``randomize_all``'s, std 0.05) to std
    1 / sqrt(fan-in), so that each layer keeps the scale of its input and the image reaches the embedding.

    At std 0.05 each of TinyViT's three patch mergings (1x1, depthwise 3x3 and 1x1 convolutions, no
    residual: gains 0.05 sqrt(fan-in), ~0.4 x 0.15 x 0.6 in the first) shrinks the image's part of the
    features ~30x: the embedding is then made of the layers' biases, the same for any image (HR and LR
    embeddings ~8e-6 apart, of 3.9), and an LR head fed the HR embedding passed the comparisons."""
    with torch.no_grad():
        for module in encoder.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                weight = module.weight
                weight.mul_(1 / (weight.std() * math.sqrt(weight[0].numel())))


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
    """samflow on random weights and two images, and the official outputs on the same -> a namespace.

    ``expected``: the official outputs (live with the checkout, else recorded); ``live``: the
    official decoders and what they returned, filled only when the official code ran here."""
    sam = build_sam("mobile_sam")
    randomize_all(sam, seed=0)
    _carrying_the_image(sam.image_encoder)
    plugin = WSISam()
    hooked = HookedSam(sam, PluginStack({"wsi": plugin})).eval()
    randomize_all(plugin, seed=1)
    high, low = _images()
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

    live: dict[str, Any] = {}
    work = tmp_path_factory.mktemp("wsi_sam_official")
    targets = (batch.mask, batch.context_mask)

    def official() -> dict[str, Any]:
        return _official(Path(REF.src or "."), work, sam, plugin, (high, low), targets, live)

    inputs = fingerprint(_state(sam), _state(plugin), high, low, BOX, targets, "vit_tiny", SIZE)
    expected = REF.get("run_inference", inputs, official)
    encoded = ctx.encoded
    return types.SimpleNamespace(
        expected=expected, live=live, out=out, hr_alone=hr_alone, losses=losses, captured=captured,
        plugin=plugin, embeddings=encoded.embeddings, early=encoded.features[plugin.early_block],
    )  # fmt: skip


def _state(module: nn.Module) -> dict[str, torch.Tensor]:
    """``module``'s state dict with 0-d tensors as 1-d (BatchNorm's ``num_batches_tracked``, a 0-d
    long, which ``fingerprint`` cannot view as bytes)."""
    return {k: v.reshape(-1) if v.ndim == 0 else v for k, v in module.state_dict().items()}


def _official(
    src: Path, work: Path, sam: nn.Module, plugin: nn.Module, images, targets, live
) -> dict[str, Any]:
    """The official inference (and training losses) on samflow's weights; its modules leave with it."""
    before = set(sys.modules)
    try:
        with pytest.MonkeyPatch.context() as mp:
            return _run_official(src, work, mp, sam, plugin, images, targets, live)
    finally:  # the official modules leave with the checkout
        for name in set(sys.modules) - before:
            if str(getattr(sys.modules[name], "__file__", None) or "").startswith(str(src)):
                del sys.modules[name]


def _run_official(
    src: Path, work: Path, mp: pytest.MonkeyPatch, sam: nn.Module, plugin: nn.Module, images, targets, live
) -> dict[str, Any]:
    inference = _import_official(src, mp)
    ckpt = work / "pretrained_checkpoint"
    ckpt.mkdir()
    mp.chdir(work)  # the decoders read pretrained_checkpoint/vit_tiny_maskdecoder.pt from here
    from segment_anything_training import build_sam_vit_t

    full = build_sam_vit_t()  # the official MobileSAM of WSI-SAM's package, with samflow's weights
    missing, unexpected = full.load_state_dict(sam.state_dict(), strict=False)
    assert not unexpected and all(
        k.startswith(("image_encoder.head.", "image_encoder.norm_head.")) for k in missing
    )
    torch.save(full.state_dict(), ckpt / "mobile_sam.pt")
    prefix = "mask_decoder."
    decoder = {k[len(prefix) :]: v for k, v in sam.state_dict().items() if k.startswith(prefix)}
    torch.save(decoder, ckpt / "vit_tiny_maskdecoder.pt")
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
    reference = inference.run_inference(*images, BOX, args)  # (1, 1, 1024, 1024)
    live.update(records=records, nets=nets)

    (_, (sam_hr, own_hr, k_hr, u_hr)), (_, (sam_lr, _, k_lr, u_lr)) = records["high"], records["low"]
    k = k_hr + k_lr  # inference.py L154 / train.py@c4ddff9: masks_wsi_token_high + masks_wsi_token_low
    y_hr = (k @ u_hr).view(1, -1, 256, 256)  # inference L155
    y_lr = (k @ u_lr).view(1, -1, 256, 256)  # train.py@c4ddff9 (inference's commented line)
    own = (k_hr @ u_hr).view(1, -1, 256, 256)  # network.py L223 masks_ours, before L167's upsampling
    # the 1024 px outputs are these 256 x 256 masks upsampled, bit for bit
    assert torch.equal(upsampled(own), own_hr)
    assert torch.equal(upsampled(y_hr + sam_hr), reference)  # run_inference's postprocess_masks
    outputs = {
        "k_high": k_hr[:, 0],
        "k_low": k_lr[:, 0],
        "u_high": u_hr.view(1, -1, 256, 256),  # wsi_image_embeddings, (1, 32, 256 * 256) as returned
        "u_low": u_lr.view(1, -1, 256, 256),
        "sam_high": sam_hr,
        "sam_low": sam_lr,
        "wsi_high": y_hr,
        "wsi_low": y_lr,
        "prediction": reference,
        "high_alone": own_hr,
    }
    return outputs | {
        "largest": {name: t.abs().max() for name, t in outputs.items()},  # sets each tolerance
        "losses": _official_losses(upsampled(y_hr), upsampled(y_lr), *targets),
    }


def _official_losses(
    masks_high: torch.Tensor, masks_low: torch.Tensor, mask: torch.Tensor, context_mask: torch.Tensor
) -> dict[str, torch.Tensor]:
    """train.py@c4ddff9's losses of y_HR and y_LR (upsampled to 1024 px), in float64: MONAI's
    float32 sums over 1024 x 1024 pixels are themselves ~6e-5 off (dice_lr here)."""
    from monai.losses import DiceLoss

    seg_loss = DiceLoss(sigmoid=True, squared_pred=True, reduction="mean")  # train.py@c4ddff9 L247-249
    ce_loss = nn.BCEWithLogitsLoss(reduction="mean")
    masks_high, masks_low = masks_high.double(), masks_low.double()
    mask, context_mask = mask.double(), context_mask.double()
    return {
        "dice_hr": seg_loss(masks_high, mask),
        "bce_hr": ce_loss(masks_high, mask),
        "dice_lr": seg_loss(masks_low, context_mask),
        "bce_lr": ce_loss(masks_low, context_mask),
    }


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


@CHECKOUT_ONLY
def test_official_decoders_hold_the_written_weights_whole(runs):
    # the official loads are strict=False: a key mismatch would pass silently, so check every tensor
    for name in ("high", "low"):
        net = runs.live["records"][name][0]
        state = net.state_dict()
        assert set(state) == set(runs.live["nets"][name])
        for key, value in runs.live["nets"][name].items():
            assert torch.equal(state[key], value), (name, key)


def test_lr_box_is_the_official_mapping():
    high, low = _images()
    official = torch.tensor([BOX]) // 2 + 256  # inference.py: box_tensor // 2 + 256
    mapped = _batch(high, low, [0.5, SIZE / 4 + 0.25, SIZE / 4 + 0.25]).with_context().box[1:]
    assert torch.equal(mapped, official.float())
    default = _batch(high, low, None).with_context().box[1:]  # exact pixel-centre geometry
    assert torch.equal(default, official.float() - 0.25)


def test_the_views_differ_far_beyond_the_tolerance(runs):
    # U_LR's comparison tells which view the LR head read only if the HR view's image terms differ
    # from the LR view's by far more than its tolerance
    low, (early_hr, early_lr), (emb_hr, emb_lr) = runs.plugin.low, runs.early, runs.embeddings
    atol = RTOL * float(runs.captured["u_low"].abs().max())
    with torch.no_grad():
        by_embedding = low.embedding_encoder(emb_hr[None]) - low.embedding_encoder(emb_lr[None])
        early = low.compress_vit_feat(early_hr[None].permute(0, 3, 1, 2))
        by_early = early - low.compress_vit_feat(early_lr[None].permute(0, 3, 1, 2))
    assert float(by_embedding.abs().max()) > 1000 * atol, "the HR and LR embeddings are too alike"
    assert float(by_early.abs().max()) > 1000 * atol, "the HR and LR early features are too alike"


@pytest.mark.skipif(not REF.available, reason=REF.skip_reason())
def test_hr_and_lr_kernels_equal_the_official_tokens(runs):
    # masks_wsi_token: hf_mlp of the extra token after each decoder's transformer, (1, 1, 32)
    close(runs.captured["k_high"], runs.expected, "k_high")
    close(runs.captured["k_low"], runs.expected, "k_low")


@pytest.mark.skipif(not REF.available, reason=REF.skip_reason())
def test_fused_features_equal_the_official_wsi_embeddings(runs):
    # wsi_image_embeddings: embedding_maskfeature(U_sam) + embedding_encoder(E) + compress_vit_feat(F_early)
    close(runs.captured["u_high"], runs.expected, "u_high")
    close(runs.captured["u_low"], runs.expected, "u_low")


@pytest.mark.skipif(not REF.available, reason=REF.skip_reason())
def test_sam_masks_equal_the_official_single_mask(runs):
    # masks_sam of each decoder: SAM's token-0 mask, its transformer having seen the extra token
    close(runs.out.masks["sam"][:, :1], runs.expected, "sam_high")
    close(runs.out.context.masks["sam"][:, :1], runs.expected, "sam_low")


@pytest.mark.skipif(not REF.available, reason=REF.skip_reason())
def test_fused_kernel_masks_equal_the_official_fusion(runs):
    # k = k_HR + k_LR (inference.py L154): y_HR = k . U_HR (inference L155), y_LR = k . U_LR (train.py)
    close(runs.out.masks["wsi/wsi"], runs.expected, "wsi_high")
    close(runs.out.context.masks["wsi/wsi"], runs.expected, "wsi_low")


@pytest.mark.skipif(not REF.available, reason=REF.skip_reason())
def test_prediction_equals_run_inference(runs):
    # y_HR + SAM's HR logits, upsampled to 1024 (run_inference's postprocess_masks at 1024 px)
    close(upsampled(runs.out.pred), runs.expected, "prediction")  # run_inference's output
    close(upsampled(runs.out.masks["wsi/wsi_sam"]), runs.expected, "prediction")


@pytest.mark.skipif(not REF.available, reason=REF.skip_reason())
def test_hr_head_alone_equals_the_official_high_decoders_own_mask(runs):
    # without context views samflow runs the HR head alone (k = k_HR): MaskDecoderHigh's masks_wsi
    close(upsampled(runs.hr_alone.masks["wsi/wsi"]), runs.expected, "high_alone")


@pytest.mark.skipif(not REF.available, reason=REF.skip_reason())
def test_losses_equal_the_official_training_losses(runs):
    expected = runs.expected["losses"]
    assert set(runs.losses) == set(expected)
    for name, value in expected.items():
        torch.testing.assert_close(runs.losses[name].double(), value, atol=0, rtol=RTOL, msg=name)
