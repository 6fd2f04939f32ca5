"""Checkpoint conversion on synthetic upstream state dicts: every key mapped or
dropped, background rows reordered, the result loads into the Detectron2 model exactly."""
import importlib.util
import os
import re

import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling import build_model

import projects
from projects.testing import repo_root
from dynamic_rcnn.convert import convert, detect_source
from projects_common.checkpoint import ConversionError

CONFIG = projects.model_zoo.get_config_file("dynamic_rcnn/dynamic_rcnn_R_50_FPN_1x.yaml")
SMALL = [
    "MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", "",
    "MODEL.RESNETS.STEM_OUT_CHANNELS", 8, "MODEL.RESNETS.RES2_OUT_CHANNELS", 16,
    "MODEL.RESNETS.WIDTH_PER_GROUP", 4, "MODEL.FPN.OUT_CHANNELS", 8,
    "MODEL.ROI_BOX_HEAD.FC_DIM", 16, "MODEL.ROI_HEADS.NUM_CLASSES", 80,
]
K = 80


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model(projects.load_config(CONFIG, SMALL))


def _reference(model):
    return {k: torch.randn(v.shape) for k, v in model.state_dict().items()
            if not k.startswith("roi_heads.dynamic_state.")}


# Upstream names, written from the released checkpoints' key names, independent of the converter.
_ORIG_HEADS = {
    "proposal_generator.rpn_head.conv.": "rpn_conv.",
    "proposal_generator.rpn_head.objectness_logits.": "rpn_cls_logits.",
    "proposal_generator.rpn_head.anchor_deltas.": "rpn_bbox_pred.",
    "roi_heads.box_head.fc1.": "fc6.",
    "roi_heads.box_head.fc2.": "fc7.",
    "roi_heads.box_predictor.cls_score.": "cls_score.",
    "roi_heads.box_predictor.bbox_pred.": "bbox_pred.",
}


def _orig_name(k):
    for ours, theirs in _ORIG_HEADS.items():
        if k.startswith(ours):
            return theirs + k[len(ours):]
    k = re.sub(r"^backbone\.bottom_up\.stem\.conv1\.norm\.", "backbone.body.stem.bn1.", k)
    k = re.sub(r"^backbone\.bottom_up\.stem\.conv1\.", "backbone.body.stem.conv1.", k)
    k = re.sub(r"^backbone\.bottom_up\.res(\d)\.",
               lambda m: f"backbone.body.layer{int(m[1]) - 1}.", k)
    k = re.sub(r"\.shortcut\.norm\.", ".downsample.1.", k)
    k = re.sub(r"\.shortcut\.", ".downsample.0.", k)
    k = re.sub(r"\.conv(\d)\.norm\.", r".bn\1.", k)
    k = re.sub(r"^backbone\.fpn_lateral(\d)\.",
               lambda m: f"backbone.fpn.fpn_inner{int(m[1]) - 1}.", k)
    k = re.sub(r"^backbone\.fpn_output(\d)\.",
               lambda m: f"backbone.fpn.fpn_layer{int(m[1]) - 1}.", k)
    return k


def _mm_name(k, head_prefix):
    k = re.sub(r"^backbone\.bottom_up\.stem\.conv1\.norm\.", "backbone.bn1.", k)
    k = re.sub(r"^backbone\.bottom_up\.stem\.conv1\.", "backbone.conv1.", k)
    k = re.sub(r"^backbone\.bottom_up\.res(\d)\.",
               lambda m: f"backbone.layer{int(m[1]) - 1}.", k)
    k = re.sub(r"\.shortcut\.norm\.", ".downsample.1.", k)
    k = re.sub(r"\.shortcut\.", ".downsample.0.", k)
    k = re.sub(r"\.conv(\d)\.norm\.", r".bn\1.", k)
    k = re.sub(r"^backbone\.fpn_lateral(\d)\.",
               lambda m: f"neck.lateral_convs.{int(m[1]) - 2}.conv.", k)
    k = re.sub(r"^backbone\.fpn_output(\d)\.", lambda m: f"neck.fpn_convs.{int(m[1]) - 2}.conv.", k)
    k = k.replace("proposal_generator.rpn_head.conv.", "rpn_head.rpn_conv.")
    k = k.replace("proposal_generator.rpn_head.objectness_logits.", "rpn_head.rpn_cls.")
    k = k.replace("proposal_generator.rpn_head.anchor_deltas.", "rpn_head.rpn_reg.")
    k = k.replace("roi_heads.box_head.fc1.", head_prefix + "bbox_head.shared_fcs.0.")
    k = k.replace("roi_heads.box_head.fc2.", head_prefix + "bbox_head.shared_fcs.1.")
    k = k.replace("roi_heads.box_predictor.cls_score.", head_prefix + "bbox_head.fc_cls.")
    k = k.replace("roi_heads.box_predictor.bbox_pred.", head_prefix + "bbox_head.fc_reg.")
    return k


def _upstream(ref, source):
    out = {}
    for k, v in ref.items():
        if source == "orig":
            name = _orig_name(k)
            # the background row (our last) goes first upstream
            if k.startswith("roi_heads.box_predictor.cls_score."):
                v = torch.cat([v[-1:], v[:-1]])
            elif k.startswith("roi_heads.box_predictor.bbox_pred."):
                v = torch.cat([torch.full_like(v[:4], 9.0), v])
            out["module." + name] = v
        elif source == "mmdet_v1":
            name = _mm_name(k, "")
            if k.startswith("roi_heads.box_predictor.cls_score."):
                v = torch.cat([v[-1:], v[:-1]])
            elif k.startswith("roi_heads.box_predictor.bbox_pred."):
                v = torch.cat([torch.full_like(v[:4], 9.0), v])
            out[name] = v
        else:
            out[_mm_name(k, "roi_head.")] = v
    return out


