"""SAPNet: box rules and MIL selection checked on hand-built bags with hand-worked values."""

from __future__ import annotations

import math

import pytest
import torch
from torchvision.ops import box_iou

from samflow_plugins.sapnet.boxes import (
    bms,
    hard_negatives,
    pdg_phi,
    pnpg_positives,
    random_negatives,
    select_parent,
)
from samflow_plugins.sapnet.mil import mps_ranks, negative_loss, qfl, selection_score
from samflow_plugins.sapnet.net import SelectionNet
from samflow_plugins.sapnet.plugin import masks_to_boxes


def t(*rows):
    return torch.tensor(rows, dtype=torch.float32)


# ---- PNPG ----
def test_pnpg_gives_the_reference_26_boxes_worked_by_hand():
    # parent (10, 20, 50, 60): centre (30, 40), w = h = 40; reference box = centre ± 20 s
    props = t([0, 0, 5, 5], [10, 20, 50, 60], [1, 1, 2, 2], [3, 3, 9, 9], [4, 4, 8, 8], [2, 2, 6, 6])[None]
    bag = pnpg_positives(props, torch.tensor([1]), torch.ones(1, 6))
    assert bag.shape == (1, 26, 4)
    assert torch.equal(bag[0, :6], props[0])
    expect = {
        6: (9.8, 19.8, 50.2, 60.2),  # s = 1.01
        10: (9.0, 19.0, 51.0, 61.0),  # s = 1.05
        20: (7.0, 17.0, 53.0, 63.0),  # s = 1.15
        21: (8.4, 18.4, 51.6, 61.6),  # φ = 1: s = 1 + 0.005 * 16 = 1.08
        25: (8.0, 18.0, 52.0, 62.0),  # s = 1.10
    }
    for i, box in expect.items():
        assert torch.allclose(bag[0, i], torch.tensor(box), atol=1e-5), i
    # another same-class point inside (φ = 0.8): five shrunk boxes, s = 1 − 0.005 n / 0.8
    phi = torch.ones(1, 6)
    phi[0, 1] = 0.8
    bag = pnpg_positives(props, torch.tensor([1]), phi)
    assert torch.allclose(bag[0, 21], t(10.125, 20.125, 49.875, 59.875), atol=1e-5)  # s = 0.99375
    assert torch.allclose(bag[0, 25], t(10.625, 20.625, 49.375, 59.375), atol=1e-5)  # s = 0.96875
    assert torch.equal(bag[0, 6:21], pnpg_positives(props, torch.tensor([1]), torch.ones(1, 6))[0, 6:21])


def test_pnpg_clamps_at_zero_only():
    props = t([0, 0, 10, 10], [0, 0, 10, 10])[None]
    bag = pnpg_positives(props, torch.tensor([0]), torch.ones(1, 2))
    assert torch.allclose(bag[0, 2 + 14], t(0, 0, 10.75, 10.75))  # s = 1.15: −0.75 → 0, 10.75 kept


def test_parent_default_is_top1_and_reference_falls_back_to_the_last():
    props = t([0, 0, 10, 10], [5, 5, 20, 20], [0, 0, 30, 30])[None]
    top1 = torch.tensor([1])
    moved = t([4, 4, 22, 22])
    assert select_parent(moved, props, top1).tolist() == [1]
    assert select_parent(moved, props, top1, reference_fallback=True).tolist() == [2]
    assert select_parent(t([5.5, 4.5, 20.9, 19.1]), props, top1, reference_fallback=True).tolist() == [1]


# ---- PDG ----
def test_pdg_changes_scores_only_for_a_same_class_point_inside():
    points = t([10, 10], [20, 10], [15, 30], [20, 10])
    labels = torch.tensor([0, 0, 1, 0])
    image = torch.tensor([0, 0, 0, 1])  # point 3 sits at point 1's place but in another image
    props = torch.zeros(4, 3, 4)
    props[0] = t([0, 0, 15, 15], [0, 0, 25, 15], [0, 0, 25, 40])  # 2nd holds point 1, 3rd holds 1 and 2
    props[1:] = t([0, 0, 100, 100], [0, 0, 1, 1], [19, 9, 21, 11])
    phi = pdg_phi(points, labels, image, props)
    d = math.sqrt(10.0)  # ‖p0 − p1‖^{1/2}
    assert phi[0, 0] == 1
    assert phi[0, 1] == pytest.approx(1 / (1 + math.exp(-1 / d)))
    assert phi[0, 2] == pytest.approx(1 / (1 + math.exp(-1 / d)))  # point 2 is another class
    assert phi[1, 0] == pytest.approx(1 / (1 + math.exp(-1 / d)))  # point 0 inside point 1's big box
    assert phi[1, 1:].tolist() == [1, 1] and phi[2].tolist() == [1, 1, 1]
    assert phi[3].tolist() == [1, 1, 1]  # alone in its image


