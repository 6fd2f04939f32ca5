"""ROI heads with a TSD box branch.

* `TSDROIHeads` — Faster R-CNN / Mask R-CNN: the sibling 2fc head (Detectron2's box head and
  `FastRCNNOutputLayers`) and the TSD head run on the same sampled RoIs in training; only TSD
  runs at test. The mask head is Detectron2's, trained on the positive proposals P and run on
  the TSD detections — `StandardROIHeads` already does exactly that.
* `TSDCascadeROIHeads` — Cascade R-CNN with a full TSD head (+ sibling) per stage,
  class-specific regression, refinement from the TSD boxes on P̂_r, stage loss weights and
  test-time averaging of the stages' TSD *logits*.
"""
from typing import Dict, List, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from detectron2.config import configurable
from detectron2.layers import ShapeSpec
from detectron2.modeling.box_regression import Box2BoxTransform
from detectron2.modeling.matcher import Matcher
from detectron2.modeling.poolers import ROIPooler
from detectron2.modeling.roi_heads import (
    ROI_HEADS_REGISTRY,
    CascadeROIHeads,
    FastRCNNOutputLayers,
    StandardROIHeads,
    build_box_head,
)
from detectron2.modeling.roi_heads.fast_rcnn import fast_rcnn_inference
from detectron2.modeling.proposal_generator.proposal_utils import add_ground_truth_to_proposals
from detectron2.structures import Instances, pairwise_iou
from detectron2.utils.events import get_event_storage

from .geometry import LegacyBox2BoxTransform
from .head import TSDHead

__all__ = ["TSDROIHeads", "TSDCascadeROIHeads"]


def _box_coder(cfg, weights) -> Box2BoxTransform:
    """The box coder of one stage: the authors' "+1" coder with ``MODEL.TSD.LEGACY_COORDS``,
    else Detectron2's (both clamp log-size deltas at log(1000/16))."""
    if cfg.MODEL.TSD.LEGACY_COORDS:
        return LegacyBox2BoxTransform(weights=weights)
    return Box2BoxTransform(weights=weights)


@ROI_HEADS_REGISTRY.register()
class TSDROIHeads(StandardROIHeads):
    """`StandardROIHeads` whose box branch is sibling head + TSD head (paper Eq. 9).

    Training losses: ``loss_cls``, ``loss_box_reg`` (sibling), ``loss_tsd_cls``,
    ``loss_tsd_box_reg``, ``loss_pc_cls``, ``loss_pc_loc`` (+ ``loss_mask`` with MASK_ON).
    Inference: TSD branch only; the sibling `box_head`/`box_predictor` are not executed.
    """

    @configurable
    def __init__(self, *, tsd_head: TSDHead, **kwargs):
        """
        Args:
            tsd_head: the TSD head (offset generators, deformable pooling, task towers).
            kwargs: `StandardROIHeads` arguments; ``box_head``/``box_predictor`` are the sibling.
        """
        super().__init__(**kwargs)
        self.tsd_head = tsd_head

    @classmethod
    def from_config(cls, cfg, input_shape):
        if cfg.MODEL.ROI_BOX_HEAD.TRAIN_ON_PRED_BOXES:
            raise ValueError("TSDROIHeads: MODEL.ROI_BOX_HEAD.TRAIN_ON_PRED_BOXES is not supported")
        return super().from_config(cfg, input_shape)

    @classmethod
    def _init_box_head(cls, cfg, input_shape):
        ret = super()._init_box_head(cfg, input_shape)
        transform = ret["box_predictor"].box2box_transform
        if cfg.MODEL.TSD.LEGACY_COORDS:  # "+1" box coding for the sibling and TSD
            transform = _box_coder(cfg, transform.weights)
            ret["box_predictor"].box2box_transform = transform
        ret["tsd_head"] = TSDHead(cfg, input_shape, box2box_transform=transform)
        return ret

    def _forward_box(self, features: Dict[str, torch.Tensor], proposals: List[Instances]):
        """Training: dict of the sibling, TSD and PC losses. Inference: TSD detections."""
        features = [features[f] for f in self.box_in_features]
        proposal_boxes = [x.proposal_boxes for x in proposals]
        x = self.box_pooler(features, proposal_boxes)  # RoIAlign of P: (R, C, k, k)
        predictions, _ = self.tsd_head(x, features, proposal_boxes)
        if not self.training:
            pred_instances, _ = self.tsd_head.predictor.inference(predictions, proposals)
            return pred_instances
        sibling = self.box_predictor(self.box_head(x))
        losses = self.box_predictor.losses(sibling, proposals)
        losses.update(
            self.tsd_head.losses(
                predictions, sibling, self.box_predictor.box2box_transform, proposals
            )
        )
        return losses


