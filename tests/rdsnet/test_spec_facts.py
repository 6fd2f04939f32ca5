"""Hand-computed facts of the authors' RDSNet: shapes, anchors, parameter counts, crop,
GT-mask downsampling, mask loss with/without OHEM, correlation, box conventions."""
import math
import os

import pytest
import torch
from detectron2.modeling import build_model
from detectron2.modeling.anchor_generator import DefaultAnchorGenerator
from detectron2.structures import Boxes

from projects.testing import load_config, repo_root
from rdsnet.anchor_generator import mmdet_base_anchors
from rdsnet.box_ops import Box2BoxTransformPlusOne, LowQualityOverrideMatcher, box_iou
from rdsnet.correlation import correlate, foreground_logit
from rdsnet.cropping import crop_mask
from rdsnet.mask_loss import downsample_gt_masks, instance_mask_losses

R50 = os.path.join(repo_root(), "configs", "rdsnet", "rdsnet_R_50_FPN_1x.yaml")
LN2 = math.log(2.0)


@pytest.fixture(scope="module")
def meta_r50():
    """The full COCO R-50 RDSNet on the meta device (shapes only, no compute)."""
    cfg = load_config(R50, ["MODEL.DEVICE", "meta"])
    with torch.device("meta"):
        return build_model(cfg)


def _shapes(model, h, w):
    feats = model.backbone(torch.empty(1, 3, h, w, device="meta"))
    head_feats = [feats[k] for k in model.head_in_features]
    return feats, head_feats


def test_shapes_800x1216(meta_r50):
    """FPN sizes, head channels, 182,403 anchors, 64-d reps, pixel map 200x304."""
    feats, head_feats = _shapes(meta_r50, 800, 1216)
    sizes = {k: tuple(v.shape[-2:]) for k, v in feats.items()}
    assert sizes == {"p3": (100, 152), "p4": (50, 76), "p5": (25, 38), "p6": (13, 19), "p7": (7, 10)}
    logits, deltas, reps = meta_r50.head(head_feats)
    assert {x.shape[1] for x in logits} == {720}
    assert {x.shape[1] for x in deltas} == {36}
    assert {x.shape[1] for x in reps} == {576}
    anchors = meta_r50.anchor_generator(head_feats)
    assert sum(len(a) for a in anchors) == 182403 == 9 * (15200 + 3800 + 950 + 247 + 70)
    assert sum(x.shape[2] * x.shape[3] * 9 for x in reps) == 182403
    assert tuple(meta_r50.pixel_stream(feats).shape) == (1, 32, 200, 304)


def test_shapes_coco_example(meta_r50):
    """Example: 480x640 -> 800x1067 padded to 800x1088: 163,206 anchors, map 200x272."""
    from rdsnet.targets import pad_shape

    assert pad_shape((800, 1067), 32) == (800, 1088)
    feats, head_feats = _shapes(meta_r50, 800, 1088)
    assert [tuple(f.shape[-2:]) for f in head_feats] == [
        (100, 136), (50, 68), (25, 34), (13, 17), (7, 9)
    ]
    assert sum(len(a) for a in meta_r50.anchor_generator(head_feats)) == 163206
    assert tuple(meta_r50.pixel_stream(feats).shape[-2:]) == (200, 272)


def test_parameter_counts(meta_r50):
    """Head 10,154,292; pixel stream 2,959,904; FPN 7,997,440; R-50 model 44,619,668.

    The trunk uses FrozenBN, whose affine weight/bias are buffers: they are counted with the
    parameters (mmdet counts them as BN parameters).
    """
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(meta_r50.head) == 10154292
    assert count(meta_r50.pixel_stream) == 2959904
    trunk = meta_r50.backbone.bottom_up
    frozen_affine = sum(
        b.numel() for n, b in trunk.named_buffers() if n.endswith((".weight", ".bias"))
    )
    assert count(trunk) + frozen_affine == 23508032
    assert count(meta_r50.backbone) - count(trunk) == 7997440
    assert count(meta_r50) + frozen_affine == 44619668


