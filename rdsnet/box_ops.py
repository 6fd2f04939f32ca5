"""Box conventions of RDSNet.

The authors' mmdetection v1 measures boxes as *inclusive pixel indices*: a box (x1, y1, x2, y2)
covers pixels x1..x2, so its width is x2 - x1 + 1 ("+1" convention) in the box coder, the IoU,
NMS and the crop padding. With ``plus_one=False`` every function here uses Detectron2's
continuous convention (width x2 - x1). All boxes are XYXY tensors of shape (N, 4).
"""
import math

import torch
from detectron2.modeling.box_regression import Box2BoxTransform
from detectron2.modeling.matcher import Matcher
from detectron2.structures import Boxes, pairwise_iou

from projects_common.topk_nms import batched_nms_topk

__all__ = [
    "Box2BoxTransformPlusOne",
    "LowQualityOverrideMatcher",
    "box_iou",
    "nms_per_class",
    "BBOX_XFORM_CLAMP",
]

# dw/dh clamp of mmdet's delta2bbox: |log(16 / 1000)| = 4.1352.
BBOX_XFORM_CLAMP = math.log(1000.0 / 16)


def _inclusive_to_continuous(boxes: torch.Tensor) -> torch.Tensor:
    """(x1, y1, x2, y2) inclusive -> (x1, y1, x2 + 1, y2 + 1): the same pixels, D2 convention."""
    return torch.cat([boxes[:, :2], boxes[:, 2:] + 1.0], dim=1)


def box_iou(boxes1: torch.Tensor, boxes2: torch.Tensor, plus_one: bool) -> torch.Tensor:
    """Pairwise IoU (N, M). With ``plus_one`` areas are (x2-x1+1)(y2-y1+1), as mmdet v1.

    The "+1" IoU of inclusive boxes equals the ordinary IoU of the boxes shifted to
    (x1, y1, x2+1, y2+1), which is how it is computed here.
    """
    if plus_one:
        boxes1, boxes2 = _inclusive_to_continuous(boxes1), _inclusive_to_continuous(boxes2)
    return pairwise_iou(Boxes(boxes1), Boxes(boxes2))


def nms_per_class(boxes, scores, classes, iou_threshold: float, plus_one: bool, max_keep: int):
    """Class-wise NMS; the first ``max_keep`` kept indices, sorted by decreasing score.

    Only the ``max_keep`` best survivors are computed (`batched_nms_topk`): the same indices as
    ``batched_nms(...)[:max_keep]`` over every candidate, at the cost of NMS over a few times
    ``max_keep`` boxes instead of every (box, class) pair above the score threshold.
    """
    if plus_one:
        boxes = _inclusive_to_continuous(boxes)
    return batched_nms_topk(boxes, scores, classes, iou_threshold, max_keep)


class Box2BoxTransformPlusOne(Box2BoxTransform):
    """mmdet v1 ``bbox2delta`` / ``delta2bbox`` with "+1" widths.

    Encoding: pw = x2 - x1 + 1, px = (x1 + x2) / 2, dx = wx (gx - px) / pw, dw = ww log(gw / pw).
    Decoding: gx = px + pw dx, gw = pw exp(dw) (dw clamped to `scale_clamp`),
    x1 = gx - 0.5 gw + 0.5, x2 = gx + 0.5 gw - 0.5. Boxes are inclusive pixel indices.
    """

    def get_deltas(self, src_boxes, target_boxes):
        """(N, 4) anchors and (N, 4) targets -> (N, 4) deltas (dx, dy, dw, dh)."""
        src_w = src_boxes[:, 2] - src_boxes[:, 0] + 1.0
        src_h = src_boxes[:, 3] - src_boxes[:, 1] + 1.0
        src_x = (src_boxes[:, 0] + src_boxes[:, 2]) * 0.5
        src_y = (src_boxes[:, 1] + src_boxes[:, 3]) * 0.5
        tgt_w = target_boxes[:, 2] - target_boxes[:, 0] + 1.0
        tgt_h = target_boxes[:, 3] - target_boxes[:, 1] + 1.0
        tgt_x = (target_boxes[:, 0] + target_boxes[:, 2]) * 0.5
        tgt_y = (target_boxes[:, 1] + target_boxes[:, 3]) * 0.5
        wx, wy, ww, wh = self.weights
        return torch.stack(
            (
                wx * (tgt_x - src_x) / src_w,
                wy * (tgt_y - src_y) / src_h,
                ww * torch.log(tgt_w / src_w),
                wh * torch.log(tgt_h / src_h),
            ),
            dim=1,
        )

    def apply_deltas(self, deltas, boxes):
        """(N, k*4) deltas applied to (N, 4) boxes -> (N, k*4) boxes (not clipped)."""
        deltas = deltas.float()
        boxes = boxes.to(deltas.dtype)
        widths = (boxes[:, 2] - boxes[:, 0] + 1.0)[:, None]
        heights = (boxes[:, 3] - boxes[:, 1] + 1.0)[:, None]
        ctr_x = ((boxes[:, 0] + boxes[:, 2]) * 0.5)[:, None]
        ctr_y = ((boxes[:, 1] + boxes[:, 3]) * 0.5)[:, None]
        wx, wy, ww, wh = self.weights
        dx, dy = deltas[:, 0::4] / wx, deltas[:, 1::4] / wy
        dw = torch.clamp(deltas[:, 2::4] / ww, min=-self.scale_clamp, max=self.scale_clamp)
        dh = torch.clamp(deltas[:, 3::4] / wh, min=-self.scale_clamp, max=self.scale_clamp)
        gx, gy = ctr_x + dx * widths, ctr_y + dy * heights
        gw, gh = widths * torch.exp(dw), heights * torch.exp(dh)
        out = torch.stack(
            (gx - 0.5 * gw + 0.5, gy - 0.5 * gh + 0.5, gx + 0.5 * gw - 0.5, gy + 0.5 * gh - 0.5),
            dim=-1,
        )
        return out.reshape(deltas.shape)


class LowQualityOverrideMatcher(Matcher):
    """Detectron2's `Matcher` with mmdet's `MaxIoUAssigner` rule 4.

    Rule 4 (``min_pos_iou=0``, ``gt_max_assign_all=True``): for every GT g, *all* anchors whose
    IoU equals g's maximum IoU become positive **for g**, overriding the argmax assignment of
    rule 3 (later GTs win ties). Detectron2's low-quality matching labels them positive but
    keeps the argmax GT; this subclass also re-points `matches`.
    """

    def __call__(self, match_quality_matrix):
        """(M gt, N anchors) IoU -> matches (N,) int64 and labels (N,) int8 (see `Matcher`)."""
        matches, match_labels = super().__call__(match_quality_matrix)
        if self.allow_low_quality_matches and match_quality_matrix.numel() > 0:
            best = match_quality_matrix.max(dim=1, keepdim=True).values
            is_best = match_quality_matrix == best  # (M, N)
            gt_rank = torch.arange(1, is_best.shape[0] + 1, device=is_best.device)[:, None]
            last_gt = (is_best.to(gt_rank.dtype) * gt_rank).max(dim=0).values  # 0: none
            hit = last_gt > 0
            matches = torch.where(hit, last_gt - 1, matches)
        return matches, match_labels
