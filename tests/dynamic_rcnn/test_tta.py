"""Multi-scale + flip test: the standard pass plus TEST.AUG scales, each flipped."""
import pytest
import torch
from detectron2.modeling import GeneralizedRCNNWithTTA, build_model

import projects
from dynamic_rcnn.tta import ConcatTTAMapper, RawUnionTTA
from projects.testing import TINY_RCNN_OPTS, TINY_RESNET_OPTS, load_config
from projects_common.tta import build_tta_model

CONFIG = projects.model_zoo.get_config_file("dynamic_rcnn/dynamic_rcnn_R_50_FPN_1x.yaml")
TTA_OPTS = ["TEST.AUG.ENABLED", True, "TEST.AUG.MIN_SIZES", (96, 128), "TEST.AUG.MAX_SIZE", 160,
            "TEST.AUG.FLIP", True, "INPUT.MIN_SIZE_TEST", 112, "INPUT.MAX_SIZE_TEST", 140]


def _image():
    g = torch.Generator().manual_seed(0)
    img = (torch.rand(3, 100, 200, generator=g) * 255).to(torch.uint8)
    return {"image": img, "height": 100, "width": 200}


def test_standard_pass_added_to_tta():
    cfg = load_config(CONFIG, TINY_RESNET_OPTS + TINY_RCNN_OPTS + TTA_OPTS + [
        "MODEL.DYNAMIC_RCNN.TTA_ADD_TEST_SIZE", True])
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    tta = build_tta_model(cfg, model)
    assert isinstance(tta, GeneralizedRCNNWithTTA)
    assert isinstance(tta.tta_mapper, ConcatTTAMapper)
    augmented = tta.tta_mapper(_image())
    # (standard 112/140 + 96/160 + 128/160) x (plain, flipped); 100x200 input
    shapes = [tuple(a["image"].shape[1:]) for a in augmented]
    assert shapes == [(70, 140), (70, 140), (80, 160), (80, 160), (80, 160), (80, 160)]
    with torch.no_grad():
        out = tta([_image()])[0]["instances"]
    assert out.image_size == (100, 200)
    if len(out):
        boxes = out.pred_boxes.tensor
        assert (boxes[:, 2] <= 200).all() and (boxes[:, 3] <= 100).all()


def test_default_tta_without_standard_pass():
    cfg = load_config(CONFIG, TINY_RESNET_OPTS + TINY_RCNN_OPTS + TTA_OPTS)
    model = build_model(cfg).eval()
    tta = build_tta_model(cfg, model)
    assert not isinstance(tta.tta_mapper, ConcatTTAMapper) and isinstance(tta, RawUnionTTA)
    assert len(tta.tta_mapper(_image())) == 4


MS_TEST_CONFIG = projects.model_zoo.get_config_file(
    "dynamic_rcnn/dynamic_rcnn_R_101_DCNv2_FPN_MS_3x_MS_test.yaml")


