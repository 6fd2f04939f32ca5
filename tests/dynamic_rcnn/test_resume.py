"""Checkpoint / resume of the dynamic state: a run resumed from a checkpoint
(DetectionCheckpointer, as `--resume` uses) continues with the same T_now / beta_now sequence
and the same windows as the uninterrupted run."""
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.layers import ShapeSpec
from detectron2.modeling.roi_heads import build_roi_heads
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage

from dynamic_rcnn import add_dynamic_rcnn_config

IMG = 96
TOTAL = 8  # iterations; C = 3 -> updates after iterations 3 and 6


def _head(stats):
    cfg = get_cfg()
    add_dynamic_rcnn_config(cfg)
    cfg.MODEL.ROI_HEADS.NAME = "DynamicROIHeads"
    cfg.MODEL.ROI_HEADS.IN_FEATURES = ["p2"]
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = 2
    cfg.MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE = 32
    cfg.MODEL.ROI_BOX_HEAD.NAME = "FastRCNNConvFCHead"
    cfg.MODEL.ROI_BOX_HEAD.NUM_FC = 1
    cfg.MODEL.ROI_BOX_HEAD.FC_DIM = 8
    cfg.MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION = 3
    cfg.MODEL.DYNAMIC_RCNN.UPDATE_ITERS = 3
    cfg.MODEL.DYNAMIC_RCNN.KI = 4
    cfg.MODEL.DYNAMIC_RCNN.KBETA = 2
    cfg.MODEL.DYNAMIC_RCNN.STATISTICS = stats
    torch.manual_seed(0)
    head = build_roi_heads(cfg, {"p2": ShapeSpec(channels=3, stride=4)})
    head.train()
    return head, torch.optim.SGD(head.parameters(), lr=0.05, momentum=0.9)


def _batch(it):
    """Deterministic data of iteration `it`: 2 images, GT boxes and jittered proposals."""
    g = torch.Generator().manual_seed(100 + it)
    targets, proposals = [], []
    for _ in range(2):
        xy = torch.rand(3, 2, generator=g) * 50
        gt = torch.cat([xy, xy + 20 + torch.rand(3, 2, generator=g) * 20], 1)
        t = Instances((IMG, IMG))
        t.gt_boxes, t.gt_classes = Boxes(gt), torch.tensor([0, 1, 0])
        jitter = gt.repeat(6, 1) + torch.randn(18, 4, generator=g) * (2 + it)
        jitter[:, 2:] = torch.maximum(jitter[:, 2:], jitter[:, :2] + 4)
        p = Instances((IMG, IMG))
        p.proposal_boxes = Boxes(jitter.clamp(0, IMG - 1))
        p.objectness_logits = torch.zeros(18)
        targets.append(t)
        proposals.append(p)
    return {"p2": torch.randn(2, 3, IMG // 4, IMG // 4, generator=g)}, proposals, targets


def _train(head, opt, start, stop, storage):
    seq = []
    for it in range(start, stop):
        storage.iter = it
        torch.manual_seed(it)  # the sampler's randomness, as a resumed data loader would
        feats, props, tgts = _batch(it)
        _, losses = head(None, feats, props, tgts)
        opt.zero_grad()
        sum(losses.values()).backward()
        opt.step()
        hist = storage.histories()
        seq.append((hist["dynamic_rcnn/iou_thr"].latest(), hist["dynamic_rcnn/beta"].latest()))
    return seq


def _check(tmp_path, stats, stop_at):
    head, opt = _head(stats)
    with EventStorage() as storage:
        reference = _train(head, opt, 0, TOTAL, storage)
    ref_state = {k: v.clone() for k, v in head.dynamic_state.state_dict().items()}

    head, opt = _head(stats)
    ckpt = DetectionCheckpointer(head, str(tmp_path), optimizer=opt)
    with EventStorage() as storage:
        first = _train(head, opt, 0, stop_at, storage)
    ckpt.save("model_interrupted", iteration=stop_at - 1)
    saved = torch.load(tmp_path / "model_interrupted.pth", weights_only=False)["model"]
    assert "dynamic_state.beta_window" in saved and "dynamic_state.iteration" in saved

    head, opt = _head(stats)  # fresh process: initial T, beta and empty windows
    ckpt = DetectionCheckpointer(head, str(tmp_path), optimizer=opt)
    ckpt.resume_or_load(str(tmp_path / "model_interrupted.pth"), resume=True)
    assert int(head.dynamic_state.iteration) == stop_at
    with EventStorage(stop_at) as storage:
        second = _train(head, opt, stop_at, TOTAL, storage)

    assert first + second == reference
    for k, v in head.dynamic_state.state_dict().items():
        assert torch.equal(v, ref_state[k]), k
    # the sequence really moves (otherwise the comparison would be vacuous)
    assert len(set(reference)) >= 3


def test_resume_mid_window_mmdet(tmp_path):
    _check(tmp_path, "mmdet", stop_at=5)  # 2 of 3 window entries collected


def test_resume_at_update_boundary_original(tmp_path):
    _check(tmp_path, "original", stop_at=6)


def test_load_with_other_world_size(tmp_path):
    """A checkpoint of a 2-process run loads into 1 process (rank 0's row) and vice versa."""
    from dynamic_rcnn.state import DynamicTrainingState

    kw = dict(update_iters=4, initial_iou=0.4, iou_floor=0.4, initial_beta=1.0, beta_cap=1.0,
              beta_eps=1e-15, median="numpy", sync=False)
    two = DynamicTrainingState(world_size=2, **kw)
    two.iou_thr.copy_(torch.tensor([0.5, 0.6], dtype=torch.float64))
    two.beta_window[0, :2] = torch.tensor([0.2, 0.3], dtype=torch.float64)
    two.beta_count[0] = 2
    one = DynamicTrainingState(world_size=1, **kw)
    one.load_state_dict(two.state_dict())
    assert one.current() == (0.5, 1.0)
    assert one.beta_window[0, :2].tolist() == [0.2, 0.3] and int(one.beta_count[0]) == 2
    three = DynamicTrainingState(world_size=3, **dict(kw, update_iters=2))
    three.load_state_dict(two.state_dict())
    assert three.iou_thr.tolist() == [0.5, 0.6, 0.5] and three.iou_window.shape == (3, 2)
