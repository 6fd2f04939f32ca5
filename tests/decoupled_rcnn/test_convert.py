"""Converter from the authors' mmdetection v2.4 checkpoints."""
import importlib.util
import os

import pytest
import torch

from decoupled_rcnn.convert import (
    ROI_HEAD_TENSORS,
    convert_decoupled_rcnn_checkpoint,
    convert_decoupled_rcnn_state_dict,
)
from projects_common.checkpoint import ConversionError

BN = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def mmdet_resnet_keys(depth=50, prefix="backbone.", groups=1, width_per_group=64):
    """(key, shape) of an mmdet / torchvision ResNet(-Xt) trunk, from the module definitions."""
    blocks = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}[depth]
    out = [(prefix + "conv1.weight", (64, 3, 7, 7))]
    out += [(prefix + f"bn1.{n}", () if n == "num_batches_tracked" else (64,)) for n in BN]
    inplanes = 64
    for s, num in enumerate(blocks, start=1):
        planes = 64 * 2 ** (s - 1)
        width = planes if groups == 1 else groups * width_per_group * 2 ** (s - 1)
        for b in range(num):
            p = f"{prefix}layer{s}.{b}."
            convs = [(width, inplanes, 1, 1), (width, width // groups, 3, 3), (planes * 4, width, 1, 1)]
            for n, shape in enumerate(convs, start=1):
                out.append((p + f"conv{n}.weight", shape))
                out += [(p + f"bn{n}.{x}", () if x == "num_batches_tracked" else (shape[0],))
                        for x in BN]
            if b == 0:
                out.append((p + "downsample.0.weight", (planes * 4, inplanes, 1, 1)))
                out += [(p + f"downsample.1.{x}", () if x == "num_batches_tracked" else (planes * 4,))
                        for x in BN]
            inplanes = planes * 4
    return out


def mmdet_detector_keys(num_classes=80):
    out = mmdet_resnet_keys()
    for i, c in enumerate((256, 512, 1024, 2048)):
        out += [(f"neck.lateral_convs.{i}.conv.weight", (256, c, 1, 1)),
                (f"neck.lateral_convs.{i}.conv.bias", (256,)),
                (f"neck.fpn_convs.{i}.conv.weight", (256, 256, 3, 3)),
                (f"neck.fpn_convs.{i}.conv.bias", (256,))]
    out += [("rpn_head.rpn_conv.weight", (256, 256, 3, 3)), ("rpn_head.rpn_conv.bias", (256,)),
            ("rpn_head.rpn_cls.weight", (3, 256, 1, 1)), ("rpn_head.rpn_cls.bias", (3,)),
            ("rpn_head.rpn_reg.weight", (12, 256, 1, 1)), ("rpn_head.rpn_reg.bias", (12,))]
    h = "roi_head.bbox_head."
    out += [(h + "0.fc_cls.weight", (num_classes + 1, 1024)), (h + "0.fc_cls.bias", (num_classes + 1,)),
            (h + "0.fc_reg.weight", (4 * num_classes, 1024)), (h + "0.fc_reg.bias", (4 * num_classes,))]
    for tower in ("cls_fcs", "reg_fcs"):
        out += [(h + f"0.{tower}.0.weight", (1024, 12544)), (h + f"0.{tower}.0.bias", (1024,)),
                (h + f"0.{tower}.1.weight", (1024, 1024)), (h + f"0.{tower}.1.bias", (1024,))]
    for k in (1, 2):
        out += [(h + f"{k}.fc_reg.weight", (4, 1024)), (h + f"{k}.fc_reg.bias", (4,)),
                (h + f"{k}.reg_fcs.0.weight", (1024, 12544)), (h + f"{k}.reg_fcs.0.bias", (1024,)),
                (h + f"{k}.reg_fcs.1.weight", (1024, 1024)), (h + f"{k}.reg_fcs.1.bias", (1024,))]
    return out


def _random_state_dict(keys):
    g = torch.Generator().manual_seed(0)
    return {k: (torch.tensor(5) if k.endswith("num_batches_tracked")
                else torch.randn(shape, generator=g)) for k, shape in keys}


@pytest.fixture(scope="module")
def source():
    return _random_state_dict(mmdet_detector_keys())


def test_full_detector_conversion_loads_exactly(full_r50_model, source, tmp_path):
    model = full_r50_model
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    out = convert_decoupled_rcnn_state_dict(source, shapes)
    assert set(out) == set(shapes)
    assert sum(k.startswith("roi_heads.") for k in out) == ROI_HEAD_TENSORS == 24
    assert sum(k.startswith("roi_heads.box_") for k in out) == 12
    # Values are moved, not transformed.
    pairs = {
        "roi_head.bbox_head.2.reg_fcs.0.weight": "roi_heads.refine_heads.1.fc1.weight",
        "roi_head.bbox_head.1.fc_reg.bias": "roi_heads.refine_predictors.0.bbox_pred.bias",
        "roi_head.bbox_head.0.cls_fcs.1.weight": "roi_heads.box_head_cls.fc2.weight",
        "roi_head.bbox_head.0.fc_reg.weight": "roi_heads.box_predictor.bbox_pred.weight",
        "backbone.layer3.0.downsample.1.running_var":
            "backbone.bottom_up.res4.0.shortcut.norm.running_var",
        "backbone.layer4.2.bn2.weight": "backbone.bottom_up.res5.2.conv2.norm.weight",
        "neck.lateral_convs.3.conv.weight": "backbone.fpn_lateral5.weight",
        "rpn_head.rpn_reg.weight": "proposal_generator.rpn_head.anchor_deltas.weight",
    }
    for src_key, dst_key in pairs.items():
        assert torch.equal(out[dst_key], source[src_key])
    # Through the file API, and into the model with strict loading.
    src_file = tmp_path / "mmdet.pth"
    torch.save({"meta": {"mmdet_version": "2.4.0"}, "state_dict": source, "optimizer": {}}, src_file)
    info = convert_decoupled_rcnn_checkpoint(str(src_file), str(tmp_path / "d2.pth"), shapes)
    assert info["num_roi_head_tensors"] == 24
    assert info["num_dropped"] == sum(k.endswith("num_batches_tracked") for k in source)
    saved = torch.load(tmp_path / "d2.pth", weights_only=True)["model"]
    model.load_state_dict(saved, strict=True)  # the shared fixture model gets random weights
    assert torch.equal(model.roi_heads.box_predictor.cls_score.weight,
                       source["roi_head.bbox_head.0.fc_cls.weight"])


def test_unknown_and_mismatched_keys_are_errors(full_r50_model, source):
    shapes = {k: tuple(v.shape) for k, v in full_r50_model.state_dict().items()}
    bad = dict(source)
    bad["roi_head.bbox_head.1.fc_cls.weight"] = torch.zeros(81, 1024)  # refine heads have none
    with pytest.raises(ConversionError, match="roi_head.bbox_head.1.fc_cls.weight"):
        convert_decoupled_rcnn_state_dict(bad, shapes)
    bad = dict(source)
    bad["roi_head.bbox_head.0.fc_cls.weight"] = torch.zeros(21, 1024)  # a VOC head
    with pytest.raises(ConversionError, match="shape"):
        convert_decoupled_rcnn_state_dict(bad, shapes)
    bad = dict(source)
    del bad["roi_head.bbox_head.2.fc_reg.bias"]
    with pytest.raises(ConversionError, match="refine_predictors.1.bbox_pred.bias"):
        convert_decoupled_rcnn_state_dict(bad, shapes)


def test_backbone_only_resnext(make_cfg, config_paths, tmp_path):
    """An open-mmlab ResNeXt-101-32x4d ImageNet trunk fills exactly the bottom-up keys."""
    from detectron2.modeling import build_backbone

    cfg = make_cfg(os.path.join(config_paths["dir"], "decoupled_rcnn_X_101_32x4d_FPN_2x.yaml"))
    backbone = build_backbone(cfg)
    shapes = {"backbone." + k: tuple(v.shape) for k, v in backbone.state_dict().items()}
    keys = mmdet_resnet_keys(101, prefix="", groups=32, width_per_group=4)
    keys += [("fc.weight", (1000, 2048)), ("fc.bias", (1000,))]
    out = convert_decoupled_rcnn_state_dict(_random_state_dict(keys), shapes, backbone_only=True)
    assert set(out) == {k for k in shapes if k.startswith("backbone.bottom_up.")}


def test_cli(tmp_path, config_paths, capsys):
    keys = mmdet_resnet_keys(50, prefix="") + [("fc.weight", (1000, 2048)), ("fc.bias", (1000,))]
    torch.save(_random_state_dict(keys), tmp_path / "resnet50.pth")
    tool = os.path.join(os.path.dirname(os.path.dirname(config_paths["dir"])), "tools",
                        "convert_decoupled_rcnn.py")
    spec = importlib.util.spec_from_file_location("convert_decoupled_rcnn_cli", tool)
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    args = ["--backbone-only", "--config-file", config_paths["r50"], str(tmp_path / "resnet50.pth"),
            str(tmp_path / "r50_d2.pth"), "--opts", "MODEL.ROI_BOX_HEAD.FC_DIM", "16"]
    assert cli.main(args) == 0
    assert "wrote" in capsys.readouterr().out and (tmp_path / "r50_d2.pth").exists()
    # A detector checkpoint given as a trunk: the neck key is reported.
    torch.save({"neck.fpn_convs.0.conv.bias": torch.zeros(256)}, tmp_path / "bad.pth")
    assert cli.main(args[:3] + [str(tmp_path / "bad.pth"), str(tmp_path / "x.pth")] + args[5:]) == 1
    assert "neck.fpn_convs.0.conv.bias" in capsys.readouterr().err
