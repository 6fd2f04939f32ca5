"""Multi-scale + flip test (spec §5.1): the standard pass plus TEST.AUG scales, each flipped."""
import torch
from detectron2.modeling import GeneralizedRCNNWithTTA, build_model

import projects
from dynamic_rcnn.tta import ConcatTTAMapper
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
    assert not isinstance(tta.tta_mapper, ConcatTTAMapper)
    assert len(tta.tta_mapper(_image())) == 4
