"""`train_net.py` logic: argument parsing, config setup, training and `--eval-only`."""
import importlib
import inspect

import torch
from detectron2.engine import default_argument_parser, default_setup, hooks, launch
from detectron2.evaluation import verify_results
from detectron2.utils import comm

from ..config import check_num_classes, load_config
from ..data.user_datasets import SPEC_SYNTAX
from .checkpoint import MIN_LOADED_FRACTION_FOR_INFERENCE, VerifiedCheckpointer
from .ema import load_ema_from_checkpoint
from .lazy_train import is_lazy_config, main_lazy
from .trainer import Trainer

__all__ = ["argument_parser", "setup", "main", "run"]


def add_dataset_argument(parser):
    """``--dataset NAME=ANN.json[:IMAGES]`` (repeatable): a user's COCO-format dataset."""
    parser.add_argument(
        "--dataset", action="append", default=[],
        metavar=SPEC_SYNTAX.replace("[", "").replace("]", ""),
        help="register a COCO-format dataset under NAME before anything is built (repeatable; "
             "the image folder defaults to the json's folder); use NAME in DATASETS.TRAIN / "
             "DATASETS.TEST. Same as the config key DATASETS.REGISTER_COCO")
    return parser


def argument_parser():
    """Detectron2's standard parser: --config-file, --resume, --eval-only, --num-gpus,
    --num-machines, --machine-rank, --dist-url and trailing ``KEY VALUE`` overrides; plus
    ``--dataset NAME=ANN.json[:IMAGES]`` (repeatable) for users' COCO-format datasets."""
    return add_dataset_argument(default_argument_parser())


def setup(args):
    """Config of ``args`` (datasets registered), checked against its datasets' class counts
    before any model is built: the training and test datasets, or only the test datasets with
    ``--eval-only``."""
    cfg = load_config(args.config_file, args.opts, datasets=getattr(args, "dataset", None) or ())
    names = list(cfg.DATASETS.TEST) if args.eval_only else (
        list(cfg.DATASETS.TRAIN) + list(cfg.DATASETS.TEST))
    check_num_classes(cfg, names)
    cfg.freeze()
    default_setup(cfg, args)
    return cfg


def main(args):
    """Train (or, with ``--eval-only``, evaluate) one config; returns the evaluation results.
    A ``.py`` config file is a LazyConfig (`projects.engine.lazy_train`, ``key=value``
    overrides)."""
    if is_lazy_config(args.config_file):
        return main_lazy(args)
    cfg = setup(args)
    if args.eval_only:
        model = Trainer.build_model(cfg)
        # MODEL.WEIGHTS must be a checkpoint of this model: no evaluation of random weights
        checkpointer = VerifiedCheckpointer(
            model, save_dir=cfg.OUTPUT_DIR, min_loaded_fraction=MIN_LOADED_FRACTION_FOR_INFERENCE)
        extra = checkpointer.resume_or_load(cfg.MODEL.WEIGHTS, resume=args.resume)
        if cfg.MODEL_EMA.ENABLED:  # evaluate the averaged weights saved with the checkpoint
            load_ema_from_checkpoint(
                model, extra,
                checkpointer.get_checkpoint_file() if args.resume and checkpointer.has_checkpoint()
                else cfg.MODEL.WEIGHTS)
        res = Trainer.test(cfg, model)
        if cfg.TEST.AUG.ENABLED:
            res.update(Trainer.test_with_TTA(cfg, model))
        if comm.is_main_process():
            verify_results(cfg, res)
        return res
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    if cfg.TEST.AUG.ENABLED:
        trainer.register_hooks(
            [hooks.EvalHook(0, lambda: trainer.test_with_TTA(cfg, trainer.model))]
        )
    return trainer.train()


def _launch_supports_cpu_workers() -> bool:
    """Whether Detectron2's `launch` starts workers without CUDA: Detectron2 main (since
    2023-01) selects the GLOO backend there, v0.6 asserts CUDA. Inspects the
    ``detectron2.engine.launch`` module (``detectron2.engine.launch`` the attribute is the
    re-exported function, whose source names no backend)."""
    launch_module = importlib.import_module("detectron2.engine.launch")
    return "gloo" in inspect.getsource(launch_module).lower()


def run(args):
    """Launch ``main`` on ``args.num_gpus`` processes per machine."""
    if args.num_gpus > 1 and not torch.cuda.is_available() and not _launch_supports_cpu_workers():
        raise SystemExit(
            f"--num-gpus {args.num_gpus} without CUDA needs CPU (gloo) workers, which this "
            "Detectron2 version's launch() does not support (v0.6 requires CUDA for more than "
            "one process). Install Detectron2 main, or run with --num-gpus 1."
        )
    return launch(main, args.num_gpus, num_machines=args.num_machines,
                  machine_rank=args.machine_rank, dist_url=args.dist_url, args=(args,))
