"""Small layers used by the Res2Net blocks: norm factory with GroupNorm validation and a
deformable 3x3 conv built on `torchvision.ops.deform_conv2d` (runs on CPU and GPU; Detectron2's
own `DeformConv` needs the compiled `detectron2._C`)."""
import math

import torch
from detectron2.layers import get_norm
from torch import nn
from torchvision.ops import deform_conv2d

__all__ = ["NORMS", "make_norm", "DeformConv3x3"]

NORMS = ("FrozenBN", "BN", "SyncBN", "GN")


def make_norm(norm: str, gn_num_groups: int = 2):
    """Return a ``channels -> nn.Module`` factory for ``MODEL.RES2NET.NORM``.

    GroupNorm with Detectron2's fixed 32 groups cannot normalize the Res2Net split
    widths (26, 52, 14, 18, 48, ...), so "GN" uses ``MODEL.RES2NET.GN_NUM_GROUPS`` groups and
    every normalized width is checked when the layer is built.
    """
    if norm not in NORMS:
        raise ValueError(f"MODEL.RES2NET.NORM must be one of {NORMS}, got {norm!r}")
    if norm != "GN":
        return lambda channels: get_norm(norm, channels)
    if not isinstance(gn_num_groups, int) or gn_num_groups < 1:
        raise ValueError(
            f"MODEL.RES2NET.GN_NUM_GROUPS must be a positive int, got {gn_num_groups!r}"
        )

    def group_norm(channels):
        if channels % gn_num_groups:
            raise ValueError(
                f"MODEL.RES2NET.GN_NUM_GROUPS={gn_num_groups} does not divide a normalized width "
                f"of {channels} channels; use a divisor of every split width (e.g. of "
                f"MODEL.RES2NET.BASE_WIDTH) and of the stem/stage widths"
            )
        return nn.GroupNorm(gn_num_groups, channels)

    return group_norm


class DeformConv3x3(nn.Module):
    """3x3 deformable conv K_i (DCNv1 or, with ``modulated``, DCNv2) without bias.

    The offset conv (``offset_conv``, stored by the block under ``convs_offset.{i}``) is a plain
    3x3 conv with the same stride/padding/dilation, bias on, zero-initialised so that a network
    loaded from ImageNet weights starts as the undeformed one. Its output has
    ``18 * groups`` channels (DCNv1: (dy, dx) per kernel tap) or ``27 * groups`` (DCNv2: offsets
    then mask logits, as mmcv/Detectron2 lay them out).

    The block calls ``forward(x, offset_out)`` with ``offset_out = offset_conv(x)``.
    Shapes: x (N, C_in, H, W) -> (N, C_out, ceil(H / stride), ceil(W / stride)).
    """

    def __init__(self, in_channels, out_channels, *, stride=1, dilation=1, deform_num_groups=1,
                 modulated=False):
        super().__init__()
        self.stride, self.padding, self.dilation = stride, dilation, dilation
        self.modulated = modulated
        self.deform_num_groups = deform_num_groups
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, 3, 3))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))

    @property
    def offset_channels(self):
        return (27 if self.modulated else 18) * self.deform_num_groups

    def make_offset_conv(self):
        conv = nn.Conv2d(
            self.weight.shape[1], self.offset_channels, 3, stride=self.stride,
            padding=self.padding, dilation=self.dilation, bias=True,
        )
        nn.init.zeros_(conv.weight)
        nn.init.zeros_(conv.bias)
        return conv

    def forward(self, x, offset_out):
        mask = None
        if self.modulated:
            n = 18 * self.deform_num_groups
            offset, mask = offset_out[:, :n], offset_out[:, n:].sigmoid()
        else:
            offset = offset_out
        return deform_conv2d(
            x, offset, self.weight, None, stride=self.stride, padding=self.padding,
            dilation=self.dilation, mask=mask,
        )
