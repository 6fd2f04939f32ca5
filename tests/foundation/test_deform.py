"""The torchvision-backed deformable ResNet-FPN backbone (projects_common.deform)."""
import pytest
import torch
import torch.nn.functional as F
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_backbone

import projects
from projects_common.deform import TorchvisionDeformConv, TorchvisionModulatedDeformConv


def _compiled_detectron2_ops():
    from detectron2 import _C

    return not getattr(_C, "IS_PURE_PYTHON_STANDIN", False)


def test_zero_offsets_equal_a_plain_convolution(device):
    torch.manual_seed(0)
    conv = TorchvisionDeformConv(8, 6, 3, stride=2, padding=1, bias=False).to(device)
    x = torch.randn(2, 8, 9, 11, device=device)
    offset = torch.zeros(2, 2 * 9, 5, 6, device=device)
    assert torch.allclose(conv(x, offset), F.conv2d(x, conv.weight, None, 2, 1), atol=1e-5)
    mconv = TorchvisionModulatedDeformConv(8, 6, 3, padding=1, bias=True).to(device)
    mask = torch.full((2, 9, 9, 11), 0.5, device=device)
    expected = F.conv2d(x, mconv.weight, None, 1, 1) * 0.5 + mconv.bias.view(1, -1, 1, 1)
    offset = torch.zeros(2, 18, 9, 11, device=device)
    assert torch.allclose(mconv(x, offset, mask), expected, atol=1e-5)


def test_integer_offset_shifts_the_sampling_grid(device):
    # an offset of (dy, dx) = (0, 1) at every kernel position = convolving the input shifted left
    torch.manual_seed(0)
    conv = TorchvisionDeformConv(3, 4, 3, padding=1, bias=False).to(device)
    x = torch.randn(1, 3, 7, 8, device=device)
    offset = torch.zeros(1, 18, 7, 8, device=device)
    offset[:, 1::2] = 1.0
    expected = F.conv2d(F.pad(x, (1, 1, 1, 1))[..., 1:], conv.weight)  # input shifted by +1 in x
    # compare away from the right border, where the shifted window leaves the padded input
    assert torch.allclose(conv(x, offset)[..., :-1], expected, atol=1e-5)
    offset_y = torch.zeros(1, 18, 7, 8, device=device)
    offset_y[:, 0::2] = 1.0  # dy comes first in each pair
    expected_y = F.conv2d(F.pad(x, (1, 1, 1, 1))[..., 1:, :], conv.weight)
    assert torch.allclose(conv(x, offset_y)[..., :-1, :], expected_y, atol=1e-5)


def test_backbone_swaps_every_deformable_conv_and_runs_on_cpu():
    cfg = projects.get_cfg()
    cfg.merge_from_list(["MODEL.BACKBONE.NAME", "build_resnet_tv_deform_fpn_backbone",
                         "MODEL.RESNETS.DEPTH", 50, "MODEL.RESNETS.DEFORM_ON_PER_STAGE",
                         [False, True, True, True], "MODEL.RESNETS.DEFORM_MODULATED", True,
                         "MODEL.RESNETS.OUT_FEATURES", ["res2", "res3", "res4", "res5"],
                         "MODEL.FPN.IN_FEATURES", ["res2", "res3", "res4", "res5"]])
    backbone = build_backbone(cfg, ShapeSpec(channels=3))
    kinds = [type(m) for m in backbone.modules() if "DeformConv" in type(m).__name__]
    assert len(kinds) == 4 + 6 + 3 and set(kinds) == {TorchvisionModulatedDeformConv}
    out = backbone(torch.randn(1, 3, 64, 96))
    assert out["p2"].shape == (1, 256, 16, 24)
    out["p6"].sum().backward()


def test_detectron2_deform_conv_matches_or_is_refused(device):
    """Detectron2's own (compiled, CUDA-only) deformable convolutions compute what the
    torchvision-backed ones compute, on the same weights and fractional offsets; on CPU, or
    without compiled ops, Detectron2 refuses them with an error naming the cause."""
    from detectron2.layers import DeformConv, ModulatedDeformConv

    torch.manual_seed(0)
    x = torch.randn(2, 4, 9, 10, device=device)
    offset = torch.randn(2, 18, 9, 10, device=device) * 1.5
    mask = torch.rand(2, 9, 9, 10, device=device)
    ours = TorchvisionDeformConv(4, 5, 3, padding=1, bias=False).to(device)
    theirs = DeformConv(4, 5, 3, padding=1, bias=False).to(device)
    theirs.weight.data.copy_(ours.weight.data)
    mours = TorchvisionModulatedDeformConv(4, 5, 3, padding=1, bias=True).to(device)
    mtheirs = ModulatedDeformConv(4, 5, 3, padding=1, bias=True).to(device)
    mtheirs.load_state_dict(mours.state_dict())
    # DeformConv: torchvision's kernel on CPU (any Detectron2), Detectron2's compiled CUDA
    # kernel on GPU; ModulatedDeformConv: compiled CUDA kernel only.
    if device == "cpu" or _compiled_detectron2_ops():
        assert torch.allclose(theirs(x, offset), ours(x, offset), atol=1e-4)
    else:  # the fallback's stand-in names the missing compiled op
        with pytest.raises(NotImplementedError, match="deform_conv_forward"):
            theirs(x, offset)
    if device == "cuda" and _compiled_detectron2_ops():
        assert torch.allclose(mtheirs(x, offset, mask), mours(x, offset, mask), atol=1e-4)
    elif device == "cpu":
        with pytest.raises(NotImplementedError, match="not supported on CPUs"):
            mtheirs(x, offset, mask)
    else:
        with pytest.raises(NotImplementedError, match="modulated_deform_conv_forward"):
            mtheirs(x, offset, mask)
