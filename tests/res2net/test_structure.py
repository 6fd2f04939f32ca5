"""Structure facts: channels, strides, shapes,
exact parameter and tensor counts, norms, freezing, deformable convs, dilation, FPN wiring."""
import pytest
import torch
from detectron2.config import get_cfg
from detectron2.layers import FrozenBatchNorm2d
from detectron2.modeling import build_backbone

from res2net import add_res2net_config, build_res2net
from res2net.blocks import Bottle2neckBlock

STAGES = ["res2", "res3", "res4", "res5"]


def n_params(module):
    return sum(p.numel() for p in module.parameters())


def meta(**kw):
    """Build on the meta device: shapes and counts only, no memory or initialisation cost."""
    with torch.device("meta"):
        return build_res2net(**kw)


def tiny(**kw):
    """Small widths (same depth/topology) for shape checks that do not depend on width."""
    args = dict(base_width=4, scale=4, stem_out_channels=16, res2_out_channels=32, norm="BN")
    args.update(kw)
    return build_res2net(**args)


def cfg_with(**res2net_keys):
    cfg = get_cfg()
    add_res2net_config(cfg)
    for k, v in res2net_keys.items():
        setattr(cfg.MODEL.RES2NET, k, v)
    return cfg


@pytest.fixture(scope="module")
def r2_50_v1():
    torch.manual_seed(0)
    return build_res2net(variant="v1", norm="FrozenBN", out_features=["stem"] + STAGES).eval()


def test_channels_and_strides_per_stage():
    # 256/512/1024/2048 at strides 4/8/16/32, stem 64 ch at stride 4 (v1 and v1b).
    for variant in ("v1", "v1b"):
        shapes = meta(variant=variant, out_features=["stem"] + STAGES).output_shape()
        assert {k: (s.channels, s.stride) for k, s in shapes.items()} == {
            "stem": (64, 4), "res2": (256, 4), "res3": (512, 8), "res4": (1024, 16),
            "res5": (2048, 32),
        }


def test_feature_shapes_224_and_odd_input(r2_50_v1):
    # Ceil-halving for odd sizes, every branch agrees).
    with torch.no_grad():
        out = r2_50_v1(torch.randn(1, 3, 224, 224))
        assert {k: tuple(v.shape[1:]) for k, v in out.items()} == {
            "stem": (64, 56, 56), "res2": (256, 56, 56), "res3": (512, 28, 28),
            "res4": (1024, 14, 14), "res5": (2048, 7, 7),
        }
        out = r2_50_v1(torch.randn(1, 3, 225, 227))
    assert {k: tuple(v.shape[2:]) for k, v in out.items() if k != "stem"} == {
        "res2": (57, 57), "res3": (29, 29), "res4": (15, 15), "res5": (8, 8)
    }


def test_v1b_deep_stem_shapes():
    # v1b stem convs 32, 32, 64 channels at 112x112, 64x56x56 after the max-pool.
    model = build_res2net(variant="v1b", norm="BN", out_features=["stem"]).eval()
    seen = []
    for conv in (model.stem.conv1, model.stem.conv2, model.stem.conv3):
        conv.register_forward_hook(lambda m, i, o: seen.append(tuple(o.shape[1:])))
    with torch.no_grad():
        out = model(torch.randn(1, 3, 224, 224))["stem"]
    assert seen == [(32, 112, 112), (32, 112, 112), (64, 112, 112)]
    assert tuple(out.shape[1:]) == (64, 56, 56)


def test_detection_input_shapes_with_fpn():
    # Spatial sizes do not depend on widths, so a narrow trunk is used.
    cfg = cfg_with(BASE_WIDTH=4, STEM_OUT_CHANNELS=16, RES2_OUT_CHANNELS=32, NORM="BN")
    cfg.MODEL.BACKBONE.NAME = "build_res2net_fpn_backbone"
    cfg.MODEL.FPN.IN_FEATURES = STAGES
    cfg.MODEL.FPN.OUT_CHANNELS = 8
    fpn = build_backbone(cfg).eval()
    with torch.no_grad():
        out = fpn(torch.randn(1, 3, 800, 1344))
        trunk = fpn.bottom_up(torch.randn(1, 3, 800, 1333))
    assert {k: tuple(v.shape[2:]) for k, v in out.items()} == {
        "p2": (200, 336), "p3": (100, 168), "p4": (50, 84), "p5": (25, 42), "p6": (13, 21)
    }
    assert {k: tuple(v.shape[2:]) for k, v in trunk.items()} == {
        "res2": (200, 334), "res3": (100, 167), "res4": (50, 84), "res5": (25, 42)
    }


