"""Deformable ResNet-FPN backbones that run on CPU and GPU.

Detectron2's `DeformConv` / `ModulatedDeformConv` call its compiled kernels, which exist only
for CUDA (and not at all in a build without compiled ops). `TorchvisionDeformConv` and
`TorchvisionModulatedDeformConv` are the same modules (same parameters and state-dict keys,
same offset layout: per kernel position a (dy, dx) pair, deformable groups outermost) whose
forward calls `torchvision.ops.deform_conv2d` instead, which has CPU and CUDA kernels.

`build_resnet_tv_deform_fpn_backbone` is Detectron2's `build_resnet_fpn_backbone` (so
``MODEL.RESNETS.DEFORM_ON_PER_STAGE`` / ``DEFORM_MODULATED`` / ``DEFORM_NUM_GROUPS`` work as in
Detectron2) with every deformable conv switched to the torchvision op. Checkpoints are
interchangeable with `build_resnet_fpn_backbone`'s.
"""
from detectron2.layers.deform_conv import DeformConv, ModulatedDeformConv
from detectron2.modeling.backbone import BACKBONE_REGISTRY
from detectron2.modeling.backbone.fpn import build_resnet_fpn_backbone
from torch import nn
from torchvision.ops import deform_conv2d

__all__ = [
    "TorchvisionDeformConv",
    "TorchvisionModulatedDeformConv",
    "use_torchvision_deform_convs",
    "build_resnet_tv_deform_fpn_backbone",
]


class _TorchvisionForward:
    def _finish(self, x):
        if self.norm is not None:
            x = self.norm(x)
        if self.activation is not None:
            x = self.activation(x)
        return x


class TorchvisionDeformConv(_TorchvisionForward, DeformConv):
    """`DeformConv` (DCNv1) computed with `torchvision.ops.deform_conv2d`.

    ``offset``: (N, 2 * deformable_groups * kh * kw, H_out, W_out).
    """

    def forward(self, x, offset):
        out = deform_conv2d(x, offset, self.weight, None, stride=self.stride,
                            padding=self.padding, dilation=self.dilation)
        return self._finish(out)


class TorchvisionModulatedDeformConv(_TorchvisionForward, ModulatedDeformConv):
    """`ModulatedDeformConv` (DCNv2) computed with `torchvision.ops.deform_conv2d`.

    ``offset`` as above, ``mask``: (N, deformable_groups * kh * kw, H_out, W_out) in [0, 1].
    """

    def forward(self, x, offset, mask):
        out = deform_conv2d(x, offset, self.weight, self.bias, stride=self.stride,
                            padding=self.padding, dilation=self.dilation, mask=mask)
        return self._finish(out)


_SWAP = {DeformConv: TorchvisionDeformConv, ModulatedDeformConv: TorchvisionModulatedDeformConv}


def use_torchvision_deform_convs(module: nn.Module) -> nn.Module:
    """Switch every Detectron2 deformable conv inside ``module`` to its torchvision version,
    in place (parameters untouched); returns ``module``."""
    for m in module.modules():
        if type(m) in _SWAP:
            m.__class__ = _SWAP[type(m)]
    return module


@BACKBONE_REGISTRY.register()
def build_resnet_tv_deform_fpn_backbone(cfg, input_shape):
    """Detectron2's ResNet-FPN backbone whose deformable convs run through torchvision."""
    return use_torchvision_deform_convs(build_resnet_fpn_backbone(cfg, input_shape))
