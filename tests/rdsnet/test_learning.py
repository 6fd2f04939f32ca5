"""A tiny RDSNet learns `shapes` (non-trivial box and mask AP); MBRM does not lower its box AP.

Bars: bbox AP >= 20 and segm AP >= 20 on shapes_val after 300 iterations of a ResNet-18 FPN
(64 channels) at 96-128 px, trained from scratch; MBRM's box AP >= base box AP - 1.
"""
import os

import rdsnet_tiny
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling import build_model

from projects.engine import Trainer

ITERS = 300


def test_tiny_rdsnet_learns_shapes(tmp_path):
    cfg = rdsnet_tiny.tiny_cfg(opts=[
        "SOLVER.MAX_ITER", ITERS, "SOLVER.STEPS", (240,), "SOLVER.BASE_LR", 0.01,
    ])
    res = rdsnet_tiny.train_and_evaluate(cfg, tmp_path)
    assert res["bbox"]["AP"] >= 20, res["bbox"]
    assert res["segm"]["AP"] >= 20, res["segm"]

    refine_cfg = cfg.clone()
    refine_cfg.MODEL.RDSNET.MBRM.ENABLED = True
    refine_cfg.OUTPUT_DIR = str(tmp_path / "refine")
    model = build_model(refine_cfg)
    DetectionCheckpointer(model).load(os.path.join(str(tmp_path), "model_final.pth"))
    refined = Trainer.test(refine_cfg, model)
    assert refined["bbox"]["AP"] >= res["bbox"]["AP"] - 1.0, (refined["bbox"], res["bbox"])
    # masks are not recomputed by MBRM
    assert abs(refined["segm"]["AP"] - res["segm"]["AP"]) < 1e-6
    assert torch.isfinite(torch.tensor(refined["bbox"]["AP"]))
