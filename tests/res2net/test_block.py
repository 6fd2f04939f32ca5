"""Bottle2neck semantics: which inputs the hierarchical 3x3 convs see, the
bypassed last split, the first-of-stage average pool, scale 1 and scale 2."""
import pytest
import torch
import torch.nn.functional as F

from res2net.blocks import Bottle2neckBlock


def capture(block, x):
    """Run ``block`` on ``x``; return the splits of U, inputs and outputs of each K_i (after its
    BN + ReLU) and the concat fed to conv3."""
    rec = {"conv_in": [], "y": []}
    hooks = [block.conv1.register_forward_hook(lambda m, i, o: rec.__setitem__("u", F.relu(o))),
             block.conv3.register_forward_pre_hook(lambda m, i: rec.__setitem__("cat", i[0]))]
    hooks += [c.register_forward_pre_hook(lambda m, i: rec["conv_in"].append(i[0]))
              for c in block.convs]
    hooks += [bn.register_forward_hook(lambda m, i, o: rec["y"].append(F.relu(o)))
              for bn in block.bns]
    with torch.no_grad():
        rec["out"] = block(x)
    for h in hooks:
        h.remove()
    return rec


def make(scale, is_first, stride=1, width=3, cin=None, **kw):
    torch.manual_seed(1)
    cin = cin or (8 if is_first else 16)
    block = Bottle2neckBlock(cin, 16, width=width, scale=scale, stride=stride, is_first=is_first,
                             norm="BN", **kw)
    for m in block.modules():  # non-trivial BN statistics
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5)
    return block.eval(), torch.randn(2, cin, 9, 7)


def test_hierarchical_sums_use_previous_output():
    # Normal block, s = 4: K_1 sees x_1, K_i sees x_i + y_{i-1} (post-ReLU), y_s = x_s.
    block, x = make(scale=4, is_first=False)
    rec = capture(block, x)
    xs = torch.split(rec["u"], 3, dim=1)
    assert len(rec["conv_in"]) == 3
    torch.testing.assert_close(rec["conv_in"][0], xs[0])
    for i in (1, 2):
        torch.testing.assert_close(rec["conv_in"][i], xs[i] + rec["y"][i - 1])
    ys = torch.split(rec["cat"], 3, dim=1)
    for i in range(3):  # order: [y_1, y_2, y_3, bypass]
        torch.testing.assert_close(ys[i], rec["y"][i])
    torch.testing.assert_close(ys[3], xs[3])  # the LAST split bypasses (code, not paper)


def test_scale_two_has_no_hierarchical_sum():
    # s = 2 ("ResNet-50 48w x 2s" control): one 3x3 conv on x_1, x_2 bypasses; no addition.
    block, x = make(scale=2, is_first=False)
    rec = capture(block, x)
    xs = torch.split(rec["u"], 3, dim=1)
    assert len(block.convs) == 1 and len(rec["conv_in"]) == 1
    torch.testing.assert_close(rec["conv_in"][0], xs[0])
    torch.testing.assert_close(rec["cat"], torch.cat([rec["y"][0], xs[1]], dim=1))


@pytest.mark.parametrize("stride", [1, 2])
def test_first_block_has_no_sums_and_pools_last_split(stride):
    block, x = make(scale=4, is_first=True, stride=stride)
    rec = capture(block, x)
    xs = torch.split(rec["u"], 3, dim=1)
    for i in range(3):  # every K_i sees its own split only
        torch.testing.assert_close(rec["conv_in"][i], xs[i])
        assert block.convs[i].stride == (stride, stride)
    pooled = F.avg_pool2d(xs[3], 3, stride=stride, padding=1, count_include_pad=True)
    torch.testing.assert_close(torch.split(rec["cat"], 3, dim=1)[3], pooled)
    assert rec["out"].shape[2:] == ((9 + stride - 1) // stride, (7 + stride - 1) // stride)


def test_first_block_without_stride1_pool_passes_last_split():
    # mmdet / Res2Net-detectron2 behaviour (POOL_STRIDE1 False): no pool at stride 1.
    block, x = make(scale=4, is_first=True, stride=1, pool_stride1=False)
    rec = capture(block, x)
    torch.testing.assert_close(torch.split(rec["cat"], 3, dim=1)[3],
                               torch.split(rec["u"], 3, dim=1)[3])


def test_scale_one_is_a_plain_bottleneck():
    # one 3x3 conv over all `width` channels, no split, no pool.
    block, x = make(scale=1, is_first=True, stride=2, width=6)
    rec = capture(block, x)
    assert len(block.convs) == 1 and block.convs[0].in_channels == 6
    torch.testing.assert_close(rec["conv_in"][0], rec["u"])
    torch.testing.assert_close(rec["cat"], rec["y"][0])


def test_output_is_relu_of_residual_sum():
    for first, cin in ((False, 16), (True, 8)):
        block, x = make(scale=4, is_first=first, stride=2 if first else 1, cin=cin)
        rec = capture(block, x)
        main = block.conv3(rec["cat"])
        short = block.shortcut(x) if first else x
        torch.testing.assert_close(rec["out"], F.relu(main + short))


def test_v1b_shortcut_avg_pools_before_the_1x1():
    block, x = make(scale=4, is_first=True, stride=2, avg_down=True)
    rec = capture(block, x)
    pooled = F.avg_pool2d(x, 2, stride=2, ceil_mode=True, count_include_pad=False)
    torch.testing.assert_close(rec["out"], F.relu(block.conv3(rec["cat"]) + block.shortcut(pooled)))
    assert rec["out"].shape[2:] == (5, 4)  # ceil(9/2), ceil(7/2)


def test_zero_init_residual_starts_as_the_shortcut():
    # MODEL.RES2NET.ZERO_INIT_RESIDUAL (training from scratch): conv3's norm scale starts at 0.
    torch.manual_seed(2)
    block = Bottle2neckBlock(16, 16, width=3, scale=4, norm="BN", zero_init_residual=True).eval()
    assert torch.count_nonzero(block.conv3.norm.weight) == 0
    x = torch.randn(2, 16, 5, 6)
    with torch.no_grad():
        torch.testing.assert_close(block(x), F.relu(x + block.conv3.norm.bias.view(1, -1, 1, 1)))