def test_head_init_and_rep_layout(meta_r50):
    """Init: classification bias -4.59512; no bias in the GN tower convs."""
    cfg = load_config(R50, ["MODEL.DEVICE", "cpu", "MODEL.RDSNET.NUM_CLASSES", 2])
    from rdsnet import RDSNetHead

    head = RDSNetHead(cfg, [meta_r50.backbone.output_shape()["p3"]] * 5, num_anchors=9)
    assert torch.allclose(head.cls_score.bias, torch.full((18,), -4.59512), atol=1e-5)
    assert head.cls_subnet[0].bias is None and isinstance(head.cls_subnet[1], torch.nn.GroupNorm)
    assert head.rep_pred.out_channels == 9 * 64


SPEC_BASE_ANCHORS = {
    8: [[-19, -7, 26, 14], [-25, -10, 32, 17], [-32, -14, 39, 21], [-12, -12, 19, 19],
        [-16, -16, 23, 23], [-21, -21, 28, 28], [-7, -19, 14, 26], [-10, -25, 17, 32],
        [-14, -32, 21, 39]],
    16: [[-37, -15, 52, 30], [-49, -21, 64, 36], [-64, -28, 79, 43], [-24, -24, 39, 39],
         [-32, -32, 47, 47], [-43, -43, 58, 58], [-15, -37, 30, 52], [-21, -49, 36, 64],
         [-28, -64, 43, 79]],
    32: [[-75, -29, 106, 60], [-98, -41, 129, 72], [-128, -56, 159, 87], [-48, -48, 79, 79],
         [-65, -65, 96, 96], [-86, -86, 117, 117], [-29, -75, 60, 106], [-41, -98, 72, 129],
         [-56, -128, 87, 159]],
    64: [[-149, -59, 212, 122], [-196, -82, 259, 145], [-255, -112, 318, 175],
         [-96, -96, 159, 159], [-129, -129, 192, 192], [-171, -171, 234, 234],
         [-59, -149, 122, 212], [-82, -196, 145, 259], [-112, -255, 175, 318]],
    128: [[-298, -117, 425, 244], [-392, -164, 519, 291], [-511, -223, 638, 350],
          [-192, -192, 319, 319], [-259, -259, 386, 386], [-342, -342, 469, 469],
          [-117, -298, 244, 425], [-164, -392, 291, 519], [-223, -511, 350, 638]],
}


def test_base_anchors_per_level(meta_r50):
    """The generator's cell anchors equal mmdet's, and location (i, j) adds (j s, i s)."""
    cfg = load_config(R50, ["MODEL.DEVICE", "cpu"])
    from detectron2.modeling import build_anchor_generator

    shapes = [meta_r50.backbone.output_shape()[k] for k in meta_r50.head_in_features]
    gen = build_anchor_generator(cfg, shapes)
    for cell, stride in zip(gen.cell_anchors, (8, 16, 32, 64, 128)):
        assert cell.tolist() == SPEC_BASE_ANCHORS[stride]
    feats = [torch.zeros(1, 1, 2, 3) for _ in range(5)]
    level0 = gen(feats)[0].tensor.view(2, 3, 9, 4)
    expected = torch.tensor(SPEC_BASE_ANCHORS[8], dtype=torch.float32) + torch.tensor(
        [2 * 8, 1 * 8, 2 * 8, 1 * 8.0]
    )
    assert torch.equal(level0[1, 2], expected)


def test_detectron2_anchor_order_is_size_major():
    """D2 slot s*3 + r has the shape of mmdet slot r*3 + s (the converter's permutation)."""
    sizes = [32, 32 * 2 ** (1 / 3), 32 * 2 ** (2 / 3)]
    d2 = DefaultAnchorGenerator(sizes=[sizes], aspect_ratios=[[0.5, 1.0, 2.0]], strides=[8])
    cell = list(d2.cell_anchors)[0]
    d2_wh = cell[:, 2:] - cell[:, :2]
    mm = mmdet_base_anchors(8, sizes, [0.5, 1.0, 2.0])
    mm_wh = mm[:, 2:] - mm[:, :2] + 1
    for s in range(3):
        for r in range(3):
            assert torch.allclose(d2_wh[s * 3 + r], mm_wh[r * 3 + s], atol=1.0)


