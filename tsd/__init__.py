"""TSD ("Revisiting the Sibling Head in Object Detector", Song et al., CVPR 2020) as a
Detectron2 plug-in. Importing the package registers `TSDROIHeads` and `TSDCascadeROIHeads`
in ``ROI_HEADS_REGISTRY``."""
from .config import add_tsd_config
from .head import TSDHead, TSDOffsetGenerator, TSDOutputLayers
from .pooling import deform_roi_pool, multi_level_deform_roi_pool
from .roi_heads import TSDCascadeROIHeads, TSDROIHeads  # noqa: F401 (registration)

__all__ = [
    "add_tsd_config",
    "TSDHead",
    "TSDOffsetGenerator",
    "TSDOutputLayers",
    "TSDROIHeads",
    "TSDCascadeROIHeads",
    "deform_roi_pool",
    "multi_level_deform_roi_pool",
]
