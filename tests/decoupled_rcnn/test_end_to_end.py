"""End-to-end values of the Decoupled R-CNN RPN and ROI heads built from the R-50 config
(through the public modules).

The heads run on hand-placed proposals and GT with hand-set weights: the last layers (stage-0
classifier and regressor, refine regressors) have zero weights and a chosen bias, so logits and
deltas are known constants. Expected losses, boxes and scores are computed here from the
paper's / authors' formulas (DeltaXYWH coding with per-stage stds, CE, L1, the authors'
normalisers, NMS / linear soft-NMS), independently of the package.
"""
import math

import pytest
import torch
from detectron2.modeling import build_proposal_generator
from detectron2.structures import Boxes, ImageList, Instances
from detectron2.utils.events import EventStorage

from decoupled_rcnn import DecoupledROIHeads

SMALL = ["MODEL.ROI_BOX_HEAD.FC_DIM", 16]
SIZE = (800, 800)
STDS = [(0.1, 0.1, 0.2, 0.2), (0.05, 0.05, 0.1, 0.1), (0.033, 0.033, 0.067, 0.067)]
CLAMP = abs(math.log(16 / 1000))
K = 80


# ---------------------------------------------------------------- independent references
def ref_encode(p, g, stds):
    pw, ph = p[2] - p[0], p[3] - p[1]
    gw, gh = g[2] - g[0], g[3] - g[1]
    d = [((g[0] + g[2]) - (p[0] + p[2])) / 2 / pw, ((g[1] + g[3]) - (p[1] + p[3])) / 2 / ph,
         math.log(gw / pw), math.log(gh / ph)]
    return [v / s for v, s in zip(d, stds)]


def ref_decode(p, d, stds, size=SIZE):
    """mmdet DeltaXYWHBBoxCoder.decode: both-sided clamp of dw, dh, then clip to the image."""
    dx, dy, dw, dh = [v * s for v, s in zip(d, stds)]
    dw, dh = max(-CLAMP, min(CLAMP, dw)), max(-CLAMP, min(CLAMP, dh))
    pw, ph = p[2] - p[0], p[3] - p[1]
    cx, cy = (p[0] + p[2]) / 2 + dx * pw, (p[1] + p[3]) / 2 + dy * ph
    w, h = pw * math.exp(dw), ph * math.exp(dh)
    box = [cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2]
    return [min(max(box[0], 0), size[1]), min(max(box[1], 0), size[0]),
            min(max(box[2], 0), size[1]), min(max(box[3], 0), size[0])]


def ref_iou(a, b):
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def softmax(v):
    m = max(v)
    e = [math.exp(x - m) for x in v]
    return [x / sum(e) for x in e]


# ---------------------------------------------------------------- hand-set heads
def _set(linear, bias):
    with torch.no_grad():
        linear.weight.zero_()
        linear.bias.copy_(torch.as_tensor(bias, dtype=torch.float32).flatten())


def _instances(boxes, **fields):
    inst = Instances(SIZE)
    inst.proposal_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4))
    inst.objectness_logits = torch.linspace(1.0, 0.0, len(boxes))
    return inst


def _target(boxes, classes):
    inst = Instances(SIZE)
    inst.gt_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4))
    inst.gt_classes = torch.tensor(classes, dtype=torch.int64)
    return inst


