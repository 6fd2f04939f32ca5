"""Module-level values of RDSNet checked by hand: the pixel stream's fusion (paper Sec. 3.2),
the crop with an absolute padding, and the size arithmetic used when sizes are traced tensors."""
import pytest
import torch
import torch.nn.functional as F
from detectron2.layers import ShapeSpec

import rdsnet.rdsnet as rdsnet_module
from rdsnet.cropping import crop_mask
from rdsnet.object_stream import RDSNetHead
from rdsnet.pixel_stream import PixelStream
from rdsnet.targets import pad_shape


def _extent(m):
    cols, rows = m.any(0).nonzero()[:, 0], m.any(1).nonzero()[:, 0]
    return int(cols.min()), int(cols.max()) + 1, int(rows.min()), int(rows.max()) + 1


@pytest.mark.parametrize(
    "padding, extent",
    [
        (0, (10, 29, 5, 24)),  # no padding at all (not the 1-pixel minimum of fractions)
        (1, (9, 30, 4, 25)),  # one pixel (not 100 % of the box)
        (1.5, (8, 30, 3, 25)),  # 8.5 -> 8, 30.5 -> 30 (truncation), not 150 % of the box
        (2, (8, 31, 3, 26)),
    ],
)
def test_crop_absolute_padding(padding, extent):
    """padding outside (0, 1) is in pixels: X1 = x1 - p, X2 = x2 + p, truncated; half-open."""
    boxes = torch.tensor([[10.0, 5.0, 29.0, 24.0], [40.0, 30.0, 49.0, 44.0]])
    m = crop_mask(boxes, 50, 60, padding)
    x1, x2, y1, y2 = extent
    assert _extent(m[0]) == extent
    assert int(m[0].sum()) == (x2 - x1) * (y2 - y1)
    # the second (narrower) box gets the same absolute padding
    assert _extent(m[1]) == (x1 + 30, x2 + 20, y1 + 25, y2 + 20)


def test_pad_shape_plain_and_traced():
    """ceil(size / 32) * 32 for Python ints and for traced integer tensors (export)."""
    assert pad_shape((65, 100), 32) == (96, 128)
    assert pad_shape((64, 96), 32) == (64, 96)
    for (h, w), expected in (((65, 100), (96, 128)), ((64, 96), (64, 96)), ((33, 31), (64, 32)), ((31, 33), (32, 64))):
        ph, pw = pad_shape((torch.tensor(h), torch.tensor(w)), 32)
        assert isinstance(ph, torch.Tensor) and not ph.is_floating_point()
        assert not pw.is_floating_point()
        assert (int(ph), int(pw)) == expected


def test_topk_and_chunks_plain_and_traced():
    """min(topk, n) and the mask-pasting chunks; traced sizes stay tensors, one chunk."""
    assert rdsnet_module._topk_count(1000, 5) == 5
    assert rdsnet_module._topk_count(3, 5) == 3
    k = rdsnet_module._topk_count(1000, torch.tensor(5))
    assert isinstance(k, torch.Tensor) and int(k) == 5
    assert int(rdsnet_module._topk_count(3, torch.tensor(5))) == 3
    assert rdsnet_module._chunks(10, 4) == [(0, 4), (4, 8), (8, 12)]
    assert rdsnet_module._chunks(3, 4) == [(0, 4)]
    assert rdsnet_module._chunks(0, 4) == []
    (only,) = rdsnet_module._chunks(torch.tensor(7), 4)
    assert only[0] == 0 and int(only[1]) == 7


def test_pixel_stream_by_value():
    """U = conv1x1(Up2(CM(CM(p3) + Up2(CM(p4)) + Up2(CM(Up2(CM(p5))))))), CM = conv3x3 + ReLU
    (no norm: biased convs), Up2 bilinear with corners aligned; reference written here."""
    torch.manual_seed(0)
    ps = PixelStream(in_features=["p3", "p4", "p5"], in_channels=3, conv_dim=4, rep_dim=2, norm="")
    with torch.no_grad():
        for p in ps.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
    feats = {"p3": torch.randn(1, 3, 8, 8), "p4": torch.randn(1, 3, 4, 4), "p5": torch.randn(1, 3, 2, 2)}

    def cm(conv, x):
        return F.relu(F.conv2d(x, conv.weight, conv.bias, padding=1))

    def up2(x):  # align_corners=True: output sample i of 2n-1 .. maps to i * (n - 1) / (2n - 1)
        n = x.shape[-1]
        pos = torch.arange(2 * n, dtype=torch.float64) * (n - 1) / (2 * n - 1)
        lo = pos.floor().long().clamp(max=n - 1)
        hi = (lo + 1).clamp(max=n - 1)
        t = (pos - lo.double()).float()
        rows = x[..., lo, :] * (1 - t)[:, None] + x[..., hi, :] * t[:, None]
        return rows[..., lo] * (1 - t) + rows[..., hi] * t

    x = (
        cm(ps.p3_conv, feats["p3"])
        + up2(cm(ps.p4_conv, feats["p4"]))
        + up2(cm(ps.p5_conv2, up2(cm(ps.p5_conv1, feats["p5"]))))
    )
    expected = F.conv2d(up2(cm(ps.fuse_conv, x)), ps.out.weight, ps.out.bias)
    with torch.no_grad():
        got = ps(feats)
    assert got.shape == (1, 2, 16, 16)
    assert torch.allclose(got, expected, atol=1e-5, rtol=1e-4)


def test_head_without_norm_and_channel_error():
    """NORM "": the tower convs get a bias and an Identity keeps the [conv, norm, ReLU] layout;
    GN: no conv bias. Levels with different channels are rejected by name."""
    plain = RDSNetHead(in_channels=8, num_anchors=2, num_classes=3, rep_dim=4, num_convs=2, norm="")
    gn = RDSNetHead(in_channels=32, num_anchors=2, num_classes=3, rep_dim=4, num_convs=2, norm="GN")
    for tower in (plain.cls_subnet, plain.bbox_subnet, plain.rep_subnet):
        assert len(tower) == 6
        assert all(tower[3 * i].bias is not None for i in range(2))
        assert all(isinstance(tower[3 * i + 1], torch.nn.Identity) for i in range(2))
    assert all(gn.cls_subnet[3 * i].bias is None for i in range(2))
    assert isinstance(gn.cls_subnet[1], torch.nn.GroupNorm)
    # parameters: 3 towers x 2 x (9*8*8 + 8) + predictors 9*8*(6 + 8 + 16) + (6 + 8 + 16)
    assert sum(p.numel() for p in plain.parameters()) == 3 * 2 * 584 + 72 * 30 + 30
    logits, deltas, reps = plain([torch.randn(1, 8, 4, 4)])
    assert logits[0].shape == (1, 6, 4, 4) and reps[0].shape == (1, 16, 4, 4)
    from rdsnet_tiny import tiny_cfg

    cfg = tiny_cfg()
    with pytest.raises(ValueError, match="RDSNetHead needs equal channels on all levels"):
        RDSNetHead(cfg, [ShapeSpec(channels=8), ShapeSpec(channels=16)], num_anchors=2)
