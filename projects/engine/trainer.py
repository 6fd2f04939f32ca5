"""`Trainer`: Detectron2's `DefaultTrainer` with COCO evaluation, checked data loading,
DistributedDataParallel that also works for CPU workers, and an exact, crash-safe `--resume`."""
import logging
import os
from collections import OrderedDict
from unittest import mock

import torch
from detectron2.data import MetadataCatalog, build_detection_test_loader
from detectron2.engine import DefaultTrainer, create_ddp_model, hooks
from detectron2.engine import defaults as d2_defaults
from detectron2.engine.train_loop import HookBase
from detectron2.utils import comm

from projects_common.tta import build_tta_model

from ..config import check_num_classes, register_config_datasets
from ..data import CheckedDatasetMapper, build_train_mapper
from ..data.builtin import prepare_dataset_files
from ..data.resumable import build_resumable_train_loader
from .checkpoint import VerifiedCheckpointer
from .clip import build_optimizer_with_clipping
from .coco_evaluation import COCOEvaluator
from .ema import EMAHook, ModelEMA, ema_weights_applied, unwrap_model
from .random_state import capture_random_states, preserved_random_states, restore_random_states

__all__ = ["Trainer", "compiled_coco_eval_available"]

logger = logging.getLogger(__name__)

# Detectron2 main's DefaultTrainer saves its SimpleTrainer's state (the optimizer) in its own
# state_dict; v0.6's does not, so there the optimizer state is added here.
_DEFAULT_TRAINER_SAVES_OPTIMIZER = "state_dict" in vars(DefaultTrainer)


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


def _is_checkpoint_iteration(iteration: int, period: int, max_iter: int) -> bool:
    # the iterations at which Detectron2's PeriodicCheckpointer saves
    return (iteration + 1) % period == 0 or iteration >= max_iter - 1


class _RandomStateSnapshot(HookBase):
    """On every process, at every checkpoint iteration: gather all processes' random states
    (a collective call) so that the checkpoint rank 0 writes holds each rank's own."""

    def __init__(self, period: int):
        self._period = period

    def after_step(self):
        t = self.trainer
        if _is_checkpoint_iteration(t.iter, self._period, t.max_iter):
            t._random_states = (t.iter, comm.all_gather(capture_random_states()))


