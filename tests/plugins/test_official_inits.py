"""The plugins' trainable parameters at initialisation against the official code's, law by law.

The ``test_official_*`` files compare forward passes on shared weights, which cannot see the
initialisation: a wrong init changes training from the first step while every forward still agrees.
Here each official module is built as released (from the checkouts those files use, named by the same
``SAMFLOW_*_SRC`` variables; HQ-SAM also from the installed ``segment-anything-hq``), samflow's plugin
is set up on a SAM of the same widths, and every trainable parameter, matched by role, must have the
official shape and the official law:

- a constant tensor (zeros, ones, BA-SAM's 0.1, a prior logit) must be that constant, bit for bit;
- a random tensor is pooled over fresh builds (seeds 0, 1, ...; at most ``PER_BUILD`` values of each
  build, 4096 or more in all where 64 builds (32 of the 256-d decoders) reach it, never fewer than
  ``MIN_POOL``) and must match the official pool in mean and in scale (the mean absolute deviation,
  which one rare extreme value does not move: SAM-Adapter's ``trunc_normal_``, as PyTorch's, can put
  a value exactly at its bound -2 or 2, 100 std out; one of 786,432 official draws here), each within ``SIGMAS``
  standard errors of the difference for normal and uniform laws (at 4096 + 4096 values: scale within
  10 %); in whether the law is bounded (max|x| below 2.5 scales: uniform laws, as kaiming/xavier and
  PyTorch's defaults, not normal ones) and then in its bound (max|x| within 5 %); and in the
  two-sample Kolmogorov-Smirnov distance, read at the official pool's 257 quantiles (below
  c sqrt(1/n + 1/m) + 1/m, c = 2.71 for a false alarm rate of 1e-6).
  A zero up-projection, N(0, 1) against U(-1, 1), N(0, 0.02^2) against PyTorch's kaiming-uniform,
  uniform against normal of the same std, a std 20 % off, or a LayerNorm not at 1/0 each fail
  (``test_the_law_comparison_fails_for_the_plausible_wrong_inits``).

Without a checkout the official laws come from ``reference_outputs/init_<plugin>.pt`` (per parameter:
its shape, and its constant or its pool's size, mean, scale, max|x| and quantiles), recorded with
``SAMFLOW_RECORD_REFERENCE=1`` and the checkout (``official_code.ReferenceOutputs``), so CI compares
samflow's laws with the official ones on every run.

SAPNet's head is mmdetection's, whose ``init_cfg`` mmcv applies; mmcv does not install here, so the
``init_cfg`` default is read from the official ``MIL_bbox_head.py`` with ``ast`` and its laws are the
exact ones mmcv's ``NormalInit`` draws (N(0, std^2), bias a constant, ``bias_prob`` p giving
-ln((1 - p) / p)). BA-SAM's distance slopes (the paper's, ALiBi's) have no official code; only the
released code's coefficients are compared.
"""

from __future__ import annotations

import ast
import contextlib
import importlib
import importlib.util
import math
import os
import sys
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from official_code import ReferenceOutputs, fingerprint, image_encoder, import_modules
from torch import Tensor, nn

from samflow.plugins import PluginStack, SamPlugin
from samflow.sam import build as sam_build
from samflow.sam import build_sam
from samflow.sam.build import VARIANTS, SamVariant
from samflow_plugins.ba_sam import BASam
from samflow_plugins.hq_sam import HQSam
from samflow_plugins.pa_sam import PASam
from samflow_plugins.sam_adapter import SamAdapter
from samflow_plugins.sapnet.net import SelectionNet
from samflow_plugins.wsi_sam import WSISam

PER_BUILD = 4096  # values kept of one tensor of one build
MIN_POOL = 512  # fewest values of a random tensor compared
SIGMAS = 6.0  # mean and scale tolerances, in standard errors of the difference
KS_C = math.sqrt(-math.log(1e-6 / 2) / 2)  # 2.71: two-sample KS critical constant at alpha 1e-6
PROBS = torch.linspace(0, 1, 257, dtype=torch.float64)
Draws = dict[str, Tensor]  # name -> (builds, kept values) of one parameter
official_modules = contextlib.contextmanager(import_modules)  # the official modules, removed after


