"""TSD head: parameter counts, init, P̂_r target/decode identities, train/eval behaviour
and the no-positive / no-object cases."""
import math
import unittest

import torch
from detectron2.layers import ShapeSpec
from detectron2.modeling.box_regression import Box2BoxTransform
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage

import tsd_tiny
from tsd import TSDROIHeads
from tsd.geometry import translate_boxes
from tsd.head import TSDOutputLayers


def _n(module):
    return sum(p.numel() for p in module.parameters())


class TestR50HeadSize(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.heads = tsd_tiny.r50_heads()

    def test_parameter_counts(self):
        h = self.heads
        self.assertIsInstance(h, TSDROIHeads)
        t = h.tsd_head
        og = t.offset_generator
        self.assertEqual(_n(og.offset_fc), 3_211_520)
        self.assertEqual(_n(og.delta_c_fc1) + _n(og.delta_c_fc2), 90_978)
        self.assertEqual(_n(og.delta_r_fc1) + _n(og.delta_r_fc2), 66_306)
        self.assertEqual(_n(og), 3_368_804)
        for tower in (t.cls_head, t.reg_head, h.box_head):
            self.assertEqual(_n(tower), 13_895_680)
        self.assertEqual(_n(t.predictor.cls_score), 83_025)
        self.assertEqual(_n(h.box_predictor.cls_score), 83_025)
        # Detectron2 has no background regression slot: 4·80 rows instead of 4·81
        self.assertEqual(_n(t.predictor.bbox_pred), 332_100 - 4_100)
        training = _n(h.box_head) + _n(h.box_predictor) + _n(t)
        inference = _n(t)
        self.assertEqual(training, 45_877_894)
        self.assertEqual(inference, 31_571_189)
        # + the (never trained) background slots of fc_reg and TSD_fc_reg of the authors' head
        bg_slot = 4 * 1024 + 4
        self.assertEqual(training + 2 * bg_slot, 45_886_094)
        self.assertEqual(inference + bg_slot, 31_575_289)
        self.assertEqual(_n(h.box_head) + _n(h.box_predictor) + bg_slot, 14_310_805)

    def test_init(self):
        t, h = self.heads.tsd_head, self.heads
        bound = 1 / 32
        for layer in (t.predictor.cls_score, t.predictor.bbox_pred):
            self.assertLessEqual(layer.weight.abs().max().item(), bound)
            self.assertLessEqual(layer.bias.abs().max().item(), bound)
            self.assertGreater(layer.bias.abs().max().item(), 0)  # default init, not zero
        self.assertAlmostEqual(h.box_predictor.cls_score.weight.std().item(), 0.01, delta=1e-3)
        self.assertAlmostEqual(h.box_predictor.bbox_pred.weight.std().item(), 0.001, delta=1e-4)
        og = t.offset_generator
        self.assertAlmostEqual(og.offset_fc.weight.std().item(), 1 / math.sqrt(12544), delta=2e-4)
        for layer in (og.delta_c_fc1, og.delta_c_fc2, og.delta_r_fc1):
            self.assertAlmostEqual(layer.weight.std().item(), 1 / 16, delta=4e-3)
        for layer in (og.offset_fc, og.delta_c_fc1, og.delta_c_fc2, og.delta_r_fc1, og.delta_r_fc2):
            self.assertEqual(layer.bias.abs().sum().item(), 0.0)

    def test_output_shapes(self):
        torch.manual_seed(1)
        feats = [torch.randn(1, 256, 64 // 2 ** i, 64 // 2 ** i) for i in range(4)]
        boxes = [Boxes(torch.tensor([[4.0, 8.0, 60.0, 90.0], [100.0, 40.0, 250.0, 200.0]]))]
        x = torch.randn(2, 256, 7, 7)
        self.heads.eval()
        with torch.no_grad():
            (scores, deltas, translated), (dc, dr) = self.heads.tsd_head(x, feats, boxes)
            f_c, f_r = self.heads.tsd_head.pool(
                feats, torch.cat([torch.zeros(2, 1), boxes[0].tensor], 1),
                torch.tensor([0, 2]), dc, dr)
        self.assertEqual(tuple(dc.shape), (2, 2, 7, 7))
        self.assertEqual(tuple(dr.shape), (2, 2))
        self.assertEqual(tuple(f_c.shape), (2, 256, 7, 7))
        self.assertEqual(tuple(f_r.shape), (2, 256, 7, 7))
        self.assertEqual(tuple(scores.shape), (2, 81))
        self.assertEqual(tuple(deltas.shape), (2, 320))
        self.assertEqual(tuple(translated.shape), (2, 4))


class TestTranslatedTargets(unittest.TestCase):
    def setUp(self):
        torch.manual_seed(0)
        self.P = torch.tensor([[10.0, 20.0, 109.0, 69.0], [30.0, 5.0, 90.0, 100.0]])
        self.G = torch.tensor([[14.0, 18.0, 120.0, 75.0], [25.0, 10.0, 80.0, 110.0]])
        self.dr = torch.tensor([[0.7, -1.3], [-0.4, 0.2]])

    def test_target_identity_and_decode(self):
        for weights in [(10.0, 10.0, 5.0, 5.0), (20.0, 20.0, 10.0, 10.0)]:
            b2b = Box2BoxTransform(weights)
            t = b2b.get_deltas(self.P, self.G)
            zero = translate_boxes(self.P, torch.zeros(2, 2), 0.1, legacy=False)
            torch.testing.assert_close(zero, self.P)
            torch.testing.assert_close(b2b.get_deltas(zero, self.G), t)
            Pr = translate_boxes(self.P, self.dr, 0.1, legacy=False)
            t_tsd = b2b.get_deltas(Pr, self.G)
            factor = 0.1 * weights[0]  # 0.1 / σ_xy
            torch.testing.assert_close(t_tsd[:, :2], t[:, :2] - factor * self.dr)
            torch.testing.assert_close(t_tsd[:, 2:], t[:, 2:])
            d = torch.randn(2, 4)
            shifted = d + torch.cat([factor * self.dr, torch.zeros(2, 2)], dim=1)
            torch.testing.assert_close(b2b.apply_deltas(d, Pr), b2b.apply_deltas(shifted, self.P))

    def test_regression_loss_gradient_reaches_delta_r_through_targets(self):
        K = 3
        pred = TSDOutputLayers(
            ShapeSpec(channels=8), box2box_transform=Box2BoxTransform((10.0, 10.0, 5.0, 5.0)),
            num_classes=K, smooth_l1_beta=1.0,
        )
        props = Instances((200, 200))
        props.proposal_boxes = Boxes(self.P)
        props.gt_boxes = Boxes(self.G)
        props.gt_classes = torch.tensor([1, 2])
        dr = self.dr.clone().requires_grad_(True)
        deltas = torch.randn(2, 4 * K, requires_grad=True)
        scores = torch.randn(2, K + 1)
        translated = translate_boxes(self.P, dr, 0.1, legacy=False)  # pooling path absent
        with EventStorage():
            loss = pred.losses((scores, deltas, translated), [props])["loss_tsd_box_reg"]
        loss.backward()
        self.assertGreater(dr.grad.abs().sum().item(), 0)
        gt_grad = deltas.grad.view(2, K, 4)[torch.arange(2), props.gt_classes][:, :2]
        torch.testing.assert_close(dr.grad, gt_grad)
        # with the flag, no target-path gradient
        pred.detach_translated_targets = True
        dr2 = self.dr.clone().requires_grad_(True)
        with EventStorage():
            loss = pred.losses(
                (scores, deltas.detach(), translate_boxes(self.P, dr2, 0.1, False)), [props]
            )["loss_tsd_box_reg"]
        self.assertFalse(loss.requires_grad)


class TestTrainEval(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.cfg = tsd_tiny.tiny_cfg("TSDROIHeads")
        cls.model = tsd_tiny.build(cls.cfg)

    def test_training_losses(self):
        self.model.train()
        with EventStorage():
            losses = self.model(tsd_tiny.random_batch(num_boxes=(3, 1)))
        expected = {"loss_rpn_cls", "loss_rpn_loc", "loss_cls", "loss_box_reg", "loss_tsd_cls",
                    "loss_tsd_box_reg", "loss_pc_cls", "loss_pc_loc"}
        self.assertEqual(set(losses), expected)
        total = sum(losses.values())
        self.assertTrue(torch.isfinite(total))
        total.backward()
        og = self.model.roi_heads.tsd_head.offset_generator
        self.assertGreater(og.delta_c_fc2.weight.grad.abs().sum().item(), 0)
        self.assertGreater(og.delta_r_fc2.weight.grad.abs().sum().item(), 0)
        self.model.zero_grad()

    def test_images_without_objects_and_no_positives(self):
        self.model.train()
        for num_boxes in [(0,), (2, 0)]:
            with EventStorage():
                losses = self.model(tsd_tiny.random_batch(num_boxes=num_boxes, seed=3))
            for k, v in losses.items():
                self.assertTrue(torch.isfinite(v), (num_boxes, k, v))
            sum(losses.values()).backward()
            for name, p in self.model.named_parameters():
                if p.grad is not None:
                    self.assertTrue(torch.isfinite(p.grad).all(), name)
            self.model.zero_grad()
            if num_boxes == (0,):
                self.assertEqual(losses["loss_pc_cls"].item(), 0.0)
                self.assertEqual(losses["loss_pc_loc"].item(), 0.0)
                self.assertEqual(losses["loss_tsd_box_reg"].item(), 0.0)

    def test_eval_uses_tsd_only(self):
        self.model.eval()
        rh = self.model.roi_heads
        called = []
        hooks = [m.register_forward_hook(lambda *a: called.append(1))
                 for m in (rh.box_head, rh.box_predictor)]
        batch = tsd_tiny.random_batch(num_boxes=(1,), seed=5)
        with torch.no_grad():
            before = self.model(batch)[0]["instances"]
            saved = {k: v.clone() for k, v in rh.box_predictor.state_dict().items()}
            saved.update({"h." + k: v.clone() for k, v in rh.box_head.state_dict().items()})
            for p in list(rh.box_head.parameters()) + list(rh.box_predictor.parameters()):
                p.add_(torch.randn_like(p))
            after = self.model(batch)[0]["instances"]
        for h in hooks:
            h.remove()
        self.assertEqual(called, [])
        torch.testing.assert_close(before.pred_boxes.tensor, after.pred_boxes.tensor)
        torch.testing.assert_close(before.scores, after.scores)
        self.assertLessEqual(len(before), 100)
        self.assertGreater(len(before), 0)
        self.assertTrue((before.scores > 0).all())
        with torch.no_grad():  # restore
            rh.box_predictor.load_state_dict({k: v for k, v in saved.items()
                                              if not k.startswith("h.")})
            rh.box_head.load_state_dict({k[2:]: v for k, v in saved.items()
                                         if k.startswith("h.")})

    def test_zero_proposals(self):
        t = self.model.roi_heads.tsd_head
        feats = [torch.randn(1, 32, 16 // 2 ** i, 16 // 2 ** i) for i in range(4)]
        empty = Boxes(torch.zeros(0, 4))
        t.train()
        predictions, (dc, dr) = t(torch.zeros(0, 32, 7, 7), feats, [empty])
        self.assertEqual(tuple(predictions[0].shape), (0, 4))
        self.assertEqual(tuple(t.predictor.predict_boxes_for_classes(
            predictions, torch.zeros(0, dtype=torch.long)).shape), (0, 4))
        props = Instances((16, 16))
        props.proposal_boxes = empty
        props.gt_classes = torch.zeros(0, dtype=torch.long)
        sibling = (torch.zeros(0, 4), torch.zeros(0, 12))
        with EventStorage():
            losses = t.losses(predictions, sibling, t.predictor.box2box_transform, [props])
        self.assertEqual(set(losses), {"loss_tsd_cls", "loss_tsd_box_reg", "loss_pc_cls",
                                       "loss_pc_loc"})
        for v in losses.values():
            self.assertEqual(v.item(), 0.0)

    def test_zero_offsets_pool_plain(self):
        t = self.model.roi_heads.tsd_head
        torch.manual_seed(2)
        feats = [torch.randn(2, 32, 32 // 2 ** i, 40 // 2 ** i) for i in range(4)]
        rois = torch.tensor([[0, 3.0, 4, 50, 60], [1, 10, 12, 100, 70], [1, 0, 0, 20, 30.0]])
        levels = torch.tensor([1, 2, 0])
        f_c, f_r = t.pool(feats, rois, levels, torch.zeros(3, 2, 7, 7), torch.zeros(3, 2))
        from tsd.pooling import multi_level_deform_roi_pool
        plain = multi_level_deform_roi_pool(feats, t.pooler_scales, rois, levels, None,
                                            legacy=t.legacy)
        torch.testing.assert_close(f_c, plain, rtol=0, atol=0)
        torch.testing.assert_close(f_r, plain, rtol=0, atol=0)


class TestProfiling(unittest.TestCase):
    def test_pooling_share_is_measured(self):
        from tsd.profiling import pooling_share, synthetic_batch

        model = tsd_tiny.build(tsd_tiny.tiny_cfg("TSDROIHeads"))
        pool, total, wall = pooling_share(model, synthetic_batch((96, 128)), "eval", iters=1)
        self.assertGreater(pool, 0.0)
        self.assertLess(pool, total)
        self.assertGreater(wall, 0.0)


if __name__ == "__main__":
    unittest.main()
