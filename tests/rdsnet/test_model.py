"""RDSNet end to end on tiny synthetic inputs: losses, edge cases, inference outputs."""
import pytest
import rdsnet_tiny
import torch
from detectron2.modeling import build_model
from detectron2.structures import BitMasks, Boxes, Instances, PolygonMasks
from detectron2.utils.events import EventStorage

import rdsnet.rdsnet as rdsnet_module
from rdsnet.targets import anchor_valid_flags


def _model(opts=()):
    torch.manual_seed(0)
    return build_model(rdsnet_tiny.tiny_cfg(opts=list(opts)))


def _sample(h=96, w=128, boxes=((20, 16, 70, 60),), classes=None, polygons=False):
    """Image + rectangles with matching masks (boxes XYXY continuous, inclusive of x1..x2-1)."""
    torch.manual_seed(1)
    inst = Instances((h, w))
    inst.gt_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4))
    inst.gt_classes = torch.tensor(classes if classes is not None else [i % 3 for i in range(len(boxes))])
    if polygons:
        inst.gt_masks = PolygonMasks(
            [[[x1, y1, x2, y1, x2, y2, x1, y2]] for x1, y1, x2, y2 in boxes]
        )
    else:
        masks = torch.zeros(len(boxes), h, w, dtype=torch.bool)
        for i, (x1, y1, x2, y2) in enumerate(boxes):
            masks[i, y1:y2, x1:x2] = True
        inst.gt_masks = BitMasks(masks)
    return {"image": torch.rand(3, h, w) * 255, "instances": inst, "height": h, "width": w}


def _losses(model, batch):
    model.train()
    with EventStorage(0):
        return model(batch)


def test_training_losses_and_gradients():
    """Finite losses; the mask loss reaches the rep tower, the pixel stream and the backbone."""
    model = _model()
    batch = [_sample(), _sample(112, 96, ((10, 10, 50, 80), (60, 40, 90, 90)), polygons=True)]
    losses = _losses(model, batch)
    assert set(losses) == {"loss_cls", "loss_box_reg", "loss_mask"}
    assert all(torch.isfinite(v) and v > 0 for v in losses.values())
    losses["loss_mask"].backward()
    assert model.head.rep_pred.weight.grad.abs().sum() > 0
    assert model.pixel_stream.out.weight.grad.abs().sum() > 0
    assert model.backbone.fpn_output3.weight.grad.abs().sum() > 0
    assert model.head.cls_score.weight.grad is None or model.head.cls_score.weight.grad.abs().sum() == 0


def test_image_without_objects():
    """No GT: loss_cls defined (normaliser max(0, 1)), box and mask losses exactly 0, no NaN."""
    model = _model()
    losses = _losses(model, [_sample(boxes=())])
    assert torch.isfinite(losses["loss_cls"]) and losses["loss_cls"] > 0
    assert losses["loss_box_reg"] == 0 and losses["loss_mask"] == 0
    sum(losses.values()).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_tiny_masks_are_dropped(monkeypatch):
    """GT masks of <= MASK_MIN_AREA px give no mask samples: loss_mask = 0, detection losses > 0."""
    model = _model()
    calls = []
    monkeypatch.setattr(
        rdsnet_module, "instance_mask_losses", lambda *a: calls.append(a) or torch.zeros(1)
    )
    losses = _losses(model, [_sample(boxes=((30, 30, 40, 40),))])  # 10 x 10 = 100 px
    assert calls == [] and losses["loss_mask"] == 0 and losses["loss_box_reg"] > 0
    assert torch.isfinite(sum(losses.values()))
    _losses(model, [_sample(boxes=((30, 30, 41, 40),))])  # 110 px: sampled
    assert len(calls) == 1
    # an image whose masks are all dropped does not stop the next image's mask loss
    _losses(model, [_sample(boxes=((30, 30, 40, 40),)), _sample(boxes=((30, 30, 41, 40),))])
    assert len(calls) == 2


def test_at_most_masks_to_train_positives(monkeypatch):
    """MASKS_TO_TRAIN caps the sampled positive anchors per image; normaliser = count + 1."""
    model = _model(["MODEL.RDSNET.MASKS_TO_TRAIN", 3])
    seen = []
    real = rdsnet_module.instance_mask_losses

    def spy(logits, targets, ratio):
        seen.append(logits.shape[0])
        # pixels outside the 25%-expanded GT box are ignored
        assert bool((targets == -1).any()) and bool((targets == 1).any())
        return real(logits, targets, ratio)

    monkeypatch.setattr(rdsnet_module, "instance_mask_losses", spy)
    batch = [_sample(boxes=((10, 10, 60, 60), (60, 30, 120, 90))), _sample(boxes=((5, 5, 50, 40),))]
    _losses(model, batch)
    assert seen == [3, 3]