def _features(channels=8):
    torch.manual_seed(0)
    return {f"p{i}": torch.randn(1, channels, SIZE[0] // 2 ** i, SIZE[1] // 2 ** i)
            for i in range(2, 7)}


LOGITS = torch.linspace(-1.0, 1.0, K + 1).tolist()
LOGITS[17] = 2.0  # the arg-max foreground class ...
LOGITS[K] = 3.0  # ... of a background-like proposal (its deltas are used anyway)


def _heads(make_cfg, fpn_shapes, opts=(), d0=None, refine=((1.0, 0, 0, 0), (1.0, 0, 0, 0))):
    torch.manual_seed(0)
    heads = DecoupledROIHeads(make_cfg(opts=SMALL + list(opts)), fpn_shapes(8))
    _set(heads.box_predictor.cls_score, LOGITS)
    if d0 is None:  # class 17: (1, 0, 0, 0); every other class something else
        d0 = torch.tensor([[0.3, -0.4, 0.2, 0.1]] * K)
        d0[17] = torch.tensor([1.0, 0, 0, 0])
    _set(heads.box_predictor.bbox_pred, d0)
    for pred, d in zip(heads.refine_predictors, refine):
        _set(pred.bbox_pred, d)
    return heads


# ---------------------------------------------------------------- RPN
def test_rpn_sets_use_their_own_nms_thresholds(make_cfg, fpn_shapes):
    """Hand-made candidates a > b > c > d by objectness, IoU(a, b) = 0.80, IoU(a, c) = 0.90:
    NMS 0.7 keeps {a, d} (classification set), NMS 0.85 keeps {a, b, d} (regression set)."""
    cfg = make_cfg(opts=SMALL)
    rpn = build_proposal_generator(cfg, fpn_shapes(8))
    a, b, c, d = [10.0, 10, 110, 110], [21.0, 10, 121, 110], [15.0, 10, 115, 110], \
        [200.0, 200, 250, 260]
    assert ref_iou(a, b) == pytest.approx(0.8018, abs=1e-4)
    assert ref_iou(a, c) == pytest.approx(0.9048, abs=1e-4)
    anchors = [Boxes(torch.tensor([a, b, c, d]))]
    logits = [torch.tensor([[5.0, 4.0, 3.0, 1.0]])]
    deltas = [torch.zeros(1, 4, 4)]
    rpn.train()
    cls_set, reg_set = rpn.predict_proposals(anchors, logits, deltas, [(300, 300)])
    assert cls_set[0].proposal_boxes.tensor.tolist() == [a, d]
    assert reg_set[0].proposal_boxes.tensor.tolist() == [a, b, d]
    rpn.eval()
    (test_set,) = rpn.predict_proposals(anchors, logits, deltas, [(300, 300)])
    assert test_set.proposal_boxes.tensor.tolist() == [a, d]


# ---------------------------------------------------------------- inference
def _infer(heads, boxes):
    heads.eval()
    with torch.no_grad():
        (det,), _ = heads(ImageList(torch.zeros(1, 3, *SIZE), [SIZE]), _features(),
                          [_instances(boxes)])
    return det


def test_worked_decode_example(make_cfg, fpn_shapes):
    """P = [100,100,200,200], argmax-class delta (1,0,0,0), refine deltas (1,0,0,0):
    B1 = [110,100,210,200], B2 = [115,...], B3 = [118.3,100,218.3,200]; scores = softmax of the
    stage-0 logits; one shared box for every class."""
    heads = _heads(make_cfg, fpn_shapes)
    heads.box_predictor.test_nms_thresh = 1.0
    det = _infer(heads, [[100.0, 100, 200, 200]])
    b = [100.0, 100, 200, 200]
    for s in range(3):
        b = ref_decode(b, [1.0, 0, 0, 0], STDS[s])
    assert b == pytest.approx([118.3, 100, 218.3, 200])
    probs = softmax(LOGITS)
    expected = sorted([p for p in probs[:K] if p > 0.001], reverse=True)
    assert det.scores.tolist() == pytest.approx(expected, rel=1e-5)
    for i, c in enumerate(det.pred_classes.tolist()):
        assert det.scores[i].item() == pytest.approx(probs[c], rel=1e-5)
    torch.testing.assert_close(det.pred_boxes.tensor,
                               torch.tensor([b] * len(det)), atol=1e-3, rtol=0)


def test_stage0_log_size_clamped_on_both_sides(make_cfg, fpn_shapes):
    """A raw stage-0 log-width delta of -50 (= -10 after std 0.2) is clamped to
    -4.135: the width shrinks to 100·16/1000 = 1.6 px, not 100·e^-10."""
    d0 = torch.zeros(K, 4)
    d0[17, 2] = -50.0
    heads = _heads(make_cfg, fpn_shapes, d0=d0, refine=((0.0, 0, 0, 0), (0.0, 0, 0, 0)))
    det = _infer(heads, [[100.0, 100, 200, 200]])
    box = det.pred_boxes.tensor[0]
    assert (box[2] - box[0]).item() == pytest.approx(1.6, rel=1e-4)
    torch.testing.assert_close(box, torch.tensor([149.2, 100, 150.8, 200]), atol=1e-3, rtol=0)


@pytest.mark.parametrize("nms_type", ["nms", "soft_nms_linear"])
def test_nms_and_soft_nms_through_the_heads(make_cfg, fpn_shapes, nms_type):
    """Two proposals whose final boxes overlap at IoU 0.6 (same size, same
    deltas). Hard NMS 0.5 keeps one detection per class; linear soft-NMS keeps both, the
    second with score·(1 − 0.6)."""
    heads = _heads(make_cfg, fpn_shapes, ["MODEL.DECOUPLED_RCNN.TEST_NMS_TYPE", nms_type])
    p, q = [100.0, 100, 200, 200], [125.0, 100, 225, 200]
    assert ref_iou(p, q) == pytest.approx(0.6)
    det = _infer(heads, [p, q])
    probs = softmax(LOGITS)[:K]
    bp, bq = p, q
    for s in range(3):
        bp, bq = ref_decode(bp, [1.0, 0, 0, 0], STDS[s]), ref_decode(bq, [1.0, 0, 0, 0], STDS[s])
    assert ref_iou(bp, bq) == pytest.approx(0.6, abs=1e-6)
    expected = [(pr, c, bp) for c, pr in enumerate(probs) if pr > 0.001]
    if nms_type == "soft_nms_linear":
        expected += [(pr * 0.4, c, bq) for c, pr in enumerate(probs)
                     if pr > 0.001 and pr * 0.4 >= 0.001]
    expected = sorted(expected, key=lambda e: -e[0])[:100]
    assert len(det) == len(expected)
    got = sorted(zip(det.scores.tolist(), det.pred_classes.tolist(),
                     det.pred_boxes.tensor.tolist()), key=lambda e: (-e[0], e[1]))
    expected = sorted(expected, key=lambda e: (-e[0], e[1]))
    for (s, c, box), (es, ec, ebox) in zip(got, expected):
        assert c == ec and s == pytest.approx(es, rel=1e-5)
        assert box == pytest.approx(ebox, abs=1e-3)


# ---------------------------------------------------------------- training
G = [100.0, 100.0, 200.0, 200.0]
P_CLS = [[100.0, 100, 200, 200], [110, 100, 210, 200], [150, 100, 250, 200], [300, 300, 400, 400]]
P_REG = [[105.0, 100, 205, 200], [100, 100, 200, 200], [133, 100, 233, 200], [134, 100, 234, 200]]
D0 = [0.5, 0.2, 0.1, -0.1]  # stage-0 deltas of class 17
D1 = [-0.4, 0.3, 0.2, 0.1]  # stage-1 deltas
D2 = [0.2, -0.1, -0.3, 0.2]  # stage-2 deltas


def test_worked_example_losses_through_the_heads(make_cfg, fpn_shapes):
    """The worked example through `DecoupledROIHeads.forward`: CE over the 5 classification
    rows / 5; stage-0 L1 over the 3 positive regression rows / 9; refinement of the positives
    with the stage-0 coder (negatives unchanged), re-matching at IoU 0.5, stage-1 and stage-2
    L1 with their own coders / (2·4), times 0.5 and 0.25."""
    d0 = torch.zeros(K, 4)
    d0[17] = torch.tensor(D0)
    heads = _heads(make_cfg, fpn_shapes, d0=d0, refine=(D1, D2))
    heads.train()
    with EventStorage():
        samples, losses = heads(ImageList(torch.zeros(1, 3, *SIZE), [SIZE]), _features(),
                                ([_instances(P_CLS)], [_instances(P_REG)]), [_target([G], [17])])
    probs = softmax(LOGITS)
    ce = -(3 * math.log(probs[17]) + 2 * math.log(probs[K])) / 5
    # stage 0: positives r0, r1, r2 (r2 at IoU 0.50376, inclusive); targets
    targets0 = [ref_encode(r, G, STDS[0]) for r in P_REG[:3]]
    assert [t[0] for t in targets0] == pytest.approx([-0.5, 0.0, -3.3])
    l0 = sum(abs(a - b) for t in targets0 for a, b in zip(D0, t)) / 9
    # refinement: positives decoded with the stage-0 coder, r3 unchanged
    stage_boxes = [ref_decode(r, D0, STDS[0]) for r in P_REG[:3]] + [P_REG[3]]
    expected = {"loss_cls": ce, "loss_box_reg_s0": l0}
    for s, (d, w) in enumerate([(D1, 0.5), (D2, 0.25)], start=1):
        pos = [b for b in stage_boxes if ref_iou(b, G) >= 0.5]
        neg = [b for b in stage_boxes if ref_iou(b, G) < 0.5]
        assert len(pos) in (1, 2, 3)  # the case keeps some positives at every stage
        l1 = sum(abs(a - t) for b in pos for a, t in zip(d, ref_encode(b, G, STDS[s])))
        expected[f"loss_box_reg_s{s}"] = l1 / (2 * len(stage_boxes)) * w
        stage_boxes = [ref_decode(b, d, STDS[s]) for b in pos] + neg
    assert set(losses) == set(expected)
    for k, v in expected.items():
        assert losses[k].item() == pytest.approx(v, rel=1e-5), k
    # the classification samples returned to the caller: {g, c0, c1} positives + {c2, c3}
    assert sorted(samples[0].gt_classes.tolist()) == [17, 17, 17, K, K]


# ---------------------------------------------------------------- FPN init
@pytest.mark.parametrize("meta_arch,mode", [("DecoupledRCNN", "xavier_uniform"),
                                            ("DecoupledRCNN", "c2_xavier"),
                                            ("GeneralizedRCNN", "xavier_uniform")])
def test_fpn_init(make_cfg, config_paths, meta_arch, mode):
    """The configs' `DecoupledRCNN` initialises every FPN conv as mmdet's xavier_init
    (uniform, bound sqrt(6 / (fan_in + fan_out)), bias 0); "c2_xavier" and Detectron2's
    GeneralizedRCNN keep Detectron2's c2_xavier_fill (bound sqrt(3 / fan_in), bias 0)."""
    from detectron2.modeling import build_model
    from torch import nn

    cfg = make_cfg(opts=config_paths["tiny_opts"] + [
        "MODEL.META_ARCHITECTURE", meta_arch, "MODEL.DECOUPLED_RCNN.FPN_INIT", mode])
    torch.manual_seed(0)
    model = build_model(cfg)
    assert type(model).__name__ == meta_arch
    xavier = meta_arch == "DecoupledRCNN" and mode == "xavier_uniform"
    convs = [(n, m) for n, m in model.backbone.named_modules()
             if isinstance(m, nn.Conv2d) and not n.startswith("bottom_up")]
    assert len(convs) == 8  # 4 lateral + 4 output convs
    distinct = 0
    for name, conv in convs:
        k = conv.kernel_size[0] * conv.kernel_size[1]
        fan_in, fan_out = conv.in_channels * k, conv.out_channels * k
        bound = math.sqrt(6 / (fan_in + fan_out)) if xavier else math.sqrt(3 / fan_in)
        w = conv.weight
        assert w.abs().max().item() <= bound * (1 + 1e-6), name
        assert w.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.1), name
        assert conv.bias.abs().max().item() == 0.0, name
        other = math.sqrt(3 / fan_in) if xavier else math.sqrt(6 / (fan_in + fan_out))
        distinct += abs(other / bound - 1) > 0.15
    assert distinct >= 3  # the wider lateral convs tell the two schemes apart


