"""A 'pretrained' tiny SAM: the random tiny SAM with its mask decoder trained on the quickstart data.

The random tiny SAM of the tests knows nothing, so a method that adapts a *pretrained* SAM while
keeping its decoder frozen (PA-SAM's paper setting, HQ-SAM) has nothing to build on there. This
script trains the tiny SAM's mask decoder with box prompts on the quickstart training split (the
`decoder_tuning` plugin) and writes the whole SAM state dict, in the layout of the official
checkpoints, so that experiments can start from it without any download::

    python benchmarks/pretrain_tiny.py --out runs/tiny_pretrained.pth
    samflow fit --experiment quickstart --model.sam.checkpoint runs/tiny_pretrained.pth ...

It prints the validation IoU of the SAM before and after. The encoder stays random (its features
are whatever a random ViT computes); only the decoder learned.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("WANDB_MODE", "disabled")

import torch
from lightning.pytorch import Trainer, seed_everything

from samflow.data import GpuAugment, SegmentationDataModule
from samflow.module import SamflowModule, SamSpec
from samflow_plugins.decoder_tuning import DecoderTuning


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/tiny_pretrained.pth", help="where to write the SAM state dict")
    p.add_argument("--epochs", type=int, default=30, help="training epochs of the mask decoder")
    p.add_argument("--lr", type=float, default=5e-3, help="AdamW learning rate")
    p.add_argument("--batch-size", type=int, default=16, help="images per step")
    p.add_argument(
        "--prompt", default="box", help="prompt sampler of the training data (box, points, mixed, ...)"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the random SAM and of training")
    p.add_argument(
        "--quickstart-root", default=None, help="folder of the quickstart data (default: its cache)"
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, float]:
    args = parse_args(argv)
    seed_everything(args.seed, verbose=False)
    quickstart = {"root": args.quickstart_root} if args.quickstart_root else True
    data = SegmentationDataModule(
        quickstart=quickstart,
        img_size=128,
        prompt=args.prompt,
        batch_size=args.batch_size,
        augment=GpuAugment(hflip=0.5),
    )
    module = SamflowModule(
        sam=SamSpec(variant="tiny", seed=args.seed),
        plugins={"decoder": DecoderTuning()},
        losses={"bce": 1.0, "dice": 1.0},
        metrics=["iou", "boundary_iou"],
        optimizer=lambda params: torch.optim.AdamW(params, lr=args.lr, weight_decay=1e-4),
    )
    trainer = Trainer(
        max_epochs=args.epochs,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        num_sanity_val_steps=-1,
        enable_model_summary=False,
    )
    trainer.fit(module, datamodule=data)
    before, after = module.initial_val_metrics, module.last_val_metrics
    for name in sorted(after):
        print(f"{name:<20} before {before.get(name, float('nan')):.4f}  after {after[name]:.4f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(module.model.sam.state_dict(), out)
    print(f"wrote {out} (variant tiny, seed {args.seed}, decoder trained for {args.epochs} epochs)")
    return after


if __name__ == "__main__":
    main()
