"""SAPNet's box rules (Wei et al., CVPR 2024), vectorised over points and proposals.

Shapes: N points (one per prompt row), P proposals per point, boxes (x1, y1, x2, y2) in pixels.
Reference line numbers are those of zhaoyangwei123/SAPNet (``SAP_head.py``, ``SAPNet.py``).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchvision.ops import box_iou

__all__ = [
    "aligned_iou",
    "bms",
    "hard_negatives",
    "pdg_phi",
    "pnpg_positives",
    "random_negatives",
    "select_parent",
]


def _area(b: Tensor) -> Tensor:
    return (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])


def aligned_iou(a: Tensor, b: Tensor) -> Tensor:
    """IoU of boxes a[..., 4] and b[..., 4] pairwise along the leading dims."""
    lt = torch.maximum(a[..., :2], b[..., :2])
    rb = torch.minimum(a[..., 2:], b[..., 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    return inter / (_area(a) + _area(b) - inter).clamp(min=1e-6)


def pdg_phi(points: Tensor, labels: Tensor, image_index: Tensor, proposals: Tensor) -> Tensor:
    """Point Distance Guidance φ (N, P) (``SAP_head.py`` L175-188).

    L_ij = 1 + Σ_k ‖p_i − p_k‖^{1/2} over the other points k of the same image and class that lie
    strictly inside proposal b_ij; φ_ij = σ(1 / (L_ij − 1)): 1 with no such point, in (0.5, 1) otherwise.

    Args:
        points: (N, 2) x, y; labels: (N,) classes; image_index: (N,) image of each point;
        proposals: (N, P, 4).
    """
    n = points.shape[0]
    x, y = points[:, 0], points[:, 1]  # candidate points k
    box = proposals[:, :, None, :]  # (N, P, 1, 4)
    inside = (box[..., 0] < x) & (x < box[..., 2]) & (box[..., 1] < y) & (y < box[..., 3])  # (N, P, N)
    peer = (labels[:, None] == labels[None, :]) & (image_index[:, None] == image_index[None, :])
    peer &= ~torch.eye(n, dtype=torch.bool, device=points.device)
    dist = (points[:, None, :] - points[None, :, :]).pow(2).sum(-1).pow(0.25)  # (N, N)
    excess = (inside & peer[:, None, :]).to(dist.dtype) * dist[:, None, :]
    return torch.sigmoid(1.0 / excess.sum(-1))  # 1/0 = inf -> φ = 1


def select_parent(
    pseudo: Tensor, proposals: Tensor, top1: Tensor, *, reference_fallback: bool = False
) -> Tensor:
    """Index (N,) of the proposal PNPG grows its positives from.

    Default: the stage-0 top-1 proposal (the box BMS started from). With ``reference_fallback`` the
    reference's rule (``SAP_head.py`` L190): the first proposal equal to the pseudo box within ±1 px
    on every side, else the last proposal (index 5 of 6), which is what happens whenever BMS moved it.
    """
    if not reference_fallback:
        return top1
    close = ((proposals - pseudo[:, None, :]).abs() < 1).all(-1)  # (N, P)
    p = proposals.shape[1]
    first = torch.where(close, torch.arange(p, device=close.device), p).amin(-1)
    return torch.where(first < p, first, p - 1)


def pnpg_positives(proposals: Tensor, parent: Tensor, phi: Tensor) -> Tensor:
    """The stage-1 bag (N, P + 20, 4): the P proposals and 20 boxes around the parent (``SAP_head.py`` L161-205).

    Same centre as the parent, sides scaled by s: s = 1 + 0.01 n for n = 1..15; then, when φ of the
    parent is 1, s = 1 + 0.005 n for n = 16..20, otherwise s = 1 − 0.005 n / φ for n = 1..5. All
    coordinates are clamped at 0 (not at the image size), as the reference.
    """
    n = proposals.shape[0]
    rows = torch.arange(n, device=proposals.device)
    box = proposals[rows, parent]  # (N, 4)
    phi_p = phi[rows, parent]  # (N,)
    k = torch.arange(1, 16, dtype=box.dtype, device=box.device)
    grow = (1 + 0.01 * k).expand(n, 15)
    m = torch.arange(1, 6, dtype=box.dtype, device=box.device)
    alone = phi_p[:, None] == 1
    last = torch.where(alone, 1 + 0.005 * (m + 15), 1 - 0.005 * m / phi_p[:, None])  # (N, 5)
    s = torch.cat([grow, last], 1)  # (N, 20)
    c = (box[:, :2] + box[:, 2:]) / 2
    wh = box[:, 2:] - box[:, :2]
    half = wh[:, None, :] * s[..., None] / 2  # (N, 20, 2)
    extra = torch.cat([c[:, None] - half, c[:, None] + half], -1)
    return torch.cat([proposals, extra], 1).clamp(min=0)


def random_negatives(
    proposals: Tensor,
    image_index: Tensor,
    sizes: Tensor,
    num: int = 500,
    *,
    generator: torch.Generator | None = None,
    uniforms: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Random negatives per image (``SAPNet.py`` L15-34): boxes (B*num, 4), their image (B*num,), weights.

    x1 ~ U(−0.2w, w), x2 = x1 + U(0, 1)·(1.2w − x1), likewise y; a box has weight 1 only if its IoU
    with every proposal of its image is below 0.3, and its image has a point (an image without one,
    kept by ``empty: keep``, is left out of training, as mmdetection leaves out images without
    annotations). ``sizes`` (B, 2) is each image's (h, w); ``uniforms`` (4, B, num), the U(0, 1) draws
    for x1, y1, x2, y2, replaces drawing (for comparisons).
    """
    b = sizes.shape[0]
    dev, dt = proposals.device, proposals.dtype
    h, w = sizes[:, 0, None].to(dt), sizes[:, 1, None].to(dt)
    if uniforms is None:
        uniforms = torch.rand(4, b, num, generator=generator, device=generator.device if generator else None)
    r = uniforms.to(dev, dt)
    x1 = -0.2 * w + r[0] * (1.2 * w)
    y1 = -0.2 * h + r[1] * (1.2 * h)
    x2 = x1 + r[2] * (1.2 * w - x1)
    y2 = y1 + r[3] * (1.2 * h - y1)
    neg = torch.stack([x1, y1, x2, y2], -1).reshape(-1, 4)
    neg_image = torch.arange(b, device=dev).repeat_interleave(num)
    iou = box_iou(neg, proposals.reshape(-1, 4))  # (B*num, N*P)
    own = neg_image[:, None] == image_index.repeat_interleave(proposals.shape[1])[None, :]
    has_points = torch.zeros(b, dtype=torch.bool, device=dev).index_fill_(0, image_index, True)
    valid = ~((iou >= 0.3) & own).any(-1) & has_points[neg_image]
    return neg, neg_image, valid.to(dt)


