"""PA-SAM against the official code (xzz2/pa-sam) on shared random weights.

The official code is not vendored: point ``SAMFLOW_PA_SAM_SRC`` at a checkout of xzz2/pa-sam (the folder
holding ``model/``, ``segment_anything_training/`` and ``utils/``) to run it; without it the tests compare
with its outputs recorded in ``tests/reference_outputs/pa_sam.pt`` under a fingerprint of the weights,
inputs and seeds (``official_code.ReferenceOutputs``; ``SAMFLOW_RECORD_REFERENCE=1`` with the checkout
records them again). The official decoder is ``MaskDecoderPA`` itself, built from a decoder checkpoint
file as the repository does (``pretrained_checkpoint/sam_vit_b_maskdecoder.pth`` under a temporary working
folder), driven the way its ``train.py`` drives it (``Sam.forward_for_prompt_adapter``, then the decoder).
Its code hard-codes a 64 x 64 embedding grid, a 256 x 256 guiding input and a 256-d decoder, so both sides
are a SAM at 1024 px with a 2-block 32-d ViT and SAM's real decoder; the official image encoder, prompt
encoder and decoder get samflow's weights by name. The official code moves two tensors with ``.cuda()``;
on a machine without a GPU ``Tensor.cuda`` is made the identity while it runs. What is compared: SAM's
masks and IoU, the maps M_C, M_R, M_U, the mined cells, the edge map of ``reference_edges``, the trainable
set of ``reference_trainable``; in evaluation (top-k) and in training (Gumbel top-k with the same seed:
the official and samflow draw the same uniforms).
"""

from __future__ import annotations

import importlib
import math
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import randomize
from official_code import (
    ReferenceOutputs,
    assert_close,
    at_known_places,
    fingerprint,
    image_encoder,
    known,
    prompt_encoder,
)

from samflow.batch import SamBatch
from samflow.plugins.stack import PluginStack
from samflow.sam import HookedSam, build_sam
from samflow.sam import build as sam_build
from samflow.sam.build import SamVariant
from samflow_plugins.pa_sam import PASam
from samflow_plugins.pa_sam.guiding import guiding_input

REF = ReferenceOutputs("pa_sam", "SAMFLOW_PA_SAM_SRC")
pytest.importorskip("cv2", reason="reference_edges and the official PA-SAM compute their edges with OpenCV")

ATOL = 5e-5  # float32 on the CPU: SDPA and fused norms vs the official explicit softmax, rounding only
TOP_PACKAGES = ("model", "utils", "segment_anything_training")
#: the official code's fixed sizes (1024 px, a 64 x 64 grid, 256-d decoder) with a small ViT
SPEC = SamVariant(embed_dim=32, depth=2, num_heads=2, global_attn_indexes=(1,), window_size=4)


@pytest.fixture(scope="module")
def official() -> types.SimpleNamespace:
    """The official modules ``model.mask_decoder_pa``, ``segment_anything_training.modeling`` and
    ``utils.misc``, imported from the checkout (and removed again afterwards: their names are generic).
    Requested only where the official code runs (``request.getfixturevalue``), so only with the checkout."""
    src = REF.src

    def ours(name: str) -> bool:
        return name.split(".")[0] in TOP_PACKAGES

    saved = {k: sys.modules.pop(k) for k in list(sys.modules) if ours(k)}
    sys.path.insert(0, str(src))
    try:
        yield types.SimpleNamespace(
            decoder=importlib.import_module("model.mask_decoder_pa"),
            modeling=importlib.import_module("segment_anything_training.modeling"),
            misc=importlib.import_module("utils.misc"),
        )
    finally:
        sys.path.remove(str(src))
        for key in [k for k in sys.modules if ours(k)]:
            del sys.modules[key]
        sys.modules.update(saved)


def cpu_cuda(monkeypatch) -> None:
    """``Tensor.cuda`` as the identity where there is no GPU (the official code calls it twice)."""
    if not torch.cuda.is_available():
        monkeypatch.setattr(torch.Tensor, "cuda", lambda self, *args, **kwargs: self)


