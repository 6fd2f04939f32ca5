"""Pixel stream of RDSNet: a d-dimensional embedding per pixel at stride 4.

    p3 -> CM                        (stride 8)
    p4 -> CM -> Up2                 (stride 8)
    p5 -> CM -> Up2 -> CM -> Up2    (stride 8)
    sum -> CM -> Up2 -> conv1x1 (256 -> d, bias)   (stride 4)

CM = conv3x3 (no bias) - GroupNorm(32) - ReLU; Up2 = bilinear x2 with ``align_corners=True``
(mmdet's ``nn.UpsamplingBilinear2d``). Parameter count (256 channels, d = 32, GN): 2,959,904.
"""
from typing import Dict, List

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.layers import Conv2d, ShapeSpec, get_norm
from torch import nn

__all__ = ["PixelStream"]


def _up2(x: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True)


class PixelStream(nn.Module):
    """Fuse three FPN levels at stride 8, upsample once, project to d channels at stride 4."""

    @configurable
    def __init__(
        self, *, in_features: List[str], in_channels: int, conv_dim: int, rep_dim: int, norm: str
    ):
        """
        Args:
            in_features: names of the three input levels, finest first (e.g. p3, p4, p5).
            in_channels: channels of the FPN levels.
            conv_dim: channels of the 3x3 convs.
            rep_dim: output embedding dimension d.
            norm: "GN" or "" (no norm; the convs then have a bias).
        """
        super().__init__()
        if len(in_features) != 3:
            raise ValueError(f"MODEL.RDSNET.PIXEL_IN_FEATURES needs 3 levels, got {in_features}")
        self.in_features = list(in_features)

        def cm(cin):
            return Conv2d(
                cin,
                conv_dim,
                3,
                padding=1,
                bias=not norm,
                norm=get_norm(norm, conv_dim) if norm else None,
                activation=F.relu,
            )

        self.p3_conv = cm(in_channels)
        self.p4_conv = cm(in_channels)
        self.p5_conv1 = cm(in_channels)
        self.p5_conv2 = cm(conv_dim)
        self.fuse_conv = cm(conv_dim)
        self.out = nn.Conv2d(conv_dim, rep_dim, 1)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.constant_(module.bias, 0.0)
        nn.init.normal_(self.out.weight, std=0.01)
        nn.init.constant_(self.out.bias, 0.0)

    @classmethod
    def from_config(cls, cfg, input_shape: Dict[str, ShapeSpec]):
        names = cfg.MODEL.RDSNET.PIXEL_IN_FEATURES
        return {
            "in_features": names,
            "in_channels": input_shape[names[0]].channels,
            "conv_dim": cfg.MODEL.RDSNET.PIXEL_CONV_DIM,
            "rep_dim": cfg.MODEL.RDSNET.REP_DIM,
            "norm": cfg.MODEL.RDSNET.NORM,
        }

    def forward(self, features: Dict[str, torch.Tensor]) -> torch.Tensor:
        """FPN dict -> (N, d, H/4, W/4) pixel representations U (H, W: padded input size)."""
        p3, p4, p5 = (features[f] for f in self.in_features)
        x = self.p3_conv(p3) + _up2(self.p4_conv(p4)) + _up2(self.p5_conv2(_up2(self.p5_conv1(p5))))
        return self.out(_up2(self.fuse_conv(x)))