# "Trunk w/o fc" counts: conv weights + BN gamma/beta (running stats are buffers).
TRUNK_PARAMS = [
    ("v1", 50, 26, 4, 23_650_120),
    ("v1b", 50, 26, 4, 23_669_352),
    ("v1", 101, 26, 4, 43_157_688),
    ("v1b", 101, 26, 4, 43_176_920),
    ("v1", 50, 48, 2, 23_238_304),
    ("v1", 50, 14, 8, 23_010_816),
    ("v1", 50, 18, 6, 23_109_664),
    ("v1", 50, 26, 6, 35_002_448),
    ("v1", 50, 26, 8, 46_354_776),
    ("v1", 50, 64, 1, 23_508_032),  # ResNet-50 (torchvision) = scale 1, 64w
]


@pytest.mark.parametrize("variant,depth,width,scale,expected", TRUNK_PARAMS)
def test_exact_trunk_parameter_counts(variant, depth, width, scale, expected):
    model = meta(variant=variant, depth=depth, base_width=width, scale=scale, norm="BN")
    assert n_params(model) == expected


def test_parameter_counts_with_fc_per_stage_and_conv_only(r2_50_v1):
    # Counts with fc, per part and for a single block, conv-only count.
    with_fc = meta(variant="v1", norm="BN", num_classes=1000)
    assert n_params(with_fc) == 25_699_120
    bn = meta(variant="v1", norm="BN")
    parts = [n_params(bn.stem)] + [n_params(getattr(bn, s)) for s in STAGES]
    assert parts == [9_536, 214_056, 1_229_856, 7_198_368, 14_998_304]
    assert n_params(bn.res2[0]) == 69_304 and n_params(bn.res2[1]) == 72_376
    # With FrozenBN only the conv weights are parameters (what d2 counts as trainable).
    assert n_params(r2_50_v1) == 23_590_628
    assert n_params(meta(variant="v1b", norm="FrozenBN")) == 23_609_732
    assert n_params(meta(variant="v1b", depth=101, norm="FrozenBN")) == 43_057_732


def test_v1b_stem_parameters():
    assert n_params(meta(variant="v1b", norm="BN").stem) == 28_768


@pytest.mark.parametrize(
    "variant,depth,width,scale,expected",
    [("v1", 50, 26, 4, 425), ("v1b", 50, 26, 4, 435), ("v1", 101, 26, 4, 850),
     ("v1b", 101, 26, 4, 860), ("v1", 50, 48, 2, 265), ("v1", 50, 14, 8, 745)],
)
def test_tensor_counts_frozen_bn(variant, depth, width, scale, expected):
    # FrozenBN saves weight, bias, running_mean, running_var (no counter).
    model = meta(variant=variant, depth=depth, base_width=width, scale=scale)
    assert len(model.state_dict()) == expected


def test_bn_adds_one_counter_per_norm():
    # 85 BN layers in R2-50 v1, 87 in v1b.
    assert len(meta(variant="v1", norm="BN").state_dict()) == 425 + 85
    assert len(meta(variant="v1b", norm="BN").state_dict()) == 435 + 87


def test_block_widths_and_spot_shapes(r2_50_v1):
    sd = r2_50_v1.state_dict()
    for stage, inner, width in zip(STAGES, (104, 208, 416, 832), (26, 52, 104, 208)):
        block = getattr(r2_50_v1, stage)[1]
        assert block.conv1.out_channels == inner and block.conv3.in_channels == inner
        assert len(block.convs) == 3
        assert all(tuple(c.weight.shape) == (width, width, 3, 3) for c in block.convs)
    assert tuple(sd["res2.0.conv1.weight"].shape) == (104, 64, 1, 1)
    assert tuple(sd["res2.0.convs.0.weight"].shape) == (26, 26, 3, 3)
    assert tuple(sd["res2.0.conv3.weight"].shape) == (256, 104, 1, 1)
    assert tuple(sd["res3.0.conv1.weight"].shape) == (208, 256, 1, 1)
    assert tuple(sd["res5.2.conv3.weight"].shape) == (2048, 832, 1, 1)
    assert tuple(sd["res2.0.shortcut.weight"].shape) == (256, 64, 1, 1)
    v1b = meta(variant="v1b").state_dict()
    assert tuple(v1b["stem.conv3.weight"].shape) == (64, 32, 3, 3)
    assert tuple(v1b["res2.0.shortcut.weight"].shape) == (256, 64, 1, 1)
    s8 = meta(variant="v1", base_width=14, scale=8).state_dict()
    assert tuple(s8["res2.0.convs.6.weight"].shape) == (14, 14, 3, 3)
    assert tuple(s8["res2.0.conv1.weight"].shape) == (112, 64, 1, 1)


