"""TSD Cascade R-CNN heads: per-stage losses, stage weights, logit averaging."""
import unittest

import torch
import torch.nn.functional as F
from detectron2.modeling.roi_heads.fast_rcnn import fast_rcnn_inference
from detectron2.utils.events import EventStorage

import tsd_tiny
from tsd import TSDCascadeROIHeads

NAMES = ["loss_cls", "loss_box_reg", "loss_tsd_cls", "loss_tsd_box_reg", "loss_pc_cls",
         "loss_pc_loc"]


class TestTSDCascade(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.cfg = tsd_tiny.tiny_cfg("TSDCascadeROIHeads")
        cls.model = tsd_tiny.build(cls.cfg)

    def _losses(self, weights):
        self.model.roi_heads.stage_loss_weights = list(weights)
        self.model.train()
        torch.manual_seed(7)
        with EventStorage():
            return self.model(tsd_tiny.random_batch(num_boxes=(3, 2), seed=4))

    def test_structure(self):
        rh = self.model.roi_heads
        self.assertIsInstance(rh, TSDCascadeROIHeads)
        self.assertEqual(len(rh.tsd_head), 3)
        weights = [h.predictor.box2box_transform.weights for h in rh.tsd_head]
        self.assertEqual([tuple(w) for w in weights],
                         [(10.0, 10.0, 5.0, 5.0), (20.0, 20.0, 10.0, 10.0),
                          (30.0, 30.0, 15.0, 15.0)])
        self.assertEqual(rh.tsd_head[0].predictor.bbox_pred.out_features, 4 * 3)  # class-specific

    def test_stage_losses_and_weights(self):
        full = self._losses([1.0, 1.0, 1.0])
        expected = {f"{n}_stage{k}" for n in NAMES for k in range(3)} | {"loss_rpn_cls",
                                                                         "loss_rpn_loc"}
        self.assertEqual(set(full), expected)
        for v in full.values():
            self.assertTrue(torch.isfinite(v))
        sum(full.values()).backward()
        for k in range(3):  # every stage's TSD head receives gradient
            g = self.model.roi_heads.tsd_head[k].predictor.cls_score.weight.grad
            self.assertGreater(g.abs().sum().item(), 0)
        self.model.zero_grad()
        scaled = self._losses([1.0, 0.5, 0.25])
        for n in NAMES:
            for k, w in enumerate([1.0, 0.5, 0.25]):
                key = f"{n}_stage{k}"
                torch.testing.assert_close(scaled[key], full[key] * w)

    def test_no_objects(self):
        self.model.train()
        with EventStorage():
            losses = self.model(tsd_tiny.random_batch(num_boxes=(0,), seed=2))
        for k, v in losses.items():
            self.assertTrue(torch.isfinite(v), k)
        sum(losses.values()).backward()
        self.model.zero_grad()

    def test_inference_averages_stage_logits(self):
        rh = self.model.roi_heads
        rh.eval()
        self.model.eval()
        logits, stage_out = [], []
        hooks = [h.predictor.register_forward_hook(lambda m, i, o: logits.append(o[0]))
                 for h in rh.tsd_head]
        hooks.append(rh.tsd_head[2].register_forward_hook(lambda m, i, o: stage_out.append(o)))
        sib_calls = []
        hooks += [m.register_forward_hook(lambda *a: sib_calls.append(1)) for m in rh.box_head]
        batch = tsd_tiny.random_batch(num_images=1, num_boxes=(1,), seed=6)
        with torch.no_grad():
            inst = self.model.inference(batch, do_postprocess=False)[0]
        for h in hooks:
            h.remove()
        self.assertEqual(len(logits), 3)
        self.assertEqual(sib_calls, [])
        (scores3, deltas3, translated3), _ = stage_out[0]
        probs = F.softmax(sum(logits) / 3, dim=-1)
        boxes = rh.tsd_head[2].predictor.box2box_transform.apply_deltas(deltas3, translated3)
        ref, _ = fast_rcnn_inference([boxes], [probs], [inst.image_size], 0.0, 0.5, 100)
        torch.testing.assert_close(inst.scores, ref[0].scores)
        torch.testing.assert_close(inst.pred_boxes.tensor, ref[0].pred_boxes.tensor)

    def test_rejects_class_agnostic(self):
        cfg = tsd_tiny.tiny_cfg("TSDCascadeROIHeads")
        cfg.MODEL.ROI_BOX_HEAD.CLS_AGNOSTIC_BBOX_REG = True
        with self.assertRaisesRegex(ValueError, "CLS_AGNOSTIC_BBOX_REG"):
            tsd_tiny.build(cfg)


if __name__ == "__main__":
    unittest.main()
