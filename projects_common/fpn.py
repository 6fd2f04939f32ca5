"""FPN top blocks shared by one-stage heads on any trunk (ResNet, Res2Net).

Detectron2's `LastLevelP6P7` always applies a ReLU between P6 and P7 and takes its input from
the feature named ``in_feature`` ("res5" = C5, "p5" = P5). Some upstream code bases (e.g.
mmdetection v1's RetinaNet-style necks with ``relu_before_extra_convs=False``) have no ReLU
there; `build_p6p7_block` returns the right variant so converted checkpoints match exactly.
"""
from detectron2.modeling.backbone.fpn import LastLevelP6P7

__all__ = ["LastLevelP6P7NoReLU", "build_p6p7_block"]


class LastLevelP6P7NoReLU(LastLevelP6P7):
    """P6 = conv3x3/2(in_feature), P7 = conv3x3/2(P6) without the ReLU in between."""

    def forward(self, x):
        p6 = self.p6(x)
        return [p6, self.p7(p6)]


def build_p6p7_block(in_channels: int, out_channels: int, in_feature: str, relu_before_p7: bool):
    """Top block producing P6/P7 from ``in_feature`` ("res5" or "p5").

    ``in_channels`` is the channel count of ``in_feature`` (C5's channels for "res5", the FPN
    width for "p5").
    """
    if in_feature not in ("res5", "p5"):
        raise ValueError(f"P6/P7 in_feature must be 'res5' or 'p5', got {in_feature!r}")
    cls = LastLevelP6P7 if relu_before_p7 else LastLevelP6P7NoReLU
    return cls(in_channels, out_channels, in_feature=in_feature)
