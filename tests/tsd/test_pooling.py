"""The deformable RoI pooling of TSD against a literal loop transcription of the
authors' CUDA kernel, plus hand-computed examples."""
import math
import unittest

import torch
from torchvision.ops import roi_align

from tsd.geometry import translate_boxes
from tsd.pooling import deform_roi_pool, fpn_levels, multi_level_deform_roi_pool


def _c_round(v):
    return math.copysign(math.floor(abs(v) + 0.5), v)


def _bilinear(feat, h, w):
    """Kernel's bilinear_interp: floor/ceil neighbours (equal at integer coordinates)."""
    x1, x2, y1, y2 = math.floor(w), math.ceil(w), math.floor(h), math.ceil(h)
    dx, dy = w - x1, h - y1
    return (
        (1 - dx) * (1 - dy) * feat[:, y1, x1]
        + (1 - dx) * dy * feat[:, y2, x1]
        + dx * (1 - dy) * feat[:, y1, x2]
        + dx * dy * feat[:, y2, x2]
    )


def reference_pool(feat, box, off, scale, k, S, gamma, legacy):
    """Loop transcription of DeformablePSROIPoolForwardKernel (group 1), one RoI.

    feat (C, H, W) double; box (x1, y1, x2, y2) floats; off (2, k, k) or None.
    ``legacy=False``: the aligned variant (no rounding, end = x2·s − 0.5, centred samples).
    """
    C, H, W = feat.shape
    x1, y1, x2, y2 = [float(v) for v in box]
    if legacy:
        sw, sh = _c_round(x1) * scale - 0.5, _c_round(y1) * scale - 0.5
        ew, eh = (_c_round(x2) + 1) * scale - 0.5, (_c_round(y2) + 1) * scale - 0.5
        c = 0.0
    else:
        sw, sh, ew, eh = x1 * scale - 0.5, y1 * scale - 0.5, x2 * scale - 0.5, y2 * scale - 0.5
        c = 0.5
    rw, rh = max(ew - sw, 0.1), max(eh - sh, 0.1)
    bw, bh = rw / k, rh / k
    out = torch.zeros(C, k, k, dtype=feat.dtype)
    for ph in range(k):
        for pw in range(k):
            tx = gamma * float(off[0, ph, pw]) if off is not None else 0.0
            ty = gamma * float(off[1, ph, pw]) if off is not None else 0.0
            wstart = pw * bw + sw + tx * rw
            hstart = ph * bh + sh + ty * rh
            total, count = torch.zeros(C, dtype=feat.dtype), 0
            for ih in range(S):
                for iw in range(S):
                    w = wstart + (iw + c) * bw / S
                    h = hstart + (ih + c) * bh / S
                    if w < -0.5 or w > W - 0.5 or h < -0.5 or h > H - 0.5:
                        continue
                    w, h = min(max(w, 0.0), W - 1.0), min(max(h, 0.0), H - 1.0)
                    total = total + _bilinear(feat, h, w)
                    count += 1
            out[:, ph, pw] = total / count if count else 0.0
    return out


def _random_case(seed, R=8, C=3, H=9, W=11, stride=4.0, k=3, inside=False):
    g = torch.Generator().manual_seed(seed)
    feat = torch.randn(1, C, H, W, generator=g, dtype=torch.float64)
    img_w, img_h = W * stride, H * stride
    if inside:
        xy = torch.rand(R, 2, generator=g, dtype=torch.float64) * torch.tensor([img_w, img_h]) * 0.3
        wh = (0.2 + 0.3 * torch.rand(R, 2, generator=g, dtype=torch.float64)) * torch.tensor(
            [img_w, img_h]
        )
        xy = xy + 0.1 * torch.tensor([img_w, img_h])
    else:  # partly or fully outside the map, some tiny
        xy = (torch.rand(R, 2, generator=g, dtype=torch.float64) * 1.6 - 0.4) * torch.tensor(
            [img_w, img_h]
        )
        wh = torch.rand(R, 2, generator=g, dtype=torch.float64) * torch.tensor([img_w, img_h])
    boxes = torch.cat([xy, xy + wh], dim=1)
    off = torch.randn(R, 2, k, k, generator=g, dtype=torch.float64)
    return feat, boxes, off