def test_batch_padding_anchors_are_invalid():
    """Anchors in another image's collation padding are invalid (mmdet valid flags)."""
    grid = [(4, 6), (2, 3)]
    flags = anchor_valid_flags(grid, [8, 16], [2, 2], (32, 32), "cpu")
    level0 = flags[:48].view(4, 6, 2)
    assert bool(level0[:, :4].all()) and not bool(level0[:, 4:].any())
    level1 = flags[48:].view(2, 3, 2)
    assert bool(level1[:, :2].all()) and not bool(level1[:, 2:].any())
    rows = anchor_valid_flags(grid, [8, 16], [2, 2], (16, 48), "cpu")[:48].view(4, 6, 2)
    assert bool(rows[:2].all()) and not bool(rows[2:].any())  # ceil(16 / 8) = 2 rows


@pytest.mark.parametrize("refine", [False, True])
def test_inference_outputs(refine):
    """Predictor-style outputs at the requested size: boxes, scores, classes, full bool masks."""
    model = _model(["MODEL.RDSNET.MBRM.ENABLED", refine])
    with torch.no_grad():
        model.head.cls_score.bias.fill_(2.0)  # every anchor scores > 0.05: 100 detections
    model.eval()
    inputs = [{"image": torch.rand(3, 96, 128) * 255, "height": 150, "width": 200},
              {"image": torch.rand(3, 80, 100) * 255}]
    with torch.no_grad():
        outs = model(inputs)
    first, second = outs[0]["instances"], outs[1]["instances"]
    assert first.image_size == (150, 200) and second.image_size == (80, 100)
    assert len(first) == 100  # MODEL.RDSNET.DETECTIONS_PER_IMAGE
    for inst, (h, w) in ((first, (150, 200)), (second, (80, 100))):
        assert set(inst.get_fields()) == {"pred_boxes", "scores", "pred_classes", "pred_masks"}
        assert inst.pred_masks.dtype == torch.bool and inst.pred_masks.shape[1:] == (h, w)
        b = inst.pred_boxes.tensor
        assert bool((b[:, 0] >= 0).all() and (b[:, 2] <= w).all() and (b[:, 3] <= h).all())
        assert bool((inst.scores > 0.05).all()) and int(inst.pred_classes.max()) < 3
        if refine:
            assert torch.equal(b, b.round())  # integer pixel edges (+1 exported)


def test_mbrm_changes_boxes_not_masks():
    """MBRM refines boxes only; masks, scores and classes are those of the base model."""
    base = _model(["MODEL.RDSNET.DETECTIONS_PER_IMAGE", 20])
    refine = _model(["MODEL.RDSNET.DETECTIONS_PER_IMAGE", 20, "MODEL.RDSNET.MBRM.ENABLED", True])
    refine.load_state_dict(base.state_dict())
    for m in (base, refine):
        with torch.no_grad():
            m.head.cls_score.bias.fill_(2.0)
        m.eval()
    x = [{"image": torch.rand(3, 96, 128) * 255}]
    with torch.no_grad():
        a, b = base(x)[0]["instances"], refine(x)[0]["instances"]
    assert torch.equal(a.pred_masks, b.pred_masks) and torch.equal(a.scores, b.scores)
    assert torch.equal(a.pred_classes, b.pred_classes)
    assert not torch.equal(a.pred_boxes.tensor, b.pred_boxes.tensor)


def test_no_detections_and_mbrm_config_errors():
    """Nothing above threshold: empty outputs with (0, H, W) masks. MBRM without masks: error."""
    model = _model(["MODEL.RDSNET.MBRM.ENABLED", True])
    model.eval()
    with torch.no_grad():
        inst = model([{"image": torch.rand(3, 64, 96) * 255}])[0]["instances"]
    assert len(inst) == 0 and inst.pred_masks.shape == (0, 64, 96)
    assert inst.pred_masks.dtype == torch.bool
    with pytest.raises(ValueError, match="MASK_ON"):
        _model(["MODEL.RDSNET.MBRM.ENABLED", True, "MODEL.MASK_ON", False])
    with pytest.raises(ValueError, match="IN_FEATURES"):
        _model(["MODEL.RDSNET.PIXEL_IN_FEATURES", ["p2", "p3", "p4"]])


