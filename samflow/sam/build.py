"""Build a frozen SAM from segment-anything's modules: the real variants and a tiny one for tests.

A checkpoint is always a local path: nothing is downloaded. Loading uses ``weights_only=True`` and
strict key checks; a wrong file fails with the missing and unexpected keys and the variant it looks like.
"""

from __future__ import annotations

import copy
import pickle
import warnings
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer
from torch import nn

from samflow.paths import where_looked
from samflow.sam.backbones import BACKBONES, Backbone
from samflow.sam.casts import cache_frozen_casts
from samflow.sam.ops import fast_layer_norms
from samflow.seeding import cpu_seeded


@dataclass(frozen=True)
class SamVariant:
    """The hyper-parameters that define one SAM architecture."""

    embed_dim: int
    depth: int
    num_heads: int
    global_attn_indexes: tuple[int, ...]
    img_size: int = 1024
    patch_size: int = 16
    window_size: int = 14
    prompt_dim: int = 256
    mask_in_chans: int = 16
    decoder_mlp_dim: int = 2048
    decoder_heads: int = 8
    iou_head_hidden_dim: int = 256


VARIANTS: dict[str, SamVariant] = {
    "vit_b": SamVariant(768, 12, 12, (2, 5, 8, 11)),
    "vit_l": SamVariant(1024, 24, 16, (5, 11, 17, 23)),
    "vit_h": SamVariant(1280, 32, 16, (7, 15, 23, 31)),
    # A few hundred thousand parameters, 128 px: for tests and the quickstart, built in a second on a CPU.
    "tiny": SamVariant(
        embed_dim=64,
        depth=4,
        num_heads=2,
        global_attn_indexes=(1, 3),
        img_size=128,
        window_size=4,
        prompt_dim=64,
        mask_in_chans=16,
        decoder_mlp_dim=128,
        decoder_heads=4,
        iou_head_hidden_dim=64,
    ),
}


#: SAM's prompt encoder and mask decoder, with which the other image encoders (``BACKBONES``) run
BACKBONE_DECODER = VARIANTS["vit_b"]


def variant_names() -> list[str]:
    """Every ``model.sam.variant``: SAM's ViTs, ``tiny`` and the other image encoders."""
    return sorted(VARIANTS) + sorted(BACKBONES)


class CheckpointError(ValueError):
    """A SAM checkpoint file does not fit the requested variant."""


def build_sam(
    variant: str = "vit_b",
    checkpoint: str | Path | None = None,
    img_size: int | None = None,
    seed: int | None = 0,
    *,
    flag: str = "--model.sam.checkpoint",
    variant_flag: str | None = "--model.sam.variant",
) -> Sam:
    """Build SAM ``variant``, load ``checkpoint`` if given, freeze it and put it in eval mode.

    Args:
        variant: one of ``vit_b``, ``vit_l``, ``vit_h``, ``tiny``, or an image encoder of ``BACKBONES``
            with SAM's prompt encoder and mask decoder: ``mobile_sam``, ``efficient_sam_vitt``,
            ``efficient_sam_vits``.
        checkpoint: path to a SAM state dict (e.g. ``sam_vit_b_01ec64.pth``, ``mobile_sam.pt``,
            ``efficient_sam_vitt.pt``); None keeps random weights.
        img_size: encoder input size (default: the variant's). Position embeddings of a checkpoint are
            resized to it; must be a multiple of the patch size.
        seed: seed for the random initialisation, so a random SAM is the same on every rank and run.
        flag, variant_flag: the options that gave ``checkpoint`` and ``variant``, named in the errors
            about the file (None: the variant is no option of the caller's).
    """
    if variant not in VARIANTS and variant not in BACKBONES:
        raise ValueError(f"Unknown SAM variant {variant!r}; choose one of {variant_names()}.")
    spec = VARIANTS.get(variant, BACKBONE_DECODER)
    size = spec.img_size if img_size is None else img_size
    if size <= 0 or size % spec.patch_size:
        raise ValueError(f"img_size {size} is not a positive multiple of the patch size {spec.patch_size}.")
    # the CPU generator alone: torch.manual_seed would reseed the run's CUDA generator with SAM's seed
    with torch.random.fork_rng(devices=[]) if seed is None else cpu_seeded(seed):
        sam = _assemble(spec, size, BACKBONES[variant](size) if variant in BACKBONES else None)
    fast_layer_norms(sam)  # SAM's LayerNorm2d through F.layer_norm: same parameters, one fused pass
    cache_frozen_casts(sam.mask_decoder)  # under autocast, frozen decoder weights are cast once, not per call
    if checkpoint is not None:
        load_checkpoint(sam, checkpoint, variant, flag=flag, variant_flag=variant_flag)
    return freeze(sam)


