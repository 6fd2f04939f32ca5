"""Box towers and predictors of Decoupled R-CNN.

* `DecoupledFCHead`: a 2-FC tower (Linear + ReLU, twice) on the flattened (C, 7, 7) RoI feature;
  stage 0 has two unshared ones (classification, regression), every refine stage one.
* `DecoupledOutputLayers`: stage-0 predictor; ``cls_score`` (K+1, background last) on the
  classification tower, class-specific ``bbox_pred`` (4K) on the regression tower.
* `RefineOutputLayers`: class-agnostic ``bbox_pred`` (4) of a refine stage; no classifier.
"""
from typing import Dict, List, Tuple

import torch
from detectron2.config import configurable
from detectron2.layers import ShapeSpec, cat, cross_entropy
from detectron2.modeling.roi_heads import FastRCNNConvFCHead, FastRCNNOutputLayers
from detectron2.modeling.roi_heads.fast_rcnn import fast_rcnn_inference
from detectron2.structures import Instances
from detectron2.utils.events import get_event_storage
from torch import nn

from .inference import soft_nms_inference

__all__ = ["DecoupledFCHead", "DecoupledOutputLayers", "RefineOutputLayers", "IGNORE_LABEL",
           "TOWER_INITS", "TEST_NMS_TYPES"]

# Label of rows that belong to the other branch (mmdet's -100, F.cross_entropy's ignore_index).
IGNORE_LABEL = -100
TOWER_INITS = ("xavier_uniform", "c2_xavier", "pytorch_default")
TEST_NMS_TYPES = ("nms", "soft_nms_linear")


class DecoupledFCHead(FastRCNNConvFCHead):
    """`FastRCNNConvFCHead` with the authors' FC initialisation.

    Input (R, C, H, W) RoI features, output (R, FC_DIM) after the last FC + ReLU. Modules
    ``fc1``, ``fc2`` (mmdet ``cls_fcs.{0,1}`` / ``reg_fcs.{0,1}``).
    """

    @configurable
    def __init__(self, input_shape: ShapeSpec, *, fc_init: str = "xavier_uniform", **kwargs):
        """
        Args:
            fc_init: "xavier_uniform" (mmdet xavier_init: uniform, gain 1, bias 0),
                "c2_xavier" (Detectron2's init, kept as is) or "pytorch_default"
                (`nn.Linear.reset_parameters`).
            kwargs: arguments of `FastRCNNConvFCHead` (``conv_dims``, ``fc_dims``, ...).
        """
        super().__init__(input_shape, **kwargs)
        if fc_init not in TOWER_INITS:
            raise ValueError(f"tower init {fc_init!r} is not one of {TOWER_INITS}")
        for fc in self.fcs:
            if fc_init == "xavier_uniform":
                nn.init.xavier_uniform_(fc.weight)
                nn.init.zeros_(fc.bias)
            elif fc_init == "pytorch_default":
                fc.reset_parameters()

    @classmethod
    def from_config(cls, cfg, input_shape, fc_init="xavier_uniform"):
        ret = super().from_config(cfg, input_shape)
        ret["fc_init"] = fc_init
        return ret


