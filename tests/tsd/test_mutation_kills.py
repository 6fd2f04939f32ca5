"""Value tests written against the survivors of a mutation run of the `tsd` package
(tests/MUTATION.md): defaults, edge cases of the geometry and pooling, the TSD head's
deformable pooling through the public ROI heads, loss weights, logging, the NaN guard,
class-agnostic regression, config errors and the cascade without re-sampling.

Expected values are computed by hand or by the small references below, written from the
paper's formulas and the authors' kernel, never with the package's functions.
"""
import math
import unittest

import torch
from detectron2.layers import ShapeSpec
from detectron2.modeling.roi_heads import build_roi_heads
from detectron2.structures import ImageList
from detectron2.utils.events import EventStorage

import tsd_tiny
from tsd_reference import ref_decode, ref_encode, ref_iou, ref_translate, smooth_l1, softmax
from tsd.geometry import LegacyBox2BoxTransform, aligned_iou, translate_boxes
from tsd.head import TSDHead, TSDOffsetGenerator
from tsd.losses import pc_loc_loss
from tsd.pooling import deform_roi_pool, fpn_levels, level_range

K = 3  # foreground classes; background = K
IMG = (160, 192)  # (h, w)
W = (10.0, 10.0, 5.0, 5.0)


# ---------------------------------------------------------------- independent references
def _c_round(v):
    return math.copysign(math.floor(abs(v) + 0.5), v)


def ref_pool(feat, box, off, scale, k, S, gamma, legacy):
    """Deformable RoI pooling of one RoI (group size 1), written from the kernel's loops.
    feat (C, H, W); off (2, k, k) or None."""
    C, H, Wd = feat.shape
    x1, y1, x2, y2 = [float(v) for v in box]
    if legacy:
        sw, sh = _c_round(x1) * scale - 0.5, _c_round(y1) * scale - 0.5
        ew, eh = (_c_round(x2) + 1) * scale - 0.5, (_c_round(y2) + 1) * scale - 0.5
        c = 0.0
    else:
        sw, sh, ew, eh = x1 * scale - 0.5, y1 * scale - 0.5, x2 * scale - 0.5, y2 * scale - 0.5
        c = 0.5
    rw, rh = max(ew - sw, 0.1), max(eh - sh, 0.1)
    out = torch.zeros(C, k, k, dtype=torch.float64)
    f = feat.double()
    for ph in range(k):
        for pw in range(k):
            tx = gamma * float(off[0, ph, pw]) * rw if off is not None else 0.0
            ty = gamma * float(off[1, ph, pw]) * rh if off is not None else 0.0
            total, n = torch.zeros(C, dtype=torch.float64), 0
            for ih in range(S):
                for iw in range(S):
                    x = sw + (pw + (iw + c) / S) * rw / k + tx
                    y = sh + (ph + (ih + c) / S) * rh / k + ty
                    if x < -0.5 or x > Wd - 0.5 or y < -0.5 or y > H - 0.5:
                        continue
                    x, y = min(max(x, 0.0), Wd - 1.0), min(max(y, 0.0), H - 1.0)
                    xa, ya = math.floor(x), math.floor(y)
                    xb, yb = min(xa + 1, Wd - 1), min(ya + 1, H - 1)
                    lx, ly = x - xa, y - ya
                    total += ((1 - lx) * (1 - ly) * f[:, ya, xa] + lx * (1 - ly) * f[:, ya, xb]
                              + (1 - lx) * ly * f[:, yb, xa] + lx * ly * f[:, yb, xb])
                    n += 1
            if n:
                out[:, ph, pw] = total / n
    return out


# ---------------------------------------------------------------- model helpers
def build_heads(name="TSDROIHeads", legacy=False, batch=512, fraction=0.25, **extra):
    cfg = tsd_tiny.tiny_cfg(name, num_classes=K)
    cfg.MODEL.TSD.LEGACY_COORDS = legacy
    cfg.MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE = batch
    cfg.MODEL.ROI_HEADS.POSITIVE_FRACTION = fraction
    for key, v in extra.items():
        cfg.merge_from_list([key, v])
    torch.manual_seed(0)
    return build_roi_heads(cfg, SHAPES), cfg


