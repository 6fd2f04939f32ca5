"""Progressive constraint (PC) losses of TSD (paper Eq. 7, 8).

The sibling side is always detached: the PC only pushes the TSD branch to beat the sibling
head by a margin, clipped so that the target never exceeds 1. Reduction (authors' code): a plain
mean over the concatenation of per-image vectors, where every image without positive RoIs
contributes one 0 entry (and no gradient).
"""
from typing import Sequence

import torch
import torch.nn.functional as F

from .geometry import aligned_iou

__all__ = ["pc_cls_loss", "pc_loc_loss"]


def _image_index(num_rois_per_image: Sequence[int], device) -> torch.Tensor:
    counts = torch.as_tensor(list(num_rois_per_image), device=device, dtype=torch.int64)
    return torch.repeat_interleave(torch.arange(len(counts), device=device), counts)


def _images_with_fg(fg: torch.Tensor, image_idx: torch.Tensor, num_images: int) -> torch.Tensor:
    """(num_images,) bool: image has at least one positive RoI."""
    has = torch.zeros(num_images, dtype=torch.bool, device=fg.device)
    if fg.numel():
        has[image_idx[fg]] = True
    return has


def pc_cls_loss(
    sibling_logits: torch.Tensor,
    tsd_logits: torch.Tensor,
    gt_classes: torch.Tensor,
    num_rois_per_image: Sequence[int],
    margin: float = 0.3,
) -> torch.Tensor:
    """Classification PC  M_cls = max(0, p + min(1 - p, m_c) - q)  (paper Eq. 7).

    Applied to ALL sampled RoIs (positives and negatives, y = assigned label incl. background)
    of every image that has at least one positive.

    Args:
        sibling_logits: (R, K+1) sibling head logits (detached here).
        tsd_logits: (R, K+1) TSD logits.
        gt_classes: (R,) int64 labels in [0, K], K = background (Detectron2 convention).
        num_rois_per_image: RoI count of each image (sums to R; order of the rows).
        margin: m_c.

    Returns:
        scalar loss.
    """
    num_classes = tsd_logits.shape[1] - 1
    image_idx = _image_index(num_rois_per_image, tsd_logits.device)
    fg = gt_classes < num_classes
    has_fg = _images_with_fg(fg, image_idx, len(num_rois_per_image))
    active = has_fg[image_idx]
    denom = int(active.sum()) + int((~has_fg).sum())
    if denom == 0 or tsd_logits.shape[0] == 0:
        return tsd_logits.sum() * 0.0
    p = F.softmax(sibling_logits.detach(), dim=1).gather(1, gt_classes[:, None])[:, 0]
    q = F.softmax(tsd_logits, dim=1).gather(1, gt_classes[:, None])[:, 0]
    m = torch.clamp(1.0 - p, max=margin)
    per_roi = F.relu(p + m - q)
    return (per_roi * active.to(per_roi.dtype)).sum() / denom


def pc_loc_loss(
    sibling_boxes: torch.Tensor,
    tsd_boxes: torch.Tensor,
    gt_boxes: torch.Tensor,
    fg: torch.Tensor,
    num_rois_per_image: Sequence[int],
    margin: float = 0.3,
    legacy: bool = True,
) -> torch.Tensor:
    """Localisation PC  M_loc = max(0, u + min(1 - u, m_r) - v)  on positives (paper Eq. 8).

    Args:
        sibling_boxes: (R, 4) sibling boxes decoded from P for the gt class (detached here).
        tsd_boxes: (R, 4) TSD boxes decoded from P̂_r for the gt class.
        gt_boxes: (R, 4) matched ground truth.
        fg: (R,) bool, positive RoIs (only their rows are used).
        num_rois_per_image: RoI count of each image.
        margin: m_r.
        legacy: "+1" IoU convention.

    Returns:
        scalar loss.
    """
    image_idx = _image_index(num_rois_per_image, tsd_boxes.device)
    has_fg = _images_with_fg(fg, image_idx, len(num_rois_per_image))
    denom = int(fg.sum()) + int((~has_fg).sum())
    if denom == 0 or not bool(fg.any()):
        return tsd_boxes.sum() * 0.0
    u = aligned_iou(sibling_boxes[fg].detach(), gt_boxes[fg], legacy).detach()
    v = aligned_iou(tsd_boxes[fg], gt_boxes[fg], legacy)
    m = torch.clamp(1.0 - u, max=margin)
    return F.relu(u + m - v).sum() / denom
