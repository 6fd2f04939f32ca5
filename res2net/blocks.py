"""The Bottle2neck block and the deep (v1b) stem (paper Sec. 3.1, Fig. 2).

Key layout: ``conv1`` (+ ``conv1.norm``), ``convs.{i}`` / ``bns.{i}`` for the
s - 1 hierarchical 3x3 convs K_i, ``conv3`` (+ ``conv3.norm``), ``shortcut`` (+ ``.norm``) in
the first block of a stage, and ``convs_offset.{i}`` for deformable K_i.
"""
import torch
import torch.nn.functional as F
from detectron2.layers import CNNBlockBase, Conv2d
from fvcore.nn import weight_init
from torch import nn

from .layers import DeformConv3x3, make_norm

__all__ = ["Bottle2neckBlock", "DeepStem"]


class Bottle2neckBlock(CNNBlockBase):
    """Res2Net bottleneck: 1x1 -> hierarchical 3x3 on s splits -> 1x1, plus shortcut.

    With U = ReLU(BN(conv1(X))) split into x_1..x_s of ``width`` channels:

    * normal block: y_1 = K_1(x_1); y_i = K_i(x_i + y_{i-1}) for i = 2..s-1; y_s = x_s
      (K_i includes BN_i and ReLU; the *last* split bypasses, as in every released code);
    * first block of a stage: y_i = K_i(x_i) for i = 1..s-1 with stride t (no hierarchical sums)
      and y_s = AvgPool3x3(x_s, stride t, padding 1, count_include_pad=True). With t = 1 (res2.0,
      dilated res5.0) the pool runs only when ``pool_stride1`` (official/timm semantics);
    * s = 1: one 3x3 conv over all ``width`` channels, no split (plain ResNet bottleneck).

    out = ReLU(BN3(conv3(cat(y_1..y_s))) + shortcut(X)); the shortcut is the identity, or in the
    first block of a stage BN(conv1x1/t(X)) (v1) or BN(conv1x1(AvgPool_t(X))) (v1b,
    ``avg_down``; pool 2x2 with ceil_mode and count_include_pad=False).

    Shapes: X (N, in_channels, H, W) -> (N, out_channels, ceil(H / t), ceil(W / t)).
    """

    def __init__(
        self,
        in_channels,
        out_channels,
        *,
        width,
        scale,
        stride=1,
        is_first=False,
        norm="BN",
        gn_num_groups=2,
        stride_in_1x1=False,
        dilation=1,
        avg_down=False,
        pool_stride1=True,
        deform=False,
        deform_modulated=False,
        deform_num_groups=1,
        zero_init_residual=False,
    ):
        """
        Args:
            width (int): channels of one split (w * 2^(stage - 2)).
            scale (int): number of splits s (>= 1).
            stride (int): block stride t.
            is_first (bool): first block of its stage ("stage" type in the official code).
            norm (str): "FrozenBN", "BN", "SyncBN" or "GN" (with ``gn_num_groups`` groups).
            stride_in_1x1 (bool): put t in conv1 instead of the 3x3 convs and the pool.
            dilation (int): dilation (and padding) of the 3x3 convs.
            avg_down (bool): v1b shortcut (avg pool then stride-1 1x1 conv).
            pool_stride1 (bool): pool the last split in a first block even at stride 1.
            deform, deform_modulated, deform_num_groups: deformable K_i.
            zero_init_residual (bool): initialise the scale of conv3's norm to 0 so the block
                starts as its shortcut (Goyal et al. 2017; timm's default). Only matters when
                training from scratch: pretrained weights overwrite it.
        """
        super().__init__(in_channels, out_channels, stride)
        if scale < 1 or width < 1:
            raise ValueError(f"Res2Net needs SCALE >= 1 and BASE_WIDTH >= 1, got {scale}, {width}")
        norm_layer = make_norm(norm, gn_num_groups)
        stride_1x1, stride_3x3 = (stride, 1) if stride_in_1x1 else (1, stride)
        self.width, self.scale, self.is_first = width, scale, is_first
        self.num_convs = max(scale - 1, 1)
        self.avg_down, self.shortcut_stride = avg_down, stride
        self.pool_stride = stride_3x3
        # The bypassed last split of a first block is pooled whenever the pool changes shape,
        # and at stride 1 only under the official semantics.
        self.pool_last = scale > 1 and is_first and (stride_3x3 > 1 or pool_stride1)

        if is_first or in_channels != out_channels or stride != 1:
            self.shortcut = Conv2d(
                in_channels, out_channels, kernel_size=1, bias=False,
                stride=1 if avg_down else stride, norm=norm_layer(out_channels),
            )
        else:
            self.shortcut = None

        self.conv1 = Conv2d(
            in_channels, width * scale, kernel_size=1, stride=stride_1x1, bias=False,
            norm=norm_layer(width * scale),
        )
        self.deform = deform
        convs, bns, offsets = [], [], []
        for _ in range(self.num_convs):
            if deform:
                conv = DeformConv3x3(
                    width, width, stride=stride_3x3, dilation=dilation,
                    deform_num_groups=deform_num_groups, modulated=deform_modulated,
                )
                offsets.append(conv.make_offset_conv())
            else:
                conv = nn.Conv2d(
                    width, width, 3, stride=stride_3x3, padding=dilation, dilation=dilation,
                    bias=False,
                )
            convs.append(conv)
            bns.append(norm_layer(width))
        self.convs = nn.ModuleList(convs)
        self.bns = nn.ModuleList(bns)
        if deform:
            self.convs_offset = nn.ModuleList(offsets)
        self.conv3 = Conv2d(
            width * scale, out_channels, kernel_size=1, bias=False, norm=norm_layer(out_channels)
        )

        for layer in [self.conv1, self.conv3, self.shortcut, *self.convs]:
            if layer is not None and not isinstance(layer, DeformConv3x3):
                weight_init.c2_msra_fill(layer)
            elif isinstance(layer, DeformConv3x3):
                nn.init.kaiming_normal_(layer.weight, mode="fan_out", nonlinearity="relu")
        if zero_init_residual and getattr(self.conv3.norm, "weight", None) is not None:
            nn.init.zeros_(self.conv3.norm.weight)

    def _conv_i(self, i, x):
        """K_i (conv, BN_i, ReLU) on the (N, width, H, W) input of split i."""
        if self.deform:
            x = self.convs[i](x, self.convs_offset[i](x))
        else:
            x = self.convs[i](x)
        return F.relu_(self.bns[i](x))

    def forward(self, x):
        out = F.relu_(self.conv1(x))
        splits = torch.split(out, self.width, dim=1) if self.scale > 1 else (out,)
        ys = []
        for i in range(self.num_convs):
            inp = splits[i] if (i == 0 or self.is_first) else splits[i] + ys[-1]
            ys.append(self._conv_i(i, inp))
        if self.scale > 1:
            last = splits[-1]
            if self.pool_last:
                last = F.avg_pool2d(last, 3, stride=self.pool_stride, padding=1)
            ys.append(last)
        out = self.conv3(torch.cat(ys, dim=1) if len(ys) > 1 else ys[0])

        if self.shortcut is not None:
            shortcut = x
            if self.avg_down and self.shortcut_stride > 1:
                shortcut = F.avg_pool2d(
                    shortcut, self.shortcut_stride, stride=self.shortcut_stride, ceil_mode=True,
                    count_include_pad=False,
                )
            shortcut = self.shortcut(shortcut)
        else:
            shortcut = x
        return F.relu_(out + shortcut)


