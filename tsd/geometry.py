"""Box geometry of TSD: the translated regression proposal P̂_r and the IoU of the PC loss."""
import torch

__all__ = ["translate_boxes", "aligned_iou"]


def translate_boxes(
    boxes: torch.Tensor, delta_r: torch.Tensor, gamma: float = 0.1, legacy: bool = True
) -> torch.Tensor:
    """Proposal-wise translation P̂_r = P + γ·ΔR·(w, h) (paper Eq. 3, 4; spec §2.4).

    Width and height are unchanged. Differentiable w.r.t. ``delta_r`` (the TSD regression
    targets and decoded boxes depend on it, spec §4); ``boxes`` carry no gradient.

    Args:
        boxes: (R, 4) XYXY proposals P in image pixels.
        delta_r: (R, 2) raw ΔR = (dx, dy) from the offset generator.
        legacy: "+1" widths ``w = x2 - x1 + 1`` (authors' code) instead of ``x2 - x1``.

    Returns:
        (R, 4) XYXY boxes P̂_r.
    """
    boxes = boxes.detach()
    extra = 1.0 if legacy else 0.0
    wh = torch.stack(
        [boxes[:, 2] - boxes[:, 0] + extra, boxes[:, 3] - boxes[:, 1] + extra], dim=1
    )
    shift = gamma * delta_r.to(boxes.dtype) * wh  # (R, 2)
    return boxes + torch.cat([shift, shift], dim=1)


def aligned_iou(a: torch.Tensor, b: torch.Tensor, legacy: bool = True) -> torch.Tensor:
    """Element-wise IoU of two aligned box sets (spec §5.3), differentiable.

    Args:
        a, b: (R, 4) XYXY.
        legacy: mmdet "+1" convention: areas (x2-x1+1)(y2-y1+1), intersection side
            ``max(0, min(x2) - max(x1) + 1)``, union clamped to >= 1. Otherwise continuous
            areas and a union clamped to >= 1e-6.

    Returns:
        (R,) IoU values.
    """
    extra = 1.0 if legacy else 0.0
    area_a = (a[:, 2] - a[:, 0] + extra) * (a[:, 3] - a[:, 1] + extra)
    area_b = (b[:, 2] - b[:, 0] + extra) * (b[:, 3] - b[:, 1] + extra)
    lt = torch.max(a[:, :2], b[:, :2])
    rb = torch.min(a[:, 2:], b[:, 2:])
    wh = (rb - lt + extra).clamp(min=0)
    inter = wh[:, 0] * wh[:, 1]
    union = (area_a + area_b - inter).clamp(min=1.0 if legacy else 1e-6)
    return inter / union