# ---- laws ----
def pooled(build: Callable[[], dict[str, Tensor]], builds: int) -> Draws:
    """Each tensor of ``build()`` (seeded 0, 1, ...), its first ``PER_BUILD`` values (an init draws the
    elements of a tensor independently from one law, so any fixed positions will do), stacked over the
    builds; the shapes under ``<name>#shape``."""
    rows: dict[str, list[Tensor]] = {}
    shapes: dict[str, Tensor] = {}
    for seed in range(builds):
        torch.manual_seed(seed)
        for name, t in build().items():
            rows.setdefault(name, []).append(t.detach().reshape(-1)[:PER_BUILD].double())
            shapes[name] = torch.tensor(t.shape)
    return {name: torch.stack(r) for name, r in rows.items()} | {f"{n}#shape": s for n, s in shapes.items()}


def laws(draws: Draws) -> dict[str, dict[str, Any]]:
    """Per parameter: its shape, and its constant, or its pool's size, mean, scale (the mean absolute
    deviation, ``mad``), max|x| and quantiles."""
    out = {}
    for name, values in draws.items():
        if name.endswith("#shape"):
            continue
        flat = values.reshape(-1)
        law: dict[str, Any] = {"shape": draws[f"{name}#shape"].tolist(), "constant": None}
        if bool((flat == flat[0]).all()):
            law["constant"] = float(flat[0])
        else:
            law |= {
                "n": flat.numel(),
                "mean": float(flat.mean()),
                "mad": float((flat - flat.mean()).abs().mean()),
                "max": float(flat.abs().max()),
                "quantiles": torch.quantile(flat, PROBS),
            }
        out[name] = law
    return out


def assert_same_law(name: str, ours: dict[str, Any], official: dict[str, Any]) -> None:
    """``ours`` drawn from the law of ``official`` (see the module docstring for the tests)."""
    assert ours["shape"] == official["shape"], f"{name}: shape {ours['shape']}, official {official['shape']}"
    if official["constant"] is not None:
        assert ours["constant"] == official["constant"], (
            f"{name}: the official init is the constant {official['constant']!r}; samflow's is "
            + (
                f"{ours['constant']!r}"
                if ours["constant"] is not None
                else f"random (scale {ours['mad']:.4g})"
            )
        )
        return
    assert ours["constant"] is None, (
        f"{name}: samflow's init is the constant {ours['constant']!r}; the official is random "
        f"(scale {official['mad']:.4g})"
    )
    n, m = ours["n"], official["n"]
    assert min(n, m) >= MIN_POOL, f"{name}: pools of {n} and {m} values are too small to compare"
    se = math.sqrt(1 / n + 1 / m)
    mad = official["mad"]
    # std / mad is sqrt(pi / 2) = 1.25 for a normal law, 2 / sqrt(3) = 1.15 for a uniform one
    assert abs(ours["mean"] - official["mean"]) <= SIGMAS * 1.26 * mad * se, (
        f"{name}: mean {ours['mean']:.4g}, official {official['mean']:.4g} (scale {mad:.4g})"
    )
    # the relative standard error of a mad is 0.76 / sqrt(n) for a normal law, 0.58 / sqrt(n) for a uniform
    assert abs(ours["mad"] / mad - 1) <= SIGMAS * 0.76 * se, (
        f"{name}: scale (mean |x - mean|) {ours['mad']:.4g}, official {mad:.4g}"
    )
    # max|x| is 2 mad for a centred uniform law; a normal law passes 2.5 mad = 2.0 std in 512 draws
    # but with probability 0.954^512 < 1e-10
    bounded = official["max"] < 2.5 * mad
    assert (ours["max"] < 2.5 * ours["mad"]) == bounded, (
        f"{name}: max|x| / scale {ours['max'] / ours['mad']:.3g}, official {official['max'] / mad:.3g} "
        "(a bounded law, e.g. uniform, against an unbounded one, e.g. normal)"
    )
    if bounded:
        assert abs(ours["max"] / official["max"] - 1) <= 0.05, (
            f"{name}: bound {ours['max']:.4g}, official {official['max']:.4g}"
        )
    distance = ks_at_quantiles(ours["sorted"], official["quantiles"])
    assert distance <= KS_C * se + 1 / m, f"{name}: KS distance {distance:.4f} to the official law"


