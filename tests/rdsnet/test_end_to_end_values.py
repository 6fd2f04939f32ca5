"""RDSNet end to end by value: the meta-architecture built from a config, driven on hand-made
inputs, against references written here from the formulas of the paper and the authors' code
(never the package's code).

Training: the predictors and the pixel-stream projection are
zeroed, so every anchor predicts its bias (constant class logits, deltas and representations)
and every pixel the same embedding. The expected focal, smooth-L1 and mask losses then follow
from the mmdet anchors, the "+1" assignment, the GT-mask downsampling, the training crop, the
hard-negative mining and the three normalisers.

Inference: the head and pixel-stream outputs are replaced by
hand-made maps; the expected boxes (decode, clip, rescale to the original image, "+1" NMS
there, "+1" export), scores, classes, masks (x4 bilinear, unpad, bilinear with corners
aligned to the original size, softmax, 10 % crop, > 0.4) and MBRM boxes are computed here.
"""
import math

import pytest
import rdsnet_tiny
import torch
import torch.nn.functional as F
from detectron2.modeling import build_model
from detectron2.structures import BitMasks, Boxes, Instances
from detectron2.utils.events import EventStorage

K = 3  # classes of the tiny config
D = 32  # representation dimension d
# One anchor per location (ratio 1, size 4 x stride): the ratio-1 / scale-4 column of mmdet's.
ONE_ANCHOR_OPTS = [
    "MODEL.ANCHOR_GENERATOR.SIZES", [[32], [64], [128], [256], [512]],
    "MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS", [[1.0]],
]
BASE_ANCHORS = {8: [-12, -12, 19, 19], 16: [-24, -24, 39, 39], 32: [-48, -48, 79, 79],
                64: [-96, -96, 159, 159], 128: [-192, -192, 319, 319]}
STRIDES = (8, 16, 32, 64, 128)


def _model(opts=()):
    torch.manual_seed(0)
    return build_model(rdsnet_tiny.tiny_cfg(opts=ONE_ANCHOR_OPTS + list(opts)))


