"""Class-wise NMS of which only the ``k`` highest-scoring survivors are wanted.

Detectors keep at most ``k`` detections per image (``TEST.DETECTIONS_PER_IMAGE``) after a
class-wise NMS over every (box, class) candidate. Greedy NMS decides the fate of a candidate
from higher-scoring candidates only, so the survivors among the ``m`` best-scoring candidates
are the same whether NMS sees those ``m`` or all of them. `batched_nms_topk` therefore runs
class-wise NMS on a growing score prefix (``first``, then 4x larger, ...) until the
prefix yields ``k`` survivors (or holds every candidate), and returns the first ``k``: the
first ``k`` indices of ``batched_nms(boxes, scores, idxs, iou_threshold)`` over all candidates.

A prefix always holds every candidate whose score ties with its lowest score, in input order,
so a prefix never splits a group of equal scores and exact ties are decided as in the full
run. The prefix is suppressed class by class with torchvision's `nms`, which is what
`batched_nms` does on CPU for more than 1000 boxes (its other strategy, shifting each class by
a large coordinate offset, can round an IoU near the threshold differently: on every input
where the full run suppresses class by class, the result here is identical). The cost drops
from NMS over all candidates (RDSNet at score threshold 0: 80 classes times 1000 anchors per
level) to NMS over a few times ``k`` boxes. While tracing (export) the single full call is
used: the loop's length depends on the data.
"""
import torch
from detectron2.layers import batched_nms
from torchvision.ops import nms

__all__ = ["batched_nms_topk"]


def batched_nms_topk(
    boxes: torch.Tensor,
    scores: torch.Tensor,
    idxs: torch.Tensor,
    iou_threshold: float,
    k: int,
    first: int = 0,
) -> torch.Tensor:
    """First ``k`` indices (by decreasing score) that class-wise NMS keeps.

    Args:
        boxes: (N, 4) XYXY boxes; scores: (N,); idxs: (N,) class of each box.
        k: number of survivors wanted (``k >= 1``).
        first: size of the first score prefix (default ``4 * k``, at least 256).
    Returns:
        int64 indices into the N candidates, at most ``k``.
    """
    if k < 1:
        raise ValueError(f"batched_nms_topk: k must be at least 1, got {k}")
    n = scores.shape[0]
    size = first if first > 0 else max(4 * k, 256)
    if torch.jit.is_tracing() or torch.jit.is_scripting() or n <= size:
        return batched_nms(boxes, scores, idxs, iou_threshold)[:k]
    while size < n:
        cutoff = scores.topk(size, sorted=False).values.min()
        prefix = torch.nonzero(scores >= cutoff).squeeze(1)  # ties at the cut-off included
        keep = _nms_class_by_class(boxes[prefix], scores[prefix], idxs[prefix], iou_threshold)
        if keep.numel() >= k or prefix.numel() >= n:
            return prefix[keep[:k]]
        size *= 4
    return batched_nms(boxes, scores, idxs, iou_threshold)[:k]


def _nms_class_by_class(boxes, scores, idxs, iou_threshold: float) -> torch.Tensor:
    """Kept indices of NMS run separately per class, sorted by decreasing score (the
    class-by-class strategy of torchvision's `batched_nms`)."""
    kept = torch.zeros_like(scores, dtype=torch.bool)
    boxes = boxes.float()
    for c in torch.unique(idxs):
        members = torch.nonzero(idxs == c).squeeze(1)
        kept[members[nms(boxes[members], scores[members], iou_threshold)]] = True
    keep = torch.nonzero(kept).squeeze(1)
    return keep[scores[keep].sort(descending=True).indices]
