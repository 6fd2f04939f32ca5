"""Matcher for dynamic label assignment (paper §3.1).

One mutable threshold T_now: a proposal is foreground iff its max IoU with the GT boxes is
``>= T_now`` (label 1), background otherwise (label 0). There is no ignore band and no
low-quality matching. While recording, the matcher keeps every IoU matrix it is called with and
its result, so the ROI heads can compute the IoU statistic without recomputing IoUs and without
re-implementing Detectron2's `label_and_sample_proposals`.
"""
from typing import List, Tuple

import torch
from detectron2.modeling.matcher import Matcher

__all__ = ["DynamicMatcher"]


class DynamicMatcher(Matcher):
    """`Matcher(thresholds=[T_now], labels=[0, 1], allow_low_quality_matches=False)` with a
    settable `threshold` and optional recording of its inputs/outputs."""

    def __init__(self, threshold: float):
        super().__init__([float(threshold)], [0, 1], allow_low_quality_matches=False)
        self._recording = False
        self._records: List[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    @property
    def threshold(self) -> float:
        """T_now: the single fg/bg IoU threshold (``self.thresholds == [-inf, T_now, inf]``)."""
        return self.thresholds[1]

    @threshold.setter
    def threshold(self, value: float) -> None:
        value = float(value)
        if not 0.0 < value <= 1.0:
            raise ValueError(f"Dynamic R-CNN IoU threshold must lie in (0, 1], got {value}")
        self.thresholds[1] = value

    def start_recording(self) -> None:
        self._recording, self._records = True, []

    def stop_recording(self) -> List[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Stop recording; return ``[(iou_matrix (G, N), matches (N,), labels (N,)), ...]``,
        one entry per call (= per image, in order)."""
        records, self._recording, self._records = self._records, False, []
        return records

    def __call__(self, match_quality_matrix: torch.Tensor):
        matches, labels = super().__call__(match_quality_matrix)
        if self._recording:
            self._records.append((match_quality_matrix, matches, labels))
        return matches, labels
