"""tools/analyze_model.py: FLOPs/parameters of a tiny detector and of a ResNet-50 trunk (checked
against torchvision's ResNet-50 counted by fvcore, and its published 4.09 GFLOPs)."""
import pytest
import torch
import torchvision
from fvcore.nn import FlopCountAnalysis

from projects.tools_common import ToolError, build_model, setup_cfg


@pytest.fixture(scope="module")
def analyze(load_tool):
    return load_tool("analyze_model")


def test_tiny_detector_flop_activation_parameter_structure(analyze, tmp_path, tiny_config,
                                                            capsys):
    torch.manual_seed(0)
    res = analyze.main(["--config-file", tiny_config, "--tasks", "flop", "activation",
                        "parameter", "structure", "--num-inputs", "2",
                        "--json", str(tmp_path / "a.json")])
    out = capsys.readouterr().out
    assert res["num_inputs"] == 2  # averaged over 2 images of shapes_val
    assert res["gflops"] > 0 and res["gflops_by_operator"]["conv"] > 0
    assert "batch_norm" not in res["gflops_by_operator"] or \
        res["gflops_by_operator"]["batch_norm"] == 0
    assert res["mactivations"] > 0
    model = build_model(setup_cfg(tiny_config))
    assert res["params"] == sum(p.numel() for p in model.parameters())  # BN: no frozen norms
    assert "GFLOPs" in out and "parameters:" in out and "GeneralizedRCNN" in out
    assert (tmp_path / "a.json").exists()


def test_synthetic_input_contains_the_trunk(analyze, tiny_config):
    cfg = setup_cfg(tiny_config)
    model = build_model(cfg).eval()
    inputs = analyze.build_inputs(cfg, 5, (96, 128))
    assert len(inputs) == 1 and inputs[0][0]["image"].shape == (3, 96, 128)
    full = analyze.analyze_flops(model, inputs)[0]
    trunk = analyze.analyze_backbone(cfg, (96, 128))
    # the image is fed as-is (no resize), so the detector's convs = its trunk's + FPN + heads
    assert full["gflops_by_operator"]["conv"] > trunk["gflops"] > 0
    assert full["num_inputs"] == 1 and full["gflops_std"] == 0


def test_backbone_only_resnet50_matches_torchvision(analyze, tiny_config, capsys):
    # Detectron2 ResNet-50 with the stride in the 3x3 conv (= torchvision's) and BatchNorm
    res = analyze.main(["--config-file", tiny_config, "--backbone-only", "--input-size",
                        "224", "224", "--opts", "MODEL.RESNETS.DEPTH", "50",
                        "MODEL.RESNETS.RES2_OUT_CHANNELS", "256",
                        "MODEL.RESNETS.STRIDE_IN_1X1", "False"])
    out = capsys.readouterr().out
    tv = torchvision.models.resnet50().eval()
    tv_flops = FlopCountAnalysis(tv, torch.zeros(1, 3, 224, 224))
    tv_flops.unsupported_ops_warnings(False)
    tv_ops = tv_flops.by_operator()
    assert res["gflops"] * 1e9 == pytest.approx(tv_ops["conv"], rel=1e-9)
    assert res["gflops_with_fc"] == pytest.approx(4.09, abs=0.005)  # torchvision's docs
    tv_params = sum(p.numel() for p in tv.parameters())
    assert res["params_with_fc"] == tv_params == 25_557_032
    assert res["params"] == tv_params - (2048 * 1000 + 1000)
    assert "4.087 GFLOPs" in out and "23.508 M" in out


def test_backbone_only_counts_frozen_bn_and_needs_size(analyze, tiny_config):
    cfg = setup_cfg(tiny_config, ["MODEL.RESNETS.NORM", "FrozenBN"])
    bn = analyze.analyze_backbone(setup_cfg(tiny_config), (64, 64))
    frozen = analyze.analyze_backbone(cfg, (64, 64))
    assert frozen["params"] == bn["params"]  # frozen affine weights still counted
    assert frozen["gflops"] == pytest.approx(bn["gflops"])
    with pytest.raises(ToolError, match="--input-size"):
        analyze.run(cfg, ["flop"], backbone_only=True)
    with pytest.raises(ToolError, match="no_such_dataset.*--input-size"):
        analyze.build_inputs(setup_cfg(tiny_config, ["DATASETS.TEST", "('no_such_dataset',)"]),
                             1, None)
    with pytest.raises(ToolError, match="structure"):
        analyze.run(cfg, ["structure"], input_size=(64, 64), backbone_only=True)
