"""Progressive-constraint losses and the "+1" IoU against hand-computed values."""
import math
import unittest

import torch

from tsd.geometry import aligned_iou
from tsd.losses import pc_cls_loss, pc_loc_loss


def _logits_with_prob(p, num_classes=3, label=0):
    """(K+1,) logits whose softmax gives probability p to `label`, the rest shared equally."""
    rest = (1.0 - p) / num_classes
    probs = torch.full((num_classes + 1,), rest, dtype=torch.float64)
    probs[label] = p
    return probs.log()


def _cls_case(p_sib, p_tsd, label=0):
    sib = _logits_with_prob(p_sib, label=label)[None]
    tsd = _logits_with_prob(p_tsd, label=label)[None].clone().requires_grad_(True)
    sib.requires_grad_(True)
    gt = torch.tensor([label])
    return sib, tsd, gt


class TestPCCls(unittest.TestCase):
    def test_simple_values(self):
        for p_sib, p_tsd, expected in [(0.5, 0.5, 0.3), (0.9, 0.9, 0.1), (0.9, 0.95, 0.05),
                                       (0.5, 0.85, 0.0)]:
            sib, tsd, gt = _cls_case(p_sib, p_tsd)
            loss = pc_cls_loss(sib, tsd, gt, [1], margin=0.3)
            self.assertAlmostEqual(loss.item(), expected, places=9, msg=(p_sib, p_tsd))

    def test_gradient_only_to_tsd_and_only_when_active(self):
        sib, tsd, gt = _cls_case(0.5, 0.5)
        pc_cls_loss(sib, tsd, gt, [1]).backward()
        self.assertIsNone(sib.grad)
        self.assertGreater(tsd.grad.abs().sum().item(), 0)
        sib, tsd, gt = _cls_case(0.5, 0.85)  # inactive (margin satisfied)
        pc_cls_loss(sib, tsd, gt, [1]).backward()
        self.assertEqual(tsd.grad.abs().sum().item(), 0.0)

    def test_mean_over_all_rois_including_negatives(self):
        # 2 images × 3 RoIs, each image with one positive; all M_cls = 0.3 -> loss = 0.3
        K = 3
        gt = torch.tensor([0, K, K, 2, K, K])
        sib = torch.stack([_logits_with_prob(0.5, label=int(c)) for c in gt])
        tsd = sib.clone()
        loss = pc_cls_loss(sib, tsd, gt, [3, 3], margin=0.3)
        self.assertAlmostEqual(loss.item(), 0.3, places=9)

    def test_image_without_positives_adds_one_zero(self):
        K = 3
        gt = torch.tensor([1, K, K, K])  # image 0: 2 RoIs, 1 positive; image 1: 2 negatives
        sib = torch.stack([_logits_with_prob(0.5, label=int(c)) for c in gt])
        tsd = sib.clone().requires_grad_(True)
        loss = pc_cls_loss(sib, tsd, gt, [2, 2], margin=0.3)
        self.assertAlmostEqual(loss.item(), 0.3 * 2 / 3, places=9)  # (0.3 + 0.3 + 0) / 3
        loss.backward()
        self.assertEqual(tsd.grad[2:].abs().sum().item(), 0.0)

    def test_no_positive_anywhere_is_zero(self):
        gt = torch.tensor([3, 3])
        sib = torch.randn(2, 4)
        tsd = torch.randn(2, 4, requires_grad=True)
        loss = pc_cls_loss(sib, tsd, gt, [1, 1])
        self.assertEqual(loss.item(), 0.0)
        loss.backward()
        self.assertEqual(tsd.grad.abs().sum().item(), 0.0)
        empty = pc_cls_loss(torch.zeros(0, 4), torch.zeros(0, 4), torch.zeros(0).long(), [0])
        self.assertFalse(math.isnan(empty.item()))


class TestIoUAndPCLoc(unittest.TestCase):
    def test_plus_one_iou(self):
        a = torch.tensor([[0.0, 0, 9, 9]])
        b = torch.tensor([[5.0, 0, 14, 9]])
        self.assertAlmostEqual(aligned_iou(a, b, legacy=True).item(), 1 / 3, places=6)
        self.assertAlmostEqual(aligned_iou(a, b, legacy=False).item(), 36 / 126, places=6)

    def _boxes_with_iou(self, iou):
        """Box of IoU `iou` with G = (0, 0, 99, 99) under the +1 convention (x-shift)."""
        # overlap width o: o·100 / (2·100·100 − o·100) = iou -> o = 200·iou / (1 + iou)
        o = 200 * iou / (1 + iou)
        shift = 100 - o
        return torch.tensor([[shift, 0.0, 99 + shift, 99]], dtype=torch.float64)

    def test_simple_values(self):
        G = torch.tensor([[0.0, 0, 99, 99]], dtype=torch.float64)
        fg = torch.tensor([True])
        for u, expected in [(0.5, 0.3), (0.7, 0.3), (0.8, 0.2), (0.9, 0.1)]:
            B = self._boxes_with_iou(u)
            self.assertAlmostEqual(aligned_iou(B, G).item(), u, places=9)
            BD = B.clone().requires_grad_(True)
            loss = pc_loc_loss(B, BD, G, fg, [1], margin=0.3, legacy=True)
            self.assertAlmostEqual(loss.item(), expected, places=9)
            loss.backward()
            self.assertGreater(BD.grad.abs().sum().item(), 0)

    def test_only_positives_and_zero_entries(self):
        G = torch.tensor([[0.0, 0, 99, 99]] * 3, dtype=torch.float64)
        B = self._boxes_with_iou(0.5).repeat(3, 1)
        BD = B.clone().requires_grad_(True)
        fg = torch.tensor([True, False, False])  # image 0: one positive; image 1: none
        loss = pc_loc_loss(B, BD, G, fg, [2, 1], margin=0.3)
        self.assertAlmostEqual(loss.item(), 0.3 / 2, places=9)
        loss.backward()
        self.assertEqual(BD.grad[1:].abs().sum().item(), 0.0)
        sib = B.clone().requires_grad_(True)
        pc_loc_loss(sib, B.clone().requires_grad_(True), G, fg, [3]).backward()
        self.assertIsNone(sib.grad)

    def test_no_positive_is_zero(self):
        G = torch.zeros(2, 4)
        BD = torch.rand(2, 4, requires_grad=True)
        loss = pc_loc_loss(G, BD, G, torch.tensor([False, False]), [1, 1])
        self.assertEqual(loss.item(), 0.0)
        loss.backward()
        self.assertEqual(BD.grad.abs().sum().item(), 0.0)


if __name__ == "__main__":
    unittest.main()
