"""Convert the authors' mmdetection v2.4 Decoupled R-CNN checkpoints to this package.

Whole detector (``decoupled_refine_rcnn_*_fpn_2x_coco.pth``; ``state_dict`` of mmdet's
``TwoStageDetector``):

==========================================  ===============================================
mmdet key                                   Detectron2 key
==========================================  ===============================================
``backbone.conv1.weight``                   ``backbone.bottom_up.stem.conv1.weight``
``backbone.bn1.*``                          ``backbone.bottom_up.stem.conv1.norm.*``
``backbone.layer{s}.{b}.conv{n}.weight``    ``backbone.bottom_up.res{s+1}.{b}.conv{n}.weight``
``backbone.layer{s}.{b}.bn{n}.*``           ``backbone.bottom_up.res{s+1}.{b}.conv{n}.norm.*``
``backbone.layer{s}.0.downsample.{0,1}``    ``backbone.bottom_up.res{s+1}.0.shortcut[.norm]``
``neck.lateral_convs.{i}.conv.*``           ``backbone.fpn_lateral{i+2}.*``
``neck.fpn_convs.{i}.conv.*``               ``backbone.fpn_output{i+2}.*``
``rpn_head.rpn_conv.*``                    ``proposal_generator.rpn_head.conv.*``
``rpn_head.rpn_cls.*``                     ``proposal_generator.rpn_head.objectness_logits.*``
``rpn_head.rpn_reg.*``                     ``proposal_generator.rpn_head.anchor_deltas.*``
``roi_head.bbox_head.0.fc_cls.*``           ``roi_heads.box_predictor.cls_score.*``
``roi_head.bbox_head.0.fc_reg.*``           ``roi_heads.box_predictor.bbox_pred.*``
``roi_head.bbox_head.0.cls_fcs.{j}.*``      ``roi_heads.box_head_cls.fc{j+1}.*``
``roi_head.bbox_head.0.reg_fcs.{j}.*``      ``roi_heads.box_head_reg.fc{j+1}.*``
``roi_head.bbox_head.{k}.fc_reg.*``         ``roi_heads.refine_predictors.{k-1}.bbox_pred.*``
``roi_head.bbox_head.{k}.reg_fcs.{j}.*``    ``roi_heads.refine_heads.{k-1}.fc{j+1}.*``
==========================================  ===============================================

``num_batches_tracked`` is dropped (FrozenBN). Layouts need no permutation: background is the
last class in both code bases, the deltas are class-major (dx, dy, dw, dh), FC inputs flatten
(C, H, W), COCO labels are the sorted category ids in both, and the anchor order matches.

ImageNet backbone (``--backbone-only``; torchvision ``resnet50/101``, open-mmlab
``resnext101_{32,64}x4d``): the same trunk keys without the ``backbone.`` prefix, ``fc.*``
dropped; only the ``backbone.bottom_up.*`` keys of the target are filled.
"""
import re
from collections import OrderedDict
from typing import Callable, Dict, List, Mapping, Optional, Tuple

import torch

from projects_common.checkpoint import (
    DROP,
    ConversionError,
    convert_state_dict,
    load_upstream_state_dict,
    save_converted_checkpoint,
)

__all__ = [
    "ROI_HEAD_TENSORS",
    "convert_decoupled_rcnn_checkpoint",
    "convert_decoupled_rcnn_state_dict",
    "mmdet_to_d2_key",
]

# 12 stage-0 tensors + 6 per refine stage.
ROI_HEAD_TENSORS = 24

_BN = r"(weight|bias|running_mean|running_var)"
_WB = r"(weight|bias)"