def test_pdg_border_point_is_outside():
    points = t([10, 10], [20, 10])
    phi = pdg_phi(
        points, torch.tensor([0, 0]), torch.tensor([0, 0]), t([0, 0, 20, 20], [0, 0, 20, 20])[:, None]
    )
    assert phi[0, 0] == 1  # x = 20 is on the border
    assert phi[1, 0] < 1  # (10, 10) is strictly inside


# ---- BMS ----
def test_bms_expands_a_part_box_to_the_enclosing_proposal():
    part = t([5, 5, 25, 25])  # IoU 400/900 = 4/9 with the whole (0, 0, 30, 30), which contains it
    props = t([0, 0, 30, 30], [0, 0, 8, 8], [100, 100, 200, 200])[None]
    out = bms(part, props)
    w = 4 / 9
    assert torch.allclose(out, (w * props[0, 0] + part) / (1 + w))  # (45/13, ..., 345/13)
    assert torch.allclose(out[0], t(45 / 13, 45 / 13, 345 / 13, 345 / 13))
    assert box_iou(out, props[0, :1]) > box_iou(part, props[0, :1])


def test_bms_pulls_with_high_iou_and_ignores_smaller_and_later_proposals():
    box = t([2, 2, 28, 28])  # IoU 676/900 with (0, 0, 30, 30)
    iou = 676 / 900
    props = t([0, 0, 30, 30], [0, 0, 10, 10], [0, 0, 10, 10], [0, 0, 100, 100])[None]
    assert torch.allclose(bms(box, props), (props[0, 0] + iou * box) / (1 + iou))
    # proposal 3 (not among SAM's three) and a smaller box do not move it
    only_late = t([2, 2, 28, 28], [0, 0, 10, 10], [0, 0, 10, 10], [0, 0, 30, 30])[None]
    assert torch.equal(bms(box, only_late), box)


# ---- negatives ----
def test_random_negatives_follow_the_rule_and_iou_threshold():
    g = torch.Generator().manual_seed(0)
    props = t([10, 10, 40, 40], [0, 0, 64, 64])[None]
    neg, img, valid = random_negatives(props, torch.tensor([0]), torch.tensor([[64, 64]]), 300, generator=g)
    assert neg.shape == (300, 4) and img.tolist() == [0] * 300
    assert (neg[:, 0] >= -12.8).all() and (neg[:, 0] <= 64).all() and (neg[:, 2] >= neg[:, 0]).all()
    assert (neg[:, 2] <= 76.8).all() and (neg[:, 3] <= 76.8).all()
    expect = (box_iou(neg, props[0]) < 0.3).all(1).float()
    assert torch.equal(valid, expect) and 0 < valid.sum() < 300


def test_stage_boxes_are_clamped_to_their_image_not_the_padding():
    """The reference clamps a stage's box to ``img_shape`` (the image before padding): a 96 x 128 image
    (h x w) in a 128 x 128 frame clamps y at 96, x at 128; a 128 x 64 image x at 64."""
    from samflow_plugins.sapnet.net import clamp_to_image

    boxes = t([-5, 10, 140, 120], [20, -3, 100, 127])
    sizes = torch.tensor([[96, 128], [128, 64]])
    assert clamp_to_image(boxes, sizes).tolist() == [[0, 10, 128, 96], [20, 0, 64, 127]]


def test_random_negatives_of_an_image_without_points_weigh_nothing():
    """An image kept without instances (``empty: keep``) is left out of training, as mmdetection leaves
    out images without annotations: its negatives have weight 0, the other image's keep the rule."""
    g = torch.Generator().manual_seed(0)
    props = t([10, 10, 40, 40], [0, 0, 64, 64])[None]  # one point, on image 1 of 2
    sizes = torch.tensor([[64, 64], [64, 64]])
    neg, img, valid = random_negatives(props, torch.tensor([1]), sizes, 200, generator=g)
    assert img.tolist() == [0] * 200 + [1] * 200
    assert valid[:200].sum() == 0
    expect = (box_iou(neg[200:], props[0]) < 0.3).all(1).float()
    assert torch.equal(valid[200:], expect) and valid[200:].sum() > 0