SHAPES = {f"p{i}": ShapeSpec(channels=8, stride=2 ** i) for i in (2, 3, 4, 5)}


def features(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {f"p{i}": torch.randn(1, 8, IMG[0] // 2 ** i, IMG[1] // 2 ** i, generator=g)
            for i in (2, 3, 4, 5)}


def images():
    return ImageList(torch.zeros(1, 3, *IMG), [IMG])


def proposals(boxes):
    return tsd_tiny.proposals(boxes, IMG)


def targets(boxes, classes):
    return tsd_tiny.targets(boxes, classes, IMG)


def _set(linear, bias):
    with torch.no_grad():
        linear.weight.zero_()
        linear.bias.copy_(torch.as_tensor(bias, dtype=torch.float32).flatten())


def set_tsd(tsd_head, delta_r, logits, deltas, delta_c=None):
    og = tsd_head.offset_generator
    _set(og.delta_r_fc2, delta_r)
    if delta_c is not None:
        _set(og.delta_c_fc2, delta_c)
    _set(tsd_head.predictor.cls_score, logits)
    _set(tsd_head.predictor.bbox_pred, deltas)


# ---------------------------------------------------------------- defaults and geometry
class TestDefaultsAreTheAuthors(unittest.TestCase):
    """Functions called without the optional arguments use the authors' values: γ = 0.1,
    "+1" conventions, margin 0.3, 256-wide offset fcs."""

    def test_translate_defaults(self):
        P = torch.tensor([[10.0, 20.0, 109.0, 69.0]])  # "+1" size 100 x 50
        out = translate_boxes(P, torch.tensor([[1.0, -2.0]]))
        torch.testing.assert_close(out, torch.tensor([[20.0, 10.0, 119.0, 59.0]]))

    def test_pc_loc_defaults(self):
        gt = torch.tensor([[0.0, 0.0, 9.0, 9.0]])  # "+1" area 100
        sib = torch.tensor([[0.0, 0.0, 4.0, 9.0]])  # u = 50 / 100
        tsd = torch.tensor([[0.0, 0.0, 5.0, 9.0]])  # v = 60 / 100
        loss = pc_loc_loss(sib, tsd, gt, torch.tensor([True]), [1])
        self.assertAlmostEqual(loss.item(), 0.5 + 0.3 - 0.6, places=6)

    def test_level_rule_default_is_mmdet(self):
        # "+1": sqrt(112 * 112) / 56 = 2 -> P3 (Detectron2's rule would give P2)
        self.assertEqual(fpn_levels(torch.tensor([[0.0, 0.0, 111.0, 111.0]]), 2, 5).tolist(), [1])

    def test_offset_generator_width(self):
        self.assertEqual(TSDOffsetGenerator(8, 7).offset_fc.out_features, 256)


class TestGeometryEdges(unittest.TestCase):
    def test_aligned_iou_disjoint_and_tiny_boxes(self):
        a = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 0.5, 0.5]])
        b = torch.tensor([[20.0, 20.0, 30.0, 30.0], [0.0, 0.0, 0.5, 0.5]])
        # disjoint: 0; two equal 0.5 x 0.5 boxes (area 0.25 < 1): 1
        torch.testing.assert_close(aligned_iou(a, b, legacy=False), torch.tensor([0.0, 1.0]))
        # "+1": disjoint 0; two equal single-pixel boxes (x2 = x1): area 1 each, IoU 1
        pa = torch.tensor([[0.0, 0.0, 10.0, 10.0], [3.0, 3.0, 3.0, 3.0]])
        pb = torch.tensor([[20.0, 20.0, 30.0, 30.0], [3.0, 3.0, 3.0, 3.0]])
        torch.testing.assert_close(aligned_iou(pa, pb, legacy=True), torch.tensor([0.0, 1.0]))

    def test_legacy_coder_clamps_both_sides(self):
        coder = LegacyBox2BoxTransform(weights=(1.0, 1.0, 1.0, 1.0))
        box = torch.tensor([[0.0, 0.0, 9.0, 19.0], [0.0, 0.0, 9.0, 19.0]])  # "+1": 10 x 20
        deltas = torch.tensor([[0.0, 0.0, 10.0, -10.0], [0.0, 0.0, -10.0, 10.0]])
        e = 1000.0 / 16  # exp(scale_clamp)
        exp = []
        for fw, fh in ((e, 1 / e), (1 / e, e)):
            w, h = 10 * fw, 20 * fh
            exp.append([4.5 - w / 2 + 0.5, 9.5 - h / 2 + 0.5, 4.5 + w / 2 - 0.5, 9.5 + h / 2 - 0.5])
        torch.testing.assert_close(coder.apply_deltas(deltas, box), torch.tensor(exp))

    def test_level_range(self):
        self.assertEqual(level_range([1 / 4, 1 / 8, 1 / 16, 1 / 32]), (2, 5))
        self.assertEqual(level_range([1 / 8, 1 / 16, 1 / 32]), (3, 5))

    def test_level_rules_at_boundaries_and_clamps(self):
        boxes = torch.tensor([
            [100.0, 50.0, 210.0, 162.0],  # "+1": 111 x 113 = 12543 < 112^2 -> P2
            [100.0, 50.0, 211.0, 161.0],  # "+1": 112 x 112 -> P3
            [5.0, 5.0, 10.0, 10.0],  # far below P2 -> P2
            [0.0, 0.0, 1000.0, 1000.0],  # far above P5 -> P5
        ])
        self.assertEqual(fpn_levels(boxes, 2, 5, legacy=True).tolist(), [0, 1, 0, 3])
        # Detectron2: floor(4 + log2(sqrt(wh) / 224)) = 2 (2.99), 2 (2.99), 2 (clamped), 5 (6.2)
        self.assertEqual(fpn_levels(boxes, 2, 5, legacy=False).tolist(), [0, 0, 0, 3])


