"""The adapter in the decoder: maps, write-back, point tokens from SAM's frozen encodings, token counts."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import random_batch
from pa_sam_helpers import Probe, hooked

from samflow.batch import SamBatch
from samflow_plugins.pa_sam import PASam

ATOL = 1e-5


def _run(sam, batch, *, training=False, epoch=0, **kwargs):
    before, pa, after = Probe(), PASam(**kwargs), Probe()
    model = hooked(sam, {"before": before, "pa": pa, "after": after}).train(training)
    out, ctx = model.run(batch, model.context(batch, epoch=epoch))  # ctx: the decoder-stage context
    return out, ctx, pa, before, after


def test_adapter_maps_and_write_back_follow_the_reference(tiny_sam):
    """Recompute G, A, t_U, t_R, the maps and the layer update by hand with SAM's own Attention."""
    batch = random_batch(2, prompt="box")
    with torch.no_grad():
        out, ctx, pa, before, after = _run(tiny_sam, batch)
        s0, s1 = before.states[1], after.states[1]
        guide = pa.guide(ctx)
        n, t, c = s0.queries.shape
        ad = pa.adapter
        G = guide * s0.keys
        # SAM's own Attention.forward (explicit softmax), not the SDPA path the plugin uses
        A = ad.cross_attn_token_to_image(q=s0.queries + s0.query_pe, k=G + s0.key_pe, v=G)
        m = A[:, 1]
        t_u = ad.uncertain_mlp(torch.cat([ad.static_uncertain_token.weight.expand(n, -1), m], -1))
        t_r = ad.refined_mlp(torch.cat([ad.static_refined_token.weight.expand(n, -1), m], -1))
        maps = ctx.state["pa"]
        for name, token in [("coarse", m), ("refined", t_r), ("uncertainty", t_u)]:
            expected = torch.einsum("nc,nlc->nl", token, G)  # token · Gᵀ
            torch.testing.assert_close(maps[name].flatten(1), expected, atol=ATOL, rtol=1e-5)

        a_prime = torch.cat([A[:, :1], t_r[:, None], A[:, 2:]], 1)
        torch.testing.assert_close(s1.attn_out[:, :t], s0.attn_out + a_prime, atol=ATOL, rtol=1e-5)
        torch.testing.assert_close(s1.keys, s0.keys + G)
        assert torch.equal(s1.queries[:, :t], s0.queries)
        assert torch.equal(s1.queries[:, t:], torch.zeros(n, 8, c))
        assert torch.equal(s1.query_pe[:, :t], s0.query_pe)
        assert torch.equal(s1.visible, torch.ones(n, t + 8, dtype=torch.bool))  # the mined points are visible
        # the appended tokens' content is (keys + G) at the mined cells (evaluation: weight exactly 1)
        cells = maps["points"]
        content = (s0.keys + G).gather(1, cells[..., None].expand(-1, -1, c))
        torch.testing.assert_close(s1.attn_out[:, t:], content)
        # the maps are exposed, upsampled to SAM's mask resolution
        assert out.masks["pa/coarse"].shape == out.masks["sam"][:, :1].shape
        torch.testing.assert_close(
            out.masks["pa/refined"],
            F.interpolate(maps["refined"], size=(32, 32), mode="bilinear", align_corners=False),
        )


@pytest.mark.parametrize("training", [False, True])
def test_point_tokens_use_sams_frozen_point_encodings(tiny_sam, training):
    """The appended PEs equal SAM's prompt encoder on the cell centres with labels 1 x4, 0 x4."""
    batch = random_batch(3, prompt="box")
    torch.manual_seed(3)
    _, ctx, _, before, after = _run(tiny_sam, batch, training=training, epoch=10)
    t = before.states[1].queries.shape[1]
    cells, labels = ctx.state["pa"]["points"], ctx.state["pa"]["point_labels"]
    assert torch.equal(labels, torch.tensor([[1] * 4 + [0] * 4] * 3))
    h, w = ctx.encoded.embeddings.shape[-2:]
    size = tiny_sam.image_encoder.img_size
    # pixel coordinates of the cell centres; SAM's prompt encoder adds 0.5 itself
    coords = torch.stack([(cells % w + 0.5) * size / w, (cells // w + 0.5) * size / h], -1) - 0.5
    with torch.no_grad():
        sparse, _ = tiny_sam.prompt_encoder(points=(coords, labels), boxes=None, masks=None)
    assert sparse.shape[1] == 9  # SAM pads with a not-a-point token when there is no box
    appended = after.states[1].query_pe[:, t:].detach()
    # training: value of the straight-through weight is 1 up to rounding
    torch.testing.assert_close(appended, sparse[:, :8], atol=ATOL if not training else 1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("training", "epoch", "start", "added"),
    [(True, 0, 4, 0), (True, 4, 4, 0), (True, 5, 4, 8), (True, 20, 4, 8), (False, 0, 4, 8), (True, 0, -1, 8)],
)
def test_mining_adds_eight_tokens_only_once_started(tiny_sam, training, epoch, start, added):
    batch = random_batch(2, prompt="box")
    _, ctx, _, before, after = _run(tiny_sam, batch, training=training, epoch=epoch, mining_start_epoch=start)
    base = 5 + 2  # iou + 4 mask tokens + 2 box corners
    assert before.states[1].queries.shape[1] == base
    for field in ("queries", "query_pe", "attn_out", "visible"):
        assert getattr(after.states[1], field).shape[1] == base + added
    assert after.final_tokens == base + added
    assert ("points" in ctx.state["pa"]) == bool(added)


def test_adapter_runs_in_the_configured_layer_and_checks_it(tiny_sam):
    batch = random_batch(2, prompt="none")
    _, _, _, before, after = _run(tiny_sam, batch, layer=0)
    assert after.states[0].queries.shape[1] == before.states[0].queries.shape[1] + 8
    assert after.states[1].queries.shape[1] == 5 + 8  # the points stay for the later layers
    with pytest.raises(ValueError, match=r"'pa'.*layer 2 does not exist.*0\.\.1"):
        hooked(tiny_sam, {"pa": PASam(layer=2)})


def test_evaluation_is_deterministic_and_rows_follow_their_image(tiny_sam):
    batch = random_batch(2, prompt="box")
    rows = SamBatch(
        image=batch.image,
        box=torch.cat([batch.box, batch.box.flip(0)]),
        image_index=torch.tensor([0, 1, 0, 1]),
        input_size=batch.input_size,
    )
    model = hooked(tiny_sam, {"pa": PASam()}).eval()
    with torch.no_grad():
        first, second = model(rows), model(rows)
        single = model(SamBatch(image=batch.image[1:], box=rows.box[3:], input_size=batch.input_size[1:]))
    assert torch.equal(first.pred, second.pred)
    torch.testing.assert_close(first.pred[3], single.pred[0], atol=ATOL, rtol=0)
    uncertainty = first.masks["pa/uncertainty"][3]
    torch.testing.assert_close(uncertainty, single.masks["pa/uncertainty"][0], atol=ATOL, rtol=0)
