"""Deformable RoI pooling of TSD (spec §3), written with pure PyTorch ops (`F.grid_sample`).

This is the operator behind the paper's point-wise deformation P̂_c (Eq. 5, 6) and the
proposal-wise translation P̂_r (Eq. 3, 4): the Deformable ConvNets "deformable PS-RoI pooling"
kernel with ``group_size = 1`` (every output channel reads its own input channel), a k×k bin grid
and S×S bilinear samples per bin, each bin translated by ``gamma * offset * (roi_w, roi_h)``.

Two coordinate conventions are supported:

* ``legacy=True`` — the authors' CUDA kernel (spec §3): RoI corners rounded half away from
  zero, ``start = round(x1)·s − 0.5``, ``end = (round(x2) + 1)·s − 0.5``, samples left/top-aligned
  inside a bin (``iw / S``).
* ``legacy=False`` — the "aligned" variant (spec §13.17) matching Detectron2's ROIAlignV2
  geometry: ``start = x1·s − 0.5``, ``end = x2·s − 0.5``, no rounding, samples at the centres
  of the S×S sub-cells (``(iw + 0.5) / S``). With zero offsets and a RoI inside the map it equals
  ``torchvision.ops.roi_align(aligned=True, sampling_ratio=S)``.

Both keep the kernel's validity rule: a sample outside ``[-0.5, W - 0.5] × [-0.5, H - 0.5]`` is
dropped, the others are clamped into ``[0, W-1] × [0, H-1]`` and bilinearly interpolated, and a
bin is the mean over its *valid* samples (0 if none). No gradient reaches the RoI coordinates.
"""
import math
from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F
from detectron2.modeling.poolers import assign_boxes_to_levels
from detectron2.structures import Boxes

__all__ = [
    "round_half_away_from_zero",
    "deform_roi_pool",
    "multi_level_deform_roi_pool",
    "fpn_levels",
    "level_range",
]

# grid_sample coordinate used for dropped samples: far outside [-1, 1], so that with
# padding_mode="zeros" all four bilinear neighbours are padding (value 0, no gradient).
_OUTSIDE = -8.0


def round_half_away_from_zero(v: torch.Tensor) -> torch.Tensor:
    """C ``round``: halves go away from zero (``torch.round`` rounds half to even)."""
    return torch.sign(v) * torch.floor(v.abs() + 0.5)


def _roi_geometry(boxes: torch.Tensor, spatial_scale: float, legacy: bool):
    """Feature-space start and size of RoIs.

    Args:
        boxes: (R, 4) XYXY in input-image pixels.
    Returns:
        start_w, start_h, roi_w, roi_h: each (R,), in feature-map pixels (spec §3 step 1).
    """
    x1, y1, x2, y2 = boxes.unbind(dim=1)
    if legacy:
        x1, y1 = round_half_away_from_zero(x1), round_half_away_from_zero(y1)
        x2, y2 = round_half_away_from_zero(x2) + 1, round_half_away_from_zero(y2) + 1
    start_w, start_h = x1 * spatial_scale - 0.5, y1 * spatial_scale - 0.5
    roi_w = (x2 * spatial_scale - 0.5 - start_w).clamp(min=0.1)
    roi_h = (y2 * spatial_scale - 0.5 - start_h).clamp(min=0.1)
    return start_w, start_h, roi_w, roi_h


