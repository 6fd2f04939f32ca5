"""DynamicROIHeads: loss values at the dynamic beta, edge cases, logging."""
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
    assert "dynamic_rcnn/beta_stat" not in logged
    assert int(head.dynamic_state.iteration) == 1
    assert int(head.dynamic_state.beta_count[0]) == 0
    if stats == "mmdet":  # MMDetection: every image without GT contributes 0 to the mean
        assert logged["dynamic_rcnn/iou_stat"] == 0.0
        assert int(head.dynamic_state.iou_count[0]) == 1
    else:  # the pooled statistic has no entries
        assert "dynamic_rcnn/iou_stat" not in logged
        assert int(head.dynamic_state.iou_count[0]) == 0
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
    # mixed batch: the image without GT contributes 0 to the per-image mean ("mmdet"), and adds
    # no entries to the pooled statistic ("original")
    head.proposal_append_gt = True
    mixed = _targets([[[10, 10, 60, 70]], []])
    _, logged_mixed = _step(head, mixed)
    _, logged_single = _step(head, mixed[:1], proposals=_proposals(mixed)[:1])
    assert logged_mixed["dynamic_rcnn/iou_stat"] == pytest.approx(
        logged_single["dynamic_rcnn/iou_stat"] / (2 if stats == "mmdet" else 1))


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
    # beta: k = 10 > candidates -> the largest label. mmdet: positives = the first proposal and
    # the GT (e = 0); original: all three, the background one measured against GT #0
    gt = [10, 10, 60, 70]
    e = [_label_magnitude(p, gt) for p in ([12, 10, 60, 72], [90, 90, 120, 120])]
    expected = e[0] if stats == "mmdet" else max(e)
    assert logged["dynamic_rcnn/beta_stat"] == pytest.approx(expected, abs=1e-5)
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


# ---- end-to-end values through the ROI heads, expected values computed by hand ------
# Independent references: plain-Python IoU and regression labels written from the paper's
# definitions (never the package's or Detectron2's helpers).
def _iou(a, b):
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    area = lambda r: (r[2] - r[0]) * (r[3] - r[1])  # noqa: E731
    return inter / (area(a) + area(b) - inter)


def _label_magnitude(p, g):
    """e = (|dx| + |dy|) / 2 with dx = 10 (cx_g - cx_p) / w_p, dy = 10 (cy_g - cy_p) / h_p."""
    dx = 10 * ((g[0] + g[2]) / 2 - (p[0] + p[2]) / 2) / (p[2] - p[0])
    dy = 10 * ((g[1] + g[3]) / 2 - (p[1] + p[3]) / 2) / (p[3] - p[1])
    return (abs(dx) + abs(dy)) / 2


def _smooth_l1(x, beta):
    x = abs(x)
    return 0.5 * x * x / beta if x < beta else x - 0.5 * beta


def _props(*boxes):
    inst = Instances((IMG, IMG))
    inst.proposal_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4))
    inst.objectness_logits = torch.zeros(len(boxes))
    return inst


def _shift(box, sx, sy=0.0):
    return [box[0] + sx, box[1] + sy, box[2] + sx, box[3] + sy]


G = [0.0, 0.0, 100.0, 100.0]


def _kth_largest(values, k):
    return sorted(values, reverse=True)[min(k, len(values)) - 1]


def _two_image_batch():
    """Image A: proposals with IoU 0.905, 0.905, 0.35 to its GT; image B: 0.35, 0.667, 0.391."""
    a = [_shift(G, 5), _shift(G, 5), _shift(G, 28, 28)]
    b = [_shift(G, 28, 28), _shift(G, 20), _shift(G, 25, 25)]
    return [a, b], _targets([[G], [G]])


