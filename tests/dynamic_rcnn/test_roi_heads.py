"""DynamicROIHeads: loss values at the dynamic beta, edge cases, logging (spec §3.1, §7, §8)."""
import math

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.layers import ShapeSpec
from detectron2.modeling.roi_heads import build_roi_heads
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage

from dynamic_rcnn import DynamicROIHeads, add_dynamic_rcnn_config

IMG = 128


def _cfg(**dyn):
    cfg = get_cfg()
    add_dynamic_rcnn_config(cfg)
    cfg.MODEL.ROI_HEADS.NAME = "DynamicROIHeads"
    cfg.MODEL.ROI_HEADS.IN_FEATURES = ["p2", "p3"]
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = 3
    cfg.MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE = 64
    cfg.MODEL.ROI_BOX_HEAD.NAME = "FastRCNNConvFCHead"
    cfg.MODEL.ROI_BOX_HEAD.NUM_FC = 1
    cfg.MODEL.ROI_BOX_HEAD.FC_DIM = 16
    cfg.MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION = 4
    cfg.MODEL.ROI_BOX_HEAD.SMOOTH_L1_BETA = 0.0  # Detectron2's default; INITIAL_BETA wins
    for k, v in dyn.items():
        cfg.MODEL.DYNAMIC_RCNN[k] = v
    return cfg


def _head(cfg):
    torch.manual_seed(0)
    shapes = {"p2": ShapeSpec(channels=4, stride=4), "p3": ShapeSpec(channels=4, stride=8)}
    head = build_roi_heads(cfg, shapes)
    head.train()
    return head


