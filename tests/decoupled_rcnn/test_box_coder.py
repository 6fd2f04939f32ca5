"""Per-stage box coders and the three-stage decode."""
import math

import pytest
import torch

from decoupled_rcnn.box_coder import (
    apply_deltas_clamped,
    build_stage_transforms,
    decode_and_clip,
    weights_from_stds,
)

STDS = [[0.1, 0.1, 0.2, 0.2], [0.05, 0.05, 0.1, 0.1], [0.033, 0.033, 0.067, 0.067]]


def test_weights_are_exact_reciprocals():
    t0, t1, t2 = build_stage_transforms(STDS)
    assert t0.weights == pytest.approx((10, 10, 5, 5), abs=1e-12)
    assert t1.weights == pytest.approx((20, 20, 10, 10), abs=1e-12)
    assert t2.weights[0] == pytest.approx(30.303030303, abs=1e-8)
    assert t2.weights[2] == pytest.approx(14.925373134, abs=1e-8)
    assert t2.weights[0] != 30 and t2.weights[2] != 15
    with pytest.raises(ValueError, match="stds"):
        weights_from_stds([0.1, 0.1, 0.0, 0.2])


def test_zero_delta_returns_input_box_every_stage():
    boxes = [torch.tensor([[100.0, 100, 200, 200], [-5, 10, 60, 900]])]
    for t in build_stage_transforms(STDS):
        out = decode_and_clip(t, torch.zeros(2, 4), boxes, [(800, 800)])[0]
        assert torch.allclose(out[0], boxes[0][0])
        assert out[1].tolist() == [0.0, 10.0, 60.0, 800.0]  # clipped to the image


def test_worked_three_stage_decode():
    """P = [100,100,200,200], delta (1,0,0,0) at every stage."""
    boxes = [torch.tensor([[100.0, 100, 200, 200]])]
    expected = [[110, 100, 210, 200], [115, 100, 215, 200], [118.3, 100, 218.3, 200]]
    for t, exp in zip(build_stage_transforms(STDS), expected):
        boxes = decode_and_clip(t, torch.tensor([[1.0, 0, 0, 0]]), boxes, [(800, 800)])
        assert torch.allclose(boxes[0], torch.tensor([exp], dtype=torch.float32), atol=1e-4)


def test_log_size_delta_clamped_on_both_sides():
    """Raw -50 at stage 0 (-10 de-normalised) is clamped to -log(1000/16)."""
    (t0,) = build_stage_transforms(STDS[:1])
    box = torch.tensor([[0.0, 0, 1000, 1000]])
    out = apply_deltas_clamped(t0, torch.tensor([[0.0, 0, -50, -50]]), box)
    width = (out[0, 2] - out[0, 0]).item()
    assert width == pytest.approx(1000 * 16 / 1000, rel=1e-4)  # factor exp(-4.135) = 0.016
    up = apply_deltas_clamped(t0, torch.tensor([[0.0, 0, 50, 50]]), torch.tensor([[0.0, 0, 16, 16]]))
    assert (up[0, 2] - up[0, 0]).item() == pytest.approx(1000, rel=1e-4)
    assert math.isfinite(out.sum().item())
