"""`projects_common.topk_nms.batched_nms_topk` returns the first k survivors of class-wise
NMS over all candidates: checked against torchvision's `batched_nms` on the full set."""
import pytest
import torch
from torchvision.ops import batched_nms as tv_batched_nms

from projects_common.topk_nms import batched_nms_topk


def _candidates(n, num_classes, seed, quantize=None):
    g = torch.Generator().manual_seed(seed)
    # clustered boxes, so that many overlap (real suppression) in every class
    centers = torch.rand(12, 2, generator=g) * 300
    c = centers[torch.randint(0, 12, (n,), generator=g)] + torch.randn(n, 2, generator=g) * 8
    wh = 20 + torch.rand(n, 2, generator=g) * 40
    boxes = torch.cat([c - wh / 2, c + wh / 2], dim=1)
    scores = torch.rand(n, generator=g)
    if quantize:
        scores = (scores * quantize).floor() / quantize  # many exact ties
    classes = torch.randint(0, num_classes, (n,), generator=g)
    return boxes, scores, classes


@pytest.mark.parametrize("n,num_classes,k,first,quantize", [
    (6000, 80, 100, 0, None),    # the full run suppresses class by class (over 1000 boxes)
    (6000, 3, 100, 50, None),    # a first prefix far too small: it grows several times
    (5000, 5, 100, 200, 20),     # scores in 20 levels: ties at every cut-off
    (3000, 2, 2000, 0, None),    # fewer survivors than k: every survivor, as the full run
])
def test_first_k_survivors_of_the_full_nms(n, num_classes, k, first, quantize):
    boxes, scores, classes = _candidates(n, num_classes, seed=n + k, quantize=quantize)
    expected = tv_batched_nms(boxes, scores, classes, 0.5)[:k]
    got = batched_nms_topk(boxes, scores, classes, 0.5, k, first=first)
    if quantize is None:
        assert torch.equal(got, expected)
    else:  # tied scores: the same scores in order, the same boxes above the last score
        assert torch.equal(scores[got], scores[expected])
        last = scores[expected[-1]]
        assert set(got[scores[got] > last].tolist()) == set(expected[scores[expected] > last].tolist())
    assert got.numel() == min(k, tv_batched_nms(boxes, scores, classes, 0.5).numel())


def test_small_inputs_and_errors():
    boxes, scores, classes = _candidates(50, 3, seed=1)
    assert torch.equal(batched_nms_topk(boxes, scores, classes, 0.5, 10),
                       tv_batched_nms(boxes, scores, classes, 0.5)[:10])
    empty = batched_nms_topk(boxes[:0], scores[:0], classes[:0], 0.5, 10)
    assert empty.numel() == 0
    with pytest.raises(ValueError, match="k must be at least 1, got 0"):
        batched_nms_topk(boxes, scores, classes, 0.5, 0)
