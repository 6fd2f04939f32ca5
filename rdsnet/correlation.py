"""Correlation module of RDSNet: object representations x pixel representations.

For an object with o = (o_bg, o_fg) in R^{2 x d} and the pixel map U in R^{d x h x w}, the two
logits of pixel p are <U(p), o_bg> and <U(p), o_fg> (plain dot products, no normalisation);
the 2-class softmax gives p_fg = sigmoid(<U(p), o_fg - o_bg>).
"""
import torch

__all__ = ["correlate", "foreground_logit"]


def correlate(pixel_reps: torch.Tensor, obj_reps: torch.Tensor) -> torch.Tensor:
    """2-class mask logits.

    Args:
        pixel_reps: (d, h, w) pixel representations U of one image.
        obj_reps: (n, 2 * d) object representations, [o_bg | o_fg].

    Returns:
        (n, 2, h, w) logits; channel 0 background, channel 1 foreground.
    """
    d = pixel_reps.shape[0]
    return torch.einsum("ncd,dhw->nchw", obj_reps.reshape(-1, 2, d), pixel_reps)


def foreground_logit(pixel_reps: torch.Tensor, obj_reps: torch.Tensor) -> torch.Tensor:
    """(n, h, w) logit difference <U, o_fg - o_bg>; its sigmoid is the 2-class softmax channel 1.

    Used at test time: bilinear interpolation is linear, so interpolating this difference equals
    the difference of the interpolated logits (half the memory of `correlate`).
    """
    d = pixel_reps.shape[0]
    diff = obj_reps[:, d:] - obj_reps[:, :d]
    return torch.einsum("nd,dhw->nhw", diff, pixel_reps)
