"""Converter from the authors' mmdetection-v1 checkpoints: every key mapped or
dropped, shapes asserted, anchor permutation for Detectron2's anchor order."""
import os
import subprocess
import sys

import pytest
import rdsnet_tiny
import torch
import torchvision
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling import build_model

from projects.testing import load_config, repo_root
from projects_common.checkpoint import ConversionError
from rdsnet.convert import convert_rdsnet_state_dict, mmdet_to_d2_key, permute_anchor_dim


def mmdet_source(trunk, c_in=(512, 1024, 2048), fpn=256, pix=256, num_classes=80, a=9, d=32):
    """An upstream-layout state dict (the authors' names and shapes) with random values.

    ``trunk`` is a torchvision ResNet (mmdet's ResNet uses torchvision's names).
    """
    g = torch.Generator().manual_seed(0)
    sd = {f"backbone.{k}": v for k, v in trunk.state_dict().items() if not k.startswith("fc.")}

    def rnd(*shape):
        return torch.randn(*shape, generator=g)

    for i, c in enumerate(c_in):
        sd[f"neck.lateral_convs.{i}.conv.weight"] = rnd(fpn, c, 1, 1)
        sd[f"neck.lateral_convs.{i}.conv.bias"] = rnd(fpn)
    for i in range(5):
        sd[f"neck.fpn_convs.{i}.conv.weight"] = rnd(fpn, c_in[-1] if i == 3 else fpn, 3, 3)
        sd[f"neck.fpn_convs.{i}.conv.bias"] = rnd(fpn)
    for tower in ("cls", "reg", "rep"):
        for i in range(4):
            sd[f"bbox_head.{tower}_convs.{i}.conv.weight"] = rnd(fpn, fpn, 3, 3)
            sd[f"bbox_head.{tower}_convs.{i}.gn.weight"] = rnd(fpn)
            sd[f"bbox_head.{tower}_convs.{i}.gn.bias"] = rnd(fpn)
    for name, k in (("cls", num_classes), ("reg", 4), ("rep", 2 * d)):
        sd[f"bbox_head.retina_{name}.weight"] = rnd(a * k, fpn, 3, 3)
        sd[f"bbox_head.retina_{name}.bias"] = rnd(a * k)
    for prefix, cin in (("lateral_convs.0.0", fpn), ("lateral_convs.1.0", fpn),
                        ("lateral_convs.2.0", fpn), ("lateral_convs.2.2", pix),
                        ("final_convs.0.0", pix)):
        sd[f"mask_head.{prefix}.conv.weight"] = rnd(pix, cin, 3, 3)
        sd[f"mask_head.{prefix}.gn.weight"] = rnd(pix)
        sd[f"mask_head.{prefix}.gn.bias"] = rnd(pix)
    sd["mask_head.conv_reps.weight"] = rnd(d, pix, 1, 1)
    sd["mask_head.conv_reps.bias"] = rnd(d)
    return sd


def test_r50_checkpoint_layout_converts_completely():
    """393 upstream entries; 53 num_batches_tracked dropped (FrozenBN); all 340 targets filled."""
    with torch.device("meta"):
        source = mmdet_source(torchvision.models.resnet50())
        cfg = load_config(
            os.path.join(repo_root(), "configs", "rdsnet", "rdsnet_R_50_FPN_1x.yaml"),
            ["MODEL.DEVICE", "meta"],
        )
        model = build_model(cfg)
    assert len(source) == 393
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    out = convert_rdsnet_state_dict(source, shapes)
    assert len(out) == 340 == len(shapes)
    assert mmdet_to_d2_key("backbone.layer1.0.downsample.1.running_var") == (
        "backbone.bottom_up.res2.0.shortcut.norm.running_var"
    )
    assert mmdet_to_d2_key("neck.fpn_convs.3.conv.weight") == "backbone.top_block.p6.weight"
    assert mmdet_to_d2_key("bbox_head.reg_convs.2.gn.bias") == "head.bbox_subnet.7.bias"
    assert mmdet_to_d2_key("mask_head.lateral_convs.2.2.gn.weight") == "pixel_stream.p5_conv2.norm.weight"
    assert mmdet_to_d2_key("mask_head.conv_reps.bias") == "pixel_stream.out.bias"


