"""MobileSAM's and EfficientSAM's encoders equal the official code on shared random weights.

The official code is not vendored: ``SAMFLOW_MOBILE_SAM_SRC`` names a checkout of
ChaoningZhang/MobileSAM (the folder holding ``mobile_sam/``; its TinyViT imports ``timm``) and
``SAMFLOW_EFFICIENT_SAM_SRC`` a checkout of yformer/EfficientSAM (holding ``efficient_sam/``). The
weights are drawn on samflow's side (BatchNorm statistics included) and the official encoder loads
them under the same keys, in float64. With a checkout the official encoder runs; without it, its
outputs recorded in ``tests/reference_outputs/mobile_sam.pt`` and ``efficient_sam.pt``
(``official_code.ReferenceOutputs``) for the same weights and input, so no timm is needed; the
feature maps, of over 4096 elements, are recorded as sketches (``official_code.Sketch``: their values
at 4096 seeded positions, their sums and marginals), compared by ``official_code.assert_close``. That
``build_sam(..., checkpoint=...)`` reads the official checkpoints (strict key mapping) is checked on a
file of the official layout (every key, shape and dtype of the official model's state dict, recorded
too) filled with seeded random values.
"""

from __future__ import annotations

import pytest
import torch
from official_code import ReferenceOutputs, assert_close, fingerprint, randomize_all
from segment_anything.modeling import Sam

from samflow.sam import build_sam, count_parameters

SIZE = 256  # a multiple of 64 that exercises window padding in every TinyViT stage (32/16/16 vs 7/14/7)
MOBILE = ReferenceOutputs("mobile_sam", "SAMFLOW_MOBILE_SAM_SRC")
EFFICIENT = ReferenceOutputs("efficient_sam", "SAMFLOW_EFFICIENT_SAM_SRC")
TINY_VIT = {  # the official TinyViT's arguments (MobileSAM's build_sam_vit_t) at SIZE
    "img_size": SIZE,
    "embed_dims": [64, 128, 160, 320],
    "depths": [2, 2, 6, 2],
    "num_heads": [2, 4, 5, 10],
    "window_sizes": [7, 7, 14, 7],
    "drop_path_rate": 0.0,
    "layer_lr_decay": 0.8,
}


