"""projects.benchmarking: frozen-BatchNorm calibration and the exclusive stage timer."""
import torch
from detectron2.layers import FrozenBatchNorm2d
from torch import nn

from projects import benchmarking


class _TwoLayerNet(nn.Module):
    """conv -> FrozenBN -> x * 100 -> FrozenBN: a stand-in meta-architecture taking a batch."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 1)
        self.bn1 = FrozenBatchNorm2d(3)
        self.bn2 = FrozenBatchNorm2d(3)
        self.outputs = []

    def forward(self, batched_inputs):
        x = torch.stack([d["image"] for d in batched_inputs])
        y1 = self.bn1(self.conv(x))
        y2 = self.bn2(y1 * 100 + 7)
        self.outputs = [y1, y2]
        return y2


def test_calibration_normalises_every_frozen_bn_in_order():
    torch.manual_seed(0)
    net = _TwoLayerNet()
    batch = [{"image": torch.randn(2, 5, 6) * 30 + 4} for _ in range(3)]
    assert benchmarking.calibrate_frozen_batchnorm(net, batch) == 2
    with torch.no_grad():
        net(batch)
    for y in net.outputs:  # zero mean, unit variance per channel on the calibration batch
        assert torch.allclose(y.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-4)
        assert torch.allclose(y.var(dim=(0, 2, 3), unbiased=False), torch.ones(3), atol=1e-3)
    # the second layer saw the calibrated first one: its mean is 7 (= 100 * 0 + 7)
    assert torch.allclose(net.bn2.running_mean, torch.full((3,), 7.0), atol=1e-2)
    assert torch.allclose(net.bn2.running_var, torch.full((3,), 1e4), rtol=1e-3)
    assert net.training  # the training flag is restored
    assert not any(m._forward_pre_hooks for m in net.modules())  # hooks removed


def test_stage_timer_charges_exclusive_time(monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(benchmarking.time, "perf_counter", lambda: clock[0])

    class Model:
        def backbone(self):
            clock[0] += 2.0

        def heads(self):
            clock[0] += 1.0
            self.post()  # nested: 4 s charged to postprocess, not to heads
            clock[0] += 0.5

        def post(self):
            clock[0] += 4.0

    m = Model()
    timer = benchmarking.StageTimer()
    timer.wrap("backbone", m, "backbone")
    timer.wrap("heads", m, "heads")
    timer.wrap("postprocess", m, "post")
    m.backbone()
    m.heads()
    assert dict(timer.seconds) == {"backbone": 2.0, "heads": 1.5, "postprocess": 4.0}
    timer.reset()
    m.post()
    assert dict(timer.seconds) == {"postprocess": 4.0}
