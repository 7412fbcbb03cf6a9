"""HQ-SAM against the official code (SysCV/sam-hq) on shared random weights.

The official code is not vendored. It comes from ``SAMFLOW_HQ_SAM_SRC``, a checkout of SysCV/sam-hq (the
folder holding ``segment_anything/``), or else from the authors' own PyPI release of the same
modules, ``segment-anything-hq`` 0.3 (in the ``test`` extra; its ``modeling`` files are byte for byte
the checkout's at ``fb181f8``). Without either these tests skip. The modeling folder is imported
under another name, without its ``__init__`` (whose TinyViT needs timm; the checkout's package is
also named like segment-anything's). The loss lives only in the checkout's ``train/`` folder, so
its test needs ``SAMFLOW_HQ_SAM_SRC``. A tiny official HQ-SAM (``Sam`` with
``ImageEncoderViT`` and ``MaskDecoderHQ``) gets samflow's tiny SAM and HQ plugin weights by name
(the plugin's parameters are the official decoder's ``hf_token``, ``hf_mlp``, ... one to one) and
its end-to-end ``Sam.forward`` -- early ViT feature, per-image decoding, ``hq_token_only``,
``multimask_output`` -- is compared with samflow's ``HookedSam`` + ``HQSam``. The training loss
(``train/utils/loss_mask.py`` ``loss_masks``: point-sampled BCE + Dice) is cut out of the official
file with ``ast`` (the file imports the training ``utils.misc``, which it does not use) and compared
with the plugin's loss terms on the same random draws.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import importlib.util
import os
import sys
import types
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from helpers import randomize
from official_code import ReferenceOutputs, fingerprint, image_encoder, prompt_encoder

from samflow.batch import SamBatch
from samflow.plugins.stack import PluginStack
from samflow.sam import HookedSam, build_sam
from samflow.sam.build import VARIANTS
from samflow_plugins.hq_sam import HQSam

SRC = os.environ.get("SAMFLOW_HQ_SAM_SRC")


def official_modeling_folder() -> Path | None:
    """``segment_anything/modeling`` of the checkout, else ``modeling`` of the installed release."""
    if SRC:
        return Path(SRC) / "segment_anything" / "modeling"
    spec = importlib.util.find_spec("segment_anything_hq")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "modeling"


MODELING = official_modeling_folder()
pytestmark = pytest.mark.skipif(
    MODELING is None, reason="neither SAMFLOW_HQ_SAM_SRC (a SysCV/sam-hq checkout) nor segment-anything-hq"
)

ATOL = 2e-5  # float32 on the CPU: SDPA and fused norms vs the official explicit softmax, rounding only
PACKAGE = "_official_sam_hq_modeling"


@pytest.fixture(scope="module")
def official() -> types.SimpleNamespace:
    """The official ``segment_anything/modeling`` modules, imported as ``PACKAGE.<module>``."""
    pkg = types.ModuleType(PACKAGE)
    pkg.__path__ = [str(MODELING)]
    sys.modules[PACKAGE] = pkg
    names = ("sam", "image_encoder", "prompt_encoder", "mask_decoder_hq", "transformer")
    modules = {name: importlib.import_module(f"{PACKAGE}.{name}") for name in names}
    yield types.SimpleNamespace(**modules)
    for key in [k for k in sys.modules if k == PACKAGE or k.startswith(PACKAGE + ".")]:
        del sys.modules[key]


def official_tiny_hq_sam(official: types.SimpleNamespace) -> torch.nn.Module:
    """The official HQ-SAM built like samflow's ``tiny`` variant (128 px, ViT 64-d, decoder 64-d)."""
    spec = VARIANTS["tiny"]
    return official.sam.Sam(
        image_encoder=image_encoder(official.image_encoder.ImageEncoderViT, spec),
        prompt_encoder=prompt_encoder(official.prompt_encoder.PromptEncoder, spec),
        mask_decoder=official.mask_decoder_hq.MaskDecoderHQ(
            num_multimask_outputs=3,
            transformer=official.transformer.TwoWayTransformer(
                depth=2,
                embedding_dim=spec.prompt_dim,
                mlp_dim=spec.decoder_mlp_dim,
                num_heads=spec.decoder_heads,
            ),
            transformer_dim=spec.prompt_dim,
            iou_head_depth=3,
            iou_head_hidden_dim=spec.iou_head_hidden_dim,
            vit_dim=spec.embed_dim,
        ),
    ).eval()