class DeepStem(CNNBlockBase):
    """v1b deep stem: three 3x3 convs (C/2 s2, C/2, C), each + norm + ReLU, then
    max-pool 3/2/1. Keys ``conv1/conv2/conv3`` (+ ``.norm``), the layout of Detectron2's
    DeepLab stem. Shapes: (N, 3, H, W) -> (N, C, ceil(H / 4), ceil(W / 4))."""

    def __init__(self, in_channels=3, out_channels=64, norm="BN", gn_num_groups=2):
        super().__init__(in_channels, out_channels, 4)
        norm_layer = make_norm(norm, gn_num_groups)
        mid = out_channels // 2
        self.conv1 = Conv2d(in_channels, mid, 3, stride=2, padding=1, bias=False,
                            norm=norm_layer(mid))
        self.conv2 = Conv2d(mid, mid, 3, stride=1, padding=1, bias=False, norm=norm_layer(mid))
        self.conv3 = Conv2d(mid, out_channels, 3, stride=1, padding=1, bias=False,
                            norm=norm_layer(out_channels))
        for layer in (self.conv1, self.conv2, self.conv3):
            weight_init.c2_msra_fill(layer)

    def forward(self, x):
        x = F.relu_(self.conv1(x))
        x = F.relu_(self.conv2(x))
        x = F.relu_(self.conv3(x))
        return F.max_pool2d(x, kernel_size=3, stride=2, padding=1)
