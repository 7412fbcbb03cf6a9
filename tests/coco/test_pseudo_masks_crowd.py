"""``samflow pseudo-masks`` keeps each source annotation's ``iscrowd``: with ``crowd: keep`` the crowd
region of the tiny COCO set (annotation 99, ``iscrowd: 1``) is a prompt row, and its pseudo mask must
still say ``iscrowd: 1`` (it was written as 0, so the student trained on it as an ordinary instance)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("pycocotools")
from tiny_coco import make_tiny_coco

from samflow.data.coco import CocoInstances
from samflow.proposals import write_proposals
from samflow.pseudo_masks import write_pseudo_masks
from samflow.sam import build_sam

CROWD_ID = 99  # tiny_coco's crowd region on image 1


class _FirstProposal(torch.nn.Module):
    """A selection plugin's stand-in: every row picks its bag's first proposal."""

    def __init__(self) -> None:
        super().__init__()
        self.model = torch.nn.Module()
        self.model.sam = build_sam("tiny", seed=0)
        self.plugins = SimpleNamespace(losses=lambda *args: None)

    def forward(self, batch):
        report = SimpleNamespace(pseudo_index=torch.zeros(batch.num_rows, dtype=torch.long))
        return SimpleNamespace(extras={"first": report}), None


@pytest.fixture(scope="module")
def kept(tmp_path_factory):
    """The tiny set read with crowd: keep, and its proposal store."""
    root = tmp_path_factory.mktemp("crowd")
    annotations, _ = make_tiny_coco(root / "coco")
    plain = CocoInstances(annotations, img_size=128, crowd="keep")
    write_proposals(root / "store", build_sam("tiny", seed=0), plain, shard_size=4)
    return annotations, CocoInstances(annotations, img_size=128, crowd="keep", proposals=root / "store")


def test_a_kept_crowd_region_stays_a_crowd_region(kept, tmp_path) -> None:
    annotations, dataset = kept
    out = tmp_path / "pseudo.json"
    write_pseudo_masks(_FirstProposal(), dataset, out)
    written = {a["id"]: a for a in json.loads(out.read_text())["annotations"]}
    source = {a["id"]: a for a in json.loads(annotations.read_text())["annotations"]}
    assert set(written) == set(source)  # crowd: keep makes every annotation a row
    assert {i: a["iscrowd"] for i, a in written.items()} == {i: a["iscrowd"] for i, a in source.items()}
    assert written[CROWD_ID]["iscrowd"] == 1 and sum(a["iscrowd"] for a in written.values()) == 1