def ks_at_quantiles(sorted_values: Tensor, quantiles: Tensor) -> float:
    """max_k |F_ours(q_k) - k/256| over the official quantiles q_k: the KS distance, read at them."""
    below = torch.searchsorted(sorted_values, quantiles.to(sorted_values.dtype), right=True)
    return float((below.double() / sorted_values.numel() - PROBS).abs().max())


def our_laws(draws: Draws) -> dict[str, dict[str, Any]]:
    """``laws`` with each random pool's sorted values, for the KS distance."""
    out = laws(draws)
    for name, law in out.items():
        if law["constant"] is None:
            law["sorted"] = draws[name].reshape(-1).sort().values
    return out


def compare(
    ours: dict[str, dict[str, Any]], official: dict[str, dict[str, Any]], names: dict[str, str]
) -> None:
    """Every trainable parameter of ours (``names``: ours -> official) against the official law."""
    assert set(names) == set(ours), f"unmatched: ours {sorted(set(ours) - set(names))}"
    assert set(names.values()) == set(official), (
        f"unmatched: official {sorted(set(official) - set(names.values()))}"
    )
    for mine, theirs in names.items():
        assert_same_law(f"{mine} (official {theirs})", ours[mine], official[theirs])


def trainable(sam: nn.Module, plugin: SamPlugin) -> dict[str, Tensor]:
    """``plugin`` set up on ``sam`` by a ``PluginStack``; its trainable parameters by name."""
    PluginStack({"p": plugin}).attach(sam)
    return {name: p for name, p in plugin.named_parameters() if p.requires_grad}


def builds_for(draw: Callable[[], dict[str, Tensor]], most: int) -> int:
    """Builds that give every random tensor of ``draw()`` a pool of at least 4096 values, or ``most``."""
    torch.manual_seed(0)
    smallest = min(t.numel() for t in draw().values() if not bool((t == t.reshape(-1)[0]).all()))
    return min(most, math.ceil(4096 / smallest))


# ---- SAM-Adapter: the official PromptGenerator (scale 4: 16 channels on the tiny SAM) ----
SAM_ADAPTER = ReferenceOutputs("init_sam_adapter", "SAMFLOW_SAM_ADAPTER_SRC")
TINY_PROMPT_GENERATOR = ("highpass", 64, 1234, 4, "fft", 0.25, True, True, "adaptor", 128, 16)
SAM_ADAPTER_NAMES = {
    "hfc_embed.weight": "prompt_generator.proj.weight",
    "hfc_embed.bias": "prompt_generator.proj.bias",
    "pe_embed.weight": "embedding_generator.weight",
    "pe_embed.bias": "embedding_generator.bias",
    "up.weight": "shared_mlp.weight",
    "up.bias": "shared_mlp.bias",
    **{f"tune.{i}.{p}": f"lightweight_mlp_{i}.0.{p}" for i in range(4) for p in ("weight", "bias")},
}


@pytest.mark.skipif(not SAM_ADAPTER.available, reason=SAM_ADAPTER.skip_reason())
def test_sam_adapter_init_is_the_official_prompt_generators(monkeypatch, tiny_sam):
    """Linear trunc-normal std 0.02 (bounds +-2), conv N(0, 2 / fan_out), biases 0: the official init."""

    def official_laws() -> dict:
        folder = Path(SAM_ADAPTER.src) / "models" / "mmseg" / "models" / "sam"
        with official_modules(
            monkeypatch, "_official_sam_adapter_init", folder, ("common", "image_encoder")
        ) as official:
            draw = lambda: dict(official.PromptGenerator(4, *TINY_PROMPT_GENERATOR).named_parameters())
            return laws(pooled(draw, builds_for(draw, most=64)))

    expected = SAM_ADAPTER.get(
        "tiny/scale_4", fingerprint(TINY_PROMPT_GENERATOR, 4, PER_BUILD), official_laws
    )
    draw = lambda: trainable(tiny_sam, SamAdapter(scale_factor=4, train_decoder=False))
    compare(our_laws(pooled(draw, builds_for(draw, most=64))), expected, SAM_ADAPTER_NAMES)


