"""Peak memory of ``samflow predict-slide`` on synthetic slides of growing size (tiny SAM + WSI-SAM).

Each slide runs in its own process, so the peak resident set (``ru_maxrss``) belongs to that slide
alone; the table gives it minus the resident set before prediction (the model and libraries), and
the peak of Python / NumPy allocations (tracemalloc; torch's tensors are not traced). The stitching
band is (tile x width): the 'tall' slide has the base's width, 'wide' and '2x2' twice it.

    python benchmarks/wsi_predict_memory.py [--tile 128] [--scale 1]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

from samflow.testing import write_disc_slide

MPP = 0.5


def rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def child(slide: str, out: str, tile: int) -> None:
    import torch

    from samflow.module import SamflowModule, SamSpec
    from samflow.wsi_predict import predict_slide
    from samflow_plugins.wsi_sam import WSISam

    torch.manual_seed(0)
    module = SamflowModule(sam=SamSpec(variant="tiny"), plugins={"wsi": WSISam()}, losses={}).eval()
    warm = Path(out) / "warm"
    predict_slide(
        module, slide, warm, mpp=1.0, tile=tile, overlap=tile // 4, progress=False, polygon_side=256
    )
    before = rss_kib()
    tracemalloc.start()
    start = time.perf_counter()
    result = predict_slide(
        module, slide, out, mpp=1.0, tile=tile, overlap=tile // 4, progress=False, polygon_side=256
    )
    seconds = time.perf_counter() - start
    traced = tracemalloc.get_traced_memory()[1]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    print(json.dumps({"shape": result.shape, "tiles": result.tiles, "traced_mb": traced / 1e6,
                      "rss_before_mb": before / 1024, "rss_peak_growth_mb": (peak - before) / 1024,
                      "seconds": seconds}))  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tile", type=int, default=128, help="tile side in HR px")
    parser.add_argument("--scale", type=int, default=1, help="multiply every slide side by this")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    opts = parser.parse_args()
    if opts.child:
        child(*opts.child, opts.tile)
        return
    s = opts.scale
    sizes = {"base": (1024, 1024), "tall": (1024, 4096), "wide": (4096, 1024), "2x2": (2048, 2048)}
    with tempfile.TemporaryDirectory() as tmp:
        print(f"{'slide':6} {'HR mask':>12} {'tiles':>6} {'traced MB':>10} {'RSS growth MB':>14} {'s':>6}")
        for name, (w, h) in sizes.items():
            slide = write_disc_slide(Path(tmp) / f"{name}.tif", w * s, h * s, mpp=MPP, tile=128)
            done = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--tile",
                    str(opts.tile),
                    "--child",
                    str(slide),
                    str(Path(tmp) / name),
                ],
                capture_output=True,
                text=True,
                check=True,
            )
            r = json.loads(done.stdout.strip().splitlines()[-1])
            shape = f"{r['shape'][0]}x{r['shape'][1]}"
            print(
                f"{name:6} {shape:>12} {r['tiles']:>6} {r['traced_mb']:>10.2f} "
                f"{r['rss_peak_growth_mb']:>14.1f} {r['seconds']:>6.1f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
