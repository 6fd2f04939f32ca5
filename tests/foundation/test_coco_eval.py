"""COCO evaluation: the Trainer uses Detectron2's compiled fast evaluator where it is compiled,
and that evaluator gives pycocotools' AP; on the fallback, pycocotools, and the fast one fails
clearly."""
import copy

import pytest
import torch
from detectron2.data import DatasetCatalog
from detectron2.evaluation import COCOEvaluator
from detectron2.structures import Boxes, BoxMode, Instances

from projects.engine import Trainer

from .conftest import COMPILED_DETECTRON2


def _predictions(dataset, seed=0):
    """Detector-like outputs for `dataset`: every ground-truth box jittered by up to 15% of its
    size (some far enough to miss at high IoU), a third relabelled, plus two random false
    positives per image; random scores."""
    g = torch.Generator().manual_seed(seed)
    outputs = []
    for d in dataset:
        boxes = torch.tensor([BoxMode.convert(a["bbox"], a["bbox_mode"], BoxMode.XYXY_ABS)
                              for a in d["annotations"]], dtype=torch.float32).reshape(-1, 4)
        classes = torch.tensor([a["category_id"] for a in d["annotations"]], dtype=torch.int64)
        wh = (boxes[:, 2:] - boxes[:, :2]).repeat(1, 2)
        boxes = boxes + (torch.rand(boxes.shape, generator=g) - 0.5) * 0.3 * wh
        relabel = torch.rand(len(classes), generator=g) < 1 / 3
        classes = torch.where(relabel, (classes + 1) % 3, classes)
        xy = torch.rand(2, 2, generator=g) * torch.tensor([d["width"], d["height"]]) * 0.7
        false_pos = torch.cat([xy, xy + 10 + torch.rand(2, 2, generator=g) * 30], dim=1)
        inst = Instances((d["height"], d["width"]))
        inst.pred_boxes = Boxes(torch.cat([boxes, false_pos]))
        inst.pred_classes = torch.cat([classes, torch.randint(0, 3, (2,), generator=g)])
        inst.scores = torch.rand(len(inst.pred_classes), generator=g)
        outputs.append({"instances": inst})
    return outputs


def _evaluate(use_fast_impl, dataset, outputs):
    evaluator = COCOEvaluator("shapes_val", tasks=("bbox",), distributed=False,
                              use_fast_impl=use_fast_impl)
    evaluator.reset()
    inputs = [{"image_id": d["image_id"], "height": d["height"], "width": d["width"]}
              for d in dataset]
    evaluator.process(inputs, copy.deepcopy(outputs))
    return evaluator.evaluate()["bbox"]


def test_trainer_uses_the_fast_evaluator_where_compiled(tiny_cfg):
    evaluator = Trainer.build_evaluator(tiny_cfg, "shapes_val")
    assert isinstance(evaluator, COCOEvaluator)
    assert evaluator._use_fast_impl is COMPILED_DETECTRON2


def test_fast_evaluator_gives_pycocotools_ap():
    dataset = DatasetCatalog.get("shapes_val")
    outputs = _predictions(dataset)
    official = _evaluate(False, dataset, outputs)
    assert 5 < official["AP"] < 90 and official["AP50"] > official["AP75"]  # a non-trivial case
    if not COMPILED_DETECTRON2:
        with pytest.raises(NotImplementedError, match=r"detectron2\._C\.InstanceAnnotation"):
            _evaluate(True, dataset, outputs)
        return
    fast = _evaluate(True, dataset, outputs)
    assert fast.keys() == official.keys()
    for k in official:
        assert fast[k] == pytest.approx(official[k], abs=1e-6, nan_ok=True), k
