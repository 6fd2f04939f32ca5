"""Per-iteration statistics and window reductions of Dynamic R-CNN (paper §3, Algorithm 1).

Pure tensor functions, no state. Conventions: IoU vectors are float tensors of shape (N,) with
values in [0, 1]; regression deltas are (N, 4) tensors ``(dx, dy, dw, dh)`` in the normalized
Box2BoxTransform encoding (weights (10, 10, 5, 5)).

Two statistic definitions exist:

* ``"mmdet"`` (MMDetection 2.x/3.x, the authors' MMDet v1.1 port): the IoU statistic is the
  ``min(K_I, N_i)``-th largest max-IoU of each image, averaged over images; the beta statistic is
  the ``min(K_beta * n, #pos)``-th smallest label magnitude over the sampled positives.
* ``"original"`` (authors' maskrcnn-benchmark code): the IoU statistic is the
  ``min(K_I * n, N)``-th largest value of all images' vectors pooled, where a proposal below the
  current threshold records its IoU with GT #0; the beta statistic is taken over all proposals
  (before sampling), negatives measured against GT #0.
"""
from typing import Optional, Sequence

import torch

__all__ = [
    "kth_largest",
    "kth_smallest",
    "iou_statistic_mmdet",
    "iou_statistic_original",
    "original_recorded_ious",
    "regression_label_magnitude",
    "beta_statistic",
    "window_median",
]


def kth_largest(values: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th largest entry (1-based) of a 1-D tensor; ``k`` is clamped to ``[1, len]``."""
    if values.numel() == 0:
        raise ValueError("kth_largest of an empty tensor")
    k = max(1, min(int(k), values.numel()))
    return torch.topk(values, k).values[-1]


def kth_smallest(values: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th smallest entry (1-based) of a 1-D tensor; ``k`` is clamped to ``[1, len]``."""
    if values.numel() == 0:
        raise ValueError("kth_smallest of an empty tensor")
    k = max(1, min(int(k), values.numel()))
    return torch.topk(values, k, largest=False).values[-1]


def iou_statistic_mmdet(max_ious: Sequence[torch.Tensor], k_i: int) -> Optional[torch.Tensor]:
    """IoU statistic I_k, "mmdet" definition.

    Args:
        max_ious: per image of the batch, shape (N_i,): max IoU of every proposal (RPN proposals
            and appended GT boxes, before sampling) over the image's GT boxes. An image without
            GT boxes has all-zero max IoUs (or no entries) and contributes 0 to the mean, as in
            MMDetection (its assigner gives such proposals max_overlaps 0).
        k_i: K_I.

    Returns:
        Scalar tensor ``mean_i kth_largest(max_ious[i], min(K_I, N_i))`` (0 for an image without
        entries), or None when the batch has no images.
    """
    if len(max_ious) == 0:
        return None
    per_image = [
        kth_largest(v, k_i).float() if v.numel() > 0 else torch.zeros((), device=v.device)
        for v in max_ious
    ]
    return torch.stack(per_image).float().mean()


def original_recorded_ious(
    iou_matrix: torch.Tensor, iou_threshold: float
) -> torch.Tensor:
    """The IoU the authors' code records for each proposal of one image.

    Args:
        iou_matrix: (G, N) IoU of G >= 1 GT boxes with N proposals.
        iou_threshold: T_now in force for this iteration.

    Returns:
        (N,) tensor: the max IoU for proposals with max IoU >= T_now (foreground), else the IoU
        with GT #0 (the unmatched index -1 is clamped to 0 in the original code).
    """
    max_iou, _ = iou_matrix.max(dim=0)
    return torch.where(max_iou >= iou_threshold, max_iou, iou_matrix[0])


def iou_statistic_original(
    recorded: Sequence[torch.Tensor], k_i: int
) -> Optional[torch.Tensor]:
    """IoU statistic I_k, "original" definition: the ``(K_I * n)``-th largest pooled value.

    Args:
        recorded: per image with GT boxes, (N_i,) values from `original_recorded_ious`.
        k_i: K_I; the rank is ``K_I * len(recorded)`` clamped to the pooled size (the original
            code does not clamp and would raise).

    Returns:
        Scalar tensor, or None when there are no entries.
    """
    recorded = [r for r in recorded if r.numel() > 0]
    if not recorded:
        return None
    return kth_largest(torch.cat(recorded), k_i * len(recorded)).float()


def regression_label_magnitude(deltas: torch.Tensor) -> torch.Tensor:
    """Per-RoI regression-label magnitude ``e = (|dx| + |dy|) / 2``.

    Args:
        deltas: (N, 4) regression targets ``(dx, dy, dw, dh)`` of proposals w.r.t. their GT box.

    Returns:
        (N,) tensor; the size terms dw, dh do not enter (as in every reference code base).
    """
    return (deltas[:, 0].abs() + deltas[:, 1].abs()) / 2


def beta_statistic(magnitudes: torch.Tensor, k: int) -> Optional[torch.Tensor]:
    """Beta statistic E_k: the ``min(k, N)``-th smallest label magnitude, None if N = 0.

    Args:
        magnitudes: (N,) from `regression_label_magnitude`.
        k: K_beta * number of images in the batch.

    Non-finite magnitudes (degenerate zero-size proposals) are left out.
    """
    magnitudes = magnitudes[torch.isfinite(magnitudes)]
    if magnitudes.numel() == 0:
        return None
    return kth_smallest(magnitudes, k).float()


def window_median(values: torch.Tensor, convention: str) -> torch.Tensor:
    """Median of the beta window S_E (1-D, non-empty).

    ``"numpy"``: ``np.median`` (mean of the two middle values for an even count; MMDet 2.x/3.x).
    ``"upper"``: ``sorted(S_E)[len // 2]`` (authors' code and MMDet v1.1 port).
    """
    if values.numel() == 0:
        raise ValueError("median of an empty window")
    ordered, _ = torch.sort(values)
    n = ordered.numel()
    if convention == "upper":
        return ordered[n // 2]
    if convention == "numpy":
        if n % 2 == 1:
            return ordered[n // 2]
        return (ordered[n // 2 - 1] + ordered[n // 2]) / 2
    raise ValueError(f"MODEL.DYNAMIC_RCNN.MEDIAN must be 'numpy' or 'upper', got {convention!r}")