@pytest.mark.parametrize("source", ["orig", "mmdet", "mmdet_v1"])
def test_round_trip_loads_exactly(tmp_path, model, source):
    ref = _reference(model)
    up = _upstream(ref, source)
    if source == "orig":
        up["module.anchor_generator.cell_anchors.0"] = torch.zeros(3, 4)  # dropped buffer
        path = tmp_path / "orig.pth"
        torch.save({"model": up, "iteration": 90000}, path)
    else:
        for k in list(up):
            if k.endswith("running_var"):
                up[k.replace("running_var", "num_batches_tracked")] = torch.tensor(5)
        path = tmp_path / f"{source}.pth"
        torch.save({"state_dict": up, "meta": {"epoch": 12}}, path)
    from dynamic_rcnn.convert import convert_checkpoint

    shapes = {k: v.shape for k, v in model.state_dict().items()}
    detected, n_conv, n_drop = convert_checkpoint(str(path), str(tmp_path / "d2.pth"), None, shapes)
    assert detected == source and n_conv == len(ref) and n_drop >= 1
    # the file loads into the model through DetectionCheckpointer, key for key
    DetectionCheckpointer(model).load(str(tmp_path / "d2.pth"))
    state = model.state_dict()
    for k, v in ref.items():
        assert torch.equal(state[k], v), k
    # Detectron2 layout: K + 1 classifier rows with background last, K x 4 regression rows
    assert state["roi_heads.box_predictor.cls_score.weight"].shape[0] == K + 1
    assert state["roi_heads.box_predictor.bbox_pred.weight"].shape[0] == 4 * K


def test_background_reordering_orig():
    w = torch.arange(81.0)[:, None].repeat(1, 2)  # row i holds value i; row 0 = background
    reg = torch.arange(324.0)[:, None]
    out, src = convert({"cls_score.weight": w, "bbox_pred.weight": reg}, "orig")
    assert src == "orig"
    cls = out["roi_heads.box_predictor.cls_score.weight"][:, 0]
    assert cls.tolist() == list(range(1, 81)) + [0]  # rows [1..80, 0]
    assert out["roi_heads.box_predictor.bbox_pred.weight"][:, 0].tolist() == list(range(4, 324))


def test_mmdet_head_copied_as_is():
    w, reg = torch.randn(81, 3), torch.randn(320, 3)
    out, _ = convert({"roi_head.bbox_head.fc_cls.weight": w,
                      "roi_head.bbox_head.fc_reg.weight": reg}, "mmdet")
    assert torch.equal(out["roi_heads.box_predictor.cls_score.weight"], w)
    assert torch.equal(out["roi_heads.box_predictor.bbox_pred.weight"], reg)


def test_dcn_keys():
    out, _ = convert({"backbone.body.layer2.0.conv2.offset.weight": torch.zeros(27, 4, 3, 3),
                      "backbone.body.layer2.0.conv2.conv.weight": torch.zeros(4, 4, 3, 3)}, "orig")
    assert set(out) == {"backbone.bottom_up.res3.0.conv2_offset.weight",
                        "backbone.bottom_up.res3.0.conv2.weight"}
    out, _ = convert({"backbone.layer3.1.conv2.conv_offset.bias": torch.zeros(18),
                      "backbone.layer3.1.conv2.weight": torch.zeros(4, 4, 3, 3)}, "mmdet_v1")
    assert set(out) == {"backbone.bottom_up.res4.1.conv2_offset.bias",
                        "backbone.bottom_up.res4.1.conv2.weight"}


def test_unknown_keys_and_missing_targets_are_errors(model):
    with pytest.raises(ConversionError, match="roi_head.mask_head.conv.weight"):
        convert({"roi_head.mask_head.conv.weight": torch.zeros(1),
                 "roi_head.bbox_head.fc_cls.weight": torch.zeros(81, 2)}, "mmdet")
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    with pytest.raises(ConversionError, match="not filled"):
        convert({"fc6.weight": torch.zeros(shapes["roi_heads.box_head.fc1.weight"])}, "orig",
                shapes)
    with pytest.raises(ConversionError, match="code base"):
        detect_source({"something.weight": torch.zeros(1)})


def test_cli_reports_errors(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location(
        "convert_dynamic_rcnn_cli", os.path.join(repo_root(), "tools", "convert_dynamic_rcnn.py"))
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    bad = tmp_path / "bad.pth"
    torch.save({"state_dict": {"roi_head.bbox_head.unknown.weight": torch.zeros(2)}}, bad)
    assert cli.main([str(bad), str(tmp_path / "out.pth")]) == 1
    assert "roi_head.bbox_head.unknown.weight" in capsys.readouterr().err
    good = tmp_path / "good.pth"
    torch.save({"state_dict": {"roi_head.bbox_head.fc_cls.weight": torch.zeros(4, 2)}}, good)
    assert cli.main([str(good), str(tmp_path / "out.pth")]) == 0
    saved = torch.load(tmp_path / "out.pth", weights_only=True)["model"]
    assert list(saved) == ["roi_heads.box_predictor.cls_score.weight"]