def shared_models(
    official: types.SimpleNamespace, multimask_output: bool
) -> tuple[HookedSam, torch.nn.Module]:
    """samflow's tiny SAM + HQSam and the official tiny HQ-SAM, on the same random weights."""
    sam = randomize(build_sam("tiny", seed=0))
    model = HookedSam(sam, PluginStack({"hq": HQSam()}), multimask_output=multimask_output).eval()
    plugin = model.plugins["hq"]
    with torch.no_grad():  # the HQ modules get random values, so that nothing compared is near zero
        gen = torch.Generator().manual_seed(1)
        for param in plugin.parameters():
            param.copy_(param + 0.1 * torch.randn(param.shape, generator=gen))
    ref = official_tiny_hq_sam(official)
    state = dict(sam.state_dict())
    state.update({f"mask_decoder.{name}": value for name, value in plugin.state_dict().items()})
    ref.load_state_dict(state, strict=True)  # every official key, from samflow's SAM or the plugin
    return model, ref


def two_images_three_boxes() -> SamBatch:
    """Rows (image 0, box), (image 1, box), (image 0, box): the official code decodes per image."""
    gen = torch.Generator().manual_seed(2)
    image = torch.rand(2, 3, 128, 128, generator=gen)
    box = torch.tensor([[10.0, 20.0, 70.0, 90.0], [40.0, 5.0, 120.0, 60.0], [0.0, 50.0, 127.0, 127.0]])
    return SamBatch(image=image, box=box, image_index=torch.tensor([0, 1, 0]))


def official_forward(ref, batch: SamBatch, multimask_output: bool, hq_token_only: bool):
    """The official ``Sam.forward`` on ``batch``: low-res logits (N, 1, 32, 32) and IoU (N, 1), in row order."""
    records = [
        {
            "image": batch.image[i] * 255,
            "original_size": (128, 128),
            "boxes": batch.box[batch.image_index == i],
        }
        for i in range(batch.image.shape[0])
    ]
    outputs = ref(records, multimask_output=multimask_output, hq_token_only=hq_token_only)
    logits = torch.zeros(batch.box.shape[0], 1, 32, 32)
    iou = torch.zeros(batch.box.shape[0], 1)
    for i, out in enumerate(outputs):
        logits[batch.image_index == i] = out["low_res_logits"]
        iou[batch.image_index == i] = out["iou_predictions"]
    return logits, iou


@pytest.mark.parametrize("multimask_output", [False, True])
def test_masks_and_iou_equal_the_official_sam_hq(official, multimask_output):
    """``hq/hq`` = ``hq_token_only=True``, ``hq/sam_hq`` = ``hq_token_only=False``, and the IoU of the
    mask SAM picks (token 0, or the best of 1..3 with ``multimask_output``)."""
    model, ref = shared_models(official, multimask_output)
    batch = two_images_three_boxes()
    with torch.no_grad():
        out = model(batch)
        hq_only, iou = official_forward(ref, batch, multimask_output, hq_token_only=True)
        summed, iou_summed = official_forward(ref, batch, multimask_output, hq_token_only=False)
    assert torch.equal(iou, iou_summed)
    torch.testing.assert_close(out.masks["hq/hq"], hq_only, atol=ATOL, rtol=0)
    torch.testing.assert_close(out.masks["hq/sam_hq"], summed, atol=ATOL, rtol=0)
    expected_iou = out.iou_pred[:, 1:].amax(dim=1, keepdim=True) if multimask_output else out.iou_pred[:, :1]
    torch.testing.assert_close(expected_iou, iou, atol=ATOL, rtol=0)
    assert out.pred is out.masks["hq/hq"]  # the default ``output``: the HQ mask, as HQ-SAM evaluates
    assert hq_only.abs().amax() > 1 and (summed - hq_only).abs().amax() > 0.1  # SAM's mask is in the sum


def test_sam_masks_see_the_hq_token_as_in_the_official_decoder(official):
    """All four SAM masks of samflow equal the official ``predict_masks`` (the HQ token is in the
    transformer, so they differ from plain SAM's); the official decoder's HQ mask is its 5th."""
    model, ref = shared_models(official, multimask_output=False)
    batch = two_images_three_boxes()
    captured: list[torch.Tensor] = []
    predict = ref.mask_decoder.predict_masks
    ref.mask_decoder.predict_masks = lambda **kw: captured.append(predict(**kw)[0]) or predict(**kw)
    with torch.no_grad():
        out = model(batch)
        official_forward(ref, batch, False, hq_token_only=True)
    masks = torch.zeros(3, 5, 32, 32)
    for i, m in enumerate(captured):
        masks[batch.image_index == i] = m
    torch.testing.assert_close(out.masks["sam"], masks[:, :4], atol=ATOL, rtol=0)
    torch.testing.assert_close(out.masks["hq/hq"], masks[:, 4:], atol=ATOL, rtol=0)
    plain = HookedSam(model.sam).eval()
    with torch.no_grad():
        assert (plain(batch).masks["sam"] - masks[:, :4]).abs().amax() > 1e-2


