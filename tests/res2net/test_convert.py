"""Converter: state dicts generated in each
source layout (official = timm, mmdet, maskrcnn-benchmark, torchvision) convert back exactly,
tensor counts match, bad input is reported, and converted weights reproduce an independent
functional forward of the official network (with negative controls)."""
import pickle
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from detectron2.checkpoint import DetectionCheckpointer

from projects_common.checkpoint import ConversionError
from res2net import build_res2net
from res2net.convert import (
    convert_res2net_checkpoint,
    convert_res2net_state_dict,
    default_output_name,
    detect_layout,
)

BN_ATTRS = ("weight", "bias", "running_mean", "running_var")


def random_d2_state(**arch):
    """State dict of a FrozenBN trunk with random values everywhere (so a mix-up shows)."""
    torch.manual_seed(0)
    with torch.device("meta"):
        shapes = build_res2net(norm="FrozenBN", out_features=None, **arch).state_dict()
    sd = {}
    for k, v in shapes.items():
        if v.dim() == 4:  # conv weights: He-normal scale keeps activations O(1)
            sd[k] = torch.randn(v.shape) * (2.0 / v.shape[1:].numel()) ** 0.5
        elif k.endswith(("running_var", "weight")):  # BN gamma ~ U(0.5, 1.5), var ~ U(0.5, 1.5)
            sd[k] = torch.empty(v.shape).uniform_(0.5, 1.5)
        else:  # BN beta, mean ~ N(0, 0.1); offset-conv biases
            sd[k] = torch.randn(v.shape) * 0.1
    return sd


# ---- generators of the upstream layouts, written from the released checkpoints ------
def _stem_name(k, layout, variant):
    table = {
        ("official", "v1"): {"conv1": ("conv1", "bn1")},
        ("maskrcnn_benchmark", "v1"): {"conv1": ("stem.conv1", "stem.bn1")},
        ("official", "v1b"): {"conv1": ("conv1.0", "conv1.1"), "conv2": ("conv1.3", "conv1.4"),
                              "conv3": ("conv1.6", "bn1")},
        ("mmdet", "v1b"): {"conv1": ("stem.0", "stem.1"), "conv2": ("stem.3", "stem.4"),
                           "conv3": ("stem.6", "stem.7")},
    }[(layout, variant)]
    m = re.match(r"stem\.(conv\d)\.(norm\.)?(\w+)$", k)
    conv, bn = table[m.group(1)]
    return f"{bn}.{m.group(3)}" if m.group(2) else f"{conv}.{m.group(3)}"


def _block_name(k, variant, torchvision=False):
    m = re.match(r"res(\d)\.(\d+)\.(.*)$", k)
    pre, rest = f"layer{int(m.group(1)) - 1}.{m.group(2)}.", m.group(3)
    ds_conv, ds_bn = ("downsample.0", "downsample.1") if variant == "v1" else ("downsample.1", "downsample.2")
    for d2, up in (("conv1.norm.", "bn1."), ("conv3.norm.", "bn3."), ("shortcut.norm.", ds_bn + "."),
                   ("shortcut.", ds_conv + ".")):
        if rest.startswith(d2):
            return pre + up + rest[len(d2):]
    m2 = re.match(r"convs_offset\.(\d+)\.(\w+)$", rest)
    if m2:  # mmdet DCN
        return pre + f"convs.{m2.group(1)}.conv_offset.{m2.group(2)}"
    if torchvision:
        rest = rest.replace("convs.0.", "conv2.").replace("bns.0.", "bn2.")
    return pre + rest


def to_layout(d2, layout, variant, *, nbt=True, fc=True, torchvision=False):
    """Write a d2 trunk state dict in an upstream layout (with the counters/fc it would have)."""
    out = {}
    for k, v in d2.items():
        name = _stem_name(k, layout, variant) if k.startswith("stem.") else _block_name(k, variant, torchvision)
        out[name] = v.clone()
        if nbt and name.endswith("running_var"):
            out[name[: -len("running_var")] + "num_batches_tracked"] = torch.tensor(7)
    if fc:
        out["fc.weight"], out["fc.bias"] = torch.randn(1000, 2048), torch.randn(1000)
    prefix = {"official": "", "mmdet": "backbone.", "maskrcnn_benchmark": "backbone.body."}[layout]
    return {prefix + k: v for k, v in out.items()}


def assert_same(converted, d2, prefix="backbone.bottom_up."):
    assert sorted(converted) == sorted(prefix + k for k in d2)
    for k, v in d2.items():
        assert torch.equal(converted[prefix + k], v), k


