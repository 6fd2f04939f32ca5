"""A tiny Mask R-CNN learns `shapes` through `train_net.py`'s `main`; the saved checkpoint
reproduces the final AP with `--eval-only` and serves `DefaultPredictor`."""
import os

import cv2
import pytest
import torch
from detectron2.engine import DefaultPredictor

import projects
from projects.engine import argument_parser, main
from projects.testing import TINY_RCNN_OPTS, TINY_RESNET_OPTS

from .conftest import QUICKSTART, cli_opts

ITERS = 300
# Bar for "learned": an untrained model scores ~0 AP on shapes_val; this
# tiny model reached 10.0 bbox / 11.6 mask AP (24 AP50) in ITERS iterations when measured.
MIN_BBOX_AP = 5.0
MIN_SEGM_AP = 5.0


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("quickstart")
    opts = cli_opts(TINY_RESNET_OPTS + TINY_RCNN_OPTS) + [
        "SOLVER.MAX_ITER", str(ITERS),
        "OUTPUT_DIR", str(out), "SEED", "1"]
    args = argument_parser().parse_args(["--config-file", QUICKSTART, *opts])
    results = main(args)
    return out, opts, results


def test_tiny_model_learns_shapes(trained):
    _, _, results = trained
    assert results["bbox"]["AP"] >= MIN_BBOX_AP, results
    assert results["segm"]["AP"] >= MIN_SEGM_AP, results


def test_eval_only_reproduces_final_ap(trained):
    out, opts, results = trained
    weights = os.path.join(out, "model_final.pth")
    assert os.path.isfile(weights)
    args = argument_parser().parse_args(
        ["--config-file", QUICKSTART, "--eval-only", *opts, "MODEL.WEIGHTS", weights,
         "OUTPUT_DIR", str(out / "eval")])
    again = main(args)
    for task in ("bbox", "segm"):
        assert again[task]["AP"] == pytest.approx(results[task]["AP"], abs=1e-6), task


def test_default_predictor_serves_the_checkpoint(trained):
    out, _, _ = trained
    cfg = projects.load_config(QUICKSTART, TINY_RESNET_OPTS + TINY_RCNN_OPTS + [
        "MODEL.WEIGHTS", os.path.join(out, "model_final.pth")])
    predictor = DefaultPredictor(cfg)
    image = cv2.imread(projects.shapes_image_glob("shapes_val").replace("*", "00000"))
    inst = predictor(image)["instances"]  # BGR image in, Instances in image coordinates out
    assert len(inst) > 0
    assert inst.pred_masks.shape[1:] == image.shape[:2]
    assert set(inst.pred_classes.tolist()) <= {0, 1, 2}
    assert torch.all(inst.scores >= cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST)
    boxes = inst.pred_boxes.tensor
    assert boxes[:, 2].max() <= image.shape[1] and boxes[:, 3].max() <= image.shape[0]


def test_resume_continues_from_the_last_checkpoint(trained):
    out, opts, _ = trained
    # --resume with MAX_ITER already reached: loads model_final and has nothing left to do
    args = argument_parser().parse_args(
        ["--config-file", QUICKSTART, "--resume", *opts, "OUTPUT_DIR", str(out),
         "TEST.EVAL_PERIOD", "0"])
    from projects.engine.trainer import Trainer
    from projects.engine.train import setup

    trainer = Trainer(setup(args))
    trainer.resume_or_load(resume=True)
    assert trainer.start_iter == ITERS
