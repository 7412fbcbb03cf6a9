"""Whole-slide images for two-resolution training (WSI-SAM): reading at a given mpp, annotations,
tissue detection, concentric HR / LR patches and pre-extracted pairs. Needs ``samflow[wsi]``."""

from samflow.data.wsi.annotations import load_annotations, load_label_mask, rasterize
from samflow.data.wsi.datamodule import SlideDataModule
from samflow.data.wsi.folder import PatchPairFolder
from samflow.data.wsi.patches import CentreSizeBoxPrompt, SlidePatches, context_affine, wsi_sam_prompts
from samflow.data.wsi.slide import Slide, SlideError
from samflow.data.wsi.tissue import saturation, tissue_mask

__all__ = [
    "CentreSizeBoxPrompt",
    "PatchPairFolder",
    "Slide",
    "SlideDataModule",
    "SlideError",
    "SlidePatches",
    "context_affine",
    "load_annotations",
    "load_label_mask",
    "rasterize",
    "saturation",
    "tissue_mask",
    "wsi_sam_prompts",
]
