"""Prompt samplers: where they draw, what empty masks give, determinism, and ``build_prompt``."""

from __future__ import annotations

import pytest
import torch
from jsonargparse import ArgumentError, ArgumentParser

from samflow.data import (
    BoxPrompt,
    MixedPrompt,
    NoisyMaskPrompt,
    NoPrompt,
    PointPrompt,
    SegmentationDataModule,
    build_prompt,
    mask_to_box,
)
from samflow.data.prompts import PromptDict, PromptSampler


class CenterPoint(PromptSampler):
    """A third party's sampler: one positive point at the mask's centre of mass."""

    def __init__(self, label: int = 1) -> None:
        self.label = label

    def __call__(self, mask: torch.Tensor, generator: torch.Generator) -> PromptDict:
        yx = mask.nonzero().float().mean(0)
        return {"points": yx.flip(-1)[None], "point_labels": torch.tensor([self.label])}


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture
def square() -> torch.Tensor:
    mask = torch.zeros(20, 30, dtype=torch.bool)  # (H, W)
    mask[4:10, 5:15] = True  # rows 4..9, columns 5..14
    return mask


def test_box_is_tight_with_inclusive_corners(square: torch.Tensor) -> None:
    out = BoxPrompt()(square, _gen())
    torch.testing.assert_close(out["box"], torch.tensor([5.0, 4.0, 14.0, 9.0]))


def test_box_jitter_stays_near_the_box_and_in_the_image(square: torch.Tensor) -> None:
    boxes = torch.stack([BoxPrompt(jitter=0.2)(square, _gen(s))["box"] for s in range(200)])
    # width 10, height 6: moves of at most 2 px in x and 1.2 px in y.
    moves = (boxes - torch.tensor([5.0, 4.0, 14.0, 9.0])).abs().amax(0)
    assert (moves <= torch.tensor([2, 1.2, 2, 1.2])).all()
    assert boxes.std(0).gt(0).all()
    big = BoxPrompt(jitter=5.0)
    boxes = torch.stack([big(square, _gen(s))["box"] for s in range(50)])
    assert boxes[:, 0::2].min() >= 0 and boxes[:, 0::2].max() <= 29
    assert boxes[:, 1::2].min() >= 0 and boxes[:, 1::2].max() <= 19
    assert (boxes[:, 2:] >= boxes[:, :2]).all()


def test_box_on_empty_mask_is_absent_or_the_whole_image() -> None:
    empty = torch.zeros(20, 30, dtype=torch.bool)
    assert BoxPrompt()(empty, _gen()) == {}
    full = BoxPrompt(empty="full")(empty, _gen())["box"]
    torch.testing.assert_close(full, torch.tensor([0.0, 0.0, 29.0, 19.0]))
    assert mask_to_box(empty) is None


def test_points_fall_inside_and_outside(square: torch.Tensor) -> None:
    out = PointPrompt(positive=3, negative=2)(square, _gen())
    assert out["points"].shape == (5, 2) and out["point_labels"].tolist() == [1, 1, 1, 0, 0]
    x, y = out["points"].long().unbind(-1)
    assert square[y, x].tolist() == [True, True, True, False, False]


def test_points_on_empty_mask_are_negatives_and_on_full_mask_padding() -> None:
    empty = torch.zeros(8, 8, dtype=torch.bool)
    out = PointPrompt(positive=2, negative=1)(empty, _gen())
    assert out["point_labels"].tolist() == [0, 0, 0]
    full = torch.ones(8, 8, dtype=torch.bool)
    out = PointPrompt(positive=1, negative=2)(full, _gen())
    assert out["point_labels"].tolist() == [1, -1, -1]


def test_same_generator_seed_gives_same_prompt(square: torch.Tensor) -> None:
    sampler = PointPrompt(positive=4, negative=4)
    torch.testing.assert_close(sampler(square, _gen(3))["points"], sampler(square, _gen(3))["points"])
    assert not torch.equal(sampler(square, _gen(3))["points"], sampler(square, _gen(4))["points"])


def test_noisy_mask_changes_only_the_boundary_band() -> None:
    mask = torch.zeros(100, 100, dtype=torch.bool)
    mask[20:80, 20:80] = True
    noisy = NoisyMaskPrompt(band=0.05, std=1.0)(mask, _gen())["mask_prompt"]  # band radius 5 px
    changed = noisy ^ mask
    assert changed.any()
    rows, cols = changed.nonzero().unbind(-1)
    dist = torch.minimum((rows - 19.5).abs(), (rows - 79.5).abs())
    dist = torch.minimum(dist, torch.minimum((cols - 19.5).abs(), (cols - 79.5).abs()))
    assert dist.max() <= 5.5  # every change is within 5 px of the square's edge
    assert noisy[30:70, 30:70].all() and not noisy[:10].any()


def test_mixed_draws_by_weight() -> None:
    mask = torch.zeros(10, 10, dtype=torch.bool)
    mask[2:5, 2:5] = True
    only_points = MixedPrompt(["box", "points"], weights=[0.0, 1.0])
    assert all("points" in only_points(mask, _gen(s)) for s in range(20))
    both = MixedPrompt(["box", {"name": "points"}])
    kinds = {next(iter(both(mask, _gen(s)))) for s in range(40)}
    assert kinds == {"box", "points"}