def samflow_model(monkeypatch, **kwargs) -> HookedSam:
    """samflow's SAM of ``SPEC`` (random, position tables non-zero) with PASam(**kwargs) as ``pa``."""
    monkeypatch.setitem(sam_build.VARIANTS, "pa_official", SPEC)
    sam = randomize(build_sam("pa_official", seed=0))
    return HookedSam(sam, PluginStack({"pa": PASam(**kwargs)}))


def official_model(
    official, model: HookedSam, workdir: Path, monkeypatch
) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The official frozen SAM (``segment_anything_training``) and ``MaskDecoderPA`` with samflow's weights."""
    m = official.modeling
    ref_sam = m.Sam(
        image_encoder=image_encoder(m.ImageEncoderViT, SPEC),
        prompt_encoder=prompt_encoder(m.PromptEncoder, SPEC),
        mask_decoder=m.MaskDecoder(
            num_multimask_outputs=3,
            transformer=m.TwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8),
            transformer_dim=256,
            iou_head_depth=3,
            iou_head_hidden_dim=256,
        ),
    ).eval()
    ref_sam.load_state_dict(model.sam.state_dict(), strict=True)
    # MaskDecoderPA loads SAM's decoder from this relative path, as in the repository
    (workdir / "pretrained_checkpoint").mkdir()
    torch.save(
        model.sam.mask_decoder.state_dict(), workdir / "pretrained_checkpoint" / "sam_vit_b_maskdecoder.pth"
    )
    monkeypatch.chdir(workdir)
    decoder = official.decoder.MaskDecoderPA("vit_b")
    plugin = model.plugins["pa"]
    state = dict(model.sam.mask_decoder.state_dict())
    state.update({f"guiding_conv.{k}": v for k, v in plugin.guiding.layers.state_dict().items()})
    state.update({f"prompt_adapter.{k}": v for k, v in plugin.adapter.state_dict().items()})
    decoder.load_state_dict(state, strict=True)  # every official key, from samflow's SAM or the plugin
    return ref_sam, decoder.eval()


def two_images() -> SamBatch:
    """Two images with one box each (the official adapter takes one prompt per image); the second is
    1024 x 768, zero-padded at the bottom, so padding reaches the edge map as in the official code.

    Smooth, so that the edge map depends on Canny's thresholds (10 / 100): a coarse and a finer random
    field (bicubic), their amplitude growing left to right from 0.3 to 15. Beyond [0, 1] on purpose: the
    reference's Canny runs on the uint8 wrap of the *normalised* image, which for an image in [0, 1] takes
    5 values, so its L1 Sobel magnitudes are either <= 32 or >= 240 and a high threshold of 100 or 104
    gives the same edges; here the magnitudes are spread from 0 to far above 300, and 10 -> 12, 100 -> 104
    and 100 -> 300 each change the edges of both images."""
    gen = torch.Generator().manual_seed(3)

    def field(grid: int) -> torch.Tensor:
        noise = torch.randn(2, 3, grid, grid, generator=gen)
        return F.interpolate(noise, size=(1024, 1024), mode="bicubic", align_corners=False)

    amplitude = torch.logspace(math.log10(0.3), math.log10(15.0), 1024).view(1, 1, 1, -1)
    image = 0.5 + amplitude * (field(12) + 0.5 * field(48))
    image[1, :, 768:] = 0
    box = torch.tensor([[100.0, 200.0, 700.0, 900.0], [300.0, 50.0, 1000.0, 600.0]])
    input_size = torch.tensor([[1024, 1024], [768, 1024]])
    return SamBatch(image=image, box=box, input_size=input_size, original_size=input_size)


class Recorder:
    """Wraps an official function and keeps what it was called with and returned."""

    def __init__(self, fn) -> None:
        self.fn = fn
        self.args: list[tuple] = []
        self.results: list = []

    def __call__(self, *args, **kwargs):
        result = self.fn(*args, **kwargs)
        self.args.append(args)
        self.results.append(result)
        return result


