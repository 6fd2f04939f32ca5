"""End-to-end values of the TSD ROI heads built from a config (through the
public heads).

The heads run on hand-placed proposals and GT with hand-set weights: every last layer (offset
generator outputs, sibling and TSD predictors) has zero weights and a chosen bias, so ΔC, ΔR,
logits and deltas are known constants and the expected losses, boxes and scores follow in
closed form from the paper's formulas, written here independently of the package:
P̂_r = P + γ·ΔR·(w, h) (Eq. 4), the R-CNN box coding, softmax/CE, Smooth-L1 and the PC
losses (Eq. 7, 8).
"""
import math
import unittest

import torch
import torch.nn.functional as F
from detectron2.layers import ShapeSpec
from detectron2.modeling.poolers import ROIPooler
from detectron2.modeling.roi_heads import build_roi_heads
from detectron2.structures import BitMasks, Boxes, ImageList
from detectron2.utils.events import EventStorage

import tsd_tiny
from tsd_reference import ref_decode, ref_encode, ref_iou, ref_translate, smooth_l1, softmax

K = 3  # foreground classes; background = K
IMG = (160, 192)  # (h, w)
GAMMA = 0.1


# ---------------------------------------------------------------- independent references
# ---------------------------------------------------------------- hand-set heads
def _set(linear, bias):
    with torch.no_grad():
        linear.weight.zero_()
        linear.bias.copy_(torch.as_tensor(bias, dtype=torch.float32).flatten())


def set_tsd(tsd_head, delta_r, delta_c, logits, deltas):
    og = tsd_head.offset_generator
    _set(og.delta_r_fc2, delta_r)
    _set(og.delta_c_fc2, delta_c)
    _set(tsd_head.predictor.cls_score, logits)
    _set(tsd_head.predictor.bbox_pred, deltas)


def build_heads(name="TSDROIHeads", legacy=False, batch=512, fraction=0.25, **extra):
    cfg = tsd_tiny.tiny_cfg(name, num_classes=K)
    cfg.MODEL.TSD.LEGACY_COORDS = legacy
    cfg.MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE = batch
    cfg.MODEL.ROI_HEADS.POSITIVE_FRACTION = fraction
    for k, v in extra.items():
        cfg.merge_from_list([k, v])
    shapes = {f"p{i}": ShapeSpec(channels=8, stride=2 ** i) for i in (2, 3, 4, 5)}
    torch.manual_seed(0)
    return build_roi_heads(cfg, shapes)


