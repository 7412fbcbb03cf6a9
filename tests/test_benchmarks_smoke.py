"""Smoke test of benchmarks/throughput.py: it runs and reports both kinds of case (no speed assertions)."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

from samflow import host_memory

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
SCRIPT = BENCHMARKS / "throughput.py"


@pytest.fixture(autouse=True)
def _threads_put_back():
    """A script's ``--threads`` sets torch's threads for its process, here the test worker's: put back (a
    later test of the worker comparing a run in a subprocess with one here bit for bit failed)."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def load_script(path: Path = SCRIPT):
    spec = importlib.util.spec_from_file_location(f"samflow_benchmark_{path.stem}", path)
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


def test_pretrain_tiny_writes_a_tiny_sam_whose_decoder_learned(tmp_path):
    import torch

    from samflow.sam import build_sam

    script = load_script(BENCHMARKS / "pretrain_tiny.py")
    out = tmp_path / "tiny.pth"
    after = script.main(["--out", str(out), "--epochs", "1", "--quickstart-root", str(tmp_path / "data")])
    assert {"val/iou", "val/boundary_iou"} <= set(after)
    loaded, random = build_sam("tiny", checkpoint=out), build_sam("tiny", seed=0)
    changed = {
        name for name, p in random.named_parameters() if not torch.equal(loaded.get_parameter(name), p)
    }
    assert changed and all(name.startswith("mask_decoder.") for name in changed)  # only the decoder learned
    assert "mask_decoder.output_upscaling.0.weight" in changed
    assert "mask_decoder.output_hypernetworks_mlps.0.layers.0.weight" in changed  # token 0: the prediction


def test_reference_sam_adapter_loop_has_the_references_adapter_and_runs():
    """The reference loop's prompt generator has the reference's ViT-B parameter count (63,312 in the
    notes: conv 18,456 + token projection 18,456 + 12 tune layers 7,200 + shared up-projection 19,200),
    and the loop trains: the adapter and the decoder change, the frozen encoder does not."""
    bench = load_script()
    prompts = bench._ReferenceAdapterPrompts(768, 12, 1024)
    assert sum(p.numel() for p in prompts.parameters()) == 63_312
    args = bench.parse_args(
        ["--variant", "tiny", "--no-forward", "--plugins", "sam_adapter", "--reference-sam-adapter"]
    )
    specs = bench.build_specs(args)
    assert [(s["impl"], s["bf16"]) for s in specs] == [("samflow", False), ("reference_loop", False)]
    spec = {**specs[1], "img_size": 64, "batch": 2, "device": "cpu"}
    step, (sam, adapter, _), _, trainable = bench._build_reference_train(
        spec, __import__("torch").device("cpu")
    )
    assert trainable == sum(p.numel() for p in adapter.parameters()) + sum(
        p.numel() for p in sam.mask_decoder.parameters()
    )
    before = {k: v.clone() for k, v in {**sam.state_dict(), **adapter.state_dict()}.items()}
    step()
    after = {**sam.state_dict(), **adapter.state_dict()}
    changed = {k for k in before if not before[k].equal(after[k])}
    assert any(k.startswith("mask_decoder.") for k in changed) and any(k.startswith("tune.") for k in changed)
    assert not any(k.startswith("image_encoder.") for k in changed)


def test_forward_ops_counts_both_sides_and_samflow_keeps_its_casts_and_indices(capsys):
    """Under bf16 autocast, samflow's second decode casts no frozen weight (the one cast left is the
    box coordinates) and its second encode builds no index; segment-anything does both every time."""
    bench = load_script(BENCHMARKS / "forward_ops.py")
    counts = bench.main(["--variant", "tiny", "--img-size", "128", "--batch", "2", "--prompt", "box"])
    ours, theirs = counts["decoder samflow"], counts["decoder segment_anything"]
    assert ours["_to_copy"] == 1 and theirs["_to_copy"] > 20
    assert ours["baddbmm"] == 3 and ours["addmm"] < theirs["addmm"]  # the hypernetworks batched
    encoder, their_encoder = counts["encoder samflow"], counts["encoder segment_anything"]
    # no window slot, one-hot key or rel-pos gather is built again; segment-anything gathers its tables
    assert (
        not any(encoder[op] for op in ("remainder", "floor_divide", "eq", "index")) and their_encoder["index"]
    )
    assert sum(encoder.values()) < sum(their_encoder.values())
    printed = capsys.readouterr().out
    assert f"decoder samflow           {sum(ours.values()):5d} operators" in printed
    assert f"encoder samflow           {sum(encoder.values()):5d} operators" in printed


def test_gpu_check_parses_and_times_a_training_step_of_every_built_in_plugin():
    import re
    import subprocess

    from samflow.plugins.registry import discover

    script = BENCHMARKS / "gpu_check.sh"
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    text = script.read_text()
    # plugins of vit_b training rows: `bench ... train_vit_b... --plugins A B ...` (continued lines joined)
    timed = set()
    for command in re.split(r"\n(?=bench |for )", text.replace("\\\n", " ")):
        if command.startswith("bench") and " train_vit_b" in command:
            timed.update(re.search(r"--plugins ((?:[a-z_]+ ?)+)", command).group(1).split())
    built_in = {name for name, info in discover().items() if info.target.startswith("samflow_plugins")}
    assert built_in and built_in <= timed, f"no GPU training row for {sorted(built_in - timed)}"