def official_forward(ref_sam, decoder, official, batch: SamBatch, monkeypatch) -> dict:
    """``train.py``'s evaluation step on ``batch``: the decoder's outputs, the edge maps it computed
    and the cells it mined (positives then negatives, raster order), per image."""
    edges = Recorder(official.misc.generalized_image_grad)
    monkeypatch.setattr(official.misc, "generalized_image_grad", edges)
    points = Recorder(decoder.prompt_adapter.sample_points_promt)
    monkeypatch.setattr(decoder.prompt_adapter, "sample_points_promt", points)
    records = []
    for i, (h, w) in enumerate(batch.input_size.tolist()):
        image = batch.image[i, :, :h, :w] * 255
        records.append({"image": image, "original_size": (h, w), "boxes": batch.box[i : i + 1]})
    with torch.no_grad():  # the frozen SAM, as train.py runs it
        outputs, interm = ref_sam.forward_for_prompt_adapter(records, multimask_output=False)
    masks, iou, uncertainty, _, coarse, refined, _ = decoder(
        image_embeddings=torch.cat([o["encoder_embedding"] for o in outputs]),
        image_pe=[o["image_pe"] for o in outputs],
        sparse_prompt_embeddings=[o["sparse_embeddings"] for o in outputs],
        dense_prompt_embeddings=[o["dense_embeddings"] for o in outputs],
        multimask_output=False,
        interm_embeddings=interm,
        image_record=[o["image_record"] for o in outputs],
        prompt_encoder=ref_sam.prompt_encoder,
        input_images=outputs[0]["input_images"],
    )
    rets = [args[2] for args in points.args]  # the 64 x 64 selections, [pos_0, neg_0, pos_1, neg_1, ...]
    cells = (  # none before the mining epoch (training at CURRENT_EPOCH <= 4)
        torch.cat([(r.flatten(1) == 1).nonzero()[:, 1].view(1, -1) for r in rets], dim=1).view(
            len(records), -1
        )
        if rets
        else torch.zeros(len(records), 0, dtype=torch.long)
    )
    return {
        "masks": masks,
        "iou": iou,
        "coarse": coarse,
        "refined": refined,
        "uncertainty": uncertainty,
        "edges": torch.stack(edges.results).unsqueeze(1) / 255,
        "cells": cells,
    }


def assert_matches(out, state: dict, ref: dict) -> None:
    """samflow's SAM masks, IoU, maps and mined cells equal the official ones (live, or as recorded:
    ``assert_close`` compares a recorded ``Sketch`` at its positions and by its sum)."""
    assert_close(out.masks["sam"][:, :1], ref["masks"], atol=ATOL, rtol=0)
    assert_close(out.iou_pred, ref["iou"], atol=ATOL, rtol=0)
    assert_close(state["coarse"], ref["coarse"], atol=ATOL, rtol=1e-5)
    assert_close(state["refined"], ref["refined"], atol=ATOL, rtol=1e-5)
    assert_close(state["uncertainty"].sigmoid(), ref["uncertainty"], atol=ATOL, rtol=0)
    assert torch.equal(state["points"], ref["cells"])
    assert torch.equal(state["point_labels"][0], torch.tensor([1, 1, 1, 1, 0, 0, 0, 0]))


MATCHED = ("masks", "iou", "coarse", "refined", "uncertainty", "cells")  # what assert_matches compares


def official_inputs(model: HookedSam, batch: SamBatch, *options) -> str:
    """The fingerprint of what the official code gets: the weights it loads (samflow's SAM, the plugin's
    guiding layers and adapter), the batch's images, boxes and sizes, and ``options`` (mode, seed)."""
    plugin = model.plugins["pa"]
    return fingerprint(
        model.sam, plugin.guiding.layers, plugin.adapter, batch.image, batch.box, batch.input_size, *options
    )


def test_evaluation_with_reference_edges_equals_the_official_decoder(request, monkeypatch, tmp_path):
    """Evaluation (top-k mining): masks, IoU, M_C, M_R, M_U, the mined cells and the edges agree."""
    model = samflow_model(monkeypatch, reference_edges=True).eval()
    batch = two_images()
    with torch.no_grad():
        out, ctx = model.run(batch, model.context(batch))
        x = guiding_input(ctx.image, ctx.encoded.normalized, (256, 256), reference_edges=True)

    def official_outputs() -> dict:
        official = request.getfixturevalue("official")
        cpu_cuda(monkeypatch)
        ref_sam, decoder = official_model(official, model, tmp_path, monkeypatch)
        with torch.no_grad():
            ref = official_forward(ref_sam, decoder, official, batch, monkeypatch)
        return {k: ref[k] for k in (*MATCHED, "edges")}

    ref = REF.get("evaluation", official_inputs(model, batch, "evaluation"), official_outputs)
    # the edge channel: OpenCV's Canny, pixel for pixel (recorded: at the sketch's positions, and its sum)
    assert_close(x[:, 3:], ref["edges"], atol=0, rtol=0)
    assert 0.02 < x[:, 3:].mean() < 0.5  # there are edges, not everywhere (ours: the official sum)
    assert_matches(out, ctx.state["pa"], ref)
    # the comparison bites
    assert known(ref["coarse"]).abs().amax() > 1 and known(ref["masks"]).abs().amax() > 0.1


