"""RDSNet inference computes NMS only for the detections it keeps (`batched_nms_topk`); its
detections must equal those of class-wise NMS over every candidate followed by the top
DETECTIONS_PER_IMAGE (torchvision's `batched_nms`, the reference), with and without "+1"."""
import pytest
import rdsnet_tiny
import torch
from detectron2.modeling import build_model
from torchvision.ops import batched_nms as tv_batched_nms

import rdsnet.box_ops


def _reference_nms(boxes, scores, classes, iou_threshold, plus_one, max_keep):
    if plus_one:
        boxes = torch.cat([boxes[:, :2], boxes[:, 2:] + 1.0], dim=1)
    return tv_batched_nms(boxes, scores, classes, iou_threshold)[:max_keep]


@pytest.mark.parametrize("plus_one", [True, False])
def test_detections_equal_full_nms_then_top_k(plus_one, monkeypatch):
    # score threshold 0: every (anchor, class) pair of the per-level top-k is a candidate,
    # thousands of them, of which 20 are kept
    cfg = rdsnet_tiny.tiny_cfg(opts=["MODEL.RDSNET.SCORE_THRESH_TEST", 0.0,
                                     "MODEL.RDSNET.DETECTIONS_PER_IMAGE", 20,
                                     "MODEL.RDSNET.BOX_PLUS_ONE", plus_one])
    torch.manual_seed(3)
    model = build_model(cfg).eval()
    g = torch.Generator().manual_seed(0)
    inputs = [{"image": torch.randint(0, 255, (3, 128, 160), generator=g).float(),
               "height": 128, "width": 160},
              {"image": torch.randint(0, 255, (3, 96, 128), generator=g).float(),
               "height": 150, "width": 200}]
    calls = []
    inner = rdsnet.box_ops.batched_nms_topk

    def counted(boxes, *args, **kwargs):
        calls.append(boxes.shape[0])
        return inner(boxes, *args, **kwargs)

    monkeypatch.setattr(rdsnet.box_ops, "batched_nms_topk", counted)
    with torch.no_grad():
        fast = model(inputs)
    assert min(calls) > 1000  # the fast path had many candidates to skip
    monkeypatch.setattr(rdsnet.rdsnet, "nms_per_class", _reference_nms)
    with torch.no_grad():
        full = model(inputs)
    for a, b in zip(fast, full):
        a, b = a["instances"], b["instances"]
        assert len(a) == len(b) == 20
        assert torch.equal(a.pred_boxes.tensor, b.pred_boxes.tensor)
        assert torch.equal(a.scores, b.scores)
        assert torch.equal(a.pred_classes, b.pred_classes)
        assert torch.equal(a.pred_masks, b.pred_masks)
