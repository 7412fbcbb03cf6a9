"""TestReport: the test metrics as JSON and as a per-dataset table (Markdown and CSV)."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from types import SimpleNamespace

from samflow.callbacks import TestReport as Report  # not named Test*: pytest would try to collect it

SEVERAL = {
    "test/s_measure/COD10K": 0.88312,
    "test/mae_sod/COD10K": 0.025,
    "test/s_measure/CAMO": 0.847,
    "test/mae_sod/CAMO": 0.07,
    "test/s_measure/CHAMELEON": 0.896,
    "test/mae_sod/CHAMELEON": 0.033,
}


def test_several_sets_give_one_row_each(tmp_path: Path) -> None:
    paths = Report(digits=3).write(SEVERAL, tmp_path, ["COD10K", "CAMO", "CHAMELEON"])
    assert json.loads(paths["json"].read_text()) == SEVERAL
    assert paths["md"].read_text().splitlines() == [
        "| dataset | s_measure | mae_sod |",
        "| --- | ---: | ---: |",
        "| COD10K | 0.883 | 0.025 |",
        "| CAMO | 0.847 | 0.070 |",
        "| CHAMELEON | 0.896 | 0.033 |",
    ]
    rows = list(csv.DictReader(paths["csv"].open()))
    assert [r["dataset"] for r in rows] == ["COD10K", "CAMO", "CHAMELEON"]
    assert float(rows[0]["s_measure"]) == 0.88312  # the CSV keeps full precision


def test_rows_follow_the_data_module_and_columns_the_given_order(tmp_path: Path, capsys) -> None:
    report = Report(columns=["mae_sod", "e_measure_not_computed"])
    report.write(SEVERAL, tmp_path, ["CHAMELEON", "COD10K"])  # CAMO is not named: it comes last
    lines = (tmp_path / "test_metrics.md").read_text().splitlines()
    assert lines[0] == "| dataset | mae_sod | s_measure |"
    assert [line.split(" | ")[0] for line in lines[2:]] == ["| CHAMELEON", "| COD10K", "| CAMO"]
    # the unknown name is not dropped silently: one line names it and the computed metrics
    (warning,) = [line for line in capsys.readouterr().out.splitlines() if "warning" in line]
    assert warning == (
        "samflow: warning: test_report.columns names e_measure_not_computed, not computed in this test "
        "(left out); the computed metrics are s_measure, mae_sod."
    )


def test_one_set_is_named_after_the_data_module(tmp_path: Path) -> None:
    results = {"test/ber": 1.43, "test/iou": 0.9, "val/iou": 0.1}  # not a test key: ignored
    rows, columns = Report.table(results, ["ISTD"])
    assert rows == {"ISTD": {"ber": 1.43, "iou": 0.9}} and columns == ["ber", "iou"]
    assert list(Report.table(results)[0]) == ["test"]  # no names: the row is called "test"


def test_missing_values_leave_empty_cells(tmp_path: Path) -> None:
    rows, columns = Report.table({"test/iou/A": 0.5, "test/boundary_iou/B": 0.25}, ["A", "B"])
    assert Report.markdown(rows, columns, 2).splitlines()[2:] == ["| A | 0.50 |  |", "| B |  | 0.25 |"]


def test_on_test_end_writes_into_the_run_folder(tmp_path: Path) -> None:
    trainer = SimpleNamespace(
        log_dir=str(tmp_path / "run"),
        is_global_zero=True,
        datamodule=SimpleNamespace(test_names=["COD10K", "CAMO"]),
    )
    module = SimpleNamespace(test_results={k: v for k, v in SEVERAL.items() if "CHAMELEON" not in k})
    Report().on_test_end(trainer, module)
    lines = (tmp_path / "run" / "test_metrics.md").read_text().splitlines()
    assert [line.split(" | ")[0] for line in lines[2:]] == ["| COD10K", "| CAMO"]
    assert all((tmp_path / "run" / f"test_metrics.{suffix}").is_file() for suffix in ("csv", "json"))
    trainer.is_global_zero = False
    Report().on_test_end(SimpleNamespace(**{**vars(trainer), "log_dir": str(tmp_path / "other")}), module)
    assert not (tmp_path / "other").exists()  # only rank zero writes
