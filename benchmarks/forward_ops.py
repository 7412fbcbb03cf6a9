"""Operators dispatched by one frozen forward, encoder and decoder side apart: samflow against
segment-anything, counted, not timed.

On a GPU every operator that is not a view is at least one kernel launch. The decoder side is bound
by those launches, not by arithmetic (``README.md``, "On a GPU"), and on a slow host the encoder's
small operators add up too; this count is what samflow's launch-saving paths change. It is exact and
the same on every machine: it runs on the CPU.

For a random SAM (``--variant``, ``--img-size``) and a batch of ``--batch`` images, one prompt row each
(``--prompt box`` or ``points``), under bf16 autocast (``--dtype bf16``, the default) or in float32:

* decoder: samflow's ``HookedSam.decode`` for the whole batch, against segment-anything's prompt
  encoder + ``predict_masks`` run once per image, as its predictor does;
* encoder: samflow's ``HookedSam.encode`` against segment-anything's image encoder, on the GPU's path
  (the augmented rel-pos attention; on the CPU samflow takes it when the input needs a gradient, so
  the images are given one here).

samflow's second call is counted: the first one makes what is kept (cast weights, index tensors).
Views (``view``, ``transpose``, ``expand``, ...) are not counted.

    python benchmarks/forward_ops.py --variant vit_b --img-size 256 --batch 2 --prompt box
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import os
from collections.abc import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode

os.environ.setdefault("WANDB_MODE", "disabled")

VIEWS = {
    "view", "_unsafe_view", "t", "transpose", "unsqueeze", "squeeze", "expand", "slice", "select", "permute",
    "as_strided", "detach", "alias", "unflatten", "_reshape_alias", "split", "unbind", "split_with_sizes",
    "lift_fresh", "reshape", "flatten", "contiguous", "narrow", "diagonal",
}  # fmt: skip


class OperatorCount(TorchDispatchMode):
    """Counts the ATen operators dispatched inside it, by name, views left out."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name not in VIEWS:
            self.counts[name] += 1
        return func(*args, **(kwargs or {}))


def count(fn: Callable[[], object]) -> collections.Counter[str]:
    with OperatorCount() as mode:
        fn()
    return mode.counts


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variant", default="vit_b")
    p.add_argument(
        "--img-size", type=int, default=256, help="encoder input size (the decoder is the same at any)"
    )
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--prompt", choices=["box", "points"], default="box")
    p.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    p.add_argument("--device", default="cpu")
    p.add_argument("--top", type=int, default=12, help="operators listed per implementation")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, collections.Counter[str]]:
    args = parse_args(argv)
    from samflow.sam import HookedSam, build_sam
    from samflow.sam.types import DecoderContext
    from samflow.testing import random_batch, to_device

    device = torch.device(args.device)
    sam = build_sam(args.variant, img_size=args.img_size, seed=0).to(device)
    hooked = HookedSam(sam).eval()
    batch = to_device(
        random_batch(args.batch, sam.image_encoder.img_size, prompt=args.prompt, seed=0), device
    )
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.dtype == "bf16")
    with torch.no_grad(), autocast:
        ctx = hooked.context(batch)
        dctx = DecoderContext.after_encoder(ctx, hooked.encode(ctx))
        embeddings = dctx.encoded.embeddings

        def samflow_decode() -> None:
            hooked.decode(dctx)

        def theirs_decode() -> None:
            dense_pe = sam.prompt_encoder.get_dense_pe()
            for b in range(args.batch):
                points = None
                if batch.points is not None and batch.point_labels is not None:
                    points = (batch.points[b : b + 1], batch.point_labels[b : b + 1])
                boxes = batch.box[b : b + 1] if batch.box is not None else None
                sparse, dense = sam.prompt_encoder(points=points, boxes=boxes, masks=None)
                sam.mask_decoder.predict_masks(embeddings[b : b + 1], dense_pe, sparse, dense)

        samflow_decode()  # fills the cast-once copies
        counts = {
            "decoder samflow": count(samflow_decode),
            "decoder segment_anything": count(theirs_decode),
        }
    image = batch.image.detach().requires_grad_(True)  # samflow's GPU path on the CPU: see above
    graded = dataclasses.replace(batch, image=image)
    with torch.enable_grad(), autocast:

        def samflow_encode() -> None:
            hooked.encode(hooked.context(graded))

        def theirs_encode() -> None:
            sam.image_encoder(sam.preprocess(image * 255.0))

        samflow_encode()  # makes the kept index tensors and rel-pos tables
        counts["encoder samflow"] = count(samflow_encode)
        counts["encoder segment_anything"] = count(theirs_encode)
    print(
        f"# operators per forward: variant={args.variant} img_size={sam.image_encoder.img_size} "
        f"batch={args.batch} prompt={args.prompt} dtype={args.dtype} device={device.type} "
        f"torch {torch.__version__} (views not counted)"
    )
    for impl, ops in counts.items():
        top = ", ".join(f"{name} {n}" for name, n in ops.most_common(args.top))
        print(f"{impl:<25} {sum(ops.values()):5d} operators, {ops['_to_copy']:4d} casts | {top}")
    return counts


if __name__ == "__main__":
    main()
