"""Soft-NMS post-processing of the multi-scale Decoupled R-CNN rows.

mmdet's ``multiclass_nms`` with ``nms=dict(type='soft_nms', iou_threshold=0.5, min_score=1e-3)``
on class-agnostic boxes: every (box, class) pair with score > ``score_thresh`` is a candidate,
per-class linear soft-NMS (`projects_common.soft_nms`), then the top ``topk`` by score.
"""
from typing import Tuple

import torch
from detectron2.structures import Boxes, Instances

from projects_common.soft_nms import batched_soft_nms

__all__ = ["soft_nms_inference"]


def soft_nms_inference(
    boxes: torch.Tensor,
    scores: torch.Tensor,
    image_shape: Tuple[int, int],
    score_thresh: float,
    iou_threshold: float,
    topk: int,
    min_score: float = 1e-3,
    split_thresh: int = 10000,
) -> Instances:
    """Single-image detections with per-class linear soft-NMS.

    Args:
        boxes: (R, 4) class-agnostic boxes (absolute x1y1x2y2), or (R, 4K) class-specific.
        scores: (R, K+1) probabilities, background last.
        image_shape: (h, w); boxes are clipped to it.
        score_thresh: candidates need score > this (strict, as mmdet).
        iou_threshold: linear decay ``1 - IoU`` applies when IoU >= this.
        topk: detections kept per image (< 0: all).
        min_score: soft-NMS discards detections whose decayed score is below this.
        split_thresh: mmcv 1.1.2 ``batched_nms`` quirk: with >= ``split_thresh`` candidates it
            runs class by class and returns the *original* scores, ranked by them (soft-NMS then
            only removes the detections decayed below ``min_score``). 0 disables the quirk.

    Returns:
        ``Instances`` with ``pred_boxes`` (Boxes), ``scores`` (decayed, or original under the
        quirk) and ``pred_classes``, sorted by score, at most ``topk``.
    """
    valid = torch.isfinite(boxes).all(dim=1) & torch.isfinite(scores).all(dim=1)
    if torch.jit.is_tracing() or not valid.all():  # a trace must not freeze the branch
        boxes, scores = boxes[valid], scores[valid]
    scores = scores[:, :-1]
    num_reg = boxes.shape[1] // 4
    clipped = Boxes(boxes.reshape(-1, 4))
    clipped.clip(image_shape)
    boxes = clipped.tensor.view(-1, num_reg, 4)

    filter_mask = scores > score_thresh
    filter_inds = filter_mask.nonzero()  # (N, 2): proposal, class, row-major
    cand_boxes = boxes[filter_inds[:, 0], 0] if num_reg == 1 else boxes[filter_mask]
    cand_scores = scores[filter_mask]
    keep, new_scores = batched_soft_nms(
        cand_boxes, cand_scores, filter_inds[:, 1], iou_threshold, min_score, "linear"
    )
    if split_thresh > 0 and torch.jit.is_tracing():
        # the quirk's condition depends on the data: a trace keeps it as a tensor (re-sorting
        # the already sorted decayed scores is a no-op when the quirk does not apply)
        quirk = torch.as_tensor(cand_scores.shape[0]) >= split_thresh
        new_scores = torch.where(quirk, cand_scores[keep], new_scores)
        order = torch.sort(new_scores, descending=True, stable=True).indices
        keep, new_scores = keep[order], new_scores[order]
    elif split_thresh > 0 and cand_scores.numel() >= split_thresh:
        new_scores = cand_scores[keep]
        order = torch.sort(new_scores, descending=True, stable=True).indices
        keep, new_scores = keep[order], new_scores[order]
    if topk >= 0:
        keep, new_scores = keep[:topk], new_scores[:topk]
    result = Instances(image_shape)
    result.pred_boxes = Boxes(cand_boxes[keep])
    result.scores = new_scores
    result.pred_classes = filter_inds[keep, 1]
    return result
