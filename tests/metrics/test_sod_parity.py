"""SOD metrics against PySODMetrics (the SOD benchmarks' reference implementation).

PySODMetrics reads 8-bit maps, divides by 255 and min-max stretches each image; our metrics get the
same 8-bit maps as float64 ``u8 / 255`` and stretch them the same way, so they agree to float64
rounding (observed max difference ~1e-15; asserted at 1e-9).
"""

from __future__ import annotations

import numpy as np
import py_sod_metrics  # the test extra installs it: a missing one fails, it does not skip
import pytest
import torch
from sod_cases import make_sod_cases

from samflow.metrics import EMeasure, MeanAbsoluteError, SMeasure, WeightedFMeasure
from samflow.metrics.functional import adaptive_e_measure, e_measure_curve, s_measure, weighted_f_measure

ATOL = 1e-9
SOD_CASES = make_sod_cases()


def _ours(pred_u8: np.ndarray, gt_u8: np.ndarray, dtype: torch.dtype = torch.float64):
    return torch.from_numpy(pred_u8).to(dtype) / 255, torch.from_numpy(gt_u8 > 128)


def test_per_image_parity() -> None:
    for name, pred_u8, gt_u8 in SOD_CASES:
        pred, gt = _ours(pred_u8, gt_u8)
        sm, em = py_sod_metrics.Smeasure(), py_sod_metrics.Emeasure()
        wfm = py_sod_metrics.WeightedFmeasure(beta=0.3)
        for ref in (sm, em, wfm):
            ref.step(pred_u8, gt_u8)
        assert s_measure(pred, gt).item() == pytest.approx(sm.sms[0], abs=ATOL), name
        assert weighted_f_measure(pred, gt).item() == pytest.approx(wfm.weighted_fms[0], abs=ATOL), name
        # PySODMetrics orders the curve by descending threshold 255..0; ours ascends 0..255.
        curve = e_measure_curve(pred, gt)[0].numpy()
        np.testing.assert_allclose(curve, em.changeable_ems[0][::-1], atol=ATOL, err_msg=name)
        assert adaptive_e_measure(pred, gt).item() == pytest.approx(em.adaptive_ems[0], abs=ATOL), name


def test_dataset_parity() -> None:
    refs = {
        "sm": py_sod_metrics.Smeasure(),
        "em": py_sod_metrics.Emeasure(),
        "wfm": py_sod_metrics.WeightedFmeasure(beta=0.3),
        "mae": py_sod_metrics.MAE(),
    }
    ours = {
        "sm": SMeasure(),
        "em": EMeasure(),
        "wfm": WeightedFMeasure(),
        "mae": MeanAbsoluteError(normalize=True),
    }
    for _, pred_u8, gt_u8 in SOD_CASES:
        for ref in refs.values():
            ref.step(pred_u8, gt_u8)
        for metric in ours.values():
            metric.update(*_ours(pred_u8, gt_u8))
    assert ours["sm"].compute().item() == pytest.approx(refs["sm"].get_results()["sm"], abs=ATOL)
    assert ours["wfm"].compute().item() == pytest.approx(refs["wfm"].get_results()["wfm"], abs=ATOL)
    assert ours["mae"].compute().item() == pytest.approx(refs["mae"].get_results()["mae"], abs=ATOL)
    ref_em = refs["em"].get_results()["em"]
    em = ours["em"].compute()
    assert em["em_mean"].item() == pytest.approx(ref_em["curve"].mean(), abs=ATOL)
    assert em["em_max"].item() == pytest.approx(ref_em["curve"].max(), abs=ATOL)
    assert em["em_adaptive"].item() == pytest.approx(ref_em["adp"], abs=ATOL)
    np.testing.assert_allclose(ours["em"].curve().numpy(), ref_em["curve"][::-1], atol=ATOL)


def test_float32_inputs_agree_within_1e4() -> None:
    """float32 probabilities land in other 1/255 bins near the edges; observed |Δ| <= 1e-5 (mean E)."""
    em_ref, sm_ref = py_sod_metrics.Emeasure(), py_sod_metrics.Smeasure()
    em, sm = EMeasure(), SMeasure()
    for _, pred_u8, gt_u8 in SOD_CASES:
        em_ref.step(pred_u8, gt_u8)
        sm_ref.step(pred_u8, gt_u8)
        em.update(*_ours(pred_u8, gt_u8, torch.float32))
        sm.update(*_ours(pred_u8, gt_u8, torch.float32))
    ref_mean = em_ref.get_results()["em"]["curve"].mean()
    assert em.compute()["em_mean"].item() == pytest.approx(ref_mean, abs=1e-4)
    assert sm.compute().item() == pytest.approx(sm_ref.get_results()["sm"], abs=1e-4)


def test_s_measure_special_cases_by_hand() -> None:
    pred = torch.tensor([[0.2, 0.4], [0.6, 0.0]], dtype=torch.float64)
    empty, full = torch.zeros(2, 2, dtype=torch.bool), torch.ones(2, 2, dtype=torch.bool)
    assert s_measure(pred, empty, normalize=False).item() == pytest.approx(1 - 0.3)
    assert s_measure(pred, full, normalize=False).item() == pytest.approx(0.3)
    # normalize stretches [0, 0.6] to [0, 1]: mean 0.3 / 0.6 = 0.5.
    assert s_measure(pred, full).item() == pytest.approx(0.5)


def test_s_measure_perfect_prediction() -> None:
    gt = torch.zeros(20, 30, dtype=torch.bool)
    gt[5:12, 8:20] = True
    assert s_measure(gt.double(), gt).item() == pytest.approx(1.0, abs=1e-9)


def test_s_measure_centroid_on_last_column_is_finite() -> None:
    """Documented deviation: PySODMetrics returns nan (an empty quadrant); we weight it 0."""
    gt = np.zeros((20, 20), dtype=np.uint8)
    gt[10, -1] = 255
    pred = np.zeros((20, 20), dtype=np.uint8)
    pred[8:12, 15:] = 200
    ref = py_sod_metrics.Smeasure()
    with np.errstate(all="ignore"), pytest.warns(RuntimeWarning):
        ref.step(pred, gt)
    assert np.isnan(ref.sms[0])
    score = s_measure(*_ours(pred, gt)).item()
    assert 0 <= score <= 1


def test_weighted_f_empty_gt_is_zero_and_perfect_is_one() -> None:
    pred = torch.rand(2, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    assert weighted_f_measure(pred, torch.zeros(2, 16, 16, dtype=torch.bool)).tolist() == [0.0, 0.0]
    gt = torch.zeros(16, 16, dtype=torch.bool)
    gt[4:9, 3:12] = True
    assert weighted_f_measure(gt.double(), gt).item() == pytest.approx(1.0, abs=1e-9)


def test_normalize_flag() -> None:
    pred = torch.tensor([[0.2, 0.4], [0.6, 0.2]], dtype=torch.float64)
    gt = torch.tensor([[0, 1], [1, 0]], dtype=torch.bool)
    stretched = (pred - 0.2) / 0.4
    for fn in (s_measure, weighted_f_measure):
        torch.testing.assert_close(fn(pred, gt), fn(stretched, gt, normalize=False))
    # A constant map is left as it is (MATLAB mapminmax would divide by zero).
    constant = torch.full((2, 2), 0.3, dtype=torch.float64)
    torch.testing.assert_close(s_measure(constant, gt), s_measure(constant, gt, normalize=False))