def _rules() -> List[Tuple[str, Callable[[re.Match], str]]]:
    bb = "backbone.bottom_up."
    return [
        (r"^backbone\.conv1\.weight$", lambda m: bb + "stem.conv1.weight"),
        (rf"^backbone\.bn1\.{_BN}$", lambda m: bb + f"stem.conv1.norm.{m[1]}"),
        (r"^backbone\.layer(\d)\.(\d+)\.conv(\d)\.weight$",
         lambda m: bb + f"res{int(m[1]) + 1}.{m[2]}.conv{m[3]}.weight"),
        (rf"^backbone\.layer(\d)\.(\d+)\.bn(\d)\.{_BN}$",
         lambda m: bb + f"res{int(m[1]) + 1}.{m[2]}.conv{m[3]}.norm.{m[4]}"),
        (r"^backbone\.layer(\d)\.0\.downsample\.0\.weight$",
         lambda m: bb + f"res{int(m[1]) + 1}.0.shortcut.weight"),
        (rf"^backbone\.layer(\d)\.0\.downsample\.1\.{_BN}$",
         lambda m: bb + f"res{int(m[1]) + 1}.0.shortcut.norm.{m[2]}"),
        (rf"^neck\.lateral_convs\.(\d)\.conv\.{_WB}$",
         lambda m: f"backbone.fpn_lateral{int(m[1]) + 2}.{m[2]}"),
        (rf"^neck\.fpn_convs\.(\d)\.conv\.{_WB}$",
         lambda m: f"backbone.fpn_output{int(m[1]) + 2}.{m[2]}"),
        (rf"^rpn_head\.rpn_conv\.{_WB}$", lambda m: f"proposal_generator.rpn_head.conv.{m[1]}"),
        (rf"^rpn_head\.rpn_cls\.{_WB}$",
         lambda m: f"proposal_generator.rpn_head.objectness_logits.{m[1]}"),
        (rf"^rpn_head\.rpn_reg\.{_WB}$",
         lambda m: f"proposal_generator.rpn_head.anchor_deltas.{m[1]}"),
        (rf"^roi_head\.bbox_head\.0\.fc_cls\.{_WB}$",
         lambda m: f"roi_heads.box_predictor.cls_score.{m[1]}"),
        (rf"^roi_head\.bbox_head\.0\.fc_reg\.{_WB}$",
         lambda m: f"roi_heads.box_predictor.bbox_pred.{m[1]}"),
        (rf"^roi_head\.bbox_head\.0\.cls_fcs\.(\d+)\.{_WB}$",
         lambda m: f"roi_heads.box_head_cls.fc{int(m[1]) + 1}.{m[2]}"),
        (rf"^roi_head\.bbox_head\.0\.reg_fcs\.(\d+)\.{_WB}$",
         lambda m: f"roi_heads.box_head_reg.fc{int(m[1]) + 1}.{m[2]}"),
        (rf"^roi_head\.bbox_head\.([1-9]\d*)\.fc_reg\.{_WB}$",
         lambda m: f"roi_heads.refine_predictors.{int(m[1]) - 1}.bbox_pred.{m[2]}"),
        (rf"^roi_head\.bbox_head\.([1-9]\d*)\.reg_fcs\.(\d+)\.{_WB}$",
         lambda m: f"roi_heads.refine_heads.{int(m[1]) - 1}.fc{int(m[2]) + 1}.{m[3]}"),
    ]


_RULES = [(re.compile(p), f) for p, f in _rules()]


def mmdet_to_d2_key(key: str, backbone_only: bool = False):
    """Detectron2 name of an mmdet key, `DROP` for an explicitly dropped key, ``None`` if
    unknown. With ``backbone_only`` the key is an ImageNet trunk key (no ``backbone.``)."""
    if key.endswith("num_batches_tracked"):
        return DROP
    if backbone_only:
        if re.match(r"^fc\.(weight|bias)$", key):
            return DROP  # ImageNet classifier
        key = "backbone." + key
    elif not re.match(r"^(backbone|neck|rpn_head|roi_head)\.", key):
        return None
    for pattern, fn in _RULES:
        m = pattern.match(key)
        if m:
            new = fn(m)
            if backbone_only and not new.startswith("backbone.bottom_up."):
                return None
            return new
    return None


def convert_decoupled_rcnn_state_dict(
    source: Mapping[str, torch.Tensor],
    target_shapes: Optional[Mapping[str, Tuple[int, ...]]] = None,
    backbone_only: bool = False,
) -> "OrderedDict[str, torch.Tensor]":
    """Rename an mmdet state dict; with ``target_shapes`` (the model's ``{key: shape}``) every
    target key must be filled with a tensor of its shape (only ``backbone.bottom_up.*`` ones
    with ``backbone_only``). Raises `ConversionError` naming unknown / missing / wrong keys."""
    if target_shapes is not None and backbone_only:
        target_shapes = {k: v for k, v in target_shapes.items()
                         if k.startswith("backbone.bottom_up.")}
    return convert_state_dict(source, lambda k: mmdet_to_d2_key(k, backbone_only), target_shapes)


def convert_decoupled_rcnn_checkpoint(
    src: str, dst: str, target_shapes: Optional[Mapping[str, Tuple[int, ...]]] = None,
    backbone_only: bool = False,
) -> Dict[str, object]:
    """Read ``src`` (mmdet ``.pth``), convert, check against ``target_shapes``, write ``dst``.

    Returns ``{"num_converted", "num_dropped", "num_roi_head_tensors"}``.
    """
    source = load_upstream_state_dict(src)
    try:
        out = convert_decoupled_rcnn_state_dict(source, target_shapes, backbone_only)
    except ConversionError as e:
        raise ConversionError(f"{src}: {e}") from None
    roi = sum(k.startswith("roi_heads.") for k in out)
    save_converted_checkpoint(out, dst, author="decoupled_rcnn.convert (from mmdetection v2.4)")
    return {"num_converted": len(out), "num_dropped": len(source) - len(out),
            "num_roi_head_tensors": roi}
