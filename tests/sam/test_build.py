"""Building SAM variants and loading checkpoints given by path."""

from __future__ import annotations

import pytest
import torch
from helpers import randomize
from segment_anything.modeling.image_encoder import get_rel_pos

from samflow.sam import VARIANTS, CheckpointError, build_sam, count_parameters, resize_sam
from samflow.sam.build import guess_variant


def test_tiny_is_small_frozen_and_in_eval_mode():
    sam = build_sam("tiny")
    assert 100_000 < count_parameters(sam) < 1_000_000
    assert count_parameters(sam, trainable_only=True) == 0
    assert not sam.training
    assert sam.image_encoder.img_size == 128


def test_same_seed_same_random_sam_and_rng_untouched():
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = build_sam("tiny", seed=5)
    after = torch.rand(1)
    b = build_sam("tiny", seed=5)
    assert torch.equal(before, after)  # building does not consume the caller's random stream
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), name


@pytest.mark.parametrize("variant", ["vit_b", "vit_l", "vit_h"])
def test_real_variants_have_the_published_shapes(variant):
    with torch.device("meta"):
        sam = build_sam(variant, seed=None)
    spec = VARIANTS[variant]
    assert len(sam.image_encoder.blocks) == spec.depth
    assert [i for i, b in enumerate(sam.image_encoder.blocks) if b.window_size == 0] == list(
        spec.global_attn_indexes
    )
    assert count_parameters(sam.mask_decoder) == 4_058_340


def test_checkpoint_round_trip(tmp_path):
    source = build_sam("tiny", seed=3)
    path = tmp_path / "tiny.pth"
    torch.save(source.state_dict(), path)
    loaded = build_sam("tiny", checkpoint=path, seed=9)
    for (name, x), (_, y) in zip(source.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(x, y), name


def test_wrong_variant_names_keys_and_the_variant_it_looks_like(tmp_path):
    with torch.device("meta"):
        vit_b = build_sam("vit_b", seed=None)
    state = {k: torch.zeros(v.shape) for k, v in vit_b.state_dict().items() if ".blocks.1." not in k}
    state["extra.weight"] = torch.zeros(1)
    path = tmp_path / "sam_vit_b.pth"
    torch.save(state, path)
    assert guess_variant(state) == "unknown (embed_dim 768, depth 11)"
    with pytest.raises(CheckpointError) as err:
        build_sam("tiny", checkpoint=path)
    message = str(err.value)
    assert "sam_vit_b.pth" in message and "variant 'tiny'" in message
    assert "missing keys" in message and "unexpected keys" in message and "extra.weight" in message


def test_guess_variant_of_a_real_layout():
    with torch.device("meta"):
        state = build_sam("vit_l", seed=None).state_dict()
    assert guess_variant(state) == "vit_l"


def test_missing_file_and_non_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pth.*--model.sam.checkpoint"):
        build_sam("tiny", checkpoint=tmp_path / "nope.pth")
    bad = tmp_path / "bad.pth"
    bad.write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match="Cannot read SAM checkpoint"):
        build_sam("tiny", checkpoint=bad)


def test_position_tables_are_resized_for_another_image_size(tmp_path):
    source = build_sam("tiny", seed=3)
    torch.save(source.state_dict(), tmp_path / "t.pth")
    bigger = build_sam("tiny", checkpoint=tmp_path / "t.pth", img_size=256)
    assert bigger.image_encoder.pos_embed.shape[1:3] == (16, 16)


def test_unknown_variant():
    with pytest.raises(ValueError, match="Unknown SAM variant 'vit_x'.*tiny"):
        build_sam("vit_x")


@pytest.mark.parametrize("img_size", [0, -16, 8])
def test_an_img_size_that_is_not_a_positive_multiple_of_the_patch_is_refused(img_size):
    with pytest.raises(
        ValueError, match=f"img_size {img_size} is not a positive multiple of the patch size 16"
    ):
        build_sam("tiny", img_size=img_size)


class _NotATensor:
    """A class a pickle names: torch.load(weights_only=True) must refuse it, not import and build it."""


def test_truncated_files_and_pickled_objects_are_refused_naming_the_file(tmp_path):
    torch.save(build_sam("tiny", seed=3).state_dict(), tmp_path / "full.pth")
    data = (tmp_path / "full.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"'.*cut\.pth'.*not a PyTorch checkpoint \(truncated"):
        build_sam("tiny", checkpoint=tmp_path / "cut.pth")
    torch.save({"image_encoder.pos_embed": _NotATensor()}, tmp_path / "code.pth")
    with pytest.raises(CheckpointError, match=r"'.*code\.pth'.*Python objects other than tensors, refused"):
        build_sam("tiny", checkpoint=tmp_path / "code.pth")


def test_a_dict_of_other_values_than_tensors_is_refused_naming_the_file_and_keys(tmp_path):
    state = dict(build_sam("tiny", seed=3).state_dict())
    state["image_encoder.pos_embed"] = "a string"
    torch.save(state, tmp_path / "odd.pth")
    with pytest.raises(
        CheckpointError,
        match=r"'.*odd\.pth' is not a state dict of tensors: image_encoder\.pos_embed \(str\)",
    ):
        build_sam("tiny", checkpoint=tmp_path / "odd.pth")


def test_global_rel_pos_tables_are_resized_as_sams_get_rel_pos_and_window_tables_kept(tmp_path):
    """At img_size 256 the tiny grid is 16: global blocks' tables go from 15 to 31 rows by SAM's own
    linear interpolation (``get_rel_pos``), windowed blocks keep their 7, and the result is
    ``resize_sam`` of the loaded SAM."""
    source = randomize(build_sam("tiny", seed=3))
    torch.save(source.state_dict(), tmp_path / "t.pth")
    bigger = build_sam("tiny", checkpoint=tmp_path / "t.pth", img_size=256)
    for old, new in zip(source.image_encoder.blocks, bigger.image_encoder.blocks, strict=True):
        for name in ("rel_pos_h", "rel_pos_w"):
            table = getattr(old.attn, name)
            if old.window_size:
                assert torch.equal(getattr(new.attn, name), table)
            else:
                assert getattr(new.attn, name).shape == (31, table.shape[1])
                # SAM run on the 16 x 16 grid with the old table interpolates it itself, to the same values
                ours, sams = get_rel_pos(16, 16, getattr(new.attn, name)), get_rel_pos(16, 16, table)
                torch.testing.assert_close(ours, sams, atol=1e-6, rtol=0)
    for (key, a), (_, b) in zip(
        bigger.state_dict().items(), resize_sam(source, 256).state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), key
