"""`DecoupledROIHeads`: decoupled sampling and cascaded regression.

Training, per image:

* classification samples: the NMS-0.7 proposal set + GT, matched at IoU 0.5, 512 RoIs with at
  most 25 % positives (Detectron2's `label_and_sample_proposals`);
* regression samples: the NMS-0.85 proposal set (no GT), matched at IoU 0.5, positive-first
  sample of 512 (`positive_first_sample`);
* stage 0 pools one feature batch over [classification rows; regression rows], runs both
  unshared towers on every row, and masks the losses (CE on classification rows, L1 on positive
  regression rows, both with the authors' normalisers);
* refinement (no gradient): positive regression rows are decoded with their GT-class stage-0
  deltas and clipped; negative rows pass unchanged; classification rows are dropped;
* stages 1..n: re-match (IoU 0.5), positive-first sample, class-agnostic L1, refine again.

Inference: the stage-0 classifier scores the original proposals (final scores); the box is the
stage-0 delta of the argmax foreground class, refined by every refine stage; then NMS or linear
soft-NMS on the class-agnostic box.
"""
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.layers import ShapeSpec
from detectron2.modeling.matcher import Matcher
from detectron2.modeling.poolers import ROIPooler
from detectron2.modeling.roi_heads import ROI_HEADS_REGISTRY, StandardROIHeads
from detectron2.structures import Boxes, ImageList, Instances
from detectron2.utils.events import get_event_storage
from torch import nn

from .box_coder import build_stage_transforms, decode_and_clip
from .heads import IGNORE_LABEL, DecoupledFCHead, DecoupledOutputLayers, RefineOutputLayers
from .sampling import label_and_sample_regression_proposals

__all__ = ["DecoupledROIHeads", "build_stage0_rows", "refine_positive_boxes"]


def build_stage0_rows(
    cls_samples: List[Instances], reg_samples: List[Instances]
) -> List[Instances]:
    """Concatenate, per image, the classification rows and the regression rows.

    Args:
        cls_samples: per image, classification samples with ``proposal_boxes``, ``gt_classes``
            and (for images with GT) ``gt_boxes``.
        reg_samples: per image, regression samples with ``proposal_boxes``, ``gt_classes``,
            ``gt_boxes`` (`label_and_sample_regression_proposals`).

    Returns:
        per image, ``Instances`` of n_cls + n_reg rows [classification rows, regression rows]
        with ``proposal_boxes``, ``gt_boxes`` (placeholder = the proposal where meaningless),
        ``gt_classes`` (classification target; `IGNORE_LABEL` on regression rows) and
        ``reg_classes`` (regression target; `IGNORE_LABEL` on classification rows).
    """
    rows = []
    for c, r in zip(cls_samples, reg_samples):
        c_boxes = c.proposal_boxes.tensor
        r_boxes = r.proposal_boxes.tensor
        c_gt = c.gt_boxes.tensor if c.has("gt_boxes") else c_boxes
        ignore_r = torch.full((len(r),), IGNORE_LABEL, dtype=torch.int64, device=r_boxes.device)
        ignore_c = torch.full((len(c),), IGNORE_LABEL, dtype=torch.int64, device=c_boxes.device)
        inst = Instances(c.image_size)
        inst.proposal_boxes = Boxes(torch.cat([c_boxes, r_boxes]))
        inst.gt_boxes = Boxes(torch.cat([c_gt, r.gt_boxes.tensor]))
        inst.gt_classes = torch.cat([c.gt_classes, ignore_r])
        inst.reg_classes = torch.cat([ignore_c, r.gt_classes])
        rows.append(inst)
    return rows