class DecoupledOutputLayers(FastRCNNOutputLayers):
    """Stage-0 predictor: classification on one tower, class-specific regression on the other.

    ``forward((x_cls, x_reg))`` -> ``(scores (R, K+1), deltas (R, 4K))``.

    Training rows (`losses`) carry two label fields: ``gt_classes`` (classification target,
    `IGNORE_LABEL` on regression rows) and ``reg_classes`` (regression target: GT class for
    positive regression rows, K for negative ones, `IGNORE_LABEL` on classification rows).
    """

    @configurable
    def __init__(
        self,
        input_shape: ShapeSpec,
        *,
        test_nms_type: str = "nms",
        soft_nms_min_score: float = 0.001,
        soft_nms_split_thresh: int = 10000,
        **kwargs,
    ):
        """
        Args:
            test_nms_type: "nms" or "soft_nms_linear" (IoU threshold ``test_nms_thresh``).
            soft_nms_min_score: soft-NMS drops detections whose decayed score is below this.
            soft_nms_split_thresh: mmcv 1.1.2 quirk, see `soft_nms_inference`; 0 disables.
            kwargs: arguments of `FastRCNNOutputLayers` (class-specific regression).
        """
        super().__init__(input_shape, **kwargs)
        if test_nms_type not in TEST_NMS_TYPES:
            raise ValueError(
                f"MODEL.DECOUPLED_RCNN.TEST_NMS_TYPE={test_nms_type!r} is not one of "
                f"{TEST_NMS_TYPES}"
            )
        if self.bbox_pred.out_features != 4 * self.num_classes:
            raise ValueError("Decoupled R-CNN's stage-0 regression is class-specific; "
                             "set MODEL.ROI_BOX_HEAD.CLS_AGNOSTIC_BBOX_REG to False")
        self.test_nms_type = test_nms_type
        self.soft_nms_min_score = soft_nms_min_score
        self.soft_nms_split_thresh = soft_nms_split_thresh

    @classmethod
    def from_config(cls, cfg, input_shape):
        ret = super().from_config(cfg, input_shape)
        d = cfg.MODEL.DECOUPLED_RCNN
        ret.update(
            {
                "test_nms_type": d.TEST_NMS_TYPE,
                "soft_nms_min_score": d.SOFT_NMS_MIN_SCORE,
                "soft_nms_split_thresh": d.SOFT_NMS_SPLIT_THRESH,
                "loss_weight": {
                    "loss_cls": d.STAGE_LOSS_WEIGHTS[0],
                    "loss_box_reg_s0": d.STAGE_LOSS_WEIGHTS[0]
                    * cfg.MODEL.ROI_BOX_HEAD.BBOX_REG_LOSS_WEIGHT,
                },
            }
        )
        return ret

    def forward(self, x: Tuple[torch.Tensor, torch.Tensor]):
        """
        Args:
            x: (classification-tower features (R, D), regression-tower features (R, D)).
        Returns:
            scores (R, K+1) logits with background last; deltas (R, 4K), class-major
            (4c..4c+3 = dx, dy, dw, dh of class c).
        """
        x_cls, x_reg = x
        return self.cls_score(x_cls.flatten(1)), self.bbox_pred(x_reg.flatten(1))

    def losses(self, predictions, proposals: List[Instances]) -> Dict[str, torch.Tensor]:
        """Stage-0 losses.

        * ``loss_cls``: softmax CE over the classification rows, divided by their number.
        * ``loss_box_reg_s0``: L1 (``smooth_l1_beta`` 0) between the GT-class deltas and the
          targets (stds 0.1/0.1/0.2/0.2) on the positive regression rows, summed and divided by
          the number of *all* stage-0 rows (classification rows included).

        Args:
            predictions: ``(scores (R, K+1), deltas (R, 4K))`` for the rows of ``proposals``.
            proposals: per image, rows with ``proposal_boxes``, ``gt_boxes``, ``gt_classes``,
                ``reg_classes`` (see class docstring).
        """
        scores, deltas = predictions
        if len(proposals):
            gt_classes = cat([p.gt_classes for p in proposals])
            reg_classes = cat([p.reg_classes for p in proposals])
            proposal_boxes = cat([p.proposal_boxes.tensor for p in proposals])
            gt_boxes = cat([p.gt_boxes.tensor for p in proposals])
        else:
            gt_classes = reg_classes = torch.zeros(0, dtype=torch.int64, device=scores.device)
            proposal_boxes = gt_boxes = torch.zeros((0, 4), device=scores.device)
        cls_rows = gt_classes != IGNORE_LABEL
        self._log_accuracy(scores[cls_rows], gt_classes[cls_rows])
        losses = {
            "loss_cls": cross_entropy(scores[cls_rows], gt_classes[cls_rows], reduction="mean"),
            # `box_reg_loss` keeps rows with 0 <= class < K and divides by reg_classes.numel(),
            # i.e. by all stage-0 rows, as the authors' avg_factor.
            "loss_box_reg_s0": self.box_reg_loss(proposal_boxes, gt_boxes, deltas, reg_classes),
        }
        return {k: v * self.loss_weight.get(k, 1.0) for k, v in losses.items()}

    def _log_accuracy(self, scores: torch.Tensor, gt_classes: torch.Tensor) -> None:
        """Log the classification accuracy of the classification rows (mmdet ``s0.acc``)."""
        if gt_classes.numel() == 0:
            return
        storage = get_event_storage()
        pred = scores.argmax(dim=1)
        acc = (pred == gt_classes).float().mean().item()
        storage.put_scalar("decoupled_rcnn/cls_accuracy", acc)
        fg = gt_classes < self.num_classes
        if fg.any():
            acc = (pred[fg] == gt_classes[fg]).float().mean().item()
            storage.put_scalar("decoupled_rcnn/fg_cls_accuracy", acc)

    def postprocess(
        self,
        boxes: List[torch.Tensor],
        scores: List[torch.Tensor],
        image_shapes: List[Tuple[int, int]],
    ) -> List[Instances]:
        """Score threshold, per-class NMS or linear soft-NMS, and top-k.

        Args:
            boxes: per image, (R_i, 4) class-agnostic final boxes (shared by all classes).
            scores: per image, (R_i, K+1) softmax probabilities, background last.
        Returns:
            per image, ``Instances`` with ``pred_boxes``, ``scores``, ``pred_classes``.
        """
        if self.test_nms_type == "nms":
            return fast_rcnn_inference(
                boxes, scores, image_shapes, self.test_score_thresh, self.test_nms_thresh,
                self.test_topk_per_image,
            )[0]
        return [
            soft_nms_inference(
                b, s, shape, self.test_score_thresh, self.test_nms_thresh,
                self.test_topk_per_image, self.soft_nms_min_score, self.soft_nms_split_thresh,
            )
            for b, s, shape in zip(boxes, scores, image_shapes)
        ]


