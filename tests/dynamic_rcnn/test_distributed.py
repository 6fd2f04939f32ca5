"""Two processes (torch.distributed gloo on CPU): per-rank vs synchronized statistics.
The workers run DynamicROIHeads on rank-specific data; the test checks that
* SYNC_STATS=False: each rank's T/beta sequence equals a single-process run on its own data,
  identical data on both ranks gives identical sequences;
* SYNC_STATS=True: both ranks always hold the same T/beta, equal to the update rule applied to
  the statistics of both ranks pooled;
* in both modes every rank's state dict holds the state of all ranks (rank 0's checkpoint is
  enough for an exact resume of every rank).
The workers run in a subprocess started from a generated script, because pytest's importlib
mode gives test modules names that spawned children cannot import.
"""
import json
import subprocess
import sys
import textwrap

import pytest
import torch

from dynamic_rcnn.state import DynamicTrainingState
from dynamic_rcnn.statistics import window_median

ITERS, C = 7, 3

WORKER = textwrap.dedent(
    """
    import json, os, sys
    import torch
    import torch.distributed as dist
    import torch.multiprocessing as mp

    IMG, ITERS, C = 96, %(iters)d, %(c)d

    def build(sync):
        from detectron2.config import get_cfg
        from detectron2.layers import ShapeSpec
        from detectron2.modeling.roi_heads import build_roi_heads
        from dynamic_rcnn import add_dynamic_rcnn_config
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
        cfg.MODEL.DYNAMIC_RCNN.UPDATE_ITERS = C
        cfg.MODEL.DYNAMIC_RCNN.KI = 4
        cfg.MODEL.DYNAMIC_RCNN.KBETA = 2
        cfg.MODEL.DYNAMIC_RCNN.SYNC_STATS = sync
        torch.manual_seed(0)
        head = build_roi_heads(cfg, {"p2": ShapeSpec(channels=3, stride=4)})
        return head.train()

    def batch(seed):
        from detectron2.structures import Boxes, Instances
        g = torch.Generator().manual_seed(seed)
        targets, proposals = [], []
        for _ in range(2):
            xy = torch.rand(3, 2, generator=g) * 50
            gt = torch.cat([xy, xy + 20 + torch.rand(3, 2, generator=g) * 20], 1)
            t = Instances((IMG, IMG))
            t.gt_boxes, t.gt_classes = Boxes(gt), torch.tensor([0, 1, 0])
            p = gt.repeat(6, 1) + torch.randn(18, 4, generator=g) * (3 + seed %% 7)
            p[:, 2:] = torch.maximum(p[:, 2:], p[:, :2] + 4)
            inst = Instances((IMG, IMG))
            inst.proposal_boxes = Boxes(p.clamp(0, IMG - 1))
            inst.objectness_logits = torch.zeros(18)
            targets.append(t)
            proposals.append(inst)
        return {"p2": torch.randn(2, 3, IMG // 4, IMG // 4, generator=g)}, proposals, targets

    def run(rank, sync, same_data):
        from detectron2.utils.events import EventStorage
        head = build(sync)
        seq, stats = [], []
        with EventStorage() as storage:
            for it in range(ITERS):
                storage.iter = it
                torch.manual_seed(it)
                feats, props, tgts = batch(1000 * (0 if same_data else rank) + it)
                head(None, feats, props, tgts)
                h = storage.histories()
                seq.append([h["dynamic_rcnn/iou_thr"].latest(), h["dynamic_rcnn/beta"].latest()])
                stats.append([h["dynamic_rcnn/iou_stat"].latest(),
                              h["dynamic_rcnn/beta_stat"].latest()])
        state = {k: v.tolist() for k, v in head.dynamic_state.state_dict().items()}
        return {"seq": seq, "stats": stats, "state": state}

    def worker(rank, world, init, out_dir):
        dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
        import dynamic_rcnn  # noqa: F401
        res = {}
        for name, sync, same in (("local", False, False), ("same", False, True),
                                 ("sync", True, False)):
            res[name] = run(rank, sync, same)
        with open(os.path.join(out_dir, "rank%%d.json" %% rank), "w") as f:
            json.dump(res, f)
        dist.barrier()
        dist.destroy_process_group()

    if __name__ == "__main__":
        out_dir = sys.argv[1]
        init = "file://" + os.path.join(out_dir, "rendezvous")
        mp.spawn(worker, args=(2, init, out_dir), nprocs=2, join=True)
    """
) % {"iters": ITERS, "c": C}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    script = out / "worker.py"
    script.write_text(WORKER)
    proc = subprocess.run([sys.executable, str(script), str(out)], capture_output=True,
                          text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


def _replay_local(stats):
    """Sequence of (T, beta) in force at each iteration for one process's statistics."""
    st = DynamicTrainingState(update_iters=C, initial_iou=0.4, iou_floor=0.4, initial_beta=1.0,
                              beta_cap=1.0, beta_eps=1e-15, median="numpy", sync=False,
                              world_size=1)
    seq = []
    for iou, beta in stats:
        seq.append(list(st.current()))
        st.record(torch.tensor(iou), torch.tensor(beta))
    return seq


def test_per_rank_statistics(results):
    r0, r1 = results[0]["local"], results[1]["local"]
    assert r0["stats"] != r1["stats"]  # different data on the two ranks
    assert r0["seq"] != r1["seq"]  # -> different thresholds / betas
    for r in (r0, r1):
        expected = _replay_local(r["stats"])
        assert sum(r["seq"], []) == pytest.approx(sum(expected, []))
    assert r0["state"] == r1["state"]  # every rank holds the state of all ranks
    assert r0["state"]["iou_thr"] == pytest.approx([r0["seq"][-1][0], r1["seq"][-1][0]])
    s0, s1 = results[0]["same"], results[1]["same"]
    assert s0["seq"] == s1["seq"] and s0["stats"] == s1["stats"]


def test_synchronized_statistics(results):
    r0, r1 = results[0]["sync"], results[1]["sync"]
    assert r0["stats"] != r1["stats"]
    assert r0["seq"] == r1["seq"]  # always identical with SYNC_STATS
    assert r0["state"] == r1["state"]
    # first update (in force from iteration C + 1): the pooled window of both ranks
    ious = torch.tensor([s[0] for r in (r0, r1) for s in r["stats"][:C]], dtype=torch.float64)
    betas = torch.tensor([s[1] for r in (r0, r1) for s in r["stats"][:C]], dtype=torch.float64)
    expected = [max(float(ious.mean()), 0.4), min(float(window_median(betas, "numpy")), 1.0)]
    assert r0["seq"][C] == pytest.approx(expected)
    assert r0["seq"][:C] == [[0.4, 1.0]] * C
    assert r0["seq"][C] != r0["seq"][0]