@pytest.mark.parametrize("stats", ["mmdet", "original"])
def test_vf4_iou_statistic_per_image_vs_pooled_with_appended_gt(stats):
    """K_I = 2. mmdet: mean over images of each image's 2nd largest max-IoU (appended GT = 1.0
    included); original: the (2 * 2)-th largest of both images pooled."""
    boxes, targets = _two_image_batch()
    head = _head(_cfg(STATISTICS=stats, KI=2, KBETA=3))
    _, logged = _step(head, targets, proposals=[_props(*b) for b in boxes])
    per_image = [[1.0] + [_iou(p, G) for p in bs] for bs in boxes]  # appended GT first
    if stats == "mmdet":
        expected = sum(_kth_largest(v, 2) for v in per_image) / 2  # (0.905 + 0.667) / 2
    else:
        expected = _kth_largest(per_image[0] + per_image[1], 4)  # 0.905
    assert logged["dynamic_rcnn/iou_stat"] == pytest.approx(expected, abs=1e-5)
    # beta, K_beta = 3 -> rank 6 over both images: mmdet over the sampled positives (IoU >= 0.4;
    # here 5 < 6, so the largest), original over every candidate (single-GT images)
    labels = [[0.0] + [_label_magnitude(p, G) for p in bs] for bs in boxes]
    fg = [[True] + [_iou(p, G) >= 0.4 for p in bs] for bs in boxes]
    if stats == "mmdet":
        candidates = [e for es, fs in zip(labels, fg) for e, f in zip(es, fs) if f]
    else:
        candidates = labels[0] + labels[1]
    expected_beta = sorted(candidates)[min(6, len(candidates)) - 1]
    assert expected_beta == pytest.approx(1.0 if stats == "mmdet" else 2.5)
    assert logged["dynamic_rcnn/beta_stat"] == pytest.approx(expected_beta, abs=1e-5)
    # the three definitions one could confuse give clearly different values here
    pooled = _kth_largest(per_image[0] + per_image[1], 4)
    without_gt = sum(_kth_largest(v[1:], 2) for v in per_image) / 2
    mean_of_images = sum(_kth_largest(v, 2) for v in per_image) / 2
    assert min(abs(pooled - mean_of_images), abs(without_gt - mean_of_images)) > 0.1


@pytest.mark.parametrize("stats", ["mmdet", "original"])
def test_iou_statistic_image_without_gt_contributes_zero(stats):
    """MMDetection: an image without GT has max IoU 0 everywhere, its K_I-th largest is 0 and
    it enters the mean: I_k = (0 + 0.905) / 2. The original (pooled) definition has no entries
    for it: the (K_I * 1)-th largest of the other image. The beta statistic comes from the other
    image alone (K_beta = 10: the largest of its candidates)."""
    (a, _), targets = _two_image_batch()
    boxes, targets = [a, a], [_targets([[]])[0], targets[0]]  # the image without GT first
    head = _head(_cfg(STATISTICS=stats, KI=2))
    _, logged = _step(head, targets, proposals=[_props(*b) for b in boxes])
    ious = [1.0] + [_iou(p, G) for p in boxes[1]]
    expected = (0.0 + _kth_largest(ious, 2)) / 2 if stats == "mmdet" else _kth_largest(ious, 2)
    assert logged["dynamic_rcnn/iou_stat"] == pytest.approx(expected, abs=1e-5)
    labels = [0.0] + [_label_magnitude(p, G) for p in boxes[1]]
    if stats == "mmdet":  # sampled positives only
        labels = [e for e, iou in zip(labels, ious) if iou >= 0.4]
    assert logged["dynamic_rcnn/beta_stat"] == pytest.approx(max(labels), abs=1e-5)


@pytest.mark.parametrize("stats", ["mmdet", "original"])
def test_images_with_a_single_candidate_or_none(stats):
    """Image 1: one GT and no RPN proposal -> one candidate (the appended GT, IoU 1.0);
    image 2: no GT and no proposal -> no candidate. mmdet: (1.0 + 0) / 2; original: 1.0."""
    targets = _targets([[G], []])
    empty = _props()
    _, logged = _step(_head(_cfg(STATISTICS=stats, KI=2)), targets, proposals=[empty, _props()])
    assert logged["dynamic_rcnn/iou_stat"] == pytest.approx(0.5 if stats == "mmdet" else 1.0)
    assert logged["dynamic_rcnn/beta_stat"] == 0.0


def test_original_records_max_iou_exactly_at_the_threshold():
    """Original mode, T = 0.6, GTs g0 (far) and g1 = G; the proposal has IoU exactly 0.6 with g1
    (75 / 125) and 0 with g0: it is foreground and records 0.6 (not its IoU with g0)."""
    g0 = [110, 110, 127, 127]
    head = _head(_cfg(STATISTICS="original", KI=3))
    head.dynamic_state.iou_thr.fill_(0.6)
    _, logged = _step(head, _targets([[g0, G]]), proposals=[_props(_shift(G, 25))])
    assert logged["dynamic_rcnn/iou_stat"] == pytest.approx(0.6, abs=1e-6)