# ---------------------------------------------------------------- mutation-testing survivors
def test_rpn_uses_training_topk_for_both_sets(make_cfg, fpn_shapes):
    """Training takes the *training* pre-/post-NMS top-k (pre 4, post 1 here; the test values
    are pre 2, post 4): the classification set is {a}, the regression set {a, b, d}."""
    rpn = build_proposal_generator(make_cfg(opts=SMALL), fpn_shapes(8))
    a, b, c, d = [10.0, 10, 110, 110], [21.0, 10, 121, 110], [15.0, 10, 115, 110], \
        [200.0, 200, 250, 260]
    rpn.pre_nms_topk = {True: 4, False: 2}
    rpn.post_nms_topk = {True: 1, False: 4}
    rpn.train()
    cls_set, reg_set = rpn.predict_proposals(
        [Boxes(torch.tensor([a, b, c, d]))], [torch.tensor([[5.0, 4.0, 3.0, 1.0]])],
        [torch.zeros(1, 4, 4)], [(300, 300)])
    assert cls_set[0].proposal_boxes.tensor.tolist() == [a]
    assert reg_set[0].proposal_boxes.tensor.tolist() == [a, b, d]


def test_positive_first_sampler_counts_class_zero():
    from decoupled_rcnn.sampling import positive_first_sample

    labels = torch.tensor([0, 3, 1, 3, 0, -1, 3])  # K = 3: class 0 is a foreground class
    pos, neg = positive_first_sample(labels, 5, 3)
    assert pos.tolist() == [0, 2, 4] and sorted(neg.tolist()) in ([1, 3], [1, 6], [3, 6])
    pos, neg = positive_first_sample(labels, 3, 3)  # exactly the budget: all positives
    assert pos.tolist() == [0, 2, 4] and neg.numel() == 0