def hard_negatives(proposals: Tensor, best: Tensor, min_area: float = 64.0 * 64.0) -> tuple[Tensor, Tensor]:
    """Central half-size boxes (N, 4) of each point's best proposal and weights (N,) (``SAPNet.py`` L48-70).

    A point contributes (weight 1) only when its best proposal's area exceeds 64²; the box's IoU with
    its parent is 0.25, so the reference's IoU < 0.5 check always passes.
    """
    box = proposals[torch.arange(proposals.shape[0], device=proposals.device), best]
    c = (box[:, :2] + box[:, 2:]) / 2
    q = (box[:, 2:] - box[:, :2]) / 4
    return torch.cat([c - q, c + q], -1), (_area(box) > min_area).to(box.dtype)


def bms(pseudo: Tensor, proposals: Tensor, num_sam: int = 3) -> Tensor:
    """Box Mining Strategy (``SAP_head.py`` L360-386): pull a part box toward a larger enclosing proposal.

    For k = 0..num_sam−1 in order, with B the current box and A its area (A becomes the proposal's
    area after each move): skip P_k unless area(P_k) > A; if IoU(B, P_k) > 0.6 and above the best IoU
    so far, B ← (P_k + IoU·B)/(1 + IoU); else if IoU > 0.3, P_k contains B within 2 px on every side
    and IoU is above the best so far, B ← (IoU·P_k + B)/(1 + IoU). The loop is over k (3 steps),
    never over points.
    """
    box = pseudo.clone()
    area = _area(box)
    best = torch.zeros_like(area)
    for k in range(min(num_sam, proposals.shape[1])):
        p = proposals[:, k]
        pa = _area(p)
        iou = aligned_iou(box, p)
        larger = area < pa
        better = iou > best
        pull = larger & better & (iou > 0.6)
        inside = (p[:, :2] - 2 < box[:, :2]).all(-1) & (p[:, 2:] + 2 > box[:, 2:]).all(-1)
        enclose = larger & better & ~pull & (iou > 0.3) & inside
        w = iou[:, None]
        moved = torch.where(pull[:, None], (p + w * box) / (1 + w), (w * p + box) / (1 + w))
        take = pull | enclose
        box = torch.where(take[:, None], moved, box)
        area = torch.where(take, pa, area)
        best = torch.where(take, iou, best)
    return box
