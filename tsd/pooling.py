"""Deformable RoI pooling of TSD, written with pure PyTorch ops (no custom kernel).

This is the operator behind the paper's point-wise deformation P̂_c (Eq. 5, 6) and the
proposal-wise translation P̂_r (Eq. 3, 4): the Deformable ConvNets "deformable PS-RoI pooling"
kernel with ``group_size = 1`` (every output channel reads its own input channel), a k×k bin grid
and S×S bilinear samples per bin, each bin translated by ``gamma * offset * (roi_w, roi_h)``.

Two coordinate conventions are supported:

* ``legacy=True`` — the authors' CUDA kernel: RoI corners rounded half away from
  zero, ``start = round(x1)·s − 0.5``, ``end = (round(x2) + 1)·s − 0.5``, samples
  left/top-aligned inside a bin (``iw / S``).
* ``legacy=False`` — the "aligned" variant matching Detectron2's ROIAlignV2
  geometry: ``start = x1·s − 0.5``, ``end = x2·s − 0.5``, no rounding, samples at the centres
  of the S×S sub-cells (``(iw + 0.5) / S``). With zero offsets and a RoI inside the map it equals
  ``torchvision.ops.roi_align(aligned=True, sampling_ratio=S)``.

Both keep the kernel's validity rule: a sample outside ``[-0.5, W - 0.5] × [-0.5, H - 0.5]`` is
dropped, the others are clamped into ``[0, W-1] × [0, H-1]`` and bilinearly interpolated, and a
bin is the mean over its *valid* samples (0 if none). No gradient reaches the RoI coordinates.

Implementation: instead of the `F.grid_sample` formulation (which materialises a
(R, C, k·S, k·S) tensor and whose CPU backward is slow), every bin is written as a weighted sum
of S·S·4 feature rows and evaluated with one weighted ``F.embedding_bag`` over all levels and
images (forward and backward are the ordinary embedding-bag kernels on CPU and GPU). The
forward equals the kernel's; the backward is autograd's, which differs from the CUDA backward
only at non-differentiable points (zero offset gradient at clamped samples, right-hand slope
at exactly integer coordinates).
"""
import math
from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F
from detectron2.layers import shapes_to_tensor
from detectron2.modeling.poolers import assign_boxes_to_levels
from detectron2.structures import Boxes

__all__ = [
    "round_half_away_from_zero",
    "deform_roi_pool",
    "multi_level_deform_roi_pool",
    "fpn_levels",
    "level_range",
]


def round_half_away_from_zero(v: torch.Tensor) -> torch.Tensor:
    """C ``round``: halves go away from zero (``torch.round`` rounds half to even)."""
    return torch.sign(v) * torch.floor(v.abs() + 0.5)


def _roi_geometry(boxes: torch.Tensor, spatial_scale, legacy: bool):
    """Feature-space start and size of RoIs.

    Args:
        boxes: (R, 4) XYXY in input-image pixels.
        spatial_scale: float or (R,) tensor, 1 / stride of each RoI's level.
    Returns:
        start_w, start_h, roi_w, roi_h: each (R,), in feature-map pixels.
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
        spatial_scale: float or (R,) tensor.
    Returns:
        xs: (R, k, k, 1, S) and ys: (R, k, k, S, 1) feature-map coordinates, index order
        (r, ph, pw, ih, iw); x does not depend on ih nor y on iw (separable sample grid).
    """
    k, S = output_size, samples_per_bin
    boxes = boxes.detach()  # no gradient to the RoI coordinates
    start_w, start_h, roi_w, roi_h = _roi_geometry(boxes, spatial_scale, legacy)
    bin_w, bin_h = roi_w / k, roi_h / k
    centre = 0.0 if legacy else 0.5
    bins = torch.arange(k, dtype=boxes.dtype, device=boxes.device)
    sub = (torch.arange(S, dtype=boxes.dtype, device=boxes.device) + centre) / S
    pos = bins[:, None] + sub[None, :]  # (k, S): position of sample i of bin p, in bin units
    base_x = start_w.view(-1, 1, 1, 1, 1) + pos.view(1, 1, k, 1, S) * bin_w.view(-1, 1, 1, 1, 1)
    base_y = start_h.view(-1, 1, 1, 1, 1) + pos.view(1, k, 1, S, 1) * bin_h.view(-1, 1, 1, 1, 1)
    if offsets is not None:
        off = offsets.to(boxes.dtype) * gamma
        base_x = base_x + (off[:, 0] * roi_w.view(-1, 1, 1))[:, :, :, None, None]
        base_y = base_y + (off[:, 1] * roi_h.view(-1, 1, 1))[:, :, :, None, None]
    return base_x, base_y


