"""Convert the authors' mmdetection-v1 RDSNet checkpoints to this package.

Every upstream key is mapped or explicitly dropped (``num_batches_tracked`` when the target has
no such buffer, e.g. FrozenBN; ``mbrm.*`` which the released files do not contain: MBRM's
constants are built in). With Detectron2's size-major `DefaultAnchorGenerator` the anchor
dimension of ``retina_cls`` / ``retina_reg`` / ``retina_rep`` is permuted from mmdet's
ratio-major order; with `RDSNetMMDetAnchorGenerator` it is kept. Shapes are checked against
the target model.

Mapping (mmdet -> this package):

    backbone.conv1 / bn1                      -> backbone.bottom_up.stem.conv1 / .norm
    backbone.layer{L}.{B}.conv{k} / bn{k}     -> backbone.bottom_up.res{L+1}.{B}.conv{k} / .norm
    backbone.layer{L}.0.downsample.{0,1}      -> backbone.bottom_up.res{L+1}.0.shortcut / .norm
    neck.lateral_convs.{i}.conv               -> backbone.fpn_lateral{i+3}
    neck.fpn_convs.{0,1,2}.conv               -> backbone.fpn_output{3,4,5}
    neck.fpn_convs.{3,4}.conv                 -> backbone.top_block.p6 / p7
    bbox_head.{cls,reg,rep}_convs.{i}.conv/gn -> head.{cls,bbox,rep}_subnet.{3i} / {3i+1}
    bbox_head.retina_{cls,reg,rep}            -> head.{cls_score,bbox_pred,rep_pred}
    mask_head.lateral_convs.0.0               -> pixel_stream.p3_conv (gn -> .norm)
    mask_head.lateral_convs.1.0               -> pixel_stream.p4_conv
    mask_head.lateral_convs.2.{0,2}           -> pixel_stream.p5_conv{1,2}
    mask_head.final_convs.0.0                 -> pixel_stream.fuse_conv
    mask_head.conv_reps                       -> pixel_stream.out
"""
import re
from collections import OrderedDict
from typing import Dict, Mapping, Optional, Tuple

import torch

from projects_common.checkpoint import (
    DROP,
    ConversionError,
    apply_rules,
    convert_state_dict,
    load_upstream_state_dict,
    save_converted_checkpoint,
)

__all__ = [
    "mmdet_to_d2_key",
    "permute_anchor_dim",
    "convert_rdsnet_state_dict",
    "convert_rdsnet_checkpoint",
]

_RULES = [
    # backbone trunk (torchvision names)
    (r"^backbone\.conv1\.", "backbone.bottom_up.stem.conv1."),
    (r"^backbone\.bn1\.", "backbone.bottom_up.stem.conv1.norm."),
    (r"^backbone\.layer(\d)\.(\d+)\.downsample\.0\.", r"backbone.bottom_up.res\1.\2.shortcut."),
    (
        r"^backbone\.layer(\d)\.(\d+)\.downsample\.1\.",
        r"backbone.bottom_up.res\1.\2.shortcut.norm.",
    ),
    (r"^backbone\.layer(\d)\.(\d+)\.conv(\d)\.", r"backbone.bottom_up.res\1.\2.conv\3."),
    (r"^backbone\.layer(\d)\.(\d+)\.bn(\d)\.", r"backbone.bottom_up.res\1.\2.conv\3.norm."),
    # neck
    (r"^neck\.fpn_convs\.3\.conv\.", "backbone.top_block.p6."),
    (r"^neck\.fpn_convs\.4\.conv\.", "backbone.top_block.p7."),
    # object stream predictors
    (r"^bbox_head\.retina_cls\.", "head.cls_score."),
    (r"^bbox_head\.retina_reg\.", "head.bbox_pred."),
    (r"^bbox_head\.retina_rep\.", "head.rep_pred."),
    # pixel stream
    (r"^mask_head\.lateral_convs\.0\.0\.", "pixel_stream.p3_conv."),
    (r"^mask_head\.lateral_convs\.1\.0\.", "pixel_stream.p4_conv."),
    (r"^mask_head\.lateral_convs\.2\.0\.", "pixel_stream.p5_conv1."),
    (r"^mask_head\.lateral_convs\.2\.2\.", "pixel_stream.p5_conv2."),
    (r"^mask_head\.final_convs\.0\.0\.", "pixel_stream.fuse_conv."),
    (r"^mask_head\.conv_reps\.", "pixel_stream.out."),
    (r"^(pixel_stream\.\w+)\.conv\.", r"\1."),
    (r"^(pixel_stream\.\w+)\.gn\.", r"\1.norm."),
]
_TOWERS = {"cls": "cls_subnet", "reg": "bbox_subnet", "rep": "rep_subnet"}
_PREDICTORS = ("head.cls_score.", "head.bbox_pred.", "head.rep_pred.")


