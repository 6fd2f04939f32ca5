"""Convert the authors' TSD checkpoints (Sense-X/TSD, mmdetection v1) to this package.

Source: an mmcv checkpoint ``{"meta": ..., "state_dict": ...}`` of a Faster / Mask R-CNN
(``bbox_head.*``) or Cascade R-CNN (``bbox_head.{0,1,2}.*``) TSD model with a ResNet(-XT)
backbone, FPN neck, RPN head and optionally an FCN mask head. Every key is mapped or dropped on
purpose (``num_batches_tracked``); an unknown key is an error naming it
(`projects_common.checkpoint.convert_state_dict`).

Name mapping (mmdet v1 -> Detectron2 / this package)::

    backbone.conv1, bn1                    -> backbone.bottom_up.stem.conv1[.norm]
    backbone.layer{i}.{j}.conv{k}, bn{k}   -> backbone.bottom_up.res{i+1}.{j}.conv{k}[.norm]
    backbone.layer{i}.{j}.conv2_offset     -> backbone.bottom_up.res{i+1}.{j}.conv2_offset (DCN)
    backbone.layer{i}.{j}.downsample.0/.1  -> backbone.bottom_up.res{i+1}.{j}.shortcut[.norm]
    neck.lateral_convs.{l}.conv            -> backbone.fpn_lateral{l+2}
    neck.fpn_convs.{l}.conv                -> backbone.fpn_output{l+2}
    rpn_head.rpn_conv / rpn_cls / rpn_reg  -> proposal_generator.rpn_head.conv / objectness_logits
                                              / anchor_deltas
    bbox_head[.s].shared_fcs.{0,1}         -> roi_heads.box_head[.s].fc{1,2}        (sibling)
    bbox_head[.s].fc_cls / fc_reg          -> roi_heads.box_predictor[.s].cls_score / bbox_pred
    bbox_head[.s].shared_fc.0              -> roi_heads.tsd_head[.s].offset_generator.offset_fc
    bbox_head[.s].delta_c.{0,2}            -> ...offset_generator.delta_c_fc{1,2}
    bbox_head[.s].delta_r.{0,2}            -> ...offset_generator.delta_r_fc{1,2}
    bbox_head[.s].TSD_pc_fcs.{0,1}         -> roi_heads.tsd_head[.s].cls_head.fc{1,2}
    bbox_head[.s].TSD_pr_fcs.{0,1}         -> roi_heads.tsd_head[.s].reg_head.fc{1,2}
    bbox_head[.s].TSD_fc_cls / TSD_fc_reg  -> roi_heads.tsd_head[.s].predictor.cls_score / bbox_pred
    mask_head.convs.{i}.conv               -> roi_heads.mask_head.mask_fcn{i+1}
    mask_head.upsample / conv_logits       -> roi_heads.mask_head.deconv / predictor

Value changes (class re-indexing, mmdet background = 0, Detectron2 background = K):
classification rows ``[1..K, 0]``; class-specific regression rows ``4..4(K+1)-1`` (the untrained
background slot is dropped); mask logits channels ``1..K``. ΔC rows keep their layout
(``ch·49 + ph·7 + pw``, x then y), which is the layout of `TSDOffsetGenerator`.
"""
import re
from typing import Dict, Mapping, Optional

import torch

from projects_common.checkpoint import (
    DROP,
    ConversionError,
    convert_state_dict,
    load_upstream_state_dict,
    save_converted_checkpoint,
)

__all__ = [
    "map_tsd_key",
    "convert_tsd_state_dict",
    "convert_tsd_checkpoint",
    "expected_head_shapes",
]

_HEAD_NAMES = {
    "shared_fcs.0": "{box_head}.fc1",
    "shared_fcs.1": "{box_head}.fc2",
    "fc_cls": "{box_predictor}.cls_score",
    "fc_reg": "{box_predictor}.bbox_pred",
    "shared_fc.0": "{tsd}.offset_generator.offset_fc",
    "delta_c.0": "{tsd}.offset_generator.delta_c_fc1",
    "delta_c.2": "{tsd}.offset_generator.delta_c_fc2",
    "delta_r.0": "{tsd}.offset_generator.delta_r_fc1",
    "delta_r.2": "{tsd}.offset_generator.delta_r_fc2",
    "TSD_pc_fcs.0": "{tsd}.cls_head.fc1",
    "TSD_pc_fcs.1": "{tsd}.cls_head.fc2",
    "TSD_pr_fcs.0": "{tsd}.reg_head.fc1",
    "TSD_pr_fcs.1": "{tsd}.reg_head.fc2",
    "TSD_fc_cls": "{tsd}.predictor.cls_score",
    "TSD_fc_reg": "{tsd}.predictor.bbox_pred",
}
_CLS = ("fc_cls", "TSD_fc_cls")
_REG = ("fc_reg", "TSD_fc_reg")

