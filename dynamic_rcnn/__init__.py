"""Dynamic R-CNN (Zhang et al., ECCV 2020) as a Detectron2 plug-in.

Importing the package registers `DynamicROIHeads` in Detectron2's ``ROI_HEADS_REGISTRY``.
"""
from .config import add_dynamic_rcnn_config
from .matcher import DynamicMatcher
from .roi_heads import DynamicROIHeads  # noqa: F401  (registration side effect)
from .state import DynamicTrainingState
from .tta import build_dynamic_rcnn_tta  # noqa: F401  (registers the TTA builder)

__all__ = [
    "add_dynamic_rcnn_config",
    "DynamicMatcher",
    "DynamicROIHeads",
    "DynamicTrainingState",
    "build_dynamic_rcnn_tta",
]
