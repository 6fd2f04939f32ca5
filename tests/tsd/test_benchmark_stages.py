"""The benchmark's stage split charges TSD's box inference to post-processing (its ROI heads
call the sibling head's predictor and, in the cascade, Detectron2's `fast_rcnn_inference`
directly, not `roi_heads.box_predictor.inference`)."""
import pytest
import torch
from detectron2.modeling import build_model
from detectron2.modeling.roi_heads import fast_rcnn

import tsd.roi_heads
from projects.benchmarking import StageTimer, WorkCounter, instrument_model
from projects.testing import timed_stage_probe
from tsd_tiny import tiny_cfg

DELAY = 0.3


@pytest.mark.parametrize("roi_heads", ["TSDROIHeads", "TSDCascadeROIHeads"])
def test_tsd_box_inference_is_postprocessing(roi_heads, monkeypatch):
    torch.manual_seed(0)
    model = build_model(tiny_cfg(roi_heads)).eval()
    image = {"image": torch.randint(0, 255, (3, 96, 128), dtype=torch.uint8).float(),
             "height": 96, "width": 128}
    with torch.no_grad():
        plain = model([image])[0]["instances"]
    for module in (fast_rcnn, tsd.roi_heads):
        if hasattr(module, "fast_rcnn_inference"):
            monkeypatch.setattr(module, "fast_rcnn_inference",
                                timed_stage_probe(module.fast_rcnn_inference))
    timer, counter = StageTimer(), WorkCounter()
    instrument_model(model, timer, counter)
    with torch.no_grad():
        timed = model([image])[0]["instances"]
    assert set(timer.seconds) == {"backbone", "proposals", "heads", "postprocess"}
    assert timer.seconds["postprocess"] >= DELAY
    assert timer.seconds["heads"] < DELAY  # the tiny heads themselves take milliseconds
    assert counter.proposals == [32]  # POST_NMS_TOPK_TEST of the tiny config
    # instrumenting changes no output
    assert len(timed) == len(plain) > 0
    assert torch.equal(timed.pred_boxes.tensor, plain.pred_boxes.tensor)
    assert torch.equal(timed.scores, plain.scores)