_RPN = {"rpn_conv": "conv", "rpn_cls": "objectness_logits", "rpn_reg": "anchor_deltas"}


def _map_backbone(rest: str) -> Optional[str]:
    p = "backbone.bottom_up."
    m = re.fullmatch(r"conv1\.weight", rest)
    if m:
        return p + "stem.conv1.weight"
    m = re.fullmatch(r"bn1\.(weight|bias|running_mean|running_var)", rest)
    if m:
        return p + f"stem.conv1.norm.{m.group(1)}"
    m = re.fullmatch(r"layer(\d)\.(\d+)\.(.+)", rest)
    if not m:
        return None
    stage, block, tail = int(m.group(1)) + 1, m.group(2), m.group(3)
    b = f"{p}res{stage}.{block}."
    m = re.fullmatch(r"conv(\d)\.weight", tail)
    if m:
        return b + f"conv{m.group(1)}.weight"
    m = re.fullmatch(r"conv2_offset\.(weight|bias)", tail)
    if m:
        return b + f"conv2_offset.{m.group(1)}"
    m = re.fullmatch(r"bn(\d)\.(weight|bias|running_mean|running_var)", tail)
    if m:
        return b + f"conv{m.group(1)}.norm.{m.group(2)}"
    if tail == "downsample.0.weight":
        return b + "shortcut.weight"
    m = re.fullmatch(r"downsample\.1\.(weight|bias|running_mean|running_var)", tail)
    if m:
        return b + f"shortcut.norm.{m.group(1)}"
    return None


def map_tsd_key(key: str):
    """Target name of an mmdet-v1 TSD key, `DROP`, or None if unknown."""
    if key.endswith("num_batches_tracked"):
        return DROP
    if key.startswith("backbone."):
        return _map_backbone(key[len("backbone."):])
    m = re.fullmatch(r"neck\.(lateral|fpn)_convs\.(\d)\.conv\.(weight|bias)", key)
    if m:
        kind = "fpn_lateral" if m.group(1) == "lateral" else "fpn_output"
        return f"backbone.{kind}{int(m.group(2)) + 2}.{m.group(3)}"
    m = re.fullmatch(r"rpn_head\.(rpn_conv|rpn_cls|rpn_reg)\.(weight|bias)", key)
    if m:
        return f"proposal_generator.rpn_head.{_RPN[m.group(1)]}.{m.group(2)}"
    m = re.fullmatch(r"bbox_head\.(?:(\d)\.)?(.+)\.(weight|bias)", key)
    if m and m.group(2) in _HEAD_NAMES:
        s = "" if m.group(1) is None else f".{m.group(1)}"
        names = {"box_head": f"roi_heads.box_head{s}", "box_predictor":
                 f"roi_heads.box_predictor{s}", "tsd": f"roi_heads.tsd_head{s}"}
        return _HEAD_NAMES[m.group(2)].format(**names) + "." + m.group(3)
    m = re.fullmatch(r"mask_head\.convs\.(\d)\.conv\.(weight|bias)", key)
    if m:
        return f"roi_heads.mask_head.mask_fcn{int(m.group(1)) + 1}.{m.group(2)}"
    m = re.fullmatch(r"mask_head\.(upsample|conv_logits)\.(weight|bias)", key)
    if m:
        name = "deconv" if m.group(1) == "upsample" else "predictor"
        return f"roi_heads.mask_head.{name}.{m.group(2)}"
    return None


def _layer_name(key: str) -> str:
    """'bbox_head.1.TSD_fc_cls.weight' -> 'TSD_fc_cls'."""
    return key.rsplit(".", 2)[-2] if not key.startswith("mask_head") else key.split(".")[1]