def _sample_points(boxes, offsets, spatial_scale, output_size, samples_per_bin, gamma, legacy):
    """Absolute sampling coordinates of every bin sample.

    Args:
        boxes: (R, 4) XYXY image pixels (no grad needed).
        offsets: (R, 2, k, k) raw offsets (channel 0 = x, 1 = y) or None for no translation.
    Returns:
        xs, ys: (R, k·S, k·S) feature-map coordinates; row index = ph·S + ih, column = pw·S + iw.
    """
    k, S = output_size, samples_per_bin
    boxes = boxes.detach()  # spec §3 step 7: no gradient to the RoI coordinates
    start_w, start_h, roi_w, roi_h = _roi_geometry(boxes, spatial_scale, legacy)
    bin_w, bin_h = roi_w / k, roi_h / k
    centre = 0.0 if legacy else 0.5
    bins = torch.arange(k, dtype=boxes.dtype, device=boxes.device)
    sub = (torch.arange(S, dtype=boxes.dtype, device=boxes.device) + centre) / S
    # (k, S) position of sample (p, i) in bin units: p + i / S
    pos = bins[:, None] + sub[None, :]  # (k, S): position of sample i of bin p, in bin units
    # xs[r, ph, pw, ih, iw]; ys likewise
    base_x = start_w.view(-1, 1, 1, 1, 1) + pos.view(1, 1, k, 1, S) * bin_w.view(-1, 1, 1, 1, 1)
    base_y = start_h.view(-1, 1, 1, 1, 1) + pos.view(1, k, 1, S, 1) * bin_h.view(-1, 1, 1, 1, 1)
    if offsets is not None:
        off = offsets.to(boxes.dtype) * gamma
        base_x = base_x + (off[:, 0] * roi_w.view(-1, 1, 1))[:, :, :, None, None]
        base_y = base_y + (off[:, 1] * roi_h.view(-1, 1, 1))[:, :, :, None, None]
    R = boxes.shape[0]
    xs = base_x.expand(R, k, k, S, S).permute(0, 1, 3, 2, 4).reshape(R, k * S, k * S)
    ys = base_y.expand(R, k, k, S, S).permute(0, 1, 3, 2, 4).reshape(R, k * S, k * S)
    return xs, ys


def deform_roi_pool(
    features: torch.Tensor,
    boxes: torch.Tensor,
    offsets: Optional[torch.Tensor],
    spatial_scale: float,
    output_size: int = 7,
    samples_per_bin: int = 4,
    gamma: float = 0.1,
    legacy: bool = True,
    chunk_size: int = 512,
) -> torch.Tensor:
    """Deformable RoI pooling of RoIs of ONE image (spec §3, §3.1), vectorised over RoIs.

    Args:
        features: (1, C, H, W) or (C, H, W) feature map of one image at one FPN level.
        boxes: (R, 4) XYXY RoIs in input-image pixels.
        offsets: (R, 2, k, k) raw offsets (ΔC, or ΔR broadcast to every bin); ``None`` = no
            translation. The sample shift is ``gamma · offset · (roi_w, roi_h)``.
        spatial_scale: 1 / stride of the level.
        output_size: k (bins per side).
        samples_per_bin: S (S×S bilinear samples per bin).
        gamma: the paper's γ (kernel ``trans_std``).
        legacy: authors' rounded, left-aligned geometry (True) or the aligned variant (False).
        chunk_size: RoIs per `grid_sample` call (bounds the (chunk, C, kS, kS) intermediate).

    Returns:
        (R, C, k, k) pooled features.
    """
    if features.dim() == 3:
        features = features[None]
    _, C, H, W = features.shape
    k, S = output_size, samples_per_bin
    R = boxes.shape[0]
    if R == 0:
        return features.new_zeros((0, C, k, k))
    outs = []
    for start in range(0, R, chunk_size):
        sl = slice(start, start + chunk_size)
        xs, ys = _sample_points(
            boxes[sl], None if offsets is None else offsets[sl], spatial_scale, k, S, gamma, legacy
        )
        n = xs.shape[0]
        valid = (xs >= -0.5) & (xs <= W - 0.5) & (ys >= -0.5) & (ys <= H - 0.5)
        # clamp into the map (spec §3 step 4) and normalise for align_corners=False:
        # pixel p maps to (2p + 1) / W - 1, exact for any W >= 1.
        gx = (2 * xs.clamp(0, W - 1) + 1) / W - 1
        gy = (2 * ys.clamp(0, H - 1) + 1) / H - 1
        grid = torch.stack([gx, gy], dim=-1)
        grid = torch.where(valid[..., None], grid, grid.new_tensor(_OUTSIDE))
        grid = grid.to(features.dtype).reshape(1, n * k * S, k * S, 2)
        vals = F.grid_sample(
            features, grid, mode="bilinear", padding_mode="zeros", align_corners=False
        )  # (1, C, n·kS, kS)
        summed = vals.view(C, n, k, S, k, S).sum(dim=(3, 5))  # (C, n, k, k)
        count = valid.view(n, k, S, k, S).sum(dim=(2, 4)).clamp(min=1)  # (n, k, k)
        outs.append(summed.permute(1, 0, 2, 3) / count[:, None].to(summed.dtype))
    return torch.cat(outs, dim=0) if len(outs) > 1 else outs[0]


