"""Per-stage box coders of Decoupled R-CNN.

Each regression stage encodes its targets with mmdet's ``DeltaXYWHBBoxCoder`` (means 0,
stds s); in Detectron2 terms this is ``Box2BoxTransform(weights=1/s)``. mmdet clamps the
de-normalised log-size deltas on *both* sides to ``|dw|, |dh| <= log(1000/16)``; Detectron2's
`Box2BoxTransform.apply_deltas` clamps only from above, so `apply_deltas_clamped` adds the
lower clamp. Boxes are absolute (x1, y1, x2, y2).
"""
from typing import List, Sequence, Tuple

import torch
from detectron2.modeling.box_regression import Box2BoxTransform
from detectron2.structures import Boxes

__all__ = ["weights_from_stds", "build_stage_transforms", "apply_deltas_clamped",
           "decode_and_clip"]


def weights_from_stds(stds: Sequence[float]) -> Tuple[float, float, float, float]:
    """Box-coder weights of target stds: their exact reciprocals, e.g. 0.033 -> 30.3030..."""
    if len(stds) != 4 or any(not s > 0 for s in stds):
        raise ValueError(f"target stds must be 4 positive numbers, got {list(stds)}")
    return tuple(1.0 / float(s) for s in stds)


def build_stage_transforms(stage_stds: Sequence[Sequence[float]]) -> List[Box2BoxTransform]:
    """One `Box2BoxTransform` per regression stage (default scale clamp log(1000/16))."""
    return [Box2BoxTransform(weights=weights_from_stds(s)) for s in stage_stds]


def apply_deltas_clamped(
    transform: Box2BoxTransform, deltas: torch.Tensor, boxes: torch.Tensor
) -> torch.Tensor:
    """`transform.apply_deltas` with the log-size deltas also clamped from below.

    Args:
        deltas: (R, k*4) raw network outputs (dx, dy, dw, dh) per box.
        boxes: (R, 4) source boxes.
    Returns:
        (R, k*4) decoded boxes; |dw / ww|, |dh / wh| <= ``transform.scale_clamp``.
    """
    deltas = deltas.float().clone()
    ww, wh = transform.weights[2], transform.weights[3]
    deltas[:, 2::4] = deltas[:, 2::4].clamp(min=-transform.scale_clamp * ww)
    deltas[:, 3::4] = deltas[:, 3::4].clamp(min=-transform.scale_clamp * wh)
    return transform.apply_deltas(deltas, boxes)


def decode_and_clip(
    transform: Box2BoxTransform,
    deltas: torch.Tensor,
    boxes: Sequence[torch.Tensor],
    image_sizes: Sequence[Tuple[int, int]],
) -> List[torch.Tensor]:
    """Decode one 4-vector per box and clip each image's boxes to its (h, w).

    Args:
        deltas: (sum R_i, 4) deltas for the concatenated boxes of all images.
        boxes: per image, (R_i, 4) source boxes.
        image_sizes: per image, (height, width) of the (resized) input image.
    Returns:
        per image, (R_i, 4) decoded, clipped boxes.
    """
    counts = [len(b) for b in boxes]
    if sum(counts) == 0:
        return [b.new_zeros((0, 4)).float() for b in boxes]
    decoded = apply_deltas_clamped(transform, deltas, torch.cat(list(boxes)))
    out = []
    for b, size in zip(decoded.split(counts), image_sizes):
        b = Boxes(b)
        b.clip(size)
        out.append(b.tensor)
    return out