# ---- HQ-SAM: the official MaskDecoderHQ (tiny), from the checkout or the installed release ----
def hq_modeling() -> Path | None:
    """``segment_anything/modeling`` of ``SAMFLOW_HQ_SAM_SRC``, else of the installed release."""
    if HQ_SRC:
        return Path(HQ_SRC) / "segment_anything" / "modeling"
    spec = importlib.util.find_spec("segment_anything_hq")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "modeling"


HQ_SRC = os.environ.get("SAMFLOW_HQ_SAM_SRC")
HQ_PARTS = ("hf_token", "hf_mlp", "compress_vit_feat", "embedding_encoder", "embedding_maskfeature")


@pytest.mark.skipif(
    hq_modeling() is None,
    reason="neither SAMFLOW_HQ_SAM_SRC (a SysCV/sam-hq checkout) nor segment-anything-hq",
)
def test_hq_sam_init_is_the_official_decoders(monkeypatch, tiny_sam):
    """PyTorch's defaults (token N(0, 1), kaiming-uniform weights and fan-in biases, LayerNorm2d 1/0)."""
    spec = VARIANTS["tiny"]

    def official_draw() -> dict[str, Tensor]:
        decoder = official.MaskDecoderHQ(
            transformer_dim=spec.prompt_dim,
            transformer=transformer.TwoWayTransformer(
                depth=2,
                embedding_dim=spec.prompt_dim,
                mlp_dim=spec.decoder_mlp_dim,
                num_heads=spec.decoder_heads,
            ),
            num_multimask_outputs=3,
            iou_head_depth=3,
            iou_head_hidden_dim=spec.iou_head_hidden_dim,
            vit_dim=spec.embed_dim,
        )
        return {n: p for n, p in decoder.named_parameters() if n.split(".")[0] in HQ_PARTS}

    modules = ("common", "transformer", "mask_decoder_hq")
    with official_modules(monkeypatch, "_official_hq_sam_init", hq_modeling(), modules) as official:
        transformer = importlib.import_module("_official_hq_sam_init.transformer")
        expected = laws(pooled(official_draw, builds_for(official_draw, most=64)))
    draw = lambda: trainable(tiny_sam, HQSam())
    compare(our_laws(pooled(draw, builds_for(draw, most=64))), expected, {n: n for n in expected})


# ---- PA-SAM and WSI-SAM: the official decoders (256-d, ViT-B's 768-d early features) ----
PA_SAM = ReferenceOutputs("init_pa_sam", "SAMFLOW_PA_SAM_SRC")
WSI_SAM = ReferenceOutputs("init_wsi_sam", "SAMFLOW_WSI_SAM_SRC")
#: samflow's SAM with the official decoders' widths: 256-d decoder, a 768-d ViT with one global block
DECODER_256 = SamVariant(embed_dim=768, depth=1, num_heads=12, global_attn_indexes=(0,), img_size=256)


@pytest.fixture
def sam_256(monkeypatch) -> nn.Module:
    monkeypatch.setitem(sam_build.VARIANTS, "init_256", DECODER_256)
    return build_sam("init_256", seed=0)


def with_decoder_checkpoint(monkeypatch, tmp_path: Path, modeling: Any) -> None:
    """``pretrained_checkpoint/sam_vit_b_maskdecoder.pth`` under the working directory ``tmp_path``: a
    256-d SAM decoder (``modeling``'s), which the official decoders load in their constructors."""
    decoder = modeling.MaskDecoder(
        transformer_dim=256,
        transformer=modeling.TwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8),
        num_multimask_outputs=3,
        iou_head_depth=3,
        iou_head_hidden_dim=256,
    )
    (tmp_path / "pretrained_checkpoint").mkdir()
    torch.save(decoder.state_dict(), tmp_path / "pretrained_checkpoint" / "sam_vit_b_maskdecoder.pth")
    monkeypatch.chdir(tmp_path)


