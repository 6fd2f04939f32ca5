"""Box geometry of TSD: the translated regression proposal P̂_r, the IoU of the PC loss and
the authors' "+1" box coder."""
import torch
from detectron2.modeling.box_regression import Box2BoxTransform

__all__ = ["translate_boxes", "aligned_iou", "LegacyBox2BoxTransform"]


def translate_boxes(
    boxes: torch.Tensor, delta_r: torch.Tensor, gamma: float = 0.1, legacy: bool = True
) -> torch.Tensor:
    """Proposal-wise translation P̂_r = P + γ·ΔR·(w, h) (paper Eq. 3, 4).

    Width and height are unchanged. Differentiable w.r.t. ``delta_r`` (the TSD regression
    targets and decoded boxes depend on it); ``boxes`` carry no gradient.

    Args:
        boxes: (R, 4) XYXY proposals P in image pixels.
        delta_r: (R, 2) raw ΔR = (dx, dy) from the offset generator.
        legacy: "+1" widths ``w = x2 - x1 + 1`` (authors' code) instead of ``x2 - x1``.

    Returns:
        (R, 4) XYXY boxes P̂_r.
    """
    boxes = boxes.detach()
    extra = 1.0 if legacy else 0.0
    wh = torch.stack(
        [boxes[:, 2] - boxes[:, 0] + extra, boxes[:, 3] - boxes[:, 1] + extra], dim=1
    )
    shift = gamma * delta_r.to(boxes.dtype) * wh  # (R, 2)
    return boxes + torch.cat([shift, shift], dim=1)


def aligned_iou(a: torch.Tensor, b: torch.Tensor, legacy: bool = True) -> torch.Tensor:
    """Element-wise IoU of two aligned box sets, differentiable.

    Args:
        a, b: (R, 4) XYXY.
        legacy: mmdet "+1" convention: areas (x2-x1+1)(y2-y1+1), intersection side
            ``max(0, min(x2) - max(x1) + 1)``, union clamped to >= 1. Otherwise continuous
            areas and a union clamped to >= 1e-6.

    Returns:
        (R,) IoU values.
    """
    extra = 1.0 if legacy else 0.0
    area_a = (a[:, 2] - a[:, 0] + extra) * (a[:, 3] - a[:, 1] + extra)
    area_b = (b[:, 2] - b[:, 0] + extra) * (b[:, 3] - b[:, 1] + extra)
    lt = torch.max(a[:, :2], b[:, :2])
    rb = torch.min(a[:, 2:], b[:, 2:])
    wh = (rb - lt + extra).clamp(min=0)
    inter = wh[:, 0] * wh[:, 1]
    union = (area_a + area_b - inter).clamp(min=1.0 if legacy else 1e-6)
    return inter / union


class LegacyBox2BoxTransform(Box2BoxTransform):
    """The authors' box coder (mmdet v1 ``bbox2delta`` / ``delta2bbox``).

    Widths and heights use the "+1" convention ``w = x2 - x1 + 1`` (centres ``(x1 + x2) / 2``),
    decoded corners are ``c ∓ (w' - 1) / 2``, and the de-normalised log-size deltas are clamped
    on both sides to ``scale_clamp``. With these widths a translation P̂_r = P + γ·ΔR·(w, h) of
    `translate_boxes` (legacy) shifts the targets by exactly γ/σ·ΔR.
    Detectron2's `Box2BoxTransform` (continuous widths) is the non-legacy coder.
    """

    def get_deltas(self, src_boxes: torch.Tensor, target_boxes: torch.Tensor) -> torch.Tensor:
        src_boxes = src_boxes.to(target_boxes.dtype)
        pw = src_boxes[:, 2] - src_boxes[:, 0] + 1.0
        ph = src_boxes[:, 3] - src_boxes[:, 1] + 1.0
        px = (src_boxes[:, 0] + src_boxes[:, 2]) * 0.5
        py = (src_boxes[:, 1] + src_boxes[:, 3]) * 0.5
        gw = target_boxes[:, 2] - target_boxes[:, 0] + 1.0
        gh = target_boxes[:, 3] - target_boxes[:, 1] + 1.0
        gx = (target_boxes[:, 0] + target_boxes[:, 2]) * 0.5
        gy = (target_boxes[:, 1] + target_boxes[:, 3]) * 0.5
        wx, wy, ww, wh = self.weights
        return torch.stack(
            [
                wx * (gx - px) / pw,
                wy * (gy - py) / ph,
                ww * torch.log(gw / pw),
                wh * torch.log(gh / ph),
            ],
            dim=1,
        )

    def apply_deltas(self, deltas: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        deltas = deltas.float()
        boxes = boxes.to(deltas.dtype)
        pw = (boxes[:, 2] - boxes[:, 0] + 1.0)[:, None]
        ph = (boxes[:, 3] - boxes[:, 1] + 1.0)[:, None]
        px = ((boxes[:, 0] + boxes[:, 2]) * 0.5)[:, None]
        py = ((boxes[:, 1] + boxes[:, 3]) * 0.5)[:, None]
        wx, wy, ww, wh = self.weights
        dx = deltas[:, 0::4] / wx
        dy = deltas[:, 1::4] / wy
        dw = (deltas[:, 2::4] / ww).clamp(min=-self.scale_clamp, max=self.scale_clamp)
        dh = (deltas[:, 3::4] / wh).clamp(min=-self.scale_clamp, max=self.scale_clamp)
        gw = pw * torch.exp(dw)
        gh = ph * torch.exp(dh)
        gx = px + pw * dx
        gy = py + ph * dy
        out = torch.stack(
            [gx - gw * 0.5 + 0.5, gy - gh * 0.5 + 0.5, gx + gw * 0.5 - 0.5, gy + gh * 0.5 - 0.5],
            dim=-1,
        )
        return out.reshape(deltas.shape)