def resize_sam(sam: Sam, img_size: int) -> Sam:
    """A frozen copy of ``sam`` whose image encoder takes ``img_size`` x ``img_size`` inputs.

    The absolute position embedding and the relative-position tables of the global-attention blocks
    are interpolated exactly as ``build_sam`` interpolates a checkpoint's for another ``img_size``
    (bicubic / linear); windowed blocks keep their tables (their window does not change), the prompt
    encoder's grid follows, and every other weight is copied. ``sam`` itself is not changed. Use it
    on a bare SAM, before plugins are attached. (A random SAM needs no resizing: segment-anything
    initialises its position tables to zero, so ``build_sam(variant, img_size=s, seed=k)`` already
    equals ``resize_sam(build_sam(variant, seed=k), s)``.)
    """
    enc = sam.image_encoder
    if isinstance(enc, Backbone):
        raise TypeError(
            f"resize_sam resizes SAM's ViT encoders; {type(enc).__name__} is built for any size: "
            f"build_sam(variant, img_size={img_size}) (--model.sam.img_size {img_size})."
        )
    patch = enc.patch_embed.proj.kernel_size[0]
    if img_size <= 0 or img_size % patch:
        raise ValueError(f"img_size {img_size} is not a positive multiple of the patch size {patch}.")
    grid = img_size // patch
    resized = copy.deepcopy(sam)
    new_enc = resized.image_encoder
    new_enc.img_size = img_size
    if new_enc.pos_embed is not None:
        old = new_enc.pos_embed
        new_enc.pos_embed = nn.Parameter(old.new_empty(1, grid, grid, old.shape[-1]))
    for block in new_enc.blocks:
        attn = block.attn
        if block.window_size == 0 and attn.use_rel_pos:
            attn.rel_pos_h = nn.Parameter(attn.rel_pos_h.new_empty(2 * grid - 1, attn.rel_pos_h.shape[1]))
            attn.rel_pos_w = nn.Parameter(attn.rel_pos_w.new_empty(2 * grid - 1, attn.rel_pos_w.shape[1]))
    prompt = resized.prompt_encoder
    prompt.image_embedding_size = (grid, grid)
    prompt.input_image_size = (img_size, img_size)
    prompt.mask_input_size = (4 * grid, 4 * grid)
    state = dict(sam.state_dict())
    _resize_position_tables(state, resized.state_dict())
    resized.load_state_dict(state, strict=True)
    return freeze(resized)


def _assemble(spec: SamVariant, img_size: int, encoder: nn.Module | None = None) -> Sam:
    """SAM from ``spec`` at ``img_size``; ``encoder`` replaces its ViT image encoder when given."""
    grid = img_size // spec.patch_size
    return Sam(
        image_encoder=encoder
        or ImageEncoderViT(
            depth=spec.depth,
            embed_dim=spec.embed_dim,
            img_size=img_size,
            mlp_ratio=4,
            norm_layer=partial(nn.LayerNorm, eps=1e-6),
            num_heads=spec.num_heads,
            patch_size=spec.patch_size,
            qkv_bias=True,
            use_rel_pos=True,
            global_attn_indexes=spec.global_attn_indexes,
            window_size=spec.window_size,
            out_chans=spec.prompt_dim,
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=spec.prompt_dim,
            image_embedding_size=(grid, grid),
            input_image_size=(img_size, img_size),
            mask_in_chans=spec.mask_in_chans,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(
                depth=2,
                embedding_dim=spec.prompt_dim,
                mlp_dim=spec.decoder_mlp_dim,
                num_heads=spec.decoder_heads,
            ),
            transformer_dim=spec.prompt_dim,
            iou_head_depth=3,
            iou_head_hidden_dim=spec.iou_head_hidden_dim,
        ),
    )