def multi_level_deform_roi_pool(
    features: Sequence[torch.Tensor],
    scales: Sequence[float],
    rois: torch.Tensor,
    levels: torch.Tensor,
    offsets: Optional[torch.Tensor],
    output_size: int = 7,
    samples_per_bin: int = 4,
    gamma: float = 0.1,
    legacy: bool = True,
    chunk_size: int = 512,
) -> torch.Tensor:
    """`deform_roi_pool` over FPN levels and images (spec §2.9 step 4).

    Args:
        features: per-level maps (N, C, H_l, W_l), finest first.
        scales: per-level spatial scale (1 / stride).
        rois: (R, 5) ``(batch_index, x1, y1, x2, y2)`` in input-image pixels.
        levels: (R,) int64 level index into ``features`` (chosen from the untranslated RoI).
        offsets: (R, 2, k, k) or None.

    Returns:
        (R, C, k, k); rows in the order of ``rois``.
    """
    C = features[0].shape[1]
    k = output_size
    out = features[0].new_zeros((rois.shape[0], C, k, k))
    if rois.shape[0] == 0:
        return out
    batch_idx = rois[:, 0].to(torch.int64)
    for lvl, (feat, scale) in enumerate(zip(features, scales)):
        for b in range(feat.shape[0]):
            idx = torch.nonzero((levels == lvl) & (batch_idx == b), as_tuple=True)[0]
            if idx.numel() == 0:
                continue
            pooled = deform_roi_pool(
                feat[b : b + 1],
                rois[idx, 1:],
                None if offsets is None else offsets[idx],
                scale,
                output_size=k,
                samples_per_bin=samples_per_bin,
                gamma=gamma,
                legacy=legacy,
                chunk_size=chunk_size,
            )
            out = out.index_put((idx,), pooled.to(out.dtype))
    return out


def fpn_levels(
    boxes: torch.Tensor,
    min_level: int,
    max_level: int,
    canonical_box_size: float = 224.0,
    canonical_level: int = 4,
    legacy: bool = True,
) -> torch.Tensor:
    """FPN level of each RoI, offset from ``min_level`` (spec §2.7).

    Args:
        boxes: (R, 4) XYXY image pixels of the *untranslated* proposals P.
        legacy: mmdet rule ``floor(log2(sqrt((w+1)(h+1)) / 56 + 1e-6))`` (56 = finest scale,
            i.e. canonical 224 at level 4 mapped to P2) — else Detectron2's
            ``assign_boxes_to_levels`` rule (no +1, eps 1e-8).

    Returns:
        (R,) int64 in ``[0, max_level - min_level]``.
    """
    if not legacy:
        return assign_boxes_to_levels(
            [Boxes(boxes)], min_level, max_level, canonical_box_size, canonical_level
        )
    scale = torch.sqrt((boxes[:, 2] - boxes[:, 0] + 1) * (boxes[:, 3] - boxes[:, 1] + 1))
    finest = canonical_box_size / 2 ** (canonical_level - min_level)
    lvl = torch.floor(torch.log2(scale / finest + 1e-6)) + min_level
    return lvl.clamp(min=min_level, max=max_level).to(torch.int64) - min_level


def level_range(scales: List[float]):
    """(min_level, max_level) of per-level scales 1/stride (powers of two)."""
    min_level = int(round(-math.log2(scales[0])))
    max_level = int(round(-math.log2(scales[-1])))
    return min_level, max_level
