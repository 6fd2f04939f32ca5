"""RDSNet (AAAI 2020) as a Detectron2 plug-in. Importing the package registers its components:
META_ARCH "RDSNet", BACKBONE "build_rdsnet_resnet_fpn_backbone", ANCHOR_GENERATOR
"RDSNetMMDetAnchorGenerator".
"""
from . import anchor_generator, backbone  # noqa: F401  (registration)
from .anchor_generator import RDSNetMMDetAnchorGenerator
from .backbone import build_rdsnet_resnet_fpn_backbone
from .config import add_rdsnet_config
from .mbrm import MBRM
from .object_stream import RDSNetHead
from .pixel_stream import PixelStream
from .rdsnet import RDSNet

__all__ = [
    "add_rdsnet_config",
    "build_rdsnet_resnet_fpn_backbone",
    "MBRM",
    "PixelStream",
    "RDSNet",
    "RDSNetHead",
    "RDSNetMMDetAnchorGenerator",
]
