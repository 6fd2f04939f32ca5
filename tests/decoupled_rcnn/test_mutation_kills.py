"""Values of the Decoupled R-CNN ROI heads that the end-to-end tests leave open (found by
mutation testing of ``heads.py`` / ``roi_heads.py``, see tests/MUTATION.md).

Everything is built from the R-50 config (narrow towers) through the public modules:
the stage loss weights times ``BBOX_REG_LOSS_WEIGHT``, the stage-0 coder taken from
``STAGE_TARGET_STDS[0]``, the empty-batch losses, the logged accuracies and per-stage positive
counts (values read back from Detectron2's ``EventStorage``), the per-stage IoU matchers
(no low-quality matches), the tower initialisations, the pooler scales and the config / input
errors. Expected values are computed here (DeltaXYWH coding, CE, L1, hand-counted IoUs).
"""
import math
import re

import pytest
import torch
from detectron2.layers import ShapeSpec
from detectron2.structures import Boxes, ImageList, Instances
from detectron2.utils.events import EventStorage

from decoupled_rcnn import DecoupledROIHeads
from decoupled_rcnn.heads import DecoupledFCHead

K = 80
SIZE = (400, 400)
SMALL = ["MODEL.ROI_BOX_HEAD.FC_DIM", 16]
STDS0 = [0.05, 0.05, 0.1, 0.1]  # stage 0 differs from ROI_BOX_HEAD.BBOX_REG_WEIGHTS (10, 10, 5, 5)
STDS1 = [0.1, 0.1, 0.2, 0.2]
WEIGHTED = SMALL + [
    "MODEL.DECOUPLED_RCNN.STAGE_TARGET_STDS",
    [STDS0, STDS1, [0.033, 0.033, 0.067, 0.067]],
    "MODEL.DECOUPLED_RCNN.STAGE_LOSS_WEIGHTS", [0.7, 0.4, 0.3],
    "MODEL.ROI_BOX_HEAD.BBOX_REG_LOSS_WEIGHT", 1.5,
]


def ref_encode(p, g, stds):
    pw, ph = p[2] - p[0], p[3] - p[1]
    gw, gh = g[2] - g[0], g[3] - g[1]
    d = [((g[0] + g[2]) - (p[0] + p[2])) / 2 / pw, ((g[1] + g[3]) - (p[1] + p[3])) / 2 / ph,
         math.log(gw / pw), math.log(gh / ph)]
    return [v / s for v, s in zip(d, stds)]


def ref_ce(logits, label):
    m = max(logits)
    return -(logits[label] - m - math.log(sum(math.exp(v - m) for v in logits)))


def _rows(props, gts, **fields):
    inst = Instances(SIZE)
    inst.proposal_boxes = Boxes(torch.tensor(props, dtype=torch.float32))
    inst.gt_boxes = Boxes(torch.tensor(gts, dtype=torch.float32))
    for k, v in fields.items():
        setattr(inst, k, torch.tensor(v, dtype=torch.int64))
    return inst


def _heads(make_cfg, fpn_shapes, opts=SMALL, channels=8):
    torch.manual_seed(0)
    return DecoupledROIHeads(make_cfg(opts=list(opts)), fpn_shapes(channels))


# ------------------------------------------------------------------ stage-0 / refine losses
P = [[10.0, 10, 60, 70], [40, 30, 140, 90], [100, 100, 180, 200], [20, 200, 120, 260],
     [200, 50, 260, 150]]
G = [[12.0, 14, 66, 70], [35, 30, 150, 100], [100, 100, 180, 200], [25, 190, 110, 250],
     [200, 50, 260, 150]]