def freeze(sam: Sam) -> Sam:
    """Freeze every SAM parameter and put SAM in eval mode."""
    sam.requires_grad_(False)
    return sam.eval()


# the mask decoder's tensors HQ-SAM's released checkpoints (sam_hq_vit_*.pth) add to SAM's
_HQ_SAM_KEYS = tuple(
    f"mask_decoder.{name}."
    for name in ("hf_token", "hf_mlp", "compress_vit_feat", "embedding_encoder", "embedding_maskfeature")
)


def guess_variant(state_dict: dict[str, torch.Tensor]) -> str:
    """Name the variant a state dict looks like, from its patch-embedding width and depth."""
    if "image_encoder.layers.0.blocks.0.conv1.c.weight" in state_dict:
        return "mobile_sam"
    weight = state_dict.get("image_encoder.patch_embed.proj.weight")
    if (
        weight is not None
        and "image_encoder.pos_embed" in state_dict
        and state_dict["image_encoder.pos_embed"].ndim == 3
    ):
        return {192: "efficient_sam_vitt", 384: "efficient_sam_vits"}.get(
            weight.shape[0], "an unknown plain ViT"
        )
    if weight is None:
        return "not a SAM checkpoint (no image_encoder.patch_embed.proj.weight)"
    depth = len({k.split(".")[2] for k in state_dict if k.startswith("image_encoder.blocks.")})
    for name, spec in VARIANTS.items():
        if spec.embed_dim == weight.shape[0] and spec.depth == depth:
            return name
    return f"unknown (embed_dim {weight.shape[0]}, depth {depth})"


def load_checkpoint(
    sam: Sam,
    path: str | Path,
    variant: str,
    *,
    flag: str = "--model.sam.checkpoint",
    variant_flag: str | None = "--model.sam.variant",
) -> None:
    """Load a SAM state dict from ``path`` into ``sam`` with strict key and shape checks; the errors
    name the file and ``flag`` (and ``variant_flag``), the options the user gave them with."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"SAM checkpoint {str(path)!r} does not exist{where_looked(path)}; pass the path of a SAM file with {flag} "
            "(segment-anything's release page has the official ones)."
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # unpickling errors come in many types
        raise CheckpointError(_unreadable(path, err, flag)) from err
    if not isinstance(state, dict):
        raise CheckpointError(
            f"SAM checkpoint {str(path)!r} holds a {type(state).__name__}, not a state dict; pass the "
            f"segment-anything .pth file with {flag}."
        )
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    not_tensors = sorted(
        f"{k} ({type(v).__name__})" for k, v in state.items() if not isinstance(v, torch.Tensor)
    )
    if not_tensors:
        raise CheckpointError(
            f"SAM checkpoint {str(path)!r} is not a state dict of tensors: {_short(not_tensors)}; pass the "
            f"segment-anything .pth file with {flag}."
        )
    expected = sam.state_dict()
    in_file = len(state)
    if isinstance(sam.image_encoder, Backbone):
        state, expected = _backbone_state(state, expected, sam.image_encoder)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    _resize_position_tables(state, expected)
    wrong_shape = sorted(
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in set(state) & set(expected)
        if state[k].shape != expected[k].shape
    )
    hq = [k for k in unexpected if k.startswith(_HQ_SAM_KEYS)]
    if hq and not missing and not wrong_shape and len(hq) == len(unexpected):
        raise CheckpointError(
            f"SAM checkpoint {str(path)!r} is an HQ-SAM release (SAM's weights and {len(hq)} tensors of HQ-SAM's "
            "decoder: mask_decoder.hf_token, hf_mlp, ...), not a segment-anything file; samflow does not load "
            "HQ-SAM's released weights (the hq_sam plugin trains its own from the start): pass segment-anything's "
            f"checkpoint of {variant!r} (e.g. sam_vit_b_01ec64.pth) with {flag}."
        )
    if missing or unexpected or wrong_shape:
        raise CheckpointError(
            f"SAM checkpoint {str(path)!r} does not match variant {variant!r}; the file looks like "
            f"{guess_variant(state)}.\n"
            f"  missing keys ({len(missing)}): {_short(missing)}\n"
            f"  unexpected keys ({len(unexpected)}): {_short(unexpected)}\n"
            f"  wrong shapes ({len(wrong_shape)}): {_short(wrong_shape)}\n"
            + (
                f"Pass the matching {variant_flag}, or a checkpoint of {variant!r} with {flag}."
                if variant_flag
                else f"Pass a checkpoint of {variant!r} with {flag}."
            )
        )
    if len(expected) < len(sam.state_dict()):  # the image encoder alone (``_backbone_state``)
        sam.image_encoder.load_state_dict(
            {k.removeprefix("image_encoder."): v for k, v in state.items()}, strict=True
        )
        if in_file > len(state):
            warnings.warn(
                f"{str(path)!r}: its {in_file - len(state)} prompt_encoder/mask_decoder tensors are "
                f"{variant}'s own decoder, which SAM's modules do not compute; only the image encoder is loaded. "
                "SAM's prompt encoder and mask decoder keep their seeded random weights: train them "
                "(e.g. the decoder_tuning plugin).",
                stacklevel=3,
            )
    else:
        sam.load_state_dict(state, strict=True)


def _backbone_state(
    state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], encoder: Backbone
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The part of an official MobileSAM / EfficientSAM file that samflow's model holds, and its keys.

    Drops, by name, the encoder's ``unused_checkpoint_keys`` (TinyViT's classifier head). Without
    SAM's decoder in the file (EfficientSAM's is its own), only ``image_encoder.*`` is loaded and
    compared (``load_checkpoint`` warns, naming what is left out).
    """
    unused = tuple(f"image_encoder.{k}" for k in encoder.unused_checkpoint_keys)
    state = {k: v for k, v in state.items() if not k.startswith(unused)} if unused else state
    if encoder.checkpoint_has_sam_decoder:
        return state, expected
    keep = {k: v for k, v in state.items() if not k.startswith(("prompt_encoder.", "mask_decoder."))}
    return keep, {k: v for k, v in expected.items() if k.startswith("image_encoder.")}


