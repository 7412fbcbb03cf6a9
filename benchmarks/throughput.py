"""Throughput (images/s) and peak memory of samflow, against segment-anything's own modules.

Two kinds of case, each on a random SAM (``build_sam(variant, img_size=..., seed=...)``, no checkpoint):

(a) ``forward``: frozen SAM inference under ``torch.no_grad`` on the same weights and input.
    * ``samflow``: ``HookedSam`` with no plugins, the whole batch at once (encoder, prompt encoder,
      decoder, batched over images).
    * ``segment_anything``: SAM's own modules, the way its API runs: the image encoder batched
      (``sam.image_encoder(sam.preprocess(x))``), then the prompt encoder and
      ``mask_decoder.predict_masks`` once per image, since segment-anything's decoder takes one image
      (``predict_masks`` repeats the image embedding per prompt, so B images with B prompts is not a
      batch it can run).
    Both use one box prompt per image. With ``--encoder-rows`` (default) the image encoder alone is
    timed too, so the encoder and decoder parts of the ratio can be told apart.
(b) ``train``: one training step of ``SamflowModule``: forward, the module's losses
    (``compute_losses``), backward and an AdamW step (``configure_optimizers``), for the requested
    plugins together and for each plugin alone.

Memory (the ``peak +MiB`` column) is the peak during warm-up and timed steps, above the memory held
after imports, model build and batch creation (``base MiB``):
    * CUDA: ``torch.cuda.max_memory_allocated`` (reset per case) minus ``torch.cuda.memory_allocated``
      after the build; ``base MiB`` is that ``memory_allocated``.
    * CPU: each case runs in a fresh Python subprocess (``--isolation subprocess``, the CPU default).
      The peak resident set size (``VmHWM``) is reset through ``/proc/self/clear_refs`` after the
      build and read after the steps, minus the RSS after the build. Where that reset is not
      available, ``ru_maxrss`` minus the RSS after the build is used (an upper bound that may include
      the build's own peak). tracemalloc is not used: it does not see torch's CPU allocations.

Example::

    python benchmarks/throughput.py --variant tiny --img-size 128 --batch 2 --steps 5 --warmup 2
    python benchmarks/throughput.py --variant vit_b --img-size 256 --batch 2 --plugins sam_adapter hq_sam
    python benchmarks/throughput.py --variant vit_b --device cuda --bf16 --batch 8 --json out.json
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
import traceback
from contextlib import nullcontext
from pathlib import Path
from typing import Any

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")

import torch

CHILD_FLAG = "--child"
RESULT_MARKER = "SAMFLOW_BENCH_RESULT "
MIB = 2**20


# ---------------------------------------------------------------------------------------------------
# inputs
# ---------------------------------------------------------------------------------------------------
def make_batch(batch_size: int, size: int, device: torch.device, seed: int = 0) -> dict[str, Any]:
    """A batch in samflow's data contract: random images, one box per image and its mask."""
    from samflow.testing import random_batch, to_device

    return to_device(random_batch(batch_size, size, prompt="box", seed=seed), device)


# ---------------------------------------------------------------------------------------------------
# memory probes
# ---------------------------------------------------------------------------------------------------
def _current_rss() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def _vm_hwm() -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        return None
    return None


def _ru_maxrss() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux


class MemoryProbe:
    """Peak memory of one case above the memory held after imports + build (see the module doc)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.method = ""
        self.base = 0

    def start(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            self.base = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.method = "cuda max_memory_allocated - memory_allocated after build"
            return
        rss = _current_rss()
        self.base = rss if rss is not None else _ru_maxrss()
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM (peak RSS) to the current RSS (Linux >= 4.0)
            self.method = "VmHWM (reset via /proc/self/clear_refs) - RSS after build"
        except OSError:
            self.method = "ru_maxrss - RSS after build (upper bound: may include the build's peak)"

    def stop(self) -> tuple[float, float]:
        """(base MiB, peak increase MiB)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        else:
            peak = _vm_hwm() if self.method.startswith("VmHWM") else None
            peak = peak if peak is not None else _ru_maxrss()
        return self.base / MIB, max(peak - self.base, 0) / MIB