@pytest.mark.parametrize(
    "variant,depth,width,scale,n_src,n_dst",
    [("v1", 50, 26, 4, 512, 425), ("v1b", 50, 26, 4, 524, 435), ("v1b", 101, 26, 4, 1034, 860),
     ("v1", 50, 48, 2, 320, 265), ("v1", 50, 14, 8, 896, 745)],
)
def test_official_timm_round_trip_and_counts(variant, depth, width, scale, n_src, n_dst):
    d2 = random_d2_state(variant=variant, depth=depth, base_width=width, scale=scale)
    src = to_layout(d2, "official", variant)
    assert len(src) == n_src  # counts with num_batches_tracked and fc
    assert len(src) - sum(k.endswith("num_batches_tracked") for k in src) == n_dst + 2  # + fc
    assert detect_layout(src) == "official"
    converted, info = convert_res2net_state_dict(src)
    assert info["num_converted"] == n_dst and len(info["dropped"]) == n_src - n_dst
    assert info["arch"]["variant"] == variant and info["arch"]["depth"] == depth
    assert (info["arch"]["base_width"], info["arch"]["scale"]) == (width, scale)
    assert_same(converted, d2)


def test_module_prefix_no_counters_and_trunk_prefix():
    d2 = random_d2_state(variant="v1b")
    src = {"module." + k: v for k, v in to_layout(d2, "official", "v1b", nbt=False).items()}
    converted, info = convert_res2net_state_dict(src, prefix="backbone.")
    assert info["num_converted"] == 435
    assert_same(converted, d2, prefix="backbone.")


def test_mmdet_detector_checkpoint_with_dcn():
    arch = dict(variant="v1b", depth=50, deform_on_per_stage=[False, True, True, True],
                deform_modulated=True)
    d2 = random_d2_state(**arch)
    src = to_layout(d2, "mmdet", "v1b", fc=False)
    assert "backbone.layer2.0.convs.0.conv_offset.weight" in src
    assert "backbone.stem.7.running_var" in src and "backbone.layer4.0.downsample.1.weight" in src
    src["neck.lateral_convs.0.conv.weight"] = torch.zeros(256, 256, 1, 1)
    src["roi_head.bbox_head.fc_cls.weight"] = torch.zeros(81, 1024)
    with pytest.raises(ConversionError, match="neck.lateral_convs.0.conv.weight"):
        convert_res2net_state_dict(src)
    converted, info = convert_res2net_state_dict(src, drop_non_backbone=True)
    assert info["layout"] == "mmdet" and info["arch"]["deform_on_per_stage"] == [False, True, True, True]
    assert info["arch"]["deform_modulated"] and info["arch"]["deform_num_groups"] == 1
    assert_same(converted, d2)
    # A bare mmdet backbone file (no "backbone." prefix) converts too.
    bare = {k[len("backbone."):]: v for k, v in src.items() if k.startswith("backbone.")}
    assert_same(convert_res2net_state_dict(bare)[0], d2)


def test_dcn_offset_channels_fitting_v1_and_v2_need_a_choice(tmp_path):
    """54 offset channels = DCNv1 x 3 groups (18 each) = DCNv2 x 2 groups (27 each): refuse to
    guess; the flag picks. 18 / 27 channels are unambiguous."""
    arch = dict(variant="v1b", base_width=6, scale=4, stem_out_channels=16, res2_out_channels=32,
                deform_on_per_stage=[False, True, False, False], deform_num_groups=3)
    d2 = random_d2_state(**arch)
    assert d2["res3.0.convs_offset.0.weight"].shape[0] == 54
    src = to_layout(d2, "mmdet", "v1b", fc=False)
    with pytest.raises(ConversionError, match=r"layer2\.0\.convs\.0\.conv_offset\.weight has 54 "
                       r"output channels: DCNv1 with 3 deformable groups or DCNv2 .* with 2"):
        convert_res2net_state_dict(src)
    converted, info = convert_res2net_state_dict(src, deform_modulated=False)
    assert (info["arch"]["deform_modulated"], info["arch"]["deform_num_groups"]) == (False, 3)
    assert_same(converted, d2)
    with pytest.raises(ConversionError, match="not a multiple of 18"):
        convert_res2net_state_dict(to_layout(random_d2_state(**dict(
            arch, deform_num_groups=1, deform_modulated=True)), "mmdet", "v1b", fc=False),
            deform_modulated=False)
    for modulated, channels in ((False, 18), (True, 27)):
        one = random_d2_state(**dict(arch, deform_num_groups=1, deform_modulated=modulated))
        _, info = convert_res2net_state_dict(to_layout(one, "mmdet", "v1b", fc=False))
        assert (info["arch"]["deform_modulated"], info["arch"]["deform_num_groups"]) == (
            modulated, 1), channels
    # the command line takes the flag
    from importlib.util import module_from_spec, spec_from_file_location
    from pathlib import Path

    tool = Path(__file__).resolve().parents[2] / "tools" / "convert_res2net.py"
    spec = spec_from_file_location("convert_res2net_cli_dcn", tool)
    cli = module_from_spec(spec)
    spec.loader.exec_module(cli)
    torch.save({"state_dict": src}, tmp_path / "dcn.pth")
    assert cli.main([str(tmp_path / "dcn.pth"), str(tmp_path / "a.pth")]) == 1
    assert cli.main([str(tmp_path / "dcn.pth"), str(tmp_path / "b.pth"), "--dcn-v1"]) == 0
    assert torch.load(tmp_path / "b.pth")["model"]["backbone.bottom_up.res3.0.convs_offset.0.weight"].shape[0] == 54