def _unreadable(path: Path, err: Exception, flag: str) -> str:
    """One line for a file ``torch.load(weights_only=True)`` refused, naming the file.

    torch's own message is not shown: it is many lines, loses the file name, and for a pickle with
    other objects than tensors advises ``weights_only=False``, which runs any code the file holds.
    """
    name = str(path)
    if isinstance(err, pickle.UnpicklingError) and "Unsupported global" in str(err):
        return (
            f"Cannot read SAM checkpoint {name!r}: it holds Python objects other than tensors, refused "
            "(samflow loads checkpoints with weights_only=True and never runs code from them); pass the "
            "segment-anything .pth file, or re-save the state dict with torch.save(model.state_dict(), ...)."
        )
    size = path.stat().st_size
    kind = "an empty file" if size == 0 else "truncated, or not written by torch.save"
    return (
        f"Cannot read SAM checkpoint {name!r}: it is not a PyTorch checkpoint ({kind}, {size} bytes); pass the "
        f"segment-anything .pth file (e.g. sam_vit_b_01ec64.pth) with {flag}, or download it again."
    )


def _resize_position_tables(state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    """Interpolate absolute position embeddings and relative-position tables to a new image size."""
    key = "image_encoder.pos_embed"
    if (
        key in state
        and key in expected
        and state[key].shape != expected[key].shape
        and state[key].shape[-1] == expected[key].shape[-1]
    ):
        grid = expected[key].shape[1:3]
        table = state[key].permute(0, 3, 1, 2)
        table = torch.nn.functional.interpolate(table, size=grid, mode="bicubic", align_corners=False)
        state[key] = table.permute(0, 2, 3, 1)
    for name, target in expected.items():
        if (
            "rel_pos" in name
            and name in state
            and state[name].shape != target.shape
            and state[name].shape[-1] == target.shape[-1]
        ):
            table = state[name].T.unsqueeze(0)
            table = torch.nn.functional.interpolate(table, size=target.shape[0], mode="linear")
            state[name] = table[0].T


def _short(items: list[str], limit: int = 8) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", ... (+{len(items) - limit} more)" if len(items) > limit else "") if items else "none"


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters of ``module`` (only those with ``requires_grad`` when asked)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)
