"""Modules, RPN proposal sets, training rows, inference and edge cases."""
import pytest
import torch
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage

from decoupled_rcnn import DecoupledROIHeads, DualNMSRPN
from decoupled_rcnn.inference import soft_nms_inference
from decoupled_rcnn.tta import DecoupledRCNNWithTTA
from projects_common.soft_nms import batched_soft_nms
from projects_common.tta import build_tta_model


def _count(module):
    return sum(p.numel() for p in module.parameters())


def test_parameter_counts(full_r50_model):
    """The authors' R-50 config (80 classes, 256-channel FPN, 1024-d towers)."""
    rh = full_r50_model.roi_heads
    assert isinstance(rh, DecoupledROIHeads)
    assert _count(rh.box_head_cls) == 13_895_680 and _count(rh.box_head_reg) == 13_895_680
    assert _count(rh.box_head_cls) + _count(rh.box_head_reg) + _count(rh.box_predictor) == 28_202_385
    assert len(rh.refine_heads) == 2
    for head, pred in zip(rh.refine_heads, rh.refine_predictors):
        assert _count(head) + _count(pred) == 13_899_780
        assert not hasattr(pred, "cls_score")
    assert _count(rh) == 56_001_945
    assert isinstance(full_r50_model.proposal_generator, DualNMSRPN)
    assert _count(full_r50_model.proposal_generator.rpn_head) == 593_935
    fpn = sum(v.numel() for k, v in full_r50_model.backbone.named_parameters()
              if not k.startswith("bottom_up."))
    assert fpn == 3_344_384
    # ResNet-50 trunk: conv weights + BN affine (FrozenBN stores them as buffers).
    trunk = sum(v.numel() for k, v in full_r50_model.backbone.bottom_up.state_dict().items()
                if not k.endswith(("running_mean", "running_var")))
    assert trunk == 23_508_032


@torch.no_grad()
def test_head_shapes_and_tower_independence(full_r50_model):
    """(N,256,7,7) -> (N,81), (N,320); refine -> (N,4); unshared towers."""
    rh = full_r50_model.roi_heads
    torch.manual_seed(0)
    x = torch.randn(5, 256, 7, 7)
    scores, deltas = rh.box_predictor((rh.box_head_cls(x), rh.box_head_reg(x)))
    assert scores.shape == (5, 81) and deltas.shape == (5, 320)
    for head, pred in zip(rh.refine_heads, rh.refine_predictors):
        assert pred(head(x)).shape == (5, 4)
    w_reg, w_cls = rh.box_head_reg.fc2.weight, rh.box_head_cls.fc1.weight
    saved_reg, saved_cls = w_reg.clone(), w_cls.clone()
    try:
        w_reg.add_(torch.randn_like(w_reg))
        s2, d2 = rh.box_predictor((rh.box_head_cls(x), rh.box_head_reg(x)))
        assert torch.equal(s2, scores) and not torch.equal(d2, deltas)
        w_cls.add_(torch.randn_like(w_cls))
        s3, d3 = rh.box_predictor((rh.box_head_cls(x), rh.box_head_reg(x)))
        assert torch.equal(d3, d2) and not torch.equal(s3, s2)
    finally:
        w_reg.copy_(saved_reg)
        w_cls.copy_(saved_cls)


@pytest.fixture(scope="module")
def tiny_model(make_cfg, config_paths):
    torch.manual_seed(0)
    cfg = make_cfg(opts=config_paths["tiny_opts"])
    return build_model(cfg), cfg


def _image(size=(128, 160), boxes=((10.0, 12, 60, 70), (80, 20, 150, 100)), classes=(0, 2)):
    inst = Instances(size)
    inst.gt_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4))
    inst.gt_classes = torch.tensor(classes, dtype=torch.int64)
    return {"image": torch.rand(3, *size) * 255, "instances": inst, "height": size[0],
            "width": size[1]}


