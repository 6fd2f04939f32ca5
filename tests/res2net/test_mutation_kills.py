"""Value checks that close the gaps the mutation run of the res2net package found
(tests/MUTATION.md): every MODEL.RES2NET key reaching the trunk, the defaults of the public
modules, first-of-stage pooling at s = 2 and without the stride-1 pool, shortcut placement,
dilated deformable convs, and the error messages that name their key.

Expected values come from the paper's block definition (Sec. 3.1) or plain torch ops written here.
"""
import math

import pytest
import torch
import torch.nn.functional as F
from detectron2.config import get_cfg
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_backbone

from res2net import add_res2net_config, build_res2net
from res2net.backbone import build_res2net_backbone
from res2net.blocks import Bottle2neckBlock, DeepStem
from res2net.layers import DeformConv3x3, make_norm

TINY = dict(BASE_WIDTH=4, STEM_OUT_CHANNELS=16, RES2_OUT_CHANNELS=32, NORM="BN")


def cfg_with(**res2net_keys):
    cfg = get_cfg()
    add_res2net_config(cfg)
    for k, v in res2net_keys.items():
        setattr(cfg.MODEL.RES2NET, k, v)
    return cfg


def tiny(**kw):
    args = dict(base_width=4, scale=4, stem_out_channels=16, res2_out_channels=32, norm="BN")
    args.update(kw)
    return build_res2net(**args)


def capture(block, x):
    """ReLU(conv1(x)) (= U) and the concat fed to conv3."""
    rec = {}
    hooks = [block.conv1.register_forward_hook(lambda m, i, o: rec.__setitem__("u", F.relu(o))),
             block.conv3.register_forward_pre_hook(lambda m, i: rec.__setitem__("cat", i[0]))]
    with torch.no_grad():
        rec["out"] = block(x)
    for h in hooks:
        h.remove()
    return rec


# --------------------------------------------------------------------------- config -> trunk
def test_every_res2net_key_reaches_the_trunk():
    # Non-default value for every key; each one is checked on the built backbone.
    cfg = cfg_with(SCALE=2, BASE_WIDTH=3, VARIANT="v1", NORM="GN", GN_NUM_GROUPS=1,
                   STEM_OUT_CHANNELS=8, RES2_OUT_CHANNELS=16, OUT_FEATURES=["res3", "res5"],
                   STRIDE_IN_1X1=True, RES5_DILATION=2, POOL_STRIDE1=False,
                   DEFORM_ON_PER_STAGE=[False, False, False, True], DEFORM_MODULATED=True,
                   DEFORM_NUM_GROUPS=3, ZERO_INIT_RESIDUAL=True)
    cfg.MODEL.BACKBONE.NAME = "build_res2net_backbone"
    cfg.MODEL.BACKBONE.FREEZE_AT = 0
    cfg.MODEL.PIXEL_MEAN, cfg.MODEL.PIXEL_STD = [0.0], [1.0]  # 1-channel input
    torch.manual_seed(0)
    model = build_backbone(cfg).eval()
    # v1 stem: one 7x7 conv, 1 input channel, STEM_OUT_CHANNELS outputs, GN with 1 group.
    assert tuple(model.stem.conv1.weight.shape) == (8, 1, 7, 7)
    assert isinstance(model.stem.conv1.norm, torch.nn.GroupNorm)
    assert model.stem.conv1.norm.num_groups == 1
    # s = 2, w = 3: one K_i per block, conv1 makes w * s = 6 channels in res2, 48 in res5.
    assert len(model.res2[0].convs) == 1 and model.res2[0].conv1.out_channels == 6
    assert model.res5[0].conv1.out_channels == 48
    assert all(b.bns[0].num_groups == 1 for s in (model.res2, model.res5) for b in s)
    # STRIDE_IN_1X1: res3's stride sits in conv1, not in the 3x3.
    assert model.res3[0].conv1.stride == (2, 2) and model.res3[0].convs[0].stride == (1, 1)
    # RES5_DILATION 2: res5 at stride 16, dilated 3x3s.
    assert {k: s.stride for k, s in model.output_shape().items()} == {"res3": 8, "res5": 16}
    # Deformable res5 only, DCNv2 with 3 groups: 27 * 3 offset/mask channels.
    assert not hasattr(model.res4[0], "convs_offset")
    assert model.res5[0].convs_offset[0].out_channels == 81
    assert model.res5[0].convs[0].dilation == 2
    # ZERO_INIT_RESIDUAL: every conv3 norm scale starts at 0.
    for stage in (model.res2, model.res3, model.res4, model.res5):
        assert all(torch.count_nonzero(b.conv3.norm.weight) == 0 for b in stage)
    x = torch.randn(1, 1, 64, 64)
    with torch.no_grad():
        out = model(x)
    assert {k: tuple(v.shape) for k, v in out.items()} == {
        "res3": (1, 32, 8, 8), "res5": (1, 128, 4, 4)}
    # POOL_STRIDE1 False: the stride-1 first block res2.0 passes its last split unpooled.
    stem_out = model.stem(x)
    rec = capture(model.res2[0], stem_out)
    torch.testing.assert_close(rec["cat"][:, 3:], rec["u"][:, 3:])