class TestPoolingEdges(unittest.TestCase):
    """Hand values on a linear map f(y, x) = x + 100 y (bilinear interpolation is exact)."""

    def setUp(self):
        ys, xs = torch.meshgrid(torch.arange(16.0), torch.arange(16.0), indexing="ij")
        self.feat = (xs + 100 * ys)[None, None]

    def test_samples_exactly_on_the_validity_bounds_count(self):
        # legacy, stride 1, RoI (0, 0, 15, 15): start -0.5, size 16, k = 2, S = 2: samples at
        # -0.5, 3.5 | 7.5, 11.5. Offset 1 with γ = 0.25 moves bin 1 by 4: 11.5, 15.5 = W - 0.5.
        off = torch.zeros(1, 2, 2, 2)
        off[0, 0, :, 1] = 1.0  # x offset of column 1
        off[0, 1, 1, :] = 1.0  # y offset of row 1
        out = deform_roi_pool(self.feat, torch.tensor([[0.0, 0.0, 15.0, 15.0]]), off, 1.0,
                              output_size=2, samples_per_bin=2, gamma=0.25, legacy=True)
        # -0.5 and 15.5 are valid and clamped to 0 and 15
        m = [(0.0 + 3.5) / 2, (11.5 + 15.0) / 2]
        exp = torch.tensor([[m[pw] + 100 * m[ph] for pw in range(2)] for ph in range(2)])
        torch.testing.assert_close(out[0, 0], exp)

    def test_thin_roi_keeps_its_height(self):
        # aligned, RoI 8 x 0.5 px: start_h 3.5, height 0.5 (> 0.1, not clamped); k = 1, S = 2:
        # y samples 3.625, 3.875; x samples 1.5, 5.5
        out = deform_roi_pool(self.feat, torch.tensor([[0.0, 4.0, 8.0, 4.5]]), None, 1.0,
                              output_size=1, samples_per_bin=2, legacy=False)
        self.assertAlmostEqual(out.item(), 3.5 + 100 * 3.75, places=3)

    def test_no_rois_and_batched_map(self):
        out = deform_roi_pool(self.feat, torch.zeros(0, 4), None, 1.0, output_size=3)
        self.assertEqual(tuple(out.shape), (0, 1, 3, 3))
        with self.assertRaisesRegex(AssertionError, "^deform_roi_pool takes the map of one image$"):
            deform_roi_pool(self.feat.expand(2, 1, 16, 16), torch.zeros(1, 4), None, 1.0)


