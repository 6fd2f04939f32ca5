"""Convert released Dynamic R-CNN checkpoints to this package's Detectron2 layout.

All released models are plain Faster R-CNN FPN (2fc box head); the dynamic state is not part
of any upstream checkpoint (a converted model starts from INITIAL_IOU / INITIAL_BETA, which only
matters when training is continued).

Sources:
* ``"orig"``: the authors' maskrcnn-benchmark-style `Network` (hkzhang95/DynamicRCNN):
  ``backbone.body.*``, ``backbone.fpn.fpn_inner/fpn_layer*``, ``rpn_*``, ``fc6/fc7``,
  ``cls_score`` (81 rows, background first), ``bbox_pred`` (81 x 4 rows).
* ``"mmdet"``: MMDetection 2.x / 3.x (``backbone.*``, ``neck.*``, ``rpn_head.*``,
  ``roi_head.bbox_head.*``; background last, class-specific regression without background).
* ``"mmdet_v1"``: the authors' MMDetection v1.1 port (as mmdet, but ``bbox_head.*`` without
  the ``roi_head.`` prefix, background first and 81 x 4 regression rows).

Detectron2's classifier has the background as the *last* of K + 1 rows and its class-specific
regressor has K x 4 rows, so the "orig" and "mmdet_v1" heads are reordered: ``cls_score`` rows
``[1..K, 0]`` and ``bbox_pred`` rows ``4..4K+3`` (the background block is dropped).
"""
import re
from typing import Mapping, Optional

import torch

from projects_common.checkpoint import (
    DROP,
    ConversionError,
    convert_state_dict,
    load_upstream_state_dict,
    save_converted_checkpoint,
)

__all__ = [
    "SOURCES",
    "DYNAMIC_STATE_PREFIX",
    "detect_source",
    "map_key",
    "convert",
    "convert_checkpoint",
]

SOURCES = ("orig", "mmdet", "mmdet_v1")
# buffers of DynamicTrainingState: not in any upstream checkpoint
DYNAMIC_STATE_PREFIX = "roi_heads.dynamic_state."

_RESNET = "backbone.bottom_up."

# the authors' code (maskrcnn-benchmark naming)
_ORIG_RULES = [
    (r"^backbone\.body\.stem\.conv1\.", _RESNET + "stem.conv1."),
    (r"^backbone\.body\.stem\.bn1\.", _RESNET + "stem.conv1.norm."),
    (r"^backbone\.body\.layer(\d)\.(\d+)\.", lambda m: f"{_RESNET}res{int(m[1]) + 1}.{m[2]}."),
    (r"\.conv2\.offset\.", ".conv2_offset."),  # DCNv2 offset/mask conv (27 channels)
    (r"\.conv2\.conv\.weight$", ".conv2.weight"),  # DCN weight
    (r"\.bn(\d)\.", r".conv\1.norm."),
    (r"\.downsample\.0\.", ".shortcut."),
    (r"\.downsample\.1\.", ".shortcut.norm."),
    (r"^backbone\.fpn\.fpn_inner(\d)\.", lambda m: f"backbone.fpn_lateral{int(m[1]) + 1}."),
    (r"^backbone\.fpn\.fpn_layer(\d)\.", lambda m: f"backbone.fpn_output{int(m[1]) + 1}."),
    (r"^rpn_conv\.", "proposal_generator.rpn_head.conv."),
    (r"^rpn_cls_logits\.", "proposal_generator.rpn_head.objectness_logits."),
    (r"^rpn_bbox_pred\.", "proposal_generator.rpn_head.anchor_deltas."),
    (r"^fc6\.", "roi_heads.box_head.fc1."),
    (r"^fc7\.", "roi_heads.box_head.fc2."),
    (r"^cls_score\.", "roi_heads.box_predictor.cls_score."),
    (r"^bbox_pred\.", "roi_heads.box_predictor.bbox_pred."),
]

# MMDetection (all versions share backbone / neck / RPN names)
_MM_COMMON_RULES = [
    (r"^backbone\.conv1\.", _RESNET + "stem.conv1."),
    (r"^backbone\.bn1\.", _RESNET + "stem.conv1.norm."),
    (r"^backbone\.layer(\d)\.(\d+)\.", lambda m: f"{_RESNET}res{int(m[1]) + 1}.{m[2]}."),
    (r"\.conv2\.conv_offset\.", ".conv2_offset."),  # DCN offset (and mask) conv
    (r"\.bn(\d)\.", r".conv\1.norm."),
    (r"\.downsample\.0\.", ".shortcut."),
    (r"\.downsample\.1\.", ".shortcut.norm."),
    (r"^neck\.lateral_convs\.(\d)\.conv\.", lambda m: f"backbone.fpn_lateral{int(m[1]) + 2}."),
    (r"^neck\.fpn_convs\.(\d)\.conv\.", lambda m: f"backbone.fpn_output{int(m[1]) + 2}."),
    (r"^rpn_head\.rpn_conv\.", "proposal_generator.rpn_head.conv."),
    (r"^rpn_head\.rpn_cls\.", "proposal_generator.rpn_head.objectness_logits."),
    (r"^rpn_head\.rpn_reg\.", "proposal_generator.rpn_head.anchor_deltas."),
]