def test_two_sided_clamp_per_class_and_coordinate():
    """Class-specific (R, 8) deltas with different dw / dh weights: every log-size delta of
    every class is clamped from below at -log(1000/16) (times its own weight)."""
    from detectron2.modeling.box_regression import Box2BoxTransform

    from decoupled_rcnn.box_coder import apply_deltas_clamped, decode_and_clip

    t = Box2BoxTransform(weights=(10.0, 10.0, 5.0, 2.5))
    deltas = torch.tensor([[0.0, 0, -60.0, 0, 0, 0, 0, -60.0]])
    out = apply_deltas_clamped(t, deltas, torch.tensor([[100.0, 100, 200, 300]])).view(2, 4)
    widths, heights = out[:, 2] - out[:, 0], out[:, 3] - out[:, 1]
    assert widths.tolist() == pytest.approx([100 * 16 / 1000, 100], rel=1e-4)
    assert heights.tolist() == pytest.approx([200, 200 * 16 / 1000], rel=1e-4)
    empty = decode_and_clip(t, torch.zeros(0, 4), [torch.zeros(0, 4)] * 2, [SIZE] * 2)
    assert [tuple(e.shape) for e in empty] == [(0, 4), (0, 4)]


def test_soft_nms_inference_edges():
    """Strict score threshold, top-k 0, non-finite rows dropped, class-specific boxes, image
    size kept, and the mmcv split quirk from exactly ``split_thresh`` candidates on."""
    from decoupled_rcnn.inference import soft_nms_inference

    boxes = torch.tensor([[0.0, 0, 10, 10], [50, 50, 60, 60], [0, 0, float("nan"), 10]])
    scores = torch.tensor([[0.5, 0.2, 0.3], [0.1, 0.6, 0.3], [0.9, 0.0, 0.1]])
    r = soft_nms_inference(boxes, scores, (80, 90), 0.1, 0.5, -1, 1e-3, 0)
    assert r.image_size == (80, 90)
    got = sorted(zip(r.pred_classes.tolist(), r.scores.tolist()))
    assert [g[0] for g in got] == [0, 1, 1]  # (row 1, class 0) has score == 0.1: not kept
    assert [g[1] for g in got] == pytest.approx([0.5, 0.2, 0.6])
    assert len(soft_nms_inference(boxes, scores, (80, 90), 0.1, 0.5, 0, 1e-3, 0)) == 0
    # class-specific boxes: class c of row i uses boxes[i, 4c:4c+4]
    cs = torch.tensor([[0.0, 0, 10, 10, 20, 20, 30, 30], [50, 50, 60, 60, 1, 1, 5, 5]])
    r = soft_nms_inference(cs, scores[:2], (80, 90), 0.15, 0.5, -1, 1e-3, 0)
    got = {(c, tuple(b)) for c, b in zip(r.pred_classes.tolist(), r.pred_boxes.tensor.tolist())}
    assert got == {(0, (0.0, 0, 10, 10)), (1, (20.0, 20, 30, 30)), (1, (1.0, 1, 5, 5))}
    # two same-class boxes at IoU 0.6: 2 candidates = split_thresh -> original scores
    pair = torch.tensor([[0.0, 0, 100, 100], [25, 0, 125, 100]])
    probs = torch.tensor([[0.9, 0.1], [0.8, 0.2]])
    quirk = soft_nms_inference(pair, probs, (200, 200), 0.5, 0.5, -1, 1e-3, split_thresh=2)
    assert quirk.scores.tolist() == pytest.approx([0.9, 0.8])
    clean = soft_nms_inference(pair, probs, (200, 200), 0.5, 0.5, -1, 1e-3, split_thresh=3)
    assert clean.scores.tolist() == pytest.approx([0.9, 0.32])