def _pool_from_rows(
    rows: torch.Tensor,
    row_base: torch.Tensor,
    heights: torch.Tensor,
    widths: torch.Tensor,
    scales: torch.Tensor,
    boxes: torch.Tensor,
    offsets: Optional[torch.Tensor],
    output_size: int,
    samples_per_bin: int,
    gamma: float,
    legacy: bool,
) -> torch.Tensor:
    """Core of the operator on channels-last feature rows.

    Every bin is a weighted sum of S·S·4 feature rows (S×S bilinear samples, 4 neighbours
    each) with weights ``bilinear · valid / count``; it is evaluated with
    ``F.embedding_bag(mode="sum", per_sample_weights=...)``, whose backward gives the feature
    gradient (scatter-add) and, through the weights, the offset gradient. Memory stays
    O(R·k²·S²) instead of the O(R·C·(kS)²) of a `grid_sample` formulation.

    Args:
        rows: (M, C) all feature maps as rows (pixel-major, channels last).
        row_base, heights, widths, scales: (R,) first row, H, W and 1/stride of each RoI's map.
        boxes: (R, 4) XYXY image pixels. offsets: (R, 2, k, k) or None.
    Returns:
        (R, C, k, k).
    """
    k, S = output_size, samples_per_bin
    R, C = boxes.shape[0], rows.shape[1]
    if R == 0:
        return rows.new_zeros((0, C, k, k))
    xs, ys = _sample_points(boxes, offsets, scales, k, S, gamma, legacy)
    # Separable construction: within a bin, the S×S samples form a product grid and the
    # validity test, clamping and bilinear weights factor into x and y parts, so every
    # quantity below is computed on (R, k, k, S) and combined by one outer product.
    Wf = widths.to(xs.dtype).view(-1, 1, 1, 1, 1)
    Hf = heights.to(xs.dtype).view(-1, 1, 1, 1, 1)
    valid_x = (xs >= -0.5) & (xs <= Wf - 0.5)  # (R, k, k, 1, S)
    valid_y = (ys >= -0.5) & (ys <= Hf - 0.5)  # (R, k, k, S, 1)
    count = (valid_x.sum(dim=4, keepdim=True) * valid_y.sum(dim=3, keepdim=True)).clamp(min=1)
    # clamp into the map; neighbours p0 = floor(p), p1 = min(p0 + 1, size - 1)
    xc = torch.minimum(xs.clamp(min=0), Wf - 1)
    yc = torch.minimum(ys.clamp(min=0), Hf - 1)
    x0, y0 = xc.detach().floor(), yc.detach().floor()
    x1, y1 = torch.minimum(x0 + 1, Wf - 1), torch.minimum(y0 + 1, Hf - 1)
    lx, ly = xc - x0, yc - y0
    # the mean over the valid samples is folded into the y weights
    wx = torch.stack([1 - lx, lx], dim=-1) * valid_x[..., None].to(xs.dtype)  # (R,k,k,1,S,2)
    wy = torch.stack([1 - ly, ly], dim=-1) * (valid_y.to(ys.dtype) / count)[..., None]
    weights = wy[..., :, None] * wx[..., None, :]  # (R, k, k, S, S, 2, 2)
    Wl = widths.view(-1, 1, 1, 1, 1)
    row = row_base.view(-1, 1, 1, 1, 1, 1) + torch.stack([y0, y1], dim=-1).long() * Wl[..., None]
    col = torch.stack([x0, x1], dim=-1).long()
    index = row[..., :, None] + col[..., None, :]  # (R, k, k, S, S, 2, 2)
    taps = S * S * 4
    out = F.embedding_bag(
        index.reshape(R * k * k, taps),
        rows,
        per_sample_weights=weights.reshape(R * k * k, taps).to(rows.dtype),
        mode="sum",
    )  # (R·k·k, C)
    return out.view(R, k, k, C).permute(0, 3, 1, 2)