# ---------------------------------------------------------------------------------------------------
# cases
# ---------------------------------------------------------------------------------------------------
def case_label(spec: dict[str, Any]) -> str:
    if spec["kind"] == "forward":
        compiled = spec.get("compile") and spec["impl"] == "samflow"
        return f"forward/{spec['part']}" + ("+compile" if compiled else "")
    label = "train_step"
    if spec.get("compile"):
        label += "+compile"
    if spec.get("encoder_cache"):
        label += "+cache"
    if spec.get("checkpoint_blocks"):
        label += "+ckpt"
    return label


def _autocast(spec: dict[str, Any], device: torch.device):
    if not spec["bf16"]:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _build_forward(spec: dict[str, Any], device: torch.device):
    from samflow.sam import HookedSam, build_sam

    sam = build_sam(spec["variant"], img_size=spec["img_size"], seed=spec["seed"]).to(device)
    batch = make_batch(spec["batch"], sam.image_encoder.img_size, device, spec["seed"])
    if spec["impl"] == "samflow":
        stack = None
        if spec["plugins"]:  # plugins in the forward (e.g. hq_sam, sam_adapter): hook sites in use
            from samflow.plugins import PluginStack
            from samflow.plugins.registry import create_plugin

            torch.manual_seed(spec["seed"])
            stack = PluginStack({name: create_plugin(name) for name in spec["plugins"]})
        hooked = HookedSam(sam, stack).to(device).eval()
        if spec.get("compile"):
            hooked.compile()
        if spec["part"] == "encoder":
            return lambda: hooked.encode(hooked.context(batch)), [hooked, sam], batch
        return lambda: hooked(batch).pred, [hooked, sam], batch

    dense_pe = sam.prompt_encoder.get_dense_pe()

    def encoder() -> torch.Tensor:  # SAM's preprocess takes a 0..255 image
        return sam.image_encoder(sam.preprocess(batch.image * 255.0))

    def full() -> list[torch.Tensor]:
        embeddings = encoder()
        masks = []
        for b in range(embeddings.shape[0]):  # segment-anything's decoder runs one image at a time
            sparse, dense = sam.prompt_encoder(points=None, boxes=batch.box[b : b + 1], masks=None)
            m, _ = sam.mask_decoder.predict_masks(embeddings[b : b + 1], dense_pe, sparse, dense)
            masks.append(m)
        return masks

    return (encoder if spec["part"] == "encoder" else full), [sam], batch