def test_maskrcnn_benchmark_detector_checkpoint():
    d2 = random_d2_state(variant="v1", scale=6, base_width=18)
    src = to_layout(d2, "maskrcnn_benchmark", "v1", nbt=False, fc=False)
    assert "backbone.body.stem.bn1.running_mean" in src
    src["backbone.fpn.fpn_inner1.weight"] = torch.zeros(256, 256, 1, 1)
    src["rpn.head.conv.weight"] = torch.zeros(256, 256, 3, 3)
    converted, info = convert_res2net_state_dict(src, drop_non_backbone=True)
    assert info["layout"] == "maskrcnn_benchmark" and len(info["dropped"]) == 2
    assert_same(converted, d2)
    assert default_output_name(info["arch"]) == "res2net50_v1_18w_6s_d2.pth"


def test_torchvision_resnet_is_scale_one():
    d2 = random_d2_state(variant="v1", base_width=64, scale=1)
    src = to_layout(d2, "official", "v1", torchvision=True)
    assert "layer1.0.conv2.weight" in src and "layer4.2.bn2.running_var" in src
    converted, info = convert_res2net_state_dict(src)
    assert (info["arch"]["base_width"], info["arch"]["scale"]) == (64, 1)
    assert_same(converted, d2)
    assert default_output_name(info["arch"]) == "resnet50_v1_d2.pth"


def test_keep_fc_maps_to_linear():
    d2 = random_d2_state(variant="v1", base_width=48, scale=2)
    src = to_layout(d2, "official", "v1")
    converted, info = convert_res2net_state_dict(src, keep_fc=True, prefix="")
    assert torch.equal(converted["linear.weight"], src["fc.weight"]) and len(converted) == 267


def test_bad_inputs_are_reported_by_name():
    d2 = random_d2_state(variant="v1", base_width=48, scale=2)
    src = to_layout(d2, "official", "v1")
    bad = dict(src, **{"layer1.0.se.fc.weight": torch.zeros(4, 4)})
    with pytest.raises(ConversionError, match=r"unknown source key\(s\): layer1.0.se.fc.weight"):
        convert_res2net_state_dict(bad)
    missing = {k: v for k, v in src.items() if k != "layer3.1.bns.0.running_var"}
    with pytest.raises(ConversionError, match=r"not filled: res4.1.bns.0.norm|res4.1.bns.0.running_var"):
        convert_res2net_state_dict(missing)
    wrong = dict(src, **{"layer2.1.conv3.weight": torch.zeros(512, 95, 1, 1)})
    with pytest.raises(ConversionError, match=r"res3.1.conv3.weight .*\(512, 95, 1, 1\) != \(512, 192, 1, 1\)"):
        convert_res2net_state_dict(wrong)
    with pytest.raises(ConversionError, match="cannot recognise"):
        convert_res2net_state_dict({"foo.weight": torch.zeros(1)})