def test_rpn_two_proposal_sets(tiny_model):
    """A pair of sets from one candidate pool; each level's best candidate in both."""
    model, cfg = tiny_model
    torch.manual_seed(1)
    rpn = model.proposal_generator
    batch = [_image(), _image()]
    images = model.preprocess_image(batch)
    gts = [b["instances"] for b in batch]
    with torch.no_grad():
        features = model.backbone(images.tensor)
        rpn.train()
        with EventStorage():
            out, losses = rpn(images, features, gts)
        rpn.eval()
        test_out, _ = rpn(images, features)
        rpn.train()
        feats = [features[f] for f in rpn.in_features]
        anchors = rpn.anchor_generator(feats)
        logits, deltas = rpn.rpn_head(feats)
    assert isinstance(out, tuple) and len(out) == 2
    assert isinstance(test_out, list) and len(test_out) == 2
    assert set(losses) == {"loss_rpn_cls", "loss_rpn_loc"}
    cls_set, reg_set = out
    for img in range(2):
        c, r = cls_set[img], reg_set[img]
        assert 0 < len(c) <= 1000 and 0 < len(r) <= 1000
        assert len(r) >= len(c)  # the looser NMS keeps more boxes here
        for a, lg, dl in zip(anchors, logits, deltas):
            lg = lg[img].permute(1, 2, 0).flatten()
            dl = dl[img].view(-1, 4, *dl.shape[-2:]).permute(2, 3, 0, 1).reshape(-1, 4)
            best = int(lg.argmax())
            box = rpn.box2box_transform.apply_deltas(dl[best:best + 1], a.tensor[best:best + 1])
            box = Boxes(box)
            box.clip(c.image_size)
            score = lg[best]
            for s in (c, r):
                if score >= s.objectness_logits.min():
                    hit = (s.proposal_boxes.tensor - box.tensor).abs().sum(1) < 1e-3
                    assert hit.any()


def _random_boxes(n, size, scale=40.0):
    xy = torch.rand(n, 2) * torch.tensor([size[1] - 60.0, size[0] - 60.0])
    return torch.cat([xy, xy + 10 + torch.rand(n, 2) * scale], dim=1)


def _proposal_instances(boxes, size):
    inst = Instances(size)
    inst.proposal_boxes = Boxes(boxes)
    inst.objectness_logits = torch.rand(len(boxes))
    return inst


