"""Export (`projects.export`, `tools/export_model.py`): a model traced at one input size equals the
eager model at other sizes and aspect ratios, as TorchScript and as ONNX run in onnxruntime.

One tiny model per method and config family (ResNet-18 / narrow Res2Net, 64-channel FPN, 3
classes, random weights). The classifier weights are scaled and their biases drawn at random
so that the detections differ between images. Traced at 128x160, checked at 96x144 (wider) and
192x144 (taller): the sizes of the FPN levels, the padded sizes, the number of candidates and
of detections all change, so any size a trace froze shows up as shifted boxes, different masks
or a failing run.
"""
import os

import pytest
import torch

from projects.export import ExportError, export_onnx, trace, uses_soft_nms
from projects.testing import TINY_RCNN_OPTS, TINY_RESNET_OPTS, load_config, repo_root

TRACE_SIZE = (128, 160)
OTHER_SIZES = [(96, 144), (192, 144)]

_RES2NET = [
    "MODEL.RES2NET.NORM", "GN", "MODEL.RES2NET.GN_NUM_GROUPS", 8, "MODEL.RES2NET.BASE_WIDTH", 8,
    "MODEL.RES2NET.STEM_OUT_CHANNELS", 32, "MODEL.RES2NET.RES2_OUT_CHANNELS", 64,
]
_RDSNET = ["MODEL.RDSNET.NUM_CLASSES", 3, "MODEL.RDSNET.PIXEL_CONV_DIM", 64]
# Top-k between the P3 anchor counts at 96x144 (padded 96x160: 2160) and 128x160 (2880); a score
# threshold and paste chunk that give a different number of detections and of mask chunks.
_RDSNET_SIZES = ["MODEL.RDSNET.TOPK_CANDIDATES_TEST", 2500, "MODEL.RDSNET.SCORE_THRESH_TEST", 0.99,
                 "MODEL.RDSNET.MASK_PASTE_CHUNK", 8]
_SOFT_NMS = ["MODEL.RESNETS.STRIDE_IN_1X1", False, "MODEL.ROI_HEADS.SCORE_THRESH_TEST", 0.3]

# fewer proposals and detections than the training tests: faster, and still dozens per image
_FAST = ["MODEL.RPN.POST_NMS_TOPK_TEST", 50, "TEST.DETECTIONS_PER_IMAGE", 20]

FAMILIES = {
    "res2net_mask_rcnn": ("res2net/mask_rcnn_R2_50_26w4s_FPN_2x.yaml", TINY_RCNN_OPTS + _RES2NET),
    "dynamic_rcnn": ("dynamic_rcnn/dynamic_rcnn_R_50_FPN_1x.yaml", TINY_RCNN_OPTS),
    "tsd_faster": ("tsd/tsd_faster_rcnn_R_50_FPN_1x.yaml", TINY_RCNN_OPTS),
    "tsd_mask": ("tsd/tsd_mask_rcnn_R_50_FPN_1x.yaml", TINY_RCNN_OPTS),
    "tsd_cascade": ("tsd/tsd_cascade_rcnn_R_50_FPN_20e.yaml", TINY_RCNN_OPTS),
    "decoupled_rcnn": ("decoupled_rcnn/decoupled_rcnn_R_50_FPN_2x.yaml", TINY_RCNN_OPTS),
    "decoupled_rcnn_soft_nms": (
        "decoupled_rcnn/decoupled_rcnn_MS_X_101_32x4d_FPN_2x.yaml", TINY_RCNN_OPTS + _SOFT_NMS),
    "rdsnet": ("rdsnet/rdsnet_R_50_FPN_1x.yaml", _RDSNET + _RDSNET_SIZES),
    "rdsnet_mbrm": ("rdsnet/rdsnet_refine_R_50_FPN_1x.yaml", _RDSNET),
}


def build_tiny(family):
    from detectron2.modeling import build_model

    config, opts = FAMILIES[family]
    cfg = load_config(os.path.join(repo_root(), "configs", config),
                      TINY_RESNET_OPTS + opts + _FAST)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, module in model.named_modules():
            if name.endswith("cls_score"):  # features, not the prior, decide the class
                module.weight.mul_(10.0)
                module.bias.copy_(torch.randn(module.bias.shape, generator=g) * 0.5)
    return model


