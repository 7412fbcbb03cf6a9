"""Epoch time of decoder-side training with and without the embedding store (``samflow embed``).

On a random SAM (no checkpoint) and a handful of procedural images (the quickstart generator at the
requested size), for the given plugins:

1. ``samflow embed``'s writer stores the encoder outputs (timed; disk per image measured);
2. one training epoch with the live encoder (``trainer.fit``, no validation);
3. one training epoch reading the store (``model.sam.embedding_store``).

The epoch time is measured between Lightning's ``on_train_epoch_start`` and ``on_train_epoch_end``.
Freed host memory is kept for reuse as in ``samflow``'s commands (``samflow.host_memory``;
``SAMFLOW_KEEP_FREED_MEMORY=0`` measures without it); the process's peak resident size (``VmHWM``) is
reported at the end.

Example::

    python benchmarks/embedding_store.py --variant vit_b --img-size 1024 --images 4 --batch 2 --plugins hq_sam
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("WANDB_MODE", "disabled")

import torch
from lightning.pytorch import Callback, Trainer

from throughput import _vm_hwm, cpu_model  # benchmarks/throughput.py, beside this script

from samflow.data import SegmentationDataModule
from samflow.data.quickstart import make_quickstart_data
from samflow.embed.writer import write_store
from samflow.host_memory import keep_freed_memory
from samflow.module import SamflowModule, SamSpec
from samflow.plugins.registry import create_plugin


class EpochTimer(Callback):
    def __init__(self) -> None:
        self.seconds: list[float] = []

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._start = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.seconds.append(time.perf_counter() - self._start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", default="vit_b")
    p.add_argument("--img-size", type=int, default=None, help="default: the variant's")
    p.add_argument("--images", type=int, default=4, help="training images")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--plugins", nargs="+", default=["hq_sam"])
    p.add_argument("--epochs", type=int, default=1, help="epochs per run (each one timed)")
    p.add_argument(
        "--work", default=None, help="folder for the data and the store (default: a temporary one)"
    )
    p.add_argument(
        "--runs",
        nargs="+",
        choices=["embed", "live", "store"],
        default=["embed", "live", "store"],
        help="what to run: writing the store, the live-encoder epoch, the store epoch (a store from an "
        "earlier run with the same --work and arguments is read when 'embed' is left out)",
    )
    p.add_argument(
        "--plugin-args",
        type=json.loads,
        default={},
        help="JSON: plugin name -> init arguments, e.g. the HQ-SAM experiment's loss: "
        '\'{"hq_sam": {"output": "hq", "point_loss": true}}\'',
    )
    p.add_argument(
        "--losses",
        type=json.loads,
        default=None,
        help="JSON: SamflowModule's base losses (default: its default, BCE + Dice on full-size masks); "
        "'{}' for none, as in hq_sam_hqseg, whose only loss is the plugin's",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=0,
        help="data-loader worker processes of both epochs (SegmentationDataModule.num_workers; default 0: "
        "images are read in the training loop)",
    )
    p.add_argument(
        "--precision",
        default="32-true",
        help="Lightning's trainer precision of both epochs, e.g. bf16-mixed (default 32-true); the store is "
        "written in float16 either way",
    )
    p.add_argument("--json", default=None)
    args = p.parse_args()
    kept = keep_freed_memory()  # as samflow's commands do
    work = Path(args.work or tempfile.mkdtemp(prefix="samflow-store-bench-"))

    def module(store: Path | None = None) -> SamflowModule:
        torch.manual_seed(0)
        spec = SamSpec(
            variant=args.variant, img_size=args.img_size, embedding_store=str(store) if store else None
        )
        plugins = {name: create_plugin(name, **args.plugin_args.get(name, {})) for name in args.plugins}
        return SamflowModule(sam=spec, plugins=plugins, losses=args.losses)

    live = module()
    size = live.model.img_size
    root = make_quickstart_data(work / "data", n_train=args.images, n_val=0, size=(size * 3 // 4, size))

    def data() -> SegmentationDataModule:
        return SegmentationDataModule(
            train=str(root / "train"), img_size=size, batch_size=args.batch, num_workers=args.workers
        )

    def epochs(model: SamflowModule) -> list[float]:
        timer = EpochTimer()
        trainer = Trainer(
            max_epochs=args.epochs,
            accelerator="cpu",
            precision=args.precision,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            limit_val_batches=0,
            callbacks=[timer],
        )
        trainer.fit(model, datamodule=data())
        return timer.seconds

    dm = data()
    dm.setup("fit")
    store = work / "store"
    start = time.perf_counter()
    manifest, _ = write_store(store, live, dm, batch_size=args.batch, overwrite="embed" in args.runs)
    embed_s = time.perf_counter() - start if "embed" in args.runs else None
    disk = sum(f.stat().st_size for f in store.glob("*.npy") if f.name != "done.npy")
    without = epochs(live) if "live" in args.runs else []
    with_store = epochs(module(store)) if "store" in args.runs else []
    result = {
        "variant": args.variant,
        "img_size": size,
        "images": manifest.rows,
        "batch": args.batch,
        "plugins": args.plugins,
        "plugin_args": args.plugin_args,
        "losses": args.losses,
        "workers": args.workers,
        "precision": args.precision,
        "cpu": cpu_model(),
        "blocks": list(manifest.key.blocks),
        "embed_seconds": embed_s,
        "disk_mib_per_image": disk / manifest.rows / 2**20,
        "epoch_seconds_live": without,
        "epoch_seconds_store": with_store,
        "speedup": min(without) / min(with_store) if without and with_store else None,
        "threads": torch.get_num_threads(),
        "keep_freed_memory": kept,
        "peak_rss_mib": None if (peak := _vm_hwm()) is None else peak / 2**20,  # VmHWM
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