def official_import(monkeypatch, src: str, top: tuple[str, ...], *modules: str) -> list[types.ModuleType]:
    """``modules`` imported from the checkout ``src`` (its top-level packages ``top`` removed afterwards)."""
    for name in [k for k in sys.modules if k.split(".")[0] in top]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.syspath_prepend(src)
    try:
        return [importlib.import_module(module) for module in modules]
    finally:
        for name in [k for k in sys.modules if k.split(".")[0] in top]:
            monkeypatch.delitem(sys.modules, name)  # restored (or dropped) at teardown


@pytest.mark.skipif(not PA_SAM.available, reason=PA_SAM.skip_reason())
def test_pa_sam_init_is_the_official_decoders(monkeypatch, tmp_path, sam_256):
    """PyTorch's defaults for the prompt adapter and the guiding branch (LayerNorm2d at 1/0)."""

    def official_laws() -> dict:
        pytest.importorskip("cv2", reason="the official PA-SAM decoder imports OpenCV")
        top = ("model", "utils", "segment_anything_training")
        decoder_module, modeling = official_import(
            monkeypatch, PA_SAM.src, top, "model.mask_decoder_pa", "segment_anything_training.modeling"
        )
        with_decoder_checkpoint(monkeypatch, tmp_path, modeling)

        def draw() -> dict[str, Tensor]:
            decoder = decoder_module.MaskDecoderPA("vit_b")
            return {
                n: p
                for n, p in decoder.named_parameters()
                if n.startswith(("guiding_conv.", "prompt_adapter."))
            }

        return laws(pooled(draw, builds_for(draw, most=32)))

    expected = PA_SAM.get("vit_b", fingerprint("MaskDecoderPA", "vit_b", PER_BUILD), official_laws)
    draw = lambda: trainable(sam_256, PASam())
    ours = our_laws(pooled(draw, builds_for(draw, most=32)))
    names = {
        n: n.replace("guiding.layers.", "guiding_conv.").replace("adapter.", "prompt_adapter.") for n in ours
    }
    compare(ours, expected, names)


def wsi_modeling_stand_in(monkeypatch, src: str) -> types.ModuleType:
    """``segment_anything_training.modeling`` of the checkout holding only ``MaskDecoder`` and
    ``TwoWayTransformer`` (what ``network.py`` takes from it): the package's own ``__init__`` builds
    MobileSAM's TinyViT, which needs timm."""
    folder = Path(src) / "segment_anything_training"
    package = types.ModuleType("segment_anything_training")
    package.__path__ = [str(folder)]
    modeling = types.ModuleType("segment_anything_training.modeling")
    modeling.__path__ = [str(folder / "modeling")]
    monkeypatch.setitem(sys.modules, "segment_anything_training", package)
    monkeypatch.setitem(sys.modules, "segment_anything_training.modeling", modeling)
    for name in ("common", "transformer", "mask_decoder"):
        monkeypatch.delitem(sys.modules, f"segment_anything_training.modeling.{name}", raising=False)
    modeling.MaskDecoder = importlib.import_module(
        "segment_anything_training.modeling.mask_decoder"
    ).MaskDecoder
    modeling.TwoWayTransformer = importlib.import_module(
        "segment_anything_training.modeling.transformer"
    ).TwoWayTransformer
    return modeling