def test_ms_test_config_filters_the_union_of_raw_detections_once():
    """The authors' bbox_aug: raw detections of every pass are pooled, then filtered once.

    Original image 50 x 100, one pass at short side 100 (x2) and its flip. Class 0 boxes in
    original coordinates: z = (10,10,50,40) 0.95 (flipped pass), y = (20,10,60,40) 0.9 and
    x = (30,10,70,40) 0.8 (plain pass). IoU(z, y) = IoU(y, x) = 0.6, IoU(z, x) = 1/3.
    Union filtered once: z suppresses y, x survives -> {z, x}. Post-processing each pass first
    (Detectron2's merge) would drop x inside the plain pass (y > x) and then y -> {z} only.
    """
    cfg = load_config(MS_TEST_CONFIG, TINY_RESNET_OPTS + TINY_RCNN_OPTS + [
        "TEST.AUG.MIN_SIZES", (100,), "TEST.AUG.MAX_SIZE", 400, "INPUT.MIN_SIZE_TEST", 100,
        "INPUT.MAX_SIZE_TEST", 400, "MODEL.DYNAMIC_RCNN.TTA_ADD_TEST_SIZE", False])
    assert cfg.MODEL.DYNAMIC_RCNN.TTA_MERGE == "raw" and cfg.TEST.AUG.FLIP
    model = build_model(cfg).eval()
    tta = build_tta_model(cfg, model)
    assert isinstance(tta, RawUnionTTA)
    z, y, x = [10, 10, 50, 40], [20, 10, 60, 40], [30, 10, 70, 40]

    def to_pass(box, flipped):  # original -> network input (x2, maybe mirrored in 200 px)
        x1, y1, x2, y2 = (2 * v for v in box)
        return [200 - x2, y1, 200 - x1, y2] if flipped else [x1, y1, x2, y2]

    def raw(dets, flipped):
        boxes = torch.tensor([to_pass(b, flipped) * 3 for b, _ in dets])  # same box, 3 classes
        scores = torch.tensor([[s, 0.0, 0.0, 1 - s] for _, s in dets])
        return boxes, scores

    seen = []

    def stub(inputs):
        out = []
        for inp in inputs:
            seen.append(tuple(inp["image"].shape))
            flipped = len(seen) == 2  # passes: plain, flipped
            out.append(raw([(z, 0.95)] if flipped else [(y, 0.9), (x, 0.8)], flipped))
        return out

    tta.raw_detections = stub
    g = torch.Generator().manual_seed(0)
    image = (torch.rand(3, 50, 100, generator=g) * 255).to(torch.uint8)
    with torch.no_grad():
        out = tta([{"image": image, "height": 50, "width": 100}])[0]["instances"]
    assert seen == [(3, 100, 200), (3, 100, 200)]
    assert out.pred_classes.tolist() == [0, 0]
    assert out.scores.tolist() == [pytest.approx(0.95), pytest.approx(0.8)]
    assert out.pred_boxes.tensor.tolist() == [pytest.approx(z), pytest.approx(x)]
    assert out.pred_boxes.tensor.dtype == torch.float32


def test_detectron2_merge_is_an_option():
    cfg = load_config(CONFIG, TINY_RESNET_OPTS + TINY_RCNN_OPTS + TTA_OPTS + [
        "MODEL.DYNAMIC_RCNN.TTA_MERGE", "detections"])
    tta = build_tta_model(cfg, build_model(cfg).eval())
    assert type(tta) is GeneralizedRCNNWithTTA
    cfg.MODEL.DYNAMIC_RCNN.TTA_MERGE = "nms"
    with pytest.raises(ValueError, match="TTA_MERGE"):
        build_tta_model(cfg, build_model(cfg).eval())


def test_raw_detections_are_the_models_pre_filter_outputs():
    """One pass's raw detections, filtered as Detectron2's box predictor does, give exactly the
    model's own inference output for that input (same boxes, scores, classes)."""
    from detectron2.modeling.roi_heads.fast_rcnn import fast_rcnn_inference_single_image

    cfg = load_config(CONFIG, TINY_RESNET_OPTS + TINY_RCNN_OPTS + TTA_OPTS + [
        "MODEL.ROI_HEADS.SCORE_THRESH_TEST", 0.0])
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    tta = build_tta_model(cfg, model)
    inp = tta.tta_mapper(_image())[1]  # a flipped, resized pass
    inp.pop("transforms")
    with torch.no_grad():
        (boxes, scores), = tta.raw_detections([inp])
        ref = model.inference([inp], do_postprocess=False)[0]
    h, w = inp["image"].shape[1:]
    got, _ = fast_rcnn_inference_single_image(boxes, scores, (h, w), 0.0, 0.5, 50)
    assert len(ref) > 0
    torch.testing.assert_close(got.pred_boxes.tensor, ref.pred_boxes.tensor)
    torch.testing.assert_close(got.scores, ref.scores)
    assert got.pred_classes.tolist() == ref.pred_classes.tolist()
