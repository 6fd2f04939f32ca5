"""One config with every method's keys, and the checks run on every loaded config."""
import difflib
import logging

import torch
from detectron2.config import get_cfg as _d2_get_cfg
from detectron2.data import MetadataCatalog

from decoupled_rcnn import add_decoupled_rcnn_config
from dynamic_rcnn import add_dynamic_rcnn_config
from rdsnet import add_rdsnet_config
from res2net import add_res2net_config
from tsd import add_tsd_config

__all__ = ["add_all_configs", "get_cfg", "load_config", "check_num_classes",
           "resolve_device", "NUM_CLASSES_KEYS"]

logger = logging.getLogger(__name__)

# Where each meta-architecture reads its class count.
NUM_CLASSES_KEYS = {
    "GeneralizedRCNN": "MODEL.ROI_HEADS.NUM_CLASSES",
    "DecoupledRCNN": "MODEL.ROI_HEADS.NUM_CLASSES",
    "RetinaNet": "MODEL.RETINANET.NUM_CLASSES",
    "RDSNet": "MODEL.RDSNET.NUM_CLASSES",
}


def add_all_configs(cfg):
    """Add the keys of all five methods to ``cfg`` in place."""
    for add in (add_res2net_config, add_dynamic_rcnn_config, add_tsd_config,
                add_decoupled_rcnn_config, add_rdsnet_config):
        add(cfg)
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


def load_config(config_file=None, opts=(), cfg=None):
    """``get_cfg()`` + ``merge_from_file`` + ``merge_from_list`` with errors that name the file
    or override and suggest the closest existing key for a mistyped one. Not frozen."""
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
    resolve_device(cfg)
    return cfg


def resolve_device(cfg):
    """Fall back to ``MODEL.DEVICE: cpu`` (with a warning) when CUDA is requested but absent."""
    if cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
        logger.warning("MODEL.DEVICE=%s but CUDA is not available: using cpu", cfg.MODEL.DEVICE)
        cfg.MODEL.DEVICE = "cpu"
    return cfg


def check_num_classes(cfg, dataset_names):
    """Raise a clear error when the model's class count differs from a dataset's classes."""
    key = NUM_CLASSES_KEYS.get(cfg.MODEL.META_ARCHITECTURE)
    if key is None:
        return
    node = cfg
    for part in key.split("."):
        node = node[part]
    for name in dataset_names:
        classes = MetadataCatalog.get(name).get("thing_classes", None)
        if classes is not None and len(classes) != node:
            raise ValueError(
                f"{key}={node} but dataset {name!r} has {len(classes)} classes "
                f"({', '.join(classes[:5])}{', ...' if len(classes) > 5 else ''}): "
                f"set {key} {len(classes)}"
            )