def test_box_coder_plus_one():
    """The "+1" widths, decode offsets of 0.5, clamp 4.1352; encode/decode round trip."""
    coder = Box2BoxTransformPlusOne((1.0, 1.0, 1.0, 1.0), scale_clamp=math.log(1000 / 16))
    anchor = torch.tensor([[0.0, 0.0, 9.0, 19.0]])  # w 10, h 20, centre (4.5, 9.5)
    gt = torch.tensor([[2.0, 4.0, 21.0, 13.0]])  # w 20, h 10, centre (11.5, 8.5)
    d = coder.get_deltas(anchor, gt)
    assert torch.allclose(d, torch.tensor([[0.7, -0.05, math.log(2), math.log(0.5)]]), atol=1e-6)
    assert torch.allclose(coder.apply_deltas(d, anchor), gt, atol=1e-4)
    huge = coder.apply_deltas(torch.tensor([[0.0, 0.0, 10.0, -10.0]]), anchor)
    w = huge[0, 2] - huge[0, 0] + 1
    h = huge[0, 3] - huge[0, 1] + 1
    assert torch.isclose(w, torch.tensor(10 * 1000 / 16)) and torch.isclose(h, torch.tensor(20 * 16 / 1000))


def test_iou_plus_one_and_matcher_override():
    """The "+1" IoU; rule 4 re-points low-quality matches to the GT whose max they are."""
    a = torch.tensor([[0.0, 0.0, 9.0, 9.0]])
    b = torch.tensor([[5.0, 0.0, 14.0, 9.0]])
    assert torch.isclose(box_iou(a, b, True)[0, 0], torch.tensor(50 / 150))
    assert torch.isclose(box_iou(a, b, False)[0, 0], torch.tensor(36 / 126))
    # anchor 0 overlaps GT0 at 0.6 (positive for GT0) but is GT1's best anchor (0.3).
    iou = torch.tensor([[0.6, 0.1, 0.0], [0.3, 0.2, 0.0]])
    matcher = LowQualityOverrideMatcher([0.4, 0.5], [0, -1, 1], allow_low_quality_matches=True)
    matches, labels = matcher(iou)
    assert matches[0] == 1 and labels.tolist() == [1, 0, 0]  # Detectron2's Matcher: GT0


def test_crop_facts():
    """Half-open expanded boxes, padding fraction of (w + 1), clamped >= 1 px."""
    box = torch.tensor([[10.0, 5.0, 29.0, 24.0]])
    m = crop_mask(box, 50, 60, 0.25)[0]
    cols, rows = m.any(0).nonzero()[:, 0], m.any(1).nonzero()[:, 0]
    assert (cols.min(), cols.max() + 1, rows.min(), rows.max() + 1) == (5, 34, 0, 29)
    assert int(m.sum()) == 841
    m = crop_mask(box, 50, 60, 0.1)[0]
    cols, rows = m.any(0).nonzero()[:, 0], m.any(1).nonzero()[:, 0]
    assert (cols.min(), cols.max() + 1, rows.min(), rows.max() + 1) == (8, 31, 3, 26)
    assert int(m.sum()) == 529
    m = crop_mask(torch.tensor([[0.4, 0.0, 3.0, 2.0]]), 50, 60, 0.1)[0]
    assert int(m.sum()) == 4 * 3 and bool(m[:3, :4].all())


def test_gt_mask_downsampling():
    """A stride-4 pixel is foreground iff >= 3 of its 2x2 sampled block are."""
    m = torch.zeros(1, 8, 8)
    m[0, 1, 1] = m[0, 1, 2] = m[0, 2, 1] = 1
    small = torch.nn.functional.interpolate(m[:, None], scale_factor=0.25, mode="bilinear")
    assert torch.isclose(small[0, 0, 0, 0], torch.tensor(0.75))
    assert bool(downsample_gt_masks(m)[0, 0, 0])
    m = torch.zeros(1, 8, 8)
    m[0, 1, 1] = m[0, 2, 2] = 1
    m[0, 0, :] = m[0, 3, :] = m[0, :, 0] = m[0, :, 3] = 1  # outside the sampled block
    assert not bool(downsample_gt_masks(m)[0, 0, 0])
    assert downsample_gt_masks(torch.zeros(0, 8, 8)).shape == (0, 2, 2)


