"""``samflow predict-slide``: segment a whole slide with a two-resolution model (WSI-SAM).

The tissue (Otsu on saturation at a low level) is tiled at the HR mpp with ``tile`` px tiles that
overlap by ``overlap`` px; each tile goes through the model with its concentric LR context (``factor``
times the mpp, the same ``tile`` px) and a prompt box covering the whole tile. Tile probabilities
(sigmoid of the logits) are averaged where tiles overlap, and a pixel is tumour where that average is
above the threshold (p > t, as ``samflow predict``, ``Predictor`` and the metrics threshold; glass
without tissue is never predicted, holds 0, and is background at any threshold). Output in ``--out``:

- ``<slide>_mask.tif``: a pyramidal tiled TIFF (uint8, 255 = tumour) at the HR mpp, levels halving;
- ``<slide>.geojson``: the mask's polygons in level-0 slide coordinates (QuPath reads them), traced
  exactly on the finest pyramid level whose sides are at most ``polygon_side`` px (default 4096);
- with ``--annotations``: Dice of the mask against them (per slide), printed and in ``<slide>.json``.

Each slide's files appear together when it is done (written under hidden ``.partial`` names, then
renamed), so an interrupted run leaves none of its slide. Process 0 holds ``--out``'s lock file
(``.predict.lock``, ``samflow.outputs.PREDICT_LOCK``) from before the model is built to its end: a second
run into the same folder at the same moment is refused in one line naming the process (a killed run
holds nothing). ``--overwrite`` removes the earlier run's
files of the slides first (a ``<slide>.json`` Dice included, when this run has no annotations).
``samflow_slides.json``, written before the first slide's files, records what makes the masks
(``samflow.wsi_record``); ``--resume`` predicts only the slides whose files are not all there, so a
killed run continued ends with the files of an uninterrupted one, and is refused naming what differs
when the settings do.

The command runs at the experiment's ``data.init_args.mpp`` and ``data.init_args.factor`` (the model
was trained there) with its ``model.threshold``; ``--mpp`` / ``--factor`` / ``--threshold`` override
them, and each flag that differs from the experiment's value is named in one printed line.

Memory is bounded by one band of tiles: the probabilities are stitched in a (tile x width) band that
moves down the slide, finished rows go to a disk-backed array (``np.memmap``, 1 byte per pixel) in
the output folder, and every pyramid level is a disk-backed array too, built band by band. RAM is
O(tile x slide width) plus a few tiles, never the slide's area (measured in
``tests/wsi/test_wsi_predict_memory.py``).

Several processes (``torchrun --nproc_per_node N -m samflow predict-slide ...``; ``torch.distributed``,
NCCL on GPUs with a gloo group for the tiles, gloo on CPUs) split the tiles: the tissue tiles are
cut into batches of ``batch_size`` in the order one process runs them, batch g runs on process
g mod N, and after each round of N batches process 0 gathers their probabilities and stitches them
in that order. Every tile is computed in the same batch as in one process and added in the same
order, so the written TIFF, GeoJSON and Dice are those of one process; process 0 writes them.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from samflow.callbacks.run_folder import hold_folder
from samflow.data.wsi.annotations import load_annotations, mask_to_region
from samflow.data.wsi.slide import Slide, SlideError
from samflow.outputs import PREDICT_LOCK, case_clash, whole_files
from samflow.usage import CommandParser, PositiveInt, require_extra
from samflow.wsi_mask import feature_collection, halve, stitch_bands, write_pyramid
from samflow.wsi_record import refuse_existing, run_record, slides_left
from samflow.wsi_record import slide_outputs as _outputs
from samflow.wsi_tiles import Chunk, chunk_probabilities, rank_and_world_in, tile_chunks


@dataclass(frozen=True)
class SlidePrediction:
    mask_path: Path
    geojson_path: Path
    shape: tuple[int, int]  # (H, W) of the mask at the HR mpp
    tiles: int  # tissue tiles of the slide
    dice: float | None
    ran: int = 0  # tiles this process ran through the model (all of them in one process)


def dice(pred: np.ndarray, gt: np.ndarray) -> float:
    """2 |P & G| / (|P| + |G|); 1 when both are empty."""
    total = int(pred.sum()) + int(gt.sum())
    return 1.0 if total == 0 else 2 * int((pred & gt).sum()) / total


def predict_slide(
    module: Any,
    slide_path: str | Path,
    out: str | Path,
    *,
    mpp: float = 1.0,
    factor: float = 2.0,
    tile: int = 1024,
    overlap: int = 128,
    batch_size: int = 4,
    threshold: float = 0.5,
    slide_mpp: float | None = None,
    tissue_mpp: float = 16.0,
    annotations: str | Path | None = None,
    polygon_side: int = 4096,
    progress: bool = True,
    group: Any = None,
) -> SlidePrediction:
    """Segment ``slide_path`` with ``module`` (a ``SamflowModule`` with a two-resolution plugin, in eval
    mode on its device) and write the mask TIFF and GeoJSON to ``out``; see the module docstring.

    Under ``torch.distributed`` every process of ``group`` (default: the default group; a gloo group
    when that is NCCL) calls this with the same arguments: they split the tiles, process 0 writes,
    and all return the same result (``ran``: the tiles this process ran)."""
    if not 0 <= overlap <= tile // 2:
        raise ValueError(
            f"predict-slide: --overlap must lie in [0, tile/2] = [0, {tile // 2}], got {overlap}."
        )
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    rank, world = rank_and_world_in(group)
    if world > 1:  # the group the others wait in for process 0's files, made while no process is busy
        from samflow.commands import cpu_group

        cpu_group()
    out = Path(out)
    stem = Path(slide_path).stem
    mask_path, geojson_path, dice_path = outputs = _outputs(out, slide_path)
    _refuse_a_file(out)
    _refuse_writing_inputs(outputs, [slide_path, annotations])
    # read before any tile runs: a bad file stops here, and nothing written can replace it
    slide = Slide(slide_path, slide_mpp)
    try:  # the slide is closed on every way out (a long run over many slides must not pile up files)
        truth = None if annotations is None else load_annotations(annotations, slide_size=slide.dimensions)
        pixel = mpp / slide.mpp
        width, height = (math.ceil(d / pixel) for d in slide.dimensions)
        xs, ys, chunks = tile_chunks(
            slide, mpp=mpp, tile=tile, overlap=overlap, batch_size=batch_size, tissue_mpp=tissue_mpp
        )
    except BaseException:
        slide.close()
        raise
    tiles = sum(len(chunk) for _, chunk in chunks)
    stream = chunk_probabilities(module, slide, chunks, mpp=mpp, factor=factor, tile=tile, group=group)
    ran, score = 0, None
    if rank != 0:  # run this process's tiles; process 0 stitches and writes
        try:
            for g, _ in stream:
                ran += len(chunks[g][1])
        finally:
            slide.close()
        score = _share(score, group)
        return SlidePrediction(mask_path, geojson_path, (height, width), tiles, score, ran)
    scratch = [out / f".{stem}_mask.u8"]
    levels: list[np.ndarray] = []
    columns = [TextColumn(f"predict-slide {stem}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
    try:
        out.mkdir(parents=True, exist_ok=True)
        # written under hidden temporary names, renamed together at the end: an interrupted run leaves none
        with whole_files(outputs) as (mask_temp, geojson_temp, dice_temp):
            levels.append(np.memmap(scratch[0], dtype=np.uint8, mode="w+", shape=(height, width)))
            with Progress(*columns, disable=not progress) as bar:
                task = bar.add_task("tiles", total=tiles)

                def gathered() -> Iterator[tuple[Chunk, np.ndarray]]:
                    nonlocal ran
                    for g, probs in stream:
                        assert probs is not None
                        ran += len(chunks[g][1]) if g % world == 0 else 0
                        bar.advance(task, len(chunks[g][1]))
                        yield chunks[g], probs

                bands = stitch_bands(
                    gathered(), xs, ys, width=width, height=height, tile=tile, overlap=overlap
                )
                for y0, rows in bands:
                    dest = levels[0][y0 : y0 + rows.shape[0]]
                    # p > t, as every path: glass no tile covers (probability 0) is background
                    dest[...] = rows > threshold
                    dest *= 255
            # levels halving, each a disk-backed array, down to 256 px and to a level at most polygon_side
            while min(levels[-1].shape) > 1 and (
                min(levels[-1].shape) > 256 or max(levels[-1].shape) > polygon_side
            ):
                h, w = levels[-1].shape
                scratch.append(out / f".{stem}_mask.{len(levels)}.u8")
                shape = (math.ceil(h / 2), math.ceil(w / 2))
                levels.append(np.memmap(scratch[-1], dtype=np.uint8, mode="w+", shape=shape))
                halve(levels[-2], levels[-1])
            write_pyramid(levels, mask_temp, mpp)
            coarse = next((i for i, m in enumerate(levels) if max(m.shape) <= polygon_side), len(levels) - 1)
            coarse_mask = np.asarray(levels[coarse]) > 0
            down = pixel * 2**coarse  # level-0 px per coarse px
            region = mask_to_region(coarse_mask, down)
            geojson_temp.write_text(json.dumps(feature_collection(region)))
            if truth is not None:
                from samflow.data.wsi.annotations import rasterize_grid

                gt = rasterize_grid(truth, down, coarse_mask.shape)
                score = dice(coarse_mask, gt)
                dice_temp.write_text(
                    json.dumps({"slide": str(slide_path), "dice": score, "mpp": mpp * 2**coarse})
                )
            else:
                dice_path.unlink(missing_ok=True)  # an earlier run's Dice is not this mask's
    finally:
        del levels
        for path in scratch:
            path.unlink(missing_ok=True)
        slide.close()
    score = _share(score, group)
    return SlidePrediction(mask_path, geojson_path, (height, width), tiles, score, ran)


def _refuse_writing_inputs(outputs: Sequence[Path], inputs: Sequence[str | Path | None]) -> None:
    """Refuse outputs that are (or link to) an input: ``--out`` the annotations' folder would replace
    ``<slide>.geojson`` before Dice reads it."""
    given = [Path(p) for p in inputs if p is not None and Path(p).exists()]
    for output in outputs:
        same = next((p for p in given if output.exists() and output.samefile(p)), None)
        if same is not None:
            raise SlideError(f"predict-slide: the output {output} is the input {same}; choose another --out.")


def _refuse_a_file(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise SlideError(f"predict-slide: --out {out} is a file, not a folder; choose a folder.")


def _refuse_shared_stems(slides: Sequence[str]) -> None:
    """Refuse two slides that would write the same ``<stem>_mask.tif`` (``a/x.tif``, ``b/x.svs``; also
    ``x.tif`` and ``X.tif``, one name on a case-insensitive disk)."""
    clash = case_clash((f"{Path(path).stem}_mask.tif", path) for path in slides)
    if clash is not None:
        raise SlideError(
            "predict-slide: "
            + clash.message("the slides", "rename one, or predict them into different --out folders.")
        )


def _share(score: float | None, group: Any) -> float | None:
    """Process 0's Dice on every process, once process 0 has written the files: the others wait as long
    as that takes (a large slide's pyramid and polygons can outlast the process group's timeout) and stop
    in one line when process 0 has stopped (``samflow.commands.wait_for_ranks``)."""
    import torch.distributed as dist

    from samflow.commands import wait_for_ranks

    if rank_and_world_in(group)[1] == 1:
        return score
    wait_for_ranks(SlideError, "predict-slide", "the slides finished before it are kept.")
    box = [score]
    dist.broadcast_object_list(box, src=dist.get_global_rank(group, 0) if group else 0, group=group)
    return box[0]


def _parser() -> argparse.ArgumentParser:
    p = CommandParser(
        prog="samflow predict-slide",
        description="Segment whole slides with a two-resolution model (WSI-SAM): tissue tiles at the HR "
        "mpp with LR context, stitched with overlap; writes <slide>_mask.tif (pyramidal) and <slide>.geojson. "
        "Remaining arguments override the experiment (e.g. --model.sam.checkpoint PATH).",
    )
    p.add_argument("slides", nargs="+", help="slide files (pyramidal TIFF, SVS, ...)")
    p.add_argument("--experiment", required=True, help="the experiment the model was trained with")
    p.add_argument("--ckpt", help="a checkpoint samflow fit wrote (default: the untrained plugins)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--annotations", nargs="*", help="one annotation file per slide: report Dice per slide")
    earlier = p.add_mutually_exclusive_group()
    earlier.add_argument("--overwrite", action="store_true", help="replace the outputs of an earlier run")
    earlier.add_argument(
        "--resume",
        action="store_true",
        help="continue a killed run in --out: predict the slides whose files are not all there (refused "
        "when a setting differs from the run's samflow_slides.json)",
    )
    p.add_argument(
        "--mpp",
        type=float,
        help="HR microns per pixel (default: the experiment's data.init_args.mpp, else 1.0)",
    )
    p.add_argument(
        "--factor",
        type=float,
        help="LR mpp / HR mpp (default: the experiment's data.init_args.factor, else 2)",
    )
    p.add_argument("--slide-mpp", type=float, help="level-0 mpp of slides without metadata")
    p.add_argument(
        "--tile",
        type=PositiveInt,
        help="tile side in HR px; each tile is resized to the model's input, as the experiment's patches "
        "were in training (default: the experiment's data.init_args.patch_size, else 1024)",
    )
    p.add_argument(
        "--overlap", type=int, default=128, help="tile overlap in HR px, at most tile/2 (default 128)"
    )
    p.add_argument("--batch-size", type=PositiveInt, default=4, help="tiles per forward pass (default 4)")
    p.add_argument(
        "--threshold",
        type=float,
        help="probability above which a pixel is tumour (p > t, as samflow predict; glass without tissue "
        "is background at any threshold; default: the experiment's model.threshold, else 0.5)",
    )
    p.add_argument(
        "--device",
        help="torch device (default: cuda:LOCAL_RANK if available, else cpu); under torchrun "
        "(torchrun --nproc_per_node N -m samflow predict-slide ...) the processes split the tiles",
    )
    return p


def _settings(opts: argparse.Namespace, module: Any, data: Any) -> tuple[dict[str, Any], list[str]]:
    """mpp, factor, threshold and tile: each flag given, else the experiment's (``data.init_args.mpp``,
    ``factor``, ``patch_size``, ``model.threshold``); and one line per flag that differs from it. The
    tissue detection's resolution is the experiment's ``data.init_args.tissue_mpp`` (else 16)."""
    common = getattr(data, "common", None) or {}
    trained = {
        "mpp": ("data.init_args.mpp", common.get("mpp", getattr(data, "mpp", None)), 1.0),
        "factor": ("data.init_args.factor", common.get("factor", getattr(data, "factor", None)), 2.0),
        "threshold": ("model.threshold", getattr(module, "threshold", None), 0.5),
        "tile": ("data.init_args.patch_size", common.get("patch_size"), 1024),
    }
    values: dict[str, Any] = {}
    notes = []
    for name, (key, experiment, fallback) in trained.items():
        flag = getattr(opts, name)
        kind = int if name == "tile" else float
        values[name] = kind(flag if flag is not None else experiment if experiment is not None else fallback)
        if flag is not None and experiment is not None and float(flag) != float(experiment):
            scale = (
                ": the tiles reach the model at another scale than its patches in training"
                if name == "tile"
                else ""
            )
            notes.append(
                f"samflow predict-slide: --{name} {flag:g} differs from the experiment's {key} "
                f"{float(experiment):g}{scale}; using --{name} {flag:g}."
            )
    values["tissue_mpp"] = float(common.get("tissue_mpp") or 16.0)
    return values, notes


def _check_overlap(parser: argparse.ArgumentParser, overlap: int, tile: int) -> None:
    if not 0 <= overlap <= tile // 2:
        parser.error(f"argument --overlap: must lie in [0, --tile/2] = [0, {tile // 2}], got {overlap}")


def _init_distributed() -> Any:
    """Join torchrun's processes (``WORLD_SIZE`` > 1), or srun's tasks: NCCL on GPUs, gloo on CPUs.
    Returns the group the tiles travel in (a gloo group beside NCCL: probabilities are gathered on the
    CPU), or None."""
    import os

    import torch.distributed as dist

    from samflow.commands import cpu_group, init_process_group, ranks_from_slurm

    ranks_from_slurm()  # srun's tasks, as torchrun's ranks
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    init_process_group()
    return None if dist.get_backend() == "gloo" else cpu_group()


#: what ``samflow predict-slide`` imports from the ``wsi`` extra: the slide reader, Otsu's tissue threshold,
#: the annotation and GeoJSON polygons, the pyramidal mask TIFF
WSI_EXTRA = ("tiffslide", "skimage", "shapely", "tifffile")


def main(argv: list[str]) -> int:
    """``samflow predict-slide`` (module docstring); a slide or annotation that cannot be used is one line."""
    from samflow.commands import rank_and_world

    parser = _parser()
    opts, overrides = parser.parse_known_args(argv)
    for module in WSI_EXTRA:  # all before any slide is read: not one at a time, as each is first used
        require_extra(module, "wsi", "samflow predict-slide")
    _check_overlap(parser, opts.overlap, opts.tile or 2 * opts.overlap)  # before anything is read or built
    for flag, value in (("--mpp", opts.mpp), ("--factor", opts.factor)):
        if value is not None and not value > 0:  # NaN too; else a traceback once the slide is read
            parser.error(f"argument {flag}: must be positive, got {value}")
    if opts.threshold is not None and not 0 <= opts.threshold < 1:  # else every pixel one class, silently
        parser.error(f"argument --threshold: a probability in [0, 1), got {opts.threshold}")
    if opts.annotations and len(opts.annotations) != len(opts.slides):
        raise SlideError(
            f"predict-slide: {len(opts.slides)} slides but {len(opts.annotations)} --annotations; give one per slide."
        )
    _refuse_shared_stems(opts.slides)
    _refuse_a_file(Path(opts.out))
    annotations = opts.annotations or [None] * len(opts.slides)
    # every input is read, and no output is one, before the model is built
    for path, truth in zip(opts.slides, annotations, strict=True):
        slide = Slide(path, opts.slide_mpp)
        slide.close()
        if truth is not None:
            load_annotations(truth, slide_size=slide.dimensions)
        _refuse_writing_inputs(_outputs(Path(opts.out), path), [*opts.slides, *annotations])
    if not opts.overwrite and not opts.resume:
        refuse_existing([o for path in opts.slides for o in _outputs(Path(opts.out), path)])
    group = _init_distributed()
    rank, _ = rank_and_world()  # the process group joined above
    # process 0 writes every output: it holds --out's lock file from here, before the model is built
    out = Path(opts.out)
    lock = (
        hold_folder(out, PREDICT_LOCK, lambda holder: SlideError(_busy(out, holder))) if rank == 0 else None
    )
    try:
        if lock is not None and not opts.overwrite and not opts.resume:  # written before the other run ended
            refuse_existing([o for path in opts.slides for o in _outputs(out, path)])
        return _predict_slides(parser, opts, overrides, annotations, group)
    finally:
        if lock is not None:
            lock.release()


def _busy(out: Path, holder: str) -> str:
    """The one line refusing an ``--out`` that another live samflow process writes into now."""
    return (
        f"predict-slide: --out {out} is being written by another samflow process ({holder}); wait until it "
        "ends, or choose another --out."
    )


def _predict_slides(
    parser: argparse.ArgumentParser,
    opts: argparse.Namespace,
    overrides: list[str],
    annotations: list[str | None],
    group: Any,
) -> int:
    """``main`` once the inputs are checked and ``--out``'s lock is held: build, predict, write."""
    import os

    import torch.distributed as dist

    from samflow.commands import build_experiment, rank_and_world
    from samflow.rebuild import load_trained_checkpoint

    rank, world = rank_and_world()
    module, data = build_experiment(opts.experiment, overrides)
    settings, notes = _settings(opts, module, data)
    _check_overlap(
        parser, opts.overlap, settings["tile"]
    )  # the experiment's tile: before anything is removed
    if opts.overwrite and rank == 0:  # the earlier run's files go first: none outlives this run
        for output in (o for path in opts.slides for o in _outputs(Path(opts.out), path)):
            output.unlink(missing_ok=True)
    for note in notes if rank == 0 else []:
        print(note)
    if opts.ckpt:
        load_trained_checkpoint(module.model, opts.ckpt)
    default = f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if torch.cuda.is_available() else "cpu"
    device = torch.device(opts.device or default)
    module.to(device).eval()
    options: dict[str, Any] = {
        **settings,
        "overlap": opts.overlap,
        "batch_size": opts.batch_size,
        "slide_mpp": opts.slide_mpp,
    }
    record = None  # process 0 reads the checkpoints, and decides the slides left for every process
    if rank == 0:
        record = run_record(
            opts.experiment, overrides, opts.ckpt, module, options, device, opts.slides, annotations
        )
    left = slides_left(Path(opts.out), record, opts.slides, opts.resume, group)
    if opts.resume and rank == 0:
        print(
            f"samflow predict-slide: resuming in {opts.out}: {len(left)} of {len(opts.slides)} slides left."
        )
    for i in left:
        path, truth = opts.slides[i], annotations[i]
        result = predict_slide(
            module, path, opts.out, **options, annotations=truth, progress=rank == 0, group=group
        )
        if rank == 0:
            line = f"{path}: {result.tiles} tiles -> {result.mask_path}, {result.geojson_path}"
            line += "" if world == 1 else f" ({world} processes)"
            print(line + ("" if result.dice is None else f"; Dice {result.dice:.4f}"))
    if world > 1:
        dist.destroy_process_group()
    return 0
