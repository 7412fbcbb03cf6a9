import pytest
import torch
import torch.nn.functional as F

from samflow.instance import CocoMaskAP, SOLOv2Head

RANGES = ((0.0, 0.25), (0.2, 0.5), (0.4, 2.0))


def _head(**kw):
    args = {
        "in_channels": 64,
        "feat_channels": 32,
        "mask_feat_channels": 32,
        "mask_channels": 16,
        "num_convs": 1,
        "num_grids": (12, 8, 6),
        "scale_ranges": RANGES,
    }
    args.update(kw)
    return SOLOv2Head(2, **args)


def test_shapes():
    head = _head()
    out = head(torch.randn(2, 64, 8, 8))  # a 128 px input at stride 16
    assert [tuple(c.shape) for c in out["cate"]] == [(2, 2, 12, 12), (2, 2, 8, 8), (2, 2, 6, 6)]
    assert [tuple(k.shape) for k in out["kernel"]] == [(2, 16, 12, 12), (2, 16, 8, 8), (2, 16, 6, 6)]
    assert tuple(out["mask_feat"].shape) == (2, 16, 16, 16)  # stride 8
    # the pyramid keeps the embedding's width, as the reference's FPN (256) feeds its head
    assert [tuple(p.shape) for p in head.pyramid(torch.randn(1, 64, 8, 8))] == [
        (1, 64, 16, 16),
        (1, 64, 8, 8),
        (1, 64, 4, 4),
    ]
    head.score_thr = 0.0  # everything passes, so the caps show
    head.max_per_img = 5
    res = head.predict(out, (100, 120))
    assert len(res) == 2
    for masks, scores, labels in res:
        assert masks.dtype == torch.bool and masks.shape[1:] == (100, 120)
        assert masks.shape[0] == scores.shape[0] == labels.shape[0] <= 5
        assert torch.all(scores[:-1] >= scores[1:])
    with pytest.raises(ValueError, match="one entry per level"):
        SOLOv2Head(2, num_grids=(4, 4))


def test_assignment_centre_region():
    head = _head()
    masks = torch.zeros(2, 128, 128, dtype=torch.bool)
    masks[0, 40:72, 16:80] = True  # 64 x 32: sqrt(area) / 128 = 0.354 -> level 1 only (S = 8)
    masks[1, 16:112, 16:112] = True  # 96 x 96: 0.75 -> level 2 only (S = 6)
    levels = head.assign(masks, torch.tensor([1, 0]), (128, 128))
    # Instance 0: centre of mass (56, 48) -> cell (3, 3); centre region y 56 +- 3.2, x 48 +- 6.4
    # -> rows int(52.8/16)=3 .. int(59.2/16)=3, cols int(41.6/16)=2 .. int(54.4/16)=3.
    cate, pos, idx = levels[1]
    assert torch.nonzero(pos).tolist() == [[3, 2], [3, 3]]
    assert cate[pos].tolist() == [1, 1] and idx[pos].tolist() == [0, 0]
    assert int((cate == 2).sum()) == 64 - 2  # the rest is background (= num_classes)
    # Instance 1: centre (64, 64), half region 9.6 -> rows/cols int(54.4*6/128)=2 .. int(73.6*6/128)=3.
    cate, pos, idx = levels[2]
    assert torch.nonzero(pos).tolist() == [[2, 2], [2, 3], [3, 2], [3, 3]]
    assert set(cate[pos].tolist()) == {0} and set(idx[pos].tolist()) == {1}
    assert not levels[0][1].any()


def test_assignment_caps_at_3x3():
    head = _head(sigma=1.0)
    masks = torch.zeros(1, 128, 128, dtype=torch.bool)
    masks[0, 16:112, 16:112] = True
    _, pos, _ = head.assign(masks, torch.tensor([0]), (128, 128))[2]
    assert torch.nonzero(pos).tolist() == [[r, c] for r in (2, 3, 4) for c in (2, 3, 4)]