def _build_train(spec: dict[str, Any], device: torch.device):
    from samflow.module import SamflowModule, SamSpec
    from samflow.plugins.registry import create_plugin

    torch.manual_seed(spec["seed"])
    plugins = {name: create_plugin(name) for name in spec["plugins"]}
    module = SamflowModule(
        sam=SamSpec(
            variant=spec["variant"],
            img_size=spec["img_size"],
            seed=spec["seed"],
            encoder_cache=spec.get("encoder_cache", 0),
            checkpoint_blocks=spec.get("checkpoint_blocks", False),
        ),
        plugins=plugins,
    ).to(device)
    module.train()
    if spec.get("compile"):
        module.model.compile()
    optimizer = module.configure_optimizers()
    if isinstance(optimizer, dict):
        optimizer = optimizer["optimizer"]
    batch = make_batch(spec["batch"], module.model.img_size, device, spec["seed"])
    trainable = sum(module.trainable_parameters().values())

    def step() -> torch.Tensor:
        with _autocast(spec, device):
            out, ctx = module(batch)
            loss = module.compute_losses(out, batch, ctx)["total"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return step, [module, optimizer], batch, trainable


# ---------------------------------------------------------------------------------------------------
# the reference SAM-Adapter training loop (issue 15), rebuilt from its published description
# ---------------------------------------------------------------------------------------------------
class _ReferenceAdapterPrompts(torch.nn.Module):
    """SAM-Adapter's prompt generator as the reference describes it (../shared/reference notes §1):
    high-frequency features (FFT high-pass of the normalised input, |real(ifft)|, a 16x16 stride-16
    conv to 24 channels) plus a 768->24 projection of the patch tokens, then per block
    ``shared_up(GELU(Linear_i(hf + ef)))`` added to the block's input.
    """

    def __init__(
        self, dim: int, depth: int, img_size: int, patch: int = 16, width: int = 24, rate: float = 0.25
    ):
        super().__init__()
        self.rate = rate
        self.hf_embed = torch.nn.Conv2d(3, width, patch, patch)
        self.tokens_down = torch.nn.Linear(dim, width)
        self.tune = torch.nn.ModuleList(
            torch.nn.Sequential(torch.nn.Linear(width, width), torch.nn.GELU()) for _ in range(depth)
        )
        self.up = torch.nn.Linear(width, dim)

    def high_pass(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        spectrum = torch.fft.fftshift(torch.fft.fft2(x, norm="forward"), dim=(-2, -1))
        half = int((h * w * self.rate) ** 0.5) // 2
        keep = torch.ones(h, w, device=x.device)
        keep[h // 2 - half : h // 2 + half, w // 2 - half : w // 2 + half] = 0
        spectrum = spectrum * keep
        return torch.fft.ifft2(torch.fft.ifftshift(spectrum, dim=(-2, -1)), norm="forward").real.abs()

    def features(self, image: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        hf = self.hf_embed(self.high_pass(image)).flatten(2).transpose(1, 2)  # (B, L, 24)
        return hf + self.tokens_down(tokens.flatten(1, 2))

    def prompt(self, i: int, features: torch.Tensor, grid: tuple[int, ...]) -> torch.Tensor:
        return self.up(self.tune[i](features)).view(grid)


def _build_reference_train(spec: dict[str, Any], device: torch.device):
    """The reference loop: fp32, segment-anything's own encoder blocks (attention as q @ k^T with the
    decomposed rel-pos bias added to the dense (L, L) logits), the trainable mask decoder run once per
    image without prompts, masks upsampled to the input size, BCE + IoU loss, AdamW on adapter + decoder.
    """
    from samflow.sam import build_sam

    torch.manual_seed(spec["seed"])
    sam = build_sam(spec["variant"], img_size=spec["img_size"], seed=spec["seed"]).to(device)
    encoder, decoder = sam.image_encoder, sam.mask_decoder
    size = encoder.img_size
    prompts = _ReferenceAdapterPrompts(encoder.pos_embed.shape[-1], len(encoder.blocks), size).to(device)
    for p in decoder.parameters():
        p.requires_grad_(True)
    decoder.train()
    params = list(prompts.parameters()) + list(decoder.parameters())
    optimizer = torch.optim.AdamW(params, lr=2e-4)
    batch = make_batch(spec["batch"], size, device, spec["seed"])
    image = sam.preprocess(batch.image * 255.0)
    target = batch.mask.to(image.dtype)
    dense_pe = sam.prompt_encoder.get_dense_pe()
    empty = torch.empty(1, 0, dense_pe.shape[1], device=device)
    no_mask = sam.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(1, -1, *dense_pe.shape[-2:])

    def step() -> torch.Tensor:
        x = encoder.patch_embed(image)
        features = prompts.features(image, x)
        x = x + encoder.pos_embed
        for i, block in enumerate(encoder.blocks):
            x = block(x + prompts.prompt(i, features, x.shape))
        embeddings = encoder.neck(x.permute(0, 3, 1, 2))
        logits = []
        for b in range(embeddings.shape[0]):  # the decoder per image
            low, _ = decoder(embeddings[b : b + 1], dense_pe, empty, no_mask, multimask_output=False)
            logits.append(
                torch.nn.functional.interpolate(low, (size, size), mode="bilinear", align_corners=False)
            )
        pred = torch.cat(logits)
        prob = pred.sigmoid()
        inter = (prob * target).sum((2, 3))
        iou = 1 - inter / (prob.sum((2, 3)) + target.sum((2, 3)) - inter)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(pred, target) + iou.mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    trainable = sum(p.numel() for p in params)
    return step, [sam, prompts, optimizer], batch, trainable


def run_case(spec: dict[str, Any]) -> dict[str, Any]:
    """Build, warm up and time one case in this process; a result row."""
    row = {
        "case": case_label(spec),
        "impl": spec["impl"],
        "plugins": "+".join(spec["plugins"]) or "-",
        "kind": spec["kind"],
        "part": spec.get("part"),
        "round": spec.get("round", 0),
    }
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    try:
        trainable = None
        if spec["kind"] == "forward":
            fn, keep, batch = _build_forward(spec, device)
            grad = torch.no_grad
        else:
            build = _build_reference_train if spec["impl"] == "reference_loop" else _build_train
            fn, keep, batch, trainable = build(spec, device)
            grad = nullcontext
        probe = MemoryProbe(device)
        probe.start()
        with grad():
            ctx = _autocast(spec, device) if spec["kind"] == "forward" else nullcontext()
            with ctx:
                for _ in range(spec["warmup"]):
                    fn()
                _sync(device)
                times = []
                for _ in range(spec["steps"]):
                    start = time.perf_counter()
                    fn()
                    _sync(device)
                    times.append(time.perf_counter() - start)
                elapsed = sum(times)
        base, peak = probe.stop()
        images = spec["batch"] * spec["steps"]
        row.update(
            images_per_s=images / elapsed if elapsed > 0 else float("inf"),
            ms_per_step=1000 * elapsed / max(spec["steps"], 1),
            median_ms_per_step=1000 * statistics.median(times) if times else float("nan"),
            step_ms=[1000 * t for t in times],
            base_mib=base,
            peak_mib=peak,
            memory_method=probe.method,
            trainable_params=trainable,
            threads=torch.get_num_threads(),
            error=None,
        )
        del fn, keep, batch
    except Exception as err:  # a broken case is reported in its row; the others still run
        row.update(error=f"{type(err).__name__}: {err}", traceback=traceback.format_exc())
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def run_case_subprocess(spec: dict[str, Any]) -> dict[str, Any]:
    """Run one case in a fresh interpreter, so its memory peak is its own."""
    cmd = [sys.executable, os.path.abspath(__file__), CHILD_FLAG, json.dumps(spec)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_MARKER):
            return json.loads(line[len(RESULT_MARKER) :])
    return {
        "case": case_label(spec),
        "impl": spec["impl"],
        "plugins": "+".join(spec["plugins"]) or "-",
        "kind": spec["kind"],
        "part": spec.get("part"),
        "round": spec.get("round", 0),
        "error": f"subprocess exited with {proc.returncode}: {proc.stderr.strip()[-2000:]}",
    }


def _child(payload: str) -> int:
    row = run_case(json.loads(payload))
    sys.stdout.write(RESULT_MARKER + json.dumps(row) + "\n")
    sys.stdout.flush()
    return 0


# ---------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Throughput (images/s) and peak memory: samflow's HookedSam vs segment-anything "
        "(frozen forward), and SamflowModule training steps with plugins.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--variant",
        default="tiny",
        help="SAM variant: tiny, vit_b, vit_l, vit_h, mobile_sam, efficient_sam_vitt, efficient_sam_vits (random weights)",
    )
    p.add_argument("--img-size", type=int, default=None, help="encoder input size (default: the variant's)")
    p.add_argument("--batch", type=int, default=2, help="images per step")
    p.add_argument("--steps", type=int, default=5, help="timed steps per case")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per case before timing")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--bf16", action="store_true", help="run under torch.autocast(dtype=bfloat16)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random SAM weights and the batch")
    p.add_argument(
        "--plugins",
        nargs="+",
        default=["decoder_tuning"],
        help="plugins (registered names) for the training step: all together, then each alone",
    )
    p.add_argument(
        "--alone",
        action="store_true",
        help="each plugin of --plugins alone, no case with all of them (for plugins that cannot run together)",
    )
    p.add_argument("--forward", action=argparse.BooleanOptionalAction, default=True, help="run (a)")
    p.add_argument("--train", action=argparse.BooleanOptionalAction, default=True, help="run (b)")
    p.add_argument(
        "--encoder-rows",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also time the image encoder alone in (a)",
    )
    p.add_argument(
        "--isolation",
        choices=["auto", "subprocess", "none"],
        default="auto",
        help="run each case in a fresh subprocess (auto: on CPU, where peak RSS needs it) or in-process",
    )
    p.add_argument(
        "--encoder-cache",
        type=int,
        default=0,
        help="SamSpec.encoder_cache of the training step: >0 caches encoder outputs; the timed batch "
        "repeats, so every timed step hits (the best case: no augmentation). Refused by encoder plugins.",
    )
    p.add_argument(
        "--checkpoint-blocks",
        action="store_true",
        help="SamSpec.checkpoint_blocks of the training step (activation checkpointing of encoder blocks)",
    )
    p.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="run the forward cases this many rounds, samflow and segment-anything interleaved in each "
        "round (a shared machine's load then hits both alike), samflow first in even rounds and second "
        "in odd ones; ratios are given per round",
    )
    p.add_argument(
        "--device-warmup",
        type=float,
        default=3.0,
        help="on a GPU, seconds of matrix products before the first case, so that no case runs while "
        "the device is still coming up to speed (0: none)",
    )
    p.add_argument(
        "--forward-plugins",
        nargs="*",
        default=[],
        help="also time samflow's forward with these plugins in each round (hook sites in use, no "
        "gradients): e.g. hq_sam sam_adapter",
    )
    p.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile samflow's model (HookedSam) in every samflow case; the warm-up steps include "
        "the compilation, so give --warmup at least 2",
    )
    p.add_argument(
        "--reference-sam-adapter",
        action="store_true",
        help="also time the reference SAM-Adapter training loop (fp32 whatever --bf16 says, segment-anything's "
        "manual attention, the decoder once per image; rebuilt from its published description)",
    )
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    return p.parse_args(argv)


