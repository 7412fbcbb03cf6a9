"""The frozen encoder with windowed blocks' ``qkv`` on the grid's tokens only (samflow's way) against
SAM's way, ``qkv`` of the zero-padded windows, in one process, calls alternating.

SAM's way is forced by a no-op forward hook on every block's ``attn.qkv`` (``_window_qkv`` leaves a
layer with hooks to SAM's way, so that hooks see what they see in SAM). Prints the largest difference of
the embeddings (0.0: the same bits) and the time of each call. Random weights, batch 1, no gradients.

    python benchmarks/window_qkv.py --variant vit_b --img-size 1024 --calls 4
"""

from __future__ import annotations

import argparse
import time

import torch

from samflow.batch import SamBatch
from samflow.sam import HookedSam, build_sam


def main(argv: list[str] | None = None) -> dict[str, list[float]]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", default="vit_b")
    p.add_argument("--img-size", type=int, default=1024)
    p.add_argument("--calls", type=int, default=4, help="timed calls of each way (alternating)")
    args = p.parse_args(argv)
    sam = build_sam(args.variant, img_size=args.img_size, seed=0)
    size = sam.image_encoder.img_size
    image = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    model = HookedSam(sam).eval()
    batch = SamBatch(image=image)
    qkv_layers = [block.attn.qkv for block in sam.image_encoder.blocks]

    def encode(sams_way: bool) -> torch.Tensor:
        hooks = [layer.register_forward_hook(lambda *_: None) for layer in qkv_layers] if sams_way else []
        try:
            return model.encode(model.context(batch)).embeddings
        finally:
            for hook in hooks:
                hook.remove()

    times: dict[str, list[float]] = {"sam": [], "samflow": []}
    with torch.no_grad():
        diff = (encode(True) - encode(False)).abs().max().item()
        for _ in range(args.calls):
            for name in times:
                start = time.perf_counter()
                encode(name == "sam")
                times[name].append(time.perf_counter() - start)
    print(f"# {args.variant} at {size} px, batch 1: largest difference of the embeddings {diff}")
    for name, seconds in times.items():
        print(f"{name:8s} " + " ".join(f"{t:.3f}" for t in seconds) + f"  best {min(seconds):.3f} s")
    return {**times, "difference": [diff]}


if __name__ == "__main__":
    main()