def test_hard_negatives_are_central_half_boxes_of_large_best_proposals():
    props = t([0, 0, 100, 80], [0, 0, 60, 60])[None].repeat(2, 1, 1)
    box, w = hard_negatives(props, torch.tensor([0, 1]))
    assert box.tolist() == [[25, 20, 75, 60], [15, 15, 45, 45]]
    assert w.tolist() == [1, 0]  # 60² ≤ 64²
    assert box_iou(box[:1], props[0, :1]).item() == pytest.approx(0.25)


# ---- MIL scores ----
def test_selection_score_and_mps_ranks_by_hand():
    c = torch.zeros(1, 3, 3)
    c[0, :, 1] = torch.tensor([0.0, 2.0, 1.0])  # class 1 logits per proposal
    s = torch.zeros(1, 3, 3)
    s[0, :, 1] = torch.tensor([1.0, 0.0, 3.0])
    d = selection_score(c, s, torch.tensor([1]))
    pc = c.softmax(-1)[0, :, 1]
    ps = s.softmax(1)[0, :, 1]
    assert torch.allclose(d[0], pc * ps)
    assert d.argmax(1).item() == 2
    assert mps_ranks(torch.tensor([[0.1, 0.6, 0.3, 0.5, 0.2, 0.4]])).tolist() == [
        [3, 2, 0]
    ]  # order 1, 3, 5, 2, 4, 0


def test_qfl_by_hand():
    p, q = torch.tensor([0.8]), torch.tensor([1.0])
    assert qfl(p, q).item() == pytest.approx(-(0.2**2) * math.log(0.8 + 1e-6), rel=1e-5)


def _oracle_head(truth, num_classes):
    """A head whose logits reward IoU with the hidden true box of each point (for the whole pass)."""

    def head(features, boxes, image_index, scale, stage):
        lead = boxes.shape[:-1]
        flat = boxes.reshape(-1, 4)
        rows = image_index.reshape(-1)
        iou = box_iou(flat, truth).gather(1, rows[:, None]).squeeze(1)  # one truth per image here
        k = num_classes + (1 if stage == 0 else 0)
        c = torch.zeros(len(flat), k)
        c[:, 0] = 5 * iou
        return c.reshape(*lead, k), c.reshape(*lead, k) * 4

    return head


def test_the_pass_picks_the_intended_proposal_and_its_mask():
    truth = t([8, 8, 40, 40], [0, 10, 20, 50])  # one object per image
    props = torch.stack(
        [
            t(
                [10, 10, 20, 20],
                [8, 8, 40, 40],
                [0, 0, 63, 63],
                [9, 9, 39, 39],
                [30, 30, 60, 60],
                [8, 8, 24, 40],
            ),
            t(
                [0, 10, 20, 50],
                [0, 0, 64, 64],
                [2, 40, 10, 48],
                [30, 0, 40, 10],
                [0, 0, 10, 25],
                [5, 20, 15, 30],
            ),
        ]
    )
    net = SelectionNet(in_channels=1, num_classes=2, hidden=4, num_negatives=8)
    net.head = _oracle_head(truth, 2)  # type: ignore[method-assign]
    res = net(
        torch.zeros(2, 1, 16, 16),
        64,
        props,
        torch.tensor([0, 0]),
        t([24, 24], [10, 30]),
        torch.tensor([0, 1]),
    )
    assert res.score0.argmax(1).tolist() == [1, 0]
    assert res.pseudo_index.tolist() == [1, 0]
    assert res.bag1.shape == (2, 26, 4) and res.mps_index.shape == (2, 3)


