"""RPN with two NMS thresholds in training.

During training the same pre-NMS candidate pool (per-level top ``PRE_NMS_TOPK_TRAIN``, decoded
and clipped) goes through per-level NMS twice: at ``MODEL.RPN.NMS_THRESH`` (0.7) it gives the
*classification* proposal set, at ``MODEL.DECOUPLED_RCNN.RPN_NMS_THRESH_REG`` (0.85) the denser
*regression* set; each keeps its top ``POST_NMS_TOPK`` (1000) proposals by objectness. At test
time the RPN is Detectron2's (one set, NMS 0.7).
"""
from typing import List, Tuple

import torch
from detectron2.config import configurable
from detectron2.modeling.proposal_generator import PROPOSAL_GENERATOR_REGISTRY, RPN
from detectron2.modeling.proposal_generator.proposal_utils import find_top_rpn_proposals
from detectron2.structures import Boxes

__all__ = ["DualNMSRPN"]


@PROPOSAL_GENERATOR_REGISTRY.register()
class DualNMSRPN(RPN):
    """Detectron2 `RPN` whose training output is the pair ``(proposals_cls, proposals_reg)``.

    Each element is a list (one per image) of ``Instances`` with ``proposal_boxes`` (absolute
    x1y1x2y2, clipped) and ``objectness_logits``, sorted by objectness, at most
    ``post_nms_topk`` / ``post_nms_topk_reg`` boxes. In inference the output is the usual list.
    """

    @configurable
    def __init__(self, *, nms_thresh_reg: float = 0.85, post_nms_topk_reg: int = 1000, **kwargs):
        """
        Args:
            nms_thresh_reg: NMS IoU threshold of the regression proposal set (training only).
            post_nms_topk_reg: proposals kept per image in the regression set.
            kwargs: arguments of `RPN` (``nms_thresh`` is the classification set's threshold).
        """
        super().__init__(**kwargs)
        if not 0.0 < nms_thresh_reg <= 1.0:
            raise ValueError(
                f"MODEL.DECOUPLED_RCNN.RPN_NMS_THRESH_REG must lie in (0, 1], got {nms_thresh_reg}"
            )
        self.nms_thresh_reg = nms_thresh_reg
        self.post_nms_topk_reg = int(post_nms_topk_reg)

    @classmethod
    def from_config(cls, cfg, input_shape):
        ret = super().from_config(cfg, input_shape)
        ret["nms_thresh_reg"] = cfg.MODEL.DECOUPLED_RCNN.RPN_NMS_THRESH_REG
        ret["post_nms_topk_reg"] = cfg.MODEL.DECOUPLED_RCNN.RPN_POST_NMS_TOPK_REG_TRAIN
        return ret

    def predict_proposals(
        self,
        anchors: List[Boxes],
        pred_objectness_logits: List[torch.Tensor],
        pred_anchor_deltas: List[torch.Tensor],
        image_sizes: List[Tuple[int, int]],
    ):
        """In training, return ``(proposals_cls, proposals_reg)`` (see class docstring);
        in inference, `RPN.predict_proposals`'s single list."""
        if not self.training:
            return super().predict_proposals(
                anchors, pred_objectness_logits, pred_anchor_deltas, image_sizes
            )
        with torch.no_grad():
            # One decode; both NMS runs see exactly the same candidates.
            pred_proposals = self._decode_proposals(anchors, pred_anchor_deltas)
            return tuple(
                find_top_rpn_proposals(
                    pred_proposals,
                    pred_objectness_logits,
                    image_sizes,
                    nms_thresh,
                    self.pre_nms_topk[True],
                    post_topk,
                    self.min_box_size,
                    True,
                )
                for nms_thresh, post_topk in (
                    (self.nms_thresh, self.post_nms_topk[True]),
                    (self.nms_thresh_reg, self.post_nms_topk_reg),
                )
            )