def image(size, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(3, *size, generator=g) * 255


def fields(adapter, outputs):
    inst = adapter.outputs_schema([torch.as_tensor(o) for o in outputs])[0]["instances"]
    return {k: (v.tensor if hasattr(v, "tensor") else v) for k, v in inst.get_fields().items()}


def assert_same(expected, actual, box_atol):
    assert set(expected) == set(actual)
    assert expected["pred_boxes"].shape[0] > 0, "no detections: the comparison would be empty"
    assert expected["scores"].std() > 0  # distinct detections, not one repeated box
    for key, e in expected.items():
        a = actual[key]
        assert a.shape == e.shape, (key, a.shape, e.shape)
        if key == "pred_boxes":
            torch.testing.assert_close(a, e, atol=box_atol, rtol=0)
        elif e.dtype == torch.bool:  # RDSNet's thresholded full-image masks
            assert (a != e).float().mean() < 1e-3, key
        elif e.is_floating_point():  # scores, R-CNN mask probabilities
            torch.testing.assert_close(a, e, atol=1e-4, rtol=0)
        else:
            assert torch.equal(a, e), key


@pytest.mark.parametrize("family", list(FAMILIES))
def test_traced_and_onnx_models_equal_eager_at_other_sizes(family, tmp_path):
    model = build_tiny(family)
    traced, adapter = trace(model, image(TRACE_SIZE, 0))
    inputs = [image(size, seed) for seed, size in enumerate(OTHER_SIZES, 1)]
    with torch.no_grad():
        eager = [fields(adapter, adapter(x)) for x in inputs]
        for x, expected in zip(inputs, eager):
            assert_same(expected, fields(adapter, traced(x)), box_atol=1e-3)

    if uses_soft_nms(model):
        with pytest.raises(ExportError, match="MODEL.DECOUPLED_RCNN.TEST_NMS_TYPE"):
            export_onnx(model, image(TRACE_SIZE, 0), str(tmp_path / "model.onnx"))
        return
    import onnxruntime as ort
    path = str(tmp_path / "model.onnx")
    onnx_adapter = export_onnx(model, image(TRACE_SIZE, 0), path)
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    for x, expected in zip(inputs, eager):
        outputs = session.run(None, {"image": x.numpy()})
        assert_same(expected, fields(onnx_adapter, outputs), box_atol=1e-2)


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_export_model_tool_writes_a_model_equal_to_eager(fmt, load_tool, tiny_config, tmp_path):
    tool = load_tool("export_model")
    out = tmp_path / fmt
    path = tool.main(["--config-file", tiny_config, "--format", fmt, "--output", str(out),
                      "--verify"])
    assert os.path.isfile(path) and os.path.isfile(out / "schema.txt")
    if fmt == "torchscript":  # the saved file reloads and runs at another size
        loaded = torch.jit.load(path)
        outputs = loaded(image((80, 120), 3))
        assert outputs[0].shape[-1] == 4


def test_export_model_tool_refuses_scripting_and_onnx_soft_nms(load_tool, tiny_config, tmp_path):
    tool = load_tool("export_model")
    with pytest.raises(tool.ToolError, match="scripting"):
        tool.main(["--config-file", tiny_config, "--output", str(tmp_path),
                   "--export-method", "scripting"])
    soft = os.path.join(repo_root(), "configs", FAMILIES["decoupled_rcnn_soft_nms"][0])
    opts = TINY_RESNET_OPTS + TINY_RCNN_OPTS + _SOFT_NMS
    with pytest.raises(tool.ToolError, match="TEST_NMS_TYPE"):
        tool.main(["--config-file", soft, "--format", "onnx", "--output", str(tmp_path),
                   "--opts"] + [str(v) for v in opts])


@pytest.mark.parametrize("method", ["linear", "gaussian", "naive"])
def test_traced_soft_nms_equals_eager_on_other_inputs(method):
    from projects_common.soft_nms import batched_soft_nms

    def boxes_scores(n, seed):
        g = torch.Generator().manual_seed(seed)
        xy = torch.rand(n, 2, generator=g) * 60
        boxes = torch.cat([xy, xy + 5 + torch.rand(n, 2, generator=g) * 30], dim=1)
        return boxes, torch.rand(n, generator=g), torch.randint(0, 3, (n,), generator=g)

    def fn(boxes, scores, classes):
        return batched_soft_nms(boxes, scores, classes, 0.3, 0.05, method)

    with torch.no_grad():
        traced = torch.jit.trace(fn, boxes_scores(40, 0), check_trace=False)
        for n, seed in ((25, 1), (90, 2)):  # fewer / more boxes and picks than traced
            inputs = boxes_scores(n, seed)
            keep, scores = traced(*inputs)
            expected_keep, expected_scores = fn(*inputs)
            assert 0 < expected_keep.numel() < n
            assert torch.equal(keep, expected_keep)
            torch.testing.assert_close(scores, expected_scores, atol=0, rtol=0)
