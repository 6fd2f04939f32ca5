"""ResNet + FPN (P3-P7) backbone of RDSNet.

Like Detectron2's `build_retinanet_resnet_fpn_backbone`, but the P6/P7 top block is chosen by
`MODEL.RDSNET.P67_IN_FEATURE` ("res5": P6 from C5, as mmdet's ``extra_convs_on_inputs=True``;
or "p5") and `MODEL.RDSNET.P67_RELU_BEFORE_P7` (mmdet v1 has no ReLU before P7), via
`projects_common.fpn.build_p6p7_block`. Outputs p3..p7 (strides 8..128, `MODEL.FPN.OUT_CHANNELS`).
The Res2Net trunk is composed through its own registered builder
(``build_res2net_p67_fpn_backbone`` with `MODEL.RES2NET.P67_*`).
"""
from detectron2.layers import ShapeSpec
from detectron2.modeling.backbone import BACKBONE_REGISTRY, FPN
from detectron2.modeling.backbone.resnet import build_resnet_backbone

from projects_common.fpn import build_p6p7_block

__all__ = ["build_rdsnet_resnet_fpn_backbone"]


@BACKBONE_REGISTRY.register()
def build_rdsnet_resnet_fpn_backbone(cfg, input_shape: ShapeSpec):
    """ResNet (`MODEL.RESNETS.*`) + FPN (`MODEL.FPN.*`) + P6/P7 (`MODEL.RDSNET.P67_*`)."""
    bottom_up = build_resnet_backbone(cfg, input_shape)
    out_channels = cfg.MODEL.FPN.OUT_CHANNELS
    in_feature = cfg.MODEL.RDSNET.P67_IN_FEATURE
    if in_feature == "res5":
        if "res5" not in bottom_up.output_shape():
            raise ValueError(
                "MODEL.RDSNET.P67_IN_FEATURE='res5' needs 'res5' in MODEL.RESNETS.OUT_FEATURES, "
                f"got {cfg.MODEL.RESNETS.OUT_FEATURES}"
            )
        in_channels = bottom_up.output_shape()["res5"].channels
    else:
        in_channels = out_channels
    top_block = build_p6p7_block(
        in_channels, out_channels, in_feature, cfg.MODEL.RDSNET.P67_RELU_BEFORE_P7
    )
    return FPN(
        bottom_up=bottom_up,
        in_features=cfg.MODEL.FPN.IN_FEATURES,
        out_channels=out_channels,
        norm=cfg.MODEL.FPN.NORM,
        top_block=top_block,
        fuse_type=cfg.MODEL.FPN.FUSE_TYPE,
    )