def test_pool_stride1_from_config_pools_res2_last_split():
    cfg = cfg_with(POOL_STRIDE1=True, **TINY)
    cfg.MODEL.BACKBONE.NAME = "build_res2net_backbone"
    model = build_backbone(cfg).eval()
    x = model.stem(torch.randn(1, 3, 32, 32))
    rec = capture(model.res2[0], x)
    last = rec["u"][:, 12:]
    torch.testing.assert_close(rec["cat"][:, 12:],
                               F.avg_pool2d(last, 3, stride=1, padding=1, count_include_pad=True))


def test_backbone_without_input_shape_takes_three_channels():
    cfg = cfg_with(**TINY)
    model = build_res2net_backbone(cfg, None)
    assert tuple(model.stem.conv1.weight.shape) == (8, 3, 3, 3)  # v1b: C/2 = 8 outputs
    model = build_res2net_backbone(cfg, ShapeSpec(channels=2))
    assert tuple(model.stem.conv1.weight.shape) == (8, 2, 3, 3)


def test_freeze_at_errors_name_the_key_that_was_set():
    cfg = cfg_with(FREEZE_AT=-1, **TINY)
    cfg.MODEL.BACKBONE.NAME = "build_res2net_backbone"
    with pytest.raises(ValueError, match=r"^MODEL\.RES2NET\.FREEZE_AT must be"):
        build_backbone(cfg)
    cfg.MODEL.RES2NET.FREEZE_AT = None
    cfg.MODEL.BACKBONE.FREEZE_AT = -2
    with pytest.raises(ValueError, match=r"^MODEL\.BACKBONE\.FREEZE_AT must be"):
        build_backbone(cfg)


def test_fpn_gets_norm_fuse_type_and_input_channels():
    cfg = cfg_with(OUT_FEATURES=["res4", "res5"], **TINY)
    cfg.MODEL.BACKBONE.NAME = "build_res2net_fpn_backbone"
    cfg.MODEL.FPN.IN_FEATURES = ["res4", "res5"]
    cfg.MODEL.FPN.OUT_CHANNELS = 32
    cfg.MODEL.FPN.NORM = "GN"
    cfg.MODEL.FPN.FUSE_TYPE = "avg"
    cfg.MODEL.PIXEL_MEAN, cfg.MODEL.PIXEL_STD = [0.0] * 2, [1.0] * 2
    model = build_backbone(cfg).eval()
    assert model.bottom_up.stem.conv1.weight.shape[1] == 2
    assert all(isinstance(c.norm, torch.nn.GroupNorm) for c in model.lateral_convs)
    # "avg" fuse: p4's pre-output sum is (lateral(res4) + up2(lateral(res5))) / 2.
    x = torch.randn(1, 2, 64, 64)
    feats, seen = model.bottom_up(x), []
    model.output_convs[1].register_forward_pre_hook(lambda m, i: seen.append(i[0]))
    with torch.no_grad():
        model(x)
        lat5 = model.lateral_convs[0](feats["res5"])
        lat4 = model.lateral_convs[1](feats["res4"])
    expected = (lat4 + F.interpolate(lat5, scale_factor=2.0, mode="nearest")) / 2
    torch.testing.assert_close(seen[0], expected)


# ------------------------------------------------------------------------- build_res2net
def test_build_res2net_defaults_and_errors():
    gn = tiny(norm="GN")  # default GN_NUM_GROUPS 2 (3 would not divide 4 / 16 / 32)
    assert gn.stem.conv1.norm.num_groups == 2 and gn.res2[0].bns[0].num_groups == 2
    assert tiny(variant="v1b", norm="GN", gn_num_groups=4).stem.conv1.norm.num_groups == 4
    dcn = tiny(deform_on_per_stage=(False, False, False, True))
    assert dcn.res5[0].convs_offset[0].out_channels == 18  # DCNv1, 1 group by default
    assert torch.count_nonzero(dcn.res5[0].conv3.norm.weight) > 0  # no zero init by default
    with pytest.raises(ValueError, match=r"^MODEL\.RES2NET\.DEFORM_ON_PER_STAGE needs 4 entries "
                                         r"\(res2\.\.res5\), got"):
        tiny(deform_on_per_stage=(True, True))
    with pytest.raises(ValueError, match=r"MODEL\.RES2NET\.STEM_OUT_CHANNELS must be even"):
        tiny(variant="v1b", stem_out_channels=15)
    assert tiny(variant="v1", stem_out_channels=15).stem.conv1.out_channels == 15
    model = tiny(out_features=None).eval()  # Detectron2's default: the last stage only
    with torch.no_grad():
        assert list(model(torch.randn(1, 3, 32, 32))) == ["res5"]