def test_file_round_trip_cli_and_detectron2_loading(tmp_path):
    from importlib.util import module_from_spec, spec_from_file_location
    from pathlib import Path

    from detectron2.modeling import build_model

    from projects.testing import load_config, repo_root

    arch = dict(variant="v1b", base_width=4, scale=4, stem_out_channels=16, res2_out_channels=32)
    d2 = random_d2_state(**arch)
    src_path = tmp_path / "upstream.pth"
    torch.save({"state_dict": to_layout(d2, "official", "v1b")}, src_path)
    tool = Path(__file__).resolve().parents[2] / "tools" / "convert_res2net.py"
    spec = spec_from_file_location("convert_res2net_cli", tool)
    cli = module_from_spec(spec)
    spec.loader.exec_module(cli)
    assert cli.main([str(src_path)]) == 0
    out = tmp_path / "res2net50_v1b_4w_4s_d2.pth"
    assert out.exists()
    assert cli.main([str(tmp_path / "upstream.pth"), str(tmp_path / "x.pth"), "--layout", "mmdet"]) == 1

    cfg = load_config(str(Path(repo_root()) / "configs" / "Base-RCNN-FPN.yaml"), [
        "MODEL.DEVICE", "cpu", "MODEL.BACKBONE.NAME", "build_res2net_fpn_backbone",
        "MODEL.RES2NET.BASE_WIDTH", 4, "MODEL.RES2NET.STEM_OUT_CHANNELS", 16,
        "MODEL.RES2NET.RES2_OUT_CHANNELS", 32, "MODEL.RES2NET.VARIANT", "v1b",
        "MODEL.FPN.OUT_CHANNELS", 16, "MODEL.ROI_BOX_HEAD.FC_DIM", 32])
    model = build_model(cfg)
    DetectionCheckpointer(model).load(str(out))
    loaded = model.backbone.bottom_up.state_dict()
    assert sorted(loaded) == sorted(d2)
    assert all(torch.equal(loaded[k], d2[k]) for k in d2)
    _, _, dst = convert_res2net_checkpoint(str(src_path), str(tmp_path / "y.pth"), prefix="")
    assert sorted(torch.load(dst)["model"]) == sorted(d2)

    # .pkl means Detectron2's pickle format: DetectionCheckpointer reads it (numpy arrays)
    _, _, pkl = convert_res2net_checkpoint(str(src_path), str(tmp_path / "z.pkl"))
    with open(pkl, "rb") as f:
        raw = pickle.load(f)
    assert "__author__" in raw and all(isinstance(v, np.ndarray) for v in raw["model"].values())
    model = build_model(cfg)
    DetectionCheckpointer(model).load(pkl)
    loaded = model.backbone.bottom_up.state_dict()
    assert all(torch.equal(loaded[k], d2[k]) for k in d2)
    # any other extension is refused (Detectron2 picks its reader by the extension)
    with pytest.raises(ConversionError, match=r"\.pth/\.pt name .* or \.pkl"):
        convert_res2net_checkpoint(str(src_path), str(tmp_path / "w.bin"))
    assert not (tmp_path / "w.bin").exists()