def test_unknown_and_wrong_shape_keys_are_errors():
    with torch.device("meta"):
        source = mmdet_source(torchvision.models.resnet50())
        cfg = load_config(
            os.path.join(repo_root(), "configs", "rdsnet", "rdsnet_R_50_FPN_1x.yaml"),
            ["MODEL.DEVICE", "meta"],
        )
        shapes = {k: tuple(v.shape) for k, v in build_model(cfg).state_dict().items()}
    bad = dict(source, **{"bbox_head.retina_extra.weight": torch.zeros(1)})
    with pytest.raises(ConversionError, match="retina_extra"):
        convert_rdsnet_state_dict(bad, shapes)
    wrong = dict(source)
    wrong["bbox_head.retina_cls.weight"] = torch.zeros(9 * 81, 256, 3, 3)
    with pytest.raises(ConversionError, match="head.cls_score.weight"):
        convert_rdsnet_state_dict(wrong, shapes)
    missing = {k: v for k, v in source.items() if not k.startswith("mask_head.conv_reps")}
    with pytest.raises(ConversionError, match="pixel_stream.out"):
        convert_rdsnet_state_dict(missing, shapes)


def test_permute_anchor_dim():
    """mmdet slot r*3 + s -> Detectron2 slot s*3 + r, per-anchor channel blocks kept."""
    w = torch.arange(9 * 2).float()  # 9 anchors x 2 channels
    out = permute_anchor_dim(w, 3, 3).view(9, 2)
    for r in range(3):
        for s in range(3):
            assert out[s * 3 + r].tolist() == w.view(9, 2)[r * 3 + s].tolist()


# The authors' architecture: BN trunk, FPN without norm (the tiny test default is GN).
# State-dict conversion has no device choice: CPU also where the suite runs on CUDA.
MMDET_ARCH_OPTS = ["MODEL.RESNETS.NORM", "BN", "MODEL.FPN.NORM", "", "MODEL.DEVICE", "cpu"]


def _tiny_pair():
    common = ["MODEL.RDSNET.DETECTIONS_PER_IMAGE", 30] + MMDET_ARCH_OPTS
    mm = build_model(rdsnet_tiny.tiny_cfg(opts=common))
    d2 = build_model(rdsnet_tiny.tiny_cfg(opts=common + [
        "MODEL.ANCHOR_GENERATOR.NAME", "DefaultAnchorGenerator"]))
    return mm, d2