# ------------------------------------------------------------------------ Bottle2neckBlock
def test_block_defaults():
    block = Bottle2neckBlock(16, 16, width=4, scale=4)
    assert block.in_channels == 16 and block.out_channels == 16 and block.stride == 1
    assert type(block.bns[0]) is torch.nn.BatchNorm2d and block.shortcut is None
    assert Bottle2neckBlock(16, 16, width=4, scale=4, norm="GN").bns[0].num_groups == 2
    dcn = Bottle2neckBlock(16, 16, width=4, scale=4, deform=True)
    assert dcn.convs_offset[0].out_channels == 18
    dcn2 = Bottle2neckBlock(16, 16, width=4, scale=4, deform=True, deform_num_groups=2)
    assert dcn2.convs_offset[0].out_channels == 36
    assert Bottle2neckBlock(4, 4, width=1, scale=4).conv1.out_channels == 4  # width 1 is valid
    with pytest.raises(ValueError, match=r"SCALE >= 1 and BASE_WIDTH >= 1, got 0, 3"):
        Bottle2neckBlock(16, 16, width=3, scale=0)


def make_block(cin, cout, **kw):
    torch.manual_seed(3)
    block = Bottle2neckBlock(cin, cout, width=3, norm="BN", **kw)
    for m in block.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    return block.eval()


@pytest.mark.parametrize("scale,pool_stride1", [(2, True), (4, False)])
def test_strided_first_block_pools_last_split(scale, pool_stride1):
    # s = 2 and POOL_STRIDE1 False: at stride 2 the last split is still avg-pooled 3x3/2/1.
    block = make_block(8, 16, scale=scale, stride=2, is_first=True, pool_stride1=pool_stride1)
    rec = capture(block, torch.randn(2, 8, 9, 7))
    last = rec["u"][:, 3 * (scale - 1):]
    torch.testing.assert_close(rec["cat"][:, 3 * (scale - 1):],
                               F.avg_pool2d(last, 3, stride=2, padding=1, count_include_pad=True))


@pytest.mark.parametrize("cin,is_first", [(8, False), (16, True)])
def test_projection_shortcut_when_channels_change_or_first(cin, is_first):
    # Channel change at stride 1 (non-first) and a first block with equal channels both
    # project: out = ReLU(main + BN(conv1x1(x))).
    block = make_block(cin, 16, scale=4, is_first=is_first)
    assert block.shortcut is not None
    x = torch.randn(2, cin, 6, 5)
    rec = capture(block, x)
    w = block.shortcut.weight
    bn = block.shortcut.norm
    proj = F.batch_norm(F.conv2d(x, w), bn.running_mean, bn.running_var, bn.weight, bn.bias,
                        eps=bn.eps)
    torch.testing.assert_close(rec["out"], F.relu(block.conv3(rec["cat"]) + proj))


def test_dilated_deformable_block_matches_dilated_conv_at_zero_offsets():
    block = make_block(16, 16, scale=4, dilation=2, deform=True, deform_num_groups=1)
    seen = []
    block.convs[0].register_forward_hook(lambda m, i, o: seen.append((i[0], o)))
    x = torch.randn(1, 16, 9, 7)
    with torch.no_grad():
        out = block(x)
        inp, got = seen[0]
        ref = F.conv2d(inp, block.convs[0].weight, padding=2, dilation=2)
    assert out.shape == x.shape
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- DeformConv3x3, norms, stem
def test_deform_conv_defaults_and_init():
    torch.manual_seed(0)
    conv = DeformConv3x3(4, 4)
    off = conv.make_offset_conv()
    assert off.out_channels == 18 and off.stride == (1, 1) and off.dilation == (1, 1)
    x = torch.randn(1, 4, 6, 5)
    torch.testing.assert_close(conv(x, off(x)), F.conv2d(x, conv.weight, padding=1),
                               rtol=1e-4, atol=1e-5)
    # nn.Conv2d's init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)), fan_in = 64 * 9.
    big = DeformConv3x3(64, 64).weight
    bound = 1 / math.sqrt(64 * 9)
    assert 0.97 * bound < big.abs().max() <= bound


def test_make_norm_group_counts_and_errors():
    assert make_norm("GN")(4).num_groups == 2
    assert make_norm("GN", 1)(3).num_groups == 1
    for bad in (0, -1, 1.5):
        with pytest.raises(ValueError, match="GN_NUM_GROUPS must be a positive int"):
            make_norm("GN", bad)(4)


def test_deep_stem_defaults_and_group_norm():
    stem = DeepStem()
    assert stem.in_channels == 3 and stem.out_channels == 64 and stem.stride == 4
    assert type(stem.conv1.norm) is torch.nn.BatchNorm2d
    with torch.no_grad():
        assert tuple(stem.eval()(torch.randn(1, 3, 16, 16)).shape) == (1, 64, 4, 4)
    assert DeepStem(out_channels=16, norm="GN").conv1.norm.num_groups == 2
    assert DeepStem(out_channels=16, norm="GN", gn_num_groups=4).conv3.norm.num_groups == 4