def build_specs(args: argparse.Namespace) -> list[dict[str, Any]]:
    common = {
        "variant": args.variant,
        "img_size": args.img_size,
        "batch": args.batch,
        "steps": args.steps,
        "warmup": args.warmup,
        "device": args.device,
        "bf16": args.bf16,
        "threads": args.threads,
        "seed": args.seed,
        "compile": args.compile,
    }
    specs = []
    train_options = {"encoder_cache": args.encoder_cache, "checkpoint_blocks": args.checkpoint_blocks}
    if args.forward:
        parts = ["full", "encoder"] if args.encoder_rows else ["full"]
        for round_ in range(args.repeat):
            order = ("samflow", "segment_anything")
            for part in parts:
                for impl in order if round_ % 2 == 0 else order[::-1]:
                    specs.append(
                        {
                            **common,
                            "kind": "forward",
                            "impl": impl,
                            "part": part,
                            "plugins": [],
                            "round": round_,
                        }
                    )
                if args.forward_plugins:
                    specs.append(
                        {
                            **common,
                            "kind": "forward",
                            "impl": "samflow",
                            "part": part,
                            "plugins": list(args.forward_plugins),
                            "round": round_,
                        }
                    )
    if args.train:
        plugins = list(dict.fromkeys(args.plugins))  # keep order, drop repeats
        sets = ([] if args.alone and len(plugins) > 1 else [plugins]) + (
            [[p] for p in plugins] if len(plugins) > 1 else []
        )
        for names in sets:
            specs.append(
                {
                    **common,
                    **train_options,
                    "kind": "train",
                    "impl": "samflow",
                    "part": None,
                    "plugins": names,
                }
            )
        if args.reference_sam_adapter:
            specs.append(
                {
                    **common,
                    "bf16": False,
                    "compile": False,
                    "kind": "train",
                    "impl": "reference_loop",
                    "part": None,
                    "plugins": ["sam_adapter"],
                }
            )
    return specs


