"""Numeric checks of the Dynamic R-CNN statistics and window updates."""
import pytest
import torch
from detectron2.modeling.box_regression import Box2BoxTransform

from dynamic_rcnn.matcher import DynamicMatcher
from dynamic_rcnn.state import DynamicTrainingState
from dynamic_rcnn.statistics import (
    beta_statistic,
    iou_statistic_mmdet,
    iou_statistic_original,
    kth_largest,
    kth_smallest,
    original_recorded_ious,
    regression_label_magnitude,
    window_median,
)


def _vec(*parts):
    """_vec((80, 0.9), (920, 0.1)) -> tensor of 80 x 0.9 then 920 x 0.1."""
    return torch.cat([torch.full((n,), v) for n, v in parts])


def _state(c=100, **kw):
    args = dict(update_iters=c, initial_iou=0.4, iou_floor=0.4, initial_beta=1.0, beta_cap=1.0,
                beta_eps=1e-15, median="numpy", sync=False, world_size=1)
    args.update(kw)
    return DynamicTrainingState(**args)


def _run_window(state, ious=None, betas=None):
    """Record one window (len(ious) iterations); return (T, beta) after it."""
    n = len(ious) if ious is not None else len(betas)
    for i in range(n):
        state.record(None if ious is None else torch.tensor(ious[i]),
                     None if betas is None else torch.tensor(betas[i]))
    return state.current()


def test_kth_clamps():
    v = torch.tensor([0.3, 0.9, 0.1])
    assert kth_largest(v, 1) == pytest.approx(0.9)
    assert kth_largest(v, 75) == pytest.approx(0.1)  # K larger than N -> the minimum
    assert kth_smallest(v, 20) == pytest.approx(0.9)  # -> the maximum
    with pytest.raises(ValueError):
        kth_largest(torch.zeros(0), 3)


def test_vf4_vf5_iou_statistic_both_definitions():
    a, b = _vec((80, 0.9), (920, 0.1)), _vec((20, 0.8), (980, 0.3))
    assert float(iou_statistic_mmdet([a, b], 75)) == pytest.approx(0.6)
    assert float(iou_statistic_original([a, b], 75)) == pytest.approx(0.3)
    a, b = _vec((100, 0.9), (900, 0.2)), _vec((100, 0.7), (900, 0.2))
    assert float(iou_statistic_mmdet([a, b], 75)) == pytest.approx(0.8)
    assert float(iou_statistic_original([a, b], 75)) == pytest.approx(0.7)
    assert iou_statistic_mmdet([], 75) is None
    assert iou_statistic_original([torch.zeros(0)], 75) is None


def test_vf6_small_images_and_many_gts():
    few = torch.tensor([0.9, 0.7, 0.35])  # N < 75 -> its minimum
    assert float(iou_statistic_mmdet([few], 75)) == pytest.approx(0.35)
    many_gt = torch.cat([torch.ones(80), torch.full((500,), 0.2)])  # >= 75 appended GTs
    assert float(iou_statistic_mmdet([many_gt], 75)) == 1.0


def test_vf7_original_gt0_quirk():
    # proposal p: IoU 0.05 with g0, 0.45 with g1
    m = torch.tensor([[0.05], [0.45]])
    assert float(original_recorded_ious(m, 0.5)[0]) == pytest.approx(0.05)
    assert float(original_recorded_ious(m, 0.4)[0]) == pytest.approx(0.45)


def test_vf3_label_rule():
    matcher = DynamicMatcher(0.4)
    matcher.threshold = 0.55
    m = torch.tensor([[0.55, 0.5499, 1.0, 0.0]])
    _, labels = matcher(m)
    assert labels.tolist() == [1, 0, 1, 0]  # >= T is fg, no -1 (ignore) label, GT box fg
    with pytest.raises(ValueError):
        matcher.threshold = 1.5


def test_vf10_regression_label_magnitude():
    t = Box2BoxTransform(weights=(10.0, 10.0, 5.0, 5.0))
    p = torch.tensor([[0.0, 0.0, 100.0, 100.0]] * 2)
    g = torch.tensor([[5.0, 0.0, 105.0, 100.0], [10.0, 20.0, 120.0, 110.0]])
    d = t.get_deltas(p, g)
    assert d[0].tolist() == pytest.approx([0.5, 0.0, 0.0, 0.0], abs=1e-6)
    assert d[1].tolist() == pytest.approx([1.5, 1.5, 0.476551, -0.526803], abs=1e-5)
    e = regression_label_magnitude(d)
    assert e.tolist() == pytest.approx([0.25, 1.5], abs=1e-6)  # dw, dh do not enter


def test_vf11_beta_statistic():
    assert float(beta_statistic(torch.linspace(0.05, 0.6, 12), 20)) == pytest.approx(0.6)
    errs = torch.arange(1, 51, dtype=torch.float32) / 100
    assert float(beta_statistic(errs[torch.randperm(50)], 20)) == pytest.approx(0.20)
    assert beta_statistic(torch.zeros(0), 20) is None
    # non-finite magnitudes (degenerate proposals) are ignored
    assert float(beta_statistic(torch.tensor([float("inf"), 0.3, float("nan")]), 20)) == (
        pytest.approx(0.3))