def test_stride_placement(r2_50_v1):
    # pytorch style (weights' training) = stride in the 3x3s; res2.0 pools at stride 1.
    res3_0 = r2_50_v1.res3[0]
    assert res3_0.conv1.stride == (1, 1)
    assert all(c.stride == (2, 2) for c in res3_0.convs) and res3_0.pool_stride == 2
    assert res3_0.shortcut.stride == (2, 2)
    res2_0 = r2_50_v1.res2[0]
    assert res2_0.pool_last and res2_0.pool_stride == 1
    c2 = meta(variant="v1", stride_in_1x1=True).res3[0]
    assert c2.conv1.stride == (2, 2) and all(c.stride == (1, 1) for c in c2.convs)
    assert c2.pool_stride == 1 and c2.shortcut.stride == (2, 2)
    v1b = meta(variant="v1b").res3[0]
    assert v1b.shortcut.stride == (1, 1) and v1b.avg_down  # pooled before a stride-1 1x1
    assert not meta(pool_stride1=False).res2[0].pool_last


def test_res5_dilation():
    model = tiny(res5_dilation=2, variant="v1b").eval()
    assert model.output_shape()["res5"].stride == 16
    block = model.res5[0]
    assert all(c.dilation == (2, 2) and c.padding == (2, 2) and c.stride == (1, 1)
               for c in block.convs)
    with torch.no_grad():
        out = model(torch.randn(1, 3, 65, 97))
    assert out["res5"].shape[2:] == out["res4"].shape[2:] == (5, 7)


def test_group_norm_validation():
    model = tiny(norm="GN", gn_num_groups=2, base_width=6)
    assert isinstance(model.res3[0].bns[0], torch.nn.GroupNorm)
    with torch.no_grad():
        model(torch.randn(1, 3, 64, 64))
    # 26w: split width 26 is not divisible by d2's usual 32 groups.
    with pytest.raises(ValueError, match=r"GN_NUM_GROUPS=32 .* 104 channels"):
        build_res2net(norm="GN", gn_num_groups=32)
    with pytest.raises(ValueError, match=r"GN_NUM_GROUPS=8 .* 26 channels"):
        build_res2net(norm="GN", gn_num_groups=8)
    with pytest.raises(ValueError, match="MODEL.RES2NET.NORM"):
        build_res2net(norm="LN")


@pytest.mark.parametrize("backbone_at,res2net_at,frozen_stages", [
    (3, None, ("stem", "res2", "res3")),  # MODEL.BACKBONE.FREEZE_AT, as Detectron2 recipes set it
    (0, None, ()),
    (0, 1, ("stem",)),  # MODEL.RES2NET.FREEZE_AT overrides it where the user sets it
    (3, 0, ()),
])
def test_freeze_at_follows_backbone_key_unless_res2net_key_is_set(
        backbone_at, res2net_at, frozen_stages):
    cfg = cfg_with(FREEZE_AT=res2net_at, NORM="BN", BASE_WIDTH=4, STEM_OUT_CHANNELS=16,
                   RES2_OUT_CHANNELS=32)
    cfg.MODEL.BACKBONE.FREEZE_AT = backbone_at
    cfg.MODEL.BACKBONE.NAME = "build_res2net_backbone"
    model = build_backbone(cfg)
    for name, p in model.named_parameters():
        assert p.requires_grad == (name.split(".")[0] not in frozen_stages), name
    norms = {name.split(".")[0] for name, m in model.named_modules()
             if isinstance(m, FrozenBatchNorm2d)}
    assert norms == set(frozen_stages)
    cfg.MODEL.BACKBONE.FREEZE_AT = -1
    cfg.MODEL.RES2NET.FREEZE_AT = None
    with pytest.raises(ValueError, match="MODEL.BACKBONE.FREEZE_AT"):
        build_backbone(cfg)


@pytest.mark.parametrize("norm", ["BN", "FrozenBN"])
def test_freeze_at(norm):
    cfg = cfg_with(FREEZE_AT=2, NORM=norm, BASE_WIDTH=4, STEM_OUT_CHANNELS=16, RES2_OUT_CHANNELS=32)
    cfg.MODEL.BACKBONE.NAME = "build_res2net_backbone"
    model = build_backbone(cfg)
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert frozen and all(n.startswith(("stem.", "res2.")) for n in frozen)
    assert all(p.requires_grad for n, p in model.named_parameters() if n.startswith("res3."))
    # Frozen blocks' norms become FrozenBatchNorm2d, including every bns.{i}.
    assert all(isinstance(m, FrozenBatchNorm2d) for m in model.res2[0].bns)
    assert isinstance(model.stem.conv1.norm, FrozenBatchNorm2d)


