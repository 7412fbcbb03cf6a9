"""samflow export: a small adapter folder loaded without pickle, and merged SAM checkpoints."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from segment_anything import sam_model_registry

from samflow import Predictor
from samflow.cli import main
from samflow.export import ExportError, file_sha256, load_export, merged_sam_state_dict
from samflow.plugins import PluginStack
from samflow.sam import HookedSam, build_sam, resize_sam
from samflow_plugins.decoder_tuning import DecoderTuning
from samflow_plugins.lora import LoRA

BOX = np.array([20, 10, 100, 70])


def image(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (90, 150, 3), dtype=np.uint8)


def outputs(predictor: Predictor) -> tuple[np.ndarray, ...]:
    predictor.set_image(image())
    return predictor.predict(box=BOX, return_logits=True)


@pytest.fixture(scope="module")
def exported(trained_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "adapter"
    assert main(["export", str(trained_run), "--out", str(out)]) == 0
    return out


def test_adapter_holds_exactly_the_trained_tensors(trained_run, exported):
    state = torch.load(trained_run / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    adapter = load_file(exported / "adapter.safetensors")
    assert set(adapter) == {k.removeprefix("model.") for k in state}
    assert not any(k.startswith("sam.image_encoder") for k in adapter)
    for key, value in adapter.items():
        assert torch.equal(value, state[f"model.{key}"]), key
    manifest = json.loads((exported / "samflow.json").read_text())
    sam_file = trained_run.parents[2] / "sam_tiny.pth"
    assert manifest["sam"] == {
        "variant": "tiny",
        "img_size": 128,
        "checkpoint_name": "sam_tiny.pth",
        "checkpoint_sha256": file_sha256(sam_file),
        "seed": 0,
    }
    assert manifest["plugins"]["decoder"]["name"] == "decoder_tuning"
    assert manifest["plugins"]["tokens"]["distribution"] == "samflow" and manifest["samflow_version"]
    assert manifest["adapter"]["values"] == sum(v.numel() for v in adapter.values())
    assert (exported / "config.yaml").read_text() == (trained_run / "config.yaml").read_text()


def test_from_export_equals_from_run_without_pickle(trained_run, exported, monkeypatch):
    expected = outputs(Predictor.from_run(trained_run, device="cpu"))
    loaded = []
    real_load = torch.load

    def spy(path, *args, **kwargs):
        loaded.append((str(path), kwargs.get("weights_only")))
        return real_load(path, *args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    got = outputs(Predictor.from_export(exported, device="cpu"))
    # torch.load ran once, on SAM's own .pth, weights only; the adapter is safetensors, the rest text
    assert loaded == [(str(trained_run.parents[2] / "sam_tiny.pth"), True)]
    for a, b in zip(got, expected):
        np.testing.assert_array_equal(a, b)


def test_another_sam_checkpoint_is_refused_unless_forced(exported, tmp_path):
    other = tmp_path / "other.pth"
    torch.save(build_sam("tiny", seed=1).state_dict(), other)
    with pytest.raises(ExportError, match="trained on sam_tiny.pth .*other.pth"):
        load_export(exported, sam_checkpoint=other)
    with pytest.warns(UserWarning, match="forced"):
        model, _ = load_export(exported, sam_checkpoint=other, force=True)
    assert torch.equal(
        model.sam.image_encoder.patch_embed.proj.weight,
        build_sam("tiny", seed=1).image_encoder.patch_embed.proj.weight,
    )


def test_cli_refuses_overwrite_and_unmergeable_plugins(trained_run, exported, capsys):
    assert main(["export", str(trained_run), "--out", str(exported)]) == 1
    assert "exist already; pass --overwrite" in capsys.readouterr().err
    assert main(["export", str(trained_run), "--out", str(exported), "--overwrite"]) == 0
    assert main(["export", str(trained_run), "--out", str(exported / "m"), "--merged"]) == 1
    err = capsys.readouterr().err
    assert "Plugin 'tokens' (ExtraTokens) cannot be merged" in err and "decode_token" in err


def test_merged_decoder_tuning_run_is_a_plain_sam_checkpoint(decoder_run, tmp_path):
    assert (
        main(["export", str(decoder_run / "checkpoints" / "last.ckpt"), "--out", str(tmp_path), "--merged"])
        == 0
    )
    plain = build_sam("tiny", tmp_path / "sam_merged.pth")  # strict keys and shapes
    expected = outputs(Predictor.from_run(decoder_run, device="cpu"))
    got = outputs(Predictor(HookedSam(plain), device="cpu"))
    np.testing.assert_allclose(got[0], expected[0], atol=1e-5, rtol=0)
    np.testing.assert_allclose(got[1], expected[1], atol=1e-5, rtol=0)


@pytest.mark.parametrize("dropout", [0.0, 0.5])  # the per-image dropout is no hook: merged alike
def test_merged_lora_folds_its_deltas(tiny_sam, dropout):
    model = HookedSam(tiny_sam, PluginStack({"lora": LoRA(rank=2, blocks=[1, 3], dropout=dropout)}))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1)
    merged = merged_sam_state_dict(model)
    plain = build_sam("tiny", seed=5)
    plain.load_state_dict(merged, strict=True)
    a = outputs(Predictor(model, device="cpu"))
    b = outputs(Predictor(HookedSam(plain), device="cpu"))
    np.testing.assert_allclose(b[0], a[0], atol=1e-4, rtol=0)


@pytest.mark.filterwarnings("ignore:.*copying from a non-meta parameter")
def test_merged_vit_b_loads_with_sam_model_registry(tmp_path):
    """segment-anything's own builder reads the merged file as is (vit_b shapes; its strict key and
    shape check runs on the meta device, so no 90M-parameter initialisation is paid)."""
    with torch.device("meta"):
        sam = build_sam("vit_b", seed=None)
    sam = sam.to_empty(device="cpu")
    with torch.no_grad():
        for i, tensor in enumerate(sam.state_dict().values()):
            tensor.fill_(i * 1e-3)
    model = HookedSam(sam, PluginStack({"decoder": DecoderTuning()}))
    with torch.no_grad():
        model.sam.mask_decoder.iou_token.weight.add_(1.0)  # "trained"
    path = tmp_path / "sam_merged.pth"
    torch.save(merged_sam_state_dict(model), path)
    with torch.device("meta"):
        sam_model_registry["vit_b"](checkpoint=str(path))  # raises on any missing / unexpected key or shape
    saved = torch.load(path, weights_only=True)
    ours = model.sam.state_dict()
    assert set(saved) == set(ours) and all(torch.equal(saved[k], ours[k]) for k in ours)
    with pytest.raises(ExportError, match="64 px inputs; segment-anything's tiny takes 128"):
        merged_sam_state_dict(HookedSam(resize_sam(build_sam("tiny"), 64)))


def test_an_out_that_is_a_file_or_the_run_folder_is_refused_in_one_line(trained_run, tmp_path, capsys):
    """Before anything is written: an --out that is a file (a traceback), or the run folder itself (its
    config.yaml would be copied onto itself: a traceback after adapter.safetensors was written there)."""
    a_file = tmp_path / "out.txt"
    a_file.write_text("mine")
    assert main(["export", str(trained_run), "--out", str(a_file)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(a_file) in err[0] and "--out" in err[0]
    assert a_file.read_text() == "mine"
    before = sorted(p.name for p in trained_run.iterdir())
    assert main(["export", str(trained_run), "--out", str(trained_run), "--overwrite"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--out" in err[0] and "run folder" in err[0]
    assert sorted(p.name for p in trained_run.iterdir()) == before


def test_overwrite_replaces_the_whole_earlier_export(trained_run, decoder_run, tmp_path, capsys):
    """--overwrite replaces an earlier export: its decoder.onnx (or sam_merged.pth), which the new export
    does not write, is removed rather than left beside a samflow.json that no longer describes it; and
    another kind of export into a folder that holds one is refused unless --overwrite."""
    out = tmp_path / "export"
    assert main(["export", str(decoder_run), "--out", str(out), "--onnx"]) == 0
    assert main(["export", str(trained_run), "--out", str(out), "--overwrite"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["adapter.safetensors", "config.yaml", "samflow.json"]
    # a refused export (a plugin that cannot be merged) leaves the earlier one as it was
    assert main(["export", str(trained_run), "--out", str(out), "--merged", "--overwrite"]) == 1
    assert sorted(p.name for p in out.iterdir()) == ["adapter.safetensors", "config.yaml", "samflow.json"]
    capsys.readouterr()
    assert main(["export", str(decoder_run), "--out", str(out), "--merged"]) == 1
    assert "exist already; pass --overwrite" in capsys.readouterr().err
    assert main(["export", str(decoder_run), "--out", str(out), "--merged", "--overwrite"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["sam_merged.pth"]


class _PictureDecoderTuning(DecoderTuning):
    """Decoder tuning with a validation picture of its own: no hook of the forward pass."""

    def sample_panels(self, out, ctx):
        return {}


def test_merged_export_allows_a_plugin_that_only_adds_validation_pictures(tiny_sam):
    """``sample_panels`` and ``losses`` change no output: such a plugin merges; a forward hook still refuses."""
    model = HookedSam(tiny_sam, PluginStack({"decoder": _PictureDecoderTuning()}))
    with torch.no_grad():
        model.sam.mask_decoder.iou_token.weight.add_(1.0)  # "trained"
    merged = merged_sam_state_dict(model)
    assert all(torch.equal(merged[k], v) for k, v in model.sam.state_dict().items())

    class Hooked(_PictureDecoderTuning):
        def prompts(self, prompts, ctx):
            return prompts

    with pytest.raises(ExportError, match=r"'decoder' \(Hooked\) cannot be merged.*hooks prompts"):
        merged_sam_state_dict(HookedSam(build_sam("tiny"), PluginStack({"decoder": Hooked()})))
