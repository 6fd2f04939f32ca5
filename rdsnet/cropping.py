"""Cropping module of RDSNet: translation variance for the instance masks.

Training ignores target pixels outside the GT box expanded by 25% per side; at test the
foreground probabilities outside the detected box expanded by 10% per side are zeroed.
"""
import torch

__all__ = ["crop_mask"]


def crop_mask(boxes: torch.Tensor, height: int, width: int, padding: float, plus_one: bool = True):
    """Boolean (N, height, width) maps, True inside each expanded box.

    pad = max(padding * (x2 - x1 + 1), 1) for 0 < padding < 1 (absolute pixels otherwise; no
    "+1" without ``plus_one``); X1 = clamp(x1 - pad, min=0), X2 = clamp(x2 + pad, max=width),
    both truncated toward 0; column c is inside iff X1 <= c < X2 (rows likewise).

    Args:
        boxes: (N, 4) XYXY in the map's pixel coordinates.
    """
    boxes = boxes.float()
    extra = 1.0 if plus_one else 0.0
    w = boxes[:, 2] - boxes[:, 0] + extra
    h = boxes[:, 3] - boxes[:, 1] + extra
    if 0 < padding < 1:
        pad_x = torch.clamp(padding * w, min=1.0)
        pad_y = torch.clamp(padding * h, min=1.0)
    else:
        pad_x = torch.full_like(w, float(padding))
        pad_y = torch.full_like(h, float(padding))
    x1 = torch.clamp(boxes[:, 0] - pad_x, min=0).long()
    x2 = torch.clamp(boxes[:, 2] + pad_x, max=width).long()
    y1 = torch.clamp(boxes[:, 1] - pad_y, min=0).long()
    y2 = torch.clamp(boxes[:, 3] + pad_y, max=height).long()
    cols = torch.arange(width, device=boxes.device)[None, :]
    rows = torch.arange(height, device=boxes.device)[None, :]
    in_x = (cols >= x1[:, None]) & (cols < x2[:, None])
    in_y = (rows >= y1[:, None]) & (rows < y2[:, None])
    return in_y[:, :, None] & in_x[:, None, :]