def deform_roi_pool(
    features: torch.Tensor,
    boxes: torch.Tensor,
    offsets: Optional[torch.Tensor],
    spatial_scale: float,
    output_size: int = 7,
    samples_per_bin: int = 4,
    gamma: float = 0.1,
    legacy: bool = True,
) -> torch.Tensor:
    """Deformable RoI pooling of RoIs of ONE image at one level, vectorised over RoIs.

    Args:
        features: (1, C, H, W) or (C, H, W) feature map.
        boxes: (R, 4) XYXY RoIs in input-image pixels.
        offsets: (R, 2, k, k) raw offsets (ΔC, or ΔR broadcast to every bin); ``None`` = no
            translation. The sample shift is ``gamma · offset · (roi_w, roi_h)``.
        spatial_scale: 1 / stride of the level.
        output_size: k (bins per side).
        samples_per_bin: S (S×S bilinear samples per bin).
        gamma: the paper's γ (kernel ``trans_std``).
        legacy: authors' rounded, left-aligned geometry (True) or the aligned variant (False).

    Returns:
        (R, C, k, k) pooled features.
    """
    if features.dim() == 4:
        assert features.shape[0] == 1, "deform_roi_pool takes the map of one image"
        features = features[0]
    C, H, W = features.shape
    R = boxes.shape[0]
    rows = features.permute(1, 2, 0).reshape(H * W, C)
    dev = boxes.device
    full = torch.full((R,), 1, dtype=torch.int64, device=dev)
    return _pool_from_rows(
        rows,
        full * 0,
        full * H,
        full * W,
        torch.full((R,), float(spatial_scale), dtype=boxes.dtype, device=dev),
        boxes,
        offsets,
        output_size,
        samples_per_bin,
        gamma,
        legacy,
    )


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
) -> torch.Tensor:
    """`deform_roi_pool` over FPN levels and images in one vectorised call.

    Args:
        features: per-level maps (N, C, H_l, W_l), finest first.
        scales: per-level spatial scale (1 / stride).
        rois: (R, 5) ``(batch_index, x1, y1, x2, y2)`` in input-image pixels.
        levels: (R,) int64 level index into ``features`` (chosen from the untranslated RoI).
        offsets: (R, 2, k, k) or None.

    Returns:
        (R, C, k, k); rows in the order of ``rois``.
    """
    N, C = features[0].shape[:2]
    dev = rois.device
    rows = torch.cat([f.permute(0, 2, 3, 1).reshape(-1, C) for f in features], dim=0)
    # Level sizes as tensors built from the maps' shapes (`shapes_to_tensor`), not Python ints:
    # a trace (TorchScript / ONNX export) then follows the input size instead of freezing it.
    level_h = shapes_to_tensor([f.shape[2] for f in features], dev)
    level_w = shapes_to_tensor([f.shape[3] for f in features], dev)
    size_t = level_h * level_w
    level_base = (size_t.cumsum(0) - size_t) * N  # first row of each level
    level_s = torch.tensor(list(scales), dtype=rois.dtype, device=dev)  # constants (strides)
    batch_idx = rois[:, 0].to(torch.int64)
    row_base = level_base[levels] + batch_idx * size_t[levels]
    return _pool_from_rows(
        rows,
        row_base,
        level_h[levels],
        level_w[levels],
        level_s[levels],
        rois[:, 1:],
        offsets,
        output_size,
        samples_per_bin,
        gamma,
        legacy,
    )


def fpn_levels(
    boxes: torch.Tensor,
    min_level: int,
    max_level: int,
    canonical_box_size: float = 224.0,
    canonical_level: int = 4,
    legacy: bool = True,
) -> torch.Tensor:
    """FPN level of each RoI, offset from ``min_level``.

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
