"""Test-time augmentation for Decoupled R-CNN.

Detectron2's `GeneralizedRCNNWithTTA` merges the detections of all augmented inputs with hard
NMS. A model configured for soft-NMS (``MODEL.DECOUPLED_RCNN.TEST_NMS_TYPE:
"soft_nms_linear"``, the multi-scale rows) merges them with the same linear soft-NMS instead;
a hard-NMS model keeps Detectron2's merge. Registered with `projects_common.tta` under
``DecoupledROIHeads``.
"""
from itertools import count

import torch
from detectron2.modeling import GeneralizedRCNNWithTTA

from projects_common.tta import register_tta_builder

from .inference import soft_nms_inference

__all__ = ["DecoupledRCNNWithTTA", "build_decoupled_tta_model"]


class DecoupledRCNNWithTTA(GeneralizedRCNNWithTTA):
    """`GeneralizedRCNNWithTTA` whose merge step uses linear soft-NMS when configured."""

    def _merge_detections(self, all_boxes, all_scores, all_classes, shape_hw):
        d = self.cfg.MODEL.DECOUPLED_RCNN
        if d.TEST_NMS_TYPE != "soft_nms_linear":
            return super()._merge_detections(all_boxes, all_scores, all_classes, shape_hw)
        num_classes = self.cfg.MODEL.ROI_HEADS.NUM_CLASSES
        # One row per detection, its score in its class column (+1 background column).
        scores_2d = torch.zeros(len(all_boxes), num_classes + 1, device=all_boxes.device)
        for idx, cls, score in zip(count(), all_classes, all_scores):
            scores_2d[idx, cls] = score
        return soft_nms_inference(
            all_boxes,
            scores_2d,
            shape_hw,
            1e-8,
            self.cfg.MODEL.ROI_HEADS.NMS_THRESH_TEST,
            self.cfg.TEST.DETECTIONS_PER_IMAGE,
            d.SOFT_NMS_MIN_SCORE,
            d.SOFT_NMS_SPLIT_THRESH,
        )


def build_decoupled_tta_model(cfg, model):
    """`projects_common.tta` builder: ``DecoupledRCNNWithTTA(cfg, model)``."""
    return DecoupledRCNNWithTTA(cfg, model)


register_tta_builder("DecoupledROIHeads", build_decoupled_tta_model)
