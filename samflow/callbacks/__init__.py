"""Callbacks a samflow run uses by default."""

from samflow.callbacks.finite import NonFiniteCheck, NonFiniteError
from samflow.callbacks.mask_writer import MaskWriter
from samflow.callbacks.report import ImprovementReport, TestReport
from samflow.callbacks.sample_drawing import sample_grid
from samflow.callbacks.samples import SampleGrid

__all__ = [
    "ImprovementReport",
    "MaskWriter",
    "NonFiniteCheck",
    "NonFiniteError",
    "SampleGrid",
    "TestReport",
    "sample_grid",
]