class TestAgainstKernelReference(unittest.TestCase):
    def _compare(self, legacy, inside, seed, k=3, S=2, gamma=0.1, with_offsets=True):
        feat, boxes, off = _random_case(seed, k=k, inside=inside)
        off = off if with_offsets else None
        got = deform_roi_pool(feat, boxes, off, 0.25, k, S, gamma, legacy)
        for r in range(boxes.shape[0]):
            ref = reference_pool(
                feat[0], boxes[r], None if off is None else off[r], 0.25, k, S, gamma, legacy
            )
            torch.testing.assert_close(got[r], ref, rtol=1e-10, atol=1e-10)

    def test_legacy_forward_matches_loop_reference(self):
        for seed in range(3):
            self._compare(legacy=True, inside=False, seed=seed)
        self._compare(legacy=True, inside=False, seed=7, with_offsets=False)

    def test_aligned_forward_matches_loop_reference(self):
        for seed in range(3):
            self._compare(legacy=False, inside=False, seed=seed)

    def test_full_size_bins_match_reference(self):
        # k = 7, S = 4 as in the configs, large offsets (γ = 0.5) to leave the map
        self._compare(legacy=True, inside=False, seed=11, k=7, S=4, gamma=0.5)

    def test_gradcheck_offsets_and_features(self):
        # inside the map and small offsets: no sample crosses the validity/clamp boundaries,
        # where the operator is not smooth; random doubles avoid integer coordinates.
        feat, boxes, off = _random_case(5, R=3, inside=True)
        off = (0.3 * off).requires_grad_(True)
        feat.requires_grad_(True)

        def fn(f, o):
            return deform_roi_pool(f, boxes, o, 0.25, 3, 2, 0.1, True)

        self.assertTrue(torch.autograd.gradcheck(fn, (feat, off), eps=1e-6, atol=1e-6))

        def fn_aligned(f, o):
            return deform_roi_pool(f, boxes, o, 0.25, 3, 2, 0.1, False)

        self.assertTrue(torch.autograd.gradcheck(fn_aligned, (feat, off), eps=1e-6, atol=1e-6))


