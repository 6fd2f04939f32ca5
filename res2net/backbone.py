"""Res2Net trunk and its Detectron2 backbones (trunk, trunk + FPN P2-P6, trunk + FPN + P6/P7).

The trunk is Detectron2's `ResNet` container (stage naming res2..res5, `freeze`, output shapes)
filled with `Bottle2neckBlock` stages and a v1 (7x7, `BasicStem`) or v1b (`DeepStem`) stem.
"""
from typing import List, Optional, Sequence

from detectron2.layers import ShapeSpec
from detectron2.modeling.backbone import BACKBONE_REGISTRY, FPN, ResNet
from detectron2.modeling.backbone.fpn import LastLevelMaxPool
from detectron2.modeling.backbone.resnet import BasicStem

from projects_common.fpn import build_p6p7_block

from .blocks import Bottle2neckBlock, DeepStem
from .layers import make_norm

__all__ = [
    "BLOCKS_PER_STAGE",
    "VARIANTS",
    "build_res2net",
    "build_res2net_backbone",
    "build_res2net_fpn_backbone",
    "build_res2net_p67_fpn_backbone",
]

BLOCKS_PER_STAGE = {50: [3, 4, 6, 3], 101: [3, 4, 23, 3], 152: [3, 8, 36, 3]}
VARIANTS = ("v1", "v1b")


def build_res2net(
    *,
    depth: int = 50,
    scale: int = 4,
    base_width: int = 26,
    variant: str = "v1b",
    norm: str = "FrozenBN",
    gn_num_groups: int = 2,
    in_channels: int = 3,
    stem_out_channels: int = 64,
    res2_out_channels: int = 256,
    freeze_at: int = 0,
    out_features: Optional[Sequence[str]] = ("res2", "res3", "res4", "res5"),
    stride_in_1x1: bool = False,
    res5_dilation: int = 1,
    pool_stride1: bool = True,
    deform_on_per_stage: Sequence[bool] = (False, False, False, False),
    deform_modulated: bool = False,
    deform_num_groups: int = 1,
    zero_init_residual: bool = False,
    num_classes: Optional[int] = None,
) -> ResNet:
    """Build a Res2Net trunk.

    Stage k = 2..5 has blocks ``BLOCKS_PER_STAGE[depth]``, split width ``base_width * 2^(k-2)``,
    ``scale`` splits and ``res2_out_channels * 2^(k-2)`` output channels; block 0 of res3..res5
    has stride 2 (res5: 1 with ``res5_dilation`` 2). ``num_classes`` adds global pooling and a
    ``linear`` classifier (ImageNet setting, used for FLOP counts). Output: dict of
    ``out_features`` -> (N, C, ceil(H / stride), ceil(W / stride)).
    """
    if depth not in BLOCKS_PER_STAGE:
        raise ValueError(
            f"MODEL.RES2NET.DEPTH must be one of {sorted(BLOCKS_PER_STAGE)}, got {depth}"
        )
    if variant not in VARIANTS:
        raise ValueError(f"MODEL.RES2NET.VARIANT must be one of {VARIANTS}, got {variant!r}")
    if res5_dilation not in (1, 2):
        raise ValueError(f"MODEL.RES2NET.RES5_DILATION must be 1 or 2, got {res5_dilation}")
    if len(deform_on_per_stage) != 4:
        raise ValueError(
            "MODEL.RES2NET.DEFORM_ON_PER_STAGE needs 4 entries (res2..res5), "
            f"got {deform_on_per_stage}"
        )
    if variant == "v1b" and stem_out_channels % 2:
        raise ValueError(
            f"MODEL.RES2NET.STEM_OUT_CHANNELS must be even for v1b, got {stem_out_channels}"
        )
    norm_layer = make_norm(norm, gn_num_groups)
    if variant == "v1":
        stem = BasicStem(in_channels, stem_out_channels, norm=norm_layer)
    else:
        stem = DeepStem(in_channels, stem_out_channels, norm=norm, gn_num_groups=gn_num_groups)

    stages: List[list] = []
    in_ch, out_ch, width = stem_out_channels, res2_out_channels, base_width
    for idx, num_blocks in enumerate(BLOCKS_PER_STAGE[depth]):
        dilation = res5_dilation if idx == 3 else 1
        first_stride = 1 if idx == 0 or dilation == 2 else 2
        stages.append(
            ResNet.make_stage(
                Bottle2neckBlock,
                num_blocks,
                in_channels=in_ch,
                out_channels=out_ch,
                stride_per_block=[first_stride] + [1] * (num_blocks - 1),
                is_first_per_block=[True] + [False] * (num_blocks - 1),
                width=width,
                scale=scale,
                norm=norm,
                gn_num_groups=gn_num_groups,
                stride_in_1x1=stride_in_1x1,
                dilation=dilation,
                avg_down=variant == "v1b",
                pool_stride1=pool_stride1,
                deform=bool(deform_on_per_stage[idx]),
                deform_modulated=deform_modulated,
                deform_num_groups=deform_num_groups,
                zero_init_residual=zero_init_residual,
            )
        )
        in_ch, out_ch, width = out_ch, out_ch * 2, width * 2
    out_features = list(out_features) if out_features is not None else None
    return ResNet(stem, stages, num_classes=num_classes, out_features=out_features,
                  freeze_at=freeze_at)


