"""projects_common.soft_nms against a direct loop-based reference."""
import math

import pytest
import torch

from projects_common.soft_nms import batched_soft_nms, soft_nms


def _iou(a, b):
    iw = max(min(a[2], b[2]) - max(a[0], b[0]), 0.0)
    ih = max(min(a[3], b[3]) - max(a[1], b[1]), 0.0)
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def reference_soft_nms(boxes, scores, idxs, iou_thr, min_score, method="linear", sigma=0.5):
    """Plain Python soft-NMS, one class at a time, one box at a time (mmcv 1.1.2 semantics)."""
    boxes, scores, idxs = boxes.tolist(), scores.tolist(), idxs.tolist()
    picked = []
    for c in sorted(set(idxs)):
        remaining = [[i, scores[i]] for i in range(len(idxs)) if idxs[i] == c and scores[i] >= min_score]
        while remaining:
            j = max(range(len(remaining)), key=lambda t: (remaining[t][1], -remaining[t][0]))
            i, s = remaining.pop(j)
            picked.append((i, s))
            survivors = []
            for i2, s2 in remaining:
                iou = _iou(boxes[i], boxes[i2])
                if method == "linear":
                    w = 1.0 - iou if iou >= iou_thr else 1.0
                elif method == "gaussian":
                    w = math.exp(-(iou * iou) / sigma)
                else:
                    w = 0.0 if iou >= iou_thr else 1.0
                s2 = s2 * w
                if s2 >= min_score:
                    survivors.append([i2, s2])
            remaining = survivors
    picked.sort(key=lambda p: (-p[1], p[0]))
    return [p[0] for p in picked], [p[1] for p in picked]


def _random_boxes(n, num_classes, seed, size=400.0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g, dtype=dtype) * size
    wh = torch.rand(n, 2, generator=g, dtype=dtype) * 60 + 4
    boxes = torch.cat([xy, xy + wh], dim=1)
    scores = torch.rand(n, generator=g, dtype=dtype)
    idxs = torch.randint(0, num_classes, (n,), generator=g)
    return boxes, scores, idxs


def test_spec_two_box_example():
    """IoU 0.6 -> 0.8 * 0.4; IoU 0.4 unchanged; IoU exactly 0.5 -> 0.4."""
    # Boxes [0,0,10,10] and [0,0,10,w]: IoU = w / 10 for w <= 10.
    for width, expected in ((6.0, 0.8 * 0.4), (4.0, 0.8), (5.0, 0.4)):
        boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, width]], dtype=torch.float64)
        keep, new = soft_nms(boxes, torch.tensor([0.9, 0.8], dtype=torch.float64), 0.5, 1e-3)
        assert keep.tolist() == [0, 1]
        assert new.tolist() == pytest.approx([0.9, expected], abs=1e-12)


def test_min_score_prunes_and_classes_are_independent():
    boxes = torch.tensor([[0.0, 0, 10, 10], [0, 0, 10, 9.99], [0, 0, 10, 10]], dtype=torch.float64)
    scores = torch.tensor([0.9, 0.8, 0.7], dtype=torch.float64)
    keep, new = batched_soft_nms(boxes, scores, torch.tensor([0, 0, 1]), 0.5, 1e-3)
    # Box 1 has IoU 0.999 with box 0: 0.8 * 0.001 = 0.0008 < 0.001 -> discarded; box 2 is
    # another class and keeps its score.
    assert keep.tolist() == [0, 2]
    assert new.tolist() == pytest.approx([0.9, 0.7])


@pytest.mark.parametrize("method", ["linear", "gaussian", "naive"])
def test_matches_reference_random(method):
    boxes, scores, idxs = _random_boxes(400, 4, seed=3)
    keep, new = batched_soft_nms(boxes, scores, idxs, 0.5, 1e-3, method=method)
    ref_keep, ref_scores = reference_soft_nms(boxes, scores, idxs, 0.5, 1e-3, method=method)
    assert keep.tolist() == ref_keep
    assert torch.allclose(new, torch.tensor(ref_scores, dtype=torch.float64), rtol=0, atol=1e-12)


def test_ties_pick_lowest_index():
    # Three identical boxes with the same score: picked in index order, the other two are
    # decayed to 0 (IoU 1) and discarded. Two disjoint boxes with equal scores: index order.
    boxes = torch.tensor(
        [[0.0, 0, 10, 10], [0, 0, 10, 10], [0, 0, 10, 10], [50, 50, 60, 60], [20, 20, 30, 30]],
        dtype=torch.float64,
    )
    scores = torch.tensor([0.5, 0.5, 0.5, 0.5, 0.5], dtype=torch.float64)
    keep, new = soft_nms(boxes, scores, 0.5, 1e-3)
    assert keep.tolist() == [0, 3, 4]
    assert keep.tolist() == reference_soft_nms(boxes, scores, torch.zeros(5, dtype=torch.int64),
                                               0.5, 1e-3)[0]
    # Many ties with partial overlaps and quantised scores, against the reference.
    g = torch.Generator().manual_seed(7)
    xy = torch.randint(0, 40, (300, 2), generator=g).double()
    boxes = torch.cat([xy, xy + 20], dim=1)
    scores = torch.randint(1, 5, (300,), generator=g).double() / 4
    idxs = torch.randint(0, 3, (300,), generator=g)
    keep, new = batched_soft_nms(boxes, scores, idxs, 0.5, 1e-3)
    ref_keep, ref_scores = reference_soft_nms(boxes, scores, idxs, 0.5, 1e-3)
    assert keep.tolist() == ref_keep
    assert torch.allclose(new, torch.tensor(ref_scores, dtype=torch.float64), atol=1e-12)


def test_more_than_10000_candidates():
    boxes, scores, idxs = _random_boxes(12000, 150, seed=11, size=300.0)
    keep, new = batched_soft_nms(boxes, scores, idxs, 0.5, 1e-3)
    ref_keep, ref_scores = reference_soft_nms(boxes, scores, idxs, 0.5, 1e-3)
    assert keep.tolist() == ref_keep
    assert torch.allclose(new, torch.tensor(ref_scores, dtype=torch.float64), atol=1e-12)
    # float32 inputs give the same kept set up to float rounding of borderline scores.
    keep32, new32 = batched_soft_nms(boxes.float(), scores.float(), idxs, 0.5, 1e-3)
    assert new32.dtype == torch.float32
    assert len(set(keep32.tolist()) ^ set(ref_keep)) <= 3


def test_empty_and_bad_input():
    keep, new = soft_nms(torch.zeros((0, 4)), torch.zeros(0))
    assert keep.numel() == 0 and new.numel() == 0
    with pytest.raises(ValueError, match="method"):
        soft_nms(torch.zeros((1, 4)), torch.ones(1), method="cubic")
    with pytest.raises(ValueError, match="shape"):
        soft_nms(torch.zeros((2, 4)), torch.ones(3))