# ---------------------------------------------------------------- config errors
class TestConfigErrors(unittest.TestCase):
    def _raises(self, exc, msg, name="TSDROIHeads", **extra):
        with self.assertRaises(exc) as ctx:
            build_heads(name, **extra)
        self.assertEqual(str(ctx.exception), msg)

    def test_messages(self):
        self._raises(ValueError, "TSDROIHeads: MODEL.ROI_BOX_HEAD.TRAIN_ON_PRED_BOXES is not "
                     "supported", **{"MODEL.ROI_BOX_HEAD.TRAIN_ON_PRED_BOXES": True})
        self._raises(AssertionError, "MODEL.TSD.NUM_FC must be >= 1", **{"MODEL.TSD.NUM_FC": 0})
        c = "TSDCascadeROIHeads"
        self._raises(ValueError, "TSDCascadeROIHeads: ROI_BOX_CASCADE_HEAD.BBOX_REG_WEIGHTS, "
                     "ROI_BOX_CASCADE_HEAD.IOUS and MODEL.TSD.CASCADE_STAGE_WEIGHTS differ in "
                     "length: 3, 3, 2", c, **{"MODEL.TSD.CASCADE_STAGE_WEIGHTS": [1.0, 1.0]})
        self._raises(ValueError, "TSDCascadeROIHeads uses class-specific regression: set "
                     "MODEL.ROI_BOX_HEAD.CLS_AGNOSTIC_BBOX_REG False", c,
                     **{"MODEL.ROI_BOX_HEAD.CLS_AGNOSTIC_BBOX_REG": True})
        self._raises(ValueError, "ROI_BOX_CASCADE_HEAD.IOUS[0] must equal "
                     "ROI_HEADS.IOU_THRESHOLDS[0]", c,
                     **{"MODEL.ROI_BOX_CASCADE_HEAD.IOUS": [0.4, 0.6, 0.7]})


# ---------------------------------------------------------------- the TSD head built from a config
class TestHeadFromConfig(unittest.TestCase):
    def test_built_alone_and_init(self):
        cfg = tsd_tiny.tiny_cfg(num_classes=K)
        torch.manual_seed(0)
        head = TSDHead(cfg, SHAPES)  # without a box coder: the config's
        self.assertEqual(tuple(head.predictor.box2box_transform.weights), W)
        self.assertEqual(head.offset_generator.offset_fc.out_features, 32)  # OFFSET_FC_DIM
        # mmdet kaiming(a=1, fan_in, normal): std 1/sqrt(fan_in), zero bias
        for layer in (head.cls_head.fc1, head.offset_generator.offset_fc):
            fan_in = layer.weight.shape[1]
            self.assertAlmostEqual(layer.weight.std().item() * math.sqrt(fan_in), 1.0, delta=0.05)
            self.assertEqual(layer.bias.abs().max().item(), 0.0)

    def test_predict_boxes_for_gt_classes(self):
        heads, _ = build_heads()
        pred = heads.tsd_head.predictor
        g = torch.Generator().manual_seed(4)
        deltas = torch.randn(4, 4 * K, generator=g) * 0.3
        translated = torch.tensor([[10.0, 20, 60, 90], [30, 30, 80, 70], [5, 5, 50, 45],
                                   [40, 10, 100, 80]])
        scores = torch.zeros(4, K + 1)
        props = proposals(translated[:2].tolist()) + proposals(translated[2:].tolist())
        classes = [0, 2, K, 1]  # background rows use class K - 1
        props[0].gt_classes = torch.tensor(classes[:2])
        props[1].gt_classes = torch.tensor(classes[2:])
        out = pred.predict_boxes_for_gt_classes((scores, deltas, translated), props)
        self.assertEqual([len(o) for o in out], [2, 2])
        got = torch.cat(out)
        for r, c in enumerate(classes):
            c = min(c, K - 1)
            exp = ref_decode(translated[r].tolist(), deltas[r, 4 * c: 4 * c + 4].tolist(), W,
                             False)
            torch.testing.assert_close(got[r], torch.tensor(exp), atol=1e-4, rtol=0)


