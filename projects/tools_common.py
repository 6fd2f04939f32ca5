"""Command-line helpers shared by the scripts in `tools/` (demo, visualize_data, analyze_model,
benchmark).

Every tool builds its config the same way, so that it accepts the keys of all five methods:

    cfg = projects.get_cfg()           # Detectron2 defaults + every add_<pkg>_config
    cfg.merge_from_file(config_file)   # yacs YAML with `_BASE_` inheritance
    cfg.merge_from_list(opts)          # trailing `--opts KEY VALUE ...` overrides
    --dataset NAME=ann.json:images     # users' COCO datasets (DATASETS.REGISTER_COCO), registered
    MODEL.DEVICE -> "cpu" when CUDA is not available

`import projects` (done here) registers every method's modules and the built-in datasets.
"""
import argparse
import logging
import os

import torch

import projects
from projects.data.user_datasets import DatasetSpecError

__all__ = [
    "ToolError",
    "add_config_args",
    "add_dataset_args",
    "check_dataset_classes",
    "setup_cfg",
    "get_trainer_class",
    "build_model",
    "try_load_weights",
    "count_parameters",
    "model_state_shapes",
]

logger = logging.getLogger(__name__)


class ToolError(RuntimeError):
    """A user-facing error of a tool (bad path, bad option); printed without a traceback."""


def add_dataset_args(parser: argparse.ArgumentParser):
    """Add `--dataset NAME=ANN.json[:IMAGES]` (repeatable), as in `train_net.py`."""
    from projects.engine.train import add_dataset_argument

    return add_dataset_argument(parser)


def add_config_args(parser: argparse.ArgumentParser, multiple_configs: bool = False):
    """Add `--config-file`, `--dataset` (repeatable) and the trailing `--opts KEY VALUE ...`
    to `parser`."""
    add_dataset_args(parser)
    if multiple_configs:
        parser.add_argument("--config-file", nargs="+", required=True, metavar="FILE",
                            help="one or more yacs YAML configs")
    else:
        parser.add_argument("--config-file", required=True, metavar="FILE",
                            help="path to a yacs YAML config (any method's keys are accepted)")
    parser.add_argument("--opts", default=[], nargs=argparse.REMAINDER, metavar="KEY VALUE",
                        help="config overrides as KEY VALUE pairs, e.g. "
                             "--opts MODEL.WEIGHTS model_final.pth MODEL.DEVICE cpu "
                             "(must come last on the command line)")
    return parser


def setup_cfg(config_file: str, opts=(), freeze: bool = True, datasets=()):
    """Build a config: `projects.get_cfg()` + YAML file + `opts` overrides, with MODEL.DEVICE
    falling back to cpu without CUDA (`projects.load_config`), and the datasets of
    DATASETS.REGISTER_COCO + `datasets` registered.

    Args:
        config_file: path to a yacs YAML file (may use `_BASE_`).
        opts: flat list `[KEY, VALUE, KEY, VALUE, ...]` applied after the file.
        freeze: freeze the returned config.
        datasets: `--dataset` values, ``NAME=ANN.json[:IMAGES]``.

    Raises:
        ToolError: the file does not exist, an override is malformed / names an unknown key,
            or a dataset spec is malformed / names a missing file.
    """
    if not os.path.isfile(config_file):
        raise ToolError(f"config file not found: {config_file}")
    opts = list(opts or [])
    if len(opts) % 2:
        raise ToolError(f"--opts needs KEY VALUE pairs, got an odd number of items: {opts}")
    try:
        cfg = projects.load_config(config_file, opts, datasets=tuple(datasets or ()))
    except (FileNotFoundError, DatasetSpecError) as e:
        raise ToolError(str(e)) from e
    except KeyError as e:
        raise ToolError(e.args[0] if e.args else str(e)) from e
    except (AssertionError, ValueError) as e:  # yacs type mismatch, malformed value
        raise ToolError(f"{config_file} with overrides {opts}: {e}") from e
    if freeze:
        cfg.freeze()
    return cfg


def check_dataset_classes(cfg, dataset_names):
    """`projects.config.check_num_classes` with its errors as `ToolError`."""
    from projects.config import check_num_classes

    try:
        check_num_classes(cfg, [n for n in dataset_names])
    except (KeyError, ValueError, FileNotFoundError) as e:
        raise ToolError(e.args[0] if e.args else str(e)) from e


def get_trainer_class():
    """`projects.engine.Trainer`, the trainer `train_net.py` uses."""
    from projects.engine import Trainer

    return Trainer


def build_model(cfg):
    """The model of `cfg`, built the way training builds it (`Trainer.build_model`)."""
    return get_trainer_class().build_model(cfg)


def try_load_weights(model, weights: str) -> bool:
    """Load `weights` (MODEL.WEIGHTS) into `model` if it is set and loadable.

    Analysis and benchmark figures do not need trained weights (FLOPs of the box/mask heads
    only depend on the number of proposals/detections), so a missing file (e.g. an ImageNet
    checkpoint that was never downloaded, no internet) gives a warning naming the file and
    the model keeps its random initialisation.

    Returns:
        True if weights were loaded.
    """
    if not weights:
        return False
    from detectron2.checkpoint import DetectionCheckpointer

    try:
        DetectionCheckpointer(model).load(weights)
    except Exception as e:  # noqa: BLE001  (file missing, no network, bad format)
        logger.warning("could not load MODEL.WEIGHTS=%s (%s: %s); using random initialisation",
                       weights, type(e).__name__, e)
        return False
    return True


def count_parameters(module: torch.nn.Module) -> int:
    """Number of parameters of `module`, counting the affine weight/bias of frozen BatchNorm
    layers too (Detectron2 stores those as buffers; papers count them as parameters)."""
    from detectron2.layers import FrozenBatchNorm2d

    n = sum(p.numel() for p in module.parameters())
    for m in module.modules():
        if isinstance(m, FrozenBatchNorm2d):
            n += m.weight.numel() + m.bias.numel()
    return n


def model_state_shapes(config_file: str, opts=()):
    """``{state-dict key: shape}`` of the model ``config_file`` builds (on CPU, no weights):
    what a checkpoint converter must produce exactly."""
    from detectron2.modeling import build_model as _build

    cfg = projects.load_config(config_file, list(opts) + ["MODEL.DEVICE", "cpu"])
    return {k: tuple(v.shape) for k, v in _build(cfg).state_dict().items()}