def _box_head_rules(prefix):
    p = re.escape(prefix)
    return [
        (rf"^{p}bbox_head\.shared_fcs\.0\.", "roi_heads.box_head.fc1."),
        (rf"^{p}bbox_head\.shared_fcs\.1\.", "roi_heads.box_head.fc2."),
        (rf"^{p}bbox_head\.fc_cls\.", "roi_heads.box_predictor.cls_score."),
        (rf"^{p}bbox_head\.fc_reg\.", "roi_heads.box_predictor.bbox_pred."),
    ]


_RULES = {
    "orig": _ORIG_RULES,
    "mmdet": _MM_COMMON_RULES + _box_head_rules("roi_head."),
    "mmdet_v1": _MM_COMMON_RULES + _box_head_rules(""),
}
# the target prefixes a mapped key must reach (anything else is unknown)
_TARGET = re.compile(
    r"^(backbone\.bottom_up\.(stem|res[2-5])\.|backbone\.fpn_(lateral|output)[2-5]\."
    r"|proposal_generator\.rpn_head\.(conv|objectness_logits|anchor_deltas)\."
    r"|roi_heads\.box_head\.fc[12]\.|roi_heads\.box_predictor\.(cls_score|bbox_pred)\.)"
)
_BACKGROUND_FIRST = ("orig", "mmdet_v1")


def detect_source(state_dict: Mapping[str, torch.Tensor]) -> str:
    """Guess the source code base from the key names."""
    keys = list(state_dict)
    if any(k.startswith("backbone.body.") for k in keys):
        return "orig"
    if any(k.startswith("roi_head.") for k in keys):
        return "mmdet"
    if any(k.startswith("bbox_head.") for k in keys):
        return "mmdet_v1"
    raise ConversionError(
        "cannot tell the checkpoint's code base (no 'backbone.body.', 'roi_head.' or "
        "'bbox_head.' keys); pass the source explicitly: one of " + ", ".join(SOURCES)
    )


def map_key(key: str, source: str):
    """Detectron2 name of upstream ``key``, `DROP` for an explicitly dropped key, or None."""
    if source not in _RULES:
        raise ValueError(f"unknown source {source!r}; one of {SOURCES}")
    if key.endswith("num_batches_tracked"):
        return DROP  # BN step counters (mmdet); Detectron2's norms do not use them
    if source == "orig" and key.startswith("anchor_generator."):
        return DROP  # cell-anchor buffers, regenerated by Detectron2's anchor generator
    new = key
    for pattern, repl in _RULES[source]:
        new = re.sub(pattern, repl, new)
    if new == key or not _TARGET.match(new):
        return None
    return new


def _transform(source: str):
    def fix_head(src_key: str, dst_key: str, value: torch.Tensor) -> torch.Tensor:
        if source not in _BACKGROUND_FIRST:
            return value
        if dst_key.startswith("roi_heads.box_predictor.cls_score."):
            # background first -> last: rows [1..K, 0]
            return torch.cat([value[1:], value[:1]], dim=0)
        if dst_key.startswith("roi_heads.box_predictor.bbox_pred."):
            if value.shape[0] % 4:
                raise ConversionError(f"{src_key}: {value.shape[0]} rows is not a multiple of 4")
            return value[4:]  # drop the background's 4 regression rows
        return value

    return fix_head


def convert(
    state_dict: Mapping[str, torch.Tensor],
    source: Optional[str] = None,
    target_shapes: Optional[Mapping[str, torch.Size]] = None,
):
    """Convert an upstream state dict; every key is mapped or explicitly dropped.

    Args:
        state_dict: upstream ``{name: tensor}`` (``module.`` prefix already removed, as
            `projects_common.checkpoint.load_upstream_state_dict` does).
        source: one of `SOURCES`, or None to detect it.
        target_shapes: optional ``{name: shape}`` of the target model; the dynamic-state
            buffers (``roi_heads.dynamic_state.*``) and other non-upstream entries are ignored.

    Returns:
        (converted ``OrderedDict``, source).
    """
    source = source or detect_source(state_dict)
    if target_shapes is not None:
        target_shapes = {
            k: v for k, v in target_shapes.items() if not k.startswith(DYNAMIC_STATE_PREFIX)
        }
    out = convert_state_dict(
        state_dict, lambda k: map_key(k, source), target_shapes, _transform(source)
    )
    return out, source


def convert_checkpoint(src: str, dst: str, source: Optional[str] = None, target_shapes=None):
    """Read ``src`` (trusted file), convert it, write ``dst`` for MODEL.WEIGHTS.

    Returns ``(source, number of converted tensors, number of dropped keys)``.
    """
    state = load_upstream_state_dict(src)
    try:
        converted, source = convert(state, source, target_shapes)
    except ConversionError as e:
        raise ConversionError(f"{src}: {e}") from None
    save_converted_checkpoint(converted, dst, author=f"dynamic_rcnn.convert ({source})")
    return source, len(converted), len(state) - len(converted)
