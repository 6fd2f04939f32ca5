"""The benchmark's stage split charges Decoupled R-CNN's box inference (its predictor's
`postprocess`: score threshold, NMS or soft-NMS, top-k) to post-processing."""
import pytest
import torch
from detectron2.modeling import build_model

import decoupled_rcnn.heads
from projects.benchmarking import StageTimer, WorkCounter, instrument_model
from projects.testing import timed_stage_probe

DELAY = 0.3


@pytest.mark.parametrize("nms_type,function", [("nms", "fast_rcnn_inference"),
                                               ("soft_nms_linear", "soft_nms_inference")])
def test_decoupled_box_inference_is_postprocessing(make_cfg, config_paths, nms_type, function,
                                                   monkeypatch):
    opts = config_paths["tiny_opts"] + ["MODEL.RPN.POST_NMS_TOPK_TEST", 40,
                                        "MODEL.DECOUPLED_RCNN.TEST_NMS_TYPE", nms_type]
    torch.manual_seed(0)
    model = build_model(make_cfg(opts=opts)).eval()
    image = {"image": torch.randint(0, 255, (3, 96, 128), dtype=torch.uint8).float(),
             "height": 96, "width": 128}
    with torch.no_grad():
        plain = model([image])[0]["instances"]
    monkeypatch.setattr(decoupled_rcnn.heads, function,
                        timed_stage_probe(getattr(decoupled_rcnn.heads, function)))
    timer, counter = StageTimer(), WorkCounter()
    instrument_model(model, timer, counter)
    with torch.no_grad():
        timed = model([image])[0]["instances"]
    assert set(timer.seconds) == {"backbone", "proposals", "heads", "postprocess"}
    assert timer.seconds["postprocess"] >= DELAY
    assert timer.seconds["heads"] < DELAY  # the tiny heads themselves take milliseconds
    assert counter.proposals == [40]
    assert len(timed) == len(plain) > 0
    assert torch.equal(timed.pred_boxes.tensor, plain.pred_boxes.tensor)
    assert torch.equal(timed.scores, plain.scores)