def test_gpu_check_runs_every_test_file_with_a_cuda_case():
    """A test that only runs on a GPU is run where there is one: section 7 of ``gpu_check.sh``."""
    import re

    text = (BENCHMARKS / "gpu_check.sh").read_text().replace("\\\n", " ")
    listed = set(re.search(r"pytest [^\n]*", text.split("# 7.")[1]).group(0).split())
    tests = BENCHMARKS.parent / "tests"
    marker = re.compile(r"skipif\(not torch\.cuda\.is_available\(\)|parametrize\(\"device\", DEVICES\)")
    with_cuda = {
        str(path.relative_to(BENCHMARKS.parent))
        for path in tests.rglob("test_*.py")
        if marker.search(path.read_text()) and "def test_" in path.read_text()
    }
    covered = {f for f in with_cuda if f in listed or any(f.startswith(d.rstrip("/") + "/") for d in listed)}
    assert with_cuda and with_cuda == covered, f"not in gpu_check.sh section 7: {sorted(with_cuda - covered)}"


def test_gpu_check_bench_commands_run_on_a_tiny_sam(capsys):
    """Every ``bench`` command of ``gpu_check.sh`` (its plugin sets, checkpointing, the reference loop,
    the other encoders) runs without an error row, on the CPU at a tiny size: a lent GPU's minutes are
    not spent on a command that cannot run. ``--compile`` rows are left out (minutes of compiling on the
    CPU); their flags still parse."""
    import re
    import shlex

    bench = load_script()
    text = (BENCHMARKS / "gpu_check.sh").read_text().replace("\\\n", " ")
    commands = [shlex.split(line)[3:] for line in text.splitlines() if line.startswith("bench ")]
    # `for NAME in A B C; do` + an indented bench line: one command per value
    for name, values, line in re.findall(r"for (\w+) in ([^;]+); do\n\s+(bench [^\n]+)", text):
        commands += [shlex.split(line.replace(f"${name}", value))[3:] for value in values.split()]
    assert len(commands) >= 17
    for args in commands:
        parsed = bench.parse_args(args)
        if parsed.compile:
            continue
        backbone = parsed.variant not in ("vit_b", "vit_l", "vit_h")
        size = (
            ["--variant", parsed.variant, "--img-size", "256"]
            if backbone
            else ["--variant", "tiny", "--img-size", "64"]
        )
        result = bench.main(
            [*args, *size, "--device", "cpu", "--steps", "1", "--warmup", "0", "--repeat", "1",
             "--isolation", "none", "--threads", "1", "--device-warmup", "0"]
        )  # fmt: skip
        errors = [(r["case"], r["plugins"], r["error"]) for r in result["rows"] if r.get("error")]
        assert not errors, (args, errors)
    capsys.readouterr()


def test_window_qkv_compares_both_ways_bit_for_bit(capsys):
    """At 64 px the tiny SAM's 4 x 4 grid has no padding; at 80 px (5 x 5, windows of 4) it has."""
    result = load_script(BENCHMARKS / "window_qkv.py").main(
        ["--variant", "tiny", "--img-size", "80", "--calls", "1"]
    )
    assert result["difference"] == [0.0]
    assert len(result["sam"]) == len(result["samflow"]) == 1
    assert "largest difference of the embeddings 0.0" in capsys.readouterr().out


def test_rel_pos_blocks_times_both_cuts_of_a_global_block(capsys):
    """The tiny SAM's global block at 256 px (256 tokens, 2 heads) cut both ways: the same values."""
    from samflow.sam import rel_pos

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(rel_pos, "REL_POS_CHUNK_ELEMENTS", 2 * 256 * 64)  # under one item: blocks of rows
        result = load_script(BENCHMARKS / "rel_pos_blocks.py").main(
            ["--variant", "tiny", "--img-size", "256", "--calls", "1"]
        )
    assert result["difference"] < 1e-5 and set(result["best"]) == {"earlier", "now"}
    assert "global block at 256 px" in capsys.readouterr().out


def test_host_memory_reports_both_patterns_kept_and_not(capsys):
    """benchmarks/host_memory.py: a row per pattern and setting, each from its own process."""
    result = load_script(BENCHMARKS / "host_memory.py").main(["--warmup", "2", "--steps", "2"])
    rows = {(r["pattern"], r["kept"]): r for r in result["rows"]}
    glibc = host_memory.glibc()  # where keep_freed_memory can set anything
    assert set(rows) == {("fixed", False), ("fixed", glibc), ("varied", False), ("varied", glibc)}
    assert rows[("fixed", False)]["most_alive_mib"] == 96
    assert all(r["ms_per_step"] > 0 and r["faults_per_step"] >= 0 for r in result["rows"])
    assert "faults/step" in capsys.readouterr().out
