"""A Dynamic R-CNN checkpoint of another world size or ``UPDATE_ITERS``, resumed through the
project's `Trainer` (Detectron2's checkpointer path): T_now and beta_now carry over (rank r
from saved rank r % W'), the windows carry over only with the same update period, the counter
carries over; training then goes on without an error. Detectron2's plain checkpointer, which
drops entries whose shape changed, restores none of the state instead of half of it."""
import os

import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.utils.events import EventStorage

import projects
from projects.engine import Trainer
from projects.testing import TINY_RCNN_OPTS, TINY_RESNET_OPTS

CONFIG = projects.model_zoo.get_config_file("dynamic_rcnn/dynamic_rcnn_R_50_FPN_1x.yaml")
P = "roi_heads.dynamic_state."


def _trainer(out, update_iters):
    cfg = projects.load_config(CONFIG, TINY_RESNET_OPTS + TINY_RCNN_OPTS + [
        "MODEL.DYNAMIC_RCNN.UPDATE_ITERS", update_iters, "OUTPUT_DIR", str(out),
        "DATASETS.TEST", (), "SOLVER.IMS_PER_BATCH", 2, "INPUT.MIN_SIZE_TRAIN", (64,),
        "INPUT.MAX_SIZE_TRAIN", 96, "MODEL.DYNAMIC_RCNN.KI", 10, "MODEL.DYNAMIC_RCNN.KBETA", 5])
    torch.manual_seed(0)
    return Trainer(cfg)


def _two_process_checkpoint(out, model_state):
    """The checkpoint a 2-process run with UPDATE_ITERS=3 writes after iteration 4 (counter 5:
    2 entries in each window since the update at 3)."""
    state = dict(model_state)
    state[P + "iteration"] = torch.tensor(5)
    state[P + "iou_thr"] = torch.tensor([0.45, 0.55], dtype=torch.float64)
    state[P + "beta"] = torch.tensor([0.7, 0.8], dtype=torch.float64)
    state[P + "iou_window"] = torch.tensor([[0.5, 0.6, 0], [0.3, 0.4, 0]], dtype=torch.float64)
    state[P + "iou_count"] = torch.tensor([2, 2])
    state[P + "beta_window"] = torch.tensor([[0.2, 0.3, 0], [0.4, 0.5, 0]], dtype=torch.float64)
    state[P + "beta_count"] = torch.tensor([2, 2])
    os.makedirs(out, exist_ok=True)
    torch.save({"model": state, "iteration": 4}, os.path.join(out, "model_0000004.pth"))
    with open(os.path.join(out, "last_checkpoint"), "w") as f:
        f.write("model_0000004.pth")


def _state(trainer):
    return trainer.model.roi_heads.dynamic_state


def _train_two_iterations(trainer):
    trainer.start_iter, trainer.max_iter = trainer.iter + 1, trainer.iter + 3
    trainer.train()


def test_other_world_size_same_period_keeps_rank0_state_and_windows(tmp_path):
    trainer = _trainer(tmp_path, update_iters=3)
    _two_process_checkpoint(tmp_path, trainer.model.state_dict())
    trainer.resume_or_load(resume=True)
    s = _state(trainer)
    assert s.current() == (0.45, 0.7)
    assert int(s.iteration) == 5
    assert s.iou_window.tolist() == [[0.5, 0.6, 0.0]] and s.iou_count.tolist() == [2]
    assert s.beta_window.tolist() == [[0.2, 0.3, 0.0]] and s.beta_count.tolist() == [2]
    with EventStorage():
        # the third entry: counter 6, an update
        updated = s.record(torch.tensor(0.9, dtype=torch.float64), torch.tensor(0.1))
    assert updated
    assert s.current()[0] == torch.tensor([0.5, 0.6, 0.9], dtype=torch.float64).mean().item()


def test_other_update_period_keeps_values_drops_windows_and_trains_on(tmp_path):
    trainer = _trainer(tmp_path, update_iters=4)
    _two_process_checkpoint(tmp_path, trainer.model.state_dict())
    trainer.resume_or_load(resume=True)
    s = _state(trainer)
    assert s.current() == (0.45, 0.7) and int(s.iteration) == 5
    assert s.iou_window.shape == (1, 4) and s.iou_count.tolist() == [0]
    assert s.beta_count.tolist() == [0]
    _train_two_iterations(trainer)  # records at counters 6, 7: no IndexError, no update yet
    assert int(s.iteration) == 7 and s.iou_count.tolist() == [2]
    assert s.current() == (0.45, 0.7)


def test_plain_detectron2_checkpointer_restores_all_or_nothing(tmp_path):
    trainer = _trainer(tmp_path, update_iters=3)
    _two_process_checkpoint(tmp_path, trainer.model.state_dict())
    model = trainer.model
    DetectionCheckpointer(model).load(str(tmp_path / "model_0000004.pth"))
    s = model.roi_heads.dynamic_state
    # the (W,)-shaped entries were dropped by Detectron2; the counter must not survive alone
    assert int(s.iteration) == 0 and s.current() == (0.4, 1.0)
    assert s.iou_count.tolist() == [0] and s.beta_count.tolist() == [0]