def _features(n):
    g = torch.Generator().manual_seed(1)
    return {"p2": torch.randn(n, 4, IMG // 4, IMG // 4, generator=g),
            "p3": torch.randn(n, 4, IMG // 8, IMG // 8, generator=g)}


def _targets(boxes_per_image):
    out = []
    for boxes in boxes_per_image:
        inst = Instances((IMG, IMG))
        inst.gt_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4))
        inst.gt_classes = torch.arange(len(boxes), dtype=torch.int64) % 3
        out.append(inst)
    return out


def _proposals(targets, n=40, seed=2):
    """Jittered copies of the GT boxes plus random boxes."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for t in targets:
        xy = torch.rand(n, 2, generator=g) * 90
        wh = torch.rand(n, 2, generator=g) * 30 + 8
        boxes = [torch.cat([xy, xy + wh], 1)]
        if len(t):
            gt = t.gt_boxes.tensor.repeat(4, 1)
            boxes.append(gt + torch.randn(gt.shape, generator=g) * 3)
        inst = Instances((IMG, IMG))
        inst.proposal_boxes = Boxes(torch.cat(boxes).clamp(0, IMG - 1))
        inst.objectness_logits = torch.zeros(len(inst.proposal_boxes))
        out.append(inst)
    return out


def _step(head, targets, proposals=None, seed=3):
    torch.manual_seed(seed)
    proposals = _proposals(targets) if proposals is None else proposals
    with EventStorage() as storage:
        _, losses = head(None, _features(len(targets)), proposals, targets)
        logged = {k: v.latest() for k, v in storage.histories().items()
                  if k.startswith("dynamic_rcnn/")}
    return losses, logged


def test_builds_with_dynamic_matcher_and_initial_beta():
    head = _head(_cfg(INITIAL_IOU=0.45, INITIAL_BETA=0.8))
    assert isinstance(head, DynamicROIHeads)
    assert head.proposal_matcher.thresholds == [-math.inf, 0.45, math.inf]
    assert head.proposal_matcher.labels == [0, 1]
    assert not head.proposal_matcher.allow_low_quality_matches
    assert head.box_predictor.smooth_l1_beta == 0.8


def test_rejects_non_smooth_l1_and_bad_statistics():
    cfg = _cfg()
    cfg.MODEL.ROI_BOX_HEAD.BBOX_REG_LOSS_TYPE = "giou"
    with pytest.raises(ValueError, match="BBOX_REG_LOSS_TYPE"):
        _head(cfg)
    with pytest.raises(ValueError, match="STATISTICS"):
        _head(_cfg(STATISTICS="pooled"))


@pytest.mark.parametrize(
    "beta,loss,grad",
    [(1.0, 1.63, [0.1, 0.5, 1.0, 0.0]), (0.2, 2.325, [0.5, 1.0, 1.0, 0.0]),
     (0.0, 2.6, [1.0, 1.0, 1.0, 0.0])],
)
def test_vf1_smooth_l1_values_and_gradients(beta, loss, grad):
    """The predictor's box loss at the current beta: residuals (0.1, 0.5, 2.0, 0), sum."""
    head = _head(_cfg())
    head.box_predictor.smooth_l1_beta = beta
    box = torch.tensor([[10.0, 10.0, 50.0, 60.0]])
    pred = torch.zeros(1, 12)
    pred[0, 4:8] = torch.tensor([0.1, 0.5, 2.0, 0.0])  # class 1 of 3
    pred.requires_grad_(True)
    value = head.box_predictor.box_reg_loss(box, box, pred, torch.tensor([1]))
    value.backward()
    assert float(value.detach()) == pytest.approx(loss, abs=1e-6)  # one sampled RoI: / 1
    assert pred.grad[0, 4:8].tolist() == pytest.approx(grad, abs=1e-6)
    assert torch.isfinite(pred.grad).all()


def test_vf1_single_values_at_small_beta():
    head = _head(_cfg())
    box = torch.tensor([[10.0, 10.0, 50.0, 60.0]])
    table = {1.0: (0.005, 0.125, 1.5), 0.5: (0.01, 0.25, 1.75), 0.2: (0.025, 0.4, 1.9),
             0.0: (0.1, 0.5, 2.0)}
    for beta, values in table.items():
        head.box_predictor.smooth_l1_beta = beta
        for x, expected in zip((0.1, 0.5, 2.0), values):
            pred = torch.zeros(1, 12)
            pred[0, 0] = x
            assert float(head.box_predictor.box_reg_loss(box, box, pred, torch.tensor([0]))) == (
                pytest.approx(expected, abs=1e-6))
    # gradient at x = 0.1 is 1 for beta <= 0.1
    head.box_predictor.smooth_l1_beta = 0.1
    pred = torch.zeros(1, 12)
    pred[0, 0] = 0.1
    pred.requires_grad_(True)
    head.box_predictor.box_reg_loss(box, box, pred, torch.tensor([0])).backward()
    assert float(pred.grad[0, 0]) == pytest.approx(1.0, abs=1e-5)


def test_vf2_box_loss_normalisation():
    head = _head(_cfg())
    head.box_predictor.smooth_l1_beta = 1.0
    boxes = torch.tensor([[10.0, 10.0, 50.0, 60.0]]).repeat(1024, 1)
    classes = torch.full((1024,), 3)  # background
    classes[0] = 2
    pred = torch.zeros(1024, 12)
    pred[0, 8] = 0.5
    value = head.box_predictor.box_reg_loss(boxes, boxes, pred, classes)
    assert float(value) == pytest.approx(0.125 / 1024, rel=1e-5)


def test_forward_uses_current_values_and_logs_them():
    head = _head(_cfg(UPDATE_ITERS=2, KI=5))  # ~50 candidates per image
    head.dynamic_state.iou_thr.fill_(0.55)
    head.dynamic_state.beta.fill_(0.3)
    targets = _targets([[[10, 10, 60, 70], [70, 60, 120, 110]], [[20, 30, 90, 100]]])
    losses, logged = _step(head, targets)
    assert head.proposal_matcher.threshold == 0.55
    assert head.box_predictor.smooth_l1_beta == pytest.approx(0.3)
    assert logged["dynamic_rcnn/iou_thr"] == 0.55
    assert logged["dynamic_rcnn/beta"] == pytest.approx(0.3)
    assert 0.0 < logged["dynamic_rcnn/iou_stat"] <= 1.0
    assert logged["dynamic_rcnn/beta_stat"] >= 0.0
    assert all(torch.isfinite(v) for v in losses.values())
    _step(head, targets)  # second iteration triggers the update (C = 2)
    assert int(head.dynamic_state.iteration) == 2 and int(head.dynamic_state.iou_count[0]) == 0
    assert head.dynamic_state.current() != pytest.approx((0.55, 0.3))


def test_fg_follows_threshold():
    """Proposals shifted by 10 / 25 / 40 px from a 100 px GT: IoU 0.818 / 0.6 / 0.4286."""
    targets = _targets([[[0, 0, 100, 100]]])
    props = Instances((IMG, IMG))
    props.proposal_boxes = Boxes(torch.tensor([[s, 0.0, 100.0 + s, 100.0] for s in (10, 25, 40)]))
    props.objectness_logits = torch.zeros(3)
    counts = {}
    for thr in (0.4, 0.5, 0.7, 0.9):
        head = _head(_cfg())
        head.dynamic_state.iou_thr.fill_(thr)
        with EventStorage() as storage:
            head(None, _features(1), [props], targets)
            counts[thr] = storage.histories()["roi_head/num_fg_samples"].latest()
    # the appended GT box is always foreground
    assert counts == {0.4: 4, 0.5: 3, 0.7: 2, 0.9: 1}


@pytest.mark.parametrize("stats", ["mmdet", "original"])
def test_images_without_gt_and_without_positives(stats):
    head = _head(_cfg(STATISTICS=stats))
    # all images empty: finite losses, nothing recorded, iteration still counted
    empty = _targets([[], []])
    losses, logged = _step(head, empty)
    assert all(torch.isfinite(v) for v in losses.values())
    assert float(losses["loss_box_reg"].detach()) == 0.0
    assert "dynamic_rcnn/iou_stat" not in logged and "dynamic_rcnn/beta_stat" not in logged
    assert int(head.dynamic_state.iteration) == 1
    assert int(head.dynamic_state.iou_count[0]) == 0 and int(head.dynamic_state.beta_count[0]) == 0
    # no positives: GT not appended, proposals far from the GT
    head.proposal_append_gt = False
    targets = _targets([[[0, 0, 20, 20]]])
    far = Instances((IMG, IMG))
    far.proposal_boxes = Boxes(torch.tensor([[80.0, 80, 120, 120], [60, 90, 100, 125]]))
    far.objectness_logits = torch.zeros(2)
    losses, logged = _step(head, targets, proposals=[far])
    assert float(losses["loss_box_reg"].detach()) == 0.0 and torch.isfinite(losses["loss_cls"])
    assert "dynamic_rcnn/iou_stat" in logged  # IoUs exist (all 0) ...
    if stats == "mmdet":
        assert "dynamic_rcnn/beta_stat" not in logged  # ... but no positive for beta
    # mixed batch: one image without GT is left out of the IoU statistic
    head.proposal_append_gt = True
    mixed = _targets([[[10, 10, 60, 70]], []])
    _, logged_mixed = _step(head, mixed)
    _, logged_single = _step(head, mixed[:1], proposals=_proposals(mixed)[:1])
    assert logged_mixed["dynamic_rcnn/iou_stat"] == pytest.approx(
        logged_single["dynamic_rcnn/iou_stat"])


@pytest.mark.parametrize("stats", ["mmdet", "original"])
def test_k_larger_than_number_of_proposals(stats):
    head = _head(_cfg(STATISTICS=stats, KI=75, KBETA=10))
    targets = _targets([[[10, 10, 60, 70]]])
    few = Instances((IMG, IMG))
    few.proposal_boxes = Boxes(torch.tensor([[12.0, 10, 60, 72], [90, 90, 120, 120]]))
    few.objectness_logits = torch.zeros(2)
    losses, logged = _step(head, targets, proposals=[few])
    # 3 candidates (2 proposals + GT): the IoU statistic is the smallest max-IoU (0)
    assert logged["dynamic_rcnn/iou_stat"] == 0.0
    assert math.isfinite(logged["dynamic_rcnn/beta_stat"])
    assert all(torch.isfinite(v) for v in losses.values())


def test_vf15_beta_statistic_independent_of_predictions():
    targets = _targets([[[10, 10, 60, 70], [70, 60, 120, 110]], [[20, 30, 90, 100]]])
    head = _head(_cfg())
    _, a = _step(head, targets)
    head = _head(_cfg())
    with torch.no_grad():
        head.box_predictor.bbox_pred.weight.zero_()
        head.box_predictor.bbox_pred.bias.zero_()
    _, b = _step(head, targets)
    assert a["dynamic_rcnn/beta_stat"] == b["dynamic_rcnn/beta_stat"]
    assert a["dynamic_rcnn/iou_stat"] == b["dynamic_rcnn/iou_stat"]


def test_vf16_original_mode_many_gts_gives_zero():
    g = torch.Generator().manual_seed(4)
    boxes = [(torch.rand(10, 2, generator=g) * 80) for _ in range(2)]
    gts = [torch.cat([xy, xy + 20], 1).tolist() for xy in boxes]
    head = _head(_cfg(STATISTICS="original"))
    _, logged = _step(head, _targets(gts))
    assert logged["dynamic_rcnn/beta_stat"] == 0.0  # 20 appended GTs encode to exactly 0


def test_eval_mode_is_standard_inference():
    head = _head(_cfg())
    head.eval()
    props = _proposals(_targets([[[10, 10, 60, 70]]]))
    with torch.no_grad():
        out, _ = head(None, _features(1), props)
    assert len(out) == 1 and out[0].has("pred_boxes")
    assert int(head.dynamic_state.iteration) == 0
