"""Soft-NMS (Bodla et al., "Soft-NMS -- Improving Object Detection With One Line of Code",
ICCV 2017) written in PyTorch; Detectron2 has none.

Semantics follow mmcv 1.1.2 ``soft_nms`` (the reference for the mmdetection-based methods of
this project), with boxes in absolute ``(x1, y1, x2, y2)`` format and IoU computed without
the legacy "+1" (area = (x2 - x1) * (y2 - y1)):

* repeatedly pick the remaining box with the highest *current* score (ties: the lowest input
  index); its current score is final;
* decay every other remaining box of the same class by
  ``linear``: ``1 - IoU`` if ``IoU >= iou_threshold`` (``>=``, as mmcv), else unchanged;
  ``gaussian``: ``exp(-IoU^2 / sigma)`` for every box; ``naive``: ``0`` if ``IoU >= iou_threshold``
  (hard NMS expressed as a decay);
* a box whose decayed score falls below ``min_score`` is discarded at once (it is never picked
  and decays nothing).

The output is ordered by the decayed score (descending), as mmcv returns it.

Classes are independent (`batched_soft_nms`); all classes are processed together, one pick
per class and iteration, so the Python loop runs at most ``max_c(#boxes of class c)`` times
rather than ``#boxes`` times. Memory is O(C * M) for C classes of at most M boxes; finished
classes and discarded boxes are packed away whenever they fill half of the working grid.
"""
from typing import List, Tuple

import torch

__all__ = ["soft_nms", "batched_soft_nms", "SOFT_NMS_METHODS"]

SOFT_NMS_METHODS = ("linear", "gaussian", "naive")


def _check_args(boxes, scores, method, iou_threshold, sigma):
    if method not in SOFT_NMS_METHODS:
        raise ValueError(f"soft-NMS method {method!r} is not one of {SOFT_NMS_METHODS}")
    if boxes.dim() != 2 or boxes.shape[1] != 4:
        raise ValueError(f"soft-NMS expects boxes of shape (N, 4), got {tuple(boxes.shape)}")
    if scores.shape != boxes.shape[:1]:
        raise ValueError(
            f"soft-NMS expects scores of shape ({boxes.shape[0]},), got {tuple(scores.shape)}"
        )
    if method == "gaussian" and not sigma > 0:
        raise ValueError(f"gaussian soft-NMS needs sigma > 0, got {sigma}")
    if method != "gaussian" and not 0.0 <= iou_threshold <= 1.0:
        raise ValueError(f"soft-NMS iou_threshold must lie in [0, 1], got {iou_threshold}")


def _iou_one_to_many(box: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """IoU of ``box`` (C, 4) with ``boxes`` (C, M, 4) per row -> (C, M); 0 for empty unions."""
    x1 = torch.maximum(box[:, None, 0], boxes[..., 0])
    y1 = torch.maximum(box[:, None, 1], boxes[..., 1])
    x2 = torch.minimum(box[:, None, 2], boxes[..., 2])
    y2 = torch.minimum(box[:, None, 3], boxes[..., 3])
    inter = (x2 - x1).clamp(min=0) * (y2 - y1).clamp(min=0)
    area = (box[:, 2] - box[:, 0]) * (box[:, 3] - box[:, 1])
    areas = (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])
    union = area[:, None] + areas - inter
    return torch.where(union > 0, inter / union.clamp(min=1e-12), torch.zeros_like(inter))