def features(seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    feats = {f"p{i}": torch.randn(1, 8, IMG[0] // 2 ** i, IMG[1] // 2 ** i, generator=g)
             for i in (2, 3, 4, 5)}
    if requires_grad:
        for v in feats.values():
            v.requires_grad_(True)
    return feats


def images():
    return ImageList(torch.zeros(1, 3, *IMG), [IMG])


def proposals(boxes):
    return tsd_tiny.proposals(boxes, IMG)


def targets(boxes, classes):
    return tsd_tiny.targets(boxes, classes, IMG)


# hand-set constants (class-specific deltas: 4 per foreground class)
DR = [1.0, -2.0]  # ΔR = (dx, dy): P̂_r = P + (0.1·w, -0.2·h)
DC = torch.linspace(-1.5, 1.5, 98)  # non-zero ΔC (only changes F̂_c, not the values below)
TSD_LOGITS = [0.3, 1.2, -0.4, 0.1]
TSD_DELTAS = [[0.5, -0.2, 0.1, 0.3], [-0.3, 0.4, -0.2, 0.1], [0.2, 0.1, 0.25, -0.15]]
SIB_LOGITS = [0.8, -0.1, 0.5, 0.2]
SIB_DELTAS = [[0.1, 0.3, -0.1, 0.2], [1.0, -1.0, 0.5, 0.2], [-0.2, 0.2, 0.1, 0.1]]
W = (10.0, 10.0, 5.0, 5.0)


class TestTSDInference(unittest.TestCase):
    """Scores = softmax(TSD logits), boxes decoded from P̂_r (not P)."""

    def _run(self, legacy):
        heads = build_heads(legacy=legacy)
        set_tsd(heads.tsd_head, DR, DC, TSD_LOGITS, TSD_DELTAS)
        heads.box_predictor.test_nms_thresh = 1.0  # keep every (box, class) pair
        heads.eval()
        P = [[30.0, 40.0, 110.0, 90.0], [70.0, 60.0, 150.0, 140.0]]
        with torch.no_grad():
            det, _ = heads(images(), features(), proposals(P))
        det = det[0]
        probs = softmax(TSD_LOGITS)
        expected = []
        for p in P:
            pr = ref_translate(p, DR, GAMMA, legacy)
            for c in range(K):
                box = ref_decode(pr, TSD_DELTAS[c], W, legacy)
                box = [min(max(box[0], 0), IMG[1]), min(max(box[1], 0), IMG[0]),
                       min(max(box[2], 0), IMG[1]), min(max(box[3], 0), IMG[0])]
                expected.append((c, box, probs[c]))
        self.assertEqual(len(det), len(expected))
        for c, box, score in expected:
            hit = (det.pred_classes == c) & (
                (det.pred_boxes.tensor - torch.tensor(box)).abs().max(dim=1).values < 1e-3)
            self.assertEqual(int(hit.sum()), 1, (c, box, det.pred_boxes.tensor))
            self.assertAlmostEqual(det.scores[hit].item(), score, places=5)

    def test_boxes_from_translated_proposal(self):
        self._run(legacy=False)

    def test_boxes_from_translated_proposal_legacy(self):
        self._run(legacy=True)

    def test_worked_translation(self):
        # Worked translation through the heads: P = (10, 20, 109, 69), ΔR = (1, −2),
        # legacy ⇒ P̂_r = (20, 10, 119, 59); zero deltas ⇒ the detection box is P̂_r itself.
        heads = build_heads(legacy=True)
        set_tsd(heads.tsd_head, DR, DC, TSD_LOGITS, torch.zeros(4 * K))
        heads.eval()
        with torch.no_grad():
            det, _ = heads(images(), features(), proposals([[10.0, 20.0, 109.0, 69.0]]))
        torch.testing.assert_close(det[0].pred_boxes.tensor[0], torch.tensor([20.0, 10, 119, 59]))


class TestTSDTrainingLosses(unittest.TestCase):
    """All six box losses of a batch of two images, against closed-form values.
    Image 0: two proposals (IoU > 0.5 and IoU 0 with its GT) + the appended GT; image 1: two
    proposals and no GT, so it adds one 0 entry to each PC vector."""

    G = [40.0, 50.0, 120.0, 110.0]
    P = [[44.0, 46.0, 128.0, 112.0], [130.0, 10.0, 180.0, 60.0]]  # IoU > 0.5, IoU 0
    P_EMPTY = [[20.0, 30.0, 90.0, 80.0], [100.0, 90.0, 170.0, 150.0]]
    LABEL = 1

    def _expected(self, legacy):
        rows = [(self.P[0], self.LABEL), (self.P[1], K), (self.G, self.LABEL)]
        rows_empty = [(p, K) for p in self.P_EMPTY]
        n = len(rows) + len(rows_empty)
        ps, qs = softmax(SIB_LOGITS), softmax(TSD_LOGITS)
        exp = {"loss_cls": 0.0, "loss_tsd_cls": 0.0, "loss_box_reg": 0.0,
               "loss_tsd_box_reg": 0.0, "loss_pc_cls": 0.0, "loss_pc_loc": 0.0}
        for _, y in rows + rows_empty:
            exp["loss_cls"] -= math.log(ps[y]) / n
            exp["loss_tsd_cls"] -= math.log(qs[y]) / n
        num_fg = 0
        for p, y in rows:  # only image 0 has a positive: PC entries from its rows only
            m = min(1 - ps[y], 0.3)
            exp["loss_pc_cls"] += max(0.0, ps[y] + m - qs[y])
            if y == K:
                continue
            num_fg += 1
            t = ref_encode(p, self.G, W, legacy)
            pr = ref_translate(p, DR, GAMMA, legacy)
            t_tsd = ref_encode(pr, self.G, W, legacy)
            # t_TSD = t − (γ/σ)·ΔR on (dx, dy), exact in both conventions
            for a, b, dr in zip(t_tsd[:2], t[:2], DR):
                self.assertAlmostEqual(a, b - GAMMA * W[0] * dr, places=9)
            exp["loss_box_reg"] += sum(smooth_l1(a - b) for a, b in zip(SIB_DELTAS[y], t)) / n
            exp["loss_tsd_box_reg"] += sum(
                smooth_l1(a - b) for a, b in zip(TSD_DELTAS[y], t_tsd)) / n
            u = ref_iou(ref_decode(p, SIB_DELTAS[y], W, legacy), self.G, legacy)
            v = ref_iou(ref_decode(pr, TSD_DELTAS[y], W, legacy), self.G, legacy)
            exp["loss_pc_loc"] += max(0.0, u + min(1 - u, 0.3) - v)
        exp["loss_pc_cls"] /= len(rows) + 1  # + one 0 entry for image 1
        exp["loss_pc_loc"] /= num_fg + 1
        return exp

    def _run(self, legacy):
        heads = build_heads(legacy=legacy)
        set_tsd(heads.tsd_head, DR, DC, TSD_LOGITS, TSD_DELTAS)
        _set(heads.box_predictor.cls_score, SIB_LOGITS)
        _set(heads.box_predictor.bbox_pred, SIB_DELTAS)
        heads.train()
        feats = {k: torch.cat([v, v.flip(-1)]) for k, v in features().items()}
        imgs = ImageList(torch.zeros(2, 3, *IMG), [IMG, IMG])
        props = proposals(self.P) + proposals(self.P_EMPTY)
        tgts = targets([self.G], [self.LABEL]) + targets(torch.zeros(0, 4), [])
        with EventStorage():
            _, losses = heads(imgs, feats, props, tgts)
        expected = self._expected(legacy)
        self.assertEqual(set(losses), set(expected))
        for k, v in expected.items():
            self.assertGreater(v, 1e-4, k)  # every loss is active in this case
            self.assertAlmostEqual(losses[k].item(), v, places=5, msg=k)
        return heads, losses

    def test_losses(self):
        self._run(legacy=False)

    def test_losses_legacy(self):
        self._run(legacy=True)

    def test_gradients(self):
        """The PC and TSD losses do not reach the sibling; loss_tsd_box_reg and
        loss_pc_loc reach ΔR; the sibling losses do not reach the TSD branch."""
        heads, losses = self._run(legacy=False)
        og, pred = heads.tsd_head.offset_generator, heads.tsd_head.predictor
        sib = heads.box_predictor

        def grads(name, params):
            g = torch.autograd.grad(losses[name], params, retain_graph=True, allow_unused=True)
            return [0.0 if x is None else x.abs().sum().item() for x in g]

        sib_params = [sib.cls_score.bias, sib.bbox_pred.bias]
        for name in ("loss_tsd_cls", "loss_tsd_box_reg", "loss_pc_cls", "loss_pc_loc"):
            self.assertEqual(grads(name, sib_params), [0.0, 0.0], name)
        self.assertEqual(grads("loss_cls", [pred.cls_score.bias, og.delta_r_fc2.bias]), [0, 0])
        self.assertGreater(grads("loss_tsd_box_reg", [og.delta_r_fc2.bias])[0], 0)
        self.assertGreater(grads("loss_pc_loc", [og.delta_r_fc2.bias])[0], 0)
        self.assertGreater(grads("loss_pc_cls", [pred.cls_score.bias])[0], 0)
        self.assertEqual(grads("loss_tsd_box_reg", [og.delta_c_fc2.bias]), [0.0])


class TestTSDMask(unittest.TestCase):
    """Mask R-CNN config: the mask head trains on the positive proposals P (not
    P̂_r) and runs at test on the final TSD detections."""

    def test_mask_boxes(self):
        heads = build_heads(**{"MODEL.MASK_ON": True})
        set_tsd(heads.tsd_head, DR, DC, TSD_LOGITS, TSD_DELTAS)
        seen = []
        heads.mask_pooler.register_forward_hook(
            lambda m, i, o: seen.append(torch.cat([b.tensor for b in i[1]])))
        G = [40.0, 50.0, 120.0, 110.0]
        P = [[44.0, 46.0, 128.0, 112.0], [130.0, 10.0, 180.0, 60.0]]
        tgt = targets([G], [1])
        tgt[0].gt_masks = BitMasks(torch.zeros(1, *IMG, dtype=torch.bool))
        heads.train()
        with EventStorage():
            _, losses = heads(images(), features(), proposals(P), tgt)
        self.assertIn("loss_mask", losses)
        rows = sorted(seen[0].tolist())
        self.assertEqual(rows, sorted([P[0], G]))  # the two positives, untranslated
        heads.eval()
        with torch.no_grad():
            det, _ = heads(images(), features(), proposals(P))
        torch.testing.assert_close(seen[1], det[0].pred_boxes.tensor)
        self.assertEqual(tuple(det[0].pred_masks.shape[1:]), (1, 28, 28))
        box = ref_decode(ref_translate(P[0], DR, GAMMA, False), TSD_DELTAS[0], W, False)
        self.assertTrue(((seen[1] - torch.tensor(box)).abs().max(dim=1).values < 1e-3).any())


class TestTSDCascadeInference(unittest.TestCase):
    """Cascade test path: every stage refines from its own P̂_r; the final score is the
    softmax of the stages' averaged TSD logits; the final box is stage 3's TSD box on P̂_r."""

    STAGE_DR = [[1.0, 0.5], [-0.5, 1.0], [0.5, -1.0]]
    STAGE_LOGITS = [[0.3, 1.2, -0.4, 0.1], [1.0, -0.5, 0.2, 0.0], [-0.2, 0.4, 0.9, 0.3]]
    STAGE_DELTA = [[0.5, -0.2, 0.1, 0.3], [1.0, 0.4, -0.2, 0.1], [-0.6, 0.3, 0.3, -0.3]]
    STAGE_W = [(10.0, 10.0, 5.0, 5.0), (20.0, 20.0, 10.0, 10.0), (30.0, 30.0, 15.0, 15.0)]

    def test_refinement_and_scores(self):
        for legacy in (False, True):
            heads = build_heads("TSDCascadeROIHeads", legacy=legacy)
            for s, t in enumerate(heads.tsd_head):
                set_tsd(t, self.STAGE_DR[s], DC, self.STAGE_LOGITS[s], self.STAGE_DELTA[s] * K)
            for bp in heads.box_predictor:
                bp.test_nms_thresh = 1.0
            heads.eval()
            p = [50.0, 40.0, 110.0, 100.0]
            with torch.no_grad():
                det, _ = heads(images(), features(), proposals([p]))
            box = p
            for s in range(3):  # every class has the same deltas: any class choice agrees
                box = ref_decode(ref_translate(box, self.STAGE_DR[s], GAMMA, legacy),
                                 self.STAGE_DELTA[s], self.STAGE_W[s], legacy)
            mean = [sum(v) / 3 for v in zip(*self.STAGE_LOGITS)]
            probs = softmax(mean)
            self.assertEqual(len(det[0]), K)
            for i in range(K):
                c = int(det[0].pred_classes[i])
                self.assertAlmostEqual(det[0].scores[i].item(), probs[c], places=5)
                torch.testing.assert_close(det[0].pred_boxes.tensor[i], torch.tensor(box),
                                           atol=1e-3, rtol=0)


class TestTSDCascadeTraining(unittest.TestCase):
    """Cascade training path."""

    G = [40.0, 50.0, 120.0, 110.0]
    P_POS = [42.0, 50.0, 122.0, 110.0]  # IoU 78/82 ≈ 0.95 with G
    NEGS = [[140.0 + 5 * i, 5.0 * i, 185.0, 40.0 + 5 * i] for i in range(6)]

    def _heads(self, batch, fraction):
        heads = build_heads("TSDCascadeROIHeads", batch=batch, fraction=fraction)
        for s, t in enumerate(heads.tsd_head):  # every stage shifts boxes by +2 px (0.1·w/…)
            set_tsd(t, [0.0, 0.0], DC, TSD_LOGITS, [0.25 * (s + 1), 0.0, 0.0, 0.0] * K)
        heads.train()
        return heads

    def _stage_rows(self, heads, proposal_boxes, feats=None):
        seen = []
        for s, t in enumerate(heads.tsd_head):
            t.register_forward_hook(lambda m, i, o, s=s: seen.append(i[2][0].tensor.clone()))
        orig = heads._run_stage
        stage_props = []

        def run_stage(features, props, stage):
            stage_props.append([p.gt_classes.clone() for p in props])
            return orig(features, props, stage)

        heads._run_stage = run_stage
        with EventStorage():
            _, losses = heads(images(), feats or features(), proposals(proposal_boxes),
                              targets([self.G], [1]))
        return seen, stage_props, losses

    def test_every_stage_resamples_with_gt(self):
        # batch 8 at 25 %: <= 2 positives. Stage 0: {P_POS, G} positive + 6 negatives = 8 rows.
        heads = self._heads(batch=8, fraction=0.25)
        seen, labels, _ = self._stage_rows(heads, [self.P_POS] + self.NEGS)
        G = torch.tensor(self.G)
        for s in range(3):
            rows, lab = seen[s], labels[s][0]
            self.assertEqual(len(rows), 8, s)
            self.assertLessEqual(int((lab < K).sum()), 2, s)
            is_g = (rows - G).abs().max(dim=1).values < 1e-4
            # the GT is re-appended (unrefined) at every stage, labelled with its class
            self.assertEqual(int(is_g.sum()), 1, (s, rows))
            self.assertEqual(int(lab[is_g]), 1)
        # stage-1 rows: the stage-0 non-GT rows refined by stage-0 TSD deltas on P̂_r (ΔR = 0)
        # = shifted right by 0.25/10 · w, plus G.
        w = self.P_POS[2] - self.P_POS[0]
        shifted = torch.tensor(self.P_POS) + torch.tensor([1.0, 0, 1.0, 0]) * 0.025 * w
        self.assertTrue(((seen[1] - shifted).abs().max(dim=1).values < 1e-4).any())

    def test_sampling_caps_later_stages(self):
        # batch 4 at 50 %: stage 0 draws 2 of the 4 positives (3 near copies + G) and 2 of 6
        # negatives; later stages re-draw 4 rows with <= 2 positives from refined rows + G.
        heads = self._heads(batch=4, fraction=0.5)
        near = [[40.0 + i, 50.0, 120.0 + i, 110.0] for i in (1, 2, 3)]
        torch.manual_seed(3)
        seen, labels, _ = self._stage_rows(heads, near + self.NEGS)
        for s in range(3):
            self.assertEqual(len(seen[s]), 4, s)
            self.assertEqual(int((labels[s][0] < K).sum()), 2, s)

    def test_no_gradient_scaling(self):
        """The stage-1 sibling loss back-propagates into the FPN maps with weight 1 (no
        Detectron2 1/num_stages scaling): its feature gradient equals that of the same CE
        recomputed directly from Detectron2's pooler on the stage-1 RoIs."""
        heads = self._heads(batch=8, fraction=0.25)
        feats = features(requires_grad=True)
        seen, labels, losses = self._stage_rows(heads, [self.P_POS] + self.NEGS, feats)
        for s in (1, 2):
            grads = torch.autograd.grad(losses[f"loss_cls_stage{s}"], list(feats.values()),
                                        retain_graph=True)
            f2 = {k: v.detach().clone().requires_grad_(True) for k, v in feats.items()}
            pooler = ROIPooler(7, tuple(1.0 / 2 ** i for i in (2, 3, 4, 5)), 0, "ROIAlignV2")
            x = pooler(list(f2.values()), [Boxes(seen[s])])
            logits = heads.box_predictor[s].cls_score(heads.box_head[s](x))
            ref = F.cross_entropy(logits, labels[s][0])
            ref_grads = torch.autograd.grad(ref, list(f2.values()))
            self.assertGreater(sum(g.abs().sum() for g in ref_grads).item(), 0)
            for a, b in zip(grads, ref_grads):
                torch.testing.assert_close(a, b, atol=1e-7, rtol=1e-4)


if __name__ == "__main__":
    unittest.main()