def _tiny_example(n=1):
    logits = torch.zeros(n, 2, 4, 4)
    target = torch.zeros(n, 4, 4, dtype=torch.long)
    target[:, 1:3, 1:3] = 1
    return logits, target


def test_mask_loss_ohem_values():
    """OHEM 8 ln2 / 9 = 0.616131; without 16 ln2 / 17 = 0.652374; ignore; batch norm."""
    logits, target = _tiny_example()
    assert torch.isclose(instance_mask_losses(logits, target, 1.0)[0], torch.tensor(0.616131), atol=1e-6)
    assert torch.isclose(instance_mask_losses(logits, target, 0.0)[0], torch.tensor(0.652374), atol=1e-6)
    ignored = target.clone()
    ignored[:, :, 3] = -1
    assert torch.isclose(instance_mask_losses(logits, ignored, 1.0)[0], torch.tensor(0.616131), atol=1e-6)
    logits2, target2 = _tiny_example(2)
    total = instance_mask_losses(logits2, target2, 1.0).sum() / (2 + 1)
    assert torch.isclose(total, torch.tensor(2 * 0.616131 / 3), atol=1e-6)
    # no positives -> 0 with mining
    assert instance_mask_losses(logits, torch.zeros_like(target), 1.0)[0] == 0


def test_mask_loss_keeps_hardest_negatives():
    """The kept negatives are those with the highest CE (here: the 4 most confident wrong)."""
    logits, target = _tiny_example()
    hard = [(0, 0), (0, 3), (3, 0), (3, 3)]
    for y, x in hard:
        logits[0, 1, y, x] = 2.0  # confidently (wrongly) foreground
    ce_hard = torch.nn.functional.cross_entropy(torch.tensor([[0.0, 2.0]]), torch.tensor([0]))
    expected = (4 * LN2 + 4 * ce_hard) / 9
    assert torch.isclose(instance_mask_losses(logits, target, 1.0)[0], expected, atol=1e-6)


def test_correlation_facts():
    """Softmax channel 1 = sigmoid(<U, o_fg - o_bg>); swap -> 1 - p; equal -> 0.5."""
    torch.manual_seed(0)
    u = torch.randn(32, 5, 6)
    o = torch.randn(3, 64)
    p = correlate(u, o).softmax(dim=1)[:, 1]
    assert torch.allclose(p, foreground_logit(u, o).sigmoid(), atol=1e-6)
    swapped = torch.cat([o[:, 32:], o[:, :32]], dim=1)
    assert torch.allclose(correlate(u, swapped).softmax(dim=1)[:, 1], 1 - p, atol=1e-6)
    same = torch.cat([o[:, :32], o[:, :32]], dim=1)
    assert torch.allclose(correlate(u, same).softmax(dim=1)[:, 1], torch.full_like(p, 0.5))
    assert torch.allclose(
        correlate(u, o)[1, 1, 2, 3], (u[:, 2, 3] * o[1, 32:]).sum(), atol=1e-5
    )


def test_d2_boxes_not_mutated_by_iou():
    """`box_iou` with "+1" works on copies (inputs unchanged)."""
    a = torch.tensor([[0.0, 0.0, 9.0, 9.0]])
    box_iou(a, a.clone(), True)
    assert a.tolist() == [[0.0, 0.0, 9.0, 9.0]]
    assert isinstance(Boxes(a), Boxes)


def test_mask_loss_saturated_negatives_rank_with_positives():
    """Authors' mining: positives and ignored pixels rank as zero-loss negatives (ties in pixel
    order). All negatives saturated (CE 0), the first row ignored, 4 positives: the 4 kept ranks
    are the ignored first row, so no negative is kept: 4 ln2 / (4 + 0 + 1)."""
    logits = torch.zeros(1, 2, 4, 4)
    logits[0, 0] = 30.0  # background logit 30: negatives have CE exactly 0 in float32
    logits[0, :, 1:3, 1:3] = 0.0  # positives: CE ln 2
    target = torch.zeros(1, 4, 4, dtype=torch.long)
    target[0, 1:3, 1:3] = 1
    target[0, 0, :] = -1
    assert torch.isclose(instance_mask_losses(logits, target, 1.0)[0], torch.tensor(4 * LN2 / 5))
    # without the ignored row the first 4 ranks are the saturated negatives of row 0: 4 kept
    target[0, 0, :] = 0
    assert torch.isclose(instance_mask_losses(logits, target, 1.0)[0], torch.tensor(4 * LN2 / 9))