@torch.no_grad()
def batched_soft_nms(
    boxes: torch.Tensor,
    scores: torch.Tensor,
    idxs: torch.Tensor,
    iou_threshold: float = 0.5,
    min_score: float = 1e-3,
    method: str = "linear",
    sigma: float = 0.5,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Soft-NMS applied independently to each group (class) given by ``idxs``.

    Args:
        boxes: (N, 4) float boxes, absolute (x1, y1, x2, y2).
        scores: (N,) scores.
        idxs: (N,) integer group (class) id of each box; boxes of different groups never
            decay each other.
        iou_threshold: IoU from which ``linear`` / ``naive`` decay (inclusive).
        min_score: boxes whose decayed score is below this are discarded.
        method: "linear" (default), "gaussian" or "naive".
        sigma: gaussian width (``exp(-IoU^2 / sigma)``); unused otherwise.

    Returns:
        keep: (K,) int64 indices into the inputs of the surviving boxes, sorted by decayed
            score, descending (ties: lower input index first).
        new_scores: (K,) their decayed scores.
    """
    _check_args(boxes, scores, method, iou_threshold, sigma)
    if idxs.shape != scores.shape:
        raise ValueError(f"idxs must have shape {tuple(scores.shape)}, got {tuple(idxs.shape)}")
    if torch.jit.is_tracing():
        # A trace would unroll the data-dependent loop below for the traced input only: call
        # it as a TorchScript function instead, which the trace keeps as one (looping) call.
        return _scripted_soft_nms_grid()(
            boxes, scores, idxs, float(iou_threshold), float(min_score), method, float(sigma)
        )
    return _soft_nms_grid(boxes, scores, idxs, iou_threshold, min_score, method, sigma)


def _soft_nms_grid(
    boxes: torch.Tensor,
    scores: torch.Tensor,
    idxs: torch.Tensor,
    iou_threshold: float,
    min_score: float,
    method: str,
    sigma: float,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The algorithm of `batched_soft_nms` on checked arguments (TorchScript-compatible)."""
    device = boxes.device
    n = boxes.shape[0]
    if n == 0:
        return torch.zeros(0, dtype=torch.int64, device=device), scores.new_zeros(0)

    # Work in the scores' precision (float32 at least).
    dtype = torch.float64 if scores.dtype == torch.float64 else torch.float32
    boxes = boxes.to(dtype)
    # Group the boxes into a padded (C, M) layout: row = group, column = rank inside the group
    # (by input index, so that ties in the argmax below go to the lowest input index).
    groups, group_of = torch.unique(idxs, return_inverse=True)
    num_groups = groups.numel()
    order = torch.argsort(group_of * n + torch.arange(n, device=device))  # stable by input index
    counts = torch.bincount(group_of, minlength=num_groups)
    starts = torch.cumsum(counts, 0) - counts
    col = torch.arange(n, device=device) - starts[group_of[order]]
    row = group_of[order]
    m = int(counts.max().item())

    cur = torch.full((num_groups, m), float("-inf"), dtype=dtype, device=device)
    cur[row, col] = scores[order].to(dtype)
    grid_boxes = boxes.new_zeros((num_groups, m, 4))
    grid_boxes[row, col] = boxes[order]
    grid_index = torch.full((num_groups, m), -1, dtype=torch.int64, device=device)
    grid_index[row, col] = order
    # Scores already below min_score never survive (mmcv drops them on the first visit).
    alive = cur >= min_score
    cur = torch.where(alive, cur, torch.full_like(cur, float("-inf")))

    picked_index: List[torch.Tensor] = []
    picked_score: List[torch.Tensor] = []
    while True:
        num_alive = int(alive.sum().item())
        if num_alive == 0:
            break
        if 2 * num_alive < alive.numel():
            # Re-pack: drop finished groups and dead columns (keeping the input-index order of
            # the live boxes, so that ties still go to the lowest index).
            rows = alive.any(dim=1)
            alive, cur = alive[rows], cur[rows]
            grid_boxes, grid_index = grid_boxes[rows], grid_index[rows]
            perm = torch.sort((~alive).to(torch.int8), dim=1, stable=True).indices
            width = int(alive.sum(dim=1).max().item())
            perm = perm[:, :width]
            alive = torch.gather(alive, 1, perm)
            cur = torch.gather(cur, 1, perm)
            grid_index = torch.gather(grid_index, 1, perm)
            grid_boxes = torch.gather(grid_boxes, 1, perm.unsqueeze(2).expand(-1, -1, 4))
        rows_idx = torch.arange(alive.shape[0], device=device)
        best_score, best = cur.max(dim=1)  # first maximum = lowest input index among ties
        has = alive[rows_idx, best]
        picked_index.append(grid_index[rows_idx, best][has])
        picked_score.append(best_score[has])
        alive[rows_idx, best] = torch.zeros_like(has)
        cur[rows_idx, best] = torch.full_like(best_score, float("-inf"))

        iou = _iou_one_to_many(grid_boxes[rows_idx, best], grid_boxes)
        if method == "linear":
            weight = torch.where(iou >= iou_threshold, 1.0 - iou, torch.ones_like(iou))
        elif method == "gaussian":
            weight = torch.exp(-(iou * iou) / sigma)
        else:  # naive
            weight = torch.where(iou >= iou_threshold, torch.zeros_like(iou), torch.ones_like(iou))
        weight = torch.where(has.unsqueeze(1), weight, torch.ones_like(weight))
        decayed = cur * weight
        alive = alive & (decayed >= min_score)
        cur = torch.where(alive, decayed, torch.full_like(cur, float("-inf")))

    if len(picked_index) == 0:
        return torch.zeros(0, dtype=torch.int64, device=device), scores.new_zeros(0)
    keep = torch.cat(picked_index)
    new_scores = torch.cat(picked_score)
    # Sort by decayed score (descending), ties by input index: two stable sorts.
    by_index = torch.argsort(keep)
    keep, new_scores = keep[by_index], new_scores[by_index]
    by_score = torch.sort(new_scores, dim=0, descending=True, stable=True).indices
    return keep[by_score], new_scores[by_score].to(scores.dtype)


_SCRIPTED = []


def _scripted_soft_nms_grid():
    """`_soft_nms_grid` compiled with TorchScript (once, on first use)."""
    if not _SCRIPTED:
        _SCRIPTED.append(torch.jit.script(_soft_nms_grid))
    return _SCRIPTED[0]


def soft_nms(
    boxes: torch.Tensor,
    scores: torch.Tensor,
    iou_threshold: float = 0.5,
    min_score: float = 1e-3,
    method: str = "linear",
    sigma: float = 0.5,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Soft-NMS over one group of boxes; see `batched_soft_nms` for arguments and outputs."""
    idxs = torch.zeros(scores.shape, dtype=torch.int64, device=scores.device)
    return batched_soft_nms(boxes, scores, idxs, iou_threshold, min_score, method, sigma)
