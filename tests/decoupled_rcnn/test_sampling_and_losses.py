"""Decoupled sampling, stage-0/refine targets and loss normalisers."""
import pytest
import torch
import torch.nn.functional as F
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage

from decoupled_rcnn.heads import IGNORE_LABEL
from decoupled_rcnn.roi_heads import DecoupledROIHeads, build_stage0_rows, refine_positive_boxes
from decoupled_rcnn.sampling import label_and_sample_regression_proposals, positive_first_sample

SMALL = ["MODEL.ROI_BOX_HEAD.FC_DIM", 16]
G = [100.0, 100.0, 200.0, 200.0]
P_CLS = [[100.0, 100, 200, 200], [110, 100, 210, 200], [150, 100, 250, 200], [300, 300, 400, 400]]
P_REG = [[105.0, 100, 205, 200], [100, 100, 200, 200], [133, 100, 233, 200], [134, 100, 234, 200]]


def _proposals(boxes, size=(800, 800)):
    inst = Instances(size)
    inst.proposal_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32))
    inst.objectness_logits = torch.linspace(1.0, 0.0, len(boxes))
    return inst


def _gt(boxes, classes, size=(800, 800)):
    inst = Instances(size)
    inst.gt_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4))
    inst.gt_classes = torch.tensor(classes, dtype=torch.int64)
    return inst


@pytest.fixture(scope="module")
def heads(make_cfg, fpn_shapes):
    torch.manual_seed(0)
    return DecoupledROIHeads(make_cfg(opts=SMALL), fpn_shapes(8))


def _worked_example(heads):
    target = _gt([G], [17])
    with EventStorage():
        cls_s = heads.label_and_sample_proposals([_proposals(P_CLS)], [target])
    reg_s = label_and_sample_regression_proposals(
        [_proposals(P_REG)], [target], heads.reg_matchers[0], 512, 80
    )
    return target, cls_s, reg_s, build_stage0_rows(cls_s, reg_s)


def test_worked_example_samples(heads):
    """Which proposals each branch samples, row order and labels."""
    _, cls_s, reg_s, rows = _worked_example(heads)
    cls_boxes = [tuple(b) for b in cls_s[0].proposal_boxes.tensor.tolist()]
    cls_labels = cls_s[0].gt_classes.tolist()
    # Positives {g (added GT), c0, c1} first, then negatives {c2, c3}; 5 rows.
    assert sorted(zip(cls_boxes[:3], cls_labels[:3])) == sorted(
        [(tuple(G), 17), (tuple(P_CLS[0]), 17), (tuple(P_CLS[1]), 17)]
    )
    assert sorted(zip(cls_boxes[3:], cls_labels[3:])) == sorted(
        [(tuple(P_CLS[2]), 80), (tuple(P_CLS[3]), 80)]
    )
    # Regression: positives r0, r1, r2 (IoU 0.50376 >= 0.5 inclusive), negative r3; no GT added.
    assert reg_s[0].proposal_boxes.tensor.tolist() == P_REG
    assert reg_s[0].gt_classes.tolist() == [17, 17, 17, 80]
    # Stage-0 rows: [5 classification rows, 4 regression rows].
    (r,) = rows
    assert len(r) == 9
    assert r.gt_classes[5:].tolist() == [IGNORE_LABEL] * 4
    assert sorted(r.gt_classes[:5].tolist()) == [17, 17, 17, 80, 80]
    assert r.reg_classes.tolist() == [IGNORE_LABEL] * 5 + [17, 17, 17, 80]
    assert r.proposal_boxes.tensor[5:].tolist() == P_REG
    # Regression targets of r0, r1, r2 (stds .1/.1/.2/.2).
    t = heads.box_predictor.box2box_transform.get_deltas(
        r.proposal_boxes.tensor[5:8], r.gt_boxes.tensor[5:8]
    )
    expected = torch.tensor([[-0.5, 0, 0, 0], [0, 0, 0, 0], [-3.3, 0, 0, 0]])
    assert torch.allclose(t, expected, atol=1e-5)