def test_vf8_threshold_update_mean_and_floor():
    assert _run_window(_state(), ious=[0.5] * 50 + [0.6] * 50)[0] == pytest.approx(0.55)
    assert _run_window(_state(), ious=[0.35] * 100)[0] == pytest.approx(0.4)  # floor
    assert _run_window(_state(), ious=[0.9] * 100)[0] == pytest.approx(0.9)  # no cap


def test_vf12_vf13_median_conventions():
    s_e = [i / 100 for i in range(1, 101)]
    assert _run_window(_state(median="upper"), betas=s_e)[1] == pytest.approx(0.51)
    assert _run_window(_state(median="numpy"), betas=s_e)[1] == pytest.approx(0.505)
    half = [0.0] * 50 + [0.3] * 50
    assert _run_window(_state(median="upper"), betas=half)[1] == pytest.approx(0.3)
    assert _run_window(_state(median="numpy"), betas=half)[1] == pytest.approx(0.15)
    # median 0: keep the previous beta (MMDet >= PR #4303, this project's default)
    mostly_zero = [0.0] * 60 + [0.3] * 40
    st = _state(median="upper", initial_beta=0.7, beta_cap=1.0)
    assert _run_window(st, betas=mostly_zero)[1] == pytest.approx(0.7)
    # without the guard (BETA_EPS = 0) the authors' code's beta = 0 is reproduced
    assert _run_window(_state(median="upper", beta_eps=0.0), betas=mostly_zero)[1] == 0.0
    assert float(window_median(torch.tensor([3.0, 1.0, 2.0]), "numpy")) == 2.0
    with pytest.raises(ValueError):
        window_median(torch.tensor([1.0]), "mean")


def test_vf14_beta_cap_and_non_monotone():
    st = _state(c=4)
    assert _run_window(st, betas=[1.7] * 4)[1] == 1.0  # cap
    assert _run_window(st, betas=[0.2] * 4)[1] == pytest.approx(0.2)
    assert _run_window(st, betas=[0.6] * 4)[1] == pytest.approx(0.6)  # may rise again
    assert _run_window(st, betas=[5.0] * 4)[1] == 1.0  # never above the cap


def test_vf9_first_iterations_and_update_timing():
    st = _state(c=5, initial_iou=0.5)
    seen = []
    for it in range(1, 16):
        seen.append(st.current())  # values in force for iteration `it`
        updated = st.record(torch.tensor(0.4 + 0.01 * it), torch.tensor(0.1 * it))
        assert updated == (it % 5 == 0)
    assert seen[:5] == [(0.5, 1.0)] * 5  # iterations 1..C use the initial values
    assert seen[5] == pytest.approx((0.43, 0.3))  # mean(0.41..0.45), median(0.1..0.5)
    assert all(v == seen[5] for v in seen[5:10])
    assert seen[10] == pytest.approx((0.48, 0.8))
    assert int(st.iteration) == 15 and int(st.iou_count[0]) == 0  # 3 updates, window cleared


def test_empty_windows_keep_values():
    st = _state(c=3, initial_iou=0.45, initial_beta=0.9)
    for _ in range(3):
        st.record(None, None)  # e.g. no GT and no positives in the whole window
    assert st.current() == pytest.approx((0.45, 0.9))
    # beta window partly filled (iterations without positives record nothing)
    for b in (0.2, None, 0.4):
        st.record(torch.tensor(0.5), None if b is None else torch.tensor(b))
    assert st.current() == pytest.approx((0.5, 0.3))


def test_state_rejects_bad_values():
    with pytest.raises(ValueError, match="UPDATE_ITERS"):
        _state(c=0)
    with pytest.raises(ValueError, match="MEDIAN"):
        _state(median="lower")
    with pytest.raises(ValueError, match="INITIAL_IOU"):
        _state(initial_iou=0.0)


def test_empty_and_single_value_inputs_and_error_messages():
    with pytest.raises(ValueError, match="kth_largest of an empty tensor"):
        kth_largest(torch.zeros(0), 1)
    with pytest.raises(ValueError, match="kth_smallest of an empty tensor"):
        kth_smallest(torch.zeros(0), 1)
    with pytest.raises(ValueError, match="median of an empty window"):
        window_median(torch.zeros(0), "numpy")
    with pytest.raises(ValueError, match="MODEL.DYNAMIC_RCNN.MEDIAN must be 'numpy' or 'upper'"):
        window_median(torch.tensor([0.1, 0.2]), "lower")
    for convention in ("numpy", "upper"):  # a window of one value (C = 1)
        assert float(window_median(torch.tensor([0.3]), convention)) == pytest.approx(0.3)
