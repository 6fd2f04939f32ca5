"""MBRM on hand-made synthetic profiles and masks."""
import math

import pytest
import torch

from rdsnet.mbrm import MBRM, PRIOR_CUTOFF


@pytest.fixture(scope="module")
def mbrm():
    return MBRM(gamma=0.05, kernel_size=9)


def _mask(value=1.0):
    m = torch.zeros(1, 100, 120)
    m[0, 20:60, 30:90] = value
    return m


def test_step_response(mbrm):
    """Left/right responses to a 1-D step, bias-only value 0.12416."""
    h = torch.tensor([[0.0] * 5 + [1.0] * 10 + [0.0] * 5])
    left = mbrm.boundary_evidence(h, flip=False)[0]
    expected = [0.1242, 0.1345, 0.1422, 0.1446, 0.6741, 0.6317, 0.0621]
    assert torch.allclose(left[:7], torch.tensor(expected), atol=1e-4)
    assert left[7:14].max() < 0.05 and abs(float(left[13]) - 0.023) < 1e-3
    assert left[14] < 0.003 and left[15] < 0.003
    assert torch.isclose(left[19], torch.tensor(0.1242), atol=1e-4)
    right = mbrm.boundary_evidence(h, flip=True)[0]
    assert torch.allclose(right, left.flip(0), atol=1e-6)
    assert torch.isclose(right[14], torch.tensor(0.6317), atol=1e-4)
    assert torch.isclose(right[15], torch.tensor(0.6741), atol=1e-4)
    assert math.isclose(1 / (1 + math.exp(1.9536)), 0.12416, abs_tol=1e-5)
    zero = mbrm.boundary_evidence(torch.zeros(1, 5), flip=False)
    assert torch.allclose(zero, torch.full_like(zero, 0.12416), atol=1e-5)


@pytest.mark.parametrize(
    "box, expected",
    [
        ([30, 20, 89, 59], [29, 20, 90, 59]),
        ([26, 17, 93, 63], [29, 19, 90, 60]),
        ([36, 25, 84, 55], [30, 25, 89, 56]),
        ([50, 20, 89, 59], [50, 20, 89, 59]),  # true left edge outside the prior window
    ],
)
def test_refined_boxes(mbrm, box, expected):
    """Refined boxes of the 100x120 rectangle mask; scores pass through."""
    out = mbrm.get_boxes(_mask(), torch.tensor([box], dtype=torch.float32), torch.tensor([0.7]))
    assert out[0, :4].tolist() == expected
    assert torch.isclose(out[0, 4], torch.tensor(0.7))


def test_soft_mask_and_batch(mbrm):
    """A 0.6 plateau refines like a 1.0 one; several instances are refined at once."""
    masks = torch.cat([_mask(0.6), _mask(1.0), _mask(1.0)])
    boxes = torch.tensor([[30, 20, 89, 59], [26, 17, 93, 63], [36, 25, 84, 55]], dtype=torch.float32)
    out = mbrm.get_boxes(masks, boxes, torch.ones(3))
    assert out[:, :4].tolist() == [[29, 20, 90, 59], [29, 19, 90, 60], [30, 25, 89, 56]]
    # profiles path (used by the model) equals the mask path
    refined = mbrm.refine_from_profiles(masks.amax(1), masks.amax(2), boxes)
    assert torch.equal(refined, out[:, :4])


def test_empty_mask_gives_rounded_box_and_gaussian_posterior(mbrm):
    """All-zero mask -> posterior = normalised truncated Gaussian; box rounded."""
    box = torch.tensor([[30.0, 20.0, 89.0, 59.0]])
    dists = mbrm(torch.zeros(1, 100, 120), box)
    expected = [0.0322, 0.0540, 0.0807, 0.1076, 0.1278, 0.1354, 0.1278]
    assert torch.allclose(dists[0][0, 25:32], torch.tensor(expected), atol=1e-4)
    for d in dists:
        assert torch.allclose(d.sum(dim=1), torch.ones(1), atol=1e-5)
    sigma = 0.05 * 59
    cut = dists[0][0] == 0
    assert bool(cut[(torch.arange(120) - 30).abs() > 3.2943 * sigma + 0.01].all())
    off_grid = torch.tensor([[30.4, 19.6, 88.7, 59.2]])
    out = mbrm.get_boxes(torch.zeros(1, 100, 120), off_grid, torch.ones(1))
    assert out[0, :4].tolist() == [30, 20, 89, 59]
    assert math.isclose(math.exp(-3.2943 ** 2 / 2), PRIOR_CUTOFF, rel_tol=1e-3)


def test_no_detections(mbrm):
    """Forward returns None and get_boxes a (0, 5) tensor without detections."""
    assert mbrm(torch.zeros(0, 10, 12), torch.zeros(0, 4)) is None
    assert mbrm.get_boxes(torch.zeros(0, 10, 12), torch.zeros(0, 4), torch.zeros(0)).shape == (0, 5)
    assert mbrm.refine_from_profiles(torch.zeros(0, 12), torch.zeros(0, 10), torch.zeros(0, 4)).shape == (0, 4)


def test_constants_are_fixed_buffers(mbrm):
    """The 10 constants are non-persistent buffers: no parameters, no checkpoint keys."""
    assert list(mbrm.parameters()) == []
    assert mbrm.state_dict() == {}
    assert mbrm.weight.numel() + mbrm.bias.numel() == 10
    with pytest.raises(ValueError, match="KERNEL_SIZE"):
        MBRM(kernel_size=7)


def test_sigma_has_no_plus_one(mbrm):
    """Sigma = gamma (x2 - x1) = 2.7 for box [24, 20, 78, 59] on the 100x120 rectangle
    (columns 30..89). At x1 = 24 the evidence is the bias alone (profile zero over 20..28):
    0.12416 x prior 1; at the true edge 29: 0.6741 x exp(-5^2 / (2 * 2.7^2)) = 0.1213 < 0.12416,
    so x1 stays 24. With a "+1" width (sigma 2.75) the edge would move to 29."""
    at_edge = [0.6741 * math.exp(-25 / (2 * s ** 2)) for s in (2.7, 2.75)]
    assert at_edge[0] < 0.12416 < at_edge[1]
    out = mbrm.get_boxes(_mask(), torch.tensor([[24.0, 20.0, 78.0, 59.0]]), torch.ones(1))
    assert out[0, 0].item() == 24


def test_each_distribution_row_sums_to_one_and_single_box(mbrm):
    """Every row of every distribution sums to 1 (normalised per instance, not over the
    batch); one detection through the profiles path gives the same refined box."""
    masks = torch.cat([_mask(0.6), _mask(1.0)])
    boxes = torch.tensor([[30, 20, 89, 59], [26, 17, 93, 63]], dtype=torch.float32)
    for d in mbrm(masks, boxes):
        assert torch.allclose(d.sum(dim=1), torch.ones(2), atol=1e-5)
    one = mbrm.refine_from_profiles(masks[1:].amax(1), masks[1:].amax(2), boxes[1:])
    assert one.tolist() == [[29, 19, 90, 60]]


def test_defaults_are_the_authors():
    """MBRM() uses gamma 0.05 and the 9-tap kernel (mbrm_cfg of the refine configs)."""
    default = MBRM()
    assert default.gamma == 0.05 and default.weight.shape == (1, 1, 9)