def test_deformable_convs_start_as_plain_convs_and_train():
    torch.manual_seed(0)
    plain = Bottle2neckBlock(16, 32, width=4, scale=4, stride=2, is_first=True, norm="BN").eval()
    x = torch.randn(2, 16, 9, 11)
    for modulated in (False, True):
        block = Bottle2neckBlock(16, 32, width=4, scale=4, stride=2, is_first=True, norm="BN",
                                 deform=True, deform_modulated=modulated).eval()
        assert len(block.convs_offset) == 3
        assert block.convs_offset[0].out_channels == (27 if modulated else 18)
        missing = block.load_state_dict(plain.state_dict(), strict=False).missing_keys
        assert sorted(missing) == sorted(f"convs_offset.{i}.{p}" for i in range(3)
                                         for p in ("weight", "bias"))
        conv_in = torch.randn(2, 4, 9, 11)
        ref = torch.nn.functional.conv2d(conv_in, plain.convs[0].weight, stride=2, padding=1)
        got = block.convs[0](conv_in, block.convs_offset[0](conv_in))
        # Zero offsets: DCNv1 = plain conv; DCNv2 masks start at sigmoid(0) = 0.5 (mmcv init).
        torch.testing.assert_close(got, ref * (0.5 if modulated else 1.0), rtol=1e-4, atol=1e-5)
        if not modulated:
            torch.testing.assert_close(block(x), plain(x), rtol=1e-4, atol=1e-5)
    block.train()
    block(x).sum().backward()
    assert block.convs_offset[0].weight.grad.abs().sum() > 0  # offsets learn on CPU


def test_deform_from_config_and_p67_backbone():
    cfg = cfg_with(BASE_WIDTH=4, STEM_OUT_CHANNELS=16, RES2_OUT_CHANNELS=32, NORM="BN",
                   DEFORM_ON_PER_STAGE=[False, True, True, True], DEFORM_MODULATED=True,
                   OUT_FEATURES=["res3", "res4", "res5"])
    cfg.MODEL.BACKBONE.NAME = "build_res2net_p67_fpn_backbone"
    cfg.MODEL.FPN.IN_FEATURES = ["res3", "res4", "res5"]
    cfg.MODEL.FPN.OUT_CHANNELS = 8
    for in_feature, relu in (("res5", True), ("p5", False)):
        cfg.MODEL.RES2NET.P67_IN_FEATURE = in_feature
        cfg.MODEL.RES2NET.P67_RELU_BEFORE_P7 = relu
        model = build_backbone(cfg).eval()
        assert not hasattr(model.bottom_up.res2[0], "convs_offset")
        assert len(model.bottom_up.res3[0].convs_offset) == 3
        assert model.top_block.p6.in_channels == (256 if in_feature == "res5" else 8)
        with torch.no_grad():
            out = model(torch.randn(1, 3, 96, 128))
        assert {k: (v.shape[1], v.shape[2], v.shape[3]) for k, v in out.items()} == {
            "p3": (8, 12, 16), "p4": (8, 6, 8), "p5": (8, 3, 4), "p6": (8, 2, 2), "p7": (8, 1, 1)
        }
        assert {k: s.stride for k, s in model.output_shape().items()} == {
            "p3": 8, "p4": 16, "p5": 32, "p6": 64, "p7": 128
        }


def test_fpn_parameter_count():
    # d2 FPN on 256/512/1024/2048 inputs with 256 outputs has 3,344,384 parameters.
    cfg = cfg_with()
    cfg.MODEL.BACKBONE.NAME = "build_res2net_fpn_backbone"
    cfg.MODEL.FPN.IN_FEATURES = STAGES
    model = build_backbone(cfg)
    assert n_params(model) - n_params(model.bottom_up) == 3_344_384


def test_bad_config_values_raise():
    with pytest.raises(ValueError, match="DEPTH"):
        build_res2net(depth=34)
    with pytest.raises(ValueError, match="VARIANT"):
        build_res2net(variant="v1d")
    with pytest.raises(ValueError, match="RES5_DILATION"):
        build_res2net(res5_dilation=4)