@torch.no_grad()
def refine_positive_boxes(
    boxes: Sequence[torch.Tensor],
    labels: Sequence[torch.Tensor],
    deltas: torch.Tensor,
    transform,
    image_sizes: Sequence[Tuple[int, int]],
    num_classes: int,
) -> List[Instances]:
    """Proposals of the next regression stage: decode the positive rows, keep the
    negative rows unchanged, drop every other row (classification rows).

    Args:
        boxes: per image, (R_i, 4) current boxes.
        labels: per image, (R_i,) regression labels: [0, K) positive, K negative, other dropped.
        deltas: (sum R_i, 4K) class-specific (the GT class's deltas are used) or (sum R_i, 4).
        transform: the stage's `Box2BoxTransform`.
        image_sizes: per image (h, w) to clip to.
        num_classes: K.

    Returns:
        per image, ``Instances`` with ``proposal_boxes`` = [decoded positives, negatives].
    """
    deltas = deltas.split([len(b) for b in boxes])
    pos_boxes, pos_deltas, neg_boxes = [], [], []
    for b, lab, d in zip(boxes, labels, deltas):
        pos = (lab >= 0) & (lab < num_classes)
        if d.shape[1] != 4:
            d = d[pos].view(-1, num_classes, 4)[torch.arange(int(pos.sum()), device=d.device),
                                                lab[pos]]
        else:
            d = d[pos]
        pos_boxes.append(b[pos])
        pos_deltas.append(d)
        neg_boxes.append(b[lab == num_classes])
    decoded = decode_and_clip(transform, torch.cat(pos_deltas), pos_boxes, image_sizes)
    out = []
    for dec, neg, size in zip(decoded, neg_boxes, image_sizes):
        inst = Instances(size)
        inst.proposal_boxes = Boxes(torch.cat([dec.to(neg.dtype), neg]))
        out.append(inst)
    return out


