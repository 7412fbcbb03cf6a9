"""SAPNet (Wei et al., CVPR 2024): semantic-aware selection among SAM's point proposals."""

from .net import SapnetResult, SelectionNet
from .plugin import SAPNet

__all__ = ["SAPNet", "SapnetResult", "SelectionNet"]
