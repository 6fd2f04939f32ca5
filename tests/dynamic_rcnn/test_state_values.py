"""DynamicTrainingState (paper Algorithm 1) by value: bounds of the settings, the update every
C iterations (T_now = max(mean(S_I), floor), beta_now = min(median(S_E), cap)) per rank and
pooled, the buffers a checkpoint holds, the fitting of a checkpoint of another world size /
UPDATE_ITERS through the ROI heads built from a config, and the all-gather of two real gloo
processes. Expected values are computed by hand in the comments."""
import json
import logging
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.layers import ShapeSpec
from detectron2.modeling.roi_heads import build_roi_heads

from dynamic_rcnn import DynamicTrainingState, add_dynamic_rcnn_config

LOG = "dynamic_rcnn.state"
F64, I64 = torch.float64, torch.int64


def _state(**kw):
    args = dict(update_iters=2, initial_iou=0.4, iou_floor=0.4, initial_beta=1.0,
                beta_cap=1.0, beta_eps=1e-15, median="numpy", sync=False)
    args.update(kw)
    return DynamicTrainingState(**args)


# ------------------------------------------------------------------ settings
@pytest.mark.parametrize("kw", [
    dict(update_iters=1), dict(initial_iou=1.0), dict(iou_floor=1.0),
    dict(initial_beta=0.0), dict(beta_cap=0.0), dict(beta_cap=0.5),
])
def test_boundary_settings_are_accepted(kw):
    s = _state(**kw)
    exp = dict(initial_iou=0.4, initial_beta=1.0)
    exp.update({k: v for k, v in kw.items() if k in exp})
    assert s.current() == (exp["initial_iou"], exp["initial_beta"])


@pytest.mark.parametrize("kw,got", [
    (dict(initial_iou=1.5), "1.5 and 0.4"), (dict(iou_floor=1.5), "0.4 and 1.5"),
    (dict(iou_floor=0.0), "0.4 and 0.0"),
])
def test_iou_settings_outside_0_1_are_rejected(kw, got):
    with pytest.raises(ValueError, match=r"^MODEL\.DYNAMIC_RCNN\.INITIAL_IOU and IOU_FLOOR must "
                       r"lie in \(0, 1\], got " + got + "$"):
        _state(**kw)


@pytest.mark.parametrize("kw,got", [
    (dict(initial_beta=-1.0), "-1.0 and 1.0"), (dict(beta_cap=-0.5), "1.0 and -0.5"),
])
def test_negative_beta_settings_are_rejected(kw, got):
    with pytest.raises(ValueError, match=r"^MODEL\.DYNAMIC_RCNN\.INITIAL_BETA and BETA_CAP must "
                       r"be >= 0, got " + got + "$"):
        _state(**kw)


def test_update_period_one_updates_every_iteration():
    s = _state(update_iters=1, beta_cap=2.0)
    assert s.record(torch.tensor(0.6), torch.tensor(0.3)) is True
    assert s.current() == pytest.approx((0.6, 0.3))
    assert s.record(torch.tensor(0.3), torch.tensor(1.5)) is True
    assert s.current() == pytest.approx((0.4, 1.5))  # 0.3 floored to 0.4


def test_checkpoint_buffers_shapes_and_dtypes():
    s = _state(update_iters=4, world_size=3)
    sd = s.state_dict()
    expect = {"iteration": ((), I64), "iou_thr": ((3,), F64), "beta": ((3,), F64),
              "iou_window": ((3, 4), F64), "iou_count": ((3,), I64),
              "beta_window": ((3, 4), F64), "beta_count": ((3,), I64)}
    assert {k: (tuple(v.shape), v.dtype) for k, v in sd.items()} == expect
    assert s.world_size == 3 and s.current(rank=2) == (0.4, 1.0)


def test_rank_without_entry_is_an_error():
    s = _state(world_size=2)
    with pytest.raises(RuntimeError, match=r"^Dynamic R-CNN state was built for 2 process\(es\); "
                       r"rank 2 has no entry \(build the model after torch\.distributed is "
                       r"initialized\)$"):
        s.current(rank=2)


# ------------------------------------------------------------------ two ranks, per rank / pooled
def _two_rank_run(monkeypatch, sync):
    """Rank 0 is this process; rank 1's messages are (iou, present, beta, present)."""
    other = iter([torch.tensor([0.7, 1.0, 0.4, 1.0], dtype=F64),
                  torch.tensor([0.0, 0.0, 0.0, 0.0], dtype=F64)])
    monkeypatch.setattr(DynamicTrainingState, "_gather",
                        staticmethod(lambda msg: torch.stack([msg, next(other)])))
    s = _state(world_size=2, sync=sync, beta_cap=2.0)
    assert s.record(torch.tensor(0.5), torch.tensor(0.2)) is False
    assert s.record(torch.tensor(0.6), torch.tensor(0.3)) is True
    return s


