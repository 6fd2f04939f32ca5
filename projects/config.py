"""One config with every method's keys, and the checks run on every loaded config."""
import difflib
import logging

import torch
from detectron2.config import CfgNode as CN
from detectron2.config import get_cfg as _d2_get_cfg

from decoupled_rcnn import add_decoupled_rcnn_config
from dynamic_rcnn import add_dynamic_rcnn_config
from rdsnet import add_rdsnet_config
from res2net import add_res2net_config
from tsd import add_tsd_config

__all__ = ["add_all_configs", "get_cfg", "load_config", "check_num_classes",
           "num_classes_key", "register_config_datasets", "resolve_device",
           "check_training_options", "check_clip_gradients", "add_model_ema_config",
           "NUM_CLASSES_KEYS", "CLIP_TYPES", "FULL_MODEL_NORM"]

logger = logging.getLogger(__name__)

# SOLVER.CLIP_GRADIENTS.CLIP_TYPE values: Detectron2's per-tensor ones and this project's
# clipping of the norm of all parameters together (`projects.engine.clip`).
FULL_MODEL_NORM = "full_model_norm"
CLIP_TYPES = ("value", "norm", FULL_MODEL_NORM)

# Where each meta-architecture reads its class count (Res2Net, Dynamic R-CNN, TSD and
# Decoupled R-CNN are GeneralizedRCNN models; RDSNet has its own meta-architecture).
NUM_CLASSES_KEYS = {
    "GeneralizedRCNN": "MODEL.ROI_HEADS.NUM_CLASSES",
    "DecoupledRCNN": "MODEL.ROI_HEADS.NUM_CLASSES",
    "RetinaNet": "MODEL.RETINANET.NUM_CLASSES",
    "RDSNet": "MODEL.RDSNET.NUM_CLASSES",
}


def add_all_configs(cfg):
    """Add the keys of all five methods, the project's own (``DATASETS.REGISTER_COCO``) and the
    project-wide training options (``MODEL_EMA``) to ``cfg`` in place."""
    for add in (add_res2net_config, add_dynamic_rcnn_config, add_tsd_config,
                add_decoupled_rcnn_config, add_rdsnet_config, add_model_ema_config):
        add(cfg)
    if "REGISTER_COCO" not in cfg.DATASETS:
        # Users' COCO-format datasets, "NAME=path/to/annotations.json:path/to/images" each,
        # registered by load_config before anything is built (projects.data.user_datasets).
        cfg.DATASETS.REGISTER_COCO = ()
    return cfg


def add_model_ema_config(cfg):
    """``MODEL_EMA`` (`projects.engine.ema`): ENABLED (False), DECAY (0.9998; the average moves
    by ``1 - DECAY`` per step), START_ITER (0; before it the average follows the model), DEVICE
    ("" = the model's device)."""
    cfg.MODEL_EMA = CN()
    cfg.MODEL_EMA.ENABLED = False
    cfg.MODEL_EMA.DECAY = 0.9998
    cfg.MODEL_EMA.START_ITER = 0
    cfg.MODEL_EMA.DEVICE = ""
    return cfg


def get_cfg():
    """Detectron2's default config plus every method's keys (a fresh copy)."""
    return add_all_configs(_d2_get_cfg())


def _all_keys(node, prefix=""):
    for k, v in node.items():
        if isinstance(v, dict):
            yield from _all_keys(v, prefix + k + ".")
        else:
            yield prefix + k


def _explain_key_error(cfg, err, source):
    msg = str(err.args[0]) if err.args else str(err)
    bad = msg.rsplit(":", 1)[-1].strip() if "Non-existent" in msg else ""
    hint = difflib.get_close_matches(bad, list(_all_keys(cfg)), n=3, cutoff=0.6) if bad else []
    text = f"{source}: {msg}"
    if hint:
        text += f" (did you mean {', '.join(hint)}?)"
    return KeyError(text)


def load_config(config_file=None, opts=(), cfg=None, datasets=()):
    """``get_cfg()`` + ``merge_from_file`` + ``merge_from_list`` with errors that name the file
    or override and suggest the closest existing key for a mistyped one. Not frozen.

    ``datasets`` (``--dataset`` values, ``NAME=ANN.json[:IMAGES]``) are appended to
    ``DATASETS.REGISTER_COCO``; every dataset listed there is then registered.
    """
    cfg = cfg if cfg is not None else get_cfg()
    if config_file:
        try:
            cfg.merge_from_file(config_file)
        except KeyError as e:
            raise _explain_key_error(cfg, e, f"config file {config_file}") from e
    if opts:
        if len(opts) % 2:
            raise ValueError(f"config overrides must be KEY VALUE pairs, got {list(opts)}")
        try:
            cfg.merge_from_list(list(opts))
        except (KeyError, AssertionError) as e:  # yacs asserts on unknown override keys
            raise _explain_key_error(cfg, e, "command-line override") from e
    if datasets:
        cfg.DATASETS.REGISTER_COCO = tuple(cfg.DATASETS.REGISTER_COCO) + tuple(
            d for d in datasets if d not in cfg.DATASETS.REGISTER_COCO)
    register_config_datasets(cfg)
    resolve_device(cfg)
    check_training_options(cfg)
    return cfg