def test_build_prompt_from_names_and_dicts() -> None:
    assert isinstance(build_prompt("none"), NoPrompt) and isinstance(build_prompt(None), NoPrompt)
    assert build_prompt({"name": "box", "jitter": 0.1}).jitter == 0.1
    points = build_prompt({"name": "points", "positive": 2, "negative": 1})
    assert (points.positive, points.negative) == (2, 1)
    assert isinstance(build_prompt("noisy_mask"), NoisyMaskPrompt)
    mixed = build_prompt({"name": "mixed", "samplers": ["box", "noisy_mask"], "weights": [1, 3]})
    assert isinstance(mixed.samplers[1], NoisyMaskPrompt)
    sampler = BoxPrompt()
    assert build_prompt(sampler) is sampler


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("boxes", "Unknown prompt 'boxes'"),
        ({"jitter": 0.1}, "no 'name' key"),
        ({"name": "box", "jiter": 0.1}, "bad arguments"),
        ({"name": "points", "positive": 0, "negative": 0}, "at least one point"),
        ({"name": "mixed", "samplers": ["box"], "weights": [1, 2]}, "one non-negative weight"),
    ],
)
def test_build_prompt_errors_say_what_is_wrong(spec: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build_prompt(spec)


def test_build_prompt_from_class_path_specs() -> None:
    box = build_prompt({"class_path": "BoxPrompt", "init_args": {"jitter": 0.1}})
    assert isinstance(box, BoxPrompt) and box.jitter == 0.1
    assert isinstance(build_prompt({"class_path": "samflow.data.prompts.NoisyMaskPrompt"}), NoisyMaskPrompt)
    assert isinstance(build_prompt("PointPrompt"), PointPrompt)  # a class name alone: its defaults
    mixed = build_prompt(
        {"class_path": "MixedPrompt", "init_args": {"samplers": ["box", {"class_path": "PointPrompt"}]}}
    )
    assert [type(s) for s in mixed.samplers] == [BoxPrompt, PointPrompt]


def test_a_third_party_sampler_by_class_name_or_path(square: torch.Tensor) -> None:
    by_name = build_prompt({"class_path": "CenterPoint", "init_args": {"label": 0}})
    assert isinstance(by_name, CenterPoint) and by_name.label == 0
    by_path = build_prompt(f"{CenterPoint.__module__}.CenterPoint")
    torch.testing.assert_close(by_path(square, _gen())["points"], torch.tensor([[9.5, 6.5]]))
    assert isinstance(
        build_prompt({"name": "mixed", "samplers": ["box", "CenterPoint"]}).samplers[1], CenterPoint
    )


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"class_path": "BoxPrompt", "init_args": {"jiter": 0.1}}, r"data.prompt: .*'jiter' is not accepted"),
        (
            {"class_path": "torch.nn.Linear"},
            r"data.prompt: .*does not correspond to a subclass of PromptSampler",
        ),
        ({"class_path": "my_pkg.Nope"}, r"data.prompt: .*No module named 'my_pkg'"),
        ({"class_path": "BoxPrompt", "init_args": {"jitter": -1}}, r"data.prompt: .*jitter must be >= 0"),
    ],
)
def test_class_path_errors_name_the_key(spec: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build_prompt(spec, key="data.prompt")


def test_the_data_module_takes_every_form_from_a_config() -> None:
    """jsonargparse builds the class_path forms (nested ones too); the aliases still work."""
    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(SegmentationDataModule, "data")

    def built(value: object, key: str = "prompt") -> object:
        config = parser.parse_object({"data": {key: value, "augment": None}})
        return getattr(parser.instantiate(config).data, key)

    assert isinstance(built("box"), BoxPrompt) and isinstance(built("none"), NoPrompt)
    assert built({"name": "points", "positive": 2}).positive == 2
    assert built({"class_path": "BoxPrompt", "init_args": {"jitter": 0.3}}).jitter == 0.3
    assert isinstance(built("CenterPoint", "eval_prompt"), CenterPoint)
    mixed = built(
        {"class_path": "MixedPrompt", "init_args": {"samplers": [{"class_path": "CenterPoint"}, "box"]}}
    )
    assert [type(s) for s in mixed.samplers] == [CenterPoint, BoxPrompt]

    # Checked when the config is parsed, with jsonargparse's own message about the class.
    with pytest.raises(ArgumentError, match=r"(?s)prompt.*BoxPrompt.*Option 'jiter' is not accepted"):
        built({"class_path": "BoxPrompt", "init_args": {"jiter": 0.3}})
    with pytest.raises(ArgumentError, match=r"(?s)prompt.*expected \{name: "):
        built({"jitter": 0.3})
    with pytest.raises(ValueError, match=r"data.prompt: prompt 'box' \(BoxPrompt\): bad arguments"):
        built({"name": "box", "jiter": 0.3})


def test_a_plain_function_becomes_a_sampler(square: torch.Tensor) -> None:
    def corner(mask: torch.Tensor, generator: torch.Generator) -> PromptDict:
        return {"box": torch.tensor([0.0, 0.0, 1.0, 1.0])}

    sampler = build_prompt(corner)
    assert isinstance(sampler, PromptSampler)
    torch.testing.assert_close(sampler(square, _gen())["box"], torch.tensor([0.0, 0.0, 1.0, 1.0]))