def test_matcher_records_only_during_the_training_forward():
    head = _head(_cfg())
    head.proposal_matcher(torch.rand(1, 4))  # before any training forward
    assert head.proposal_matcher.stop_recording() == []
    _step(head, _targets([[G]]), proposals=[_props(_shift(G, 5))])
    head.proposal_matcher(torch.rand(1, 4))
    assert head.proposal_matcher.stop_recording() == []


def test_values_in_force_are_logged_unsmoothed():
    head = _head(_cfg())
    with EventStorage() as storage:
        head(None, _features(1), [_props(_shift(G, 5))], _targets([[G]]))
        hints = storage.smoothing_hints()
    assert hints["dynamic_rcnn/iou_thr"] is False and hints["dynamic_rcnn/beta"] is False
    assert hints["dynamic_rcnn/iou_stat"] is True and hints["dynamic_rcnn/beta_stat"] is True


def test_vf6_per_image_rank_clamped_and_many_gts():
    """K_I = 3: an image with 3 GTs contributes exactly 1.0 (its appended GTs); an image with
    2 entries (< K_I) contributes its minimum."""
    gts = [[0, 0, 30, 30], [40, 0, 70, 30], [80, 0, 110, 30]]
    targets = _targets([gts, [G]])
    props = [_props(_shift(gts[0], 3), [0, 60, 40, 100]), _props(_shift(G, 28, 28))]
    head = _head(_cfg(KI=3))
    _, logged = _step(head, targets, proposals=props)
    expected = (1.0 + min(1.0, _iou(_shift(G, 28, 28), G))) / 2
    assert logged["dynamic_rcnn/iou_stat"] == pytest.approx(expected, abs=1e-5)


@pytest.mark.parametrize("thr", [0.5, 0.4])
def test_vf7_original_gt0_quirk_for_iou_and_beta(thr):
    """GTs g0, g1; proposal p has IoU 0.4286 with g1 and 0.0526 with g0. Original mode records
    p's IoU with g0 when p is background (T = 0.5), with g1 when foreground (T = 0.4); its beta
    candidate is its label w.r.t. g0 (e = 4.5) or g1 (e = 2.0). mmdet mode uses the max IoU."""
    g0, g1, p = [70, 45, 120, 95], [50, 0, 100, 50], [70, 0, 120, 50]
    targets = _targets([[g0, g1]])
    fg = _iou(p, g1) >= thr
    rec = _iou(p, g1) if fg else _iou(p, g0)
    e = _label_magnitude(p, g1 if fg else g0)
    assert (round(_iou(p, g1), 4), round(_iou(p, g0), 4)) == (0.4286, 0.0526)
    head = _head(_cfg(STATISTICS="original", KI=3, KBETA=3))
    head.dynamic_state.iou_thr.fill_(thr)
    _, logged = _step(head, targets, proposals=[_props(p)])
    # entries: p, appended g0 and g1 (1.0, label 0): the 3rd largest / smallest is p's
    assert logged["dynamic_rcnn/iou_stat"] == pytest.approx(rec, abs=1e-5)
    assert logged["dynamic_rcnn/beta_stat"] == pytest.approx(e, abs=1e-5)
    assert e == pytest.approx(2.0 if fg else 4.5)
    head = _head(_cfg(STATISTICS="mmdet", KI=3, KBETA=3))
    head.dynamic_state.iou_thr.fill_(thr)
    _, logged = _step(head, targets, proposals=[_props(p)])
    assert logged["dynamic_rcnn/iou_stat"] == pytest.approx(_iou(p, g1), abs=1e-5)
    # mmdet beta: sampled positives only -> p (if fg) and the two GTs (e = 0)
    assert logged["dynamic_rcnn/beta_stat"] == pytest.approx(e if fg else 0.0, abs=1e-5)


def test_vf3_label_rule_at_the_threshold():
    """T = 0.6: IoU exactly 0.6 (shift 25 of a 100 px box: 75 / 125) is foreground, IoU 0.5987
    (shift 25.1) background; the appended GT is foreground."""
    head = _head(_cfg())
    head.dynamic_state.iou_thr.fill_(0.6)
    far = [105, 105, 127, 127]
    with EventStorage() as storage:
        head(None, _features(1), [_props(_shift(G, 25), _shift(G, 25.1), far)], _targets([[G]]))
        hist = storage.histories()
        assert hist["roi_head/num_fg_samples"].latest() == 2
        assert hist["roi_head/num_bg_samples"].latest() == 2


