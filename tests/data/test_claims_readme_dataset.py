"""README, "A real dataset": its example config builds the data module as written (with its `/data/`
folders made here): several train roots concatenated, a val root with other folder names, and every
option the example sets is one `SegmentationDataModule` takes with the value shown."""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace

import yaml

from samflow.data import SegmentationDataModule

README = Path(__file__).resolve().parents[2] / "README.md"


def readme_data_config() -> dict:
    section = README.read_text(encoding="utf-8").split("### A real dataset", 1)[1]
    block = re.search(r"```yaml\n(.*?)```", section, flags=re.DOTALL)
    assert block, "the README's example changed: update this test"
    return yaml.safe_load(block.group(1))["data"]


def test_the_readme_example_config_builds_and_reads(tmp_path: Path, pngs: SimpleNamespace) -> None:
    data = readme_data_config()
    assert data["class_path"] == "samflow.data.SegmentationDataModule"
    init = yaml.safe_load(yaml.safe_dump(data["init_args"]).replace("/data/", f"{tmp_path}/"))
    pngs.pairs(tmp_path / "COD10K" / "train", ["cod_a", "cod_b"])
    pngs.pairs(tmp_path / "CAMO" / "train", ["camo_a"])
    for stem in ("t1", "t2"):
        pngs.image(tmp_path / "COD10K" / "test" / "Imgs" / f"{stem}.png", 12, 16)
        pngs.mask(tmp_path / "COD10K" / "test" / "GT" / f"{stem}.png", 12, 16, (2, 3, 6, 7))
    init["img_size"] = 64  # 1024 in the README; small here
    dm = SegmentationDataModule(**init)
    dm.setup("fit")
    assert [s.id for s in dm.datasets["train"].samples] == ["cod_a", "cod_b", "camo_a"]  # concatenated
    assert [s.id for s in dm.datasets["val"].samples] == ["t1", "t2"]  # Imgs / GT
    item = dm.datasets["train"][0]
    assert item["image"].shape == (3, 64, 64)
    assert dm.augment is not None  # augment: {hflip: 0.5}