def test_weighted_stage0_and_refine_losses_and_accuracy(make_cfg, fpn_shapes):
    """loss_cls = w0 · mean CE over classification rows; loss_box_reg_s0 = w0 · 1.5 · L1 of
    the GT-class deltas (stage-0 stds) over positive regression rows / all rows;
    loss_box_reg_s1 = w1 · 1.5 · L1 (stage-1 stds) over positives / (2 · R). The logged
    accuracy is 3/4 over the classification rows and 2/3 over their foreground rows."""
    heads = _heads(make_cfg, fpn_shapes, WEIGHTED)
    # rows 0-3 classification (labels 0, 2, K, 1), rows 4-7 regression (0, K, 3, K)
    props = P[:4] + P[1:5]
    gts = G[:4] + G[1:5]
    cls_labels = [0, 2, K, 1, -100, -100, -100, -100]
    reg_labels = [-100, -100, -100, -100, 0, K, 3, K]
    rows = _rows(props, gts, gt_classes=cls_labels, reg_classes=reg_labels)
    torch.manual_seed(1)
    scores = torch.randn(8, K + 1)
    for i, c in enumerate([0, 1, K, 1]):  # predicted classes: 3 of 4 right, fg 2 of 3
        scores[i, c] = 10.0
    deltas = torch.randn(8, 4 * K)
    with EventStorage() as storage:
        losses = heads.box_predictor.losses((scores, deltas), [rows])
        acc = storage.history("decoupled_rcnn/cls_accuracy").latest()
        fg_acc = storage.history("decoupled_rcnn/fg_cls_accuracy").latest()
    assert acc == pytest.approx(3 / 4)
    assert fg_acc == pytest.approx(2 / 3)
    ce = sum(ref_ce(scores[i].tolist(), cls_labels[i]) for i in range(4)) / 4
    l1 = 0.0
    for i in range(4, 8):
        c = reg_labels[i]
        if c < K:
            t = ref_encode(props[i], gts[i], STDS0)
            l1 += sum(abs(a - b) for a, b in zip(deltas[i, 4 * c:4 * c + 4].tolist(), t))
    assert set(losses) == {"loss_cls", "loss_box_reg_s0"}
    assert losses["loss_cls"].item() == pytest.approx(0.7 * ce, rel=1e-5)
    assert losses["loss_box_reg_s0"].item() == pytest.approx(0.7 * 1.5 * l1 / 8, rel=1e-5)

    refine = heads.refine_predictors[0]
    labels = [3, K, 0, K, 7]
    d1 = torch.randn(5, 4)
    out = refine.losses(d1, [_rows(P, G, gt_classes=labels)])
    l1 = sum(abs(a - b) for i, c in enumerate(labels) if c < K
             for a, b in zip(d1[i].tolist(), ref_encode(P[i], G[i], STDS1)))
    assert set(out) == {"loss_box_reg_s1"}
    assert out["loss_box_reg_s1"].item() == pytest.approx(0.4 * 1.5 * l1 / (2 * 5), rel=1e-5)


def test_single_classification_row_accuracy_is_logged(make_cfg, fpn_shapes):
    heads = _heads(make_cfg, fpn_shapes)
    rows = _rows(P[:2], G[:2], gt_classes=[4, -100], reg_classes=[-100, K])
    scores = torch.zeros(2, K + 1)
    scores[0, 4] = 5.0
    with EventStorage() as storage:
        heads.box_predictor.losses((scores, torch.zeros(2, 4 * K)), [rows])
        assert storage.history("decoupled_rcnn/cls_accuracy").latest() == 1.0
        assert storage.history("decoupled_rcnn/fg_cls_accuracy").latest() == 1.0


def test_losses_of_an_empty_batch_are_zero(make_cfg, fpn_shapes):
    """No images: every loss is an exact 0 and no accuracy is logged."""
    heads = _heads(make_cfg, fpn_shapes)
    with EventStorage() as storage:
        losses = heads.box_predictor.losses((torch.zeros(0, K + 1), torch.zeros(0, 4 * K)), [])
        refine = heads.refine_predictors[1].losses(torch.zeros(0, 4), [])
        assert not any(k.startswith("decoupled_rcnn/") for k in storage.histories())
    assert {k: v.item() for k, v in losses.items()} == {"loss_cls": 0.0, "loss_box_reg_s0": 0.0}
    assert {k: v.item() for k, v in refine.items()} == {"loss_box_reg_s2": 0.0}