def test_gradients_reach_only_the_selection_head():
    from helpers import random_batch

    from samflow.module import SamflowModule, SamSpec
    from samflow_plugins.sapnet import SAPNet

    torch.manual_seed(0)
    module = SamflowModule(
        sam=SamSpec(variant="tiny"), plugins={"sap": SAPNet(num_classes=3, hidden=32)}
    ).train()
    batch = random_batch(2)
    out, ctx = module(batch)
    losses = module.compute_losses(out, batch, ctx)
    assert {"sap/psm", "sap/prm", "sap/neg"} <= set(losses)
    sum(losses[k] for k in ("sap/psm", "sap/prm", "sap/neg")).backward()
    head = {n for n, _ in module.named_parameters() if ".plugins.sap.net." in n}
    assert head and all(p.requires_grad for n, p in module.named_parameters() if n in head)
    for name, p in module.named_parameters():
        if name not in head:
            assert p.grad is None, name  # SAM stays frozen: no gradient at all
    assert all(p.grad is not None for p in module.plugins["sap"].net.fc_cls.parameters())
    res = out.extras["sapnet"]
    assert res.pseudo_box.shape == (2, 4) and res.score0.shape == (2, 3)  # online bag: SAM's 3 masks


def test_masks_to_boxes():
    m = torch.full((2, 8, 8), -1.0)
    m[0, 2:5, 3:7] = 1
    assert masks_to_boxes(m, 16).tolist() == [[6, 4, 14, 10], [0, 0, 16, 16]]


def test_quirks_plus_one():
    truth = t([8, 8, 40, 40])
    props = t([10, 10, 20, 20], [8, 8, 40, 40], [0, 0, 63, 63])[None]
    args = (torch.zeros(1, 1, 16, 16), 64, props, torch.tensor([0]), t([24, 24]), torch.tensor([0]))
    results = []
    for plus_one in (False, True):
        net = SelectionNet(in_channels=1, num_classes=1, hidden=4, num_negatives=4, plus_one=plus_one)
        net.head = _oracle_head(truth, 1)  # type: ignore[method-assign]
        results.append(net(*args))
    assert torch.allclose(results[1].pseudo_box - results[0].pseudo_box, t([0, 0, 1, 1]))
    assert (
        results[0].pseudo_index.tolist() == results[1].pseudo_index.tolist() == [1]
    )  # matched before the + 1


def test_class_indices_outside_the_head_are_refused_by_name():
    import dataclasses

    from helpers import random_batch

    from samflow.module import SamflowModule, SamSpec
    from samflow.plugins import PluginConfigError
    from samflow_plugins.sapnet import SAPNet

    @dataclasses.dataclass
    class WithClasses(random_batch(1).__class__):  # type: ignore[misc]
        classes: torch.Tensor | None = None
        proposals: torch.Tensor | None = None

    module = SamflowModule(sam=SamSpec(variant="tiny"), plugins={"sap": SAPNet(num_classes=3, hidden=8)})
    base = random_batch(2)
    batch = WithClasses(
        **{f.name: getattr(base, f.name) for f in dataclasses.fields(base)}, classes=torch.tensor([0, 3])
    )
    out, ctx = module(batch)
    with pytest.raises(PluginConfigError, match=r"'sap' \(sapnet\).*0\.\.3.*init_args.num_classes"):
        module.compute_losses(out, batch, ctx)
    batch.classes = torch.tensor([2, 1])
    assert module.compute_losses(out, batch, ctx)["sap/psm"] > 0
    assert out.extras["sapnet"].bag1.shape == (2, 3 + 20, 4)  # online bag: SAM's 3 multimask boxes
    # stored proposals (6 per point, as ``samflow proposals``) make the reference's 26-box bag
    batch.proposals = torch.tensor([[4.0, 4, 20, 20]]).repeat(2, 6, 1) + torch.arange(6.0)[None, :, None]
    module.compute_losses(out, batch, ctx)
    res = out.extras["sapnet"]
    assert res.bag1.shape == (2, 26, 4) and torch.equal(res.bag1[:, :6], batch.proposals)
    assert res.score0.shape == (2, 6) and res.mps_index.shape == (2, 3)