@pytest.mark.parametrize("k_beta", [2, 10])
def test_vf10_vf11_beta_statistic_over_sampled_positives(k_beta):
    """Labels: proposal (0,0,100,100) to GT (5,0,105,100): e = 0.25; to GT
    (10,20,120,110): e = 1.5. E_k = min(K_beta * n, #pos)-th smallest over the sampled
    positives of both images (appended GTs have e = 0); K_beta = 10 > #pos gives the largest."""
    g_a, g_b = [5, 0, 105, 100], [10, 20, 120, 110]
    props_a = [[0, 0, 100, 100], [2, 3, 102, 103]]
    props_b = [[0, 0, 100, 100], [8, 20, 118, 110], [104, 0, 127, 20]]  # last: background
    assert _label_magnitude(props_a[0], g_a) == pytest.approx(0.25)
    assert _label_magnitude(props_b[0], g_b) == pytest.approx(1.5)
    positives = [0.0, 0.0] + [_label_magnitude(p, g_a) for p in props_a] + [
        _label_magnitude(p, g_b) for p in props_b[:2]]
    assert _iou(props_b[2], g_b) < 0.4 <= min(_iou(props_a[1], g_a), _iou(props_b[0], g_b))
    head = _head(_cfg(KBETA=k_beta))
    _, logged = _step(head, _targets([[g_a], [g_b]]),
                      proposals=[_props(*props_a), _props(*props_b)])
    k = min(k_beta * 2, len(positives))
    assert logged["dynamic_rcnn/beta_stat"] == pytest.approx(sorted(positives)[k - 1], abs=1e-5)


def _window_step(head, shift, zero_pred=True):
    """One training iteration on image G with proposals: G shifted by ``shift`` in x (IoU
    (100 - s) / (100 + s), label e = s / 20) and a background box. With K_I = K_beta = 2 the
    iteration's statistics are exactly that proposal's IoU and e."""
    if zero_pred:
        with torch.no_grad():
            head.box_predictor.bbox_pred.weight.zero_()
            head.box_predictor.bbox_pred.bias.zero_()
    props = _props(_shift(G, shift), [105, 105, 127, 127])
    return _step(head, _targets([[G]]), proposals=[props])


def _window_cfg(c, **kw):
    return _cfg(KI=2, KBETA=2, UPDATE_ITERS=c, **kw)


def test_vf2_vf8_vf9_values_in_force_and_box_loss_through_forward():
    """C = 3. Iterations 1..3 run with (0.4, 1.0); after iteration 3, T = max(0.4, mean IoU)
    and beta = median(e) apply from iteration 4. The box loss of every iteration is the
    SmoothL1 of the fg residuals at the beta in force, summed, / #sampled RoIs (3: the
    proposal, the appended GT, one background box); zero predictions give residual -dx = s/10.
    """
    head = _head(_window_cfg(3))
    # IoUs of the 2nd window stay above T after the 1st update (0.889), so the proposal stays fg
    shifts = [2.0, 6.0, 10.0, 5.0, 1.0, 3.0, 1.0]
    in_force = []
    for i, s in enumerate(shifts):
        losses, logged = _window_step(head, s)
        in_force.append((logged["dynamic_rcnn/iou_thr"], logged["dynamic_rcnn/beta"]))
        beta = in_force[-1][1]
        assert logged["dynamic_rcnn/iou_stat"] == pytest.approx((100 - s) / (100 + s), abs=1e-5)
        assert logged["dynamic_rcnn/beta_stat"] == pytest.approx(s / 20, abs=1e-5)
        assert float(losses["loss_box_reg"].detach()) == pytest.approx(
            _smooth_l1(s / 10, beta) / 3, rel=1e-4, abs=1e-7)
    first = shifts[:3]
    t1 = max(0.4, sum((100 - s) / (100 + s) for s in first) / 3)
    b1 = min(1.0, sorted(s / 20 for s in first)[1])
    second = shifts[3:6]
    t2 = max(0.4, sum((100 - s) / (100 + s) for s in second) / 3)
    b2 = min(1.0, sorted(s / 20 for s in second)[1])
    expected = [(0.4, 1.0)] * 3 + [(t1, b1)] * 3 + [(t2, b2)]
    assert in_force == [pytest.approx(v, abs=1e-5) for v in expected]
    assert b1 == pytest.approx(0.3) and head.box_predictor.smooth_l1_beta == pytest.approx(b2)