class Trainer(DefaultTrainer):
    """`DefaultTrainer` for every method of this project.

    Differences from Detectron2's: COCO evaluation (fast evaluator only where compiled), a
    data mapper whose image errors name the file, a class-count check against the datasets,
    test-time augmentation through `projects_common.tta`, DDP wrapping with
    ``device_ids=None`` for CPU models (Detectron2 passes the local rank, which DDP rejects for
    CPU modules; the constructor is Detectron2's own, v0.6 and main, and only while it runs,
    the `create_ddp_model` it calls adds ``device_ids=None`` for a CPU model), and an exact
    resume:

    * the checkpoint holds model (with every method's state buffers), optimizer (also on
      Detectron2 v0.6), LR scheduler, iteration, the global random states of every process
      (torch, CUDA, NumPy, Python) and the position of the training data stream
      (`projects.data.resumable`); `--resume` restores all of them, so the resumed run
      computes what the uninterrupted run computes, bit for bit;
    * checkpoints are written atomically and verified before resuming
      (`projects.engine.checkpoint.VerifiedCheckpointer`); a run resumed after its last
      iteration rewrites a missing or incomplete ``model_final.pth``;
    * evaluation during training does not consume the training random streams;

    and gradient clipping by the global norm (``SOLVER.CLIP_GRADIENTS.CLIP_TYPE
    full_model_norm``, `projects.engine.clip`) and model EMA (``MODEL_EMA``,
    `projects.engine.ema`).
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
        self._ensure_final_checkpoint()
        super().train()
        return getattr(self, "_last_eval_results", OrderedDict())

    def run_step(self):
        """`DefaultTrainer.run_step`; a divergence detected inside the model (e.g. Detectron2's
        RPN: "Predicted boxes or scores contain Inf/NaN") is re-raised as a
        `FloatingPointError` that names the iteration and the last logged losses, like the
        one Detectron2 raises for a non-finite loss."""
        try:
            super().run_step()
        except FloatingPointError as e:
            if "iteration" in str(e):
                raise
            last = {k: v for k, (v, _) in self.storage.latest().items()
                    if k.startswith("loss") or k == "total_loss"}
            raise FloatingPointError(
                f"Training diverged at iteration={self.iter}: {e}\n"
                f"losses logged at the previous iteration: {last}"
            ) from e

    # ------------------------------------------------------------------ exact resume
    def build_hooks(self):
        """Detectron2's hooks with the crash-safe checkpointer; before checkpointing and
        evaluation, `EMAHook` when ``MODEL_EMA.ENABLED`` (its average is saved in checkpoints
        under ``"ema"``) and, with several processes, the random-state snapshot."""
        # DefaultTrainer's constructor has just built a plain DetectionCheckpointer: give the
        # hooks (and resume_or_load) the crash-safe one instead.
        if not isinstance(self.checkpointer, VerifiedCheckpointer):
            self.checkpointer = VerifiedCheckpointer.like(self.checkpointer)
        ret = super().build_hooks()
        extra = []
        if self.cfg.MODEL_EMA.ENABLED:
            ema_cfg = self.cfg.MODEL_EMA
            ema = ModelEMA(unwrap_model(self.model), ema_cfg.DECAY, ema_cfg.DEVICE)
            self.checkpointer.add_checkpointable("ema", ema)
            extra.append(EMAHook(ema, ema_cfg.START_ITER))
        if comm.get_world_size() > 1:
            extra.append(_RandomStateSnapshot(self.cfg.SOLVER.CHECKPOINT_PERIOD))
        first = next((i for i, h in enumerate(ret)
                      if isinstance(h, (hooks.PeriodicCheckpointer, hooks.EvalHook))), len(ret))
        ret[first:first] = extra
        return ret

    def state_dict(self):
        ret = super().state_dict()
        if "_trainer" not in ret:  # Detectron2 v0.6: add the optimizer as main does
            ret["_trainer"] = self._trainer.state_dict()
        ret["random_states"] = self._random_states_for_checkpoint()
        loader = self._trainer.data_loader
        if hasattr(loader, "state_dict"):
            ret["data_loader"] = loader.state_dict()
        return ret

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        if not _DEFAULT_TRAINER_SAVES_OPTIMIZER:
            if "_trainer" in state_dict:
                self._trainer.load_state_dict(state_dict["_trainer"])
            else:
                logger.warning("The checkpoint holds no optimizer state: the optimizer "
                               "(momentum) starts from zero; the run will not match an "
                               "uninterrupted one.")
        loader = self._trainer.data_loader
        if "data_loader" in state_dict and hasattr(loader, "load_state_dict"):
            loader.load_state_dict(state_dict["data_loader"])
        else:
            logger.warning("The checkpoint holds no data-loader position: the training data "
                           "stream starts over.")
        states = state_dict.get("random_states")
        rank, world = comm.get_rank(), comm.get_world_size()
        if not states or rank >= len(states) or states[rank] is None:
            logger.warning(f"The checkpoint holds no random states for process {rank}: "
                           "they are not restored.")
            return
        if len(states) != world:
            logger.warning(f"The checkpoint's random states are of {len(states)} processes, "
                           f"this run has {world}: process {rank} takes saved process {rank}'s.")
        restore_random_states(states[rank])
        self._random_states = (self.iter, states)

    def _random_states_for_checkpoint(self):
        snapshot = getattr(self, "_random_states", None)
        if snapshot is not None and snapshot[0] == self.iter:
            return snapshot[1]
        if comm.get_world_size() == 1:
            return [capture_random_states()]
        logger.warning(f"Checkpoint at iteration {self.iter} outside the checkpoint period: "
                       "it holds the random states of this process only.")
        states = [None] * comm.get_world_size()
        states[comm.get_rank()] = capture_random_states()
        return states

    def _ensure_final_checkpoint(self):
        """A run resumed after its last iteration (killed while or after writing the final
        checkpoint) rewrites ``model_final.pth`` unless it is complete."""
        if self.start_iter < self.max_iter or self.start_iter == 0 or not comm.is_main_process():
            return
        final = os.path.join(self.cfg.OUTPUT_DIR, "model_final.pth")
        problem = (self.checkpointer.verify(final) if os.path.isfile(final)
                   else "it does not exist")
        if problem is None:
            return
        logger.warning(f"{final} is unusable ({problem}): writing it from the resumed state of "
                       f"iteration {self.iter}.")
        self.checkpointer.save("model_final", iteration=self.iter)

    # ------------------------------------------------------------------ builders
    @classmethod
    def build_optimizer(cls, cfg, model):
        """Detectron2's optimizer; ``CLIP_TYPE: full_model_norm`` clips all gradients together."""
        return build_optimizer_with_clipping(cfg, model, super().build_optimizer)

    @classmethod
    def build_train_loader(cls, cfg):
        """Detectron2's training stream with a checkpointable position
        (`projects.data.resumable`); the class counts of the training and test datasets are
        checked first (the final evaluation must not be the first to find a mismatch)."""
        register_config_datasets(cfg)
        check_num_classes(cfg, list(cfg.DATASETS.TRAIN) + list(cfg.DATASETS.TEST))
        return build_resumable_train_loader(cfg, build_train_mapper(cfg))

    @classmethod
    def test(cls, cfg, model, evaluators=None):
        """`DefaultTrainer.test` on the EMA weights when ``model`` has a `ModelEMA`, leaving the
        global random states as they were (so evaluation during training does not change the
        training that follows)."""
        with preserved_random_states(), ema_weights_applied(model):
            return super().test(cfg, model, evaluators)

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
        evaluators = [
            cls.build_evaluator(cfg, name, output_folder=os.path.join(cfg.OUTPUT_DIR, "inference_TTA"))
            for name in cfg.DATASETS.TEST
        ]
        with ema_weights_applied(model):
            res = cls.test(cfg, build_tta_model(cfg, model), evaluators)
        return OrderedDict({k + "_TTA": v for k, v in res.items()})