def test_training_rows_per_stage(make_cfg, fpn_shapes):
    """2 x (512 + 512) stage-0 rows, 2 x 512 rows in stages 1 and 2; GT boxes
    only among the classification rows."""
    torch.manual_seed(0)
    cfg = make_cfg(opts=["MODEL.ROI_BOX_HEAD.FC_DIM", 16])
    heads = DecoupledROIHeads(cfg, fpn_shapes(8))
    heads.train()
    size = (256, 256)
    features = {f"p{i}": torch.randn(2, 8, 256 // 2 ** i, 256 // 2 ** i) for i in range(2, 7)}
    gt_box = torch.tensor([[50.0, 60, 150, 170]])
    targets = []
    for _ in range(2):
        t = Instances(size)
        t.gt_boxes = Boxes(gt_box.clone())
        t.gt_classes = torch.tensor([17])
        targets.append(t)
    near = gt_box + torch.randn(600, 4) * 4  # mostly IoU >= 0.5, never exactly the GT
    cls_props = [_proposal_instances(torch.cat([near[:20], _random_boxes(700, size)]), size)] * 2
    reg_props = [_proposal_instances(torch.cat([near, _random_boxes(400, size)]), size)] * 2
    rows = []
    hook = heads.box_pooler.register_forward_hook(lambda m, i, o: rows.append((o.shape[0], i[1])))
    try:
        with EventStorage():
            samples, losses = heads(None, features, (cls_props, reg_props), targets)
    finally:
        hook.remove()
    assert [n for n, _ in rows] == [2048, 1024, 1024]
    assert set(losses) == {"loss_cls", "loss_box_reg_s0", "loss_box_reg_s1", "loss_box_reg_s2"}
    assert all(torch.isfinite(v) for v in losses.values())
    for img in range(2):
        stage0 = rows[0][1][img].tensor
        is_gt = (stage0 == gt_box).all(dim=1)
        assert is_gt[:512].any() and not is_gt[512:].any()
        for k in (1, 2):
            assert not (rows[k][1][img].tensor == gt_box).all(dim=1).any()


def test_no_positives_and_empty_images(tiny_model):
    """Images without objects, iterations without positive regression rows: finite losses."""
    model, _ = tiny_model
    model.train()
    torch.manual_seed(2)
    empty = _image(boxes=(), classes=())
    with EventStorage():
        losses = model([empty, _image(boxes=(), classes=())])
        total = sum(losses.values())
        total.backward()
    assert all(torch.isfinite(v) for v in losses.values())
    assert losses["loss_box_reg_s0"].item() == 0.0 and losses["loss_box_reg_s2"].item() == 0.0
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    model.zero_grad()

    # Regression proposals far from the GT (no positives) and an empty regression set.
    heads = model.roi_heads
    size = (128, 160)
    images = model.preprocess_image([_image()])
    t = _image()["instances"]
    cls_props = [_proposal_instances(_random_boxes(50, size, 20.0), size)]
    far = Instances(size)
    far.proposal_boxes = Boxes(torch.tensor([[0.0, 110, 8, 126]] * 5))
    for reg in (far, Instances(size, proposal_boxes=Boxes(torch.zeros((0, 4))))):
        features = model.backbone(images.tensor)
        with EventStorage():
            _, losses = heads(images, features, ([cls_props[0]], [reg]), [t])
        assert all(torch.isfinite(v) for v in losses.values())
        assert losses["loss_box_reg_s0"].item() == 0.0 and losses["loss_box_reg_s1"].item() == 0.0
        sum(losses.values()).backward()
    model.zero_grad()
    with pytest.raises(ValueError, match="DualNMSRPN"):
        heads(images, features, cls_props, [t])


@torch.no_grad()
def test_inference_scores_boxes_and_limits(tiny_model):
    """Stage-0 scores on the original proposals; one box per proposal."""
    model, cfg = tiny_model
    model.eval()
    heads = model.roi_heads
    pred = heads.box_predictor
    torch.manual_seed(3)
    size = (128, 160)
    images = model.preprocess_image([_image()])
    features = model.backbone(images.tensor)
    props = [_proposal_instances(_random_boxes(30, size), size)]
    x = heads.box_pooler([features[f] for f in heads.box_in_features], [props[0].proposal_boxes])
    probs = torch.softmax(pred((heads.box_head_cls(x), heads.box_head_reg(x)))[0], dim=1)

    saved = (pred.test_score_thresh, pred.test_nms_thresh, pred.test_topk_per_image)
    pred.test_score_thresh, pred.test_nms_thresh, pred.test_topk_per_image = 0.0, 1.01, -1
    try:
        (det,), _ = heads(images, features, props)
        assert len(det) == 30 * 3
        assert torch.allclose(det.scores.sort().values, probs[:, :3].flatten().sort().values)
        boxes = det.pred_boxes.tensor
        distinct = torch.unique(boxes, dim=0)
        assert len(distinct) == 30
        for b in distinct:
            same = (boxes == b).all(dim=1)
            assert int(same.sum()) == 3 and sorted(det.pred_classes[same].tolist()) == [0, 1, 2]
        # New refine weights: new boxes, same scores.
        w = heads.refine_predictors[1].bbox_pred.weight
        saved_w = w.clone()
        w.add_(torch.randn_like(w))
        (det2,), _ = heads(images, features, props)
        w.copy_(saved_w)
        assert torch.equal(det2.scores.sort().values, det.scores.sort().values)
        assert not torch.allclose(torch.unique(det2.pred_boxes.tensor, dim=0), distinct)
    finally:
        pred.test_score_thresh, pred.test_nms_thresh, pred.test_topk_per_image = saved

    many = [_proposal_instances(_random_boxes(400, size), size)]
    for nms_type in ("nms", "soft_nms_linear"):
        pred.test_nms_type = nms_type
        (det,), _ = heads(images, features, many)
        assert 0 < len(det) <= 100 and (det.scores > 0.001).all()
        assert torch.equal(det.scores, det.scores.sort(descending=True).values)
    pred.test_nms_type = "nms"
    (det,), _ = heads(images, features, [Instances(size, proposal_boxes=Boxes(torch.zeros((0, 4))))])
    assert len(det) == 0


def test_soft_nms_inference_and_mmcv_split_quirk():
    torch.manual_seed(4)
    size = (300, 300)
    boxes = _random_boxes(1000, size)
    probs = torch.softmax(torch.randn(1000, 12) * 2, dim=1)  # 11 classes: 11,000 candidates
    clean = soft_nms_inference(boxes, probs, size, 0.0, 0.5, -1, 1e-3, split_thresh=0)
    quirk = soft_nms_inference(boxes, probs, size, 0.0, 0.5, -1, 1e-3, split_thresh=10000)
    # Same survivors; the quirk reports (and ranks by) the original scores.
    key = lambda d: sorted(zip(d.pred_classes.tolist(), d.pred_boxes.tensor.tolist()))  # noqa
    assert key(clean) == key(quirk)
    original = set(probs[:, :-1].flatten().tolist())
    assert all(s in original for s in quirk.scores.tolist())
    assert (clean.scores <= probs[:, :-1].max() + 1e-7).all()
    assert torch.equal(quirk.scores, quirk.scores.sort(descending=True).values)
    assert not torch.equal(clean.scores.sort().values, quirk.scores.sort().values)
    # Below the split threshold the decayed scores are kept; same as batched_soft_nms.
    few = soft_nms_inference(boxes[:50], probs[:50], size, 0.0, 0.5, -1, 1e-3)
    mask = probs[:50, :-1] > 0
    inds = mask.nonzero()
    keep, new = batched_soft_nms(boxes[:50][inds[:, 0]], probs[:50, :-1][mask], inds[:, 1], 0.5, 1e-3)
    assert torch.equal(few.scores, new)


def test_tta_builder_uses_soft_nms(tiny_model):
    model, cfg = tiny_model
    cfg = cfg.clone()
    cfg.MODEL.DECOUPLED_RCNN.TEST_NMS_TYPE = "soft_nms_linear"
    tta = build_tta_model(cfg, model)
    assert isinstance(tta, DecoupledRCNNWithTTA)
    boxes = torch.tensor([[0.0, 0, 10, 10], [0, 0, 10, 6], [50, 50, 60, 60]])
    merged = tta._merge_detections(boxes, [torch.tensor(0.9), torch.tensor(0.8), torch.tensor(0.7)],
                                   [torch.tensor(1), torch.tensor(1), torch.tensor(1)], (100, 100))
    assert merged.scores.tolist() == pytest.approx([0.9, 0.7, 0.8 * 0.4])
    cfg.MODEL.DECOUPLED_RCNN.TEST_NMS_TYPE = "nms"
    hard = build_tta_model(cfg, model)._merge_detections(
        boxes, [torch.tensor(0.9), torch.tensor(0.8), torch.tensor(0.7)],
        [torch.tensor(1), torch.tensor(1), torch.tensor(1)], (100, 100))
    assert hard.scores.tolist() == pytest.approx([0.9, 0.7])


def test_bad_config_values(make_cfg, config_paths):
    cfg = make_cfg(opts=config_paths["tiny_opts"] + ["MODEL.DECOUPLED_RCNN.STAGE_LOSS_WEIGHTS", [1.0, 0.5]])
    with pytest.raises(ValueError, match="STAGE_LOSS_WEIGHTS"):
        build_model(cfg)
    cfg = make_cfg(opts=config_paths["tiny_opts"] + ["MODEL.DECOUPLED_RCNN.TEST_NMS_TYPE", "softer"])
    with pytest.raises(ValueError, match="TEST_NMS_TYPE"):
        build_model(cfg)
    cfg = make_cfg(opts=config_paths["tiny_opts"] + ["MODEL.MASK_ON", True])
    with pytest.raises(NotImplementedError, match="MASK_ON"):
        build_model(cfg)