@ROI_HEADS_REGISTRY.register()
class TSDCascadeROIHeads(CascadeROIHeads):
    """`CascadeROIHeads` with a TSD head (+ its sibling) at every stage.

    Differences from Detectron2's cascade: class-specific regression; the next stage's boxes are
    the TSD boxes decoded from P̂_r for the assigned class (training; background RoIs use the
    arg-max foreground class) or the arg-max foreground class (test); per-stage losses are
    multiplied by ``MODEL.TSD.CASCADE_STAGE_WEIGHTS``; no 1/num_stages gradient scaling; at test
    the final scores are the softmax of the stages' averaged TSD logits.
    """

    @configurable
    def __init__(
        self,
        *,
        tsd_heads: List[TSDHead],
        stage_loss_weights: Sequence[float],
        resample_stages: bool = True,
        **kwargs,
    ):
        """
        Args:
            tsd_heads: one TSD head per stage.
            stage_loss_weights: multiplier of every loss of a stage.
            resample_stages: training, stages > 0: drop the RoIs that were GT boxes, append the
                GT again, match at the stage's IoU and draw ``batch_size_per_image`` RoIs with at
                most ``positive_fraction`` positives (the authors). False: Detectron2's cascade
                (match the refined boxes of all RoIs, no sampling, no GT appended).
            kwargs: `CascadeROIHeads` arguments (sibling ``box_heads``/``box_predictors``).
        """
        super().__init__(**kwargs)
        assert len(tsd_heads) == self.num_cascade_stages == len(stage_loss_weights)
        self.tsd_head = nn.ModuleList(tsd_heads)
        self.stage_loss_weights = [float(w) for w in stage_loss_weights]
        self.resample_stages = bool(resample_stages)

    @classmethod
    def from_config(cls, cfg, input_shape):
        ret = super().from_config(cfg, input_shape)
        ret["resample_stages"] = cfg.MODEL.TSD.CASCADE_RESAMPLE
        return ret

    def label_and_sample_proposals(self, proposals, targets):
        """Stage-0 sampling (512 RoIs, 25 % positives, GT appended), recording ``is_gt``."""
        return self._label_and_sample_stage(proposals, targets, 0)

    @torch.no_grad()
    def _label_and_sample_stage(self, proposals, targets, stage: int) -> List[Instances]:
        """Append the GT, match at the stage's IoU threshold and sample (mmdet's assigner +
        RandomSampler at every cascade stage).

        Returns:
            per image, the sampled ``Instances`` with ``gt_classes``, the matched ``gt_*``
            fields (images with GT) and ``is_gt`` (bool, the row is an appended GT box).
        """
        num_props = [len(p) for p in proposals]
        for p in proposals:  # refined boxes of a later stage carry no objectness
            if not p.has("objectness_logits"):
                p.objectness_logits = torch.zeros(len(p), device=p.proposal_boxes.device)
        if self.proposal_append_gt:
            proposals = add_ground_truth_to_proposals(targets, proposals)  # appended last
        matcher = self.proposal_matchers[stage]
        out = []
        for props, n, tgt in zip(proposals, num_props, targets):
            has_gt = len(tgt) > 0
            matched_idxs, matched_labels = matcher(
                pairwise_iou(tgt.gt_boxes, props.proposal_boxes)
            )
            idx, gt_classes = self._sample_proposals(matched_idxs, matched_labels, tgt.gt_classes)
            sample = props[idx]
            sample.gt_classes = gt_classes
            sample.is_gt = idx >= n
            if has_gt:
                for name, value in tgt.get_fields().items():
                    if name.startswith("gt_") and not sample.has(name):
                        sample.set(name, value[matched_idxs[idx]])
            out.append(sample)
        return out

    @classmethod
    def _init_box_head(cls, cfg, input_shape):
        """Like `CascadeROIHeads._init_box_head`, but class-specific and with TSD heads."""
        in_features = cfg.MODEL.ROI_HEADS.IN_FEATURES
        resolution = cfg.MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION
        reg_weights = cfg.MODEL.ROI_BOX_CASCADE_HEAD.BBOX_REG_WEIGHTS
        ious = cfg.MODEL.ROI_BOX_CASCADE_HEAD.IOUS
        stage_weights = cfg.MODEL.TSD.CASCADE_STAGE_WEIGHTS
        if not (len(reg_weights) == len(ious) == len(stage_weights)):
            raise ValueError(
                "TSDCascadeROIHeads: ROI_BOX_CASCADE_HEAD.BBOX_REG_WEIGHTS, "
                "ROI_BOX_CASCADE_HEAD.IOUS"
                f" and MODEL.TSD.CASCADE_STAGE_WEIGHTS differ in length: {len(reg_weights)}, "
                f"{len(ious)}, {len(stage_weights)}"
            )
        if cfg.MODEL.ROI_BOX_HEAD.CLS_AGNOSTIC_BBOX_REG:
            raise ValueError(
                "TSDCascadeROIHeads uses class-specific regression: set "
                "MODEL.ROI_BOX_HEAD.CLS_AGNOSTIC_BBOX_REG False"
            )
        if ious[0] != cfg.MODEL.ROI_HEADS.IOU_THRESHOLDS[0]:
            raise ValueError("ROI_BOX_CASCADE_HEAD.IOUS[0] must equal ROI_HEADS.IOU_THRESHOLDS[0]")
        in_channels = input_shape[in_features[0]].channels
        box_pooler = ROIPooler(
            output_size=resolution,
            scales=tuple(1.0 / input_shape[k].stride for k in in_features),
            sampling_ratio=cfg.MODEL.ROI_BOX_HEAD.POOLER_SAMPLING_RATIO,
            pooler_type=cfg.MODEL.ROI_BOX_HEAD.POOLER_TYPE,
        )
        pooled = ShapeSpec(channels=in_channels, width=resolution, height=resolution)
        box_heads, box_predictors, tsd_heads, matchers = [], [], [], []
        for iou, weights in zip(ious, reg_weights):
            transform = _box_coder(cfg, weights)
            box_head = build_box_head(cfg, pooled)
            box_heads.append(box_head)
            box_predictors.append(
                FastRCNNOutputLayers(cfg, box_head.output_shape, box2box_transform=transform)
            )
            tsd_heads.append(TSDHead(cfg, input_shape, box2box_transform=transform))
            matchers.append(Matcher([iou], [0, 1], allow_low_quality_matches=False))
        return {
            "box_in_features": in_features,
            "box_pooler": box_pooler,
            "box_heads": box_heads,
            "box_predictors": box_predictors,
            "proposal_matchers": matchers,
            "tsd_heads": tsd_heads,
            "stage_loss_weights": stage_weights,
        }

    def _run_stage(self, features, proposals, stage):
        """TSD (and in training the sibling) on one stage's RoIs; no gradient scaling.

        Returns:
            TSD predictions (scores, deltas, P̂_r) and sibling predictions (None at test).
        """
        proposal_boxes = [p.proposal_boxes for p in proposals]
        x = self.box_pooler(features, proposal_boxes)
        predictions, _ = self.tsd_head[stage](x, features, proposal_boxes)
        sibling = None
        if self.training:
            sibling = self.box_predictor[stage](self.box_head[stage](x))
        return predictions, sibling

    @torch.no_grad()
    def _refine(self, predictions, proposals, stage) -> List[torch.Tensor]:
        """Next-stage boxes: TSD boxes on P̂_r of the assigned (training) / arg-max
        foreground (test, and background RoIs in training) class. Per image (R_i, 4)."""
        predictor = self.tsd_head[stage].predictor
        scores = predictions[0]
        classes = scores[:, :-1].argmax(dim=1)
        if self.training and len(proposals):
            gt = torch.cat([p.gt_classes for p in proposals])
            fg = gt < self.num_classes
            classes = torch.where(fg, gt, classes)
        boxes = predictor.predict_boxes_for_classes(predictions, classes)
        return list(boxes.split([len(p) for p in proposals]))

    def _forward_box(self, features, proposals, targets=None):
        features = [features[f] for f in self.box_in_features]
        image_sizes = [x.image_size for x in proposals]
        outputs = []  # (predictions, sibling, proposals)
        prev_boxes = None
        for k in range(self.num_cascade_stages):
            if k > 0:
                if self.training and self.resample_stages:  # GT rows leave, GT re-appended
                    prev_boxes = [b[~p.is_gt] for b, p in zip(prev_boxes, proposals)]
                proposals = self._create_proposals_from_boxes(prev_boxes, image_sizes)
                if self.training:
                    if self.resample_stages:
                        proposals = self._label_and_sample_stage(proposals, targets, k)
                    else:
                        proposals = self._match_and_label_boxes(proposals, k, targets)
            predictions, sibling = self._run_stage(features, proposals, k)
            if k + 1 < self.num_cascade_stages:
                prev_boxes = self._refine(predictions, proposals, k)
            outputs.append((predictions, sibling, proposals))

        if self.training:
            losses = {}
            storage = get_event_storage()
            for k, (predictions, sibling, props) in enumerate(outputs):
                with storage.name_scope(f"stage{k}"):
                    stage = self.box_predictor[k].losses(sibling, props)
                    stage.update(
                        self.tsd_head[k].losses(
                            predictions, sibling, self.box_predictor[k].box2box_transform, props
                        )
                    )
                w = self.stage_loss_weights[k]
                losses.update({f"{name}_stage{k}": v * w for name, v in stage.items()})
            return losses

        # test: softmax of the stage-averaged TSD logits, boxes of the last stage
        logits = sum(o[0][0] for o in outputs) / self.num_cascade_stages
        predictions, _, props = outputs[-1]
        predictor = self.tsd_head[-1].predictor
        scores = F.softmax(logits, dim=-1).split([len(p) for p in props])
        boxes = predictor.predict_boxes(predictions, props)
        pred_instances, _ = fast_rcnn_inference(
            boxes,
            scores,
            image_sizes,
            predictor.test_score_thresh,
            predictor.test_nms_thresh,
            predictor.test_topk_per_image,
        )
        return pred_instances