class TestHeadPoolingThroughHeads(unittest.TestCase):
    """F̂_c and F̂_r (the inputs of the two task towers) against the reference pooling at the
    level of each untranslated RoI, with non-default k, S and γ and non-zero ΔC, ΔR."""

    BOXES = [[20.0, 30.0, 60.0, 62.0], [30.0, 20.0, 141.0, 131.0], [10.0, 10.0, 170.0, 150.0],
             [-400.0, -400.0, 600.0, 600.0]]
    # hand-computed levels (offset from P2): mmdet "+1" rule / Detectron2 rule
    LEVELS = {True: [0, 1, 1, 3], False: [0, 0, 1, 3]}

    def _run(self, legacy):
        k, S, gamma = 5, 2, 0.2
        heads, _ = build_heads(legacy=legacy, **{
            "MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION": k, "MODEL.TSD.SAMPLES_PER_BIN": S,
            "MODEL.TSD.GAMMA": gamma})
        dc = torch.linspace(-1.0, 1.2, 2 * k * k)
        dr = [0.7, -0.4]
        set_tsd(heads.tsd_head, dr, [0.0] * (K + 1), [0.0] * (4 * K), delta_c=dc)
        seen = {}
        heads.tsd_head.cls_head.register_forward_pre_hook(lambda m, i: seen.update(c=i[0]))
        heads.tsd_head.reg_head.register_forward_pre_hook(lambda m, i: seen.update(r=i[0]))
        heads.eval()
        feats = features(1)
        with torch.no_grad():
            heads(images(), feats, proposals(self.BOXES))
        off_c = dc.view(2, k, k)
        off_r = torch.tensor(dr).view(2, 1, 1).expand(2, k, k)
        for r, box in enumerate(self.BOXES):
            lvl = self.LEVELS[legacy][r]
            fmap = feats[f"p{lvl + 2}"][0]
            scale = 1.0 / 2 ** (lvl + 2)
            ref_c = ref_pool(fmap, box, off_c, scale, k, S, gamma, legacy)
            ref_r = ref_pool(fmap, box, off_r, scale, k, S, gamma, legacy)
            torch.testing.assert_close(seen["c"][r].double(), ref_c, atol=1e-4, rtol=0)
            torch.testing.assert_close(seen["r"][r].double(), ref_r, atol=1e-4, rtol=0)

    def test_aligned(self):
        self._run(False)

    def test_legacy(self):
        self._run(True)


