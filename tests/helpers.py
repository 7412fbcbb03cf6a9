"""Small helpers shared by tests (not fixtures)."""

from __future__ import annotations

import torch
from segment_anything.modeling import Sam


def random_batch(batch_size: int = 2, size: int = 128, prompt: str = "box", seed: int = 0) -> dict:
    """A batch in samflow's data contract with random images and square masks."""
    gen = torch.Generator().manual_seed(seed)
    image = torch.rand(batch_size, 3, size, size, generator=gen)
    mask = torch.zeros(batch_size, 1, size, size)
    boxes = []
    for b in range(batch_size):
        x0, y0 = (torch.randint(0, size // 2, (2,), generator=gen)).tolist()
        x1, y1 = x0 + size // 3, y0 + size // 4
        mask[b, 0, y0:y1, x0:x1] = 1
        boxes.append([x0, y0, x1 - 1, y1 - 1])
    batch = {
        "image": image,
        "mask": mask,
        "input_size": torch.full((batch_size, 2), size),
        "original_size": torch.full((batch_size, 2), size),
        "gt_original": [m[0].bool() for m in mask],
        "id": [f"img{b}" for b in range(batch_size)],
    }
    if prompt == "box":
        batch["boxes"] = torch.tensor(boxes, dtype=torch.float)
    elif prompt == "points":
        batch["points"] = torch.tensor([[[(b[0] + b[2]) / 2, (b[1] + b[3]) / 2]] for b in boxes])
        batch["point_labels"] = torch.ones(batch_size, 1, dtype=torch.long)
    return batch


def sam_reference(sam: Sam, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """segment-anything's own modules, one image at a time -> (masks (B, 4, h, w), iou (B, 4))."""
    masks, ious = [], []
    with torch.no_grad():
        embeddings = sam.image_encoder(sam.preprocess(batch["image"] * 255))
        for b in range(batch["image"].shape[0]):
            points = (batch["points"][b : b + 1], batch["point_labels"][b : b + 1]) if "points" in batch else None
            boxes = batch["boxes"][b : b + 1] if "boxes" in batch else None
            mask_in = batch["mask_prompt"][b : b + 1] if "mask_prompt" in batch else None
            sparse, dense = sam.prompt_encoder(points=points, boxes=boxes, masks=mask_in)
            m, i = sam.mask_decoder.predict_masks(embeddings[b : b + 1], sam.prompt_encoder.get_dense_pe(), sparse, dense)
            masks.append(m)
            ious.append(i)
    return torch.cat(masks), torch.cat(ious)


def randomize(module: torch.nn.Module, seed: int = 0, std: float = 0.02) -> torch.nn.Module:
    """Give zero-initialised tables (position embeddings, rel-pos) random values so comparisons bite."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            if "rel_pos" in name or "pos_embed" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * std * 10)
    return module