def test_per_rank_update(monkeypatch):
    s = _two_rank_run(monkeypatch, sync=False)
    # rank 0: mean(0.5, 0.6) = 0.55, median(0.2, 0.3) = 0.25; rank 1: 0.7 and 0.4 alone
    assert s.current(rank=0) == pytest.approx((0.55, 0.25))
    assert s.current(rank=1) == pytest.approx((0.7, 0.4))
    assert "sync=False" in repr(s)


def test_synchronized_update_pools_both_ranks(monkeypatch):
    s = _two_rank_run(monkeypatch, sync=True)
    # pooled S_I = {0.5, 0.7, 0.6}: mean 0.6; S_E = {0.2, 0.4, 0.3}: median 0.3
    assert s.current(rank=0) == pytest.approx((0.6, 0.3))
    assert s.current(rank=1) == pytest.approx((0.6, 0.3))
    assert "sync=True" in repr(s)


# ------------------------------------------------------------------ checkpoint fitting
def _saved(prefix=""):
    """A 2-process checkpoint with C=3 after 5 iterations (2 since the last update)."""
    sd = {"iteration": torch.tensor(5, dtype=I64),
          "iou_thr": torch.tensor([0.5, 0.6], dtype=F64),
          "beta": torch.tensor([0.2, 0.3], dtype=F64),
          "iou_window": torch.tensor([[0.5, 0.55, 0.0], [0.6, 0.0, 0.0]], dtype=F64),
          "iou_count": torch.tensor([2, 1], dtype=I64),
          "beta_window": torch.tensor([[0.1, 0.15, 0.0], [0.0, 0.0, 0.0]], dtype=F64),
          "beta_count": torch.tensor([2, 0], dtype=I64)}
    return {prefix + k: v for k, v in sd.items()}


def _warnings(caplog):
    return [r.getMessage() for r in caplog.records if r.name == LOG]


def test_fit_other_world_size_same_period_keeps_windows(caplog):
    s = _state(update_iters=3, world_size=3)
    sd = _saved()
    with caplog.at_level(logging.WARNING, logger=LOG):
        s.fit_checkpoint_state(sd)  # default prefix: the module's own state dict
    assert sd["iou_thr"].tolist() == [0.5, 0.6, 0.5] and sd["beta"].tolist() == [0.2, 0.3, 0.2]
    assert sd["iou_window"].tolist() == [[0.5, 0.55, 0.0], [0.6, 0.0, 0.0], [0.5, 0.55, 0.0]]
    assert sd["iou_count"].tolist() == [2, 1, 2] and sd["beta_count"].tolist() == [2, 0, 2]
    assert _warnings(caplog) == [
        "Dynamic R-CNN state in the checkpoint is of 2 process(es) with UPDATE_ITERS=3; this "
        "run has 3 and 3: T_now and beta_now continue (rank r from saved rank r % 2); so do "
        "the partial statistics windows."]


def test_fit_other_period_drops_windows(caplog):
    s = _state(update_iters=2, world_size=1)
    sd = _saved()
    with caplog.at_level(logging.WARNING, logger=LOG):
        s.fit_checkpoint_state(sd)
    ref = s.state_dict()
    assert {k: (tuple(v.shape), v.dtype) for k, v in sd.items()} == \
        {k: (tuple(v.shape), v.dtype) for k, v in ref.items()}
    assert sd["iou_thr"].tolist() == [0.5] and sd["beta"].tolist() == [0.2]
    assert sd["iou_window"].tolist() == [[0.0, 0.0]] and sd["iou_count"].tolist() == [0]
    assert int(sd["iteration"]) == 5
    assert _warnings(caplog) == [
        "Dynamic R-CNN state in the checkpoint is of 2 process(es) with UPDATE_ITERS=3; this "
        "run has 1 and 2: T_now and beta_now continue (rank r from saved rank r % 2); the "
        "partial statistics windows are dropped (another update period)."]


