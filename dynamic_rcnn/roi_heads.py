"""`DynamicROIHeads`: StandardROIHeads with dynamic label assignment and dynamic SmoothL1.

Paper: Zhang et al., "Dynamic R-CNN", ECCV 2020, §3.1 (DLA) and §3.2 (DSL), Algorithm 1.

Per training iteration:
1. the matcher labels proposals with the current threshold T_now (IoU >= T_now is foreground);
2. the box loss is SmoothL1 with the current beta_now (``box_predictor.smooth_l1_beta``);
3. the IoU statistic I_k and the beta statistic E_k of this batch are recorded in
   `DynamicTrainingState`, which updates T_now / beta_now every C iterations (effective from the
   next iteration);
4. the values in force (``dynamic_rcnn/iou_thr``, ``dynamic_rcnn/beta``) and the statistics
   (``dynamic_rcnn/iou_stat``, ``dynamic_rcnn/beta_stat``, when recorded) go to the event storage.
At inference the head is exactly a `StandardROIHeads`.
"""
from typing import Dict, List, Optional, Tuple

import torch
from detectron2.config import configurable
from detectron2.modeling.proposal_generator.proposal_utils import add_ground_truth_to_proposals
from detectron2.modeling.roi_heads import ROI_HEADS_REGISTRY, StandardROIHeads
from detectron2.structures import ImageList, Instances
from detectron2.utils.events import get_event_storage

from .matcher import DynamicMatcher
from .state import DynamicTrainingState
from .statistics import (
    beta_statistic,
    iou_statistic_mmdet,
    iou_statistic_original,
    original_recorded_ious,
    regression_label_magnitude,
)

__all__ = ["DynamicROIHeads"]

_STATISTICS = ("mmdet", "original")