def test_mask_loss_ratio_scales_kept_negatives():
    """pos_neg_ratio r keeps r x n_pos negatives (all logits 0, CE ln 2, 4 positives):
    r = 2 -> 12 ln2 / 13; r = 0.5 -> 6 ln2 / 7."""
    logits, target = _tiny_example()
    assert torch.isclose(instance_mask_losses(logits, target, 2.0)[0], torch.tensor(12 * LN2 / 13))
    assert torch.isclose(instance_mask_losses(logits, target, 0.5)[0], torch.tensor(6 * LN2 / 7))


def test_mask_loss_negatives_capped_at_all_pixels_but_one():
    """num_neg = min(ratio n_pos, h w - 1): 12 positives (rows 0-2, CE ln 2), 4 saturated
    negatives (row 3, CE 0), ratio 2 -> 15 ranks kept in pixel order: 3 negatives, so the
    loss is 12 ln2 / (12 + 3 + 1)."""
    logits = torch.zeros(1, 2, 4, 4)
    logits[0, 0, 3] = 30.0
    target = torch.ones(1, 4, 4, dtype=torch.long)
    target[0, 3] = 0
    assert torch.isclose(instance_mask_losses(logits, target, 2.0)[0], torch.tensor(12 * LN2 / 16))


def test_gt_mask_downsampling_empty_non_square():
    """No masks: an empty bool (0, H/4, W/4) map."""
    out = downsample_gt_masks(torch.zeros(0, 8, 12))
    assert out.shape == (0, 2, 3) and out.dtype == torch.bool


def test_crop_without_plus_one():
    """BOX_PLUS_ONE False: padding is a fraction of x2 - x1. Box [10, 5, 29, 24], padding 0.25:
    pad 4.75 -> x [5, 33), y [0, 28): 784 pixels (841 with the "+1" width)."""
    m = crop_mask(torch.tensor([[10.0, 5.0, 29.0, 24.0]]), 50, 60, 0.25, plus_one=False)[0]
    cols, rows = m.any(0).nonzero()[:, 0], m.any(1).nonzero()[:, 0]
    assert (cols.min(), cols.max() + 1, rows.min(), rows.max() + 1) == (5, 33, 0, 28)
    assert int(m.sum()) == 784


def test_box_coder_clamps_both_directions():
    """The deltas dw and dh are clamped to +-4.1352 on both sides (w x 16/1000, h x 1000/16)."""
    coder = Box2BoxTransformPlusOne((1.0, 1.0, 1.0, 1.0), scale_clamp=math.log(1000 / 16))
    anchor = torch.tensor([[0.0, 0.0, 9.0, 19.0]])
    out = coder.apply_deltas(torch.tensor([[0.0, 0.0, -10.0, 10.0]]), anchor)[0]
    assert torch.isclose(out[2] - out[0] + 1, torch.tensor(10 * 16 / 1000))
    assert torch.isclose(out[3] - out[1] + 1, torch.tensor(20 * 1000 / 16))


def test_matcher_rule4_points_to_the_gt_whose_max_it_is():
    """MaxIoUAssigner rule 4 for GT 0 (index 0 included): anchor 0 is GT0's best (0.3) although
    GT1 has 0.6 there -> GT0; anchor 1 -> GT1 (its best); anchor 2 (best of none) keeps the
    argmax."""
    iou = torch.tensor([[0.3, 0.1, 0.0], [0.6, 0.7, 0.0]])
    matcher = LowQualityOverrideMatcher([0.4, 0.5], [0, -1, 1], allow_low_quality_matches=True)
    matches, labels = matcher(iou)
    assert matches.tolist() == [0, 1, 0] and labels.tolist() == [1, 1, 0]