def _head(**dyn):
    cfg = get_cfg()
    add_dynamic_rcnn_config(cfg)
    cfg.MODEL.ROI_HEADS.NAME = "DynamicROIHeads"
    cfg.MODEL.ROI_HEADS.IN_FEATURES = ["p2"]
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = 2
    cfg.MODEL.ROI_BOX_HEAD.NAME = "FastRCNNConvFCHead"
    cfg.MODEL.ROI_BOX_HEAD.NUM_FC = 1
    cfg.MODEL.ROI_BOX_HEAD.FC_DIM = 8
    cfg.MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION = 2
    for k, v in dyn.items():
        cfg.MODEL.DYNAMIC_RCNN[k] = v
    return build_roi_heads(cfg, {"p2": ShapeSpec(channels=2, stride=4)})


def _head_checkpoint(head):
    sd = {k: v for k, v in head.state_dict().items() if not k.startswith("dynamic_state.")}
    sd.update(_saved("dynamic_state."))
    return sd


def test_heads_load_fits_checkpoint_and_next_update_at_multiple_of_new_period():
    head = _head(UPDATE_ITERS=2, BETA_CAP=2.0)
    head.load_state_dict(_head_checkpoint(head))  # plain torch load: W 2 -> 1, C 3 -> 2
    s = head.dynamic_state
    assert int(s.iteration) == 5 and s.current() == (0.5, 0.2)
    assert s.iou_count.tolist() == [0] and s.beta_count.tolist() == [0]
    # windows dropped: the update at iteration 6 sees only this entry
    assert s.record(torch.tensor(0.65), torch.tensor(0.35)) is True
    assert s.current() == pytest.approx((0.65, 0.35))


def test_heads_load_strict_reports_unexpected_and_mismatched_entries():
    head = _head(UPDATE_ITERS=3)
    sd = _head_checkpoint(head)
    sd["dynamic_state.bogus"] = torch.zeros(1)
    with pytest.raises(RuntimeError, match=r"Unexpected key\(s\) in state_dict: "
                       r"\"dynamic_state\.bogus\""):
        head.load_state_dict(sd)
    sd = {k: v for k, v in head.state_dict().items()}
    sd["dynamic_state.iteration"] = torch.zeros(3, dtype=I64)
    with pytest.raises(RuntimeError, match=r"size mismatch for dynamic_state\.iteration"):
        head.load_state_dict(sd)


def test_heads_load_incomplete_state_restores_nothing(caplog):
    head = _head(UPDATE_ITERS=3)
    sd = _head_checkpoint(head)
    del sd["dynamic_state.iou_thr"], sd["dynamic_state.beta_count"]
    with caplog.at_level(logging.WARNING, logger=LOG):
        head.load_state_dict(sd, strict=False)
    s = head.dynamic_state
    assert int(s.iteration) == 0 and s.current() == (0.4, 1.0)
    assert _warnings(caplog) == [
        "Dynamic R-CNN state (dynamic_state.*) is incomplete in the checkpoint (missing: "
        "iou_thr, beta_count): none of it is restored; T_now, beta_now, the windows and the "
        "counter keep their initial values. Load with projects' Trainer or "
        "VerifiedCheckpointer to restore it across world sizes and update periods."]


# ------------------------------------------------------------------ two gloo processes
_WORKER = textwrap.dedent("""
    import json, sys
    import torch
    import torch.distributed as dist
    import torch.multiprocessing as mp
    from dynamic_rcnn import DynamicTrainingState

    def worker(rank, init, out):
        dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
        s = DynamicTrainingState(update_iters=2, initial_iou=0.4, iou_floor=0.4,
                                 initial_beta=1.0, beta_cap=2.0, beta_eps=1e-15,
                                 median="numpy", sync=False)
        # rank 0: IoU 0.5, 0.6, beta 0.2, 0.3; rank 1: IoU 0.7 then none, beta 0.4 then none
        stats = [[(0.5, 0.2), (0.6, 0.3)], [(0.7, 0.4), (None, None)]][rank]
        for i, b in stats:
            s.record(None if i is None else torch.tensor(i), None if b is None else torch.tensor(b))
        if rank == 0:
            json.dump({"thr": s.iou_thr.tolist(), "beta": s.beta.tolist(),
                       "it": int(s.iteration)}, open(out, "w"))
        dist.destroy_process_group()

    if __name__ == "__main__":
        mp.spawn(worker, args=(sys.argv[1], sys.argv[2]), nprocs=2, join=True)
""")


def test_two_gloo_processes_gather_every_rank(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(_WORKER)
    out = tmp_path / "out.json"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(script), "file://" + str(tmp_path / "init"),
                           str(out)], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    # rank 0's copy holds both rows: (0.55, 0.25) and (0.7, 0.4)
    assert res["it"] == 2
    assert res["thr"] == pytest.approx([0.55, 0.7]) and res["beta"] == pytest.approx([0.25, 0.4])