def res2net_kwargs_from_config(cfg, input_shape: Optional[ShapeSpec] = None) -> dict:
    """Map ``cfg.MODEL.RES2NET.*`` to the arguments of `build_res2net` (the frozen stages come
    from ``MODEL.BACKBONE.FREEZE_AT`` unless ``MODEL.RES2NET.FREEZE_AT`` is set)."""
    r = cfg.MODEL.RES2NET
    freeze_at = cfg.MODEL.BACKBONE.FREEZE_AT if r.FREEZE_AT is None else r.FREEZE_AT
    if not isinstance(freeze_at, int) or freeze_at < 0:
        key = "MODEL.BACKBONE.FREEZE_AT" if r.FREEZE_AT is None else "MODEL.RES2NET.FREEZE_AT"
        raise ValueError(f"{key} must be an integer >= 0, got {freeze_at!r}")
    # fmt: off
    return dict(
        depth               = r.DEPTH,
        scale               = r.SCALE,
        base_width          = r.BASE_WIDTH,
        variant             = r.VARIANT,
        norm                = r.NORM,
        gn_num_groups       = r.GN_NUM_GROUPS,
        in_channels         = input_shape.channels if input_shape is not None else 3,
        stem_out_channels   = r.STEM_OUT_CHANNELS,
        res2_out_channels   = r.RES2_OUT_CHANNELS,
        freeze_at           = freeze_at,
        out_features        = r.OUT_FEATURES,
        stride_in_1x1       = r.STRIDE_IN_1X1,
        res5_dilation       = r.RES5_DILATION,
        pool_stride1        = r.POOL_STRIDE1,
        deform_on_per_stage = r.DEFORM_ON_PER_STAGE,
        deform_modulated    = r.DEFORM_MODULATED,
        deform_num_groups   = r.DEFORM_NUM_GROUPS,
        zero_init_residual  = r.ZERO_INIT_RESIDUAL,
    )
    # fmt: on


@BACKBONE_REGISTRY.register()
def build_res2net_backbone(cfg, input_shape: ShapeSpec):
    """Res2Net trunk from ``MODEL.RES2NET.*``; returns a `ResNet` with ``OUT_FEATURES``."""
    return build_res2net(**res2net_kwargs_from_config(cfg, input_shape))


def _fpn(cfg, input_shape, top_block):
    return FPN(
        bottom_up=build_res2net_backbone(cfg, input_shape),
        in_features=cfg.MODEL.FPN.IN_FEATURES,
        out_channels=cfg.MODEL.FPN.OUT_CHANNELS,
        norm=cfg.MODEL.FPN.NORM,
        top_block=top_block,
        fuse_type=cfg.MODEL.FPN.FUSE_TYPE,
    )


@BACKBONE_REGISTRY.register()
def build_res2net_fpn_backbone(cfg, input_shape: ShapeSpec):
    """Res2Net + FPN (``MODEL.FPN.*``) with P6 = max-pool of P5: outputs p2..p6 (R-CNNs)."""
    return _fpn(cfg, input_shape, LastLevelMaxPool())


@BACKBONE_REGISTRY.register()
def build_res2net_p67_fpn_backbone(cfg, input_shape: ShapeSpec):
    """Res2Net + FPN + P6/P7 (3x3 stride-2 convs) from ``MODEL.RES2NET.P67_IN_FEATURE`` ("res5"
    = C5 or "p5"), with or without the ReLU before P7: outputs p3..p7 for one-stage heads."""
    r = cfg.MODEL.RES2NET
    out_channels = cfg.MODEL.FPN.OUT_CHANNELS
    if r.P67_IN_FEATURE == "res5":
        if "res5" not in r.OUT_FEATURES:
            raise ValueError(
                "MODEL.RES2NET.P67_IN_FEATURE='res5' needs 'res5' in MODEL.RES2NET.OUT_FEATURES"
            )
        in_channels = r.RES2_OUT_CHANNELS * 8
    else:
        in_channels = out_channels
    top_block = build_p6p7_block(in_channels, out_channels, r.P67_IN_FEATURE, r.P67_RELU_BEFORE_P7)
    return _fpn(cfg, input_shape, top_block)
