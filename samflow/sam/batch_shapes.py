"""``check_batch_shapes``: a batch that does not fit SAM's frame, refused naming the field.

``HookedSam.run`` calls it before any layer runs, so a wrong size is one line about the data, not a
shape error deep in the encoder or the decoder.
"""

from __future__ import annotations

from segment_anything.modeling import PromptEncoder
from torch import Tensor

from samflow.batch import SamBatch

__all__ = ["check_batch_shapes"]


def check_batch_shapes(batch: SamBatch, pe: PromptEncoder) -> None:
    """Fail, naming the field, when ``batch`` does not fit SAM's frame: images (B, 3, S, S) with S the
    model's input side, and per prompt row (N) points (N, K, 2) with labels (N, K), boxes (N, 4), mask
    prompts (N, 1, 4h, 4w). Shapes only: nothing is read from the device."""
    size = pe.input_image_size[0]
    expected: dict[str, tuple[Tensor | None, tuple[int, ...]]] = {
        "image": (batch.image, (batch.num_images, 3, size, size)),
        "context_image": (batch.context_image, (batch.num_images, 3, size, size)),
        "points": (batch.points, (batch.num_rows, -1, 2)),
        "point_labels": (
            batch.point_labels,
            (batch.num_rows, -1 if batch.points is None else batch.points.shape[1]),
        ),
        "box": (batch.box, (batch.num_rows, 4)),
        "mask_prompt": (batch.mask_prompt, (batch.num_rows, 1, *pe.mask_input_size)),
    }
    for name, (value, shape) in expected.items():
        if value is None:
            continue
        fits = value.ndim == len(shape) and all(n == -1 or n == m for n, m in zip(shape, value.shape))
        if not fits:
            want = ", ".join("K" if n == -1 else str(n) for n in shape)
            raise ValueError(
                f"SamBatch.{name} has shape {tuple(value.shape)}; this SAM takes ({want}) "
                f"({batch.num_images} images of {size} x {size} px, model.sam.img_size; {batch.num_rows} "
                "prompt rows, image_index). Resize and pad the images to the model's side (data.img_size), "
                "with the prompts in that frame."
            )