# ------------------------------------------------------------------ per-stage positives
def test_positive_counts_per_stage_use_each_stage_matcher(make_cfg, fpn_shapes):
    """Zero deltas keep every box, so each stage re-matches the same regression boxes with its
    own IoU threshold (0.5, 0.6, 0.5) and no low-quality matches. Image A: IoUs 1, 0.909,
    0.556, 0 with a class-0 GT; image B: 0.714 (class 5), 0.4 (the best box of a class-2 GT),
    0. Logged mean positives per image: s0 (3 + 1) / 2, s1 (2 + 1) / 2, s2 (3 + 1) / 2."""
    heads = _heads(make_cfg, fpn_shapes,
                   SMALL + ["MODEL.DECOUPLED_RCNN.REG_IOU_THRESHOLDS", [0.5, 0.6, 0.5]])
    for lin in [heads.box_predictor.bbox_pred] + [p.bbox_pred for p in heads.refine_predictors]:
        with torch.no_grad():
            lin.weight.zero_()
            lin.bias.zero_()
    reg_a = [[100.0, 100, 200, 200], [100, 100, 200, 210], [100, 100, 200, 280],
             [300, 300, 380, 380]]
    reg_b = [[20.0, 20, 120, 160], [250, 20, 350, 270], [200, 300, 300, 390]]
    tgt_a = Instances(SIZE, gt_boxes=Boxes(torch.tensor([[100.0, 100, 200, 200]])),
                      gt_classes=torch.tensor([0]))
    tgt_b = Instances(SIZE, gt_boxes=Boxes(torch.tensor([[20.0, 20, 120, 120],
                                                         [250, 20, 350, 120]])),
                      gt_classes=torch.tensor([5, 2]))

    def props(boxes):
        return Instances(SIZE, proposal_boxes=Boxes(torch.tensor(boxes)),
                         objectness_logits=torch.zeros(len(boxes)))

    torch.manual_seed(0)
    feats = {f"p{i}": torch.randn(2, 8, SIZE[0] // 2 ** i, SIZE[1] // 2 ** i) for i in range(2, 7)}
    heads.train()
    with EventStorage() as storage:
        heads(ImageList(torch.zeros(2, 3, *SIZE), [SIZE, SIZE]), feats,
              ([props(reg_a), props(reg_b)], [props(reg_a), props(reg_b)]), [tgt_a, tgt_b])
        logged = {k: [v for v, _ in storage.history(k).values()]
                  for k in storage.histories() if k.startswith("decoupled_rcnn/num_reg_pos")}
    assert logged == {"decoupled_rcnn/num_reg_pos_s0": [2.0],
                      "decoupled_rcnn/num_reg_pos_s1": [1.5],
                      "decoupled_rcnn/num_reg_pos_s2": [2.0]}


# ------------------------------------------------------------------ construction
def test_tower_inits_coder_and_pooler_scales(make_cfg, fpn_shapes):
    """TOWER_INIT c2_xavier: |w| <= sqrt(3 / fan_in), bias 0; REFINE_TOWER_INIT
    pytorch_default: nonzero bias; stage-0 coder weights 1 / STAGE_TARGET_STDS[0]; RoIAlign on
    p2..p5 at scales 1/4 .. 1/32."""
    heads = _heads(make_cfg, fpn_shapes, WEIGHTED + ["MODEL.DECOUPLED_RCNN.TOWER_INIT",
                                                     "c2_xavier"])
    for tower in (heads.box_head_cls, heads.box_head_reg):
        fc, fan_in, fan_out = tower.fc1, 8 * 7 * 7, 16
        bound = math.sqrt(3 / fan_in)
        assert bound < math.sqrt(6 / (fan_in + fan_out))  # distinguishable from xavier
        assert fc.weight.abs().max().item() <= bound * (1 + 1e-6)
        assert fc.weight.abs().max().item() > 0.8 * bound
        assert fc.bias.abs().max().item() == 0.0
    for tower in heads.refine_heads:
        assert tower.fc1.bias.abs().max().item() > 0.0
        assert tower.fc1.weight.abs().max().item() <= 1 / math.sqrt(8 * 7 * 7) * (1 + 1e-6)
    assert heads.box_predictor.box2box_transform.weights == pytest.approx(
        tuple(1 / s for s in STDS0))
    pooler = heads.box_pooler
    assert (pooler.min_level, pooler.max_level) == (2, 5)
    assert [p.spatial_scale for p in pooler.level_poolers] == [1 / 4, 1 / 8, 1 / 16, 1 / 32]


def test_fc_head_default_init_is_xavier_uniform(make_cfg):
    torch.manual_seed(0)
    head = DecoupledFCHead(make_cfg(opts=SMALL), ShapeSpec(channels=8, height=7, width=7))
    bound = math.sqrt(6 / (8 * 49 + 16))
    assert head.fc1.weight.abs().max().item() <= bound * (1 + 1e-6)
    assert head.fc1.weight.abs().max().item() > math.sqrt(3 / (8 * 49))  # not c2_xavier
    assert head.fc1.bias.abs().max().item() == 0.0


# ------------------------------------------------------------------ errors
def _exact(msg):
    return "^" + re.escape(msg) + "$"


def test_config_and_input_errors(make_cfg, fpn_shapes):
    with pytest.raises(NotImplementedError, match=_exact(
            "DecoupledROIHeads is box-only: set MODEL.MASK_ON and MODEL.KEYPOINT_ON to False")):
        _heads(make_cfg, fpn_shapes, SMALL + ["MODEL.MASK_ON", True])
    shapes = fpn_shapes(8)
    shapes["p3"] = ShapeSpec(channels=16, stride=8)
    cfg = make_cfg(opts=SMALL)
    feats = list(cfg.MODEL.ROI_HEADS.IN_FEATURES)
    with pytest.raises(ValueError, match=_exact(
            f"MODEL.ROI_HEADS.IN_FEATURES {feats} have different channel counts [8, 16]")):
        DecoupledROIHeads(cfg, shapes)

    heads = _heads(make_cfg, fpn_shapes)
    heads.train()
    inst = Instances(SIZE, proposal_boxes=Boxes(torch.tensor([[0.0, 0, 10, 10]])))
    images = ImageList(torch.zeros(2, 3, *SIZE), [SIZE, SIZE])
    with pytest.raises(ValueError, match=_exact(
            "DecoupledROIHeads needs the (classification, regression) proposal pair in "
            "training: set MODEL.PROPOSAL_GENERATOR.NAME to 'DualNMSRPN'")):
        heads(images, {}, [inst, inst], [])  # a list of two images is not the pair
    with pytest.raises(ValueError, match=_exact(
            "DecoupledROIHeads requires 'targets' in training")):
        heads(images, {}, ([inst], [inst]), None)


# ------------------------------------------------------------------ inference
def test_soft_nms_split_threshold_reaches_inference(make_cfg, fpn_shapes):
    """SOFT_NMS_SPLIT_THRESH 1: every candidate set takes the mmcv split path, which keeps the
    original scores; two class-3 boxes at IoU 90/110 both keep p = softmax(bias)[3] (linear
    soft-NMS without the quirk would decay the second to p · (1 - 0.818))."""
    heads = _heads(make_cfg, fpn_shapes, SMALL + [
        "MODEL.DECOUPLED_RCNN.TEST_NMS_TYPE", "soft_nms_linear",
        "MODEL.DECOUPLED_RCNN.SOFT_NMS_SPLIT_THRESH", 1])
    bias = torch.full((K + 1,), -10.0)
    bias[3], bias[K] = 5.0, 4.0
    with torch.no_grad():
        heads.box_predictor.cls_score.weight.zero_()
        heads.box_predictor.cls_score.bias.copy_(bias)
        for lin in [heads.box_predictor.bbox_pred] + [q.bbox_pred for q in heads.refine_predictors]:
            lin.weight.zero_()
            lin.bias.zero_()
    e = [math.exp(v) for v in bias.tolist()]
    p = e[3] / sum(e)
    boxes = [[100.0, 100, 200, 200], [110, 100, 210, 200]]
    torch.manual_seed(0)
    feats = {f"p{i}": torch.randn(1, 8, SIZE[0] // 2 ** i, SIZE[1] // 2 ** i) for i in range(2, 7)}
    heads.eval()
    with torch.no_grad():
        (det,), _ = heads(ImageList(torch.zeros(1, 3, *SIZE), [SIZE]), feats,
                          [Instances(SIZE, proposal_boxes=Boxes(torch.tensor(boxes)))])
    assert det.pred_classes.tolist() == [3, 3]
    assert det.scores.tolist() == pytest.approx([p, p], rel=1e-5)
    assert det.pred_boxes.tensor.flatten().tolist() == pytest.approx(sum(boxes, []), abs=1e-3)
