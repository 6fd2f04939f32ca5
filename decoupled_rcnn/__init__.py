"""Decoupled R-CNN ("Decoupled R-CNN: Sensitivity-Specific Detector for Higher Accurate
Localization", TCSVT 2022) as a Detectron2 plug-in. Importing the package registers
``DecoupledRCNN`` (META_ARCH_REGISTRY), ``DualNMSRPN`` (PROPOSAL_GENERATOR_REGISTRY),
``DecoupledROIHeads`` (ROI_HEADS_REGISTRY) and
its test-time-augmentation builder (`projects_common.tta`)."""
from . import tta  # noqa: F401  (registers the TTA builder)
from .config import add_decoupled_rcnn_config
from .heads import DecoupledFCHead, DecoupledOutputLayers, RefineOutputLayers
from .meta_arch import DecoupledRCNN
from .roi_heads import DecoupledROIHeads
from .rpn import DualNMSRPN

__all__ = [
    "add_decoupled_rcnn_config",
    "DecoupledFCHead",
    "DecoupledOutputLayers",
    "DecoupledRCNN",
    "DecoupledROIHeads",
    "DualNMSRPN",
    "RefineOutputLayers",
]
