"""Data for samflow: image / mask folders, prompt samplers, SAM's input geometry and GPU augmentation.

- ``MaskFolderDataset`` reads image / mask pairs and brings them into the model's S x S frame;
- ``prompts`` draws boxes, points or noisy masks from the ground truth (``build_prompt``);
- ``collate`` builds the batch whose contract is documented in ``samflow.data.batch``;
- ``GpuAugment`` augments a batch on the device (kornia);
- ``SegmentationDataModule`` puts it together for Lightning; ``make_quickstart_data`` writes a small
  procedural dataset so that everything runs without a download.
"""

from samflow.data.batch import collate
from samflow.data.datamodule import SegmentationDataModule
from samflow.data.errors import DataError
from samflow.data.folder import MaskFolderDataset
from samflow.data.listing import Sample, find_samples
from samflow.data.prompts import (
    PROMPTS,
    BoxPrompt,
    MixedPrompt,
    NoisyMaskPrompt,
    NoPrompt,
    PointPrompt,
    build_prompt,
    mask_to_box,
)
from samflow.data.quickstart import make_quickstart_data
from samflow.data.reading import read_image, read_mask
from samflow.data.transforms import (
    GpuAugment,
    input_shape,
    longest_side_shape,
    pad_to_square,
    resize_longest_side,
    scale_boxes,
    scale_coords,
    stretch,
    to_input_frame,
)

__all__ = [
    "PROMPTS",
    "BoxPrompt",
    "DataError",
    "GpuAugment",
    "MaskFolderDataset",
    "MixedPrompt",
    "NoPrompt",
    "NoisyMaskPrompt",
    "PointPrompt",
    "Sample",
    "SegmentationDataModule",
    "build_prompt",
    "collate",
    "find_samples",
    "input_shape",
    "longest_side_shape",
    "make_quickstart_data",
    "mask_to_box",
    "pad_to_square",
    "read_image",
    "read_mask",
    "resize_longest_side",
    "scale_boxes",
    "scale_coords",
    "stretch",
    "to_input_frame",
]
