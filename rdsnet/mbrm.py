"""Mask-based Boundary Refinement Module (MBRM), test-time only.

Each box edge is re-localised as a classification over pixel positions: the likelihood is
the response of a fixed 1-D boundary kernel to the mask's max-profile, the prior a Gaussian
centred on the regressed edge with sigma = max(gamma * box size, 1 px), truncated at 0.0044;
the refined edge is the argmax of the posterior. The kernel (9 taps) and bias are the constants
the authors ship in `mmdet/models/detectors/rdsnet.py` (learned offline, never trained by the
released code), so they are buffers here, not parameters, and are not part of checkpoints.
Left/top use the kernel, right/bottom the flipped kernel with the same bias.
"""
from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["MBRM"]

# Kernel taps for offsets -4..+4 and bias (authors' constants).
MBRM_KERNEL = (-0.2968, -0.2892, -0.2635, -3.2545, -0.1874, 2.5041, 0.0196, 0.0651, 0.0917)
MBRM_BIAS = -1.9536
# Prior weights <= this are set to 0 (|delta| > 3.294 sigma).
PRIOR_CUTOFF = 0.0044


class MBRM(nn.Module):
    """Refine (N, 4) inclusive-pixel boxes from (N, H, W) soft masks at image resolution."""

    def __init__(self, gamma: float = 0.05, kernel_size: int = 9):
        super().__init__()
        if kernel_size != len(MBRM_KERNEL):
            raise ValueError(
                f"MODEL.RDSNET.MBRM.KERNEL_SIZE={kernel_size}: only the authors' "
                f"{len(MBRM_KERNEL)}-tap kernel is available"
            )
        self.gamma = gamma
        self.padding = kernel_size // 2
        self.register_buffer("weight", torch.tensor(MBRM_KERNEL).view(1, 1, -1), persistent=False)
        self.register_buffer("bias", torch.tensor([MBRM_BIAS]), persistent=False)

    def boundary_evidence(self, profile: torch.Tensor, flip: bool) -> torch.Tensor:
        """(N, L) profile -> (N, L) sigmoid(cross-correlation with the (flipped) kernel + b)."""
        weight = self.weight.flip(-1) if flip else self.weight
        out = F.conv1d(profile[:, None].to(weight.dtype), weight, self.bias, padding=self.padding)
        return torch.sigmoid(out[:, 0])

    @staticmethod
    def edge_prior(length: int, edge: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """(N, length) truncated Gaussian exp(-(x - edge)^2 / (2 sigma^2)) over x = 0..length-1."""
        x = torch.arange(length, device=edge.device, dtype=edge.dtype)[None, :]
        g = torch.exp(-((x - edge[:, None]) ** 2) / (2 * sigma[:, None] ** 2))
        return torch.where(g > PRIOR_CUTOFF, g, torch.zeros_like(g))

    def distributions_from_profiles(
        self, h: torch.Tensor, v: torch.Tensor, boxes: torch.Tensor
    ) -> List[torch.Tensor]:
        """Edge posteriors [pL (N, W), pT (N, H), pR (N, W), pB (N, H)] from the profiles.

        Args:
            h: (N, W) max over rows of the masks; v: (N, H) max over columns.
            boxes: (N, 4) XYXY inclusive pixel coordinates of the same image.
        """
        boxes = boxes.float()
        sigma_x = torch.clamp(self.gamma * (boxes[:, 2] - boxes[:, 0]), min=1.0)
        sigma_y = torch.clamp(self.gamma * (boxes[:, 3] - boxes[:, 1]), min=1.0)
        out = []
        for profile, flip, edge, sigma in (
            (h, False, boxes[:, 0], sigma_x),
            (v, False, boxes[:, 1], sigma_y),
            (h, True, boxes[:, 2], sigma_x),
            (v, True, boxes[:, 3], sigma_y),
        ):
            joint = self.boundary_evidence(profile, flip) * self.edge_prior(
                profile.shape[1], edge, sigma
            )
            out.append(joint / joint.sum(dim=1, keepdim=True))
        return out

    def forward(self, masks: torch.Tensor, boxes: torch.Tensor) -> Optional[List[torch.Tensor]]:
        """(N, H, W) soft masks, (N, 4) boxes -> [pL, pT, pR, pB], or None without detections."""
        if boxes.shape[0] == 0:
            return None
        return self.distributions_from_profiles(masks.amax(dim=1), masks.amax(dim=2), boxes)

    @staticmethod
    def boxes_from_distributions(dists: List[torch.Tensor]) -> torch.Tensor:
        """[pL, pT, pR, pB] -> (N, 4) refined boxes (x1', y1', x2', y2') as float pixel indices."""
        p_l, p_t, p_r, p_b = dists
        return torch.stack(
            [p_l.argmax(1), p_t.argmax(1), p_r.argmax(1), p_b.argmax(1)], dim=1
        ).float()

    def refine_from_profiles(self, h, v, boxes) -> torch.Tensor:
        """(N, W), (N, H) profiles and (N, 4) boxes -> (N, 4) refined boxes."""
        if boxes.shape[0] == 0:
            return boxes.new_zeros((0, 4)).float()
        return self.boxes_from_distributions(self.distributions_from_profiles(h, v, boxes))

    def get_boxes(self, masks: torch.Tensor, boxes: torch.Tensor, scores: torch.Tensor):
        """(N, H, W) masks, (N, 4) boxes, (N,) scores -> (N, 5) [x1', y1', x2', y2', score]."""
        if boxes.shape[0] == 0:
            return boxes.new_zeros((0, 5)).float()
        refined = self.boxes_from_distributions(self.forward(masks, boxes))
        return torch.cat([refined, scores[:, None].to(refined.dtype)], dim=1)