def test_default_sobel_edges_differ_from_the_official_canny(request, monkeypatch, tmp_path):
    """The default edge map (Sobel of the un-normalised image) is a documented difference: the guide,
    and so the maps, differ from the official ones on the same weights."""
    model = samflow_model(monkeypatch).eval()
    batch = two_images()
    with torch.no_grad():
        _, ctx = model.run(batch, model.context(batch))

    def official_outputs() -> dict:
        official = request.getfixturevalue("official")
        cpu_cuda(monkeypatch)
        ref_sam, decoder = official_model(official, model, tmp_path, monkeypatch)
        with torch.no_grad():
            return {"coarse": official_forward(ref_sam, decoder, official, batch, monkeypatch)["coarse"]}

    ref = REF.get("default_edges", official_inputs(model, batch, "evaluation"), official_outputs)
    ours = at_known_places(ctx.state["pa"]["coarse"], ref["coarse"])
    assert (ours - known(ref["coarse"])).abs().amax() > 1e-2


@pytest.mark.parametrize("seed", [0, 1])
def test_training_gumbel_mining_equals_the_official_decoder(request, monkeypatch, tmp_path, seed):
    """Training after epoch 4 (Gumbel top-k with a straight-through estimator): with the same seed
    both draw the same uniforms (the official ``Gumbel(0, 1).sample``, samflow's ``rand_like``),
    positives before negatives, and mine the same cells; one image (the official draws per image).
    The gradients of the guiding branch and the adapter agree too, for a loss on SAM's mask: MLP_U
    reaches that mask only through the mined points' straight-through weights, so its gradient
    checks the estimator. Recorded per seed: the official outputs, its gradients, their largest
    magnitude and the cells plain top-k would pick from its maps."""
    monkeypatch.setenv("CURRENT_EPOCH", "5")
    model = samflow_model(monkeypatch, reference_edges=True).train()
    batch = two_images()
    one = SamBatch(image=batch.image[:1], box=batch.box[:1])
    official_names = {"guiding.layers.": "guiding_conv.", "adapter.": "prompt_adapter."}
    inputs = official_inputs(model, one, "training", "CURRENT_EPOCH=5", seed)

    def official_outputs() -> dict:
        official = request.getfixturevalue("official")
        cpu_cuda(monkeypatch)
        ref_sam, decoder = official_model(official, model, tmp_path, monkeypatch)
        decoder.train()
        torch.manual_seed(seed)
        ref = official_forward(ref_sam, decoder, official, one, monkeypatch)
        ref["masks"].sigmoid().mean().backward()
        grads = {
            n: p.grad for n, p in decoder.named_parameters() if n.startswith(tuple(official_names.values()))
        }
        return {k: ref[k] for k in MATCHED} | {
            "topk_cells": topk_cells_of(ref),
            "grads": grads,
            "grad_scale": max(g.abs().amax() for g in grads.values()),
            "straight_through": grads["prompt_adapter.uncertain_mlp.layers.0.weight"].abs().amax(),
        }

    torch.manual_seed(seed)
    out, ctx = model.run(one, model.context(one, epoch=5))
    ref = REF.get(f"training_seed{seed}", inputs, official_outputs)
    state = ctx.state["pa"]
    assert_matches(out, state, ref)
    assert not torch.equal(ref["cells"], ref["topk_cells"])  # the noise changed the choice: sampling ran

    out.masks["sam"][:, :1].sigmoid().mean().backward()
    plugin = model.plugins["pa"]
    theirs = ref["grads"]
    grads = {
        name: (param.grad, theirs[official_names[prefix] + name.removeprefix(prefix)])
        for name, param in plugin.named_parameters()
        for prefix in official_names
        if name.startswith(prefix)
    }
    assert len(grads) == len(list(plugin.parameters()))
    scale = ref["grad_scale"].item()  # the official gradients' largest magnitude
    assert ref["straight_through"].item() > 1e-5 * scale
    for name, (ours, expected) in grads.items():
        # atol relative to the largest gradient: some are zero up to rounding (the attention's key bias)
        assert_close(ours, expected, atol=1e-5 * scale, rtol=1e-3, msg=lambda m, name=name: f"{name}: {m}")


