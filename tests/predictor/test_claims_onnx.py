"""README claims of "ONNX: the decoder side for any runtime" not proven elsewhere: the graph is written
at opset 17, and exactly the plugins the README lists declare ``onnx_exportable``."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from samflow.onnx_export import export_onnx
from samflow.plugins.registry import discover
from samflow.sam import HookedSam

onnx = pytest.importorskip("onnx")

README = Path(__file__).resolve().parents[2] / "README.md"


def test_the_graph_is_written_at_opset_17(tiny_sam, tmp_path):
    path = export_onnx(HookedSam(tiny_sam), tmp_path / "decoder.onnx")
    graph = onnx.load(str(path))
    assert {o.domain: o.version for o in graph.opset_import}[""] == 17


def test_the_exportable_plugins_are_the_readmes():
    text = README.read_text().split("### ONNX: the decoder side for any runtime", 1)[1]
    sentence = text[text.index("Plugins opt in") :].split("(`tests/predictor/test_onnx_export.py`)")[0]
    said_yes, said_no = sentence.split(" do; ", 1)
    yes, no = set(re.findall(r"`(\w+)`", said_yes)), set(re.findall(r"`(\w+)`", said_no))
    yes.discard("onnx_exportable")
    builtins = {
        name: info.cls for name, info in discover().items() if info.target.startswith("samflow_plugins")
    }
    assert yes | no == set(builtins)
    assert {name for name, cls in builtins.items() if cls.onnx_exportable} == yes