@pytest.mark.skipif(not WSI_SAM.available, reason=WSI_SAM.skip_reason())
def test_wsi_sam_init_is_the_official_dual_decoders(monkeypatch, tmp_path, sam_256):
    """Both heads as HQ-SAM's: PyTorch's defaults, LayerNorm2d at 1/0."""

    def official_laws() -> dict:
        modeling = wsi_modeling_stand_in(monkeypatch, WSI_SAM.src)
        monkeypatch.delitem(sys.modules, "network", raising=False)
        monkeypatch.syspath_prepend(WSI_SAM.src)
        network = importlib.import_module("network")
        monkeypatch.delitem(sys.modules, "network")
        with_decoder_checkpoint(monkeypatch, tmp_path, modeling)

        def draw() -> dict[str, Tensor]:
            out = {}
            for view, cls in (("high", network.MaskDecoderHigh), ("low", network.MaskDecoderLow)):
                decoder = cls("vit_b")
                out |= {
                    f"{view}.{n}": p for n, p in decoder.named_parameters() if n.split(".")[0] in HQ_PARTS
                }
            return out

        return laws(pooled(draw, builds_for(draw, most=32)))

    expected = WSI_SAM.get("vit_b", fingerprint("MaskDecoderHigh/Low", "vit_b", PER_BUILD), official_laws)
    draw = lambda: trainable(sam_256, WSISam())
    ours = our_laws(pooled(draw, builds_for(draw, most=32)))
    compare(ours, expected, {n: n for n in ours})


# ---- BA-SAM: the released code's coefficient per attention block ----
BA_SAM = ReferenceOutputs("init_ba_sam", "SAMFLOW_BA_SAM_SRC")


@pytest.mark.skipif(not BA_SAM.available, reason=BA_SAM.skip_reason())
def test_ba_sam_coefficients_start_as_the_official_ones(monkeypatch, tiny_sam):
    """``bias: reference_code``: one coefficient per block, 0.1 (float32) as the official ``Attention``'s."""

    def official_laws() -> dict:
        folder = Path(BA_SAM.src) / "models" / "sam" / "modeling"
        with official_modules(
            monkeypatch, "_official_ba_sam_init", folder, ("common", "image_encoder")
        ) as official:
            encoder = image_encoder(official.ImageEncoderViT, VARIANTS["tiny"], args=None, img_size=1024)
        return laws(pooled(lambda: {n: p for n, p in encoder.named_parameters() if "coefficient" in n}, 1))

    expected = BA_SAM.get("tiny/1024", fingerprint("ImageEncoderViT", "tiny", 1024), official_laws)
    plugin = BASam(bias="reference_code")
    coefficients = trainable(tiny_sam, plugin)["coefficients"]
    assert len(expected) == coefficients.numel() == len(tiny_sam.image_encoder.blocks)
    for i, value in enumerate(coefficients.detach()):
        ours = laws(pooled(lambda v=value: {"c": v.reshape(1)}, 1))["c"]
        assert_same_law(f"coefficients[{i}]", ours, expected[f"blocks.{i}.attn.coefficient"])


# ---- SAPNet: mmdetection's Shared2FCInstanceMILHead init_cfg, as mmcv applies it ----
SAPNET = ReferenceOutputs("init_sapnet", "SAMFLOW_SAPNET_SRC")
MIL_HEAD = Path("TOV_mmdetection") / "mmdet" / "models" / "roi_heads" / "bbox_heads" / "MIL_bbox_head.py"


def literal(node: ast.AST) -> Any:
    """A literal of the official source, with ``dict(k=v, ...)`` calls as dicts."""
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "dict":
        return {kw.arg: literal(kw.value) for kw in node.keywords}
    if isinstance(node, ast.List):
        return [literal(e) for e in node.elts]
    return ast.literal_eval(node)


def official_init_cfg(path: Path) -> dict[str, Any]:
    """The default ``init_cfg`` of ``Shared2FCInstanceMILHead.__init__`` in ``path``."""
    tree = ast.parse(path.read_text())
    head = next(
        n for n in ast.walk(tree) if isinstance(n, ast.ClassDef) and n.name == "Shared2FCInstanceMILHead"
    )
    init = next(n for n in head.body if isinstance(n, ast.FunctionDef) and n.name == "__init__")
    positional = init.args.args[len(init.args.args) - len(init.args.defaults) :]
    defaults = dict(zip([a.arg for a in positional], init.args.defaults, strict=True))
    return literal(defaults["init_cfg"])


