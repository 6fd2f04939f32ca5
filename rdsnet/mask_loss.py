"""Mask loss of RDSNet with per-instance hard-negative mining."""
import torch
import torch.nn.functional as F

__all__ = ["downsample_gt_masks", "instance_mask_losses"]


def downsample_gt_masks(masks: torch.Tensor) -> torch.Tensor:
    """GT masks at pad_shape -> stride-4 targets.

    Bilinear x0.25 (``align_corners=False``), then strictly > 0.5: output pixel (i, j) averages
    the 2 x 2 block {4i+1, 4i+2} x {4j+1, 4j+2}, so it is foreground iff >= 3 of those are.

    Args:
        masks: (n, H, W) bool/float, H and W multiples of 4.

    Returns:
        (n, H/4, W/4) bool.
    """
    if masks.shape[0] == 0:
        return masks.new_zeros((0, masks.shape[1] // 4, masks.shape[2] // 4), dtype=torch.bool)
    small = F.interpolate(
        masks[:, None].float(), scale_factor=0.25, mode="bilinear", align_corners=False
    )
    return small[:, 0] > 0.5


def instance_mask_losses(
    logits: torch.Tensor, targets: torch.Tensor, pos_neg_ratio: float
) -> torch.Tensor:
    """Per-instance normalised 2-class cross-entropy with hard-negative mining.

    Per instance: CE per pixel (target -1 = outside the crop, ignored, CE 0); keep all positives
    and the negatives ranked among the first ``min(ratio * n_pos, h*w - 1)`` pixels when *all*
    pixels are sorted by decreasing negative CE, positives and ignored pixels counting as zero-loss
    negatives (``ratio <= 0``: keep all negatives); L_n = sum of kept CE / (number of kept
    pixels + 1). This is the authors' ranking: when the CE of negatives saturates to 0, positives
    and ignored pixels take ranks among the zero-loss negatives (ties in row-major pixel order, a
    stable sort) and fewer negatives enter the denominator. An instance without positive pixels
    contributes 0 when mining is on.

    Args:
        logits: (n, 2, h, w) mask logits (channel 1 = foreground).
        targets: (n, h, w) int64 in {-1, 0, 1}.
        pos_neg_ratio: negatives kept per positive.

    Returns:
        (n,) losses L_n; the caller sums them and divides by (#instances + 1).
    """
    n = logits.shape[0]
    ce = F.cross_entropy(logits, targets, ignore_index=-1, reduction="none").flatten(1)
    targets = targets.flatten(1)
    pos, neg = targets == 1, targets == 0
    if pos_neg_ratio > 0:
        num_neg = torch.clamp(pos.sum(dim=1).to(ce.dtype) * pos_neg_ratio, max=targets.shape[1] - 1)
        neg_ce = torch.where(neg, ce.detach(), torch.zeros_like(ce))
        order = neg_ce.sort(dim=1, descending=True, stable=True).indices
        rank = torch.empty_like(order)
        rank.scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand(n, -1))
        keep_neg = neg & (rank < num_neg[:, None])
    else:
        keep_neg = neg
    kept = pos | keep_neg
    return (ce * kept).sum(dim=1) / (kept.sum(dim=1).to(ce.dtype) + 1.0)
