"""Smoke test of benchmarks/throughput.py: it runs and reports both kinds of case (no speed assertions)."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "throughput.py"


def load_script():
    spec = importlib.util.spec_from_file_location("samflow_benchmark_throughput", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_throughput_script_reports_forward_and_train_rows(tmp_path, capsys):
    bench = load_script()
    out_json = tmp_path / "out.json"
    result = bench.main(
        [
            "--variant", "tiny", "--img-size", "128", "--batch", "2", "--steps", "1", "--warmup", "0",
            "--threads", "1", "--isolation", "none", "--plugins", "decoder_tuning", "--json", str(out_json),
        ]
    )  # fmt: skip
    rows = result["rows"]
    assert not [r["error"] for r in rows if r.get("error")]
    cases = {(r["case"], r["impl"], r["plugins"]) for r in rows}
    assert {
        ("forward/full", "samflow", "-"),
        ("forward/full", "segment_anything", "-"),
        ("forward/encoder", "samflow", "-"),
        ("forward/encoder", "segment_anything", "-"),
        ("train_step", "samflow", "decoder_tuning"),
    } == cases
    for row in rows:
        assert row["images_per_s"] > 0 and math.isfinite(row["images_per_s"])
        assert row["peak_mib"] >= 0 and row["base_mib"] > 0
    assert set(result["ratios"]) == {"full", "encoder"}
    assert all(r["mean"] > 0 and r["median"] > 0 for r in result["ratios"].values())

    printed = capsys.readouterr().out
    assert "images/s" in printed and "peak +MiB" in printed and "memory:" in printed
    assert "ratio samflow/segment_anything images/s, forward/full" in printed
    for case in ("forward/full", "train_step"):
        assert any(line.startswith(case) for line in printed.splitlines())
    assert json.loads(out_json.read_text())["rows"] == json.loads(json.dumps(rows))


def test_each_plugin_alone_and_together_are_separate_cases():
    bench = load_script()
    args = bench.parse_args(["--plugins", "sam_adapter", "hq_sam", "sam_adapter", "--no-forward"])
    specs = bench.build_specs(args)
    assert [s["plugins"] for s in specs] == [["sam_adapter", "hq_sam"], ["sam_adapter"], ["hq_sam"]]
    assert all(s["kind"] == "train" for s in specs)