def test_d2_conventions_variant():
    """BOX_PLUS_ONE False + Detectron2's anchors and P7 ReLU: trains and predicts."""
    model = _model([
        "MODEL.RDSNET.BOX_PLUS_ONE", False,
        "MODEL.ANCHOR_GENERATOR.NAME", "DefaultAnchorGenerator",
        "MODEL.RDSNET.P67_RELU_BEFORE_P7", True,
        "MODEL.RDSNET.P67_IN_FEATURE", "p5",
        "MODEL.RDSNET.MBRM.ENABLED", True,
    ])
    losses = _losses(model, [_sample()])
    assert all(torch.isfinite(v) for v in losses.values())
    model.eval()
    with torch.no_grad():
        model.head.cls_score.bias.fill_(2.0)
        inst = model([{"image": torch.rand(3, 96, 128) * 255}])[0]["instances"]
    assert len(inst) > 0 and inst.pred_masks.shape[1:] == (96, 128)


def test_default_predictor():
    """Detectron2's DefaultPredictor (BGR numpy in, resize, RGB conversion) returns Instances
    at the original size with pred_boxes, scores, pred_classes and full-image pred_masks."""
    import numpy as np
    from detectron2.engine import DefaultPredictor

    cfg = rdsnet_tiny.tiny_cfg(opts=["MODEL.RDSNET.SCORE_THRESH_TEST", 0.0])
    predictor = DefaultPredictor(cfg)
    image = (np.random.RandomState(0).rand(90, 150, 3) * 255).astype(np.uint8)
    inst = predictor(image)["instances"]
    assert inst.image_size == (90, 150) and len(inst) > 0
    assert inst.pred_masks.shape == (len(inst), 90, 150) and inst.pred_masks.dtype == torch.bool
    assert inst.pred_boxes.tensor.shape == (len(inst), 4) and inst.scores.shape == (len(inst),)


def test_mask_off_boxes_only():
    """MODEL.MASK_ON False: no pixel stream; losses without loss_mask; detections without
    pred_masks (the meta-architecture must not call the absent stream)."""
    model = _model(["MODEL.MASK_ON", False])
    assert model.pixel_stream is None
    losses = _losses(model, [_sample()])
    assert set(losses) == {"loss_cls", "loss_box_reg"}
    model.eval()
    with torch.no_grad():
        model.head.cls_score.bias.fill_(2.0)
        inst = model([{"image": torch.rand(3, 64, 96) * 255}])[0]["instances"]
    assert len(inst) > 0 and not inst.has("pred_masks") and not inst.has("pred_reps")


def test_training_without_instances_and_config_errors():
    """Training inputs without 'instances', anchors that differ per level and an MBRM kernel
    other than the authors' 9 taps are errors that say what is wrong."""
    model = _model()
    model.train()
    with pytest.raises(ValueError, match="^RDSNet training needs 'instances' in the inputs$"):
        with EventStorage(0):
            model([{"image": torch.rand(3, 64, 64) * 255}])
    with pytest.raises(ValueError, match=r"RDSNet needs the same number of anchors per level, got"):
        _model(["MODEL.ANCHOR_GENERATOR.SIZES", [[16], [32, 40], [64], [128], [256]]])
    with pytest.raises(ValueError, match="KERNEL_SIZE=7"):
        _model(["MODEL.RDSNET.MBRM.ENABLED", True, "MODEL.RDSNET.MBRM.KERNEL_SIZE", 7])


def test_preprocess_normalises_and_pads():
    """(image - PIXEL_MEAN) / PIXEL_STD per channel, zero padding to a multiple of 32."""
    model = _model(["MODEL.PIXEL_MEAN", [10.0, 20.0, 30.0], "MODEL.PIXEL_STD", [2.0, 4.0, 8.0]])
    image = torch.full((3, 40, 50), 50.0)
    image[1] = 100.0
    image[2] = 6.0
    out = model.preprocess_image([{"image": image}])
    assert out.tensor.shape == (1, 3, 64, 64) and out.image_sizes == [(40, 50)]
    expected = torch.tensor([(50 - 10) / 2, (100 - 20) / 4, (6 - 30) / 8])
    assert torch.equal(out.tensor[0, :, :40, :50], expected[:, None, None].expand(3, 40, 50))
    assert out.tensor[0, :, 40:].abs().sum() == 0 and out.tensor[0, :, :, 50:].abs().sum() == 0