# ----------------------------------------------------------------------------- references
def ref_grids(h, w):
    """FPN sizes of a (h, w) batch (multiples of 32): P3-P5 exact, P6/P7 stride-2 convs."""
    g = [(h // 8, w // 8), (h // 16, w // 16), (h // 32, w // 32)]
    g.append((math.ceil(g[2][0] / 2), math.ceil(g[2][1] / 2)))
    g.append((math.ceil(g[3][0] / 2), math.ceil(g[3][1] / 2)))
    return g


def ref_anchors(grids):
    """All anchors, (level, y, x) order: base anchor + (j s, i s, j s, i s)."""
    out = []
    for (gh, gw), s in zip(grids, STRIDES):
        for i in range(gh):
            for j in range(gw):
                b = BASE_ANCHORS[s]
                out.append([b[0] + j * s, b[1] + i * s, b[2] + j * s, b[3] + i * s])
    return torch.tensor(out, dtype=torch.float64)


def ref_valid(grids, pad_h, pad_w):
    """mmdet valid flags: location inside ceil(pad / stride)."""
    out = []
    for (gh, gw), s in zip(grids, STRIDES):
        for i in range(gh):
            for j in range(gw):
                out.append(i < math.ceil(pad_h / s) and j < math.ceil(pad_w / s))
    return torch.tensor(out)


def ref_iou(a, b, plus=1):
    """"+1" IoU of two inclusive boxes (``plus=0``: continuous boxes, no "+1")."""
    iw = min(a[2], b[2]) - max(a[0], b[0]) + plus
    ih = min(a[3], b[3]) - max(a[1], b[1]) + plus
    inter = max(iw, 0.0) * max(ih, 0.0)
    area = lambda x: (x[2] - x[0] + plus) * (x[3] - x[1] + plus)  # noqa: E731
    return inter / (area(a) + area(b) - inter)


def ref_assign(anchors, valid, gts, plus=1):
    """mmdet MaxIoUAssigner (neg < 0.4, pos >= 0.5, every anchor at a GT's max -> that GT).

    Returns labels (-1 ignore / invalid, 0 negative, 1 positive) and the assigned GT."""
    n = len(anchors)
    labels, assigned = [-1] * n, [-1] * n
    ious = [[ref_iou(g, a.tolist(), plus) if valid[k] else 0.0 for k, a in enumerate(anchors)]
            for g in gts]
    for k in range(n):
        if not valid[k]:
            continue
        best = max(range(len(gts)), key=lambda g: ious[g][k]) if gts else None
        m = ious[best][k] if gts else 0.0
        if m < 0.4:
            labels[k] = 0
        elif m >= 0.5:
            labels[k], assigned[k] = 1, best
    for g in range(len(gts)):
        gmax = max(ious[g][k] for k in range(n) if valid[k])
        for k in range(n):
            if valid[k] and ious[g][k] == gmax:
                labels[k], assigned[k] = 1, g
    return labels, assigned


def ref_encode(anchor, gt, plus=1):
    """mmdet bbox2delta with "+1" widths (``plus=0``: Detectron2's widths x2 - x1)."""
    pw, ph = anchor[2] - anchor[0] + plus, anchor[3] - anchor[1] + plus
    gw, gh = gt[2] - gt[0] + plus, gt[3] - gt[1] + plus
    px, py = (anchor[0] + anchor[2]) / 2, (anchor[1] + anchor[3]) / 2
    gx, gy = (gt[0] + gt[2]) / 2, (gt[1] + gt[3]) / 2
    return [(gx - px) / pw, (gy - py) / ph, math.log(gw / pw), math.log(gh / ph)]


def ref_focal(logit, target, alpha=0.25, gamma=2.0):
    p = 1 / (1 + math.exp(-logit))
    if target:
        return -alpha * (1 - p) ** gamma * math.log(p)
    return -(1 - alpha) * p ** gamma * math.log(1 - p)


def ref_smooth_l1(x, beta=0.11):
    x = abs(x)
    return 0.5 * x * x / beta if x < beta else x - 0.5 * beta


def ref_crop_range(lo, hi, size, padding, plus=1):
    """Crop along one axis: pad = max(padding (hi - lo + 1), 1); [int(lo - pad), int(hi + pad))."""
    pad = max(padding * (hi - lo + plus), 1.0)
    return int(max(lo - pad, 0.0)), int(min(hi + pad, float(size)))


def ref_crop(box, h, w, padding, plus=1):
    x1, x2 = ref_crop_range(box[0], box[2], w, padding, plus)
    y1, y2 = ref_crop_range(box[1], box[3], h, padding, plus)
    m = torch.zeros(h, w, dtype=torch.bool)
    m[y1:y2, x1:x2] = True
    return m


def ref_stride4_targets(mask):
    """Stride-4 pixel (r, c) is foreground iff >= 3 of {4r+1, 4r+2} x {4c+1, 4c+2} are."""
    h, w = mask.shape[0] // 4, mask.shape[1] // 4
    out = torch.zeros(h, w, dtype=torch.long)
    for r in range(h):
        for c in range(w):
            out[r, c] = int(mask[4 * r + 1 : 4 * r + 3, 4 * c + 1 : 4 * c + 3].sum() >= 3)
    return out


def ref_instance_mask_loss(targets, ce_pos, ce_neg, ratio=1.0):
    """OHEM with the authors' ranking: sort all pixels by negative CE (positives / ignored = 0,
    ties in pixel order), keep negatives ranked < ratio n_pos; sum / (kept + 1)."""
    t = targets.flatten().tolist()
    n_pos = t.count(1)
    key = [ce_neg if v == 0 else 0.0 for v in t]
    order = sorted(range(len(t)), key=lambda k: -key[k])  # Python's sort is stable
    rank = {k: r for r, k in enumerate(order)}
    num_neg = min(ratio * n_pos, len(t) - 1)
    kept_neg = [k for k, v in enumerate(t) if v == 0 and rank[k] < num_neg]
    return (n_pos * ce_pos + len(kept_neg) * ce_neg) / (n_pos + len(kept_neg) + 1)


# ----------------------------------------------------------------------------- training
def _instances(h, w, box, cls, mask):
    inst = Instances((h, w))
    inst.gt_boxes = Boxes(torch.tensor([box], dtype=torch.float32))
    inst.gt_classes = torch.tensor([cls])
    inst.gt_masks = BitMasks(mask[None])
    return inst


def _rect(h, w, y1, y2, x1, x2):
    m = torch.zeros(h, w, dtype=torch.bool)
    m[y1:y2, x1:x2] = True
    return m


def _training_batch():
    """Image A 64x64 (one GT, a mask with a 3-of-4 and a 2-of-4 stride-4 block), image C 64x64
    without objects (all anchors negative; it adds max(0, 1) = 1 to the normaliser) and image B
    64x32 (one GT; half of the 64x64 batch tensor is its collation padding)."""
    mask_a = _rect(64, 64, 4, 36, 12, 44)
    mask_a[5, 13] = False  # block (1, 3) keeps 3 of 4: foreground
    mask_a[9, 13] = mask_a[10, 14] = False  # block (2, 3) keeps 2 of 4: background
    mask_b = _rect(64, 32, 20, 52, 2, 30)
    empty = Instances((64, 64))
    empty.gt_boxes = Boxes(torch.zeros(0, 4))
    empty.gt_classes = torch.zeros(0, dtype=torch.long)
    empty.gt_masks = BitMasks(torch.zeros(0, 64, 64, dtype=torch.bool))
    # boxes in Detectron2's continuous convention; inclusive pixel boxes are x2 - 1, y2 - 1
    a = _instances(64, 64, [12, 4, 44, 36], 1, mask_a)
    b = _instances(64, 32, [2, 20, 30, 52], 2, mask_b)
    return [
        {"image": torch.rand(3, 64, 64) * 255, "instances": a},
        {"image": torch.rand(3, 64, 64) * 255, "instances": empty},
        {"image": torch.rand(3, 64, 32) * 255, "instances": b},
    ], [([12, 4, 44, 36], 1, mask_a, (64, 64)), (None, None, None, (64, 64)),
        ([2, 20, 30, 52], 2, mask_b, (64, 32))]


CLS_LOGIT = -1.0
DELTA = (0.1, -0.2, 0.05, 0.3)


def _constant_predictions(model, margin):
    """Every anchor predicts CLS_LOGIT, DELTA and (o_bg, o_fg) = (0, margin e0); U = e0."""
    with torch.no_grad():
        for conv in (model.head.cls_score, model.head.bbox_pred, model.head.rep_pred,
                     model.pixel_stream.out):
            conv.weight.zero_()
            conv.bias.zero_()
        model.head.cls_score.bias.fill_(CLS_LOGIT)
        model.head.bbox_pred.bias.copy_(torch.tensor(DELTA))
        model.head.rep_pred.bias[D] = margin  # fg - bg logit = margin at every pixel
        model.pixel_stream.out.bias[0] = 1.0


def _expected_losses(images, margin, plus=1, gamma=2.0):
    """References of the three losses; GT boxes continuous, internally x2 - plus, y2 - plus."""
    grids = ref_grids(64, 64)
    anchors = ref_anchors(grids)
    cls_sum = box_sum = 0.0
    normaliser = 0
    mask_terms, sampled = 0.0, 0
    ce_pos = math.log1p(math.exp(-margin))
    ce_neg = math.log1p(math.exp(margin))
    if margin < -16.7:  # float32 cross-entropy of a confident background pixel is exactly 0
        ce_neg = 0.0
    for box, cls, mask, (h, w) in images:
        pad_h, pad_w = math.ceil(h / 32) * 32, math.ceil(w / 32) * 32
        if box is not None:
            box = [box[0], box[1], box[2] - plus, box[3] - plus]
        labels, _ = ref_assign(anchors, ref_valid(grids, pad_h, pad_w), [box] if box else [], plus)
        n_pos = labels.count(1)
        normaliser += max(n_pos, 1)
        for k, lab in enumerate(labels):
            if lab < 0:
                continue
            for c in range(K):
                cls_sum += ref_focal(CLS_LOGIT, lab == 1 and c == cls, gamma=gamma)
            if lab == 1:
                t = ref_encode(anchors[k].tolist(), box, plus)
                box_sum += sum(ref_smooth_l1(DELTA[j] - t[j]) for j in range(4))
        if box is None:
            continue
        # mask loss: every positive anchor of this (only) GT has the same loss
        padded = torch.zeros(pad_h, pad_w, dtype=torch.bool)
        padded[:h, :w] = mask
        targets = ref_stride4_targets(padded)
        # the crop uses the GT box clamped to the image, [0, w - plus] x [0, h - plus]
        cx = lambda v: min(max(v, 0), w - plus)  # noqa: E731
        cy = lambda v: min(max(v, 0), h - plus)  # noqa: E731
        clamped = [cx(box[0]), cy(box[1]), cx(box[2]), cy(box[3])]
        crop = ref_crop([v / 4 for v in clamped], pad_h // 4, pad_w // 4, 0.25, plus)
        targets[~crop] = -1
        mask_terms += n_pos * ref_instance_mask_loss(targets, ce_pos, ce_neg)
        sampled += n_pos
    return {
        "loss_cls": cls_sum / normaliser,
        "loss_box_reg": box_sum / normaliser,
        "loss_mask": mask_terms / (sampled + 1),
    }


@pytest.mark.parametrize("margin, plus_one", [(0.5, True), (-30.0, True), (0.5, False)])
def test_training_losses_by_value(margin, plus_one):
    """The loss_cls / loss_box_reg values are sums over counted / positive anchors divided by
    sum_i max(#pos_i, 1); loss_mask = per-instance OHEM losses / (#sampled + 1). With margin
    -30 the background CE saturates to 0 and the authors' ranking keeps fewer negatives.
    ``BOX_PLUS_ONE: False`` (Detectron2's box conventions) is checked with focal gamma 1.5."""
    gamma = 2.0 if plus_one else 1.5
    model = _model(["MODEL.RDSNET.BOX_PLUS_ONE", plus_one, "MODEL.RDSNET.FOCAL_LOSS_GAMMA", gamma])
    _constant_predictions(model, margin)
    batch, images = _training_batch()
    model.train()
    with EventStorage(0):
        losses = model(batch)
    expected = _expected_losses(images, margin, plus=int(plus_one), gamma=gamma)
    for name, value in expected.items():
        assert losses[name].item() == pytest.approx(value, rel=1e-5), name


@pytest.mark.parametrize("plus_one", [True, False])
def test_training_mask_loss_gt_boxes_across_the_image_border(plus_one):
    """GT boxes that leave the image (hand-made inputs; Detectron2's mapper clips them) are
    clamped to [0, w - 1] x [0, h - 1] ([0, w] x [0, h] without "+1") before the training crop,
    whose padding then follows the clamped size. Boxes chosen so that each clamp bound moves a
    crop edge (and the crop keeps fewer negatives than the mining would)."""
    batch, images = [], []
    for box, cls in (((23, 35, 66, 80), 0), ((-16, -16, 29, 29), 1), ((26, 20, 66, 66), 2)):
        mask = _rect(64, 64, max(box[1], 0), min(box[3], 64), max(box[0], 0), min(box[2], 64))
        inst = _instances(64, 64, list(box), cls, mask)
        batch.append({"image": torch.rand(3, 64, 64) * 255, "instances": inst})
        images.append((list(box), cls, mask, (64, 64)))
    model = _model(["MODEL.RDSNET.BOX_PLUS_ONE", plus_one])
    _constant_predictions(model, 0.5)
    model.train()
    with EventStorage(0):
        losses = model(batch)
    expected = _expected_losses(images, 0.5, plus=int(plus_one))
    for name, value in expected.items():
        assert losses[name].item() == pytest.approx(value, rel=1e-5), name


def test_training_reference_is_not_degenerate():
    """The hand-made case exercises what the test above guards: several positives per image,
    invalid anchors in B's padding, a crop that cuts the negatives below the positives, and a
    saturated case whose ranking differs from "positives last"."""
    grids = ref_grids(64, 64)
    anchors = ref_anchors(grids)
    assert anchors[2 * 8 + 3].tolist() == [12, 4, 43, 35]  # GT A is the P3 anchor (2, 3)
    valid_b = ref_valid(grids, 64, 32)
    assert int((~valid_b).sum()) == 86 - 44
    _, images = _training_batch()
    box_a = [12, 4, 43, 35]  # inclusive
    labels, _ = ref_assign(anchors, ref_valid(grids, 64, 64), [box_a])
    assert labels.count(1) > 1
    padded = images[0][2]
    targets = ref_stride4_targets(padded)
    assert int(targets.sum()) == 8 * 8 - 1
    crop = ref_crop([v / 4 for v in box_a], 16, 16, 0.25)
    assert int(crop.sum()) == 120 and int(((targets == 0) & crop).sum()) < int(targets.sum())
    targets[~crop] = -1
    with_ties = ref_instance_mask_loss(targets, 30.0, 0.0)
    positives_last = 63 * 30.0 / (63 + int((targets == 0).sum()) + 1)
    assert with_ties != pytest.approx(positives_last)


# ----------------------------------------------------------------------------- inference
IN_H, IN_W = 60, 90  # network input (padded to 64 x 96)
OUT_H, OUT_W = 120, 171  # requested output = original image size (scales 2 and 1.9)
SY, SX = OUT_H / IN_H, OUT_W / IN_W


def _e(i, scale=1.0):
    v = torch.zeros(D)
    v[i] = scale
    return v


# (P3 location (i, j), class, logit, target box at input scale (inclusive) or raw deltas
# (dx, dy, dw, dh), o_bg, o_fg)
DETECTIONS = [
    ((2, 2), 0, 3.0, [10.0, 10.0, 29.0, 19.0], _e(0, 0.0), _e(0)),
    # IoU 0.52 with the first at input scale, 9.4 / 19 = 0.495 at the original scale
    ((2, 3), 0, 2.0, [10.0, 10.0, 29.0, 14.2], _e(1, 5.0), _e(1, 5.0)),
    # decoded left of and above the image: clipped to the one-pixel column x = 0, y1 = 0
    ((4, 0), 1, 1.0, ("deltas", [-1.0, -1.0, 0.0, 0.0]), _e(2, 0.0), _e(2, 0.0)),
    # decoded across the bottom-right corner: clipped to x2 = 89, y2 = 59 (inclusive, w - 1)
    ((6, 10), 2, 0.5, ("deltas", [0.5, 0.25, 0.0, 0.0]), _e(0), _e(0, 2.0)),
]


def _fake_outputs():
    torch.manual_seed(3)
    pixel = torch.zeros(1, D, 16, 24)
    pixel[0, 0] = torch.randn(16, 24) * 3.0
    pixel[0, 1] = torch.randn(16, 24)

    def head(features):
        logits = [torch.full((1, K, f.shape[2], f.shape[3]), -20.0) for f in features]
        deltas = [torch.zeros(1, 4, f.shape[2], f.shape[3]) for f in features]
        reps = [torch.zeros(1, 2 * D, f.shape[2], f.shape[3]) for f in features]
        for (i, j), cls, logit, target, o_bg, o_fg in DETECTIONS:
            anchor = [BASE_ANCHORS[8][0] + 8 * j, BASE_ANCHORS[8][1] + 8 * i,
                      BASE_ANCHORS[8][2] + 8 * j, BASE_ANCHORS[8][3] + 8 * i]
            d = target[1] if target[0] == "deltas" else ref_encode(anchor, target)
            logits[0][0, cls, i, j] = logit
            deltas[0][0, :, i, j] = torch.tensor(d)
            reps[0][0, :, i, j] = torch.cat([o_bg, o_fg])
        return logits, deltas, reps

    return head, pixel


def _run(refine, opts=()):
    model = _model(["MODEL.RDSNET.MBRM.ENABLED", refine] + list(opts))
    head, pixel = _fake_outputs()
    model.head.forward = head
    model.pixel_stream.forward = lambda features: pixel
    model.eval()
    with torch.no_grad():
        out = model([{"image": torch.rand(3, IN_H, IN_W) * 255, "height": OUT_H, "width": OUT_W}])
    return out[0]["instances"], pixel[0]


def _expected_input_boxes():
    """Decoded, clipped boxes at the input scale (inclusive)."""
    boxes = []
    for (i, j), _, _, target, _, _ in DETECTIONS:
        if target[0] == "deltas":
            pw = ph = 32.0
            gx = (8 * j + 3.5) + target[1][0] * pw
            gy = (8 * i + 3.5) + target[1][1] * ph
            target = [gx - 0.5 * pw + 0.5, gy - 0.5 * ph + 0.5,
                      gx + 0.5 * pw - 0.5, gy + 0.5 * ph - 0.5]
        x1, y1, x2, y2 = target
        clip_x = lambda v: min(max(v, 0.0), IN_W - 1.0)  # noqa: E731
        clip_y = lambda v: min(max(v, 0.0), IN_H - 1.0)  # noqa: E731
        boxes.append([clip_x(x1), clip_y(y1), clip_x(x2), clip_y(y2)])
    return boxes


def _expected_soft_masks(pixel, boxes_out):
    """2-channel logits -> x4 (corners not aligned) -> unpad -> original size
    (corners aligned) -> softmax channel 1 -> x crop(box, 0.1)."""
    masks = []
    for (_, _, _, _, o_bg, o_fg), box in zip(DETECTIONS, boxes_out):
        logits = torch.stack([torch.einsum("d,dhw->hw", o, pixel) for o in (o_bg, o_fg)])[None]
        up = F.interpolate(logits, scale_factor=4, mode="bilinear", align_corners=False)
        up = up[:, :, :IN_H, :IN_W]
        full = F.interpolate(up, size=(OUT_H, OUT_W), mode="bilinear", align_corners=True)
        prob = full.softmax(dim=1)[0, 1]
        masks.append(prob * ref_crop(box, OUT_H, OUT_W, 0.1))
    return torch.stack(masks)


def _assert_masks(pred, soft):
    clear = (soft - 0.4).abs() > 1e-4  # pixels not within float noise of the threshold
    assert torch.equal(pred[clear], (soft > 0.4)[clear])


def test_inference_boxes_scores_masks_by_value():
    """Boxes rescaled to the original image *before* the "+1" NMS (both class-0 boxes
    survive), a one-pixel-wide box kept, "+1" export, scores, classes, and the masks."""
    inst, pixel = _run(refine=False)
    boxes_in = _expected_input_boxes()
    assert ref_iou(boxes_in[0], boxes_in[1]) > 0.5  # would be suppressed at input scale
    boxes_out = [[b[0] * SX, b[1] * SY, b[2] * SX, b[3] * SY] for b in boxes_in]
    assert ref_iou(boxes_out[0], boxes_out[1]) < 0.5
    assert boxes_out[2][0] == boxes_out[2][2] == 0.0  # one pixel wide
    assert inst.image_size == (OUT_H, OUT_W)
    assert inst.pred_classes.tolist() == [0, 0, 1, 2]
    expected_scores = [1 / (1 + math.exp(-v)) for v in (3.0, 2.0, 1.0, 0.5)]
    assert inst.scores.tolist() == pytest.approx(expected_scores, rel=1e-6)
    exported = [[b[0], b[1], b[2] + 1, b[3] + 1] for b in boxes_out]
    assert torch.allclose(inst.pred_boxes.tensor, torch.tensor(exported), atol=1e-3)
    assert exported[2] == [0.0, 0.0, 1.0, 39.0]
    assert exported[3][2:] == pytest.approx([89 * SX + 1, 59 * SY + 1])

    soft = _expected_soft_masks(pixel, boxes_out)
    _assert_masks(inst.pred_masks, soft)
    # o_fg = o_bg: p = 0.5 everywhere, so the mask is exactly the 10 % crop
    crop_d2 = ref_crop(boxes_out[1], OUT_H, OUT_W, 0.1)
    assert torch.equal(inst.pred_masks[1], crop_d2)
    assert ref_crop_range(20.0, 28.4, OUT_H, 0.1) == (19, 29)  # padding clamped to 1 px
    assert torch.equal(inst.pred_masks[2], ref_crop(boxes_out[2], OUT_H, OUT_W, 0.1))
    inside = ref_crop(boxes_out[0], OUT_H, OUT_W, 0.1)
    assert inst.pred_masks[0][inside].any() and not inst.pred_masks[0][inside].all()
    assert not inst.pred_masks[0][~inside].any()


def ref_mbrm(soft, box, gamma=0.05):
    """MBRM for one instance: max profiles, 9-tap kernel (flipped for right / bottom), truncated
    Gaussian prior around each edge, argmax of the product."""
    w = [-0.2968, -0.2892, -0.2635, -3.2545, -0.1874, 2.5041, 0.0196, 0.0651, 0.0917]
    b = -1.9536
    h_prof, v_prof = soft.max(dim=0).values, soft.max(dim=1).values
    sx, sy = max(gamma * (box[2] - box[0]), 1.0), max(gamma * (box[3] - box[1]), 1.0)

    def edge(profile, kernel, centre, sigma):
        n = profile.shape[0]
        padded = torch.cat([torch.zeros(4), profile.double(), torch.zeros(4)])
        best, best_x = -1.0, None
        for x in range(n):
            s = 1 / (1 + math.exp(-(sum(kernel[k] * padded[x + k].item() for k in range(9)) + b)))
            g = math.exp(-((x - centre) ** 2) / (2 * sigma ** 2))
            g = g if g > 0.0044 else 0.0
            if s * g > best:
                best, best_x = s * g, x
        return float(best_x)

    return [edge(h_prof, w, box[0], sx), edge(v_prof, w, box[1], sy),
            edge(h_prof, w[::-1], box[2], sx), edge(v_prof, w[::-1], box[3], sy)]


def test_inference_mbrm_by_value():
    """With MBRM the boxes are the refined integer edges (+1 exported) of the
    soft cropped masks at the original size; masks, scores and classes are unchanged."""
    base, pixel = _run(refine=False)
    inst, _ = _run(refine=True)
    assert torch.equal(inst.pred_masks, base.pred_masks)
    assert torch.equal(inst.scores, base.scores)
    assert torch.equal(inst.pred_classes, base.pred_classes)
    boxes_out = [[b[0] * SX, b[1] * SY, b[2] * SX, b[3] * SY] for b in _expected_input_boxes()]
    soft = _expected_soft_masks(pixel, boxes_out)
    expected = []
    for m, box in zip(soft, boxes_out):
        x1, y1, x2, y2 = ref_mbrm(m, box)
        expected.append([x1, y1, min(x2 + 1, OUT_W), min(y2 + 1, OUT_H)])
    assert inst.pred_boxes.tensor.tolist() == expected
    one, _ = _run(refine=True, opts=["MODEL.RDSNET.DETECTIONS_PER_IMAGE", 1])  # a single box
    assert one.pred_boxes.tensor.tolist() == expected[:1]
    assert expected != [[b[0], b[1], b[2] + 1, b[3] + 1] for b in boxes_out]


# Detectron2's box conventions (BOX_PLUS_ONE False, its anchors): (P3 location, class, logit,
# raw deltas, o_bg, o_fg). Anchor of P3 location (i, j): [8j - 16, 8i - 16, 8j + 16, 8i + 16].
D2_DETECTIONS = [
    ((2, 2), 0, 3.0, [0.1, 0.0, -0.2, -0.5], _e(0, 0.0), _e(0)),
    ((2, 3), 0, 2.0, [0.0, 0.05, 0.1, -1.0], _e(1, 5.0), _e(1, 5.0)),
    # across the left edge: x1 clipped to 0
    ((4, 0), 1, 1.0, [-0.3, -0.2, 0.0, 0.0], _e(2, 0.0), _e(2, 0.0)),
    # across the bottom-right corner: clipped to x2 = 90, y2 = 60 (w, h: no "- 1")
    ((6, 10), 2, 0.5, [0.5, 0.25, 0.0, 0.0], _e(0), _e(0, 2.0)),
]
D2_OPTS = ["MODEL.RDSNET.BOX_PLUS_ONE", False, "MODEL.ANCHOR_GENERATOR.NAME", "DefaultAnchorGenerator"]


def _run_d2(refine):
    model = _model(["MODEL.RDSNET.MBRM.ENABLED", refine] + D2_OPTS)
    _, pixel = _fake_outputs()

    def head(features):
        logits = [torch.full((1, K, f.shape[2], f.shape[3]), -20.0) for f in features]
        deltas = [torch.zeros(1, 4, f.shape[2], f.shape[3]) for f in features]
        reps = [torch.zeros(1, 2 * D, f.shape[2], f.shape[3]) for f in features]
        for (i, j), cls, logit, d, o_bg, o_fg in D2_DETECTIONS:
            logits[0][0, cls, i, j] = logit
            deltas[0][0, :, i, j] = torch.tensor(d)
            reps[0][0, :, i, j] = torch.cat([o_bg, o_fg])
        return logits, deltas, reps

    model.head.forward = head
    model.pixel_stream.forward = lambda features: pixel
    model.eval()
    with torch.no_grad():
        out = model([{"image": torch.rand(3, IN_H, IN_W) * 255, "height": OUT_H, "width": OUT_W}])
    return out[0]["instances"], pixel[0]


def _expected_d2_boxes_out():
    """Detectron2 decoding (widths x2 - x1), clip to [0, w] x [0, h], rescale to the output."""
    boxes = []
    for (i, j), _, _, (dx, dy, dw, dh), _, _ in D2_DETECTIONS:
        ax1, ay1 = 8 * j - 16, 8 * i - 16
        gx, gy = ax1 + 16 + dx * 32, ay1 + 16 + dy * 32
        gw, gh = 32 * math.exp(dw), 32 * math.exp(dh)
        x1, y1, x2, y2 = gx - gw / 2, gy - gh / 2, gx + gw / 2, gy + gh / 2
        cx = lambda v: min(max(v, 0.0), float(IN_W))  # noqa: E731
        cy = lambda v: min(max(v, 0.0), float(IN_H))  # noqa: E731
        boxes.append([cx(x1) * SX, cy(y1) * SY, cx(x2) * SX, cy(y2) * SY])
    return boxes


def _expected_d2_soft_masks(pixel, boxes_out):
    masks = []
    for (_, _, _, _, o_bg, o_fg), box in zip(D2_DETECTIONS, boxes_out):
        logits = torch.stack([torch.einsum("d,dhw->hw", o, pixel) for o in (o_bg, o_fg)])[None]
        up = F.interpolate(logits, scale_factor=4, mode="bilinear", align_corners=False)
        up = up[:, :, :IN_H, :IN_W]
        full = F.interpolate(up, size=(OUT_H, OUT_W), mode="bilinear", align_corners=True)
        masks.append(full.softmax(dim=1)[0, 1] * ref_crop(box, OUT_H, OUT_W, 0.1, plus=0))
    return torch.stack(masks)


def test_inference_d2_conventions_by_value():
    """BOX_PLUS_ONE False: Detectron2 decoding, clip to [0, w] x [0, h], NMS without "+1", no
    "+1" export, crop widths x2 - x1; with MBRM the refined inclusive edges come back as
    (x2 + 1, y2 + 1)."""
    inst, pixel = _run_d2(refine=False)
    boxes_out = _expected_d2_boxes_out()
    assert boxes_out[3][2:] == pytest.approx([IN_W * SX, IN_H * SY])  # clipped at w, h
    assert ref_iou(boxes_out[0], boxes_out[1], plus=0) < 0.5  # both class-0 boxes kept
    assert inst.pred_classes.tolist() == [0, 0, 1, 2]
    assert torch.allclose(inst.pred_boxes.tensor, torch.tensor(boxes_out), atol=1e-3)
    soft = _expected_d2_soft_masks(pixel, boxes_out)
    _assert_masks(inst.pred_masks, soft)
    # p = 0.5 everywhere for the second: its mask is exactly the crop, which the "+1" width
    # would make wider
    assert torch.equal(inst.pred_masks[1], ref_crop(boxes_out[1], OUT_H, OUT_W, 0.1, plus=0))
    assert not torch.equal(ref_crop(boxes_out[1], OUT_H, OUT_W, 0.1, plus=0),
                           ref_crop(boxes_out[1], OUT_H, OUT_W, 0.1, plus=1))

    refined, _ = _run_d2(refine=True)
    assert torch.equal(refined.pred_masks, inst.pred_masks)
    expected = []
    for m, b in zip(soft, boxes_out):
        x1, y1, x2, y2 = ref_mbrm(m, [b[0], b[1], b[2] - 1, b[3] - 1])
        expected.append([x1, y1, min(x2 + 1, OUT_W), min(y2 + 1, OUT_H)])
    assert refined.pred_boxes.tensor.tolist() == expected
