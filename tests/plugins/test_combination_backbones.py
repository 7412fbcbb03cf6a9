"""Decoder-side built-ins together on MobileSAM's and EfficientSAM's encoders (128 px).

``tests/sam_backbones`` runs decoder tuning, HQ-SAM, PA-SAM and the extra tokens alone on them and
refuses the encoder plugins by name; this adds WSI-SAM and SAPNet, each in a pair, with the checks
of ``test_combinations.py``'s training step (a gradient to each plugin, none to the frozen encoder,
one optimizer group per plugin, frozen SAM unchanged by a step). Each backbone step takes seconds,
so two pairs per backbone cover the six decoder-side plugins with the others' tests.
"""

from __future__ import annotations

import pytest
import torch
from test_combinations import MAKE, batch_for, check_one_step

from samflow.module import SamflowModule, SamSpec


@pytest.mark.parametrize("variant", ["mobile_sam", "efficient_sam_vitt"])  # ViT-S is ViT-T wider
@pytest.mark.parametrize("pair", [("pa_sam", "wsi_sam"), ("hq_sam", "sapnet")], ids="+".join)
def test_decoder_side_pair_trains_on_another_backbone(variant, pair):
    torch.manual_seed(0)
    plugins = {key: MAKE[key](lr=1e-3) for key in pair}
    module = SamflowModule(sam=SamSpec(variant=variant, img_size=128), plugins=plugins)
    check_one_step(module, batch_for(pair), {key: 1e-3 for key in pair})
    encoder = module.model.sam.image_encoder
    assert all(not p.requires_grad and p.grad is None for p in encoder.parameters())