@ROI_HEADS_REGISTRY.register()
class DynamicROIHeads(StandardROIHeads):
    """Standard Faster/Mask R-CNN ROI heads whose R-CNN IoU threshold and SmoothL1 beta follow
    the statistics of the proposals during training (Dynamic R-CNN)."""

    @configurable
    def __init__(
        self,
        *,
        dynamic_state: DynamicTrainingState,
        k_i: int = 75,
        k_beta: int = 10,
        statistics: str = "mmdet",
        **kwargs,
    ):
        """
        Args:
            dynamic_state: windows and current T_now / beta_now.
            k_i: K_I of the IoU statistic.
            k_beta: K_beta of the beta statistic.
            statistics: "mmdet" or "original" (see `dynamic_rcnn.statistics`).
            kwargs: `StandardROIHeads` arguments; ``proposal_matcher`` must be a
                `DynamicMatcher` and ``box_predictor`` must use the smooth_l1 box loss.
        """
        super().__init__(**kwargs)
        if not isinstance(self.proposal_matcher, DynamicMatcher):
            raise TypeError(
                "DynamicROIHeads needs a DynamicMatcher, got "
                f"{type(self.proposal_matcher).__name__}"
            )
        if getattr(self.box_predictor, "box_reg_loss_type", "smooth_l1") != "smooth_l1":
            raise ValueError(
                "DynamicROIHeads needs MODEL.ROI_BOX_HEAD.BBOX_REG_LOSS_TYPE 'smooth_l1', got "
                f"{self.box_predictor.box_reg_loss_type!r}"
            )
        if statistics not in _STATISTICS:
            raise ValueError(
                f"MODEL.DYNAMIC_RCNN.STATISTICS must be one of {_STATISTICS}, got {statistics!r}"
            )
        if k_i < 1 or k_beta < 1:
            raise ValueError(f"MODEL.DYNAMIC_RCNN.KI and KBETA must be >= 1, got {k_i}, {k_beta}")
        self.dynamic_state = dynamic_state
        self.k_i = int(k_i)
        self.k_beta = int(k_beta)
        self.statistics = statistics
        self._pending: Tuple[Optional[torch.Tensor], Optional[torch.Tensor]] = (None, None)
        # the predictor starts with the current beta (e.g. after loading a checkpoint it is
        # refreshed at the start of every training forward)
        self.box_predictor.smooth_l1_beta = self.dynamic_state.current(rank=0)[1]

    @classmethod
    def from_config(cls, cfg, input_shape):
        ret = super().from_config(cfg, input_shape)
        dc = cfg.MODEL.DYNAMIC_RCNN
        ret["proposal_matcher"] = DynamicMatcher(dc.INITIAL_IOU)
        ret["dynamic_state"] = DynamicTrainingState(
            update_iters=dc.UPDATE_ITERS,
            initial_iou=dc.INITIAL_IOU,
            iou_floor=dc.IOU_FLOOR,
            initial_beta=dc.INITIAL_BETA,
            beta_cap=dc.BETA_CAP,
            beta_eps=dc.BETA_EPS,
            median=dc.MEDIAN,
            sync=dc.SYNC_STATS,
        )
        ret["k_i"] = dc.KI
        ret["k_beta"] = dc.KBETA
        ret["statistics"] = dc.STATISTICS
        return ret

    # ------------------------------------------------------------------ training forward
    def forward(
        self,
        images: ImageList,
        features: Dict[str, torch.Tensor],
        proposals: List[Instances],
        targets: Optional[List[Instances]] = None,
    ):
        if not self.training:
            return super().forward(images, features, proposals, targets)
        iou_thr, beta = self.dynamic_state.current()
        self.proposal_matcher.threshold = iou_thr
        self.box_predictor.smooth_l1_beta = beta
        self._pending = (None, None)
        out = super().forward(images, features, proposals, targets)
        iou_stat, beta_stat = self._pending
        self._pending = (None, None)

        # the values in force are logged as they are (no smoothing over the writer's window)
        storage = get_event_storage()
        storage.put_scalar("dynamic_rcnn/iou_thr", iou_thr, smoothing_hint=False)
        storage.put_scalar("dynamic_rcnn/beta", beta, smoothing_hint=False)
        if iou_stat is not None:
            storage.put_scalar("dynamic_rcnn/iou_stat", float(iou_stat))
        if beta_stat is not None:
            storage.put_scalar("dynamic_rcnn/beta_stat", float(beta_stat))
        # after this iteration's losses were built; an update applies from the next iteration
        self.dynamic_state.record(iou_stat, beta_stat)
        return out

    @torch.no_grad()
    def label_and_sample_proposals(
        self, proposals: List[Instances], targets: List[Instances]
    ) -> List[Instances]:
        """Detectron2's labelling/sampling with the dynamic matcher, plus this batch's I_k, E_k."""
        self.proposal_matcher.start_recording()
        try:
            sampled = super().label_and_sample_proposals(proposals, targets)
        finally:
            records = self.proposal_matcher.stop_recording()
        if len(records) != len(targets):
            raise RuntimeError(
                f"DynamicROIHeads: expected {len(targets)} matcher calls, saw {len(records)}"
            )
        if self.statistics == "mmdet":
            self._pending = (
                self._iou_statistic_mmdet(records),
                self._beta_statistic_mmdet(sampled),
            )
        else:
            self._pending = self._statistics_original(proposals, targets, records)
        return sampled

    # ------------------------------------------------------------------ statistics
    def _iou_statistic_mmdet(self, records) -> Optional[torch.Tensor]:
        """Per image: min(K_I, N_i)-th largest max-IoU of all proposals (+ appended GTs);
        mean over all images of the batch (an image without GT boxes contributes 0)."""
        max_ious = [
            m.max(dim=0).values if m.shape[0] > 0 else m.new_zeros(m.shape[1])
            for m, _, _ in records
        ]
        return iou_statistic_mmdet(max_ious, self.k_i)

    def _beta_statistic_mmdet(self, sampled: List[Instances]) -> Optional[torch.Tensor]:
        """min(K_beta * n, #pos)-th smallest (|dx|+|dy|)/2 over the sampled positive RoIs."""
        magnitudes = []
        for inst in sampled:
            if not inst.has("gt_boxes"):
                continue  # image without GT: no positives
            fg = (inst.gt_classes >= 0) & (inst.gt_classes < self.num_classes)
            if fg.any():
                deltas = self.box_predictor.box2box_transform.get_deltas(
                    inst.proposal_boxes.tensor[fg], inst.gt_boxes.tensor[fg]
                )
                magnitudes.append(regression_label_magnitude(deltas))
        if not magnitudes:
            return None
        return beta_statistic(torch.cat(magnitudes), self.k_beta * len(sampled))

    def _statistics_original(self, proposals, targets, records):
        """The authors' definitions: pooled (K_I * n)-th largest IoU with the GT#0 quirk; beta
        statistic over all proposals before sampling (negatives measured against GT #0)."""
        if self.proposal_append_gt:
            proposals = add_ground_truth_to_proposals(targets, proposals)
        recorded, magnitudes = [], []
        thr = self.proposal_matcher.threshold
        for props, tgt, (m, matches, labels) in zip(proposals, targets, records):
            if m.shape[0] == 0 or m.shape[1] == 0:
                continue
            if m.shape[1] != len(props):
                raise RuntimeError(
                    f"DynamicROIHeads: IoU matrix has {m.shape[1]} columns for "
                    f"{len(props)} proposals"
                )
            recorded.append(original_recorded_ious(m, thr))
            gt_index = torch.where(labels == 1, matches, torch.zeros_like(matches))
            # a zero-size proposal gives a non-finite label, which beta_statistic leaves out
            deltas = self.box_predictor.box2box_transform.get_deltas(
                props.proposal_boxes.tensor, tgt.gt_boxes.tensor[gt_index]
            )
            magnitudes.append(regression_label_magnitude(deltas))
        iou_stat = iou_statistic_original(recorded, self.k_i)
        beta_stat = (
            beta_statistic(torch.cat(magnitudes), self.k_beta * len(magnitudes))
            if magnitudes
            else None
        )
        return iou_stat, beta_stat