# ---- numerical equivalence with an independent functional forward -------------------
def reference_deform_conv(x, offset, weight, *, stride, mask=None):
    """3x3 deformable conv (padding 1) from its definition (Dai et al. 2017, Eq. 2; Zhu et al.
    2019, Eq. 1): y(p0) = sum_k w_k x(p0 + p_k + dp_k) m_k, x sampled bilinearly with zeros
    outside. Offset channels per deformable group g: (dy_k, dx_k) for taps k = 0..8 (row-major),
    at 18 g + 2 k and 18 g + 2 k + 1; masks at 9 g + k."""
    n, c, h, w = x.shape
    groups = offset.shape[1] // 18
    ho, wo = offset.shape[2:]
    out = 0
    for k in range(9):
        ky, kx = divmod(k, 3)
        sampled = []
        for g in range(groups):
            dy, dx = offset[:, 18 * g + 2 * k], offset[:, 18 * g + 2 * k + 1]
            py = (torch.arange(ho) * stride - 1 + ky).view(1, ho, 1) + dy
            px = (torch.arange(wo) * stride - 1 + kx).view(1, 1, wo) + dx
            grid = torch.stack([2 * px / (w - 1) - 1, 2 * py / (h - 1) - 1], dim=-1)
            part = x[:, g * c // groups:(g + 1) * c // groups]
            v = F.grid_sample(part, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
            if mask is not None:
                v = v * mask[:, 9 * g + k].unsqueeze(1)
            sampled.append(v)
        out = out + torch.einsum("nchw,oc->nohw", torch.cat(sampled, 1), weight[:, :, ky, kx])
    return out


def reference_forward(sd, variant, x, *, bypass_first=False, count_include_pad=True,
                      modulated=False):
    """The official network written directly from paper Sec. 3.1 on official-layout keys.

    Returns {"res2".."res5": features}. ``bypass_first``/``count_include_pad`` are
    negative controls (paper's split order; timm's FIXME pool padding). A K_i with an offset
    conv (``convs.{i}.conv_offset``, mmdet naming) is deformable: its offsets (and
    with ``modulated`` the sigmoid masks after them) are a 3x3 conv of K_i's input.
    """
    def bn(t, p):
        return F.batch_norm(t, sd[p + ".running_mean"], sd[p + ".running_var"], sd[p + ".weight"],
                            sd[p + ".bias"], False, 0.0, 1e-5)

    if variant == "v1":
        x = F.relu(bn(F.conv2d(x, sd["conv1.weight"], stride=2, padding=3), "bn1"))
    else:
        x = F.relu(bn(F.conv2d(x, sd["conv1.0.weight"], stride=2, padding=1), "conv1.1"))
        x = F.relu(bn(F.conv2d(x, sd["conv1.3.weight"], padding=1), "conv1.4"))
        x = F.relu(bn(F.conv2d(x, sd["conv1.6.weight"], padding=1), "bn1"))
    x = F.max_pool2d(x, 3, 2, 1)
    feats = {}
    for layer in range(1, 5):
        j = 0
        while f"layer{layer}.{j}.conv1.weight" in sd:
            p = f"layer{layer}.{j}."
            first, t = j == 0, (2 if layer > 1 and j == 0 else 1)
            width = sd[p + "convs.0.weight"].shape[0]
            u = F.relu(bn(F.conv2d(x, sd[p + "conv1.weight"]), p + "bn1"))
            splits = list(torch.split(u, width, 1))
            bypass = splits.pop(0) if bypass_first else splits.pop()
            ys = []
            for i, s in enumerate(splits):
                inp = s if (i == 0 or first) else s + ys[-1]
                off_key = p + f"convs.{i}.conv_offset."
                if off_key + "weight" in sd:
                    off = F.conv2d(inp, sd[off_key + "weight"], sd[off_key + "bias"], stride=t, padding=1)
                    n_off = off.shape[1] // 27 * 18 if modulated else off.shape[1]
                    mask = off[:, n_off:].sigmoid() if modulated else None
                    conv = reference_deform_conv(inp, off[:, :n_off], sd[p + f"convs.{i}.weight"],
                                                 stride=t, mask=mask)
                else:
                    conv = F.conv2d(inp, sd[p + f"convs.{i}.weight"], stride=t, padding=1)
                ys.append(F.relu(bn(conv, p + f"bns.{i}")))
            if first:
                bypass = F.avg_pool2d(bypass, 3, t, 1, count_include_pad=count_include_pad)
            ys = [bypass] + ys if bypass_first else ys + [bypass]
            out = bn(F.conv2d(torch.cat(ys, 1), sd[p + "conv3.weight"]), p + "bn3")
            if first and variant == "v1":
                short = bn(F.conv2d(x, sd[p + "downsample.0.weight"], stride=t), p + "downsample.1")
            elif first:
                pooled = F.avg_pool2d(x, t, t, ceil_mode=True, count_include_pad=False) if t > 1 else x
                short = bn(F.conv2d(pooled, sd[p + "downsample.1.weight"]), p + "downsample.2")
            else:
                short = x
            x = F.relu(out + short)
            j += 1
        feats[f"res{layer + 1}"] = x
    return feats


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("variant,shape,arch", [
    ("v1b", (1, 3, 224, 224), {}),  # the real R2-50 26w x 4s v1b
    # odd size; narrower widths (same topology) keep the CPU test fast
    ("v1", (1, 3, 225, 227), dict(base_width=8, stem_out_channels=32, res2_out_channels=64)),
])
def test_converted_weights_match_official_forward(variant, shape, arch):
    d2 = random_d2_state(variant=variant, **arch)
    src = to_layout(d2, "official", variant)
    model = build_res2net(variant=variant, norm="FrozenBN", **arch).eval()
    converted, _ = convert_res2net_state_dict(src, prefix="")
    model.load_state_dict(converted, strict=True)
    torch.manual_seed(3)
    x = torch.randn(*shape)
    with torch.no_grad():
        got, ref = model(x), reference_forward(src, variant, x)
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-4, atol=1e-4 * ref[k].abs().max().item())


@pytest.mark.parametrize("variant,stages,modulated,groups", [
    ("v1", [False, True, True, True], False, 1),  # DCNv1 (the MMDet v1 port's setting)
    ("v1b", [True, True, False, True], True, 2),  # DCNv2, 2 offset groups, res2 too
])
def test_deformable_backbone_from_config_matches_reference_with_nonzero_offsets(
        variant, stages, modulated, groups):
    """Backbone built from MODEL.RES2NET.DEFORM_* with nonzero, fractional offsets (random offset
    conv biases, small random weights) equals the definition of deformable convolution applied
    to each K_i. Reading the offsets in (dx, dy) order, dropping the mask or mixing up the
    offset groups changes the output far beyond the tolerance."""
    from detectron2.config import get_cfg
    from detectron2.modeling import build_backbone

    from res2net import add_res2net_config

    arch = dict(variant=variant, base_width=4, scale=4, stem_out_channels=16,
                res2_out_channels=32, deform_on_per_stage=stages, deform_modulated=modulated,
                deform_num_groups=groups)
    d2 = random_d2_state(**arch)
    g = torch.Generator().manual_seed(6)
    for k in d2:  # offsets of a few pixels (fractional), varying over the image
        if "convs_offset" in k:
            d2[k] = (d2[k] * 1e-3 if k.endswith("weight")
                     else torch.randn(d2[k].shape, generator=g))
    assert d2["res3.0.convs_offset.0.bias"].shape[0] == (27 if modulated else 18) * groups
    cfg = get_cfg()
    add_res2net_config(cfg)
    cfg.merge_from_list([
        "MODEL.RES2NET.VARIANT", variant, "MODEL.RES2NET.BASE_WIDTH", 4,
        "MODEL.RES2NET.STEM_OUT_CHANNELS", 16, "MODEL.RES2NET.RES2_OUT_CHANNELS", 32,
        "MODEL.RES2NET.NORM", "FrozenBN", "MODEL.RES2NET.DEFORM_ON_PER_STAGE", stages,
        "MODEL.RES2NET.DEFORM_MODULATED", modulated, "MODEL.RES2NET.DEFORM_NUM_GROUPS", groups])
    cfg.MODEL.BACKBONE.NAME = "build_res2net_fpn_backbone"
    cfg.MODEL.FPN.IN_FEATURES = ["res2", "res3", "res4", "res5"]
    cfg.MODEL.FPN.OUT_CHANNELS = 8
    model = build_backbone(cfg).eval()
    model.bottom_up.load_state_dict(d2, strict=True)
    torch.manual_seed(5)
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        got = model.bottom_up(x)
        fpn = model(x)
    ref = reference_forward(to_layout(d2, "official", variant), variant, x, modulated=modulated)
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-4, atol=1e-4 * ref[k].abs().max().item())
    assert {k: tuple(v.shape[2:]) for k, v in fpn.items()} == {
        "p2": (16, 24), "p3": (8, 12), "p4": (4, 6), "p5": (2, 3), "p6": (1, 2)}
    # the offsets matter: the same weights without deformation give a different res5
    plain = {k: v for k, v in to_layout(d2, "official", variant).items() if "conv_offset" not in k}
    assert rel_err(reference_forward(plain, variant, x)["res5"], ref["res5"]) > 1e-2


