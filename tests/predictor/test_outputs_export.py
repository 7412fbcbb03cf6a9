"""``samflow export``: an export stopped half-way is never a folder that loads as a finished one.

| case                                                    | result                                        |
|---|---|
| ``--overwrite`` stopped after the new adapter was written | only the new adapter: ``load_export`` says it is not an export (was: the earlier manifest and config beside the new adapter) |
| ``--merged`` stopped while ``sam_merged.pth`` was written | no ``sam_merged.pth`` (was: a truncated file under the final name) |
"""

from __future__ import annotations

from pathlib import Path

import pytest

import samflow.export
from samflow.cli import main
from samflow.export import ExportError, load_export


def test_an_interrupted_overwrite_leaves_no_manifest(trained_run, decoder_run, tmp_path, monkeypatch):
    out = tmp_path / "export"
    assert main(["export", str(trained_run), "--out", str(out)]) == 0

    def killed(src, dst):
        raise OSError("killed while copying config.yaml")

    monkeypatch.setattr(samflow.export.shutil, "copyfile", killed)
    with pytest.raises(OSError, match="killed"):
        samflow.export.export(decoder_run, out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["adapter.safetensors"]
    with pytest.raises(ExportError, match=r"is not a samflow export: config\.yaml is missing"):
        load_export(out)


def test_an_interrupted_merged_export_leaves_no_checkpoint(decoder_run, tmp_path, monkeypatch):
    def killed(state, path):
        Path(path).write_bytes(b"PK\x03\x04 half a zip")
        raise OSError("killed while saving")

    monkeypatch.setattr(samflow.export.torch, "save", killed)
    out = tmp_path / "merged"
    with pytest.raises(OSError, match="killed"):
        samflow.export.export(decoder_run, out, merged=True)
    assert list(out.iterdir()) == []