def mmcv_normal_law(cfg: dict[str, Any], shape: list[int], bias: bool) -> dict[str, Any]:
    """The law mmcv's ``NormalInit`` ``cfg`` gives a Linear's weight (N(mean, std^2)) or bias (a constant:
    ``bias``, or -ln((1 - p) / p) for ``bias_prob`` p), as ``laws`` summarises one (an exact law: n = inf)."""
    if bias:
        p = cfg.get("bias_prob")
        value = cfg.get("bias", 0.0) if p is None else -math.log((1 - p) / p)
        return {"shape": shape, "constant": float(torch.tensor(value, dtype=torch.float32))}
    mean, std = cfg.get("mean", 0.0), cfg["std"]
    quantiles = mean + std * math.sqrt(2) * torch.erfinv(2 * PROBS - 1)
    return {
        "shape": shape,
        "constant": None,
        "n": math.inf,
        "mean": mean,
        "mad": std * math.sqrt(2 / math.pi),  # E|x - mean| of N(mean, std^2)
        "max": math.inf,
        "quantiles": quantiles,
    }


@pytest.mark.skipif(not SAPNET.available, reason=SAPNET.skip_reason())
def test_sapnet_head_init_is_the_official_init_cfg():
    """Every Linear N(0, 0.01^2), biases 0, ``fc_cls`` biases -ln(99) (prior 0.01): the official head's."""
    cfg = SAPNET.get(
        "init_cfg", fingerprint(str(MIL_HEAD)), lambda: official_init_cfg(Path(SAPNET.src) / MIL_HEAD)
    )
    assert cfg["type"] == "Normal" and "Linear" in cfg["layer"], cfg
    override = cfg["override"]
    assert override["name"] == "fc_cls" and override["type"] == "Normal", override
    draw = lambda: {n: p for n, p in SelectionNet(in_channels=8, num_classes=5, hidden=64).named_parameters()}
    ours = our_laws(pooled(draw, builds_for(draw, most=64)))
    assert len(ours) == 12  # two shared FCs, fc_cls and fc_ins for two stages: weights and biases
    for name, law in ours.items():
        layer_cfg = override if name.startswith("fc_cls.") else cfg
        expected = mmcv_normal_law(layer_cfg, law["shape"], bias=name.endswith(".bias"))
        assert_same_law(name, law, expected)


def test_the_law_comparison_fails_for_the_plausible_wrong_inits():
    """What the comparison must tell apart, at the pool sizes used (4096 values a side)."""
    gen = torch.Generator().manual_seed(0)

    def pool(make: Callable[[Tensor], Any]) -> Draws:
        t = torch.empty(4096)
        make(t)
        return {"w": t.reshape(1, -1).double(), "w#shape": torch.tensor([4096])}

    def same(a: Draws, b: Draws) -> bool:
        try:
            assert_same_law("w", our_laws(a)["w"], laws(b)["w"])
        except AssertionError:
            return False
        return True

    torch.manual_seed(1)
    kaiming = lambda t: nn.init.kaiming_uniform_(t.view(64, 64), a=math.sqrt(5))  # nn.Linear's default
    normal_same_std = lambda t: t.normal_(0, 1 / math.sqrt(3 * 64), generator=gen)
    assert same(pool(kaiming), pool(kaiming))
    assert same(
        pool(lambda t: nn.init.trunc_normal_(t, std=0.02)), pool(lambda t: t.normal_(0, 0.02, generator=gen))
    )
    assert not same(pool(kaiming), pool(normal_same_std))  # uniform against normal, the same std
    assert not same(pool(kaiming), pool(lambda t: nn.init.trunc_normal_(t, std=0.02)))
    assert not same(
        pool(lambda t: t.normal_(0, 1, generator=gen)), pool(lambda t: t.uniform_(-1, 1, generator=gen))
    )
    assert not same(
        pool(lambda t: t.normal_(0, 0.024, generator=gen)), pool(lambda t: t.normal_(0, 0.02, generator=gen))
    )
    assert not same(pool(nn.init.zeros_), pool(kaiming))  # a zero up-projection against a random one
    assert not same(pool(nn.init.ones_), pool(lambda t: t.fill_(0.0)))  # a LayerNorm weight not at 1
