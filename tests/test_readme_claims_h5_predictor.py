"""README "Use a trained model": ``Predictor.from_run(run, checkpoint=...)`` loads the checkpoint it names
(a file name in the run's ``checkpoints/``, e.g. the best ``epoch=3-step=40-val_iou=0.8123.ckpt``, or a
path) instead of ``last.ckpt``; a name that is also a file in the working directory still means the run's
(was: the working directory's file was loaded)."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pytest
import torch

from samflow import Predictor

_spec = importlib.util.spec_from_file_location(
    "predictor_conftest", Path(__file__).parent / "predictor" / "conftest.py"
)
_conftest = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_conftest)

BEST = "epoch=3-step=40-val_iou=0.8123.ckpt"
KEY = "sam.mask_decoder.iou_token.weight"


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory) -> tuple[Path, Path]:
    """A run folder with last.ckpt and a best checkpoint of other weights; and a third run's last.ckpt."""
    plugins = {"decoder": _conftest.PLUGINS["decoder"]}
    run = _conftest.make_run(tmp_path_factory.mktemp("a"), plugins, steps=1)
    other = _conftest.make_run(tmp_path_factory.mktemp("b"), plugins, steps=3, lr=0.2)
    third = _conftest.make_run(tmp_path_factory.mktemp("c"), plugins, steps=2, lr=0.5)
    shutil.copyfile(other / "checkpoints" / "last.ckpt", run / "checkpoints" / BEST)
    return run, third / "checkpoints" / "last.ckpt"


def weight(ckpt: Path) -> torch.Tensor:
    return torch.load(ckpt, weights_only=True)["state_dict"][f"model.{KEY}"]


def loaded(predictor: Predictor) -> torch.Tensor:
    return predictor.model.state_dict()[KEY]


def test_checkpoint_names_another_checkpoint_of_the_run(two_checkpoints, tmp_path, monkeypatch):
    run, third = two_checkpoints
    last, best = weight(run / "checkpoints" / "last.ckpt"), weight(run / "checkpoints" / BEST)
    assert not torch.equal(last, best) and not torch.equal(best, weight(third))
    assert torch.equal(loaded(Predictor.from_run(run, device="cpu")), last)
    assert torch.equal(loaded(Predictor.from_run(run, checkpoint=BEST, device="cpu")), best)
    assert torch.equal(
        loaded(Predictor.from_run(run, checkpoint=third, device="cpu")), weight(third)
    )  # a path
    # the working directory holds a checkpoint of that name too: the run's is meant
    monkeypatch.chdir(tmp_path)
    shutil.copyfile(third, tmp_path / BEST)
    assert torch.equal(loaded(Predictor.from_run(run, checkpoint=BEST, device="cpu")), best)
    with pytest.raises(FileNotFoundError, match="nope.ckpt"):
        Predictor.from_run(run, checkpoint="nope.ckpt", device="cpu")