def test_training_before_the_mining_epoch_equals_the_official_decoder(request, monkeypatch, tmp_path):
    """Training at epoch 4: the official decoder mines from ``CURRENT_EPOCH > 4`` on, so at epoch 4 it adds
    no point prompts, and neither does samflow with its default ``mining_start_epoch`` (4: mining when
    the epoch is above it): the masks, IoU and maps agree and no cell is mined on either side. (A
    default of 3 or less would mine here.)"""
    monkeypatch.setenv("CURRENT_EPOCH", "4")
    model = samflow_model(monkeypatch, reference_edges=True).train()
    batch = two_images()
    one = SamBatch(image=batch.image[:1], box=batch.box[:1])
    inputs = official_inputs(model, one, "training", "CURRENT_EPOCH=4")

    def official_outputs() -> dict:
        official = request.getfixturevalue("official")
        cpu_cuda(monkeypatch)
        ref_sam, decoder = official_model(official, model, tmp_path, monkeypatch)
        decoder.train()
        torch.manual_seed(0)
        return {k: v for k, v in official_forward(ref_sam, decoder, official, one, monkeypatch).items()}

    torch.manual_seed(0)
    with torch.no_grad():
        out, ctx = model.run(one, model.context(one, epoch=4))
    ref = REF.get("training_epoch4", inputs, official_outputs)
    state = ctx.state["pa"]
    assert ref["cells"].shape == (1, 0) and "points" not in state  # neither mined
    assert_close(out.masks["sam"][:, :1], ref["masks"], atol=ATOL, rtol=0)
    assert_close(out.iou_pred, ref["iou"], atol=ATOL, rtol=0)
    for name in ("coarse", "refined"):
        assert_close(state[name], ref[name], atol=ATOL, rtol=1e-5)
    assert_close(state["uncertainty"].sigmoid(), ref["uncertainty"], atol=ATOL, rtol=0)


def topk_cells_of(ref: dict) -> torch.Tensor:
    """The cells plain top-k would pick from the official maps (raster order, positives first)."""
    guidance = (ref["uncertainty"] * (ref["refined"].sigmoid() - ref["coarse"].sigmoid())).flatten(1)
    pos = guidance.topk(4, dim=1).indices.sort(dim=1).values
    neg = (-guidance).topk(4, dim=1).indices.sort(dim=1).values
    return torch.cat([pos, neg], dim=1)


def test_reference_trainable_is_the_official_trainable_set(request, monkeypatch, tmp_path):
    """``reference_trainable``: samflow trains what the official ``MaskDecoderPA`` leaves trainable
    (recorded: the names of its parameters that require gradients)."""
    model = samflow_model(monkeypatch, reference_trainable=True)

    def official_outputs() -> dict:
        _, decoder = official_model(request.getfixturevalue("official"), model, tmp_path, monkeypatch)
        return {"trainable": sorted(n for n, p in decoder.named_parameters() if p.requires_grad)}

    plugin = model.plugins["pa"]
    inputs = fingerprint(model.sam, plugin.guiding.layers, plugin.adapter, "MaskDecoderPA('vit_b')")
    expected = set(REF.get("trainable", inputs, official_outputs)["trainable"])
    names = {
        "sam.mask_decoder.": "",
        "plugins.pa.guiding.layers.": "guiding_conv.",
        "plugins.pa.adapter.": "prompt_adapter.",
    }
    ours = set()
    for name, param in model.named_parameters():
        if param.requires_grad:
            prefix = next(p for p in names if name.startswith(p))
            ours.add(names[prefix] + name.removeprefix(prefix))
    assert ours == expected
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 1_007_008
