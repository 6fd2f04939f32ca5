"""mmdetection-v1 anchors for checkpoint-exact RDSNet.

`RDSNetMMDetAnchorGenerator` is Detectron2's `DefaultAnchorGenerator` with mmdet v1's base
anchors: ratio-major order inside a location (index a = ratio_idx * S + size_idx, whereas
Detectron2 is size-major), centred at ((stride - 1) / 2, (stride - 1) / 2) of the first
location, "+1" half-extents and rounding (half to even). The grid shift is (j * stride,
i * stride) (offset 0). The same `MODEL.ANCHOR_GENERATOR.SIZES` / `ASPECT_RATIOS` as
Detectron2's RetinaNet describe the anchors (size = octave_base_scale * 2^(i/3) * stride).
"""
import math
from typing import List, Sequence

import torch
from detectron2.config import configurable
from detectron2.layers import ShapeSpec
from detectron2.modeling.anchor_generator import (
    ANCHOR_GENERATOR_REGISTRY,
    BufferList,
    DefaultAnchorGenerator,
)

__all__ = ["RDSNetMMDetAnchorGenerator", "mmdet_base_anchors"]


def mmdet_base_anchors(stride: int, sizes: Sequence[float], aspect_ratios: Sequence[float]):
    """Base anchors of one level at location (0, 0), mmdet v1 ``AnchorGenerator.gen_base_anchors``.

    Args:
        stride: the level's stride (mmdet ``base_size``).
        sizes: anchor sizes in pixels (sqrt of area of the ratio-1 anchor), e.g. 32, 40.3, 50.8.
        aspect_ratios: h / w ratios.

    Returns:
        (len(aspect_ratios) * len(sizes), 4) XYXY inclusive boxes, ratio-major.
    """
    ctr = 0.5 * (stride - 1)
    sizes = torch.tensor([float(s) for s in sizes], dtype=torch.float64)
    h_ratios = torch.tensor([math.sqrt(r) for r in aspect_ratios], dtype=torch.float64)
    w_ratios = 1.0 / h_ratios
    ws = (w_ratios[:, None] * sizes[None, :]).reshape(-1)
    hs = (h_ratios[:, None] * sizes[None, :]).reshape(-1)
    anchors = torch.stack(
        [ctr - 0.5 * (ws - 1), ctr - 0.5 * (hs - 1), ctr + 0.5 * (ws - 1), ctr + 0.5 * (hs - 1)],
        dim=1,
    )
    return torch.round(anchors.float())


@ANCHOR_GENERATOR_REGISTRY.register()
class RDSNetMMDetAnchorGenerator(DefaultAnchorGenerator):
    """Ratio-major, "+1", rounded anchors of mmdet v1 (see module docstring).

    Anchors per level are (H * W * A, 4) in (y, x, a) order, as Detectron2's.
    """

    @configurable
    def __init__(self, *, sizes, aspect_ratios, strides: List[int]):
        """
        Args:
            sizes: list[list[float]] per level (or one list for all levels).
            aspect_ratios: list[list[float]] per level (or one list for all levels).
            strides: stride of each input feature.
        """
        super().__init__(sizes=sizes, aspect_ratios=aspect_ratios, strides=strides, offset=0.0)
        n = len(strides)
        if not isinstance(sizes[0], (list, tuple)):
            sizes = [sizes]
        if not isinstance(aspect_ratios[0], (list, tuple)):
            aspect_ratios = [aspect_ratios]
        sizes = list(sizes) * n if len(sizes) == 1 else sizes
        aspect_ratios = list(aspect_ratios) * n if len(aspect_ratios) == 1 else aspect_ratios
        self.cell_anchors = BufferList(
            [mmdet_base_anchors(s, sz, ar) for s, sz, ar in zip(strides, sizes, aspect_ratios)]
        )

    @classmethod
    def from_config(cls, cfg, input_shape: List[ShapeSpec]):
        return {
            "sizes": cfg.MODEL.ANCHOR_GENERATOR.SIZES,
            "aspect_ratios": cfg.MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS,
            "strides": [x.stride for x in input_shape],
        }