class RefineOutputLayers(FastRCNNOutputLayers):
    """Class-agnostic regression of one refine stage (mmdet ``RefineBBoxHead.fc_reg``).

    ``forward(x)`` -> deltas (R, 4). The parent's classifier is removed (the stage has none).
    """

    @configurable
    def __init__(self, input_shape: ShapeSpec, *, stage: int, loss_normalizer: float = 2.0,
                 **kwargs):
        """
        Args:
            stage: the stage index (>= 1), used for the loss name ``loss_box_reg_s{stage}``.
            loss_normalizer: the L1 sum is divided by this times the stage's RoI count.
            kwargs: arguments of `FastRCNNOutputLayers`; ``box2box_transform`` is the stage's
                coder, ``loss_weight`` its stage weight.
        """
        kwargs["cls_agnostic_bbox_reg"] = True
        super().__init__(input_shape, **kwargs)
        del self.cls_score
        if not loss_normalizer > 0:
            raise ValueError(f"MODEL.DECOUPLED_RCNN.REFINE_LOSS_NORMALIZER must be > 0, "
                             f"got {loss_normalizer}")
        self.stage = stage
        self.loss_normalizer = loss_normalizer

    @classmethod
    def from_config(cls, cfg, input_shape, stage, box2box_transform):
        ret = super().from_config(cfg, input_shape)
        d = cfg.MODEL.DECOUPLED_RCNN
        ret.update(
            {
                "stage": stage,
                "box2box_transform": box2box_transform,
                "loss_normalizer": d.REFINE_LOSS_NORMALIZER,
                "loss_weight": {
                    f"loss_box_reg_s{stage}": d.STAGE_LOSS_WEIGHTS[stage]
                    * cfg.MODEL.ROI_BOX_HEAD.BBOX_REG_LOSS_WEIGHT
                },
            }
        )
        return ret

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(R, D) tower features -> (R, 4) class-agnostic deltas."""
        return self.bbox_pred(x.flatten(1))

    def losses(self, predictions: torch.Tensor, proposals: List[Instances]):
        """L1 on the positive rows divided by ``loss_normalizer * R``, times the
        stage weight.

        Args:
            predictions: (R, 4) deltas for the rows of ``proposals``.
            proposals: per image, rows with ``proposal_boxes``, ``gt_boxes``, ``gt_classes``
                (GT class for positives, K for negatives).
        """
        deltas = predictions
        if len(proposals):
            gt_classes = cat([p.gt_classes for p in proposals])
            proposal_boxes = cat([p.proposal_boxes.tensor for p in proposals])
            gt_boxes = cat([p.gt_boxes.tensor for p in proposals])
        else:
            gt_classes = torch.zeros(0, dtype=torch.int64, device=deltas.device)
            proposal_boxes = gt_boxes = torch.zeros((0, 4), device=deltas.device)
        name = f"loss_box_reg_s{self.stage}"
        loss = self.box_reg_loss(proposal_boxes, gt_boxes, deltas, gt_classes)
        loss = loss / self.loss_normalizer
        return {name: loss * self.loss_weight.get(name, 1.0)}
