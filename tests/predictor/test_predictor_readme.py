"""The README's "Use a trained model" section runs as written, on a trained tiny run."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save

from samflow.cli import main
from samflow.export import trained_state
from samflow.plugins import PluginStack
from samflow.plugins.registry import discover
from samflow.sam import HookedSam, build_sam

README = Path(__file__).resolve().parents[2] / "README.md"


def section(title: str) -> str:
    text = README.read_text()
    start = text.index(f"## {title}\n")
    return text[start : text.index("\n## ", start + 1)]


def test_use_a_trained_model_section_runs(trained_run, tmp_path, monkeypatch):
    text = section("Use a trained model")
    (tmp_path / "runs" / "quickstart").mkdir(parents=True)
    (tmp_path / "runs" / "quickstart" / "version_0").symlink_to(trained_run)
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (96, 140, 3), dtype=np.uint8)).save(
        tmp_path / "photo.jpg"
    )
    monkeypatch.chdir(tmp_path)
    command = "samflow export runs/quickstart/version_0 --out exports/quickstart"
    assert command in text
    assert main(command.split()[1:]) == 0
    onnx_command = "samflow export runs/quickstart/version_0 --out exports/quickstart_onnx --onnx"
    assert onnx_command in text
    assert main(onnx_command.split()[1:]) == 0
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL)
    assert len(blocks) == 3
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, str(README), "exec"), namespace)  # noqa: S102 - the README, as written
    assert namespace["masks"].shape[-2:] == (96, 140)
    assert namespace["boxes"].shape == (2, 4)
    encoding, from_export = namespace["encoding"], namespace["predictor"]
    assert encoding.original_size == (96, 140)
    assert from_export.model.plugins["tokens"].num_tokens == 1  # the exported run's plugins
    # the ONNX block: the graph's outputs are the predictor's, for the README's box
    expected = from_export.predict(box=np.array([30, 20, 100, 90]), encoding=encoding, return_logits=True)
    got = [namespace["masks"], namespace["scores"], namespace["low_res"]]
    assert got[0].shape == (1, *expected[0].shape)
    for ours, want in zip(got, expected, strict=True):
        np.testing.assert_allclose(ours[0], want, atol=1e-4, rtol=0)


BUILT_IN = [
    "ba_sam",
    "decoder_tuning",
    "hq_sam",
    "lora",
    "pa_sam",
    "sam_adapter",
    "sapnet",
    "tokens",
    "wsi_sam",
]


def test_adapter_size_table_lists_every_built_in_plugin():
    rows = re.findall(
        r"^\| `(\w+)` \| \d+ \| [\d,]+ \| [\d.]+ (?:bytes|MiB) \|$",
        section("Use a trained model"),
        re.MULTILINE,
    )
    built_in = sorted(n for n, info in discover().items() if info.distribution == "samflow")
    assert rows == built_in == BUILT_IN


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("plugin", BUILT_IN)
def test_adapter_size_table(plugin):
    """The README's row (from benchmarks/adapter_sizes.py) of each built-in plugin on vit_b shapes:
    tensors, values and the file's size (bytes, or MiB to two decimals)."""
    pattern = rf"^\| `{plugin}` \| (\d+) \| ([\d,]+) \| ([\d.]+) (bytes|MiB) \|$"
    row = re.search(pattern, section("Use a trained model"), flags=re.MULTILINE)
    assert row, plugin
    with torch.device("meta"):
        sam = build_sam("vit_b", seed=None)
    sam = sam.to_empty(device="cpu")
    torch.manual_seed(0)  # plugins initialise their tensors (values do not change the size)
    model = HookedSam(sam, PluginStack({plugin: discover()[plugin].cls()}))
    tensors = {k: v.detach().contiguous().clone() for k, v in trained_state(model).items()}
    size = len(save(tensors))
    assert int(row[1]) == len(tensors)
    assert int(row[2].replace(",", "")) == sum(t.numel() for t in tensors.values())
    assert float(row[3]) == (size if row[4] == "bytes" else round(size / 2**20, 2))


def test_command_line_prompts_section_runs(trained_run, tmp_path, monkeypatch, capsys):
    """The README's `samflow predict --prompts` command on its JSON example, and its CSV example reads
    the same prompts."""
    from samflow.prompt_files import read_prompts

    text = section("Use a trained model")
    (tmp_path / "runs" / "quickstart").mkdir(parents=True)
    (tmp_path / "runs" / "quickstart" / "version_0").symlink_to(trained_run)
    (tmp_path / "photos").mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (96, 140, 3), dtype=np.uint8)).save(
        tmp_path / "photos" / "photo.jpg"
    )
    monkeypatch.chdir(tmp_path)
    (tmp_path / "prompts.json").write_text(re.search(r"```json\n(.*?)```", text, flags=re.DOTALL).group(1))
    (tmp_path / "prompts.csv").write_text(re.search(r"```csv\n(.*?)```", text, flags=re.DOTALL).group(1))
    command = "samflow predict --model runs/quickstart/version_0 --images photos --prompts prompts.json --out predictions"
    assert command in text
    assert main([*command.split()[1:], "--device", "cpu"]) == 0
    assert sorted(p.name for p in Path("predictions/masks").iterdir()) == ["photo_0.png", "photo_1.png"]
    assert np.asarray(Image.open("predictions/masks/photo_0.png")).shape == (96, 140)
    assert "outputs in" in capsys.readouterr().out
    from_json = read_prompts(Path("prompts.json"), Path("photos"))[0].prompts
    from_csv = read_prompts(Path("prompts.csv"), Path("photos"))[0].prompts
    for a, b in zip(from_json, from_csv, strict=True):
        for key in ("box", "points", "labels"):
            assert (getattr(a, key) is None) == (getattr(b, key) is None)
            if getattr(a, key) is not None:
                np.testing.assert_array_equal(getattr(a, key), getattr(b, key))