def test_worked_example_losses_and_refinement(heads):
    """CE / 5, stage-0 L1 / 9, stage-1 proposals and L1 / (2 * 4)."""
    target, _, _, rows = _worked_example(heads)
    r = rows[0]
    torch.manual_seed(1)
    scores = torch.randn(9, 81)
    deltas = torch.zeros(9, 320)
    predictor = heads.box_predictor
    with EventStorage():
        losses = predictor.losses((scores, deltas), rows)
        ce = F.cross_entropy(scores[:5], r.gt_classes[:5], reduction="sum") / 5
        assert losses["loss_cls"].item() == pytest.approx(ce.item(), rel=1e-6)
        assert losses["loss_box_reg_s0"].item() == pytest.approx((0.5 + 0.0 + 3.3) / 9, rel=1e-5)

        # Regression-row scores do not change loss_cls.
        scores2 = scores.clone()
        scores2[5:] += torch.randn(4, 81) * 5
        assert predictor.losses((scores2, deltas), rows)["loss_cls"] == losses["loss_cls"]
        # Deltas of other classes, of negative / classification rows do not change the L1.
        deltas2 = torch.randn(9, 320)
        deltas2[5:8, 17 * 4:18 * 4] = 0
        loss_b = predictor.losses((scores, deltas2), rows)["loss_box_reg_s0"]
        assert loss_b.item() == pytest.approx(losses["loss_box_reg_s0"].item(), rel=1e-6)

    # Stage-0 deltas equal to the targets -> the three positives refine exactly to g.
    exact = torch.zeros(9, 320)
    exact[5:8, 17 * 4:18 * 4] = predictor.box2box_transform.get_deltas(
        r.proposal_boxes.tensor[5:8], r.gt_boxes.tensor[5:8]
    )
    (props1,) = refine_positive_boxes(
        [r.proposal_boxes.tensor], [r.reg_classes], exact, predictor.box2box_transform,
        [r.image_size], 80,
    )
    b1 = props1.proposal_boxes.tensor
    assert b1.shape == (4, 4)
    assert torch.allclose(b1[:3], torch.tensor([G] * 3), atol=1e-4)
    assert b1[3].tolist() == P_REG[3]
    (s1,) = label_and_sample_regression_proposals([props1], [target], heads.reg_matchers[1], 512, 80)
    assert s1.gt_classes.tolist() == [17, 17, 17, 80]
    refine = heads.refine_predictors[0]
    assert refine.losses(torch.zeros(4, 4), [s1])["loss_box_reg_s1"].item() == pytest.approx(0, abs=1e-5)
    err = torch.zeros(4, 4)
    err[1] = 0.5
    # Stage-1 targets are ~0 for rows 0-2: 4 * 0.5 / (2 * 4), times the stage weight 0.5.
    loss1 = refine.losses(err, [s1])["loss_box_reg_s1"].item()
    assert loss1 == pytest.approx(4 * 0.5 / 8 * 0.5, rel=1e-4)


def test_positive_first_sampler_counts():
    """Positive-first regression sampling counts."""
    torch.manual_seed(0)
    labels = torch.cat([torch.full((600,), 3), torch.full((100,), 80)])[torch.randperm(700)]
    pos, neg = positive_first_sample(labels, 512, 80)
    assert (len(pos), len(neg)) == (512, 0)
    assert len(set(pos.tolist())) == 512 and (labels[pos] == 3).all()
    labels = torch.cat([torch.full((100,), 5), torch.full((500,), 80), torch.full((7,), -1)])
    pos, neg = positive_first_sample(labels, 512, 80)
    assert (len(pos), len(neg)) == (100, 412)
    assert (labels[neg] == 80).all() and torch.equal(pos, pos.sort().values)
    assert torch.equal(neg, neg.sort().values)
    pos, neg = positive_first_sample(torch.full((10,), 80), 512, 80)
    assert (len(pos), len(neg)) == (0, 10)


def test_classification_sampler_counts(heads):
    """300 positives (GT included) -> 128 positives + 384 negatives."""
    torch.manual_seed(0)
    shifts = torch.arange(299, dtype=torch.float32)[:, None] * 0.1
    positives = torch.tensor([G]) + shifts  # IoU >= 0.5 with g
    negatives = torch.tensor([[500.0, 500, 560, 560]]) + torch.rand(1000, 1) * 200
    props = _proposals(torch.cat([positives, negatives]).tolist())
    with EventStorage():
        (s,) = heads.label_and_sample_proposals([props], [_gt([G], [17])])
    assert len(s) == 512
    assert int((s.gt_classes == 17).sum()) == 128 and int((s.gt_classes == 80).sum()) == 384


def test_loss_arithmetic_two_images(make_cfg, fpn_shapes):
    """One positive regression row missing its targets by 0.5 on each coordinate."""
    torch.manual_seed(0)
    cfg = make_cfg(opts=SMALL)
    heads = DecoupledROIHeads(cfg, fpn_shapes(8))
    size = (600, 600)

    def random_boxes(n):
        xy = torch.rand(n, 2) * 400
        return torch.cat([xy, xy + 20 + torch.rand(n, 2) * 100], dim=1)

    rows, refine_rows = [], []
    for img in range(2):
        cls = Instances(size)
        cls.proposal_boxes = Boxes(random_boxes(512))
        cls.gt_boxes = Boxes(random_boxes(512))
        cls.gt_classes = torch.randint(0, 81, (512,))
        reg = Instances(size)
        reg.proposal_boxes = Boxes(random_boxes(512))
        reg.gt_boxes = Boxes(random_boxes(512))
        reg.gt_classes = torch.full((512,), 80)
        if img == 0:
            reg.gt_classes[7] = 42
        rows += build_stage0_rows([cls], [reg])
        refine_rows.append(reg)
    r0 = rows[0]
    transform = heads.box_predictor.box2box_transform
    deltas = torch.zeros(2048, 320)
    target = transform.get_deltas(r0.proposal_boxes.tensor[512 + 7:513 + 7], r0.gt_boxes.tensor[519:520])
    deltas[519, 42 * 4:43 * 4] = target[0] + 0.5
    with EventStorage():
        losses = heads.box_predictor.losses((torch.zeros(2048, 81), deltas), rows)
    assert losses["loss_box_reg_s0"].item() == pytest.approx(9.765625e-4, rel=1e-5)

    refine = heads.refine_predictors[0]
    t1 = refine.box2box_transform.get_deltas(
        refine_rows[0].proposal_boxes.tensor[7:8], refine_rows[0].gt_boxes.tensor[7:8]
    )
    d1 = torch.zeros(1024, 4)
    d1[7] = t1[0] - 0.5
    loss1 = refine.losses(d1, refine_rows)["loss_box_reg_s1"].item()
    assert loss1 == pytest.approx(4.8828125e-4, rel=1e-5)
