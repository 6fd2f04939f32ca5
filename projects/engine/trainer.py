"""`Trainer`: Detectron2's `DefaultTrainer` with COCO evaluation, checked data loading and
DistributedDataParallel that also works for CPU workers."""
import logging
import os
import weakref
from collections import OrderedDict

import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.data import MetadataCatalog, build_detection_test_loader, build_detection_train_loader
from detectron2.engine import AMPTrainer, DefaultTrainer, SimpleTrainer, create_ddp_model, hooks
from detectron2.engine.train_loop import TrainerBase
from detectron2.evaluation import COCOEvaluator
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from projects_common.tta import build_tta_model

from ..config import check_num_classes
from ..data import CheckedDatasetMapper
from ..data.builtin import prepare_dataset_files
from .clip import build_optimizer_with_clipping
from .ema import EMAHook, ModelEMA, ema_weights_applied, unwrap_model

__all__ = ["Trainer", "compiled_coco_eval_available"]


def compiled_coco_eval_available() -> bool:
    """Whether Detectron2's compiled COCO evaluation (``_C.COCOevalMaskApi``) is installed."""
    try:
        from detectron2 import _C
    except ImportError:
        return False
    return not getattr(_C, "IS_PURE_PYTHON_STANDIN", False) and hasattr(_C, "COCOevalMaskApi")


class Trainer(DefaultTrainer):
    """`DefaultTrainer` for every method of this project.

    Differences from Detectron2's: COCO evaluation (fast evaluator only where compiled), a
    data mapper whose image errors name the file, a class-count check against the datasets,
    test-time augmentation through `projects_common.tta`, DDP wrapping with
    ``device_ids=None`` for CPU models (Detectron2 passes the local rank, which DDP rejects for
    CPU modules), gradient clipping by the global norm (``SOLVER.CLIP_GRADIENTS.CLIP_TYPE
    full_model_norm``, `projects.engine.clip`) and model EMA (``MODEL_EMA``,
    `projects.engine.ema`).
    """

    def __init__(self, cfg):
        # Same construction order as DefaultTrainer.__init__; only the DDP wrapping differs.
        TrainerBase.__init__(self)
        if not logging.getLogger("detectron2").isEnabledFor(logging.INFO):
            setup_logger()
        cfg = DefaultTrainer.auto_scale_workers(cfg, comm.get_world_size())
        if cfg.SOLVER.AMP.ENABLED and not torch.cuda.is_available():
            raise ValueError("SOLVER.AMP.ENABLED=True needs CUDA (Detectron2's AMPTrainer); "
                             "set SOLVER.AMP.ENABLED False on CPU")
        model = self.build_model(cfg)
        optimizer = self.build_optimizer(cfg, model)
        data_loader = self.build_train_loader(cfg)
        on_cpu = next(model.parameters()).device.type == "cpu"
        model = create_ddp_model(model, broadcast_buffers=False,
                                 **({"device_ids": None} if on_cpu else {}))
        trainer_cls = AMPTrainer if cfg.SOLVER.AMP.ENABLED else SimpleTrainer
        self._trainer = trainer_cls(model, data_loader, optimizer)
        self.scheduler = self.build_lr_scheduler(cfg, optimizer)
        self.checkpointer = DetectionCheckpointer(model, cfg.OUTPUT_DIR,
                                                  trainer=weakref.proxy(self))
        self.start_iter = 0
        self.max_iter = cfg.SOLVER.MAX_ITER
        self.cfg = cfg
        self.register_hooks(self.build_hooks())

    def train(self):
        """Train, then return the results of the last evaluation (Detectron2 v0.6 returns them
        only when ``TEST.EXPECTED_RESULTS`` is set)."""
        super().train()
        return getattr(self, "_last_eval_results", OrderedDict())

    @classmethod
    def build_optimizer(cls, cfg, model):
        """Detectron2's optimizer; ``CLIP_TYPE: full_model_norm`` clips all gradients together."""
        return build_optimizer_with_clipping(cfg, model, super().build_optimizer)

    def build_hooks(self):
        """Detectron2's hooks, plus `EMAHook` before checkpointing and evaluation when
        ``MODEL_EMA.ENABLED`` (its average is saved in checkpoints under ``"ema"``)."""
        ret = super().build_hooks()
        if not self.cfg.MODEL_EMA.ENABLED:
            return ret
        ema_cfg = self.cfg.MODEL_EMA
        ema = ModelEMA(unwrap_model(self.model), ema_cfg.DECAY, ema_cfg.DEVICE)
        self.checkpointer.add_checkpointable("ema", ema)
        first = next((i for i, h in enumerate(ret)
                      if isinstance(h, (hooks.PeriodicCheckpointer, hooks.EvalHook))), len(ret))
        ret.insert(first, EMAHook(ema, ema_cfg.START_ITER))
        return ret

    @classmethod
    def test(cls, cfg, model, evaluators=None):
        """Detectron2's evaluation, on the EMA weights when ``model`` has a `ModelEMA`."""
        with ema_weights_applied(model):
            return super().test(cfg, model, evaluators)

    @classmethod
    def build_train_loader(cls, cfg):
        check_num_classes(cfg, cfg.DATASETS.TRAIN)
        return build_detection_train_loader(cfg, mapper=CheckedDatasetMapper(cfg, True))

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        check_num_classes(cfg, [dataset_name])
        return build_detection_test_loader(cfg, dataset_name,
                                           mapper=CheckedDatasetMapper(cfg, False))

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        prepare_dataset_files(dataset_name)
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
        evaluators = [
            cls.build_evaluator(cfg, name, output_folder=os.path.join(cfg.OUTPUT_DIR, "inference_TTA"))
            for name in cfg.DATASETS.TEST
        ]
        with ema_weights_applied(model):
            res = cls.test(cfg, build_tta_model(cfg, model), evaluators)
        return OrderedDict({k + "_TTA": v for k, v in res.items()})