def _renumber_stage(match):
    # torchvision layer{L} is Detectron2's res{L+1}
    return f"backbone.bottom_up.res{int(match.group(1)) + 1}."


def mmdet_to_d2_key(key: str, target_keys=None):
    """Target name of an upstream key, `DROP`, or None for a key this converter does not know.

    ``target_keys`` (optional set): ``num_batches_tracked`` is kept only if the target has it.
    """
    if key.startswith("mbrm."):
        return DROP  # MBRM constants are built into `rdsnet.mbrm`
    m = re.match(r"^neck\.lateral_convs\.(\d)\.conv\.(weight|bias)$", key)
    if m:
        return f"backbone.fpn_lateral{int(m.group(1)) + 3}.{m.group(2)}"
    m = re.match(r"^neck\.fpn_convs\.([012])\.conv\.(weight|bias)$", key)
    if m:
        return f"backbone.fpn_output{int(m.group(1)) + 3}.{m.group(2)}"
    m = re.match(r"^bbox_head\.(cls|reg|rep)_convs\.(\d+)\.(conv|gn)\.(weight|bias)$", key)
    if m:
        idx = 3 * int(m.group(2)) + (0 if m.group(3) == "conv" else 1)
        return f"head.{_TOWERS[m.group(1)]}.{idx}.{m.group(4)}"
    if not re.match(r"^(backbone|neck|bbox_head|mask_head)\.", key):
        return None
    new = apply_rules(key, _RULES)
    if new == key:
        return None
    new = re.sub(r"^backbone\.bottom_up\.res(\d)\.", _renumber_stage, new)
    if new.endswith("num_batches_tracked") and (target_keys is None or new not in target_keys):
        return DROP
    if not re.match(r"^(backbone|head|pixel_stream)\.", new):
        return None
    return new


def permute_anchor_dim(tensor: torch.Tensor, num_ratios: int, num_sizes: int) -> torch.Tensor:
    """Reorder dim 0 of a predictor weight/bias from mmdet (a = r*S + s) to Detectron2 (s*R + r).

    ``tensor`` is (A*k, ...) with A = num_ratios * num_sizes.
    """
    a = num_ratios * num_sizes
    if tensor.shape[0] % a:
        raise ConversionError(
            f"predictor dim 0 ({tensor.shape[0]}) is not a multiple of {a} anchors"
        )
    k = tensor.shape[0] // a
    rest = tensor.shape[1:]
    out = tensor.reshape(num_ratios, num_sizes, k, *rest).transpose(0, 1)
    return out.reshape(a * k, *rest).contiguous()


def convert_rdsnet_state_dict(
    source: Mapping[str, torch.Tensor],
    target_shapes: Optional[Mapping[str, Tuple[int, ...]]] = None,
    permute_anchors: bool = False,
    num_ratios: int = 3,
    num_sizes: int = 3,
) -> "OrderedDict[str, torch.Tensor]":
    """Map an upstream ``{name: tensor}`` to this package's names (see module docstring).

    Args:
        target_shapes: ``{name: shape}`` of the target model; every target key must be filled.
        permute_anchors: True when the target uses Detectron2's size-major anchors.
    """
    target_keys = set(target_shapes) if target_shapes is not None else None

    def transform(src_key, dst_key, value):
        if permute_anchors and dst_key.startswith(_PREDICTORS):
            return permute_anchor_dim(value, num_ratios, num_sizes)
        return value

    return convert_state_dict(
        source, lambda k: mmdet_to_d2_key(k, target_keys), target_shapes, transform
    )


def convert_rdsnet_checkpoint(cfg, src: str, dst: str) -> Dict[str, int]:
    """Convert file ``src`` for the model of ``cfg`` and write ``dst`` (``{"model": ...}``).

    Builds the model on CPU to get the target shapes; permutes the anchor dimension when
    ``cfg.MODEL.ANCHOR_GENERATOR.NAME`` is Detectron2's size-major `DefaultAnchorGenerator`.

    Returns:
        counts: ``{"source": n, "converted": m}``.
    """
    from detectron2.modeling import build_model

    cfg = cfg.clone()
    cfg.defrost()
    cfg.MODEL.DEVICE = "cpu"
    model = build_model(cfg)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    source = load_upstream_state_dict(src)
    ratios = cfg.MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS[0]
    sizes = cfg.MODEL.ANCHOR_GENERATOR.SIZES[0]
    converted = convert_rdsnet_state_dict(
        source,
        shapes,
        permute_anchors=cfg.MODEL.ANCHOR_GENERATOR.NAME == "DefaultAnchorGenerator",
        num_ratios=len(ratios),
        num_sizes=len(sizes),
    )
    save_converted_checkpoint(converted, dst, author="wangsr126/RDSNet (mmdetection v1)")
    return {"source": len(source), "converted": len(converted)}
