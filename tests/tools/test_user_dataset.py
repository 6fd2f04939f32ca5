"""A user's own COCO dataset (written by the test: non-contiguous category ids, degenerate
polygons) registered from the command line: `train_net.py` trains and evaluates on it,
`--eval-only` reproduces the result, `tools/demo.py` and `tools/visualize_data.py` see it."""
import json
import logging
import os
import sys

import cv2
import pytest
from detectron2.data import DatasetCatalog

from projects import load_config
from projects.engine import argument_parser, main
from projects.engine.trainer import Trainer

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "foundation"))
from user_coco import CLASS_NAMES, DEGENERATE_IDS, DROPPED_IDS, write_dataset  # noqa: E402

sys.path.pop(0)


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.fixture(scope="module")
def user(tmp_path_factory):
    root = tmp_path_factory.mktemp("mydata")
    files = write_dataset(root)
    specs = [f"mydata_train={files['train'][0]}:{files['train'][1]}",
             f"mydata_val={files['val'][0]}:{files['val'][1]}"]
    return root, files, specs


def _dataset_args(specs):
    return [a for s in specs for a in ("--dataset", s)]


USER_OPTS = ["DATASETS.TRAIN", "('mydata_train',)", "DATASETS.TEST", "('mydata_val',)",
             "MODEL.ROI_HEADS.NUM_CLASSES", "2",
             "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0",  # an untrained model's masks get evaluated
             "SOLVER.MAX_ITER", "4", "SOLVER.BASE_LR", "0.001", "SOLVER.CHECKPOINT_PERIOD", "100",
             "SEED", "3"]


@pytest.fixture(scope="module")
def trained(user, tiny_config, tmp_path_factory):
    _, _, specs = user
    out = tmp_path_factory.mktemp("train_out")
    handler = _Records()
    logger = logging.getLogger("projects.data.annotations")
    logger.addHandler(handler)
    try:
        args = argument_parser().parse_args(
            ["--config-file", tiny_config, *_dataset_args(specs), *USER_OPTS,
             "OUTPUT_DIR", str(out)])
        results = main(args)
    finally:
        logger.removeHandler(handler)
    return out, results, handler.messages


def test_training_and_evaluation_on_a_user_dataset(trained):
    out, results, _ = trained
    assert os.path.isfile(out / "model_final.pth")
    for task in ("bbox", "segm"):  # mask evaluation ran through pycocotools on the user's json
        assert "AP" in results[task], results


def test_degenerate_polygons_dropped_with_one_warning_in_training_and_evaluation(trained):
    _, _, messages = trained
    dropped = [m for m in messages if "degenerate polygon" in m]
    # one warning per json file: the training split's, and the test split's (given when its
    # dicts were loaded for inference; the evaluator's ground truth is cleaned without repeating)
    assert len(dropped) == 2, dropped
    assert sum("train.json" in m for m in dropped) == 1
    assert sum("val.json" in m for m in dropped) == 1
    for m in dropped:
        # 3 polygons in 3 annotations (9001: 2 points, 9002: zero area, 9003: one of two)
        assert "dropped 3 degenerate polygon(s)" in m and "in 3 annotation(s)" in m, m
        assert "2 of which had no polygon left" in m, m
        assert "annotation ids: 9001, 9002, 9003" in m, m


def test_training_and_evaluation_see_the_same_objects(trained):
    dicts = DatasetCatalog.get("mydata_train")
    with open(dicts[0]["file_name"].replace("/train/img_000.png", "/train.json")) as f:
        raw = json.load(f)
    first = [a for a in raw["annotations"] if a["image_id"] == dicts[0]["image_id"]]
    kept = dicts[0]["annotations"]
    # objects of the first image: 2 drawn + 9003; 9001 and 9002 dropped
    assert len(kept) == len(first) - len(DROPPED_IDS)
    polys = sorted(len(a["segmentation"]) for a in kept)
    assert polys == [1, 1, 1]  # 9003 keeps its one valid polygon
    assert {a["category_id"] for d in dicts for a in d["annotations"]} == {0, 1}

    cfg = load_config(None, ["MODEL.ROI_HEADS.NUM_CLASSES", "2", "MODEL.DEVICE", "cpu"])
    evaluator = Trainer.build_evaluator(cfg, "mydata_val", output_folder=None)
    gt_ids = set(evaluator._coco_api.getAnnIds())
    assert not gt_ids & set(DROPPED_IDS) and 9003 in gt_ids
    assert len(evaluator._coco_api.anns[9003]["segmentation"]) == 1
    assert set(DEGENERATE_IDS) - set(DROPPED_IDS) == {9003}


def test_eval_only_reproduces_the_final_evaluation(trained, user, tmp_path):
    out, results, _ = trained
    _, _, specs = user
    # the config training saved registers the datasets again (DATASETS.REGISTER_COCO)
    saved = (out / "config.yaml").read_text()
    assert all(spec in saved for spec in specs), saved
    args = argument_parser().parse_args(
        ["--config-file", str(out / "config.yaml"), "--eval-only",
         "MODEL.WEIGHTS", str(out / "model_final.pth"), "OUTPUT_DIR", str(tmp_path)])
    again = main(args)
    for task in ("bbox", "segm"):
        assert again[task]["AP"] == pytest.approx(results[task]["AP"], abs=1e-6, nan_ok=True)


def test_demo_uses_the_user_dataset_class_names(trained, user, tiny_config, load_tool, tmp_path):
    out, _, _ = trained
    root, files, specs = user
    demo = load_tool("demo")
    vis = tmp_path / "vis"
    results = demo.main(["--config-file", tiny_config, "--input", files["val"][1],
                         "--output", str(vis), *_dataset_args(specs[1:]),
                         "--confidence-threshold", "0.99", "--top-k", "2",
                         "--opts", *USER_OPTS, "MODEL.WEIGHTS", str(out / "model_final.pth")])
    assert len(results) == 4
    records = [r for v in results.values() for r in v]
    # a 4-iteration model scores nothing >= 0.99: each image shows its 2 best instead
    assert all(len(v) == 2 for v in results.values()), results
    assert {r["class"] for r in records} <= set(CLASS_NAMES)
    assert sorted(os.listdir(vis)) == sorted(os.listdir(files["val"][1])) + ["predictions.json"]


def test_visualize_data_sees_the_user_dataset(user, tiny_config, load_tool, tmp_path):
    _, _, specs = user
    vis = load_tool("visualize_data")
    for source in ("annotation", "dataloader"):
        paths = vis.main(["--config-file", tiny_config, "--source", source,
                          "--output-dir", str(tmp_path / source), "--num", "3",
                          *_dataset_args(specs), "--opts", *USER_OPTS])
        assert len(paths) == 3
        assert all(cv2.imread(p) is not None for p in paths)
    # raw annotations need no model: the config's class count (3 here) does not matter
    paths = vis.main(["--config-file", tiny_config, "--source", "annotation", "--output-dir",
                      str(tmp_path / "any_count"), "--num", "1", *_dataset_args(specs[:1]),
                      "--opts", "DATASETS.TRAIN", "('mydata_train',)"])
    assert len(paths) == 1