@ROI_HEADS_REGISTRY.register()
class DecoupledROIHeads(StandardROIHeads):
    """Decoupled R-CNN RoI heads (box only).

    Modules: ``box_pooler`` (shared by all stages), ``box_head_cls`` / ``box_head_reg``
    (unshared 2-FC towers), ``box_predictor`` (`DecoupledOutputLayers`), ``refine_heads[k]`` and
    ``refine_predictors[k]`` (`RefineOutputLayers`) for regression stages k+1. ``box_head`` of
    `StandardROIHeads` is unused (None).

    Training needs the ``(proposals_cls, proposals_reg)`` pair of `DualNMSRPN`. Loss keys:
    ``loss_cls``, ``loss_box_reg_s0``, ``loss_box_reg_s1``, ... (stage weights applied).
    """

    @configurable
    def __init__(
        self,
        *,
        box_head_cls: nn.Module,
        box_head_reg: nn.Module,
        refine_heads: List[nn.Module],
        refine_predictors: List[nn.Module],
        reg_matchers: List[Matcher],
        reg_batch_size_per_image: int,
        **kwargs,
    ):
        """
        Args:
            box_head_cls, box_head_reg: stage-0 classification / regression towers.
            refine_heads, refine_predictors: one tower and one class-agnostic predictor per
                refine stage.
            reg_matchers: one IoU matcher per regression stage (stage 0 regression set first).
            reg_batch_size_per_image: positive-first sample size per image.
            kwargs: arguments of `StandardROIHeads` (``box_head`` None; the classification
                sampling uses ``batch_size_per_image``, ``positive_fraction``,
                ``proposal_matcher``, ``proposal_append_gt``).
        """
        kwargs.setdefault("box_head", None)
        super().__init__(**kwargs)
        n = len(refine_heads)
        if len(refine_predictors) != n or len(reg_matchers) != n + 1:
            raise ValueError(
                f"{len(refine_heads)} refine heads, {len(refine_predictors)} refine predictors and "
                f"{len(reg_matchers)} regression matchers: need n, n and n + 1"
            )
        self.box_head_cls = box_head_cls
        self.box_head_reg = box_head_reg
        self.refine_heads = nn.ModuleList(refine_heads)
        self.refine_predictors = nn.ModuleList(refine_predictors)
        self.reg_matchers = list(reg_matchers)
        self.reg_batch_size_per_image = int(reg_batch_size_per_image)

    @classmethod
    def from_config(cls, cfg, input_shape):
        if cfg.MODEL.MASK_ON or cfg.MODEL.KEYPOINT_ON:
            raise NotImplementedError(
                "DecoupledROIHeads is box-only: set MODEL.MASK_ON and MODEL.KEYPOINT_ON to False"
            )
        d = cfg.MODEL.DECOUPLED_RCNN
        n = len(d.STAGE_TARGET_STDS)
        for key in ("REG_IOU_THRESHOLDS", "STAGE_LOSS_WEIGHTS"):
            if len(d[key]) != n:
                raise ValueError(
                    f"MODEL.DECOUPLED_RCNN.{key} has {len(d[key])} entries but STAGE_TARGET_STDS "
                    f"has {n}: one per regression stage"
                )
        ret = super().from_config(cfg, input_shape)
        ret["reg_matchers"] = [
            Matcher([float(t)], [0, 1], allow_low_quality_matches=False)
            for t in d.REG_IOU_THRESHOLDS
        ]
        ret["reg_batch_size_per_image"] = d.REG_BATCH_SIZE_PER_IMAGE
        return ret

    @classmethod
    def _init_box_head(cls, cfg, input_shape: Dict[str, ShapeSpec]):
        in_features = cfg.MODEL.ROI_HEADS.IN_FEATURES
        resolution = cfg.MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION
        channels = {input_shape[f].channels for f in in_features}
        if len(channels) != 1:
            raise ValueError(f"MODEL.ROI_HEADS.IN_FEATURES {in_features} have different channel "
                             f"counts {sorted(channels)}")
        box_pooler = ROIPooler(
            output_size=resolution,
            scales=tuple(1.0 / input_shape[k].stride for k in in_features),
            sampling_ratio=cfg.MODEL.ROI_BOX_HEAD.POOLER_SAMPLING_RATIO,
            pooler_type=cfg.MODEL.ROI_BOX_HEAD.POOLER_TYPE,
        )
        shape = ShapeSpec(channels=channels.pop(), height=resolution, width=resolution)
        d = cfg.MODEL.DECOUPLED_RCNN
        transforms = build_stage_transforms(d.STAGE_TARGET_STDS)
        box_head_cls = DecoupledFCHead(cfg, shape, fc_init=d.TOWER_INIT)
        box_head_reg = DecoupledFCHead(cfg, shape, fc_init=d.TOWER_INIT)
        box_predictor = DecoupledOutputLayers(
            cfg, box_head_cls.output_shape, box2box_transform=transforms[0]
        )
        refine_heads = [
            DecoupledFCHead(cfg, shape, fc_init=d.REFINE_TOWER_INIT) for _ in transforms[1:]
        ]
        refine_predictors = [
            RefineOutputLayers(cfg, head.output_shape, stage=k, box2box_transform=t)
            for k, (head, t) in enumerate(zip(refine_heads, transforms[1:]), start=1)
        ]
        return {
            "box_in_features": in_features,
            "box_pooler": box_pooler,
            "box_head": None,
            "box_predictor": box_predictor,
            "box_head_cls": box_head_cls,
            "box_head_reg": box_head_reg,
            "refine_heads": refine_heads,
            "refine_predictors": refine_predictors,
        }

    def forward(
        self,
        images: ImageList,
        features: Dict[str, torch.Tensor],
        proposals,
        targets: Optional[List[Instances]] = None,
    ):
        """
        Args:
            proposals: training: the pair ``(proposals_cls, proposals_reg)`` of `DualNMSRPN`;
                inference: per image ``Instances`` with ``proposal_boxes``.
            targets: per image GT ``Instances`` (``gt_boxes``, ``gt_classes``), training only.
        Returns:
            training: (classification samples, losses); inference: (detections, {}).
        """
        del images
        if not self.training:
            return self._forward_box(features, proposals), {}
        if not (isinstance(proposals, tuple) and len(proposals) == 2):
            raise ValueError(
                "DecoupledROIHeads needs the (classification, regression) proposal pair in "
                "training: set MODEL.PROPOSAL_GENERATOR.NAME to 'DualNMSRPN'"
            )
        if targets is None:
            raise ValueError("DecoupledROIHeads requires 'targets' in training")
        proposals_cls, proposals_reg = proposals
        cls_samples = self.label_and_sample_proposals(proposals_cls, targets)
        reg_samples = label_and_sample_regression_proposals(
            proposals_reg, targets, self.reg_matchers[0], self.reg_batch_size_per_image,
            self.num_classes,
        )
        return cls_samples, self._forward_box_train(features, cls_samples, reg_samples, targets)

    def _forward_box_train(
        self,
        features: Dict[str, torch.Tensor],
        cls_samples: List[Instances],
        reg_samples: List[Instances],
        targets: List[Instances],
    ) -> Dict[str, torch.Tensor]:
        """All training losses of the RoI heads (see module docstring)."""
        features = [features[f] for f in self.box_in_features]
        image_sizes = [x.image_size for x in cls_samples]
        rows = build_stage0_rows(cls_samples, reg_samples)
        x = self.box_pooler(features, [r.proposal_boxes for r in rows])
        predictions = self.box_predictor((self.box_head_cls(x), self.box_head_reg(x)))
        del x
        losses = self.box_predictor.losses(predictions, rows)
        self._log_num_positives(0, [r.reg_classes for r in rows])

        proposals = refine_positive_boxes(
            [r.proposal_boxes.tensor for r in rows],
            [r.reg_classes for r in rows],
            predictions[1].detach(),
            self.box_predictor.box2box_transform,
            image_sizes,
            self.num_classes,
        )
        num_stages = len(self.refine_heads)
        for k, (head, predictor) in enumerate(zip(self.refine_heads, self.refine_predictors), 1):
            samples = label_and_sample_regression_proposals(
                proposals, targets, self.reg_matchers[k], self.reg_batch_size_per_image,
                self.num_classes,
            )
            self._log_num_positives(k, [s.gt_classes for s in samples])
            deltas = predictor(head(self.box_pooler(features, [s.proposal_boxes for s in samples])))
            losses.update(predictor.losses(deltas, samples))
            if k < num_stages:
                proposals = refine_positive_boxes(
                    [s.proposal_boxes.tensor for s in samples],
                    [s.gt_classes for s in samples],
                    deltas.detach(),
                    predictor.box2box_transform,
                    image_sizes,
                    self.num_classes,
                )
        return losses

    def _log_num_positives(self, stage: int, labels: List[torch.Tensor]) -> None:
        if not labels:
            return
        storage = get_event_storage()
        num = sum(int(((x >= 0) & (x < self.num_classes)).sum()) for x in labels)
        storage.put_scalar(f"decoupled_rcnn/num_reg_pos_s{stage}", num / len(labels))

    def _forward_box(self, features: Dict[str, torch.Tensor], proposals: List[Instances]):
        """Inference: per image ``Instances`` with ``pred_boxes``, ``scores``,
        ``pred_classes``.

        Args:
            proposals: per image, ``Instances`` with ``proposal_boxes`` (R_i).
        """
        features = [features[f] for f in self.box_in_features]
        image_sizes = [p.image_size for p in proposals]
        counts = [len(p) for p in proposals]
        x = self.box_pooler(features, [p.proposal_boxes for p in proposals])
        scores, deltas = self.box_predictor((self.box_head_cls(x), self.box_head_reg(x)))
        del x
        probs = F.softmax(scores, dim=-1)
        # Stage 0: the delta of the argmax foreground class (background excluded).
        k = self.num_classes
        best = scores[:, :k].argmax(dim=1)
        deltas = deltas.view(-1, k, 4)[torch.arange(len(best), device=deltas.device), best]
        boxes = decode_and_clip(
            self.box_predictor.box2box_transform,
            deltas,
            [p.proposal_boxes.tensor for p in proposals],
            image_sizes,
        )
        for head, predictor in zip(self.refine_heads, self.refine_predictors):
            deltas = predictor(head(self.box_pooler(features, [Boxes(b) for b in boxes])))
            boxes = decode_and_clip(predictor.box2box_transform, deltas, boxes, image_sizes)
        return self.box_predictor.postprocess(boxes, list(probs.split(counts)), image_sizes)
