"""Where a frozen forward's time goes on a GPU: encoder and decoder timed apart, host syncs, top kernels.

For one random SAM (``--variant``, ``--img-size``) and a batch of box prompts, under bf16 autocast:

* CUDA-event times of samflow's encoder (``HookedSam.encode``) and decoder side (``HookedSam.decode``:
  prompt encoder, two-way transformer, heads), the decoder side also compiled with
  ``torch.compile(mode="reduce-overhead")`` (CUDA graphs: one launch instead of one per operator),
  against segment-anything's image encoder and its prompt encoder + ``predict_masks`` once per image;
* every host-device synchronisation in samflow's forward (``torch.cuda.set_sync_debug_mode("warn")``),
  with the line of samflow that caused it;
* the operators with the most CPU and CUDA time in samflow's decoder side (``torch.profiler``).

    python benchmarks/profile_forward.py --variant vit_b --batch 2
"""

from __future__ import annotations

import argparse
import os
import traceback
import warnings

import torch

os.environ.setdefault("WANDB_MODE", "disabled")


def cuda_ms(fn, steps: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(steps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / steps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variant", default="vit_b")
    p.add_argument("--img-size", type=int, default=None)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--steps", type=int, default=20)
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("profile_forward.py needs a CUDA device.")
    from samflow.sam import HookedSam, build_sam
    from samflow.sam.types import DecoderContext
    from samflow.testing import random_batch, to_device

    device = torch.device("cuda")
    sam = build_sam(args.variant, img_size=args.img_size, seed=0).to(device)
    hooked = HookedSam(sam).eval()
    batch = to_device(random_batch(args.batch, sam.image_encoder.img_size, prompt="box", seed=0), device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16)
    with torch.no_grad(), autocast:
        ctx = hooked.context(batch)
        encoded = hooked.encode(ctx)
        dctx = DecoderContext.after_encoder(ctx, encoded)
        image = sam.preprocess(batch.image * 255.0)
        embeddings = sam.image_encoder(image)
        dense_pe = sam.prompt_encoder.get_dense_pe()

        def theirs_decoder():
            for b in range(embeddings.shape[0]):
                sparse, dense = sam.prompt_encoder(points=None, boxes=batch.box[b : b + 1], masks=None)
                sam.mask_decoder.predict_masks(embeddings[b : b + 1], dense_pe, sparse, dense)

        rows = {
            "samflow encode": cuda_ms(lambda: hooked.encode(hooked.context(batch)), args.steps),
            "samflow decode": cuda_ms(lambda: hooked.decode(dctx), args.steps),
            "samflow forward": cuda_ms(lambda: hooked(batch), args.steps),
            "segment_anything encoder": cuda_ms(
                lambda: sam.image_encoder(sam.preprocess(batch.image * 255.0)), args.steps
            ),
            "segment_anything decoder (per image)": cuda_ms(theirs_decoder, args.steps),
        }
        # the decoder side as CUDA graphs: it compiles as one graph (tests/sam/test_frozen_casts.py)
        try:
            compiled_decode = torch.compile(hooked.decode, mode="reduce-overhead")
            rows["samflow decode, compiled (CUDA graphs)"] = cuda_ms(
                lambda: compiled_decode(dctx), args.steps, 5
            )
        except Exception as err:  # a failed compilation is reported; the other rows stand
            print(f"samflow decode, compiled: failed: {type(err).__name__}: {str(err).splitlines()[0]}")
        for name, ms in rows.items():
            print(f"{name:<40} {ms:8.3f} ms per batch of {args.batch}")

        print("\n# host-device synchronisations in one samflow forward")
        caught: list[str] = []

        def record(message, category, filename, lineno, file=None, line=None):
            ours = [f for f in traceback.extract_stack() if "samflow" in f.filename and f.name != "record"]
            where = (
                f"{ours[-1].filename}:{ours[-1].lineno} ({ours[-1].name})" if ours else f"{filename}:{lineno}"
            )
            caught.append(f"- {str(message).splitlines()[0]} at {where}")

        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = record
            torch.cuda.set_sync_debug_mode("warn")
            hooked(batch)
            torch.cuda.set_sync_debug_mode(0)
        print("\n".join(caught) or "none")

        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                hooked.decode(dctx)
            torch.cuda.synchronize()
        print("\n# samflow decode x5, by CUDA time")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=15, max_name_column_width=60))
        print("\n# samflow decode x5, by CPU time")
        print(
            prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=60)
        )


if __name__ == "__main__":
    main()