def test_vf8_iou_floor_and_no_cap():
    """Window IoUs 60/140 = 0.43, 70/130 = 0.54, 36/164 ... mean < 0.4 -> T = 0.4; all 0.9+ ->
    T = mean (no cap at any value below 1)."""
    head = _head(_window_cfg(2))
    for s in (40.0, 42.0):  # IoU 0.4286, 0.4085 -> fg at T 0.4, mean 0.4185
        _window_step(head, s)
    assert head.dynamic_state.current()[0] == pytest.approx((60 / 140 + 58 / 142) / 2, abs=1e-5)
    head = _head(_window_cfg(2, INITIAL_IOU=0.3))
    for s in (45.0, 50.0):  # IoU 0.379, 0.333: mean below the floor
        _window_step(head, s)
    assert head.dynamic_state.current()[0] == pytest.approx(0.4)
    head = _head(_window_cfg(2))
    for s in (1.0, 2.0):
        _window_step(head, s)
    assert head.dynamic_state.current()[0] == pytest.approx((99 / 101 + 98 / 102) / 2, abs=1e-5)


@pytest.mark.parametrize("median,beta_eps,es,expected", [
    # Scaled to C = 10: S_E = 0.1 .. 1.0 -> numpy median 0.55, upper median 0.6
    ("numpy", 1e-15, [i / 10 for i in range(1, 11)], 0.55),
    ("upper", 1e-15, [i / 10 for i in range(1, 11)], 0.6),
    # 5 x 0 + 5 x 0.3 -> numpy 0.15, upper 0.3; 6 x 0 + 4 x 0.3 -> median 0: the default
    # keeps the previous beta (1.0), the authors' code (upper, no guard) sets beta = 0
    ("numpy", 1e-15, [0.0] * 5 + [0.3] * 5, 0.15),
    ("upper", 1e-15, [0.0] * 5 + [0.3] * 5, 0.3),
    ("numpy", 1e-15, [0.0] * 6 + [0.3] * 4, 1.0),
    ("upper", 0.0, [0.0] * 6 + [0.3] * 4, 0.0),
    # All 1.7 -> cap 1.0
    ("numpy", 1e-15, [1.7] * 10, 1.0),
])
def test_vf12_vf13_vf14_beta_window_median_through_forward(median, beta_eps, es, expected):
    head = _head(_window_cfg(10, MEDIAN=median, BETA_EPS=beta_eps))
    for e in reversed(es):  # order must not matter
        _, logged = _window_step(head, 20 * e)
        assert logged["dynamic_rcnn/beta_stat"] == pytest.approx(e, abs=1e-5)
    assert head.dynamic_state.current()[1] == pytest.approx(expected, abs=1e-5)
    _, logged = _window_step(head, 2.0)
    assert logged["dynamic_rcnn/beta"] == pytest.approx(expected, abs=1e-5)
    assert head.box_predictor.smooth_l1_beta == pytest.approx(expected, abs=1e-5)


def test_inference_decodes_boxes_and_scores():
    """Eval: zero weights, biases chosen: class probabilities softmax(2, 1, 0; background 0.5);
    class 1 regresses dx = 1 (a shift of w / 10). All three classes pass the 0.05 threshold."""
    head = _head(_cfg())
    head.eval()
    with torch.no_grad():
        for layer in (head.box_predictor.cls_score, head.box_predictor.bbox_pred):
            layer.weight.zero_()
            layer.bias.zero_()
        head.box_predictor.cls_score.bias.copy_(torch.tensor([2.0, 1.0, 0.0, 0.5]))
        head.box_predictor.bbox_pred.bias[4] = 1.0
        out, _ = head(None, _features(1), [_props([10, 10, 60, 60])])
    z = sum(math.exp(v) for v in (2.0, 1.0, 0.0, 0.5))
    expected = {0: ([10, 10, 60, 60], math.exp(2) / z), 1: ([15, 10, 65, 60], math.exp(1) / z),
                2: ([10, 10, 60, 60], 1 / z)}
    got = {int(c): (b.tolist(), float(s)) for b, s, c in
           zip(out[0].pred_boxes.tensor, out[0].scores, out[0].pred_classes)}
    assert sorted(got) == [0, 1, 2]
    for c, (box, score) in expected.items():
        assert got[c][0] == pytest.approx(box, abs=1e-4)
        assert got[c][1] == pytest.approx(score, abs=1e-6)
    assert int(head.dynamic_state.iteration) == 0
