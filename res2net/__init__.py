"""Res2Net (Gao et al., TPAMI 2021) as a Detectron2 backbone plug-in.

Importing the package registers the backbones ``build_res2net_backbone``,
``build_res2net_fpn_backbone`` and ``build_res2net_p67_fpn_backbone`` in ``BACKBONE_REGISTRY``.
"""
from . import backbone  # noqa: F401  (registers the backbones)
from .backbone import (
    build_res2net,
    build_res2net_backbone,
    build_res2net_fpn_backbone,
    build_res2net_p67_fpn_backbone,
)
from .blocks import Bottle2neckBlock, DeepStem
from .config import add_res2net_config

__all__ = [
    "Bottle2neckBlock",
    "DeepStem",
    "add_res2net_config",
    "build_res2net",
    "build_res2net_backbone",
    "build_res2net_fpn_backbone",
    "build_res2net_p67_fpn_backbone",
]