def register_config_datasets(cfg):
    """Register the datasets of ``DATASETS.REGISTER_COCO`` (idempotent); returns their names."""
    from .data.user_datasets import register_datasets

    specs = cfg.DATASETS.get("REGISTER_COCO", ())
    if isinstance(specs, str):
        specs = (specs,)
    return register_datasets(specs)


def check_training_options(cfg):
    """Clear errors for bad ``SOLVER.CLIP_GRADIENTS`` (types: ``value``, ``norm`` per tensor,
    ``full_model_norm`` over all parameters together) and ``MODEL_EMA`` values."""
    check_clip_gradients(cfg)
    check_model_ema_config(cfg)
    return cfg


def check_clip_gradients(cfg):
    """Raise a clear error for an unknown ``SOLVER.CLIP_GRADIENTS.CLIP_TYPE`` or a
    non-positive ``CLIP_VALUE`` / ``NORM_TYPE`` while clipping is enabled."""
    clip = cfg.SOLVER.CLIP_GRADIENTS
    if not clip.ENABLED:
        return
    if clip.CLIP_TYPE not in CLIP_TYPES:
        raise ValueError(
            f"SOLVER.CLIP_GRADIENTS.CLIP_TYPE={clip.CLIP_TYPE!r} is not one of {CLIP_TYPES} "
            f"('norm' clips each parameter tensor, {FULL_MODEL_NORM!r} the norm of all "
            "parameters together)"
        )
    if not clip.CLIP_VALUE > 0:
        raise ValueError(f"SOLVER.CLIP_GRADIENTS.CLIP_VALUE={clip.CLIP_VALUE} must be > 0")
    if clip.CLIP_TYPE != "value" and not clip.NORM_TYPE > 0:
        raise ValueError(f"SOLVER.CLIP_GRADIENTS.NORM_TYPE={clip.NORM_TYPE} must be > 0 "
                         "(use 'inf' for the max norm)")


def check_model_ema_config(cfg):
    """Raise a clear error for a ``MODEL_EMA.DECAY`` outside [0, 1) or a negative START_ITER."""
    ema = cfg.MODEL_EMA
    if not ema.ENABLED:
        return
    if not 0.0 <= ema.DECAY < 1.0:
        raise ValueError(f"MODEL_EMA.DECAY={ema.DECAY} must be in [0, 1)")
    if ema.START_ITER < 0:
        raise ValueError(f"MODEL_EMA.START_ITER={ema.START_ITER} must be >= 0")


def resolve_device(cfg):
    """Fall back to ``MODEL.DEVICE: cpu`` (with a warning) when CUDA is requested but absent."""
    if cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
        logger.warning("MODEL.DEVICE=%s but CUDA is not available: using cpu", cfg.MODEL.DEVICE)
        cfg.MODEL.DEVICE = "cpu"
    return cfg


def num_classes_key(cfg):
    """``(key, value)`` of the class count the model of ``cfg`` is built with, or
    ``(None, None)`` for a meta-architecture without one known here."""
    key = NUM_CLASSES_KEYS.get(cfg.MODEL.META_ARCHITECTURE)
    if key is None:
        return None, None
    node = cfg
    for part in key.split("."):
        node = node[part]
    return key, int(node)


def _describe(classes, limit=10):
    shown = ", ".join(repr(c) for c in classes[:limit])
    return f"[{shown}{', ...' if len(classes) > limit else ''}]"


def check_num_classes(cfg, dataset_names):
    """Raise a `ValueError` when the model's class count differs from a dataset's classes.

    Runs before anything is built or trained: for every name the class list comes from the
    dataset's metadata, or its COCO json's categories when the metadata does not have it yet
    (Detectron2's ``register_coco_instances`` fills ``thing_classes`` only when the json is
    loaded), or from loading the dataset (`projects.data.user_datasets.dataset_classes`).
    Too few and too many classes are both errors naming the key, its value, the dataset and
    its classes. An unregistered name is a `KeyError` saying how to register it.
    """
    from .data.user_datasets import dataset_classes

    key, value = num_classes_key(cfg)
    if key is None:
        return
    for name in dataset_names:
        classes = dataset_classes(name)
        if classes is None or len(classes) == value:
            continue
        problem = "too few" if value < len(classes) else "too many"
        raise ValueError(
            f"{key}={value} but dataset {name!r} has {len(classes)} classes "
            f"{_describe(classes)} ({problem} classes for this dataset); "
            f"set {key} {len(classes)}"
        )
