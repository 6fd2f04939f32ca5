"""Object stream of RDSNet: the RetinaNet-style head with a representation tower.

Three parallel towers of `num_convs` x [conv3x3 (no bias) - GroupNorm(32) - ReLU] run on every
FPN level with shared weights; 3x3 predictors give per anchor `num_classes` logits (sigmoid),
4 box deltas (dx, dy, dw, dh) and the 2 x d object representation (first d channels:
background o_bg, last d: foreground o_fg). Parameter count for COCO (80 classes, 9 anchors,
d = 32, GN): 10,154,292.
"""
import math
from typing import List

import torch
from detectron2.config import configurable
from detectron2.layers import ShapeSpec, get_norm
from torch import nn

__all__ = ["RDSNetHead"]


def _tower(in_channels: int, num_convs: int, norm: str) -> nn.Sequential:
    """[conv, norm, ReLU] x num_convs as one Sequential (conv at 3i, norm at 3i+1, ReLU at 3i+2).

    Without a norm the conv gets a bias and an `nn.Identity` keeps the index layout.
    """
    layers = []
    for _ in range(num_convs):
        layers.append(nn.Conv2d(in_channels, in_channels, 3, padding=1, bias=not norm))
        layers.append(get_norm(norm, in_channels) if norm else nn.Identity())
        layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class RDSNetHead(nn.Module):
    """Classification, box and representation towers + predictors, shared over P3-P7.

    Inputs: list of (N, C, Hi, Wi) features. Outputs three lists over levels:
    logits (N, A*K, Hi, Wi), deltas (N, A*4, Hi, Wi), representations (N, A*2*d, Hi, Wi)
    (channel a*2d + j; j < d background, j >= d foreground).
    """

    @configurable
    def __init__(
        self,
        *,
        in_channels: int,
        num_anchors: int,
        num_classes: int,
        rep_dim: int = 32,
        num_convs: int = 4,
        norm: str = "GN",
        prior_prob: float = 0.01,
    ):
        super().__init__()
        self.num_classes = num_classes
        self.rep_dim = rep_dim
        self.cls_subnet = _tower(in_channels, num_convs, norm)
        self.bbox_subnet = _tower(in_channels, num_convs, norm)
        self.rep_subnet = _tower(in_channels, num_convs, norm)
        self.cls_score = nn.Conv2d(in_channels, num_anchors * num_classes, 3, padding=1)
        self.bbox_pred = nn.Conv2d(in_channels, num_anchors * 4, 3, padding=1)
        self.rep_pred = nn.Conv2d(in_channels, num_anchors * 2 * rep_dim, 3, padding=1)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, std=0.01)
                if module.bias is not None:
                    nn.init.constant_(module.bias, 0.0)
        nn.init.constant_(self.cls_score.bias, -math.log((1 - prior_prob) / prior_prob))

    @classmethod
    def from_config(cls, cfg, input_shape: List[ShapeSpec], num_anchors: int):
        channels = {s.channels for s in input_shape}
        if len(channels) != 1:
            raise ValueError(f"RDSNetHead needs equal channels on all levels, got {channels}")
        return {
            "in_channels": channels.pop(),
            "num_anchors": num_anchors,
            "num_classes": cfg.MODEL.RDSNET.NUM_CLASSES,
            "rep_dim": cfg.MODEL.RDSNET.REP_DIM,
            "num_convs": cfg.MODEL.RDSNET.NUM_CONVS,
            "norm": cfg.MODEL.RDSNET.NORM,
            "prior_prob": cfg.MODEL.RDSNET.PRIOR_PROB,
        }

    def forward(self, features: List[torch.Tensor]):
        logits, deltas, reps = [], [], []
        for x in features:
            logits.append(self.cls_score(self.cls_subnet(x)))
            deltas.append(self.bbox_pred(self.bbox_subnet(x)))
            reps.append(self.rep_pred(self.rep_subnet(x)))
        return logits, deltas, reps