class TestTrainingDetails(unittest.TestCase):
    """One image: P (IoU > 0.5 with G), a 0.5 px wide background proposal, and G appended.
    Loss weight 2 on the box losses, m_c = 0.2, logged accuracies."""

    G = [40.0, 50.0, 120.0, 110.0]
    P = [[44.0, 46.0, 128.0, 112.0], [130.0, 10.0, 130.5, 60.0]]
    DR = [1.0, -2.0]
    SIB_LOGITS = [0.8, -0.1, 0.5, 0.2]
    SIB_DELTAS = [[0.1, 0.3, -0.1, 0.2], [1.0, -1.0, 0.5, 0.2], [-0.2, 0.2, 0.1, 0.1]]
    TSD_DELTAS = [[0.5, -0.2, 0.1, 0.3], [-0.3, 0.4, -0.2, 0.1], [0.2, 0.1, 0.25, -0.15]]

    def _run(self, label, agnostic=False, legacy=False):
        tsd_logits = [0.1, 0.2, 0.3, -0.5]
        tsd_logits[label] = 1.5  # the TSD arg-max is the label: accuracy 2/3, fg accuracy 1
        extra = {"MODEL.ROI_BOX_HEAD.BBOX_REG_LOSS_WEIGHT": 2.0, "MODEL.TSD.CLS_PC_MARGIN": 0.2}
        if agnostic:
            extra["MODEL.ROI_BOX_HEAD.CLS_AGNOSTIC_BBOX_REG"] = True
        heads, _ = build_heads(legacy=legacy, **extra)
        n = 1 if agnostic else K
        tsd_d = [self.TSD_DELTAS[label]] if agnostic else self.TSD_DELTAS
        sib_d = [self.SIB_DELTAS[label]] if agnostic else self.SIB_DELTAS
        set_tsd(heads.tsd_head, self.DR, tsd_logits, torch.tensor(tsd_d)[:n])
        _set(heads.box_predictor.cls_score, self.SIB_LOGITS)
        _set(heads.box_predictor.bbox_pred, torch.tensor(sib_d)[:n])
        heads.train()
        with EventStorage() as storage:
            _, losses = heads(images(), features(), proposals(self.P), targets([self.G], [label]))
            acc = storage.history("tsd/cls_accuracy").latest()
            fg_acc = storage.history("tsd/fg_cls_accuracy").latest()
        self.assertAlmostEqual(acc, 2 / 3, places=6)
        self.assertEqual(fg_acc, 1.0)
        # rows: P[0] (label), P[1] (background), G (label)
        rows = [(self.P[0], label), (self.P[1], K), (self.G, label)]
        ps, qs = softmax(self.SIB_LOGITS), softmax(tsd_logits)
        exp = {"loss_tsd_cls": 0.0, "loss_tsd_box_reg": 0.0, "loss_pc_cls": 0.0,
               "loss_pc_loc": 0.0}
        for p, y in rows:
            exp["loss_tsd_cls"] -= math.log(qs[y]) / 3
            exp["loss_pc_cls"] += max(0.0, ps[y] + min(1 - ps[y], 0.2) - qs[y]) / 3
            if y == K:
                continue
            pr = ref_translate(p, self.DR, 0.1, legacy)
            t = ref_encode(pr, self.G, W, legacy)
            exp["loss_tsd_box_reg"] += 2.0 * sum(
                smooth_l1(a - b) for a, b in zip(self.TSD_DELTAS[label], t)) / 3
            u = ref_iou(ref_decode(p, self.SIB_DELTAS[label], W, legacy), self.G, legacy)
            v = ref_iou(ref_decode(pr, self.TSD_DELTAS[label], W, legacy), self.G, legacy)
            exp["loss_pc_loc"] += max(0.0, u + min(1 - u, 0.3) - v) / 2
        for key, v in exp.items():
            self.assertGreater(v, 1e-4, key)
            self.assertAlmostEqual(losses[key].item(), v, places=5, msg=key)
        return heads, losses

    def test_first_and_last_class(self):
        self._run(0)
        self._run(K - 1, legacy=True)

    def test_class_agnostic(self):
        self._run(K - 1, agnostic=True)

    def test_single_row(self):
        # no proposals: the only row is the appended G (label 1)
        heads, _ = build_heads(**{"MODEL.TSD.CLS_PC_MARGIN": 0.2})
        tsd_logits = [0.1, 0.2, 0.3, -0.5]
        set_tsd(heads.tsd_head, self.DR, tsd_logits, self.TSD_DELTAS)
        _set(heads.box_predictor.cls_score, self.SIB_LOGITS)
        _set(heads.box_predictor.bbox_pred, self.SIB_DELTAS)
        heads.train()
        with EventStorage():
            _, losses = heads(images(), features(), proposals([]), targets([self.G], [1]))
        ps, qs = softmax(self.SIB_LOGITS), softmax(tsd_logits)
        self.assertAlmostEqual(losses["loss_tsd_cls"].item(), -math.log(qs[1]), places=5)
        self.assertAlmostEqual(losses["loss_pc_cls"].item(),
                               ps[1] + min(1 - ps[1], 0.2) - qs[1], places=5)

    def test_detached_targets(self):
        heads, _ = build_heads(**{"MODEL.TSD.DETACH_TRANSLATED_TARGETS": True})
        set_tsd(heads.tsd_head, self.DR, [0.0] * (K + 1), self.TSD_DELTAS)
        heads.train()
        with EventStorage():
            _, losses = heads(images(), features(), proposals(self.P), targets([self.G], [1]))
        bias = heads.tsd_head.offset_generator.delta_r_fc2.bias
        (g,) = torch.autograd.grad(losses["loss_tsd_box_reg"], [bias], allow_unused=True)
        self.assertTrue(g is None or g.abs().max().item() == 0.0)
        self.assertGreater(losses["loss_tsd_box_reg"].item(), 0.0)

    def test_exploded_translation_gives_nan_box_loss(self):
        # ΔR = 1e30: P̂_r lies ~1e31 px away and float32 rounds its width to 0
        heads, _ = build_heads()
        set_tsd(heads.tsd_head, [1e30, 0.0], [0.0] * (K + 1), self.TSD_DELTAS)
        heads.train()
        with EventStorage():
            _, losses = heads(images(), features(), proposals(self.P), targets([self.G], [1]))
        self.assertTrue(math.isnan(losses["loss_tsd_box_reg"].item()))
        self.assertTrue(math.isfinite(losses["loss_tsd_cls"].item()))