def test_vf8_detector_trainable_parameters_from_seed_config():
    """The authors' mmdet-fork README counts trainable parameters: v1b-101 trunk
    43,176,920 - frozen stem + res2 242,824 + FPN 3,344,384 + RPN 593,935 + box head 14,310,805
    = 61.18M (+ mask head 2,643,537 = 63.83M). Their heads predict 81 classes (4 box deltas and
    a mask for the background too); Detectron2's predict 80: 4 x 1025 and 257 fewer."""
    from projects.model_zoo import get_config_file
    from projects.testing import load_config

    cfg = load_config(get_config_file("res2net/mask_rcnn_R2_101_26w4s_FPN_2x.yaml"), [
        "MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", "", "MODEL.RES2NET.VARIANT", "v1b",
        "MODEL.RES2NET.NORM", "BN"])  # mmdet: trainable BN affine outside the frozen stages
    assert cfg.MODEL.BACKBONE.FREEZE_AT == 2 and cfg.MODEL.RES2NET.FREEZE_AT is None
    from detectron2.modeling import META_ARCH_REGISTRY

    with torch.device("meta"):  # shapes only
        model = META_ARCH_REGISTRY.get(cfg.MODEL.META_ARCHITECTURE)(cfg)

    def trainable(module):
        return sum(p.numel() for p in module.parameters() if p.requires_grad)

    faster = 43_176_920 - 242_824 + 3_344_384 + 593_935 + 14_310_805 - 4 * 1025
    assert trainable(model) - trainable(model.roi_heads.mask_head) == faster  # 61,179,120
    assert trainable(model) == faster + 2_643_537 - 257  # 63,822,400
    assert round(faster / 1e6, 2) == 61.18


@pytest.mark.parametrize("name", ["mask_rcnn_R2_50_26w4s_FPN_2x.yaml",
                                  "faster_rcnn_R2_101_26w4s_FPN_2x.yaml"])
def test_seed_configs_use_the_authors_head_settings(name):
    """maskrcnn-benchmark heads: legacy (not pixel-aligned) ROIAlign with sampling ratio 2,
    RPN SmoothL1 beta 1/9, box SmoothL1 beta 1. Hand-computed on a ramp feature f(x) = x:
    box (0, 0, 56, 56) pools from p2 (stride 4) the 14 x 14 region in 7 bins of 2 px; the two
    samples of bin j sit at 2j + 0.5 and 2j + 1.5, so the bin averages 2j + 1 (an aligned
    ROIAlign shifts by -0.5: 2j + 0.5). Box loss of one RoI with residual 0.5: SmoothL1(0.5; 1)
    = 0.125 (L1, Detectron2's default, would give 0.5)."""
    from detectron2.modeling import build_model
    from detectron2.structures import Boxes

    from projects.model_zoo import get_config_file
    from projects.testing import TINY_RCNN_OPTS, load_config

    cfg = load_config(get_config_file(f"res2net/{name}"), TINY_RCNN_OPTS + [
        "MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", "", "MODEL.RES2NET.DEPTH", 50,
        "MODEL.RES2NET.BASE_WIDTH", 4, "MODEL.RES2NET.STEM_OUT_CHANNELS", 16,
        "MODEL.RES2NET.RES2_OUT_CHANNELS", 32, "MODEL.FPN.OUT_CHANNELS", 8,
        "MODEL.ROI_BOX_HEAD.FC_DIM", 16])
    model = build_model(cfg).eval()
    ramp = torch.arange(32.0).repeat(1, 8, 32, 1)  # (1, 8, 32, 32), value = x
    feats = [ramp, torch.zeros(1, 8, 16, 16), torch.zeros(1, 8, 8, 8), torch.zeros(1, 8, 4, 4)]
    pooled = model.roi_heads.box_pooler(feats, [Boxes(torch.tensor([[0.0, 0.0, 56.0, 56.0]]))])
    expected = torch.tensor([2.0 * j + 1 for j in range(7)]).expand(1, 8, 7, 7)
    torch.testing.assert_close(pooled, expected)
    rpn = model.proposal_generator
    assert (rpn.box_reg_loss_type, rpn.smooth_l1_beta) == ("smooth_l1", pytest.approx(1 / 9))
    predictor = model.roi_heads.box_predictor
    box = torch.tensor([[10.0, 10.0, 50.0, 60.0]])
    pred = torch.zeros(1, 4 * cfg.MODEL.ROI_HEADS.NUM_CLASSES)
    pred[0, 0] = 0.5
    assert float(predictor.box_reg_loss(box, box, pred, torch.tensor([0]))) == pytest.approx(0.125)