def test_each_row_takes_its_own_point_box_centre_or_proposal_centre():
    """PDG's point, row by row: the first point, else the box's centre, else the first proposal's
    centre (a box-only row beside a point row used to get the points' padding slot, (0, 0))."""
    from samflow.batch import SamBatch
    from samflow_plugins.sapnet.plugin import row_points

    points = torch.tensor([[[0.0, 0.0], [30.0, 35.0]], [[0.0, 0.0], [0.0, 0.0]], [[0.0, 0.0], [0.0, 0.0]]])
    labels = torch.tensor([[-1, 1], [-1, -1], [-1, -1]])  # row 0: its point in slot 1; rows 1, 2: none
    box = torch.tensor([[0.0, 0.0, 0.0, 0.0], [40.0, 30.0, 60.0, 50.0], [0.0, 0.0, 0.0, 0.0]])
    batch = SamBatch(
        image=torch.zeros(1, 3, 8, 8),
        image_index=torch.zeros(3, dtype=torch.long),
        points=points,
        point_labels=labels,
        box=box,
        has_box=torch.tensor([False, True, False]),
    )
    proposals = torch.tensor([[10.0, 10.0, 20.0, 30.0]]).expand(3, 2, 4)
    assert row_points(batch, proposals).tolist() == [[30.0, 35.0], [50.0, 40.0], [15.0, 20.0]]


def test_a_row_of_another_image_with_a_point_changes_nothing_of_this_image():
    """Rows A and B (boxes, image 0) alone, then with a point row C on image 1: A's and B's stage-0
    and stage-1 results are the same (float64); before, C's points made A's PDG point (0, 0)."""
    from helpers import randomize

    from samflow.batch import SamBatch
    from samflow.plugins import PluginStack
    from samflow.sam import HookedSam, build_sam
    from samflow_plugins.sapnet import SAPNet

    torch.manual_seed(0)
    model = HookedSam(
        randomize(build_sam("tiny", seed=0)), PluginStack({"sap": SAPNet(num_classes=3, hidden=32)})
    )
    model = model.double().eval()
    image = torch.rand(2, 3, 128, 128, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    box_a, box_b = torch.tensor([40.0, 30.0, 60.0, 50.0]), torch.tensor([20.0, 20.0, 80.0, 70.0])
    grow = torch.tensor([-1.0, -1.0, 1.0, 1.0])
    bags = [torch.stack([b + d * grow for d in (0, 2, 4, 6, 8, 10)]) for b in (box_a, box_b, box_a - 10)]

    def sapnet(rows: int, **prompts):
        batch = SamBatch(image=image[: 1 + (rows > 2)], image_index=torch.tensor([0, 0, 1][:rows]), **prompts)
        batch.proposals = torch.stack(bags[:rows]).double()
        batch.classes = torch.tensor([0, 0, 2][:rows])
        torch.manual_seed(0)
        with torch.no_grad():
            out, ctx = model.run(batch)
            model.plugins.losses(out, batch, ctx)
        return out.extras["sapnet"]

    alone = sapnet(2, box=torch.stack([box_a, box_b]).double())
    points = torch.zeros(3, 1, 2, dtype=torch.float64)
    points[2, 0] = torch.tensor([30.0, 35.0])
    both = sapnet(
        3,
        box=torch.stack([box_a, box_b, torch.zeros(4)]).double(),
        has_box=torch.tensor([True, True, False]),
        points=points,
        point_labels=torch.tensor([[-1], [-1], [1]]),
    )
    assert alone.phi[1, 0] < 1  # A's box centre is inside B's first proposal: PDG acts on B
    for field in ("phi", "score0", "score1", "bag1", "pseudo_box"):
        torch.testing.assert_close(getattr(both, field)[:2], getattr(alone, field), rtol=0, atol=1e-12)
    assert both.pseudo_index[:2].tolist() == alone.pseudo_index.tolist()


def test_negative_loss_without_instances_is_zero_with_a_zero_gradient():
    """No instance, no mean instance weight: 0 (was NaN from the empty mean), and a finite zero gradient."""
    c_neg = torch.randn(5, 3, requires_grad=True)
    loss = negative_loss(c_neg, torch.ones(5), torch.zeros(0), num_points=0)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(c_neg.grad, torch.zeros(5, 3))
    # with instances it is the formula's value, worked out: w · mean(w_i) · Σ v_n Σ_c QFL(σ(c), 0) / N
    c = torch.zeros(2, 1)  # σ = 0.5; QFL(0.5, 0) = |0 - 0.5|^2 · BCE(0.5, 0) = 0.25 · ln 2
    value = negative_loss(c, torch.tensor([1.0, 0.0]), torch.tensor([0.5, 1.5]), num_points=2)
    assert math.isclose(value.item(), 0.75 * 1.0 * 0.25 * math.log(2) / 2, rel_tol=1e-5)  # float32