def ratios(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """samflow over segment-anything per forward part (no plugins), per round (``part`` or ``part#round``).

    ``mean``: images/s from the total timed time (>1: samflow faster); ``median``: from the median
    step time (robust to load spikes); ``memory``: peak +MiB, samflow over segment-anything (<1: less).
    """
    out = {}
    rounds = sorted({r.get("round", 0) for r in rows})
    for part in ("full", "encoder"):
        for round_ in rounds:
            found = {
                r["impl"]: r
                for r in rows
                if r["kind"] == "forward"
                and r["part"] == part
                and r.get("round", 0) == round_
                and r["plugins"] == "-"
                and not r.get("error")
            }
            if "samflow" in found and "segment_anything" in found:
                ours, theirs = found["samflow"], found["segment_anything"]
                name = part if len(rounds) == 1 else f"{part}#{round_}"
                out[name] = {
                    "mean": ours["images_per_s"] / theirs["images_per_s"],
                    "median": theirs["median_ms_per_step"] / ours["median_ms_per_step"],
                    "memory": ours["peak_mib"] / theirs["peak_mib"] if theirs["peak_mib"] else float("nan"),
                }
    return out


def _warm_up_device(device: torch.device, seconds: float) -> None:
    """Matrix products for ``seconds``: a fresh GPU runs its first work slower (clocks, lazy setup),
    which would otherwise fall on the first case timed."""
    a = torch.randn(4096, 4096, device=device, dtype=torch.bfloat16)
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        for _ in range(20):
            a = torch.tanh(a @ a)
        torch.cuda.synchronize(device)


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def format_report(result: dict[str, Any]) -> str:
    meta, rows = result["meta"], result["rows"]
    lines = [
        f"# samflow throughput: variant={meta['variant']} img_size={meta['img_size']} batch={meta['batch']} "
        f"steps={meta['steps']} warmup={meta['warmup']} device={meta['device']} ({meta['device_name']}) "
        f"bf16={meta['bf16']} threads={meta['threads']}",
        f"# torch {meta['torch']}, python {meta['python']}, {meta['cpu_count']} CPUs, "
        f"load average (1/5/15 min) before {meta['load_before']} after {meta['load_after']}, {meta['date']}",
        "# forward: torch.no_grad, random weights, one box per image; segment_anything = its image encoder "
        "(batched) + prompt encoder and predict_masks per image",
        "# train_step: SamflowModule forward + compute_losses + backward + AdamW step",
        f"# isolation: {meta['isolation']}; memory: {meta['memory_method']}",
        "# images/s: batch * steps / total timed time; ms/step: its mean; median ms: median step time",
        "# base MiB: memory held after imports + model build + batch; peak +MiB: peak above it during "
        "warm-up and timed steps",
    ]
    width = max([7] + [len(r["plugins"]) for r in rows])
    header = (
        f"{'case':<16} {'impl':<16} {'plugins':<{width}} {'images/s':>9} {'ms/step':>9} {'median ms':>9} "
        f"{'base MiB':>9} {'peak +MiB':>9}"
    )
    lines += [header, "-" * len(header)]
    for r in rows:
        if r.get("error"):
            lines.append(
                f"{r['case']:<16} {r['impl']:<16} {r['plugins']:<{width}} ERROR {r['error'].splitlines()[0]}"
            )
            continue
        lines.append(
            f"{r['case']:<16} {r['impl']:<16} {r['plugins']:<{width}} {r['images_per_s']:>9.2f} "
            f"{r['ms_per_step']:>9.1f} {r['median_ms_per_step']:>9.1f} {r['base_mib']:>9.1f} {r['peak_mib']:>9.1f}"
        )
    for part, value in result["ratios"].items():
        lines.append(
            f"ratio samflow/segment_anything images/s, forward/{part}: {value['mean']:.3f} "
            f"(from median step times: {value['median']:.3f}); peak memory {value['memory']:.3f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark; print the table and return {"meta", "rows", "ratios"}."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == [CHILD_FLAG]:
        raise SystemExit(_child(argv[1]))
    args = parse_args(argv)
    if args.steps < 1 or args.warmup < 0 or args.batch < 1:
        raise SystemExit("--steps and --batch must be at least 1, --warmup at least 0.")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda was asked for, but torch sees no CUDA device.")
    isolation = args.isolation
    if isolation == "auto":
        isolation = "subprocess" if device.type == "cpu" else "none"
    from samflow.sam.build import BACKBONE_DECODER, VARIANTS, variant_names

    if args.variant not in variant_names():
        raise SystemExit(f"Unknown variant {args.variant!r}; choose one of {variant_names()}.")
    if args.train:
        from samflow.plugins.registry import PluginError, get_plugin_class

        try:
            for name in args.plugins:
                get_plugin_class(name)
        except PluginError as err:
            raise SystemExit(str(err)) from None
    specs = build_specs(args)
    load_before = _load_average()
    runner = run_case_subprocess if isolation == "subprocess" else run_case
    rows = []
    if device.type == "cuda" and args.device_warmup > 0:
        _warm_up_device(device, args.device_warmup)
    for spec in specs:
        row = runner(spec)
        rows.append(row)
        status = row.get("error") or f"{row['images_per_s']:.2f} images/s"
        print(f"  done {row['case']} {row['impl']} {row['plugins']}: {status}", file=sys.stderr, flush=True)
    methods = sorted({r["memory_method"] for r in rows if r.get("memory_method")})
    meta = {
        "variant": args.variant,
        "img_size": args.img_size or VARIANTS.get(args.variant, BACKBONE_DECODER).img_size,
        "batch": args.batch,
        "steps": args.steps,
        "warmup": args.warmup,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model(),
        "bf16": args.bf16,
        "threads": next((r["threads"] for r in rows if r.get("threads")), torch.get_num_threads()),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "load_before": load_before,
        "load_after": _load_average(),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "isolation": isolation,
        "memory_method": "; ".join(methods) or "n/a",
        "argv": argv,
    }
    result = {"meta": meta, "rows": rows, "ratios": ratios(rows)}
    print(format_report(result), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    outcome = main()
    sys.exit(1 if any(r.get("error") for r in outcome["rows"]) else 0)