class TestVerificationFacts(unittest.TestCase):
    def setUp(self):
        # ramp feature f(c, y, x) = x on a 25×38 map (stride 16)
        self.ramp = torch.arange(38.0).view(1, 1, 1, 38).expand(1, 2, 25, 38).contiguous()
        self.box = torch.tensor([[96.0, 64.0, 271.0, 175.0]])

    def test_ramp_values_and_translation(self):
        out = deform_roi_pool(self.ramp, self.box, torch.zeros(1, 2, 7, 7), 1 / 16.0)
        expected = torch.tensor([6.0893, 7.6607, 9.2321, 10.8036, 12.3750, 13.9464, 15.5179])
        for ph in range(7):
            torch.testing.assert_close(out[0, 0, ph], expected, atol=1e-4, rtol=0)
        off = torch.zeros(1, 2, 7, 7)
        off[:, 0] = 1.0  # ΔR = (1, 0): every value + 0.1·roi_w = 1.1
        shifted = deform_roi_pool(self.ramp, self.box, off, 1 / 16.0)
        torch.testing.assert_close(shifted - out, torch.full_like(out, 1.1), atol=1e-5, rtol=0)

    def test_zero_offsets_equal_no_translation(self):
        feat, boxes, off = _random_case(2, R=6, k=7)
        for legacy in (True, False):
            plain = deform_roi_pool(feat, boxes, None, 0.25, legacy=legacy)
            zero = deform_roi_pool(feat, boxes, torch.zeros_like(off), 0.25, legacy=legacy)
            torch.testing.assert_close(zero, plain, rtol=0, atol=0)
            # ΔC constant over the bins and equal to ΔR -> same features
            dr = torch.randn(6, 2, dtype=torch.float64)
            dc = dr[:, :, None, None].expand(6, 2, 7, 7).clone()
            a = deform_roi_pool(feat, boxes, dc, 0.25, legacy=legacy)
            b = deform_roi_pool(feat, boxes, dr[:, :, None, None].expand(6, 2, 7, 7), 0.25,
                                legacy=legacy)
            torch.testing.assert_close(a, b, rtol=0, atol=0)

    def test_aligned_zero_offsets_equal_roi_align_v2_inside_map(self):
        feat, boxes, _ = _random_case(4, R=5, inside=True)
        ours = deform_roi_pool(feat, boxes, None, 0.25, output_size=7, samples_per_bin=4,
                               legacy=False)
        rois = torch.cat([torch.zeros(5, 1, dtype=boxes.dtype), boxes], dim=1)
        ref = roi_align(feat, rois, 7, spatial_scale=0.25, sampling_ratio=4, aligned=True)
        torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-10)

    def test_outside_roi_is_zero_and_partial_bins_average_valid_samples(self):
        feat = torch.ones(1, 1, 10, 10)
        far = torch.tensor([[200.0, 200.0, 260.0, 260.0]])
        self.assertEqual(deform_roi_pool(feat, far, None, 0.25).abs().sum().item(), 0.0)
        # a RoI half outside on a constant map: every bin with a valid sample is exactly 1
        half = torch.tensor([[20.0, 4.0, 60.0, 30.0]])  # x range 4.5..15 feature px, W = 10
        out = deform_roi_pool(feat.double(), half.double(), None, 0.25)
        vals = {round(v, 12) for v in out.flatten().tolist()}
        self.assertTrue(vals <= {0.0, 1.0} and 1.0 in vals and 0.0 in vals, vals)

    def test_integer_pixel_translation_equals_shifted_pooling(self):
        g = torch.Generator().manual_seed(0)
        feat = torch.randn(1, 4, 40, 50, generator=g, dtype=torch.float64)
        box = torch.tensor([[40.0, 36.0, 119.0, 95.0]])  # width 80 px (+1 convention)
        # stride 4: 0.1·dx·80 = 8 px when dx = 1
        off = torch.zeros(1, 2, 7, 7, dtype=torch.float64)
        off[:, 0] = 1.0
        moved = deform_roi_pool(feat, box, off, 0.25)
        shifted_box = box + torch.tensor([[8.0, 0.0, 8.0, 0.0]])
        torch.testing.assert_close(moved, deform_roi_pool(feat, shifted_box, None, 0.25))

    def test_offset_gradient_and_no_roi_gradient(self):
        box = self.box.clone().requires_grad_(True)
        off = torch.zeros(1, 2, 7, 7, requires_grad=True)
        out = deform_roi_pool(self.ramp, box, off, 1 / 16.0)
        out[:, 0].sum().backward()
        self.assertIsNone(box.grad)
        # ramp slope 1 in x: d out / d off_x = γ · roi_w · 1 (roi_w = 11 feature px)
        torch.testing.assert_close(off.grad[0, 0], torch.full((7, 7), 1.1), atol=1e-5, rtol=0)
        torch.testing.assert_close(off.grad[0, 1], torch.zeros(7, 7))

    def test_level_examples(self):
        boxes = torch.tensor([[0, 0, 111, 111.0], [0, 0, 110, 110], [0, 0, 447, 447]])
        self.assertEqual(fpn_levels(boxes, 2, 5, legacy=True).tolist(), [1, 0, 3])

    def test_translation_example(self):
        P = torch.tensor([[10.0, 20.0, 109.0, 69.0]])
        out = translate_boxes(P, torch.tensor([[1.0, -2.0]]), 0.1, legacy=True)
        torch.testing.assert_close(out, torch.tensor([[20.0, 10.0, 119.0, 59.0]]))
        # on P2 the kernel shifts samples by (+2.5, -2.5) feature px = (+10, -10) image px
        g = torch.Generator().manual_seed(1)
        feat = torch.randn(1, 2, 40, 40, generator=g, dtype=torch.float64)
        off = torch.zeros(1, 2, 7, 7, dtype=torch.float64)
        off[:, 0], off[:, 1] = 1.0, -2.0
        a = deform_roi_pool(feat, P.double(), off, 0.25)
        b = deform_roi_pool(feat, P.double() + torch.tensor([[10.0, -10, 10, -10]]), None, 0.25)
        torch.testing.assert_close(a, b)

    def test_multi_level_routes_rois_by_level_and_image(self):
        g = torch.Generator().manual_seed(2)
        feats = [torch.randn(2, 3, 32 // s, 32 // s, generator=g) for s in (1, 2)]
        rois = torch.tensor([[0, 2.0, 2, 20, 20], [1, 4.0, 4, 30, 26], [1, 0, 0, 12, 9]])
        levels = torch.tensor([1, 0, 1])
        off = torch.randn(3, 2, 7, 7, generator=g)
        out = multi_level_deform_roi_pool(feats, [4.0 / 4, 1 / 2.0], rois, levels, off)
        for r in range(3):
            lvl, b = int(levels[r]), int(rois[r, 0])
            ref = deform_roi_pool(feats[lvl][b], rois[r : r + 1, 1:], off[r : r + 1],
                                  [1.0, 0.5][lvl])
            torch.testing.assert_close(out[r : r + 1], ref)


if __name__ == "__main__":
    unittest.main()
