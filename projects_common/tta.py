"""Test-time augmentation (multi-scale / flip test) dispatch.

`build_tta_model(cfg, model)` wraps a trained model for the ``TEST.AUG`` settings. By default
this is Detectron2's `GeneralizedRCNNWithTTA` (scales ``TEST.AUG.MIN_SIZES``, ``MAX_SIZE``,
``FLIP``; merges with NMS). A method whose merge differs (e.g. soft-NMS) registers its own
builder under its ROI-heads or meta-architecture name with `register_tta_builder`.
"""
from typing import Callable, Dict

from detectron2.modeling import GeneralizedRCNNWithTTA

__all__ = ["build_tta_model", "register_tta_builder"]

_BUILDERS: Dict[str, Callable] = {}


def register_tta_builder(name: str, builder: Callable) -> None:
    """Use ``builder(cfg, model)`` for models whose ROI heads or meta-arch is called ``name``."""
    if name in _BUILDERS and _BUILDERS[name] is not builder:
        raise KeyError(f"a TTA builder for {name!r} is already registered")
    _BUILDERS[name] = builder


def build_tta_model(cfg, model):
    """Return ``model`` wrapped for test-time augmentation according to ``cfg.TEST.AUG``."""
    for name in (cfg.MODEL.ROI_HEADS.NAME, cfg.MODEL.META_ARCHITECTURE):
        if name in _BUILDERS:
            return _BUILDERS[name](cfg, model)
    if cfg.MODEL.META_ARCHITECTURE != "GeneralizedRCNN":
        raise NotImplementedError(
            f"TEST.AUG: no test-time augmentation for MODEL.META_ARCHITECTURE="
            f"{cfg.MODEL.META_ARCHITECTURE!r}; register one with register_tta_builder"
        )
    return GeneralizedRCNNWithTTA(cfg, model)
