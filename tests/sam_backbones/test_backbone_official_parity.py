"""MobileSAM's and EfficientSAM's encoders equal the official code on shared random weights.

The official code is not vendored: point ``SAMFLOW_MOBILE_SAM_SRC`` at a checkout of
ChaoningZhang/MobileSAM (the folder holding ``mobile_sam/``; its TinyViT imports ``timm``) and
``SAMFLOW_EFFICIENT_SAM_SRC`` at a checkout of yformer/EfficientSAM (holding ``efficient_sam/``).
Without them these tests skip. Both models get the same random weights (BatchNorm statistics
included) in float64; the official checkpoints' layout is written to a file and loaded with
``build_sam(..., checkpoint=...)``, so the strict key mapping is checked too.
"""

from __future__ import annotations

import os

import pytest
import torch
from official_code import randomize_all

from samflow.sam import build_sam, count_parameters

SIZE = 256  # a multiple of 64 that exercises window padding in every TinyViT stage (32/16/16 vs 7/14/7)


def _official(env: str, module: str, monkeypatch: pytest.MonkeyPatch):
    src = os.environ.get(env)
    if not src:
        pytest.skip(f"set {env} to a checkout of the official code to compare with it")
    monkeypatch.syspath_prepend(src)
    if module == "mobile_sam":
        pytest.importorskip("timm", reason="the official TinyViT imports timm")
    return pytest.importorskip(module)


def test_mobile_sam_equals_official_tiny_vit(monkeypatch, tmp_path):
    _official("SAMFLOW_MOBILE_SAM_SRC", "mobile_sam", monkeypatch)
    from mobile_sam.build_sam import build_sam_vit_t
    from mobile_sam.modeling.tiny_vit_sam import TinyViT

    full = build_sam_vit_t()  # the official MobileSAM at 1024 px: TinyViT + SAM's decoder side
    randomize_all(full, seed=0)
    path = tmp_path / "mobile_sam.pt"
    torch.save(full.state_dict(), path)  # the official checkpoint's layout (classifier head included)

    ours = build_sam("mobile_sam", checkpoint=path, img_size=SIZE).double()
    ref = TinyViT(
        img_size=SIZE,
        embed_dims=[64, 128, 160, 320],
        depths=[2, 2, 6, 2],
        num_heads=[2, 4, 5, 10],
        window_sizes=[7, 7, 14, 7],
        drop_path_rate=0.0,
        layer_lr_decay=0.8,
    )
    ref.load_state_dict(
        {
            k.removeprefix("image_encoder."): v
            for k, v in full.state_dict().items()
            if k.startswith("image_encoder.")
        }
    )
    ref = ref.double().eval()  # eval after loading: the official attention caches its bias table on eval()
    head = sum(p.numel() for n, p in ref.named_parameters() if n.startswith(("head.", "norm_head.")))
    assert count_parameters(ours.image_encoder) == count_parameters(ref) - head == 5_743_892
    for part in ("prompt_encoder", "mask_decoder"):
        for name, value in getattr(full, part).state_dict().items():
            torch.testing.assert_close(getattr(ours, part).state_dict()[name], value.double(), rtol=0, atol=0)

    x = torch.randn(2, 3, SIZE, SIZE, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        # the official forward_features, whose reshape is fixed at 64 x 64 (1024 px), at SIZE
        grid = SIZE // 16
        early = ref.layers[1](ref.layers[0](ref.patch_embed(x)))
        final = ref.layers[3](ref.layers[2](early))
        expected = ref.neck(final.view(2, grid, grid, -1).permute(0, 3, 1, 2))
        enc = ours.image_encoder
        h = enc.add_position(enc.embed(x))
        for i in range(len(enc.blocks)):
            h = enc.run_block(i, h, None, None)
            if i == enc.early_block:
                torch.testing.assert_close(h, early.view(2, grid, grid, 160), rtol=0, atol=1e-10)
        torch.testing.assert_close(enc.neck(h.permute(0, 3, 1, 2)), expected, rtol=0, atol=1e-10)
        torch.testing.assert_close(enc(x), expected, rtol=0, atol=1e-10)


@pytest.mark.parametrize(
    ("variant", "dim", "heads", "count"),
    [
        ("efficient_sam_vitt", 192, 3, 6_163_840),
        ("efficient_sam_vits", 384, 6, 22_353_664),
    ],
)
def test_efficient_sam_equals_official_encoder(variant, dim, heads, count, monkeypatch, tmp_path):
    _official("SAMFLOW_EFFICIENT_SAM_SRC", "efficient_sam", monkeypatch)
    from efficient_sam.efficient_sam import build_efficient_sam
    from efficient_sam.efficient_sam_encoder import ImageEncoderViT

    full = build_efficient_sam(dim, heads)  # the official EfficientSAM at 1024 px, its own decoder
    randomize_all(full, seed=0)
    path = tmp_path / f"{variant}.pt"
    torch.save({"model": full.state_dict()}, path)  # the official checkpoints' layout
    with pytest.warns(UserWarning, match="only the image encoder is loaded"):
        ours = build_sam(variant, checkpoint=path, img_size=SIZE).double()

    ref = ImageEncoderViT(SIZE, 16, 3, dim, "layer_norm", 12, heads, 4.0, [256, 256], torch.nn.GELU)
    ref.load_state_dict(full.image_encoder.state_dict())
    ref = ref.double().eval()
    assert count_parameters(ours.image_encoder) == count_parameters(ref) == count
    x = torch.randn(2, 3, SIZE, SIZE, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(ours.image_encoder(x), ref(x), rtol=0, atol=1e-10)