def official_loss_masks() -> Any:
    """The official ``loss_masks`` with its helpers, cut out of ``train/utils/loss_mask.py``; its two
    ``torch.jit.script`` copies are the plain functions (same arithmetic)."""
    path = Path(SRC or ".") / "train" / "utils" / "loss_mask.py"
    tree = ast.parse(path.read_text())
    functions = [node for node in tree.body if isinstance(node, ast.FunctionDef)]
    scope: dict[str, Any] = {"torch": torch, "F": F, "List": list, "Optional": Any}
    exec(compile(ast.Module(body=functions, type_ignores=[]), str(path), "exec"), scope)  # noqa: S102  (the reference, opted into by the env var)
    scope["sigmoid_ce_loss_jit"] = scope["sigmoid_ce_loss"]
    scope["dice_loss_jit"] = scope["dice_loss"]
    return scope["loss_masks"]


LOSS = ReferenceOutputs("hq_sam_loss", "SAMFLOW_HQ_SAM_SRC")


@pytest.mark.skipif(not LOSS.available, reason=LOSS.skip_reason())
def test_point_loss_equals_the_official_loss_masks(official):
    """``point_bce`` and ``point_dice`` of the HQ mask equal the official ``loss_masks`` (12,544
    points, 3x oversampling, 75 % most uncertain) on the same draws from the global generator. The
    official loss is in the checkout's ``train/`` folder; without it, its recorded outputs."""
    model, _ = shared_models(official, multimask_output=False)
    batch = two_images_three_boxes()
    batch.mask = (torch.rand(2, 1, 128, 128, generator=torch.Generator().manual_seed(4)) > 0.6).float()
    out, ctx = model.run(batch)
    torch.manual_seed(5)
    # a batch without sample seeds or ids (``ctx.rand``) draws them from the global generator, as the
    # official loss does
    ours = model.plugins["hq"].losses(out, batch, dataclasses.replace(ctx, training=True))
    logits = out.masks["hq/hq"]
    target = batch.mask[batch.image_index]

    def official_loss() -> dict[str, torch.Tensor]:
        loss_masks = official_loss_masks()
        leaf = logits.detach().requires_grad_(True)
        torch.manual_seed(5)
        bce, dice = loss_masks(leaf, target, 3)
        (grad,) = torch.autograd.grad(bce + dice, leaf)
        torch.manual_seed(6)  # other draws, other points: the seed is what made them equal
        return {"bce": bce, "dice": dice, "grad": grad, "bce_seed6": loss_masks(leaf, target, 3)[0]}

    expected = LOSS.get("point_loss", fingerprint(logits, target, 3, 5, 6), official_loss)
    torch.testing.assert_close(ours["point_bce"], expected["bce"], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(ours["point_dice"], expected["dice"], atol=1e-6, rtol=1e-6)
    (grad,) = torch.autograd.grad(ours["point_bce"] + ours["point_dice"], logits, retain_graph=True)
    torch.testing.assert_close(grad, expected["grad"], atol=1e-9, rtol=1e-5)
    assert not torch.equal(expected["bce_seed6"], expected["bce"])


@pytest.mark.skipif(
    not SRC, reason="compares the checkout with the installed release: set SAMFLOW_HQ_SAM_SRC"
)
def test_the_pypi_release_is_the_checkouts_code():
    """What the README says of ``segment-anything-hq`` 0.3: its modeling files are the checkout's."""
    spec = importlib.util.find_spec("segment_anything_hq")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("segment-anything-hq is not installed")
    release = Path(next(iter(spec.submodule_search_locations))) / "modeling"
    for name in ("sam", "image_encoder", "prompt_encoder", "mask_decoder_hq", "transformer", "common"):
        checkout = Path(SRC or ".") / "segment_anything" / "modeling" / f"{name}.py"
        assert (release / f"{name}.py").read_bytes() == checkout.read_bytes(), name