def test_loss_finite_gradients_only_in_head(tiny_sam):
    head = _head()
    images = torch.randn(2, 3, 128, 128)
    feats = tiny_sam.image_encoder(images)
    masks = torch.zeros(2, 128, 128, dtype=torch.bool)
    masks[0, 40:72, 16:80] = True
    masks[1, 16:112, 16:112] = True
    targets = [
        {"masks": masks[:1], "labels": torch.tensor([1])},
        {"masks": masks[1:], "labels": torch.tensor([0])},
    ]
    losses = head.loss(head(feats), targets)
    assert set(losses) == {"loss_cls", "loss_mask", "loss"}
    assert all(torch.isfinite(v) for v in losses.values())
    assert losses["loss_mask"].item() > 0
    losses["loss"].backward()
    assert all(p.grad is None for p in tiny_sam.parameters())
    assert all(p.grad is not None for p in head.parameters())
    assert head.kernel_out.weight.grad.abs().sum() > 0  # the dice loss reaches the kernel branch
    # an image without instances: only the focal term, still finite, mask loss 0
    empty = head.loss(head(feats[:1]), [{"masks": masks[:0], "labels": torch.zeros(0, dtype=torch.long)}])
    assert torch.isfinite(empty["loss"]) and empty["loss_mask"].item() == 0.0
    with pytest.raises(ValueError, match="input size"):
        head.loss(head(feats[:1]), [{"masks": masks[:1, :64], "labels": torch.tensor([0])}])


def _synthetic(n=6, size=128, seed=0):
    """Images of 2-3 overlapping rectangles of 2 classes; features: a fixed random 1x1 projection of the
    class-and-instance-edge maps pooled to stride 16 (a stand-in for SAM's frozen embedding)."""
    g = torch.Generator().manual_seed(seed)
    proj = torch.randn(64, 5, generator=g)
    feats, targets = [], []
    for _ in range(n):
        k = int(torch.randint(2, 4, (1,), generator=g))
        masks = torch.zeros(k, size, size, dtype=torch.bool)
        labels = torch.randint(0, 2, (k,), generator=g)
        for i in range(k):
            h, w = (int(v) for v in torch.randint(24, 64, (2,), generator=g))
            y, x = (
                int(torch.randint(0, size - h, (1,), generator=g)),
                int(torch.randint(0, size - w, (1,), generator=g)),
            )
            masks[i, y : y + h, x : x + w] = True
        maps = torch.zeros(5, size, size)
        for i in range(k):  # later instances on top
            m = masks[i].float()
            maps[int(labels[i])] = torch.maximum(maps[int(labels[i])], m)
            edge = m - (-F.max_pool2d(-m[None, None], 3, 1, 1))[0, 0]
            maps[2] += edge
            maps[3 + i % 2] += m
        pooled = F.avg_pool2d(maps[None], 16)[0]
        feats.append(torch.einsum("oc,chw->ohw", proj, pooled))
        targets.append({"masks": masks, "labels": labels})
    return torch.stack(feats), targets


def _ap(head, feats, targets):
    head.eval()
    metric = CocoMaskAP()
    metric.update(head.predict(head(feats), (128, 128)), targets)
    head.train()
    return metric.compute()["ap"].item()


def test_short_training_raises_mask_ap():
    torch.manual_seed(0)
    feats, targets = _synthetic(n=4)
    head = _head(score_thr=0.05)
    head.score_thr = 0.0  # the untrained head's scores sit near the 0.01 prior: let them all through
    before = _ap(head, feats, targets)
    head.score_thr = 0.05
    opt = torch.optim.Adam(head.parameters(), lr=3e-3)
    for _ in range(100):
        loss = head.loss(head(feats), targets)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = _ap(head, feats, targets)
    print(f"mask AP before {before:.4f} after {after:.4f}")
    # untrained: kernels ~ 0 give mask probabilities ~ 0.5, none above mask_thr, so no detections at
    # all, which torchmetrics reports as AP -1 (COCO's 'undefined'); measured after: 0.55
    assert before < 0.05
    assert after > 0.3
