"""The TSD box head (paper §3.1–3.2): offset generators, the two task-specific
proposals P̂_c / P̂_r, their deformable pooling, separate classification/regression towers and
the TSD predictor. The sibling 2fc head is Detectron2's own box head/predictor and lives in
the ROI heads (`roi_heads.py`).

Shapes: R RoIs, C FPN channels, k pooled size (7), K foreground classes (background = K).
"""
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from detectron2.config import configurable
from detectron2.layers import ShapeSpec, cat, cross_entropy
from detectron2.modeling.box_regression import Box2BoxTransform
from detectron2.modeling.poolers import convert_boxes_to_pooler_format
from detectron2.modeling.roi_heads.box_head import FastRCNNConvFCHead
from detectron2.modeling.roi_heads.fast_rcnn import FastRCNNOutputLayers
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import get_event_storage

from .geometry import translate_boxes
from .losses import pc_cls_loss, pc_loc_loss
from .pooling import fpn_levels, level_range, multi_level_deform_roi_pool

__all__ = ["TSDOffsetGenerator", "TSDOutputLayers", "TSDHead"]


def _kaiming_fan_in(layer: nn.Linear) -> None:
    """mmdet ``kaiming_init(a=1, mode='fan_in', distribution='normal')``: std 1/sqrt(fan_in)."""
    nn.init.kaiming_normal_(layer.weight, a=1, mode="fan_in", nonlinearity="leaky_relu")
    nn.init.constant_(layer.bias, 0)


class TSDOffsetGenerator(nn.Module):
    """F_c and F_r of the paper (Eq. 3, 5): a shared first fc, then two 2-fc stacks.

    Input: the RoIAlign feature x of P, (R, C, k, k), flattened C-major.
    Outputs: ΔC (R, 2, k, k) — channel 0 = x, 1 = y, row-major bins — and
    ΔR (R, 2) = (dx, dy).
    Both are raw (unbounded); the γ·(w, h) scaling happens in the pooling / translation.
    Not zero-initialised: offsets are random and non-zero at step 0.
    """

    def __init__(self, in_channels: int, resolution: int, hidden_dim: int = 256):
        super().__init__()
        self.resolution = resolution
        in_dim = in_channels * resolution * resolution
        self.offset_fc = nn.Linear(in_dim, hidden_dim)  # mmdet shared_fc.0
        self.delta_c_fc1 = nn.Linear(hidden_dim, hidden_dim)  # delta_c.0
        self.delta_c_fc2 = nn.Linear(hidden_dim, 2 * resolution * resolution)  # delta_c.2
        self.delta_r_fc1 = nn.Linear(hidden_dim, hidden_dim)  # delta_r.0
        self.delta_r_fc2 = nn.Linear(hidden_dim, 2)  # delta_r.2
        for layer in self.children():
            _kaiming_fan_in(layer)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        h = F.relu(self.offset_fc(x.flatten(1)))
        delta_c = self.delta_c_fc2(F.relu(self.delta_c_fc1(h)))
        delta_r = self.delta_r_fc2(F.relu(self.delta_r_fc1(h)))
        k = self.resolution
        return delta_c.view(-1, 2, k, k), delta_r