# ---------------------------------------------------------------- cascade
class TestCascadeDetails(unittest.TestCase):
    G = [40.0, 50.0, 120.0, 110.0]
    NEG = [140.0, 10.0, 185.0, 50.0]

    def _stage_labels(self, heads, boxes):
        labels, rows = [], []
        orig = heads._run_stage

        def run_stage(features_, props, stage):
            labels.append(props[0].gt_classes.clone())
            rows.append(props[0].proposal_boxes.tensor.clone())
            return orig(features_, props, stage)

        heads._run_stage = run_stage
        heads.train()
        with EventStorage():
            _, losses = heads(images(), features(), proposals(boxes), targets([self.G], [1]))
        return labels, rows, losses

    def test_stage0_uses_first_iou_and_stage_coders(self):
        # continuous IoU of (40, 50, 84, 110) with G: 44 / 80 = 0.55: positive at stage 0 (0.5)
        # but it would be negative with stage 1's 0.6
        heads, _ = build_heads("TSDCascadeROIHeads")
        p = [40.0, 50.0, 84.0, 110.0]
        labels, rows, _ = self._stage_labels(heads, [p, self.NEG])
        is_p = (rows[0] - torch.tensor(p)).abs().max(dim=1).values < 1e-4
        self.assertEqual(int(is_p.sum()), 1)
        self.assertEqual(int(labels[0][is_p]), 1)
        # every stage's sibling encodes with its own weights
        for s, w in enumerate([(10.0, 10.0, 5.0, 5.0), (20.0, 20.0, 10.0, 10.0),
                               (30.0, 30.0, 15.0, 15.0)]):
            got = heads.box_predictor[s].box2box_transform.get_deltas(
                torch.tensor([p]), torch.tensor([self.G]))
            torch.testing.assert_close(got[0], torch.tensor(ref_encode(p, self.G, w, False)))

    def test_without_resampling(self):
        # CASCADE_RESAMPLE False: stage 1 matches all refined stage-0 rows (no GT appended, no
        # sampling, no low-quality matches). Stage 0 shifts every box right by half its width
        # (dx = 5 / 10): the refined G has IoU 40 / 120 = 1/3 < 0.6, so nothing is positive.
        heads, _ = build_heads("TSDCascadeROIHeads", **{"MODEL.TSD.CASCADE_RESAMPLE": False})
        for s, t in enumerate(heads.tsd_head):
            set_tsd(t, [0.0, 0.0], [0.0] * (K + 1), [5.0, 0.0, 0.0, 0.0] * K)
        labels, rows, _ = self._stage_labels(heads, [self.G, self.NEG])
        self.assertEqual(len(rows[0]), 3)  # G, NEG, appended G
        self.assertEqual(len(rows[1]), 3)
        shifted = [[b[0] + (b[2] - b[0]) / 2, b[1], min(b[2] + (b[2] - b[0]) / 2, IMG[1]), b[3]]
                   for b in rows[0].tolist()]  # clipped to the image
        torch.testing.assert_close(rows[1], torch.tensor(shifted))
        self.assertEqual(labels[1].tolist(), [K, K, K])


if __name__ == "__main__":
    unittest.main()
