"""One global block's rel-pos attention on the CPU without gradients: how its blocks are cut.

``rel_pos_attention`` builds SAM's decomposed term as a mask for one block of logits at a time
(``samflow.sam.rel_pos``). This times one image's global-attention block of a variant at a size, with
the blocks samflow cuts now (``_item_blocks``: up to 1024 query rows of as few heads as the budget
holds) against the earlier cut (a few query rows of every head, as many as the budget holds),
alternating, best of ``--calls``, and prints the largest difference between the two outputs.

    python benchmarks/rel_pos_blocks.py --variant vit_b --img-size 1024 --calls 4
"""

from __future__ import annotations

import argparse
import time
from unittest import mock

import torch

from samflow.sam import build_sam, rel_pos


def earlier_blocks(heads: int, length: int, chunk_elements: int) -> tuple[int, int]:
    """The cut before: every head, ``chunk_elements // (heads * L)`` query rows a block."""
    return heads, max(1, chunk_elements // (heads * length))


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variant", default="vit_b")
    p.add_argument("--img-size", type=int, default=1024)
    p.add_argument("--calls", type=int, default=4, help="timed calls of each way (best taken)")
    p.add_argument("--batch", type=int, default=1)
    args = p.parse_args(argv)
    encoder = build_sam(args.variant, img_size=args.img_size, seed=0).image_encoder
    block = next(b for b in encoder.blocks if b.window_size == 0)
    attn = block.attn
    grid = args.img_size // 16
    heads, dim = attn.num_heads, attn.qkv.in_features // attn.num_heads
    gen = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(3, args.batch, heads, grid * grid, dim, generator=gen).unbind(0)

    def call() -> torch.Tensor:
        return rel_pos.rel_pos_attention(q, k, v, attn.rel_pos_h, attn.rel_pos_w, (grid, grid), attn.scale)

    ways = {"earlier": earlier_blocks, "now": rel_pos._item_blocks}
    times: dict[str, list[float]] = {way: [] for way in ways}
    outputs: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for _ in range(args.calls + 1):  # the first round warms up
            for way, cut in ways.items():
                with mock.patch.object(rel_pos, "_item_blocks", cut):
                    start = time.perf_counter()
                    outputs[way] = call()
                    times[way].append(time.perf_counter() - start)
    best = {way: min(t[1:]) for way, t in times.items()}
    difference = float((outputs["now"] - outputs["earlier"]).abs().max())
    print(
        f"{args.variant} global block at {args.img_size} px, batch {args.batch}, {heads} heads, "
        f"{grid * grid} tokens, {torch.get_num_threads()} threads: earlier {best['earlier']:.3f} s, "
        f"now {best['now']:.3f} s (best of {args.calls}); largest difference {difference:.3g}"
    )
    return {"best": best, "difference": difference}


if __name__ == "__main__":
    main()
