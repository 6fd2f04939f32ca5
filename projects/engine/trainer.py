"""`Trainer`: Detectron2's `DefaultTrainer` with COCO evaluation, checked data loading and
DistributedDataParallel that also works for CPU workers."""
import logging
import os
from collections import OrderedDict
from unittest import mock

import torch
from detectron2.data import MetadataCatalog, build_detection_test_loader, build_detection_train_loader
from detectron2.engine import DefaultTrainer, create_ddp_model
from detectron2.engine import defaults as d2_defaults

from projects_common.tta import build_tta_model

from ..config import check_num_classes, register_config_datasets
from ..data import CheckedDatasetMapper, build_train_mapper
from ..data.builtin import prepare_dataset_files
from .coco_evaluation import COCOEvaluator

__all__ = ["Trainer", "compiled_coco_eval_available"]


# What `detectron2.evaluation.fast_eval_api.COCOeval_opt` calls in the compiled extension.
COMPILED_COCO_EVAL_OPS = ("COCOevalEvaluateImages", "COCOevalAccumulate", "InstanceAnnotation")


def compiled_coco_eval_available() -> bool:
    """Whether Detectron2's compiled COCO evaluation (``_C.COCOevalEvaluateImages`` and
    ``_C.COCOevalAccumulate``, used by ``COCOEvaluator(use_fast_impl=True)``) is installed."""
    try:
        from detectron2 import _C
    except ImportError:
        return False
    if getattr(_C, "IS_PURE_PYTHON_STANDIN", False):  # its ops all exist and all raise
        return False
    return all(hasattr(_C, name) for name in COMPILED_COCO_EVAL_OPS)


def _create_cpu_ddp_model(model, **kwargs):
    """Detectron2's `create_ddp_model`, with ``device_ids=None`` for a CPU model (DDP rejects
    device ids for CPU modules; Detectron2 passes the local rank)."""
    if next(model.parameters()).device.type == "cpu":
        kwargs.setdefault("device_ids", None)
    return create_ddp_model(model, **kwargs)


class Trainer(DefaultTrainer):
    """`DefaultTrainer` for every method of this project.

    Differences from Detectron2's: COCO evaluation (fast evaluator only where compiled), a
    data mapper whose image errors name the file, a class-count check against the datasets,
    test-time augmentation through `projects_common.tta`, and DDP wrapping with
    ``device_ids=None`` for CPU models (Detectron2 passes the local rank, which DDP rejects for
    CPU modules). The constructor is Detectron2's own (v0.6 and main: build model, optimizer,
    loader, wrap, trainer state, checkpointer, hooks); only while it runs, the
    `create_ddp_model` it calls adds ``device_ids=None`` for a CPU model.
    """

    def __init__(self, cfg):
        if cfg.SOLVER.AMP.ENABLED and not torch.cuda.is_available():
            raise ValueError("SOLVER.AMP.ENABLED=True needs CUDA (Detectron2's AMPTrainer); "
                             "set SOLVER.AMP.ENABLED False on CPU")
        # DefaultTrainer.__init__ as is, except for the one DDP argument of
        # `_create_cpu_ddp_model` (v0.6 and main call `create_ddp_model(model,
        # broadcast_buffers=False)`, looked up in `detectron2.engine.defaults`).
        with mock.patch.object(d2_defaults, "create_ddp_model", _create_cpu_ddp_model):
            super().__init__(cfg)

    def train(self):
        """Train, then return the results of the last evaluation (Detectron2 v0.6 returns them
        only when ``TEST.EXPECTED_RESULTS`` is set)."""
        super().train()
        return getattr(self, "_last_eval_results", OrderedDict())

    @classmethod
    def build_train_loader(cls, cfg):
        # the test datasets too: the final evaluation must not be the first to find a mismatch
        register_config_datasets(cfg)
        check_num_classes(cfg, list(cfg.DATASETS.TRAIN) + list(cfg.DATASETS.TEST))
        return build_detection_train_loader(cfg, mapper=build_train_mapper(cfg))

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        register_config_datasets(cfg)
        check_num_classes(cfg, [dataset_name])
        return build_detection_test_loader(cfg, dataset_name,
                                           mapper=CheckedDatasetMapper(cfg, False))

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        register_config_datasets(cfg)
        prepare_dataset_files(dataset_name)
        check_num_classes(cfg, [dataset_name])
        meta = MetadataCatalog.get(dataset_name)
        evaluator_type = meta.get("evaluator_type", None)
        if evaluator_type not in ("coco", None) or not meta.get("thing_classes", None):
            raise NotImplementedError(
                f"no evaluator for dataset {dataset_name!r} (evaluator_type={evaluator_type!r}); "
                "register it with thing_classes and a COCO json_file, or override "
                "Trainer.build_evaluator"
            )
        output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference")
        return COCOEvaluator(dataset_name, output_dir=output_folder,
                             use_fast_impl=compiled_coco_eval_available())

    @classmethod
    def test_with_TTA(cls, cfg, model):
        """Evaluate ``model`` with the test-time augmentation of ``cfg.TEST.AUG``."""
        logging.getLogger("detectron2.trainer").info("Running inference with test-time augmentation")
        tta_model = build_tta_model(cfg, model)
        evaluators = [
            cls.build_evaluator(cfg, name, output_folder=os.path.join(cfg.OUTPUT_DIR, "inference_TTA"))
            for name in cfg.DATASETS.TEST
        ]
        res = cls.test(cfg, tta_model, evaluators)
        return OrderedDict({k + "_TTA": v for k, v in res.items()})