def _reindex(src_key: str, dst_key: str, value: torch.Tensor) -> torch.Tensor:
    """Move the mmdet background (index 0) to Detectron2's last index / drop its slots."""
    layer = _layer_name(src_key)
    if src_key.startswith("bbox_head") and layer in _CLS:
        return torch.cat([value[1:], value[:1]], dim=0)
    if src_key.startswith("bbox_head") and layer in _REG:
        if value.shape[0] % 4:
            raise ConversionError(f"{src_key}: {value.shape[0]} rows is not a multiple of 4")
        return value[4:]
    if src_key.startswith("mask_head.conv_logits"):
        return value[1:]
    return value


def expected_head_shapes(num_classes: int, in_channels: int = 256, resolution: int = 7,
                         fc_dim: int = 1024, offset_dim: int = 256) -> Dict[str, tuple]:
    """Shapes of one mmdet TSD box head, ``num_classes`` incl. background."""
    n_in = in_channels * resolution * resolution
    shapes = {}

    def fc(name, out, inp):
        shapes[f"{name}.weight"], shapes[f"{name}.bias"] = (out, inp), (out,)

    fc("fc_cls", num_classes, fc_dim)
    fc("fc_reg", 4 * num_classes, fc_dim)
    fc("shared_fc.0", offset_dim, n_in)
    fc("delta_c.0", offset_dim, offset_dim)
    fc("delta_c.2", 2 * resolution * resolution, offset_dim)
    fc("delta_r.0", offset_dim, offset_dim)
    fc("delta_r.2", 2, offset_dim)
    for stack in ("shared_fcs", "TSD_pc_fcs", "TSD_pr_fcs"):
        fc(f"{stack}.0", fc_dim, n_in)
        fc(f"{stack}.1", fc_dim, fc_dim)
    fc("TSD_fc_cls", num_classes, fc_dim)
    fc("TSD_fc_reg", 4 * num_classes, fc_dim)
    return shapes


def _check_heads(source: Mapping[str, torch.Tensor]) -> None:
    """Assert the box-head shapes of the authors' TSD head (class count read from fc_cls)."""
    prefixes = sorted({m.group(0) for k in source
                       for m in [re.match(r"bbox_head\.(?:\d\.)?", k)] if m})
    for prefix in prefixes:
        cls = source.get(prefix + "fc_cls.weight")
        first = source.get(prefix + "shared_fc.0.weight")
        if cls is None or first is None:
            raise ConversionError(f"{prefix}: not a TSD head (fc_cls / shared_fc.0 missing)")
        K1, fc_dim = cls.shape
        offset_dim, n_in = first.shape
        k = int(round((source[prefix + "delta_c.2.weight"].shape[0] // 2) ** 0.5))
        expected = expected_head_shapes(K1, n_in // (k * k), k, fc_dim, offset_dim)
        wrong = [f"{prefix}{n}: {tuple(source[prefix + n].shape)} != {s}"
                 for n, s in expected.items()
                 if prefix + n in source and tuple(source[prefix + n].shape) != s]
        missing = [prefix + n for n in expected if prefix + n not in source]
        if wrong or missing:
            raise ConversionError(f"TSD head shape check failed: {'; '.join(wrong + missing)}")


def convert_tsd_state_dict(source: Mapping[str, torch.Tensor],
                           target_shapes: Optional[Mapping[str, tuple]] = None):
    """mmdet-v1 TSD state dict -> this package's names and class order.

    Args:
        source: flat upstream ``{key: tensor}``.
        target_shapes: optional ``{key: shape}`` of the model to load into; then every target key
            must be produced with this shape.
    """
    _check_heads(source)
    return convert_state_dict(source, map_tsd_key, target_shapes, transform=_reindex)


def convert_tsd_checkpoint(
    src_path: str, dst_path: str, target_shapes=None
) -> Dict[str, torch.Tensor]:
    """Read an authors' checkpoint, convert it and write ``{"model": ...}`` for MODEL.WEIGHTS."""
    out = convert_tsd_state_dict(load_upstream_state_dict(src_path), target_shapes)
    save_converted_checkpoint(out, dst_path, author="Sense-X/TSD (converted by tsd.convert)")
    return out