def _import(ref: ReferenceOutputs, module: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the checkout's ``module`` importable (only with the checkout)."""
    monkeypatch.syspath_prepend(ref.src)
    if module == "mobile_sam":
        pytest.importorskip("timm", reason="the official TinyViT imports timm")
    pytest.importorskip(module)


def _layout(state: dict[str, torch.Tensor]) -> list[list]:
    """The official checkpoint's layout: [key, shape, dtype] of every tensor of ``state``, in order."""
    return [[name, list(t.shape), str(t.dtype).removeprefix("torch.")] for name, t in state.items()]


def _filled(layout: list[list], seed: int) -> dict[str, torch.Tensor]:
    """A state dict of ``layout`` (``_layout``'s form) with values drawn from ``seed``: a stand-in for
    the official checkpoint file, whose values samflow must land under the same keys."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape, dtype_name in layout:
        dtype = getattr(torch, dtype_name)
        state[name] = (
            torch.randn(shape, generator=gen, dtype=dtype)
            if dtype.is_floating_point
            else torch.randint(0, 100, shape, generator=gen, dtype=dtype)
        )
    return state


def _random_sam(variant: str) -> Sam:
    """samflow's ``variant`` at SIZE, its image encoder's weights drawn (seed 0), in float64."""
    ours = build_sam(variant, img_size=SIZE)
    randomize_all(ours.image_encoder, seed=0)
    return ours.double()


def _weights(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` for ``fingerprint``, which cannot hash a 0-d tensor (BatchNorm's ``num_batches_tracked``)."""
    return {k: v.reshape(1) if v.ndim == 0 else v for k, v in state.items()}


def _load(ref: torch.nn.Module, weights: dict[str, torch.Tensor], unused: tuple[str, ...]) -> None:
    """Give the official encoder samflow's weights under the same keys: every key but the official
    ones samflow declares unused (TinyViT's classifier head) comes from ``weights``."""
    missing, unexpected = ref.load_state_dict(weights, strict=False)
    assert not unexpected
    assert sorted(missing) == sorted(k for k in ref.state_dict() if k.startswith(unused))


@pytest.mark.skipif(not MOBILE.available, reason=MOBILE.skip_reason())
def test_mobile_sam_equals_official_tiny_vit(monkeypatch):
    enc = _random_sam("mobile_sam").image_encoder
    weights = enc.state_dict()
    x = torch.randn(2, 3, SIZE, SIZE, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    grid = SIZE // 16

    def official() -> dict:
        _import(MOBILE, "mobile_sam", monkeypatch)
        from mobile_sam.modeling.tiny_vit_sam import TinyViT

        ref = TinyViT(**TINY_VIT).double()
        _load(ref, weights, enc.unused_checkpoint_keys)
        ref.eval()  # eval after loading: the official attention caches its bias table on eval()
        head = sum(p.numel() for n, p in ref.named_parameters() if n.startswith(("head.", "norm_head.")))
        with torch.no_grad():
            # the official forward_features, whose reshape is fixed at 64 x 64 (1024 px), at SIZE
            early = ref.layers[1](ref.layers[0](ref.patch_embed(x)))
            final = ref.layers[3](ref.layers[2](early))
            embedding = ref.neck(final.view(2, grid, grid, -1).permute(0, 3, 1, 2))
        early = early.view(2, grid, grid, 160)  # samflow's layout (channels last)
        return {"early": early, "embedding": embedding, "parameters": count_parameters(ref) - head}

    expected = MOBILE.get("tiny_vit", fingerprint(_weights(weights), x, TINY_VIT), official)
    assert count_parameters(enc) == expected["parameters"] == 5_743_892
    with torch.no_grad():
        h = enc.add_position(enc.embed(x))
        for i in range(len(enc.blocks)):
            h = enc.run_block(i, h, None, None)
            if i == enc.early_block:
                assert_close(h, expected["early"], rtol=0, atol=1e-10)
        assert_close(enc.neck(h.permute(0, 3, 1, 2)), expected["embedding"], rtol=0, atol=1e-10)
        assert_close(enc(x), expected["embedding"], rtol=0, atol=1e-10)


@pytest.mark.skipif(not MOBILE.available, reason=MOBILE.skip_reason())
def test_mobile_sam_loads_the_official_checkpoint(monkeypatch, tmp_path):
    """``build_sam`` reads the official MobileSAM file (classifier head included) strictly: every
    tensor lands under its own key, the decoder side included."""

    def official() -> dict:
        _import(MOBILE, "mobile_sam", monkeypatch)
        from mobile_sam.build_sam import build_sam_vit_t

        # the official MobileSAM at 1024 px: TinyViT (classifier head included) + SAM's decoder side
        return {"layout": _layout(build_sam_vit_t().state_dict())}

    inputs = fingerprint("build_sam_vit_t().state_dict()")
    layout = MOBILE.get("checkpoint_layout", inputs, official)["layout"]
    full = _filled(layout, seed=0)
    path = tmp_path / "mobile_sam.pt"
    torch.save(full, path)
    ours = build_sam("mobile_sam", checkpoint=path, img_size=SIZE).double().state_dict()
    head = ("image_encoder.head.", "image_encoder.norm_head.")
    official_keys = {k: v for k, v in full.items() if not k.startswith(head)}
    assert len(official_keys) < len(full)
    assert set(ours) == set(official_keys)
    for name, value in official_keys.items():
        torch.testing.assert_close(ours[name], value.to(ours[name].dtype), rtol=0, atol=0)


@pytest.mark.skipif(not EFFICIENT.available, reason=EFFICIENT.skip_reason())
@pytest.mark.parametrize(
    ("variant", "dim", "heads", "count"),
    [
        ("efficient_sam_vitt", 192, 3, 6_163_840),
        ("efficient_sam_vits", 384, 6, 22_353_664),
    ],
)
def test_efficient_sam_equals_official_encoder(variant, dim, heads, count, monkeypatch):
    enc = _random_sam(variant).image_encoder
    weights = enc.state_dict()
    x = torch.randn(2, 3, SIZE, SIZE, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    arguments = (SIZE, 16, 3, dim, "layer_norm", 12, heads, 4.0, [256, 256])  # + torch.nn.GELU

    def official() -> dict:
        _import(EFFICIENT, "efficient_sam", monkeypatch)
        from efficient_sam.efficient_sam_encoder import ImageEncoderViT

        ref = ImageEncoderViT(*arguments, torch.nn.GELU).double()
        _load(ref, weights, enc.unused_checkpoint_keys)
        ref.eval()
        with torch.no_grad():
            return {"embedding": ref(x), "parameters": count_parameters(ref)}

    expected = EFFICIENT.get(variant, fingerprint(_weights(weights), x, arguments), official)
    assert count_parameters(enc) == expected["parameters"] == count
    with torch.no_grad():
        assert_close(enc(x), expected["embedding"], rtol=0, atol=1e-10)


@pytest.mark.skipif(not EFFICIENT.available, reason=EFFICIENT.skip_reason())
@pytest.mark.parametrize(
    ("variant", "dim", "heads"), [("efficient_sam_vitt", 192, 3), ("efficient_sam_vits", 384, 6)]
)
def test_efficient_sam_loads_the_official_checkpoint(variant, dim, heads, monkeypatch, tmp_path):
    """``build_sam`` reads the official EfficientSAM file (``{"model": ...}``, its own decoder left
    out with a warning) strictly: every image-encoder tensor lands under its own key."""

    def official() -> dict:
        _import(EFFICIENT, "efficient_sam", monkeypatch)
        from efficient_sam.efficient_sam import build_efficient_sam

        # the official EfficientSAM at 1024 px, with its own decoder
        return {"layout": _layout(build_efficient_sam(dim, heads).state_dict())}

    inputs = fingerprint(f"build_efficient_sam({dim}, {heads}).state_dict()")
    layout = EFFICIENT.get(f"{variant}/checkpoint_layout", inputs, official)["layout"]
    full = _filled(layout, seed=0)
    path = tmp_path / f"{variant}.pt"
    torch.save({"model": full}, path)  # the official checkpoints' layout
    with pytest.warns(UserWarning, match="only the image encoder is loaded"):
        ours = build_sam(variant, checkpoint=path, img_size=SIZE).double().image_encoder.state_dict()
    encoder = {k.removeprefix("image_encoder."): v for k, v in full.items() if k.startswith("image_encoder.")}
    assert len(encoder) < len(full)  # the official decoder's keys are in the file, and left out
    assert set(ours) == set(encoder)
    for name, value in encoder.items():
        torch.testing.assert_close(ours[name], value.to(ours[name].dtype), rtol=0, atol=0)
