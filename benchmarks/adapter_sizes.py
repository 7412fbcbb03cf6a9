"""Size of ``adapter.safetensors`` (``samflow export``) for each registered plugin on vit_b shapes.

    python benchmarks/adapter_sizes.py [--variant vit_b]

Each plugin with its default arguments on a SAM of the variant's shapes (uninitialised weights: the
size depends only on the shapes); the adapter is written with ``samflow.export.trained_state`` exactly
as ``samflow export`` writes it, and its file size printed (the README's table).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from samflow.export import trained_state
from samflow.plugins import PluginStack
from samflow.plugins.registry import discover
from samflow.sam import HookedSam, build_sam


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variant", default="vit_b")
    args = parser.parse_args()
    print("| plugin | tensors | values | adapter.safetensors |\n|---|---:|---:|---:|")
    for name, info in sorted(discover().items()):
        if info.cls is None:
            print(f"| {name} | broken: {info.error} | | |")
            continue
        with torch.device("meta"):
            sam = build_sam(args.variant, seed=None)
        sam = sam.to_empty(device="cpu")
        for tensor in sam.state_dict().values():
            tensor.zero_()
        try:
            model = HookedSam(sam, PluginStack({name: info.cls()}))
        except Exception as err:  # noqa: BLE001 - a plugin that needs arguments is reported, not fatal
            print(f"| {name} | needs arguments: {type(err).__name__}: {err} | | |")
            continue
        tensors = {k: v.detach().contiguous().clone() for k, v in trained_state(model).items()}
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / "adapter.safetensors"
            save_file(tensors, str(path))
            size = path.stat().st_size
        values = sum(t.numel() for t in tensors.values())
        print(f"| {name} | {len(tensors)} | {values:,d} | {size / 2**20:.2f} MiB ({size:,d} bytes) |")


if __name__ == "__main__":
    main()
