"""Training targets of RDSNet: anchor valid flags, GT boxes and masks."""
import math
from typing import Sequence, Tuple

import torch
from detectron2.structures import BitMasks, Instances, PolygonMasks

__all__ = ["pad_shape", "anchor_valid_flags", "gt_bitmasks_at_pad_shape", "to_inclusive"]


def pad_shape(image_size: Tuple[int, int], divisor: int) -> Tuple[int, int]:
    """(h, w) of the image -> (ceil(h / divisor) * divisor, ceil(w / divisor) * divisor)."""
    h, w = image_size
    if isinstance(h, torch.Tensor):  # sizes traced as tensors (export): integer arithmetic
        return (h + divisor - 1) // divisor * divisor, (w + divisor - 1) // divisor * divisor
    return int(math.ceil(h / divisor) * divisor), int(math.ceil(w / divisor) * divisor)


def anchor_valid_flags(
    grid_sizes: Sequence[Tuple[int, int]],
    strides: Sequence[int],
    num_anchors: Sequence[int],
    padded_size: Tuple[int, int],
    device,
) -> torch.Tensor:
    """Anchors whose location lies inside this image's own pad shape (mmdet ``valid_flags``).

    A location (i, j) of a level with stride s is valid iff i < ceil(pad_h / s) and
    j < ceil(pad_w / s); anchors in the batch-collation padding get weight 0.

    Returns:
        (R,) bool over all levels, in the (level, y, x, anchor) order of the flattened outputs.
    """
    flags = []
    for (gh, gw), s, a in zip(grid_sizes, strides, num_anchors):
        vh, vw = min(gh, math.ceil(padded_size[0] / s)), min(gw, math.ceil(padded_size[1] / s))
        valid = torch.zeros((gh, gw), dtype=torch.bool, device=device)
        valid[:vh, :vw] = True
        flags.append(valid[:, :, None].expand(gh, gw, a).reshape(-1))
    return torch.cat(flags)


def to_inclusive(boxes: torch.Tensor) -> torch.Tensor:
    """Detectron2 continuous (x1, y1, x2, y2) -> mmdet inclusive pixel indices (x2 - 1, y2 - 1)."""
    return torch.cat([boxes[:, :2], boxes[:, 2:] - 1.0], dim=1)


def gt_bitmasks_at_pad_shape(
    instances: Instances, padded_size: Tuple[int, int], device
) -> torch.Tensor:
    """GT masks of one image rasterised at its resized size and zero-padded to its pad shape.

    Accepts `PolygonMasks` or `BitMasks` in ``instances.gt_masks``.

    Returns:
        (G, pad_h, pad_w) bool.
    """
    if not instances.has("gt_masks"):
        raise ValueError(
            "RDSNet with MODEL.MASK_ON=True needs 'gt_masks' in the training instances "
            "(a dataset with segmentation annotations)"
        )
    h, w = instances.image_size
    masks = instances.gt_masks
    if isinstance(masks, PolygonMasks):
        masks = BitMasks.from_polygon_masks(masks, h, w).tensor
    elif isinstance(masks, BitMasks):
        masks = masks.tensor
    else:
        masks = torch.as_tensor(masks)
    masks = masks.to(device=device, dtype=torch.bool)
    if masks.shape[0] == 0:
        return masks.new_zeros((0,) + tuple(padded_size))
    out = masks.new_zeros((masks.shape[0],) + tuple(padded_size))
    out[:, : masks.shape[1], : masks.shape[2]] = masks
    return out

