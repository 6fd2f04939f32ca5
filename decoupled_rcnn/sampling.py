"""Regression-branch sampling of Decoupled R-CNN.

The classification branch uses Detectron2's own matching and `subsample_labels`
(`ROIHeads.label_and_sample_proposals`: 512 RoIs, 25 % positives, GT appended). The regression
branch uses the authors' positive-first sampler (`PositiveSampler`): every positive up to the
budget, topped up with random negatives, no GT boxes added.
"""
from typing import List, Tuple

import torch
from detectron2.modeling.matcher import Matcher
from detectron2.structures import Boxes, Instances, pairwise_iou

__all__ = ["positive_first_sample", "label_and_sample_regression_proposals"]


def positive_first_sample(
    labels: torch.Tensor, num_samples: int, bg_label: int
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Positive-first sampling (mmdet ``PositiveSampler`` of the authors' code).

    Args:
        labels: (N,) per-proposal labels: [0, bg_label) positive, ``bg_label`` negative, other
            values (e.g. -1 "ignore") are never sampled.
        num_samples: total budget per image (512).
        bg_label: the background label (= number of foreground classes).

    Returns:
        pos_idx, neg_idx: sorted int64 indices into ``labels``. ``pos_idx`` holds all positives
        if there are at most ``num_samples``, else a uniform random subset of ``num_samples``;
        ``neg_idx`` holds ``num_samples - len(pos_idx)`` random negatives (all if fewer exist).
    """
    pos = torch.nonzero((labels >= 0) & (labels < bg_label)).squeeze(1)
    neg = torch.nonzero(labels == bg_label).squeeze(1)
    if pos.numel() > num_samples:
        pos = pos[torch.randperm(pos.numel(), device=pos.device)[:num_samples]]
    num_neg = num_samples - pos.numel()
    if neg.numel() > num_neg:
        neg = neg[torch.randperm(neg.numel(), device=neg.device)[:num_neg]]
    return pos.sort().values, neg.sort().values


@torch.no_grad()
def label_and_sample_regression_proposals(
    proposals: List[Instances],
    targets: List[Instances],
    matcher: Matcher,
    num_samples: int,
    num_classes: int,
) -> List[Instances]:
    """Match proposals with the GT and draw the positive-first regression sample per image.

    Args:
        proposals: per image, ``Instances`` with ``proposal_boxes`` (R_i boxes, absolute
            x1y1x2y2). GT boxes are *not* added.
        targets: per image, ``Instances`` with ``gt_boxes`` and ``gt_classes``.
        matcher: IoU matcher (IoU >= threshold -> positive, else negative).
        num_samples: positive-first budget per image.
        num_classes: K; the background label.

    Returns:
        per image, ``Instances`` ordered [positives, negatives] (each in index order), with
        ``proposal_boxes``, ``gt_classes`` (GT class for positives, K for negatives) and
        ``gt_boxes`` (the matched GT box; the proposal itself for negatives, never used).
    """
    out = []
    for props, tgt in zip(proposals, targets):
        boxes = props.proposal_boxes.tensor
        if len(tgt) > 0 and len(props) > 0:
            matched_idxs, matched_labels = matcher(pairwise_iou(tgt.gt_boxes, props.proposal_boxes))
            labels = tgt.gt_classes[matched_idxs].clone()
            labels[matched_labels == 0] = num_classes
            labels[matched_labels == -1] = -1
            gt_boxes = tgt.gt_boxes.tensor[matched_idxs]
            gt_boxes = torch.where((labels == num_classes)[:, None], boxes, gt_boxes)
        else:
            labels = torch.full((len(props),), num_classes, dtype=torch.int64, device=boxes.device)
            gt_boxes = boxes
        pos, neg = positive_first_sample(labels, num_samples, num_classes)
        idx = torch.cat([pos, neg])
        sample = Instances(props.image_size)
        sample.proposal_boxes = Boxes(boxes[idx])
        sample.gt_classes = labels[idx]
        sample.gt_boxes = Boxes(gt_boxes[idx])
        out.append(sample)
    return out