def test_converted_tiny_model_runs_and_anchor_orders_agree(tmp_path):
    """Same upstream weights into mmdet-order and D2-order models: identical predictor outputs
    up to the anchor permutation; the file written by the CLI loads with DetectionCheckpointer."""
    torch.manual_seed(0)
    source = mmdet_source(torchvision.models.resnet18(), c_in=(128, 256, 512), fpn=64, pix=64,
                          num_classes=3)
    mm, d2 = _tiny_pair()
    out_mm = convert_rdsnet_state_dict(source, {k: v.shape for k, v in mm.state_dict().items()})
    out_d2 = convert_rdsnet_state_dict(
        source, {k: v.shape for k, v in d2.state_dict().items()}, permute_anchors=True)
    mm.load_state_dict(out_mm)
    d2.load_state_dict(out_d2)
    assert torch.equal(mm.pixel_stream.p3_conv.norm.weight,
                       source["mask_head.lateral_convs.0.0.gn.weight"])
    assert torch.equal(mm.head.cls_score.weight, source["bbox_head.retina_cls.weight"])
    # BN (trained in the tiny config) keeps num_batches_tracked
    assert "backbone.bottom_up.res2.0.conv1.norm.num_batches_tracked" in out_mm
    x = torch.randn(1, 64, 8, 8)
    for name, k in (("cls_score", 3), ("bbox_pred", 4), ("rep_pred", 64)):
        a = getattr(mm.head, name)(x).view(3, 3, k, 8, 8)  # (ratio, size)
        b = getattr(d2.head, name)(x).view(3, 3, k, 8, 8)  # (size, ratio)
        assert torch.allclose(a, b.transpose(0, 1), atol=1e-5)

    src = tmp_path / "rdsnet_upstream.pth"
    torch.save({"meta": {"mmdet_version": "1.0rc0"}, "state_dict": source}, str(src))
    dst = tmp_path / "converted.pth"
    cfg_file = os.path.join(rdsnet_tiny.CONFIG_DIR, "rdsnet_R_50_FPN_1x.yaml")
    opts = [str(v) if not isinstance(v, (list, tuple)) else repr(list(v))
            for v in rdsnet_tiny.TINY_RDSNET_OPTS + MMDET_ARCH_OPTS]
    proc = subprocess.run(
        [sys.executable, os.path.join(repo_root(), "tools", "convert_rdsnet.py"),
         "--config-file", cfg_file, str(src), str(dst)] + opts,
        capture_output=True, text=True, cwd=repo_root(),
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    assert proc.returncode == 0, proc.stderr
    assert "wrote" in proc.stdout
    fresh = build_model(rdsnet_tiny.tiny_cfg(opts=MMDET_ARCH_OPTS))
    DetectionCheckpointer(fresh).load(str(dst))
    for key, value in mm.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key


@pytest.mark.parametrize("num_ratios, num_sizes", [(2, 3), (3, 2)])
def test_convert_checkpoint_file_in_process(tmp_path, num_ratios, num_sizes):
    """`convert_rdsnet_checkpoint` (the CLI's function, here in-process): reads the upstream
    file, drops the `mbrm.*` constants, builds the config's model for the shapes, permutes the
    predictors for Detectron2's size-major anchors (R ratios x S sizes: D2 slot s*R + r = mmdet
    slot r*S + s; both counts read from the config) and writes {"model": ..., "__author__": ...}."""
    from rdsnet.convert import convert_rdsnet_checkpoint

    source = mmdet_source(torchvision.models.resnet18(), c_in=(128, 256, 512), fpn=64, pix=64,
                          num_classes=3, a=6)
    src, dst = tmp_path / "up.pth", tmp_path / "out.pth"
    with_mbrm = dict(source, **{"mbrm.weight": torch.zeros(1, 1, 9), "mbrm.bias": torch.zeros(1)})
    torch.save({"meta": {}, "state_dict": with_mbrm}, str(src))
    ratios = [0.5, 1.0, 2.0][:num_ratios]
    sizes = [[s * 2 ** i for s in (16, 20.16, 25.4)[:num_sizes]] for i in range(5)]
    cfg = rdsnet_tiny.tiny_cfg(opts=MMDET_ARCH_OPTS + [
        "MODEL.ANCHOR_GENERATOR.NAME", "DefaultAnchorGenerator",
        "MODEL.ANCHOR_GENERATOR.SIZES", sizes,
        "MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS", [ratios]])
    counts = convert_rdsnet_checkpoint(cfg, str(src), str(dst))
    # every other key maps (the BN trunk of the tiny config keeps num_batches_tracked)
    assert counts == {"source": len(source) + 2, "converted": len(source)}
    saved = torch.load(str(dst), weights_only=False)
    model = saved["model"]
    assert len(model) == len(source) and "RDSNet" in saved["__author__"]
    up = source["bbox_head.retina_cls.weight"].view(num_ratios, num_sizes, 3, 64, 3, 3)
    out = torch.as_tensor(model["head.cls_score.weight"]).view(num_sizes, num_ratios, 3, 64, 3, 3)
    assert torch.equal(out, up.transpose(0, 1))
    assert torch.equal(torch.as_tensor(model["pixel_stream.out.weight"]),
                       source["mask_head.conv_reps.weight"])


def test_permute_needs_whole_anchor_groups_and_shapes_are_optional():
    """A predictor whose dim 0 is not a multiple of the anchors is an error naming both; without
    target shapes every known key is converted."""
    with pytest.raises(ConversionError, match=r"predictor dim 0 \(10\) is not a multiple of 9"):
        permute_anchor_dim(torch.zeros(10), 3, 3)
    source = mmdet_source(torchvision.models.resnet18(), c_in=(128, 256, 512), fpn=64, pix=64,
                          num_classes=3)
    out = convert_rdsnet_state_dict(source)
    assert torch.equal(out["head.cls_score.bias"], source["bbox_head.retina_cls.bias"])
