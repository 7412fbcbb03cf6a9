"""BA-SAM (Song et al., CVPR 2024): a length-dependent attention scale and a distance-penalty mask."""

from samflow_plugins.ba_sam.bias import alibi_slopes, distance_bias, grid_distance, length_scale
from samflow_plugins.ba_sam.plugin import BASam, native_img_size, scale_at

__all__ = [
    "BASam",
    "alibi_slopes",
    "distance_bias",
    "grid_distance",
    "length_scale",
    "native_img_size",
    "scale_at",
]
