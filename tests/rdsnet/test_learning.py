"""A tiny RDSNet learns `shapes` (non-trivial box and mask AP); MBRM does not lower its box AP.

The tiny model is `projects.testing.TINY_RESNET_OPTS` (ResNet-18 GN FPN, 64 channels, 96-128 px,
lr 0.05, 300 iterations, from scratch) with RDSNet's own heads at full depth. An untrained model
scores ~0 AP on shapes_val; one reference run of this exact setting reached 5.5 bbox / 6.0 segm
AP and 6.2 bbox AP with MBRM. Bars: bbox AP >= 2.5 and segm AP >= 2.5; with MBRM (same weights)
bbox AP >= the base model's, segm AP unchanged (MBRM does not touch masks).
"""
import os

import rdsnet_tiny
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling import build_model
from detectron2.utils.env import seed_all_rng

from projects.engine import Trainer

MIN_BBOX_AP = 2.5
MIN_SEGM_AP = 2.5


def test_tiny_rdsnet_learns_shapes(tmp_path):
    seed_all_rng(0)  # data order (the sampler's seed comes from numpy) and initialisation
    cfg = rdsnet_tiny.tiny_cfg()
    res = rdsnet_tiny.train_and_evaluate(cfg, tmp_path)
    assert res["bbox"]["AP"] >= MIN_BBOX_AP, res["bbox"]
    assert res["segm"]["AP"] >= MIN_SEGM_AP, res["segm"]

    refine_cfg = cfg.clone()
    refine_cfg.MODEL.RDSNET.MBRM.ENABLED = True
    refine_cfg.OUTPUT_DIR = str(tmp_path / "refine")
    model = build_model(refine_cfg)
    DetectionCheckpointer(model).load(os.path.join(str(tmp_path), "model_final.pth"))
    refined = Trainer.test(refine_cfg, model)
    assert refined["bbox"]["AP"] >= res["bbox"]["AP"], (refined["bbox"], res["bbox"])
    assert abs(refined["segm"]["AP"] - res["segm"]["AP"]) < 1e-6, (refined["segm"], res["segm"])