class TSDOutputLayers(FastRCNNOutputLayers):
    """TSD_fc_cls / TSD_fc_reg as a `FastRCNNOutputLayers`.

    ``forward(cls_feature, reg_feature)`` takes the two task towers' outputs. Its predictions
    are the tuple ``(scores (R, K+1), deltas (R, 4K), translated_boxes (R, 4))``: boxes are
    encoded and decoded relative to the translated proposal P̂_r, which carries a
    gradient into ΔR. Losses are named ``loss_tsd_cls`` and ``loss_tsd_box_reg``.

    Both layers keep PyTorch's default nn.Linear init (the authors' ``init_weights`` never
    touched them).
    """

    @configurable
    def __init__(
        self, input_shape: ShapeSpec, *, detach_translated_targets: bool = False, **kwargs
    ):
        """
        Args:
            detach_translated_targets: stop the regression-target gradient into ΔR (the
                authors' code does not detach).
            other args: see `FastRCNNOutputLayers`.
        """
        super().__init__(input_shape, **kwargs)
        self.detach_translated_targets = detach_translated_targets
        self.cls_score.reset_parameters()
        self.bbox_pred.reset_parameters()

    @classmethod
    def from_config(cls, cfg, input_shape):
        ret = super().from_config(cfg, input_shape)
        ret["detach_translated_targets"] = cfg.MODEL.TSD.DETACH_TRANSLATED_TARGETS
        return ret

    def forward(self, cls_feature: torch.Tensor, reg_feature: torch.Tensor):
        """(R, D) tower outputs -> (scores (R, K+1), deltas (R, 4K))."""
        return self.cls_score(cls_feature.flatten(1)), self.bbox_pred(reg_feature.flatten(1))

    def losses(self, predictions, proposals: List[Instances]) -> Dict[str, torch.Tensor]:
        """TSD classification and regression losses.

        Same labels and normalisation as the sibling; regression targets are the matched GT
        encoded relative to P̂_r (``predictions[2]``), not detached unless configured.
        """
        scores, deltas, translated = predictions
        gt_classes = cat([p.gt_classes for p in proposals], dim=0) if proposals else None
        if gt_classes is None or gt_classes.numel() == 0:
            zero = scores.sum() * 0.0 + deltas.sum() * 0.0 + translated.sum() * 0.0
            return {"loss_tsd_cls": zero, "loss_tsd_box_reg": zero}
        self._log_accuracy(scores, gt_classes)
        gt_boxes = cat(
            [(p.gt_boxes if p.has("gt_boxes") else p.proposal_boxes).tensor for p in proposals]
        )
        src = translated.detach() if self.detach_translated_targets else translated
        size = src[:, 2:] - src[:, :2]
        if torch.isfinite(src).all() and (size > 0).all():
            box_loss = self.box_reg_loss(src, gt_boxes, deltas, gt_classes)
        else:
            # The translation keeps the proposal's size, so a lost size means exploded offsets
            # (training diverged; the coordinates rounded away the width). Box2BoxTransform
            # would stop with an AssertionError: report a NaN loss instead, so the trainer
            # stops with Detectron2's FloatingPointError naming the loss and the iteration.
            box_loss = deltas.sum() * float("nan")
        losses = {
            "loss_tsd_cls": cross_entropy(scores, gt_classes, reduction="mean"),
            "loss_tsd_box_reg": box_loss,
        }
        return {k: v * self.loss_weight.get(k.replace("tsd_", ""), 1.0) for k, v in losses.items()}

    def _log_accuracy(self, scores: torch.Tensor, gt_classes: torch.Tensor) -> None:
        pred = scores.argmax(dim=1)
        fg = gt_classes < self.num_classes
        storage = get_event_storage()
        storage.put_scalar("tsd/cls_accuracy", (pred == gt_classes).float().mean().item())
        if fg.any():
            fg_acc = (pred[fg] == gt_classes[fg]).float().mean().item()
            storage.put_scalar("tsd/fg_cls_accuracy", fg_acc)

    def predict_boxes(self, predictions, proposals: List[Instances]):
        """Per image (R_i, 4K) boxes decoded from P̂_r."""
        if not len(proposals):
            return []
        _, deltas, translated = predictions
        boxes = self.box2box_transform.apply_deltas(deltas, translated)
        return boxes.split([len(p) for p in proposals])

    def predict_boxes_for_classes(self, predictions, classes: torch.Tensor) -> torch.Tensor:
        """(R, 4) boxes decoded from P̂_r with the deltas of ``classes`` (R,) in [0, K)."""
        _, deltas, translated = predictions
        R = deltas.shape[0]
        if deltas.shape[1] != 4:  # class-specific regression
            rows = torch.arange(R, device=deltas.device)
            deltas = deltas.view(R, deltas.shape[1] // 4, 4)[rows, classes]
        return self.box2box_transform.apply_deltas(deltas, translated)

    def predict_boxes_for_gt_classes(self, predictions, proposals: List[Instances]):
        """Per image (R_i, 4): boxes of the gt class (background rows use class K-1, like D2)."""
        if not len(proposals):
            return []
        gt_classes = cat([p.gt_classes for p in proposals]).clamp(0, self.num_classes - 1)
        boxes = self.predict_boxes_for_classes(predictions, gt_classes)
        return boxes.split([len(p) for p in proposals])

    def predict_probs(self, predictions, proposals: List[Instances]):
        """Per image (R_i, K+1) softmax of the TSD logits."""
        scores = predictions[0]
        return F.softmax(scores, dim=-1).split([len(p) for p in proposals], dim=0)


class TSDHead(nn.Module):
    """The TSD part of one box head.

    ``forward(x, features, proposal_boxes)`` returns the TSD predictions
    ``(scores (R, K+1), deltas (R, 4K), P̂_r boxes (R, 4))`` and the raw offsets
    ``(ΔC (R, 2, k, k), ΔR (R, 2))``. `losses` adds the PC losses to the predictor's losses.
    """

    @configurable
    def __init__(
        self,
        *,
        offset_generator: TSDOffsetGenerator,
        cls_head: nn.Module,
        reg_head: nn.Module,
        predictor: TSDOutputLayers,
        pooler_scales: Tuple[float, ...],
        resolution: int = 7,
        samples_per_bin: int = 4,
        gamma: float = 0.1,
        legacy: bool = False,
        canonical_box_size: float = 224.0,
        canonical_level: int = 4,
        pc_enabled: bool = True,
        cls_pc_margin: float = 0.3,
        loc_pc_margin: float = 0.3,
    ):
        """
        Args:
            offset_generator: produces ΔC, ΔR from the RoIAlign feature of P.
            cls_head, reg_head: fc towers on F̂_c (classification) and F̂_r (regression).
            predictor: TSD_fc_cls / TSD_fc_reg.
            pooler_scales: 1/stride of each input FPN level, finest first.
            resolution: k. samples_per_bin: S. gamma: γ of Eq. 3/5.
            legacy: authors' coordinate conventions ("+1" widths, rounded pooling, mmdet level
                rule, "+1" IoU) instead of Detectron2's continuous ones.
            canonical_box_size, canonical_level: FPN level rule (as the box pooler).
            pc_enabled: add the progressive-constraint losses.
            cls_pc_margin, loc_pc_margin: m_c, m_r.
        """
        super().__init__()
        self.offset_generator = offset_generator
        self.cls_head = cls_head
        self.reg_head = reg_head
        self.predictor = predictor
        self.pooler_scales = tuple(pooler_scales)
        self.min_level, self.max_level = level_range(list(pooler_scales))
        self.resolution = resolution
        self.samples_per_bin = samples_per_bin
        self.gamma = gamma
        self.legacy = legacy
        self.canonical_box_size = canonical_box_size
        self.canonical_level = canonical_level
        self.pc_enabled = pc_enabled
        self.cls_pc_margin = cls_pc_margin
        self.loc_pc_margin = loc_pc_margin

    @classmethod
    def from_config(cls, cfg, input_shape, box2box_transform: Optional[Box2BoxTransform] = None):
        """``input_shape``: dict of the ROI heads' input ShapeSpecs (FPN levels)."""
        in_features = cfg.MODEL.ROI_HEADS.IN_FEATURES
        channels = {input_shape[f].channels for f in in_features}
        assert len(channels) == 1, f"TSD needs equal channels on {in_features}, got {channels}"
        C, k = channels.pop(), cfg.MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION
        fc_dims = [cfg.MODEL.TSD.FC_DIM] * cfg.MODEL.TSD.NUM_FC
        assert fc_dims, "MODEL.TSD.NUM_FC must be >= 1"
        pooled = ShapeSpec(channels=C, height=k, width=k)
        cls_head = FastRCNNConvFCHead(pooled, conv_dims=[], fc_dims=fc_dims)
        reg_head = FastRCNNConvFCHead(pooled, conv_dims=[], fc_dims=fc_dims)
        for tower in (cls_head, reg_head):  # mmdet kaiming(a=1, fan_in) normal init
            for m in tower.modules():
                if isinstance(m, nn.Linear):
                    _kaiming_fan_in(m)
        extra = {} if box2box_transform is None else {"box2box_transform": box2box_transform}
        return {
            "offset_generator": TSDOffsetGenerator(C, k, cfg.MODEL.TSD.OFFSET_FC_DIM),
            "cls_head": cls_head,
            "reg_head": reg_head,
            "predictor": TSDOutputLayers(cfg, cls_head.output_shape, **extra),
            "pooler_scales": tuple(1.0 / input_shape[f].stride for f in in_features),
            # fmt: off
            "resolution"      : k,
            "samples_per_bin" : cfg.MODEL.TSD.SAMPLES_PER_BIN,
            "gamma"           : cfg.MODEL.TSD.GAMMA,
            "legacy"          : cfg.MODEL.TSD.LEGACY_COORDS,
            "pc_enabled"      : cfg.MODEL.TSD.PC_ENABLED,
            "cls_pc_margin"   : cfg.MODEL.TSD.CLS_PC_MARGIN,
            "loc_pc_margin"   : cfg.MODEL.TSD.LOC_PC_MARGIN,
            # fmt: on
        }

    def pool(self, features: List[torch.Tensor], rois: torch.Tensor, levels, delta_c, delta_r):
        """Deformable pooling of P̂_c and P̂_r in one pass.

        Args:
            features: FPN maps, finest first. rois: (R, 5) pooler-format untranslated P.
            levels: (R,) level of each RoI. delta_c: (R, 2, k, k). delta_r: (R, 2).
        Returns:
            F̂_c, F̂_r: each (R, C, k, k).
        """
        R, k = rois.shape[0], self.resolution
        offsets = torch.cat([delta_c, delta_r[:, :, None, None].expand(R, 2, k, k)], dim=0)
        with torch.profiler.record_function("tsd/deform_roi_pool"):
            pooled = multi_level_deform_roi_pool(
                features,
                self.pooler_scales,
                torch.cat([rois, rois], dim=0),
                torch.cat([levels, levels], dim=0),
                offsets,
                output_size=k,
                samples_per_bin=self.samples_per_bin,
                gamma=self.gamma,
                legacy=self.legacy,
            )
        return pooled[:R], pooled[R:]

    def forward(self, x: torch.Tensor, features: List[torch.Tensor], proposal_boxes: List[Boxes]):
        """
        Args:
            x: (R, C, k, k) RoIAlign features of the proposals P (the sibling's input).
            features: FPN maps (N, C, H_l, W_l), finest first (the box pooler's levels).
            proposal_boxes: per image Boxes of P (XYXY image pixels), R in total.

        Returns:
            predictions: (scores (R, K+1), deltas (R, 4K), P̂_r (R, 4)).
            offsets: (ΔC (R, 2, k, k), ΔR (R, 2)).
        """
        rois = convert_boxes_to_pooler_format(proposal_boxes)
        delta_c, delta_r = self.offset_generator(x)
        levels = fpn_levels(
            rois[:, 1:],
            self.min_level,
            self.max_level,
            self.canonical_box_size,
            self.canonical_level,
            self.legacy,
        )
        f_c, f_r = self.pool(features, rois, levels, delta_c, delta_r)
        scores, deltas = self.predictor(self.cls_head(f_c), self.reg_head(f_r))
        translated = translate_boxes(rois[:, 1:], delta_r, self.gamma, self.legacy)
        return (scores, deltas, translated), (delta_c, delta_r)

    def losses(
        self,
        predictions,
        sibling_predictions: Tuple[torch.Tensor, torch.Tensor],
        sibling_box2box: Box2BoxTransform,
        proposals: List[Instances],
    ) -> Dict[str, torch.Tensor]:
        """TSD losses + PC losses on the sampled proposals.

        Args:
            predictions: output of `forward` (first element).
            sibling_predictions: (logits (R, K+1), deltas (R, 4K)) of the sibling head on P.
            sibling_box2box: the sibling's box coder (same weights as the TSD one).
            proposals: sampled proposals with gt_classes / gt_boxes.
        """
        losses = self.predictor.losses(predictions, proposals)
        if not self.pc_enabled:
            return losses
        scores, deltas, translated = predictions
        num_per_image = [len(p) for p in proposals]
        if sum(num_per_image) == 0:
            zero = scores.sum() * 0.0
            losses.update({"loss_pc_cls": zero, "loss_pc_loc": zero + translated.sum() * 0.0})
            return losses
        gt_classes = cat([p.gt_classes for p in proposals])
        K = self.predictor.num_classes
        fg = gt_classes < K
        sib_logits, sib_deltas = sibling_predictions
        losses["loss_pc_cls"] = pc_cls_loss(
            sib_logits, scores, gt_classes, num_per_image, self.cls_pc_margin
        )
        gt_boxes = cat(
            [(p.gt_boxes if p.has("gt_boxes") else p.proposal_boxes).tensor for p in proposals]
        )
        P = cat([p.proposal_boxes.tensor for p in proposals])
        cls_idx = gt_classes.clamp(0, K - 1)
        R = P.shape[0]
        rows = torch.arange(R, device=P.device)
        if sib_deltas.shape[1] == 4:  # class-agnostic sibling
            sib_sel = sib_deltas
        else:
            sib_sel = sib_deltas.view(R, sib_deltas.shape[1] // 4, 4)[rows, cls_idx]
        sibling_boxes = sibling_box2box.apply_deltas(sib_sel.detach(), P)
        tsd_boxes = self.predictor.predict_boxes_for_classes(predictions, cls_idx)
        losses["loss_pc_loc"] = pc_loc_loss(
            sibling_boxes, tsd_boxes, gt_boxes, fg, num_per_image, self.loc_pc_margin, self.legacy
        )
        return losses