def test_negative_controls_are_detected():
    # Each deviation must change res2 or res3 far beyond the equivalence tolerance (1e-4).
    arch = dict(variant="v1b", base_width=8, scale=4, stem_out_channels=32, res2_out_channels=64)
    src = to_layout(random_d2_state(**arch), "official", "v1b")
    converted, _ = convert_res2net_state_dict(src, prefix="")
    torch.manual_seed(4)
    x = torch.randn(1, 3, 64, 80)

    def d2_forward(**kw):
        model = build_res2net(norm="FrozenBN", **dict(arch, **kw)).eval()
        model.load_state_dict(converted)
        with torch.no_grad():
            return model(x)

    base = d2_forward()
    ref = reference_forward(src, "v1b", x)
    assert max(rel_err(base[k], ref[k]) for k in ref) < 1e-5
    assert rel_err(d2_forward(pool_stride1=False)["res2"], ref["res2"]) > 1e-2  # mmdet behaviour
    assert rel_err(d2_forward(stride_in_1x1=True)["res3"], ref["res3"]) > 1e-2
    swapped = reference_forward(src, "v1b", x, bypass_first=True)
    assert rel_err(base["res2"], swapped["res2"]) > 1e-2
    no_pad = reference_forward(src, "v1b", x, count_include_pad=False)
    assert rel_err(base["res2"], no_pad["res2"]) > 1e-3
