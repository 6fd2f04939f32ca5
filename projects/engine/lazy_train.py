"""Training and evaluation from a Python LazyConfig (``train_net.py --config-file x.py``), the
flow of Detectron2's ``tools/lazyconfig_train_net.py``: instantiate ``model``, ``optimizer``,
``dataloader.train`` and ``lr_multiplier``, train with Detectron2's ``SimpleTrainer`` /
``AMPTrainer`` and its hooks, evaluate ``dataloader.test`` with ``dataloader.evaluator``."""
import logging

import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import LazyConfig, instantiate
from detectron2.engine import AMPTrainer, SimpleTrainer, default_setup, default_writers, hooks
from detectron2.evaluation import inference_on_dataset, print_csv_format
from detectron2.utils import comm

from .ema import unwrap_model

__all__ = ["is_lazy_config", "setup_lazy", "do_test", "do_train", "main_lazy"]

logger = logging.getLogger("projects.engine.lazy_train")


def is_lazy_config(path) -> bool:
    return bool(path) and str(path).endswith(".py")


def setup_lazy(args):
    """Load the LazyConfig, apply ``key=value`` overrides, fall back to CPU without CUDA."""
    cfg = LazyConfig.load(args.config_file)
    bad = [o for o in args.opts if "=" not in o]
    if bad:
        raise ValueError(f"LazyConfig {args.config_file}: overrides are key=value, got {bad} "
                         "(e.g. train.max_iter=100 model.cfg.MODEL.ROI_HEADS.NUM_CLASSES=3)")
    cfg = LazyConfig.apply_overrides(cfg, args.opts)
    if str(cfg.train.device).startswith("cuda") and not torch.cuda.is_available():
        logger.warning("train.device=%s but CUDA is not available: using cpu", cfg.train.device)
        cfg.train.device = "cpu"
    if "cfg" in cfg.model:  # the model's own device follows train.device
        cfg.model.cfg.MODEL.DEVICE = str(cfg.train.device)
    default_setup(cfg, args)  # seeds with train.seed
    return cfg


def do_test(cfg, model):
    if "evaluator" not in cfg.dataloader:
        return {}
    ret = inference_on_dataset(model, instantiate(cfg.dataloader.test),
                               instantiate(cfg.dataloader.evaluator))
    if comm.is_main_process():
        print_csv_format(ret)
    return ret


def do_train(args, cfg):
    """Detectron2's LazyConfig training loop; returns the last evaluation's results."""
    from detectron2.engine import create_ddp_model

    model = instantiate(cfg.model)
    model.to(cfg.train.device)
    cfg.optimizer.params.model = model
    optim = instantiate(cfg.optimizer)
    train_loader = instantiate(cfg.dataloader.train)
    on_cpu = str(cfg.train.device).startswith("cpu")
    model = create_ddp_model(model, **cfg.train.ddp, **({"device_ids": None} if on_cpu else {}))
    trainer = (AMPTrainer if cfg.train.amp.enabled else SimpleTrainer)(model, train_loader, optim)
    checkpointer = DetectionCheckpointer(unwrap_model(model), cfg.train.output_dir,
                                         trainer=trainer)
    results = {}

    def test_and_keep():
        results.clear()
        results.update(do_test(cfg, model))
        return results

    trainer.register_hooks([
        hooks.IterationTimer(),
        hooks.LRScheduler(scheduler=instantiate(cfg.lr_multiplier)),
        hooks.PeriodicCheckpointer(checkpointer, **cfg.train.checkpointer)
        if comm.is_main_process() else None,
        hooks.EvalHook(cfg.train.eval_period, test_and_keep),
        hooks.PeriodicWriter(default_writers(cfg.train.output_dir, cfg.train.max_iter),
                             period=cfg.train.log_period) if comm.is_main_process() else None,
    ])
    checkpointer.resume_or_load(cfg.train.init_checkpoint, resume=args.resume)
    start_iter = trainer.iter + 1 if args.resume and checkpointer.has_checkpoint() else 0
    trainer.train(start_iter, cfg.train.max_iter)
    return results


def main_lazy(args):
    cfg = setup_lazy(args)
    if args.eval_only:
        model = instantiate(cfg.model)
        model.to(cfg.train.device)
        DetectionCheckpointer(model).load(cfg.train.init_checkpoint)
        return do_test(cfg, model)
    return do_train(args, cfg)
